"""Prometheus metrics of the service, named once (the Grafana dashboard and alert rules use these names).

The engine returns what it did as values (timings, token counts, KV bytes); the
functions here record them. Every metric lives in an injectable
`CollectorRegistry` so tests can run several servers in one process and read
each one's numbers. Time histograms span a millisecond to a minute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics,
                               start_http_server)

from pixelprune.timings import STAGES  # the stage names, defined once
from service.health import STALL_REASONS

# Seconds: 1 ms .. 60 s, roughly x2.5 per step.
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)
RATIO_BUCKETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
BYTES_BUCKETS = tuple(float(4 ** k * 1024) for k in range(3, 14))  # 64 KiB .. 64 GiB, x4
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # sequences per decode step
TPOT_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
# Every status code the service reports; their series exist from the start, so the first burst of
# any of them shows in rate()/increase() (a series born with a value has no earlier 0 to compare).
CODES = ("OK", "CANCELLED", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED",
         "INTERNAL")
UNARY_RPCS = ("Ground",)  # observed in pixelprune_request_duration_seconds, one observation per call
STREAM_RPCS = ("GroundStream",)  # counted in pixelprune_streams_total; each frame in the frame histogram
STREAM_LIMITS = ("open", "tenant", "peer")  # why a stream was refused (--max-open-streams, per tenant, per peer)
STREAM_CLOSE_REASONS = ("first_frame_timeout", "idle_timeout", "send_timeout", "drain")  # why the server ended one


class ServiceMetrics:
    """All metrics of one server, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "pixelprune_request_duration_seconds", "Time from arrival to answer (or error) per RPC.",
            ["rpc", "code"], buckets=TIME_BUCKETS, registry=r)
        self.ttft = Histogram("pixelprune_ttft_seconds", "Time from arrival to the first generated token.",
                              buckets=TIME_BUCKETS, registry=r)
        self.stage_duration = Histogram(
            "pixelprune_stage_duration_seconds", "Time of one stage of a request that ran the model.",
            ["stage"], buckets=TIME_BUCKETS, registry=r)
        self.retain_ratio = Histogram("pixelprune_retain_ratio", "Kept / total visual tokens per model run.",
                                      buckets=RATIO_BUCKETS, registry=r)
        self.visual_tokens = Counter("pixelprune_visual_tokens_total",
                                     "Visual tokens (32x32 blocks) kept and pruned.", ["kind"], registry=r)
        self.kv_cache_bytes = Histogram("pixelprune_kv_cache_bytes", "KV-cache bytes of one request's prompt.",
                                        buckets=BYTES_BUCKETS, registry=r)
        self.kv_cache_in_use = Gauge("pixelprune_kv_cache_in_use_bytes",
                                     "KV-cache bytes held by the model worker's current generation.", registry=r)
        self.queue_depth = Gauge("pixelprune_queue_depth", "Requests waiting for the model worker.", registry=r)
        self.queue_wait = Histogram("pixelprune_queue_wait_seconds", "Time a request waited for the model worker.",
                                    buckets=TIME_BUCKETS, registry=r)
        self.frame_cache_queries = Counter(
            "pixelprune_frame_cache_queries_total", "Frames compared with their session's previous frame.",
            registry=r)
        self.frame_cache_hits = Counter(
            "pixelprune_frame_cache_hits_total", "Frames answered from the session without the model.", registry=r)
        self.changed_fraction = Histogram(
            "pixelprune_changed_block_fraction", "Share of blocks changed since the session's previous frame.",
            buckets=RATIO_BUCKETS, registry=r)
        self.redis_errors = Counter("pixelprune_redis_errors_total", "Failed Redis operations.", registry=r)
        for stage in STAGES:  # export every series from the start, so dashboards show zeros, not gaps
            self.stage_duration.labels(stage=stage)
        for kind in ("kept", "pruned"):
            self.visual_tokens.labels(kind=kind)
        self.batch_size = Histogram("pixelprune_batch_size", "Sequences decoded together in one model step.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "pixelprune_time_per_output_token_seconds",
            "Decode seconds per generated token after the first, per request.", buckets=TPOT_BUCKETS, registry=r)
        self.prefix_cache_bytes = Gauge("pixelprune_prefix_cache_bytes",
                                        "Device bytes held by cached prompt prefixes (keys and values).", registry=r)
        self.prefix_cache_queries = Counter(
            "pixelprune_prefix_cache_queries_total", "Model runs that looked up a cached prompt prefix.", registry=r)
        self.prefix_cache_hits = Counter(
            "pixelprune_prefix_cache_hits_total", "Model runs that started from a cached prompt prefix.", registry=r)
        self._add_hardening_metrics(r)
        self.model_info = Info("pixelprune_model", "The served checkpoint and the model profile its prompts and "
                               "answers follow (pixelprune_model_info{model, profile} 1).", registry=r)
        self._add_engine_metrics(r)

    def _add_engine_metrics(self, r: CollectorRegistry) -> None:
        """The KV pool, the decode step's CUDA graphs, and the watchdog's stalls."""
        self.kv_cache_capacity = Gauge("pixelprune_kv_cache_capacity_tokens",
                                       "Positions of the engine's KV pool (rows x slot length at most).", registry=r)
        self.decode_eager_steps = Counter(
            "pixelprune_decode_eager_steps_total",
            "Decode steps run eagerly although CUDA graphs are on (capture failed or too many shapes).", registry=r)
        self.cuda_graphs = Gauge("pixelprune_cuda_graphs", "CUDA graphs of the decode step held.", registry=r)
        self.stalled = Gauge("pixelprune_stalled",
                             "1 while the service cannot make progress for this reason (health NOT_SERVING).",
                             ["reason"], registry=r)
        for reason in STALL_REASONS:
            self.stalled.labels(reason=reason)

    def _add_hardening_metrics(self, r: CollectorRegistry) -> None:
        """Streams per frame, admission, and every rpc x code series from the start."""
        disable_created_metrics()  # no `*_created` series (process-wide prometheus_client setting)
        self.stream_frame_duration = Histogram(
            "pixelprune_stream_frame_duration_seconds",
            "Time from a GroundStream frame's arrival to its answer (or the error it ended the stream with).",
            ["code"], buckets=TIME_BUCKETS, registry=r)
        self.streams = Counter("pixelprune_streams_total", "GroundStream calls ended, by status code.", ["code"],
                               registry=r)
        self.stream_skipped_frames = Counter(
            "pixelprune_stream_skipped_frames_total",
            "GroundStream frames never answered: replaced by a newer frame, or pending when the stream ended.",
            registry=r)
        self.open_streams = Gauge("pixelprune_open_streams", "GroundStream calls open now.", registry=r)
        self.inflight_pixels = Gauge("pixelprune_inflight_pixels",
                                     "Decoded pixels of the images admitted and not yet answered.", registry=r)
        self.inflight_pixels_limit = Gauge("pixelprune_inflight_pixels_limit",
                                           "The pixel budget (--max-inflight-pixels).", registry=r)
        self._add_stream_guard_metrics(r)
        for code in CODES:
            for rpc in UNARY_RPCS:
                self.request_duration.labels(rpc=rpc, code=code)
            self.stream_frame_duration.labels(code=code)
            self.streams.labels(code=code)

    def _add_stream_guard_metrics(self, r: CollectorRegistry) -> None:
        """Streams refused by a limit and streams the server ended, with every label from the start."""
        self.streams_refused = Counter(
            "pixelprune_streams_refused_total",
            "GroundStream calls refused at once (RESOURCE_EXHAUSTED), by the limit they met.", ["limit"], registry=r)
        self.streams_closed = Counter(
            "pixelprune_streams_closed_by_server_total",
            "GroundStream calls the server ended: no first frame, silent, answers not read, drain.", ["reason"],
            registry=r)
        for limit in STREAM_LIMITS:
            self.streams_refused.labels(limit=limit)
        for reason in STREAM_CLOSE_REASONS:
            self.streams_closed.labels(reason=reason)

    def record_stream_refused(self, limit: str) -> None:
        self.streams_refused.labels(limit=limit).inc()

    def record_stream_closed(self, reason: str) -> None:
        self.streams_closed.labels(reason=reason).inc()

    def record_request(self, rpc: str, code: str, seconds: float) -> None:
        """A call ended: unary calls are observed with their duration, streams counted."""
        if rpc in STREAM_RPCS:
            self.streams.labels(code=code).inc()
        else:
            self.request_duration.labels(rpc=rpc, code=code).observe(seconds)

    def record_stream_frame(self, code: str, seconds: float) -> None:
        self.stream_frame_duration.labels(code=code).observe(seconds)

    def record_skipped_frames(self, count: int) -> None:
        if count:
            self.stream_skipped_frames.inc(count)

    def record_stream_open(self, opened: bool) -> None:
        """A GroundStream call began (True) or ended (False)."""
        if opened:
            self.open_streams.inc()
        else:
            self.open_streams.dec()

    def record_pixel_budget(self, pixels: int) -> None:
        self.inflight_pixels_limit.set(pixels)

    def record_inflight_pixels(self, pixels: int) -> None:
        self.inflight_pixels.set(pixels)

    def record_stages(self, seconds: Mapping[str, float]) -> None:
        """Stage name -> seconds, for the stages in STAGES that ran."""
        for stage, value in seconds.items():
            if stage in STAGES:
                self.stage_duration.labels(stage=stage).observe(value)

    def record_model_run(self, kept: int, total: int, kv_cache_bytes: int, ttft_s: float) -> None:
        """What one model run did: tokens kept/pruned, retain ratio, KV bytes, TTFT."""
        self.visual_tokens.labels(kind="kept").inc(kept)
        self.visual_tokens.labels(kind="pruned").inc(total - kept)
        if total > 0:
            self.retain_ratio.observe(kept / total)
        self.kv_cache_bytes.observe(kv_cache_bytes)
        self.ttft.observe(ttft_s)

    def record_step(self, step, waiting: int) -> None:
        """One engine step (pixelprune.model.engine.StepStats): the decode batch's size, the KV bytes the
        running sequences hold after it, eager decode steps, CUDA graphs held; and the waiting line."""
        if step.batch_size:
            self.batch_size.observe(step.batch_size)
        self.kv_cache_in_use.set(step.kv_bytes)
        if step.eager_steps:
            self.decode_eager_steps.inc(step.eager_steps)
        self.cuda_graphs.set(step.graphs)
        self.queue_depth.set(waiting)

    def record_kv_capacity(self, tokens: int) -> None:
        self.kv_cache_capacity.set(tokens)

    def record_stalls(self, flags: Mapping[str, bool]) -> None:
        """Stall reason -> whether it holds now (service/health.py)."""
        for reason, on in flags.items():
            self.stalled.labels(reason=reason).set(1 if on else 0)

    def record_decode(self, decode_seconds: float, generated_tokens: int) -> None:
        """Time per output token of one request (vLLM's TPOT): decode time over the tokens after the first."""
        if generated_tokens > 1:
            self.time_per_output_token.observe(decode_seconds / (generated_tokens - 1))

    def record_prefix_cache(self, hit: bool, cache_bytes: int) -> None:
        """One model run that could reuse a cached prefix, and the prefix cache's size after it."""
        self.prefix_cache_queries.inc()
        if hit:
            self.prefix_cache_hits.inc()
        self.prefix_cache_bytes.set(cache_bytes)

    def record_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def record_queue_wait(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def record_frame_cache(self, hit: bool) -> None:
        self.frame_cache_queries.inc()
        if hit:
            self.frame_cache_hits.inc()

    def record_changed_fraction(self, fraction: float) -> None:
        self.changed_fraction.observe(fraction)

    def record_redis_error(self) -> None:
        self.redis_errors.inc()

    def record_model(self, model: str, profile: str) -> None:
        """The checkpoint served and the profile chosen for it (--profile, or what auto chose)."""
        self.model_info.info({"model": model, "profile": profile})


@dataclass
class MetricsServer:
    port: int  # the port /metrics listens on
    _server: object  # the wsgiref server

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> MetricsServer:
    """Serve `registry` on http://host:port/metrics (port 0 = any free port) in a daemon thread."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(port=server.server_port, _server=server)
