from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Box(_message.Message):
    __slots__ = ("x", "y", "width", "height", "score")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    width: float
    height: float
    score: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., width: _Optional[float] = ..., height: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class BoxList(_message.Message):
    __slots__ = ("boxes",)
    BOXES_FIELD_NUMBER: _ClassVar[int]
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    def __init__(self, boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ...) -> None: ...

class EstimateRequest(_message.Message):
    __slots__ = ("image", "boxes", "flip", "min_keypoint_score", "min_instance_score", "max_persons", "render", "stream_id", "end_stream", "min_box_score")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    FLIP_FIELD_NUMBER: _ClassVar[int]
    MIN_KEYPOINT_SCORE_FIELD_NUMBER: _ClassVar[int]
    MIN_INSTANCE_SCORE_FIELD_NUMBER: _ClassVar[int]
    MAX_PERSONS_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    END_STREAM_FIELD_NUMBER: _ClassVar[int]
    MIN_BOX_SCORE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    boxes: BoxList
    flip: bool
    min_keypoint_score: float
    min_instance_score: float
    max_persons: int
    render: bool
    stream_id: str
    end_stream: bool
    min_box_score: float
    def __init__(self, image: _Optional[bytes] = ..., boxes: _Optional[_Union[BoxList, _Mapping]] = ..., flip: _Optional[bool] = ..., min_keypoint_score: _Optional[float] = ..., min_instance_score: _Optional[float] = ..., max_persons: _Optional[int] = ..., render: _Optional[bool] = ..., stream_id: _Optional[str] = ..., end_stream: _Optional[bool] = ..., min_box_score: _Optional[float] = ...) -> None: ...

class Keypoint(_message.Message):
    __slots__ = ("name", "x", "y", "score")
    NAME_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    name: str
    x: float
    y: float
    score: float
    def __init__(self, name: _Optional[str] = ..., x: _Optional[float] = ..., y: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class Person(_message.Message):
    __slots__ = ("bbox", "score", "keypoints", "track_id")
    BBOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    TRACK_ID_FIELD_NUMBER: _ClassVar[int]
    bbox: Box
    score: float
    keypoints: _containers.RepeatedCompositeFieldContainer[Keypoint]
    track_id: int
    def __init__(self, bbox: _Optional[_Union[Box, _Mapping]] = ..., score: _Optional[float] = ..., keypoints: _Optional[_Iterable[_Union[Keypoint, _Mapping]]] = ..., track_id: _Optional[int] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class EstimateResponse(_message.Message):
    __slots__ = ("width", "height", "model", "persons", "timings_ms", "rendered_jpeg", "detector_ran")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PERSONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    RENDERED_JPEG_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_RAN_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    model: ModelRef
    persons: _containers.RepeatedCompositeFieldContainer[Person]
    timings_ms: _containers.ScalarMap[str, float]
    rendered_jpeg: bytes
    detector_ran: bool
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., persons: _Optional[_Iterable[_Union[Person, _Mapping]]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., rendered_jpeg: _Optional[bytes] = ..., detector_ran: _Optional[bool] = ...) -> None: ...

class EstimateBatchRequest(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[EstimateRequest]
    def __init__(self, images: _Optional[_Iterable[_Union[EstimateRequest, _Mapping]]] = ...) -> None: ...

class EstimateBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EstimateResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[EstimateResponse, _Mapping]]] = ...) -> None: ...

class StreamFrame(_message.Message):
    __slots__ = ("frame_id", "request")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    request: EstimateRequest
    def __init__(self, frame_id: _Optional[int] = ..., request: _Optional[_Union[EstimateRequest, _Mapping]] = ...) -> None: ...

class FrameError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class StreamResult(_message.Message):
    __slots__ = ("frame_id", "response", "error")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    response: EstimateResponse
    error: FrameError
    def __init__(self, frame_id: _Optional[int] = ..., response: _Optional[_Union[EstimateResponse, _Mapping]] = ..., error: _Optional[_Union[FrameError, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JointPair(_message.Message):
    __slots__ = ("first", "second")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    SECOND_FIELD_NUMBER: _ClassVar[int]
    first: int
    second: int
    def __init__(self, first: _Optional[int] = ..., second: _Optional[int] = ...) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("name", "version", "config", "dataset", "width", "input_height", "input_width", "heatmap_height", "heatmap_width", "joint_names", "flip_pairs", "limbs", "sigmas", "weights_sha256", "trained", "device", "precision", "flip_test", "detector", "max_batch_size", "backend", "backend_choice")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_WIDTH_FIELD_NUMBER: _ClassVar[int]
    JOINT_NAMES_FIELD_NUMBER: _ClassVar[int]
    FLIP_PAIRS_FIELD_NUMBER: _ClassVar[int]
    LIMBS_FIELD_NUMBER: _ClassVar[int]
    SIGMAS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    FLIP_TEST_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BACKEND_CHOICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    config: str
    dataset: str
    width: int
    input_height: int
    input_width: int
    heatmap_height: int
    heatmap_width: int
    joint_names: _containers.RepeatedScalarFieldContainer[str]
    flip_pairs: _containers.RepeatedCompositeFieldContainer[JointPair]
    limbs: _containers.RepeatedCompositeFieldContainer[JointPair]
    sigmas: _containers.RepeatedScalarFieldContainer[float]
    weights_sha256: str
    trained: bool
    device: str
    precision: str
    flip_test: bool
    detector: str
    max_batch_size: int
    backend: str
    backend_choice: BackendChoice
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., config: _Optional[str] = ..., dataset: _Optional[str] = ..., width: _Optional[int] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., heatmap_height: _Optional[int] = ..., heatmap_width: _Optional[int] = ..., joint_names: _Optional[_Iterable[str]] = ..., flip_pairs: _Optional[_Iterable[_Union[JointPair, _Mapping]]] = ..., limbs: _Optional[_Iterable[_Union[JointPair, _Mapping]]] = ..., sigmas: _Optional[_Iterable[float]] = ..., weights_sha256: _Optional[str] = ..., trained: _Optional[bool] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ..., flip_test: _Optional[bool] = ..., detector: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., backend: _Optional[str] = ..., backend_choice: _Optional[_Union[BackendChoice, _Mapping]] = ...) -> None: ...

class BackendMeasurement(_message.Message):
    __slots__ = ("backend", "precision", "crops_per_s", "note", "cost_s")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    CROPS_PER_S_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    COST_S_FIELD_NUMBER: _ClassVar[int]
    backend: str
    precision: str
    crops_per_s: float
    note: str
    cost_s: float
    def __init__(self, backend: _Optional[str] = ..., precision: _Optional[str] = ..., crops_per_s: _Optional[float] = ..., note: _Optional[str] = ..., cost_s: _Optional[float] = ...) -> None: ...

class BackendChoice(_message.Message):
    __slots__ = ("backend", "precision", "source", "probe", "measured_at", "candidates")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    MEASURED_AT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    backend: str
    precision: str
    source: str
    probe: str
    measured_at: str
    candidates: _containers.RepeatedCompositeFieldContainer[BackendMeasurement]
    def __init__(self, backend: _Optional[str] = ..., precision: _Optional[str] = ..., source: _Optional[str] = ..., probe: _Optional[str] = ..., measured_at: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[BackendMeasurement, _Mapping]]] = ...) -> None: ...
