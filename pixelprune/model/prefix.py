"""Reuse across requests on one screen: the prompt prefix's keys and values.

The prompt puts the image(s) before the instruction, so every token up to the last image
token depends only on the chat template, the pixels and the pruning: a `PrefixEntry` holds
those tokens' keys and values (all layers) and the MRoPE position the continuation starts
from. A request with the same cache key and prefix signature copies the entry into its
cache slot and prefills only the tokens after it. Which entries exist, and which one a
request may use, is the scheduler's bookkeeping (`pixelprune.model.scheduler.Ledger`);
the runner holds the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefixEntry:
    kv: torch.Tensor  # (layers, 2, kv_heads, length, head_dim) on the model's device: keys, values
    length: int  # prefix tokens: up to and including the last image token
    next_mrope: int  # MRoPE position (all three rows) of the first token after the prefix

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()
