"""The gRPC servicer: unpack (from_pb), call the domain function, pack (to_pb). Nothing else.

Before the domain function runs, a request passes admission (service/admission.py):
its instruction's limits, its image header's checks, and a reservation of its
decoded pixels in the server's budget; unary calls and stream frames wait in lines
of their own, served in turn (a unary call at most --admission-wait-s, then
RESOURCE_EXHAUSTED; a stream frame while its stream is wanted).

GroundStream runs two threads per stream: a reader that consumes frames as
fast as the client sends them and keeps only the newest pending one (the
instruction and pruning settings of every frame still apply in order), and the
RPC's own thread, which answers the newest frame, then the next newest, and
reports how many frames were skipped in between (service/streams.py). A stream
holds at most one request in the engine's waiting line; when the line is full,
the stream's frame waits for room instead of failing the stream: overload shows
as latency and skipped frames. Frames left unanswered when a stream ends are counted in the trailing
metadata `pixelprune-skipped-frames`. Each caller's tenant (service/auth.py)
goes into its queries, so sessions and caches are per tenant.

Open streams are registered in a StreamRegistry (service/streams.py): a stream
over a limit is refused at once, an answer the client does not read closes the
stream after the idle timeout, and on drain each stream ends with OK after the
frame it is answering (a frame still waiting for room is left unanswered and
counted in the trailer), so its client reconnects elsewhere at once.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from typing import Callable

from pixelprune.keepmask import pack_keep
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from pixelprune_api.grounding.v1 import grounding_pb2_grpc as pb_grpc
from service.admission import STREAM, UNARY, Admission
from service.auth import current_tenant
from service.errors import QueueFull, outcome, status_of, stream_errors, unary_errors
from pixelprune.settings import PruneSettings
from service.grounding import GroundAnswer, Grounder, GroundQuery
from service.images import RawImage
from service.metrics import ServiceMetrics
from service.streams import SKIPPED_FRAMES_KEY, NewestFrame, Pending, StreamRegistry

_METHODS = {pb.PruningSettings.METHOD_PRED2D: "pred2d", pb.PruningSettings.METHOD_RASTER: "raster",
            pb.PruningSettings.METHOD_SERPENTINE: "serpentine"}
_METRICS = {pb.PruningSettings.METRIC_MAX: "max", pb.PruningSettings.METRIC_MAE: "mae"}


def settings_from_pb(msg: pb.PruningSettings | None, defaults: PruneSettings) -> PruneSettings:
    """The one mapping from the proto's pruning message onto PruneSettings: set fields over the
    server's defaults (None = no message). ValueError for enum values this server does not know
    and for an invalid tau (PruneSettings validates)."""
    if msg is None:
        return defaults
    if msg.method != pb.PruningSettings.METHOD_UNSPECIFIED and msg.method not in _METHODS:
        raise ValueError(f"unknown pruning method {msg.method}")
    if msg.metric != pb.PruningSettings.METRIC_UNSPECIFIED and msg.metric not in _METRICS:
        raise ValueError(f"unknown pruning metric {msg.metric}")
    return PruneSettings(enabled=defaults.enabled and not msg.disabled,
                         method=_METHODS.get(msg.method, defaults.method),
                         metric=_METRICS.get(msg.metric, defaults.metric),
                         tau=msg.tau if msg.HasField("tau") else defaults.tau)


def image_from_pb(msg: pb.Image) -> bytes | RawImage | None:
    source = msg.WhichOneof("source")
    if source == "encoded":
        return msg.encoded
    if source == "raw":
        return RawImage(width=msg.raw.width, height=msg.raw.height, rgb=msg.raw.rgb)
    return None


def query_from_pb(request: pb.GroundRequest, defaults: PruneSettings, tenant: str = "") -> GroundQuery:
    pruning = request.pruning if request.HasField("pruning") else None
    return GroundQuery(image=image_from_pb(request.image), instruction=request.instruction,
                       session_id=request.session_id, pruning=settings_from_pb(pruning, defaults), tenant=tenant)


TIMING_FIELDS = ("decode", "upload", "resize", "select", "patchify", "vit", "prefill", "ttft", "decode_tokens",
                 "queue", "total")  # pixelprune.timings.Timings fields the proto's Timings carries (as *_ms)


def to_pb(answer: GroundAnswer, skipped_frames: int = 0, sequence: int = 0) -> pb.GroundResponse:
    t = answer.timings.ms()
    response = pb.GroundResponse(
        found=answer.found, raw_answer=answer.raw_answer, kept_blocks=answer.kept_blocks,
        total_blocks=answer.total_blocks, retain_ratio=answer.retain_ratio,
        changed_fraction=answer.changed_fraction, cache_hit=answer.cache_hit,
        vision_cache_hit=answer.vision_cache_hit, session_id=answer.session_id,
        skipped_frames=skipped_frames, sequence=sequence,
        timings=pb.Timings(**{f"{stage}_ms": t[stage] for stage in TIMING_FIELDS}),
        image_width=answer.image_size[0], image_height=answer.image_size[1],
        model_width=answer.model_size[0], model_height=answer.model_size[1],
        random_weights=answer.random_weights, prefix_cache_hit=answer.prefix_cache_hit,
        kv_cache_bytes=answer.kv_cache_bytes, answer_logprob=answer.answer_logprob)
    if answer.point is not None:
        response.point.x, response.point.y = answer.point
    if answer.point_normalized is not None:
        response.point_normalized.x, response.point_normalized.y = answer.point_normalized
    if answer.keep is not None:
        rows, cols, bits = pack_keep(answer.keep)
        response.keep_mask.CopyFrom(pb.KeepMask(rows=rows, cols=cols, bits=bits))
    return response


def deadline_of(context) -> float | None:
    """The RPC's deadline as a time.monotonic() value, or None."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e8 else time.monotonic() + remaining


