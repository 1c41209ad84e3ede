"""The key of one frame in the engine's caches (vision features and prompt prefix).

Key: (content digest, pruning settings key, resized (w, h)); the same pixels
pruned the same way give the same kept blocks and so the same vision features
and prompt prefix. The content digest is exact (blake2b of the image bytes as
sent), because the caches are shared across sessions. The caches themselves live
in the engine (`pixelprune.model.batching`), bounded there (`--vision-cache-size`
entries, `--prefix-cache-bytes` bytes).
"""

from __future__ import annotations


def vision_key(content_digest: bytes, settings: tuple, resized_size: tuple[int, int]) -> tuple:
    """The cache key of one frame's vision features (and, with the tenant, its prompt prefix)."""
    return (bytes(content_digest), tuple(settings), tuple(resized_size))
