"""Build and run the gRPC server: `create_server(config)` for tests and embedding, `serve(config)` for the CLI.

Health (grpc.health.v1) says NOT_SERVING until the model has run its warm-up
request, SERVING after, NOT_SERVING while the service cannot make progress (a
watchdog, service/health.py), and NOT_SERVING again as soon as draining starts,
so Kubernetes stops routing before the process goes away. Health is served on the
main port and on its own plaintext port (`--health-port`) by a second gRPC server
with its own threads, so probes are answered even when `--max-concurrent-rpcs`
calls hold every thread of the main one. Server reflection (v1 and v1alpha) is on.

Drain (SIGTERM): health turns NOT_SERVING while the listener keeps serving for
`--drain-delay-s`, so probes and health-checking clients see it; then the
listener stops accepting, each open stream ends with OK after the frame it is
answering (its trailer counts the frames left), and unary calls in flight get
`--drain-grace-s` to finish. The log says how many calls finished in the grace
period and how many it cut.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import platform
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2_grpc
from prometheus_client import CollectorRegistry

from pixelprune.geometry import BLOCK_SIZE
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from pixelprune_api.grounding.v1 import grounding_pb2_grpc as pb_grpc
from pixelprune.hashing import block_hashes
from service.admission import Admission, InstructionLimits, PixelBudget, QueueBudget
from service.auth import BearerAuthInterceptor
from service.config import ServiceConfig
from service.errors import DecodeGuard
from service.grounding import Grounder
from service.health import HealthState, Watchdog
from service.metrics import MetricsServer, ServiceMetrics, start_metrics_server
from service.reflection import enable_reflection
from service.servicer import GroundingServicer
from service.sessions import InProcessSessionStore, RedisSessionStore, redis_client
from service.streams import StreamLimits, StreamRegistry

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Grounding"].full_name
MMAP_THRESHOLD_BYTES = 4 << 20  # buffers from this size up are mapped and unmapped, never kept in a heap
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
HEALTH_THREADS = 4  # threads of the health-only server (Check is a dictionary lookup)
HEALTH_MAX_RPCS = 64  # open calls the health-only server accepts (Watch streams do not hold a thread)


@dataclass
class ServerHandle:
    server: grpc.Server  # the running gRPC server
    port: int  # the bound gRPC port
    metrics_port: int | None  # the bound /metrics port (None = off)
    grounder: Grounder  # the domain object (engine, loop, session store)
    metrics: ServiceMetrics  # this server's metrics
    health: health.HealthServicer  # the grpc.health.v1 servicer
    loop: object  # the engine loop (pixelprune.model.loop.EngineLoop)
    _metrics_server: MetricsServer | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)
    health_port: int | None = None  # the bound port of the health-only server (None = off)
    _health_server: grpc.Server | None = None
    admission: Admission | None = None  # instruction limits, header checks, pixel and queue budgets
    state: HealthState | None = None  # what health says (warm, draining, stalled)
    watchdog: Watchdog | None = None  # turns health NOT_SERVING while the service cannot make progress
    servicer: GroundingServicer | None = None  # the Grounding servicer (its call counts feed the drain log)
    streams: StreamRegistry | None = None  # the open streams (limits, send watchdog, drain)

    def warmup(self) -> None:
        """Run the engine's warm-up request on the engine loop (and compile the block hash the session
        path uses), then report SERVING."""
        block_hashes(np.zeros((BLOCK_SIZE, BLOCK_SIZE, 3), dtype=np.uint8))
        engine = self.grounder.engine
        self.loop.call(engine.warmup).result()
        self.metrics.record_kv_capacity(engine.kv_capacity_tokens)
        self.state.set_warm()
        log.info("model warm: KV pool of %d positions; health SERVING", engine.kv_capacity_tokens)

    def drain(self) -> None:
        """Report NOT_SERVING (and keep it), so load balancers and probes stop sending traffic."""
        self.state.drain()

    def stop(self, grace: float | None = None) -> None:
        """Drain, end open streams after their current frame, let in-flight RPCs finish within
        `grace` seconds, then stop the engine loop, /metrics and health."""
        if self._stopped.is_set():
            return
        self.drain()
        self._stop_serving(grace)
        if self.watchdog is not None:
            self.watchdog.stop()
        self.loop.stop(timeout=5)
        if self.streams is not None:
            self.streams.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        if self._health_server is not None:
            self._health_server.stop(0).wait()
        self._stopped.set()

    def _stop_serving(self, grace: float | None) -> None:
        """The listener stops, streams end after their current frame, calls get `grace`; one log line."""
        begun, ended = self.servicer.calls() if self.servicer is not None else ({}, {})
        in_flight = {rpc: begun[rpc] - ended[rpc] for rpc in begun}
        streams = self.streams.drain() if self.streams is not None else 0
        start = time.monotonic()
        self.server.stop(grace).wait()
        if self.servicer is None:
            return
        _, after = self.servicer.calls()
        finished = {rpc: after[rpc] - ended.get(rpc, 0) for rpc in after}
        log.info("drain: %d of %d requests in flight finished in %.1f s of the %s s grace period (Ground: %d of %d; "
                 "GroundStream: %d of %d, %d ended after their current frame)",
                 sum(finished.values()), sum(in_flight.values()), time.monotonic() - start,
                 "unlimited" if grace is None else f"{grace:g}", finished.get("Ground", 0), in_flight.get("Ground", 0),
                 finished.get("GroundStream", 0), in_flight.get("GroundStream", 0), streams)

    def shutdown(self, delay: float, grace: float | None, cut_short: threading.Event | None = None) -> None:
        """NOT_SERVING for `delay` seconds while still serving (ended early by `cut_short`), then stop(grace)."""
        self.drain()
        (cut_short or threading.Event()).wait(delay)
        self.stop(grace)


def return_large_buffers_to_the_os() -> bool:
    """Have glibc map every buffer of MMAP_THRESHOLD_BYTES or more with its own mmap, so that a
    screenshot's decoded and resized copies go back to the OS when freed. Left to its default,
    glibc raises its threshold to 32 MiB after the first large free and keeps freed blocks (Pillow
    decodes in 16 MiB blocks) in per-thread arenas: each large request on a new RPC thread then
    leaves its image's size behind (measured: +700 MB of idle RSS per pair of 49-megapixel PNGs).
    The same as MALLOC_MMAP_THRESHOLD_=4194304 in the environment. False where libc is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def load_engine(config: ServiceConfig):
    """The configured model, loaded (imports torch and transformers), with its profile (--profile; auto: from
    the checkpoint's name and card) logged, and a warning when --max-new-tokens cuts the family's answers."""
    from pixelprune.model.engine import GroundingEngine

    engine = GroundingEngine.load(config.spec, batch=config.batch)
    profile = engine.profile
    log.info("profile %s (%s): %s, answers in %s; %s", profile.name, engine.profile_reason, profile.family,
             profile.coordinates.name, profile.source)
    if getattr(engine.model.config, "pixelprune_rigged_answer", None) and str(engine.dtype) != "torch.float32":
        log.warning("%s is rigged to a fixed answer, which holds in float32 only (--dtype float32)", config.spec.model)
    if config.spec.max_new_tokens < profile.answer_tokens:
        log.warning("--max-new-tokens %d is shorter than a whole %s answer (~%d tokens): answers may be cut off",
                    config.spec.max_new_tokens, profile.name, profile.answer_tokens)
    return engine


