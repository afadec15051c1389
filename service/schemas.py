"""REST request/response models: what OpenAPI documents is exactly what the handlers return."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Integer image ids stay exact in JSON (and float64) up to 15 digits.
NUMERIC_IMAGE_ID = re.compile(r"[0-9]{1,15}")


def numeric_image_id(text: str) -> int | None:
    """``text`` as a COCO integer image id when it is plain ASCII digits, else None.

    ``str.isdigit`` is not the test: it accepts characters such as '²' that ``int`` refuses.
    """
    return int(text) if NUMERIC_IMAGE_ID.fullmatch(text) else None


class ErrorDetail(BaseModel):
    code: str = Field(..., description="Machine-readable kind, e.g. invalid_image, overloaded",
                      examples=["invalid_image"])
    message: str = Field(..., description="What went wrong, for a human",
                         examples=["the image is empty (0 bytes)"])


class ErrorResponse(BaseModel):
    """Every error of every endpoint has this shape."""

    error: ErrorDetail


class ImageInfo(BaseModel):
    width: int = Field(..., description="Decoded image width in pixels")
    height: int = Field(..., description="Decoded image height in pixels")


class ModelRef(BaseModel):
    name: str = Field(..., examples=["omnipose-coco-w48-384x288"])
    version: str = Field(..., description="First 12 hex digits of the weights' SHA-256, or"
                                          " 'untrained'")


class NamedKeypoint(BaseModel):
    x: float
    y: float
    score: float


class PersonAnnotation(BaseModel):
    """A COCO results-format keypoint annotation (plus box score and keypoints by name)."""

    model_config = ConfigDict(extra="allow")

    image_id: int | str
    category_id: int = Field(1, description="Always 1 (person)")
    bbox: list[float] = Field(..., description="Person box x, y, w, h in image pixels",
                              min_length=4, max_length=4)
    keypoints: list[float] = Field(
        ..., description="x1, y1, c1, x2, y2, c2, ... in image pixels; c is the confidence."
                         " Keypoints below min_keypoint_score are reported as 0, 0, 0.")
    score: float = Field(..., description="Box score x mean confidence of confident keypoints")
    box_score: float = Field(..., description="Detector (or client) box score")
    named_keypoints: dict[str, NamedKeypoint] = Field(
        ..., description="The same keypoints keyed by joint name")
    track_id: int | None = Field(
        None, description="Video streams (stream_id): the person's identity, stable while they"
                          " stay in view; absent on single images and unconfirmed tracks")


class PoseResponse(BaseModel):
    image: ImageInfo
    model: ModelRef
    persons: list[PersonAnnotation]
    timings_ms: dict[str, float] = Field(
        ..., description="Milliseconds per pipeline stage (image_decode, detection, preprocess,"
                         " queue_wait, pose_inference, decode, render) and total",
    )
    detector_ran: bool | None = Field(
        None, description="Video streams (stream_id): whether the person detector ran on this"
                          " frame (false: boxes from the previous frame's keypoints)")


class BatchPoseResponse(BaseModel):
    results: list[PoseResponse] = Field(..., description="One result per image, in request order")


class ModelConfigInfo(BaseModel):
    name: str
    dataset: str
    width: int
    head: str = Field("waspv2", description="waspv2 (published code) or waspv1 (released weights)")
    input_size: list[int]


class KeypointsInfo(BaseModel):
    dataset: str
    joint_names: list[str]
    flip_pairs: list[list[int]]
    limbs: list[list[int]] = Field(..., description="Skeleton: pairs of joint indices")
    limb_colors: list[list[int]] = Field(..., description="BGR colour per limb")
    sigmas: list[float] = Field(..., description="COCO OKS per-joint sigmas")


class BackendMeasurement(BaseModel):
    backend: str = Field(..., examples=["onnxruntime"])
    precision: str = Field(..., examples=["fp32"])
    crops_per_s: float | None = Field(
        ..., description="Crops per second on the start-up probe; null: not measured (see note)")
    note: str = Field("", description="Why a candidate was not measured (not installed, its"
                                      " build failed, it does not run that precision)")
    cost_s: float | None = Field(None, description="Seconds its build and probe took")


class BackendChoiceInfo(BaseModel):
    """How backend=auto chose the runner: the candidates measured and the fastest."""

    backend: str
    precision: str
    source: str = Field(..., description="measured (at this start), cached (an earlier start's"
                                         " measurement on the same key), cuda or no-warmup"
                                         " (torch, nothing measured)")
    probe: str = Field("", description="What each candidate ran: crops, crop size, layout")
    measured_at: str = Field("", description="When the table was measured (UTC)")
    measure_s: float | None = Field(None, description="Seconds the measurement took")
    candidates: list[BackendMeasurement] = Field(default_factory=list)


class ModelDescription(BaseModel):
    name: str
    version: str
    config: ModelConfigInfo
    keypoints: KeypointsInfo
    input_size: list[int] = Field(..., description="Network input (height, width)")
    heatmap_size: list[int] = Field(..., description="Heatmap (height, width)")
    weights_sha256: str | None
    trained: bool = Field(..., description="False: random weights, keypoints are meaningless")
    device: str
    precision: str
    backend: str = Field("torch", description="Pose network runtime serving: torch, onnxruntime"
                                              " or openvino (with backend=auto: the one chosen)")
    backend_choice: BackendChoiceInfo | None = Field(
        None, description="backend=auto: the measured candidates and where the choice came"
                          " from; null when the backend was configured")
    int8: dict[str, Any] | None = Field(
        None, description="The guarded int8 model served (backend openvino), else null: its"
        " source weights hash, quantiser settings, layers kept fp32, calibration, and the accuracy"
        " guard's thresholds and figures measured against fp32 on held-out data")
    model_instances: int | None = Field(None, description="Pose model instances (one queue)")
    torch_threads: int | None = Field(None, description="Threads per pose model instance")
    flip_test: bool
    flip_shift: bool = Field(..., description="Flipped heatmaps shifted one pixel (HRNet style)")
    detector: str
    max_batch_size: int
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="What the checkpoint says about the model (config,"
        " joints, metrics); never server paths or the training recipe")


class HealthResponse(BaseModel):
    status: str = Field(..., examples=["ok", "ready", "starting", "draining"])