def read_frames(frames, slot: NewestFrame, defaults: PruneSettings, tenant: str,
                check_instruction: Callable[[str], None]) -> None:
    """The stream's reader thread: frames -> queries (stream state applied in order) -> slot.
    A new instruction is checked when it arrives, so a bad one ends the stream at once."""
    session_id, instruction, pruning = "", "", defaults
    try:
        for index, frame in enumerate(frames):
            arrival = time.perf_counter()
            if index == 0:
                session_id = frame.session_id or f"stream-{uuid.uuid4().hex}"
            elif frame.session_id and frame.session_id != session_id:
                raise ValueError("session_id can only be set on the first frame of a stream")
            if frame.instruction:
                check_instruction(frame.instruction)
                instruction = frame.instruction
            if not instruction:
                raise ValueError("the first frame of a stream must carry an instruction")
            if frame.HasField("pruning"):
                pruning = settings_from_pb(frame.pruning, defaults)
            query = GroundQuery(image=image_from_pb(frame.image), instruction=instruction,
                                session_id=session_id, pruning=pruning, tenant=tenant)
            slot.put(Pending(query=query, sequence=frame.sequence, arrival=arrival))
        slot.close()
    except ValueError as exc:
        slot.close(exc)
    except Exception:  # noqa: BLE001 - the client cancelled or the connection broke: just stop
        slot.close()


class GroundingServicer(pb_grpc.GroundingServicer):
    """Ground and GroundStream over one Grounder."""

    def __init__(self, grounder: Grounder, metrics: ServiceMetrics, defaults: PruneSettings,
                 admission: Admission, streams: StreamRegistry):
        self.grounder = grounder
        self.metrics = metrics
        self.defaults = defaults  # the server's pruning settings; request fields override them
        self.admission = admission  # instruction limits, image header checks, pixel budget
        self.streams = streams  # open streams: limits, clocks, send watchdog, drain
        self._calls_lock = threading.Lock()
        self._started: Counter[str] = Counter()  # calls begun, by rpc
        self._finished: Counter[str] = Counter()  # calls ended (any status), by rpc

    def on_rpc_start(self, rpc: str) -> None:
        with self._calls_lock:
            self._started[rpc] += 1

    def on_rpc_done(self, rpc: str, code: str, seconds: float) -> None:
        with self._calls_lock:
            self._finished[rpc] += 1
        self.metrics.record_request(rpc, code, seconds)

    def calls(self) -> tuple[Counter[str], Counter[str]]:
        """(begun, ended) calls so far, by rpc: copies."""
        with self._calls_lock:
            return Counter(self._started), Counter(self._finished)

    @unary_errors("Ground")
    def Ground(self, request, context):
        self.admission.instructions.check(request.instruction)
        query = query_from_pb(request, self.defaults, current_tenant())
        with self.admission.admit(query.image, UNARY, context.is_active):
            answer = self.grounder.ground(query, deadline=deadline_of(context), is_active=context.is_active)
        return to_pb(answer)

    @stream_errors("GroundStream")
    def GroundStream(self, request_iterator, context):
        stream = self.streams.open(current_tenant(), context.peer(), context.cancel)  # QueueFull over a limit
        slot = stream.slot
        context.add_callback(slot.close)  # cancellation or end of RPC wakes the responder
        threading.Thread(target=read_frames, daemon=True, name="pixelprune-stream-reader", args=(
            request_iterator, slot, self.defaults, current_tenant(), self.admission.instructions.check)).start()
        self.metrics.record_stream_open(True)
        dropped = 0
        try:
            while (item := slot.take()) is not None:
                pending, skipped = item
                self.metrics.record_skipped_frames(skipped)
                answer = self._answer_frame(pending, context)
                if answer is None:  # the server began draining while the frame waited for room
                    dropped = 1
                    break
                with stream.sending():  # gRPC sends during the yield; the watchdog times a blocked send
                    yield to_pb(answer, skipped_frames=skipped, sequence=pending.sequence)
                if not context.is_active():  # cancelled while the answer waited to be sent
                    break
                slot.answered()
        finally:
            self.streams.close(stream)
            self.metrics.record_stream_open(False)
            if slot.timed_out is not None:
                self.metrics.record_stream_closed(f"{slot.timed_out}_timeout")
            dropped += slot.abandon()
            self.metrics.record_skipped_frames(dropped)
            context.set_trailing_metadata(((SKIPPED_FRAMES_KEY, str(dropped)),))
        if slot.error is not None:
            raise slot.error

    def _answer_frame(self, pending: Pending, context) -> GroundAnswer | None:
        """One stream frame: waits for room in the pixel budget and the model queue (newer frames
        meanwhile replace each other in the slot, so no CPU goes into frames never answered).
        None when the server began draining while the frame waited for room."""
        wanted = lambda: context.is_active() and not self.streams.draining  # noqa: E731
        try:
            with self.admission.admit(pending.query.image, STREAM, wanted):
                answer = self.grounder.ground(pending.query, deadline=deadline_of(context),
                                              is_active=context.is_active, wait_while=wanted)
        except Exception as exc:
            if isinstance(exc, QueueFull) and self.streams.draining and context.is_active():
                return None  # gave up waiting for room because the server drains: left unanswered
            code = outcome(context, status_of(exc)[0].name)
            self.metrics.record_stream_frame(code, time.perf_counter() - pending.arrival)
            raise
        self.metrics.record_stream_frame("OK", time.perf_counter() - pending.arrival)
        return answer
