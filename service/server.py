"""Build and run the gRPC server: `create_server(config)` for tests and embedding, `serve(config)` for the CLI.

Health (grpc.health.v1) says NOT_SERVING until the model has run its warm-up
request, SERVING after, and NOT_SERVING again as soon as draining starts, so
Kubernetes stops routing before the process goes away. Server reflection is on.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from pixelprune.geometry import BLOCK_SIZE
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from pixelprune_api.grounding.v1 import grounding_pb2_grpc as pb_grpc
from pixelprune.hashing import block_hashes
from service.config import ServiceConfig
from service.errors import BearerAuthInterceptor
from service.grounding import Grounder
from service.metrics import MetricsServer, ServiceMetrics, start_metrics_server
from service.servicer import GroundingServicer
from service.sessions import InProcessSessionStore, RedisSessionStore, redis_client
from service.worker import ModelWorker

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Grounding"].full_name


@dataclass
class ServerHandle:
    server: grpc.Server  # the running gRPC server
    port: int  # the bound gRPC port
    metrics_port: int | None  # the bound /metrics port (None = off)
    grounder: Grounder  # the domain object (engine, store, cache, worker)
    metrics: ServiceMetrics  # this server's metrics
    health: health.HealthServicer  # the grpc.health.v1 servicer
    worker: ModelWorker  # the model worker
    _metrics_server: MetricsServer | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    def warmup(self) -> None:
        """Run the engine's warm-up request on the model worker (and compile the block hash
        the session path uses), then report SERVING."""
        block_hashes(np.zeros((BLOCK_SIZE, BLOCK_SIZE, 3), dtype=np.uint8))
        self.worker.run(self.grounder.engine.warmup)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("model warm: health SERVING")

    def drain(self) -> None:
        """Report NOT_SERVING (and keep it), so load balancers and probes stop sending traffic."""
        self.health.enter_graceful_shutdown()

    def stop(self, grace: float | None = None) -> None:
        """Drain, let in-flight RPCs finish within `grace` seconds, then stop worker and /metrics."""
        if self._stopped.is_set():
            return
        self.drain()
        self.server.stop(grace).wait()
        self.worker.stop(timeout=5)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        self._stopped.set()


def batch_settings(config: ServiceConfig):
    """The engine's batch limits and caches from the serve flags."""
    from pixelprune.model.request import BatchSettings

    return BatchSettings(max_batch_size=config.max_batch_size, max_batch_tokens=config.max_batch_tokens,
                         cuda_graphs=not config.no_cuda_graphs, stop_after_point=config.stop_after_point,
                         prefix_cache_bytes=config.prefix_cache_bytes, vision_cache_size=config.vision_cache_size)


def load_engine(config: ServiceConfig):
    """The configured model, loaded (imports torch and transformers)."""
    from pixelprune.model.engine import GroundingEngine, ModelSpec

    return GroundingEngine.load(ModelSpec(model=config.model, device=config.device, dtype=config.dtype,
                                          max_new_tokens=config.max_new_tokens), batch=batch_settings(config))


def session_key_prefix(config: ServiceConfig) -> str:
    """Redis key prefix of this replica's sessions: `--redis-prefix` plus a tag of the model and
    the answer length, so replicas share sessions (and cached answers) only when they would
    give the same answers; a replica serving another model never returns this one's."""
    tag = hashlib.blake2b(f"{config.model}|{config.max_new_tokens}".encode(), digest_size=6).hexdigest()
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


def create_server(config: ServiceConfig, engine=None, registry: CollectorRegistry | None = None,
                  warmup: bool = True) -> ServerHandle:
    """Start a server for `config` (port 0 = any free port) and return its handle.

    engine: a loaded GroundingEngine (None = load config.model; a given one keeps its own batch
    settings: build it with `batch_settings(config)`). registry: where metrics go
    (None = a fresh one). warmup=False leaves health NOT_SERVING until handle.warmup()."""
    config.validate()
    token = config.auth_token()
    engine = engine if engine is not None else load_engine(config)
    metrics = ServiceMetrics(registry)
    worker = ModelWorker(config.queue_size, on_depth=metrics.record_queue_depth, on_wait=metrics.record_queue_wait,
                         engine=engine, on_step=lambda step: metrics.record_step(step.batch_size, step.kv_bytes))
    grounder = Grounder(engine, _session_store(config, metrics), worker, metrics, config.max_image_pixels,
                        config.max_instruction_chars)
    denied = lambda method: metrics.record_request(method.rsplit("/", 1)[-1], "UNAUTHENTICATED", 0.0)  # noqa: E731
    interceptors = [BearerAuthInterceptor(token, on_denied=denied)] if token else []
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_concurrent_rpcs,
                                                    thread_name_prefix="pixelprune-rpc"),
                         interceptors=interceptors, options=options,
                         maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    pb_grpc.add_GroundingServicer_to_server(GroundingServicer(grounder, metrics, config.prune), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    metrics_server = None
    try:
        port = _bind(server, config)
        if config.metrics_port >= 0:
            try:
                metrics_server = start_metrics_server(metrics.registry, config.metrics_port, config.host)
            except OSError as exc:
                raise ValueError(f"cannot serve metrics on {config.host}:{config.metrics_port}: {exc}") from None
    except ValueError:
        worker.stop(timeout=1)
        raise
    server.start()
    handle = ServerHandle(server=server, port=port, metrics_port=metrics_server.port if metrics_server else None,
                          grounder=grounder, metrics=metrics, health=health_servicer, worker=worker,
                          _metrics_server=metrics_server)
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
    log.info("listening: gRPC %s:%d%s, metrics %s, auth %s", config.host, handle.port,
             " (TLS)" if config.tls_cert else "",
             f"{config.host}:{handle.metrics_port}/metrics" if handle.metrics_port is not None else "off",
             "bearer token" if config.auth_token_file else "off")
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("%s: draining (grace %.0f s)", signal.Signals(signum).name, config.drain_grace_s)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        threading.Thread(target=_warmup_logged, args=(handle,), name="pixelprune-warmup", daemon=True).start()
        stop.wait()
        handle.stop(config.drain_grace_s)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    log.info("stopped")
    return 0
