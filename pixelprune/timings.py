"""How long each stage of one request took: one type from the screenshot's preparation to the reply.

    prepared.timings          resize, select, patchify (and upload on the device path), on the caller's thread
    output.timings            + vit, prefill, decode_tokens, ttft and the events behind them (the engine)
    answer.timings            + decode (bytes -> pixels), queue, ttft from the request's arrival, total (service)

Seconds everywhere (`ms()` for the wire); 0.0 means the stage did not run. `events` are the
monotonic host times (`time.monotonic()`) of the request's way to its first token, in
order; device work is timed with events on the device's stream and placed on the host
clock once its result is read (`pixelprune.model.runner.StageClock`), so the engine never
waits on the device only to time a stage. TTFT is the span from the first event to the
last, and the spans between consecutive events add up to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

STAGES = ("decode", "upload", "resize", "select", "patchify", "vit", "prefill", "decode_tokens")  # metrics' stages
EVENTS = ("arrival", "prepared", "queued", "admitted", "vit_start", "vit_end", "prefill_start", "first_token")


@dataclass
class Timings:
    decode: float = 0.0  # seconds: image bytes -> pixels (the service)
    upload: float = 0.0  # seconds: screenshot host -> device (preprocessing on the GPU)
    resize: float = 0.0  # seconds: smart_resize to the model's grid
    select: float = 0.0  # seconds: PixelPrune's block selection
    patchify: float = 0.0  # seconds: normalising and patchifying the kept blocks (CPU path: on first use)
    tokenize: float = 0.0  # seconds: chat template and tokenizer (pipeline.build_inputs)
    vit: float = 0.0  # seconds: vision encoder and mergers (the call this request was part of)
    prefill: float = 0.0  # seconds: the LLM prefill forward it was part of
    decode_tokens: float = 0.0  # seconds: first token -> last token
    queue: float = 0.0  # seconds: asking for a place in the engine's line -> admitted into the batch
    ttft: float = 0.0  # seconds: first event -> first token
    total: float = 0.0  # seconds: arrival -> answer (the service)
    events: tuple[tuple[str, float], ...] = field(default=(), compare=False)  # (EVENTS name, monotonic s), in order

    @property
    def prepare(self) -> float:
        """Seconds of the caller-thread preprocessing: upload, resize, select, patchify."""
        return self.upload + self.resize + self.select + self.patchify

    def stages(self) -> dict[str, float]:
        """STAGES name -> seconds, for the stage histogram."""
        return {name: getattr(self, name) for name in STAGES}

    def ms(self) -> dict[str, float]:
        """Every duration in milliseconds, by field name."""
        return {f.name: 1000.0 * getattr(self, f.name) for f in fields(self) if f.name != "events"}

    def with_events(self, *events: tuple[str, float]) -> "Timings":
        """A copy with these events merged in (by time), and ttft = first event -> first_token."""
        merged = tuple(sorted({**dict(self.events), **dict(e for e in events if e[1])}.items(),
                              key=lambda e: (e[1], EVENTS.index(e[0]))))
        moments = dict(merged)
        ttft = moments["first_token"] - merged[0][1] if "first_token" in moments else self.ttft
        return replace(self, events=merged, ttft=ttft)

    def spans(self) -> list[tuple[str, float]]:
        """(event, seconds since the previous event) for the events after the first: they add up to ttft."""
        return [(name, at - before) for (_, before), (name, at) in zip(self.events, self.events[1:])]
