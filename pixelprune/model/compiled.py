"""`--compile`: torch.compile the feed-forward parts of the ViT and the LLM, with dynamic shapes.

Eager transformers code launches one kernel per op: the MLP of every layer is a handful of
matrix products and elementwise ops (the gate's activation, the product, the residual),
run for every prefill and decode step. Compiling each MLP module (`nn.Module.compile`, the
loaded instance only) fuses the elementwise ops into the matrix products' neighbours and
cuts the launches. Shapes are dynamic (`dynamic=True`): one graph serves every prompt
length and batch size, so there is no size bucket to warm up beyond the first call, which
the engine's warm-up makes. Attention, the KV cache's writes and DeepStack stay eager: they
hold host-side ints (per-row lengths, segment boundaries) that would make a compiled graph
recompile per shape. The CUDA graphs of the decode step capture the compiled MLPs as they
are. Off by default: whether it pays has not been measured on a GPU (BENCHMARKS.md).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def feed_forward_modules(model) -> list:
    """The MLP module of every ViT block and every LLM decoder layer of one loaded Qwen3-VL (dense or MoE)."""
    vision = [block.mlp for block in model.model.visual.blocks]
    text = [layer.mlp for layer in model.model.language_model.layers]
    return vision + text


def compile_feed_forward(model, backend: str = "inductor") -> int:
    """Compile every feed-forward module of `model` in place (dynamic shapes); returns how many. Modules
    compiled already are left as they are."""
    modules = [m for m in feed_forward_modules(model) if getattr(m, "_compiled_call_impl", None) is None]
    for module in modules:
        module.compile(dynamic=True, backend=backend)
    if modules:
        log.info("compiled %d feed-forward modules (torch.compile, backend %s, dynamic shapes)", len(modules),
                 backend)
    return len(modules)
