"""What a request must pass before its image is decoded or it is queued: instruction limits,
the image header's checks, and a budget of decoded pixels in flight across all RPCs.

A request reserves width * height pixels (read from the image header, see
`service.images.probe`) before its image is decoded, and gives them back when its
answer is ready: decoded, resized and patchified copies of a screenshot, and its
wait for the model, all happen inside the reservation. So the memory those take
is bounded by `--max-inflight-pixels` times the bytes one pixel costs on the way
(README: "Sizing --max-inflight-pixels"), however many RPCs are open.

Unary calls that do not fit are refused at once (RESOURCE_EXHAUSTED); streams
wait for room, first come first served, as long as they are still wanted. A
waiting stream is never overtaken by a later caller, so a large screenshot is not
starved by a flow of small ones.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

from service.errors import QueueFull
from service.images import RawImage, probe

WAIT_POLL_S = 0.05  # how often a waiting stream re-checks whether it is still wanted


class PixelBudget:
    """At most `capacity` pixels reserved at a time; FIFO for waiters."""

    def __init__(self, capacity: int, on_change: Callable[[int], None] | None = None):
        if capacity < 1:
            raise ValueError(f"pixel budget must be >= 1, got {capacity}")
        self.capacity = capacity
        self.in_use = 0  # pixels reserved now
        self._waiters: deque[object] = deque()  # tickets of waiting streams, oldest first
        self._cond = threading.Condition()
        self._on_change = on_change or (lambda pixels: None)

    def _refuse(self, pixels: int) -> QueueFull:
        return QueueFull(f"server busy: {self.in_use} pixels of images in flight, {pixels} more do not fit the "
                         f"budget of {self.capacity} (--max-inflight-pixels); retry later")

    def _take(self, pixels: int) -> None:
        self.in_use += pixels
        self._on_change(self.in_use)

    def try_acquire(self, pixels: int) -> None:
        """Reserve now or raise QueueFull (unary calls). Waiting streams come first."""
        with self._cond:
            if self._waiters or self.in_use + pixels > self.capacity:
                raise self._refuse(pixels)
            self._take(pixels)

    def acquire(self, pixels: int, wait_while: Callable[[], bool]) -> None:
        """Reserve, waiting in line for room while wait_while() is True; QueueFull once it is not."""
        ticket = object()
        with self._cond:
            self._waiters.append(ticket)
            try:
                while self._waiters[0] is not ticket or self.in_use + pixels > self.capacity:
                    if not wait_while():
                        raise QueueFull("gave up waiting for room in the pixel budget")
                    self._cond.wait(WAIT_POLL_S)
                self._take(pixels)
            finally:
                self._waiters.remove(ticket)
                self._cond.notify_all()  # the next in line may fit too

    def release(self, pixels: int) -> None:
        with self._cond:
            self.in_use -= pixels
            self._on_change(self.in_use)
            self._cond.notify_all()

    @contextmanager
    def reserve(self, pixels: int, wait_while: Callable[[], bool] | None = None) -> Iterator[None]:
        """`with budget.reserve(n):` - try_acquire (wait_while None) or acquire, then release."""
        if pixels > self.capacity:  # config validation makes this unreachable for valid images
            raise self._refuse(pixels)
        if wait_while is None:
            self.try_acquire(pixels)
        else:
            self.acquire(pixels, wait_while)
        try:
            yield
        finally:
            self.release(pixels)


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

    def __init__(self, instructions: InstructionLimits, budget: PixelBudget, max_image_pixels: int):
        self.instructions, self.budget, self.max_image_pixels = instructions, budget, max_image_pixels

    def admit(self, image: bytes | RawImage | None, wait_while: Callable[[], bool] | None = None):
        """A context manager holding the image's pixels in the budget: header checks first (ImageError),
        then try_acquire (unary) or acquire (wait_while given)."""
        width, height = probe(image, self.max_image_pixels)
        return self.budget.reserve(width * height, wait_while)
