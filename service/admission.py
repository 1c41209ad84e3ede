"""What a request must pass before its image is decoded and before it reaches the model: instruction
limits, the image header's checks, a budget of decoded pixels in flight and a budget of
requests waiting for the engine, both shared fairly by unary calls and stream frames.

A request reserves width * height pixels (read from the image header, see
`service.images.probe`) before its image is decoded, and gives them back when its
answer is ready: decoded, resized and patchified copies of a screenshot, and its
wait for the model, all happen inside the reservation. So the memory those take
is bounded by `--max-inflight-pixels` times the bytes one pixel costs on the way
(README: "Sizing --max-inflight-pixels"), however many RPCs are open. After its
preprocessing it takes one of `--queue-size` places in the engine's waiting line,
given back as soon as the engine admits it into the running batch.

Fairness: each budget keeps two lines, one for `Ground` calls and one for stream
frames, each first come first served (a large request is never overtaken by later
small ones of its line). When both lines wait, room goes to them in turn, so neither
kind can lock the other out. A stream frame waits for as long as its stream is
wanted; a `Ground` call waits at most `--admission-wait-s` (and never past its
deadline), then gets RESOURCE_EXHAUSTED (the client backs off and retries).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

from service.errors import QueueFull
from service.images import RawImage, probe

WAIT_POLL_S = 0.05  # how often a waiter re-checks whether it is still wanted
UNARY, STREAM = "unary", "stream"  # the two kinds of caller, one line each


class Ticket:
    """A reservation; `release()` gives it back (once, whatever the number of calls)."""

    def __init__(self, budget: "FairBudget", amount: int):
        self._budget, self.amount, self._lock = budget, amount, threading.Lock()

    def release(self, *_ignored) -> None:
        with self._lock:
            budget, self._budget = self._budget, None
        if budget is not None:
            budget.release(self.amount)


class FairBudget:
    """At most `capacity` units reserved at a time; two lines (UNARY, STREAM) served in turn."""

    def __init__(self, capacity: int, what: str, busy: str, on_change: Callable[[int], None] | None = None):
        if capacity < 1:
            raise ValueError(f"{what} budget must be >= 1, got {capacity}")
        self.capacity, self.what, self.busy = capacity, what, busy  # busy: the refusal, a str.format template
        self.in_use = 0  # units reserved now
        self._lines: dict[str, deque[object]] = {UNARY: deque(), STREAM: deque()}
        self._turn = UNARY  # the line served next when both wait
        self._cond = threading.Condition()
        self._on_change = on_change or (lambda units: None)
        self.last_change = time.monotonic()  # the last grant or release

    @property
    def waiting(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def refusal(self, amount: int) -> QueueFull:
        return QueueFull(self.busy.format(in_use=self.in_use, amount=amount, capacity=self.capacity))

    def _may_take(self, ticket: object, kind: str, amount: int) -> bool:
        other = self._lines[STREAM if kind == UNARY else UNARY]
        return (self._lines[kind][0] is ticket and self.in_use + amount <= self.capacity
                and (not other or self._turn == kind))

    def acquire(self, amount: int, kind: str = UNARY, wait_while: Callable[[], bool] | None = None,
                max_wait_s: float | None = None) -> Ticket:
        """Reserve `amount`, waiting in `kind`'s line while wait_while() holds (None: always) and for at most
        max_wait_s seconds (None: no bound); QueueFull when it gives up or can never fit."""
        if amount > self.capacity:
            raise self.refusal(amount)
        ticket, line = object(), self._lines[kind]
        end = None if max_wait_s is None else time.monotonic() + max_wait_s
        with self._cond:
            line.append(ticket)
            try:
                while not self._may_take(ticket, kind, amount):
                    if wait_while is not None and not wait_while():
                        raise QueueFull(f"gave up waiting for room in the {self.what} budget")
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        raise self.refusal(amount)
                    self._cond.wait(WAIT_POLL_S if left is None else min(WAIT_POLL_S, left))
                self.in_use += amount
                self._turn = STREAM if kind == UNARY else UNARY
                self._changed()
            finally:
                line.remove(ticket)  # tickets are plain objects: removal by identity
                self._cond.notify_all()  # the next in line may fit too
        return Ticket(self, amount)

    def release(self, amount: int) -> None:
        with self._cond:
            self.in_use -= amount
            self._changed()
            self._cond.notify_all()

    def _changed(self) -> None:
        self.last_change = time.monotonic()
        self._on_change(self.in_use)

    def stalled(self, bound_s: float, now: float | None = None) -> bool:
        """Callers wait and nothing was granted or given back for `bound_s` seconds."""
        now = time.monotonic() if now is None else now
        return self.waiting > 0 and now - self.last_change > bound_s

    @contextmanager
    def reserve(self, amount: int, kind: str = UNARY, wait_while: Callable[[], bool] | None = None,
                max_wait_s: float | None = None) -> Iterator[Ticket]:
        """`with budget.reserve(n, ...):` acquire, then release on the way out."""
        ticket = self.acquire(amount, kind, wait_while, max_wait_s)
        try:
            yield ticket
        finally:
            ticket.release()


def PixelBudget(capacity: int, on_change: Callable[[int], None] | None = None) -> FairBudget:  # noqa: N802
    """The budget of decoded pixels in flight (`--max-inflight-pixels`)."""
    return FairBudget(capacity, "pixel", "server busy: {in_use} pixels of images in flight, {amount} more do not fit "
                      "the budget of {capacity} (--max-inflight-pixels); retry later", on_change)


def QueueBudget(capacity: int, on_change: Callable[[int], None] | None = None) -> FairBudget:  # noqa: N802
    """The budget of requests waiting for the engine (`--queue-size`)."""
    return FairBudget(capacity, "queue", "server busy: {in_use} requests already wait for the model "
                      "(--queue-size {capacity}); retry later", on_change)


class InstructionLimits:
    """An instruction is refused (ValueError -> INVALID_ARGUMENT) when empty, longer than max_chars
    characters (a cheap bound checked first) or max_tokens tokens. Tokens are counted as the model
    sees the instruction: special tokens such as `<|im_end|>` count as the plain text they are
    (pixelprune.model.pipeline.chat_token_ids encodes them so). The count uses a private copy of
    the tokenizer's backend with special tokens always split, so RPC threads never switch the
    model's own tokenizer between modes."""

    def __init__(self, tokenizer, max_chars: int, max_tokens: int):
        backend = tokenizer.backend_tokenizer
        self._tokenizer = type(backend).from_str(backend.to_str())
        self._tokenizer.encode_special_tokens = True
        self.max_chars, self.max_tokens = max_chars, max_tokens

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def check(self, text: str) -> None:
        if not text or not text.strip():
            raise ValueError("instruction is empty")
        if len(text) > self.max_chars:
            raise ValueError(f"instruction has {len(text)} characters, more than {self.max_chars}")
        tokens = self.count(text)
        if tokens > self.max_tokens:
            raise ValueError(f"instruction has {tokens} tokens, more than {self.max_tokens}")


