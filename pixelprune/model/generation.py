"""The forward passes of batched greedy generation on a `SlotKVCache`.

The "extend" forward runs prefills: each row of the batch brings a chunk of tokens (a
whole prompt, or the rest of a prompt after a cached prefix) that continues the sequence
already in its cache slot. Rows are right-padded to the longest chunk. Query token t of
row i must see exactly the cache positions 0..start[i] + t of its own slot, so padding and
stale slot contents are never read: with the engine's `slot_attention`
(`pixelprune.model.attention`) each row attends over its own positions only; otherwise a
4-D boolean mask (rows, 1, q, kv) says the same to SDPA (`dense_mask=True` forces it, the
reference the tests compare with). Pad tokens write at positions past the row's valid end
(clamped to the slot's last position, which no sequence ever uses: every sequence needs at
least one position fewer than its slot holds), where later writes overwrite them.

The decode step feeds one token per row and attends, through a mask, over the first
`kv_len` positions of the slots: a bucket (`decode_kv_len`) of the longest row's live
length, not the whole slot.

The text model runs with the stock transformers 5.24 modules: `Qwen3VLTextModel.forward`
gets `inputs_embeds` (visual features scattered at the image tokens, as
`Qwen3VLModel.forward` does with `mm_encoder_outputs`), 4-row `position_ids` [text; t; h; w],
the 4-D mask (returned as-is by `create_causal_mask`), this cache, and DeepStack's
`visual_pos_masks` / `deepstack_visual_embeds`. Only the rows' last tokens go through
`lm_head`. The decode step (one token per row) is a function of one (3, rows) int64 tensor
so that `DecodeGraphs` can capture it in a CUDA graph per (rows, slot length, kv length).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pixelprune.model.adapter import VisionFeatures
from pixelprune.model.attention import SLOT_ATTENTION, SlotRows
from pixelprune.model.kvcache import SlotKVCache
from pixelprune.model.positions import prune_token_inputs, pruned_prompt_positions

log = logging.getLogger(__name__)
MAX_GRAPHS = 256  # CUDA graphs kept (rows buckets x slot lengths x kv lengths); beyond this, eager steps
DECODE_KV_MIN = 256  # the shortest span the decode step attends over (then powers of two up to the slot)


def decode_kv_len(live: int, slot_len: int) -> int:
    """The positions a decode step attends over when the longest row holds `live`: the power of two from
    DECODE_KV_MIN up holding them (the slot's length at most)."""
    span = DECODE_KV_MIN
    while span < live:
        span *= 2
    return min(span, slot_len)


@dataclass(frozen=True)
class Prompt:
    token_ids: torch.Tensor  # (L,) int64 on the model's device: the (pruned) prompt
    positions: torch.Tensor  # (4, L) int64: text position, then MRoPE t, h, w (the full image's, at kept tokens)
    visual: torch.Tensor  # (L,) bool: True at the image tokens
    prefix_len: int  # tokens up to and including the last image token (0: no image)
    end_mrope: int  # MRoPE position (all three rows) of the token after the prompt
    prefix_mrope: int  # MRoPE position of the first token after the prefix (= end_mrope when nothing follows)

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass(frozen=True)
class Chunk:
    token_ids: torch.Tensor  # (q,) int64: tokens this row runs now
    positions: torch.Tensor  # (4, q) int64: their text and MRoPE positions
    start: int  # slot position of the first token (earlier positions already hold this sequence)
    visual: torch.Tensor | None = None  # (q,) bool: image tokens among them; None = none
    vision: VisionFeatures | None = None  # features of those image tokens, in order

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])


def build_prompt(model, input_ids: torch.Tensor, grids: list[tuple[int, int, int]], keep) -> Prompt:
    """The pruned prompt of one full token sequence (1, L_full) with its images' grids and keep masks:
    `prune_token_inputs` (MRoPE of the full sequence at the kept columns, text row = index). The engine
    builds the same prompt on the host (`prompt_from_chat`); this is the transformers reference."""
    if not grids:
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device).expand(4, length).clone()
        return Prompt(input_ids[0], positions, torch.zeros(length, dtype=torch.bool, device=input_ids.device), 0,
                      end_mrope=length, prefix_mrope=length)
    kwargs, _ = prune_token_inputs(model, input_ids, None, None, torch.tensor(grids, dtype=torch.long), list(keep))
    ids = kwargs["input_ids"][0]
    visual = ids == model.config.image_token_id
    prefix_len = int(torch.nonzero(visual)[-1]) + 1
    positions = kwargs["position_ids"][:, 0]
    end = int(positions[1, -1]) + 1
    return Prompt(token_ids=ids, positions=positions, visual=visual, prefix_len=prefix_len, end_mrope=end,
                  prefix_mrope=int(positions[1, prefix_len]) if prefix_len < ids.shape[0] else end)


