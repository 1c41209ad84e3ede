"""The text model's attention for the engine's prefills: per row, over exactly its own positions.

A batched prefill runs rows of different lengths (right-padded to the longest), each
continuing a sequence that may already hold positions in its cache slot (a cached prompt
prefix). A dense 4-D boolean mask over (rows, queries, slot positions) says the same,
but forces SDPA's slower masked kernels, attends over padding, and costs a mask of
rows x width x kv_len. Here each row attends over only its own queries and keys:

    row i: queries = its `lengths[i]` chunk tokens, keys = slot positions 0..starts[i] + lengths[i] - 1,
           causal aligned at the bottom right (query t sees keys 0..starts[i] + t)

with plain causal SDPA when the row starts at 0 (the flash / efficient kernels' is_causal
path), and `torch.nn.attention.bias.causal_lower_right` otherwise. Grouped-query heads go
through SDPA's `enable_gqa`. MRoPE positions are untouched (they are applied before
attention). Pad tokens of a row get zero output (their keys are written at the slot's last
position, which no sequence reads).

It is registered under SLOT_ATTENTION with transformers' public `AttentionInterface`
(5.24) and set on the one loaded model instance's text config (`use_slot_attention`);
every call without `slot_rows` (the decode step, the adapter's stock paths) runs
transformers' own `sdpa_attention_forward` unchanged, with the masks transformers' own
`sdpa_mask` builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SLOT_ATTENTION = "pixelprune_slots"  # the text config's attention implementation in the engine


@dataclass(frozen=True)
class SlotRows:
    """One extend forward's rows, as host ints: where each row's queries start in its slot, how many."""

    starts: tuple[int, ...]  # slot position of each row's first query token
    lengths: tuple[int, ...]  # query tokens of each row (the rest of its padded width is padding)


def slot_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                   dropout: float = 0.0, scaling: float | None = None, slot_rows: SlotRows | None = None, **kwargs):
    """query (rows, heads, width, dim), key/value (rows, kv_heads, kv_len, dim) -> ((rows, width, heads, dim),
    None), like `sdpa_attention_forward`; see the module docstring."""
    if slot_rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = query.new_zeros(query.shape)
    gqa = key.shape[1] != query.shape[1]
    for row, (start, length) in enumerate(zip(slot_rows.starts, slot_rows.lengths)):
        q = query[row:row + 1, :, :length]
        k, v = key[row:row + 1, :, :start + length], value[row:row + 1, :, :start + length]
        if start == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, scale=scaling, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(length, start + length),
                                               scale=scaling, enable_gqa=gqa)
        out[row:row + 1, :, :length] = o
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SLOT_ATTENTION, slot_attention)
AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)  # masks for the calls without slot_rows, as sdpa's


def use_slot_attention(model) -> bool:
    """Route the text model of one loaded Qwen3-VL through `slot_attention` when it runs SDPA (eager is left
    as it is: a debugging choice). True when the model uses it now."""
    current = model.config.text_config._attn_implementation
    if current == "sdpa":
        model.set_attn_implementation({"text_config": SLOT_ATTENTION})
        current = model.config.text_config._attn_implementation
    return current == SLOT_ATTENTION