class Admission:
    """The checks of one server, in the order a request meets them."""

    def __init__(self, instructions: InstructionLimits, budget: FairBudget, max_image_pixels: int,
                 queue: FairBudget | None = None, max_wait_s: float = 1.0):
        self.instructions, self.budget, self.max_image_pixels = instructions, budget, max_image_pixels
        self.queue = queue if queue is not None else QueueBudget(16)  # places in the engine's waiting line
        self.max_wait_s = max_wait_s  # how long a unary call waits in line (--admission-wait-s)

    def admit(self, image: bytes | RawImage | None, kind: str = UNARY, wait_while: Callable[[], bool] | None = None):
        """A context manager holding the image's pixels in the budget: header checks first (ImageError),
        then room in `kind`'s line (a unary call waits at most max_wait_s), while wait_while() holds."""
        width, height = probe(image, self.max_image_pixels)
        return self.budget.reserve(width * height, kind, wait_while, self._limit(kind))

    def queue_place(self, kind: str, wait_while: Callable[[], bool] | None = None) -> Ticket:
        """One place in the engine's waiting line (released when the engine admits the request)."""
        return self.queue.acquire(1, kind, wait_while, self._limit(kind))

    def _limit(self, kind: str) -> float | None:
        return self.max_wait_s if kind == UNARY else None