def session_key_prefix(config: ServiceConfig) -> str:
    """Redis key prefix of this replica's sessions: `--redis-prefix` plus a tag of the model, the
    answer length and the profile, so replicas share sessions (and cached answers) only when they
    would give the same answers; a replica serving another model never returns this one's."""
    spec = config.spec
    tag = hashlib.blake2b(f"{spec.model}|{spec.max_new_tokens}|{spec.profile}".encode(),
                          digest_size=6).hexdigest()
    return f"{config.redis_prefix}{tag}:"


def _session_store(config: ServiceConfig, metrics: ServiceMetrics):
    if config.redis_url is None:
        return InProcessSessionStore(ttl_s=config.session_ttl_s)
    return RedisSessionStore(redis_client(config.redis_url), ttl_s=config.session_ttl_s,
                             prefix=session_key_prefix(config), on_error=metrics.record_redis_error)


def _bind(server: grpc.Server, config: ServiceConfig) -> int:
    address = f"{config.host}:{config.port}"
    try:
        if config.tls_cert is None:
            port = server.add_insecure_port(address)
        else:
            with open(config.tls_key, "rb") as f_key, open(config.tls_cert, "rb") as f_cert:
                credentials = grpc.ssl_server_credentials([(f_key.read(), f_cert.read())])
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        raise ValueError(f"cannot bind gRPC to {address}: {exc}") from None
    if port == 0:
        raise ValueError(f"cannot bind gRPC to {address}")
    return port


