"""What passes between the engine's scheduler and its runner: plain data, no torch.

    Sequence    one request's needs (set by the engine) and its state (set by the scheduler)
    StepPlan    what one step does: row moves, layout, evictions, prefills, one decode token per row
    StepResult  what it gave: a token and its log-probability, or an error, per sequence

The runner executes a StepPlan as `pixelprune.model.runner` describes; the scheduler
(`pixelprune.model.scheduler`) makes plans and takes results.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"  # an answer: end-of-turn, budget, or a closed point
    FAILED = "failed"  # `error` says why
    CANCELLED = "cancelled"  # the caller went away
    EXPIRED = "expired"  # the deadline passed

    @property
    def ended(self) -> bool:
        return self not in (Status.WAITING, Status.RUNNING)


_ids = itertools.count(1)


@dataclass(eq=False)  # identity: sequences are handles, never compared by value
class Sequence:
    """One request's life in the engine: what it needs (set by the engine) and where it is (set here)."""

    prompt_tokens: int  # tokens of the pruned prompt
    budget: int  # new tokens allowed
    prefix_len: int = 0  # prompt tokens up to and including the last image token (what a prefix entry holds)
    cache_key: Hashable | None = None  # identity of the frame (tenant, content, pruning, size); None = no reuse
    prefix_signature: Hashable | None = None  # the prefix's own identity (template head, grid, kept blocks)
    vision_signature: Hashable | None = None  # the vision features' identity (grid, keep mask)
    has_vision: bool = False  # the caller gave vision features: no ViT, nothing to store
    deadline: float | None = None  # monotonic seconds after which the answer is useless
    is_active: Callable[[], bool] | None = None  # False once the caller has gone
    payload: Any = None  # the engine's own data for the runner (opaque here)
    id: int = field(default_factory=lambda: next(_ids))
    # ---- state, owned by the scheduler
    status: Status = Status.WAITING
    row: int = -1  # cache row while running
    length: int = 0  # cache positions this sequence has written
    rope_delta: int = 0  # MRoPE position minus cache position (constant after the prefill)
    tokens: list[int] = field(default_factory=list)  # generated token ids
    logprob: float = 0.0  # sum of the natural-log probabilities of `tokens`
    prefix_hit: bool = False  # started from a cached prompt prefix
    vision_hit: bool = False  # the ViT did not run for it (given, cached, or a prefix hit)
    error: BaseException | None = None  # why it FAILED
    admitted_at: float | None = None  # monotonic time of admission (None while waiting)
    vit_start: float = 0.0  # monotonic times of its prefill step's events (0: did not happen): the ViT call
    vit_end: float = 0.0  # it was part of began / ended (device events, placed on the host clock),
    prefill_start: float = 0.0  # the prefill forward began,
    first_token_at: float = 0.0  # and its first token was known (the forward ended)
    vision: Any = None  # the vision features its prefill used (the runner's; opaque here)

    @property
    def vit_s(self) -> float:
        return self.vit_end - self.vit_start

    @property
    def prefill_s(self) -> float:
        return self.first_token_at - self.prefill_start if self.prefill_start else 0.0

    @property
    def need(self) -> int:
        """Cache positions it may use: the prompt and every new token but the last (never fed back)."""
        return self.prompt_tokens + self.budget

    @property
    def done(self) -> bool:
        return self.status.ended


@dataclass(frozen=True)
class Move:
    src: int  # row to copy from
    dst: int  # row to copy into
    length: int  # positions 0..length-1: everything the moved sequence has written


@dataclass(frozen=True)
class Prefill:
    seq: Sequence
    row: int  # its cache row (the prefill rows of a step are contiguous)
    prefix_key: Hashable | None  # copy this stored prefix into the row, prefill only the rest
    vision_key: Hashable | None  # use these stored vision features (no ViT)
    store_prefix_key: Hashable | None  # after the prefill, keep the prefix under this key
    store_vision_key: Hashable | None  # after the ViT, keep the features under this key

    @property
    def tokens(self) -> int:
        """Tokens this prefill runs."""
        return self.seq.prompt_tokens - (self.seq.prefix_len if self.prefix_key is not None else 0)


@dataclass(frozen=True)
class Decode:
    seq: Sequence
    row: int
    token: int  # the token fed (the last generated)
    position: int  # its cache position (= the sequence's length)
    mrope: int  # its MRoPE position (all three rows)


@dataclass(frozen=True)
class StepPlan:
    slot_len: int  # the layout in force for the step (0: nothing runs)
    moves: tuple[Move, ...]  # compaction, in the old layout, before anything else
    evict_prefixes: tuple[Hashable, ...]  # stored prefixes to drop
    evict_visions: tuple[Hashable, ...]  # stored vision features to drop
    prefills: tuple[Prefill, ...]  # admitted sequences, rows len(decodes).. in order
    decodes: tuple[Decode, ...]  # one token for each running sequence, rows 0..n-1

    @property
    def empty(self) -> bool:
        return not (self.moves or self.prefills or self.decodes)


@dataclass(frozen=True)
class SeqResult:
    seq: Sequence
    token: int | None = None  # the new token (None: error)
    logprob: float = 0.0  # its natural-log probability
    error: BaseException | None = None
    rope_delta: int = 0  # prefill: MRoPE minus cache position from here on
    vit_start: float = 0.0  # prefill: monotonic times of the ViT call's start and end (0: it did not run),
    vit_end: float = 0.0
    prefill_start: float = 0.0  # of the forward's start,
    vision_reused: bool = False  # prefill: the ViT did not run for it
    prefix_stored: bool = False  # prefill: its prefix is now stored (under the plan's key)
    vision_stored: bool = False  # prefill: its features are now stored
    first_token_at: float = 0.0  # and of the first token (the forward's end)
    vision: Any = None  # prefill: the vision features used (None after a prefix hit)


@dataclass(frozen=True)
class StepResult:
    prefills: tuple[SeqResult, ...] = ()  # one per plan.prefills, same order
    decodes: tuple[SeqResult, ...] = ()  # one per plan.decodes, same order
    decode_s: float = 0.0  # seconds of the decode step
    eager_steps: int = 0  # decode steps that ran eagerly although CUDA graphs were on
    graphs: int = 0  # CUDA graphs held after the step
