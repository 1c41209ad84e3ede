"""PixelPrune: drop 32x32 pixel blocks that their causal neighbours predict,
before the vision encoder, and run Qwen3-VL on the rest with full-image positions.

Two floors: the core (settings, geometry, selectors, decoder, hashing, baselines,
statistics, pictures, FLOPs/KV estimator, points) is plain numpy and never imports
torch, transformers or grpc; the model layer (`pixelprune.model`) is torch and
transformers and imports the core, never the other way round. Names are imported
lazily so that `import pixelprune` never pulls in torch; `pixelprune.PrunedQwen3VL`
does, when first touched (it needs the `model` extra).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "select_blocks": "pixelprune.selectors",
    "METHODS": "pixelprune.settings",
    "METRICS": "pixelprune.settings",
    "select_blocks_torch": "pixelprune.model.selectors_torch",
    "reconstruct": "pixelprune.decoder",
    "smart_resize": "pixelprune.geometry",
    "resize_to": "pixelprune.geometry",
    "kept_pixel_values": "pixelprune.geometry",
    "block_hashes": "pixelprune.hashing",
    "frame_digest": "pixelprune.hashing",
    "random_keep": "pixelprune.baselines",
    "conncomp_keep": "pixelprune.baselines",
    "resize_baseline": "pixelprune.baselines",
    "compute_stats": "pixelprune.stats",
    "render_keep": "pixelprune.show",
    "estimate": "pixelprune.flops",
    "PrunedQwen3VL": "pixelprune.model.adapter",
    "parse_point": "pixelprune.points",
    "PruneSettings": "pixelprune.settings",
    "GroundingEngine": "pixelprune.model.engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pixelprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