def _admission(config: ServiceConfig, engine, metrics: ServiceMetrics) -> Admission:
    """Instruction limits (with the engine's tokenizer), the pixel budget and the queue of one server."""
    metrics.record_pixel_budget(config.max_inflight_pixels)
    return Admission(InstructionLimits(engine.processor.tokenizer, config.max_instruction_chars,
                                       config.max_instruction_tokens),
                     PixelBudget(config.max_inflight_pixels, on_change=metrics.record_inflight_pixels),
                     config.max_image_pixels, queue=QueueBudget(config.queue_size),
                     max_wait_s=config.admission_wait_s)


def _watchdog(config: ServiceConfig, state: HealthState, loop, admission: Admission,
              metrics: ServiceMetrics) -> Watchdog:
    """Health NOT_SERVING while the engine or an admission budget makes no progress (service/health.py)."""
    bound = config.stall_timeout_s
    probes = {"engine_loop_dead": lambda: loop.stalled(bound) == "engine_loop_dead",
              "engine_no_progress": lambda: loop.stalled(bound) == "engine_no_progress",
              "pixel_budget_no_progress": lambda: admission.budget.stalled(bound),
              "queue_no_progress": lambda: admission.queue.stalled(bound)}
    return Watchdog(state, probes, interval_s=min(1.0, bound / 4), on_change=metrics.record_stalls)


def _stream_registry(config: ServiceConfig, metrics: ServiceMetrics) -> StreamRegistry:
    """The stream limits and clocks of the serve flags (its watchdog starts with the server)."""
    limits = StreamLimits(max_open=config.max_open_streams, per_tenant=config.max_streams_per_tenant,
                          per_peer=config.max_streams_per_peer, idle_timeout_s=config.stream_idle_timeout_s,
                          first_frame_timeout_s=config.stream_first_frame_timeout_s)
    return StreamRegistry(limits, on_refused=metrics.record_stream_refused, on_closed=metrics.record_stream_closed)


def _grpc_server(config: ServiceConfig, metrics: ServiceMetrics, tenants: dict[str, str] | None) -> grpc.Server:
    """The main gRPC server (not started): auth and the deserialisation guard as interceptors."""
    denied = lambda method: metrics.record_request(method.rsplit("/", 1)[-1], "UNAUTHENTICATED", 0.0)  # noqa: E731
    interceptors = [BearerAuthInterceptor(tenants, on_denied=denied)] if tenants else []
    interceptors.append(DecodeGuard((f"/{SERVICE_NAME}/",)))
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.so_reuseport", 0)]
    return grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_concurrent_rpcs,
                                                  thread_name_prefix="pixelprune-rpc"),
                       interceptors=interceptors, options=options,
                       maximum_concurrent_rpcs=config.max_concurrent_rpcs)


def _health_server(servicer: health.HealthServicer, config: ServiceConfig) -> tuple[grpc.Server | None, int | None]:
    """The plaintext health-only server on --health-port (started), or (None, None) when it is off.
    Plaintext even with TLS on the main port: kubelet's gRPC probes do not speak TLS."""
    if config.health_port < 0:
        return None, None
    pool = futures.ThreadPoolExecutor(max_workers=HEALTH_THREADS, thread_name_prefix="pixelprune-health")
    server = grpc.server(pool, options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=HEALTH_MAX_RPCS)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"{config.host}:{config.health_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ValueError(f"cannot bind the health server to {address}: {exc}") from None
    server.start()
    return server, port


