"""What health says, and a watchdog that makes it tell the truth.

Health (grpc.health.v1, for the empty service name and the Grounding service) is SERVING
only while the model is warm, the server is not draining, and the service can make
progress. The watchdog checks every `interval_s` whether it can: the engine loop's thread
is alive, and no work (in the engine, or waiting for room in an admission budget) has
gone `stall_timeout_s` seconds without anything being admitted, run, ended, granted or
given back. While stalled, health is NOT_SERVING (Kubernetes restarts the pod or routes
around it), `pixelprune_stalled{reason}` is 1 and one warning line says why; it turns
SERVING again by itself once progress resumes.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)
STALL_REASONS = ("engine_loop_dead", "engine_no_progress", "pixel_budget_no_progress", "queue_no_progress")


class HealthState:
    """SERVING iff warm, not draining and not stalled; pushed to the health servicer on every change."""

    def __init__(self, servicer: health.HealthServicer, names: Iterable[str]):
        self.servicer, self.names = servicer, tuple(names)
        self._lock = threading.Lock()
        self.warm = self.draining = False
        self.stalled: tuple[str, ...] = ()
        self._apply()

    @property
    def serving(self) -> bool:
        return self.warm and not self.draining and not self.stalled

    def _apply(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.names:
            self.servicer.set(name, status)

    def set_warm(self) -> None:
        with self._lock:
            self.warm = True
            self._apply()

    def drain(self) -> None:
        """NOT_SERVING for good (the process is going away)."""
        with self._lock:
            self.draining = True
            self.servicer.enter_graceful_shutdown()

    def set_stalled(self, reasons: tuple[str, ...]) -> None:
        with self._lock:
            if reasons == self.stalled or self.draining:
                return
            self.stalled = reasons
            self._apply()


class Periodic:
    """A daemon thread calling `fn()` every `period_s` seconds until `stop()`; an exception in one call is
    logged (`what` names the call) and the next call comes as planned."""

    def __init__(self, fn: Callable[[], object], period_s: float, name: str, what: str):
        self.fn, self.period_s, self.what = fn, period_s, what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Periodic":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.fn()
            except Exception:  # noqa: BLE001 - a bug in one call must not end the thread
                log.exception("%s failed", self.what)

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if timeout is not None and self._thread.is_alive():
            self._thread.join(timeout)


class Watchdog:
    """A daemon thread calling `check()` every interval; `check` is also callable directly (tests)."""

    def __init__(self, state: HealthState, probes: dict[str, Callable[[], bool]], interval_s: float,
                 on_change: Callable[[dict[str, bool]], None] | None = None):
        self.state, self.probes, self.interval_s = state, probes, interval_s
        self._on_change = on_change or (lambda flags: None)
        self._ticker = Periodic(self.check, interval_s, "pixelprune-watchdog", "the watchdog's check")

    def start(self) -> "Watchdog":
        self._ticker.start()
        return self

    def check(self) -> tuple[str, ...]:
        """Run the probes; update health and the metric; return the reasons found."""
        flags = {reason: bool(probe()) for reason, probe in self.probes.items()}
        reasons = tuple(reason for reason, on in flags.items() if on)
        if reasons != self.state.stalled:
            if reasons:
                log.warning("the service cannot make progress (%s): health NOT_SERVING", ", ".join(reasons))
            else:
                log.info("progress resumed: stalls cleared")
            self._on_change(flags)
        self.state.set_stalled(reasons)
        return reasons

    def stop(self) -> None:
        self._ticker.stop()
