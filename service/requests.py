"""What a client asks the engine for (:class:`ImageRequest`) and what it gets back
(:class:`ImageResult`), with the option checks every transport shares."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from omnipose.model.topdown import PersonPose
from omnipose.service.boxes import BoxError, parse_boxes
from omnipose.service.errors import InvalidRequest


def client_boxes(
    value: Any, image_width: int | None = None, image_height: int | None = None
) -> np.ndarray:
    """Client boxes (``[[x, y, w, h], ...]``, its JSON text, or an array) as N x 4, or
    InvalidRequest. :func:`omnipose.service.boxes.parse_boxes` is the one place boxes are
    checked."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    try:
        return parse_boxes(value, image_width, image_height)
    except BoxError as exc:
        raise InvalidRequest(str(exc)) from None


def _check_unit_interval(name: str, value: Any) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1):
        raise InvalidRequest(f"{name} must be a number in [0, 1], got {value!r}")


MAX_STREAM_ID_LENGTH = 128


@dataclass
class ImageRequest:
    """One image to estimate, with the client's options. ``boxes`` None means: detect people."""

    data: bytes
    # x y w h per person, as the client sent them: a list, its JSON text, or an N x 4 array.
    # Checked once the image size is known (client_boxes), so "outside the image" is caught too.
    boxes: Any = None
    box_scores: Sequence[float] | np.ndarray | None = None  # one per box, default 1.0
    flip: bool | None = None  # None: the service's flip_test setting
    min_keypoint_score: float = 0.0  # keypoints below it are reported as (0, 0, 0)
    min_instance_score: float = 0.0  # persons below it are left out
    max_persons: int | None = None  # keep the highest-scoring persons; capped by settings
    render: bool = False  # also return a JPEG with the skeletons drawn
    # A video stream the client feeds frame by frame (REST, unary gRPC): its frames are tracked
    # together; end_stream releases the stream's state after this frame.
    stream_id: str | None = None
    end_stream: bool = False

    def validate(self) -> None:
        """The option checks of every transport (REST's schema and gRPC's messages only type
        them): the one place their ranges are enforced. Boxes are checked by client_boxes."""
        _check_unit_interval("min_keypoint_score", self.min_keypoint_score)
        _check_unit_interval("min_instance_score", self.min_instance_score)
        if self.max_persons is not None and not (
            isinstance(self.max_persons, int) and self.max_persons >= 1
        ):
            raise InvalidRequest(f"max_persons must be at least 1, got {self.max_persons!r}")
        if self.box_scores is not None:
            scores = np.asarray(self.box_scores, dtype=np.float64).reshape(-1)
            bad = np.flatnonzero(~((scores >= 0) & (scores <= 1)))  # NaN fails both
            if len(bad):
                raise InvalidRequest(f"box {bad[0]} score {scores[bad[0]]:g} is not in [0, 1]")
        if self.stream_id is not None and not (
                0 < len(self.stream_id) <= MAX_STREAM_ID_LENGTH and self.stream_id.isprintable()):
            raise InvalidRequest(f"stream_id must be 1 to {MAX_STREAM_ID_LENGTH} printable"
                                 f" characters, got {self.stream_id[:80]!r}")
        if self.end_stream and self.stream_id is None:
            raise InvalidRequest("end_stream needs the stream_id of the stream to end")


@dataclass
class ImageResult:
    """Persons found in one image (keypoints in image pixels), stage timings, optional overlay."""

    width: int
    height: int
    persons: list[PersonPose]
    timings_ms: dict[str, float]
    rendered_jpeg: bytes | None = None
    detector_ran: bool | None = None  # frames of a tracked stream: whether the detector ran