def create_server(config: ServiceConfig, engine=None, registry: CollectorRegistry | None = None,
                  warmup: bool = True) -> ServerHandle:
    """Start a server for `config` (port 0 = any free port) and return its handle.

    engine: a loaded GroundingEngine (None = load config.spec; a given one keeps its own batch
    settings: build it with `config.batch`). registry: where metrics go
    (None = a fresh one). warmup=False leaves health NOT_SERVING until handle.warmup()."""
    config.validate()
    tenants = config.auth_tenants()
    return_large_buffers_to_the_os()
    engine = engine if engine is not None else load_engine(config)
    from pixelprune.model.loop import EngineLoop

    metrics = ServiceMetrics(registry)
    metrics.record_kv_capacity(engine.kv_capacity_tokens)  # again after the warm-up, which sizes it on CUDA
    metrics.record_model(config.spec.model, engine.profile.name)
    loop = EngineLoop(engine, on_step=lambda step: metrics.record_step(step, loop.waiting))
    server = _grpc_server(config, metrics, tenants)
    admission = _admission(config, engine, metrics)
    grounder = Grounder(engine, _session_store(config, metrics), loop, metrics, config.max_image_pixels, admission)
    streams = _stream_registry(config, metrics)
    servicer = GroundingServicer(grounder, metrics, config.prune, admission, streams)
    pb_grpc.add_GroundingServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    state = HealthState(health_servicer, ("", SERVICE_NAME))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, (SERVICE_NAME, health.SERVICE_NAME))
    metrics_server = health_server = None
    try:
        port = _bind(server, config)
        health_server, health_port = _health_server(health_servicer, config)
        if config.metrics_port >= 0:
            try:
                metrics_server = start_metrics_server(metrics.registry, config.metrics_port, config.host)
            except OSError as exc:
                raise ValueError(f"cannot serve metrics on {config.host}:{config.metrics_port}: {exc}") from None
    except ValueError:
        loop.stop(timeout=1)
        if health_server is not None:
            health_server.stop(0)
        raise
    server.start()
    streams.start()
    handle = ServerHandle(server=server, port=port, metrics_port=metrics_server.port if metrics_server else None,
                          grounder=grounder, metrics=metrics, health=health_servicer, loop=loop,
                          _metrics_server=metrics_server, health_port=health_port, _health_server=health_server,
                          admission=admission, state=state, servicer=servicer, streams=streams,
                          watchdog=_watchdog(config, state, loop, admission, metrics).start())
    if warmup:
        handle.warmup()
    return handle


def _warmup_logged(handle: ServerHandle) -> None:
    try:
        handle.warmup()
    except Exception:  # noqa: BLE001 - health stays NOT_SERVING; the log says why
        log.exception("warm-up failed; health stays NOT_SERVING")


def serve(config: ServiceConfig, engine=None) -> int:
    """Run until SIGTERM/SIGINT, then drain in-flight requests within config.drain_grace_s."""
    handle = create_server(config, engine=engine, warmup=False)
    log.info("listening: gRPC %s:%d%s, health %s, metrics %s, auth %s", config.host, handle.port,
             " (TLS)" if config.tls_cert else "",
             f"{config.host}:{handle.health_port}" if handle.health_port is not None else "main port only",
             f"{config.host}:{handle.metrics_port}/metrics" if handle.metrics_port is not None else "off",
             "bearer token" if config.auth_token_file else "off")
    stop, cut_short = threading.Event(), threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set():  # a second signal: skip what is left of the drain delay
            cut_short.set()
            return
        log.info("%s: draining (NOT_SERVING for %g s while still serving, then %g s grace)",
                 signal.Signals(signum).name, config.drain_delay_s, config.drain_grace_s)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        threading.Thread(target=_warmup_logged, args=(handle,), name="pixelprune-warmup", daemon=True).start()
        stop.wait()
        handle.shutdown(config.drain_delay_s, config.drain_grace_s, cut_short)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    log.info("stopped")
    return 0
