from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PruningSettings(_message.Message):
    __slots__ = ("method", "metric", "tau", "disabled")
    class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        METHOD_UNSPECIFIED: _ClassVar[PruningSettings.Method]
        METHOD_PRED2D: _ClassVar[PruningSettings.Method]
        METHOD_RASTER: _ClassVar[PruningSettings.Method]
        METHOD_SERPENTINE: _ClassVar[PruningSettings.Method]
    METHOD_UNSPECIFIED: PruningSettings.Method
    METHOD_PRED2D: PruningSettings.Method
    METHOD_RASTER: PruningSettings.Method
    METHOD_SERPENTINE: PruningSettings.Method
    class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        METRIC_UNSPECIFIED: _ClassVar[PruningSettings.Metric]
        METRIC_MAX: _ClassVar[PruningSettings.Metric]
        METRIC_MAE: _ClassVar[PruningSettings.Metric]
    METRIC_UNSPECIFIED: PruningSettings.Metric
    METRIC_MAX: PruningSettings.Metric
    METRIC_MAE: PruningSettings.Metric
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    method: PruningSettings.Method
    metric: PruningSettings.Metric
    tau: float
    disabled: bool
    def __init__(self, method: _Optional[_Union[PruningSettings.Method, str]] = ..., metric: _Optional[_Union[PruningSettings.Metric, str]] = ..., tau: _Optional[float] = ..., disabled: _Optional[bool] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("width", "height", "rgb")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    RGB_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    rgb: bytes
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., rgb: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class GroundRequest(_message.Message):
    __slots__ = ("image", "instruction", "session_id", "pruning")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PRUNING_FIELD_NUMBER: _ClassVar[int]
    image: Image
    instruction: str
    session_id: str
    pruning: PruningSettings
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., instruction: _Optional[str] = ..., session_id: _Optional[str] = ..., pruning: _Optional[_Union[PruningSettings, _Mapping]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("image", "instruction", "session_id", "pruning", "sequence")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PRUNING_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    image: Image
    instruction: str
    session_id: str
    pruning: PruningSettings
    sequence: int
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., instruction: _Optional[str] = ..., session_id: _Optional[str] = ..., pruning: _Optional[_Union[PruningSettings, _Mapping]] = ..., sequence: _Optional[int] = ...) -> None: ...

class KeepMask(_message.Message):
    __slots__ = ("rows", "cols", "bits")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    bits: bytes
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., bits: _Optional[bytes] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "resize_ms", "select_ms", "patchify_ms", "vit_ms", "prefill_ms", "ttft_ms", "decode_tokens_ms", "queue_ms", "total_ms", "upload_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    RESIZE_MS_FIELD_NUMBER: _ClassVar[int]
    SELECT_MS_FIELD_NUMBER: _ClassVar[int]
    PATCHIFY_MS_FIELD_NUMBER: _ClassVar[int]
    VIT_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    resize_ms: float
    select_ms: float
    patchify_ms: float
    vit_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_tokens_ms: float
    queue_ms: float
    total_ms: float
    upload_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., resize_ms: _Optional[float] = ..., select_ms: _Optional[float] = ..., patchify_ms: _Optional[float] = ..., vit_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., decode_tokens_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., upload_ms: _Optional[float] = ...) -> None: ...

class GroundResponse(_message.Message):
    __slots__ = ("found", "point", "point_normalized", "raw_answer", "kept_blocks", "total_blocks", "retain_ratio", "changed_fraction", "cache_hit", "vision_cache_hit", "session_id", "skipped_frames", "sequence", "timings", "image_width", "image_height", "model_width", "model_height", "random_weights", "keep_mask", "prefix_cache_hit", "kv_cache_bytes", "answer_logprob")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    POINT_FIELD_NUMBER: _ClassVar[int]
    POINT_NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    RAW_ANSWER_FIELD_NUMBER: _ClassVar[int]
    KEPT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RETAIN_RATIO_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    VISION_CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODEL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MODEL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    KEEP_MASK_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ANSWER_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    found: bool
    point: Point
    point_normalized: Point
    raw_answer: str
    kept_blocks: int
    total_blocks: int
    retain_ratio: float
    changed_fraction: float
    cache_hit: bool
    vision_cache_hit: bool
    session_id: str
    skipped_frames: int
    sequence: int
    timings: Timings
    image_width: int
    image_height: int
    model_width: int
    model_height: int
    random_weights: bool
    keep_mask: KeepMask
    prefix_cache_hit: bool
    kv_cache_bytes: int
    answer_logprob: float
    def __init__(self, found: _Optional[bool] = ..., point: _Optional[_Union[Point, _Mapping]] = ..., point_normalized: _Optional[_Union[Point, _Mapping]] = ..., raw_answer: _Optional[str] = ..., kept_blocks: _Optional[int] = ..., total_blocks: _Optional[int] = ..., retain_ratio: _Optional[float] = ..., changed_fraction: _Optional[float] = ..., cache_hit: _Optional[bool] = ..., vision_cache_hit: _Optional[bool] = ..., session_id: _Optional[str] = ..., skipped_frames: _Optional[int] = ..., sequence: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ..., model_width: _Optional[int] = ..., model_height: _Optional[int] = ..., random_weights: _Optional[bool] = ..., keep_mask: _Optional[_Union[KeepMask, _Mapping]] = ..., prefix_cache_hit: _Optional[bool] = ..., kv_cache_bytes: _Optional[int] = ..., answer_logprob: _Optional[float] = ...) -> None: ...