def prompt_from_chat(model, chat_ids: np.ndarray, grids: list[tuple[int, int, int]], keep, device) -> Prompt:
    """The pruned prompt of a chat's token ids (one placeholder per image, `pipeline.chat_token_ids`), its
    positions computed on the host (`positions.pruned_prompt_positions`, equal to `build_prompt`'s), then
    sent to `device` once: no device round trip."""
    ids, positions = pruned_prompt_positions(model.config, chat_ids, grids, keep)
    visual = ids == model.config.image_token_id
    at = np.flatnonzero(visual)
    prefix_len, end = (int(at[-1]) + 1 if at.size else 0), int(positions[1, -1]) + 1
    return Prompt(token_ids=torch.from_numpy(ids).to(device), positions=torch.from_numpy(positions).to(device),
                  visual=torch.from_numpy(visual).to(device), prefix_len=prefix_len, end_mrope=end,
                  prefix_mrope=int(positions[1, prefix_len]) if prefix_len < ids.shape[0] else end)


def prompt_chunk(prompt: Prompt, vision: VisionFeatures | None, start: int = 0) -> Chunk:
    """The tokens of `prompt` from position `start` on (start <= prefix_len means all image tokens from
    the first are included; start >= prefix_len means none)."""
    if 0 < start < prompt.prefix_len:
        raise ValueError("a chunk starts either at 0 or after the last image token")
    visual = prompt.visual[start:] if start == 0 and prompt.prefix_len else None
    return Chunk(token_ids=prompt.token_ids[start:], positions=prompt.positions[:, start:], start=start,
                 visual=visual, vision=vision if visual is not None else None)


def _embed(model, chunks: list[Chunk], width: int):
    """inputs_embeds (rows, width, hidden), visual_pos_masks and DeepStack features of padded chunks."""
    text = model.model.language_model
    device = text.embed_tokens.weight.device
    ids = torch.zeros((len(chunks), width), dtype=torch.long, device=device)
    visual = torch.zeros((len(chunks), width), dtype=torch.bool, device=device)
    for i, chunk in enumerate(chunks):
        ids[i, :chunk.length] = chunk.token_ids
        if chunk.visual is not None:
            visual[i, :chunk.length] = chunk.visual
    embeds = text.embed_tokens(ids)
    with_images = [c.vision for c in chunks if c.visual is not None]
    if not with_images:
        return embeds, None, None
    features = torch.cat([e for v in with_images for e in v.embeds]).to(device, embeds.dtype)
    embeds[visual] = features
    levels = len(with_images[0].deepstack)
    deepstack = [torch.cat([f for v in with_images for f in v.deepstack[level]]) for level in range(levels)]
    return embeds, visual, deepstack


def extend(model, cache: SlotKVCache, first_row: int, chunks: list[Chunk], dense_mask: bool = False) -> torch.Tensor:
    """Run `chunks` on cache rows first_row.. (one chunk per row); return the logits (rows, vocab) of each
    row's last token. The keys and values of every chunk token land in the row's slot. Attention per row
    when the text model uses SLOT_ATTENTION (unless dense_mask), else through a 4-D mask."""
    device = cache.device
    width = max(c.length for c in chunks)
    last = cache.slot_len - 1
    positions = torch.zeros((4, len(chunks), width), dtype=torch.long, device=device)
    write = torch.full((len(chunks), width), last, dtype=torch.long, device=device)
    steps = torch.arange(width, device=device)
    for i, chunk in enumerate(chunks):
        positions[:, i, :chunk.length] = chunk.positions
        write[i] = torch.clamp(chunk.start + steps, max=last)
    kv_len = max(c.start + c.length for c in chunks)
    if kv_len > last:
        raise ValueError(f"a chunk ends at {kv_len}, beyond the slot's usable {last} positions")
    embeds, visual, deepstack = _embed(model, chunks, width)
    rows = {}
    if not dense_mask and model.config.text_config._attn_implementation == SLOT_ATTENTION:
        rows["slot_rows"] = SlotRows(tuple(c.start for c in chunks), tuple(c.length for c in chunks))
        mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)  # 4-D: transformers builds none
    elif len(chunks) == 1 and chunks[0].start == 0:
        mask = None  # one whole prompt: plain causal attention (sdpa's is_causal kernels), same result
    else:
        mask = torch.arange(kv_len, device=device)[None, None, None, :] <= write[:, None, :, None]
    cache.begin(slice(first_row, first_row + len(chunks)), write, kv_len)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                        cache=cache, use_cache=True, visual_pos_masks=visual,
                                        deepstack_visual_embeds=deepstack, **rows).last_hidden_state
    ends = torch.tensor([c.length - 1 for c in chunks], device=device)
    return model.lm_head(hidden[torch.arange(len(chunks), device=device), ends]).float()


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, their natural-log probabilities in float32) of the rows' argmax."""
    logits = logits.float()
    tokens = logits.argmax(-1)
    logprobs = logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    return tokens, logprobs


def decode_step(model, cache: SlotKVCache, inputs: torch.Tensor, kv_len: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One greedy token for rows 0..n-1: inputs (3, n) int64 = [token fed; its slot position; its MRoPE
    position] (text row = slot position), attending over slot positions < kv_len (None: the whole slot;
    every row's position must be below it). Returns the next token ids (n,) and their log-probabilities
    (n,) float32. Graph-capturable: no host sync."""
    tokens, write, mrope = inputs[0], inputs[1], inputs[2]
    kv_len = cache.slot_len if kv_len is None else kv_len
    text = model.model.language_model
    embeds = text.embed_tokens(tokens[:, None])
    positions = torch.stack((write, mrope, mrope, mrope))[:, :, None]
    mask = torch.arange(kv_len, device=inputs.device)[None, None, None, :] <= write[:, None, None, None]
    cache.begin(slice(0, inputs.shape[1]), write[:, None], kv_len)
    hidden = text(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                  use_cache=True).last_hidden_state
    return greedy(model.lm_head(hidden[:, -1]))


class DecodeGraphs:
    """`step(inputs, kv_len)` replayed from CUDA graphs, one per (rows, slot length, kv length), captured on
    first use.

    Capture follows torch's recipe (warm-up on a side stream, `torch.cuda.graph` into one shared
    memory pool, replay after copying into the static input). During warm-up and capture the
    static input writes at the slot's last position, which no sequence uses, so the running
    sequences' caches are untouched. A capture that fails is logged (one warning line) and that shape
    runs eagerly from then on, as do shapes beyond MAX_GRAPHS (one warning line the first time);
    `eager_steps` counts the steps that ran eagerly."""

    def __init__(self, step: Callable[[torch.Tensor, int], tuple], slot_len: Callable[[], int]):
        self.step = step
        self._slot_len = slot_len
        self._graphs: dict[tuple[int, int, int], tuple[torch.Tensor, torch.cuda.CUDAGraph, tuple]] = {}
        self._failed: set[tuple[int, int, int]] = set()
        self._pool = None
        self.eager_steps = 0  # steps run eagerly: capture failed, or more shapes than MAX_GRAPHS
        self._warned_full = False

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, inputs: torch.Tensor, kv_len: int) -> tuple:
        key = (int(inputs.shape[1]), self._slot_len(), int(kv_len))
        entry = self._graphs.get(key)
        if entry is None and key not in self._failed:
            if len(self._graphs) < MAX_GRAPHS:
                entry = self._capture(key, inputs)
            elif not self._warned_full:
                self._warned_full = True
                log.warning("%d CUDA graphs held (MAX_GRAPHS): decode steps of new shapes run eagerly", MAX_GRAPHS)
        if entry is None:
            self.eager_steps += 1
            return self.step(inputs, kv_len)
        static_in, graph, static_out = entry
        static_in.copy_(inputs)
        graph.replay()
        return tuple(out.clone() for out in static_out)

    def _capture(self, key: tuple[int, int, int], inputs: torch.Tensor):
        static_in = torch.zeros_like(inputs)
        static_in[1] = key[1] - 1  # the slot position no sequence uses (it may lie past kv_len: writes go there)
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream(device=inputs.device)
            side.wait_stream(torch.cuda.current_stream(inputs.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.step(static_in, key[2])
            torch.cuda.current_stream(inputs.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: RPC threads may use the device (preprocessing) while this thread captures
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                static_out = self.step(static_in, key[2])
            torch.cuda.synchronize(inputs.device)
        except Exception as exc:  # noqa: BLE001 - any capture failure: run this shape eagerly
            log.warning("CUDA graph capture of the decode step (rows %d, slot length %d, kv length %d) failed, "
                        "running it eagerly: %s", key[0], key[1], key[2], exc)
            self._failed.add(key)
            return None
        self._graphs[key] = (static_in, graph, static_out)
        return self._graphs[key]
