"""What a client asks the engine for (:class:`ImageRequest`) and what it gets back
(:class:`ImageResult`), and the one place client box errors become the client's
InvalidRequest (:func:`client_detections`, :func:`boxes_per_image`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ConfigDict

from omnipose.model.detection import Detections
from omnipose.model.persons import BoxError, client_persons
from omnipose.model.topdown import PersonPose
from omnipose.service.boxes import load_json, parse_boxes
from omnipose.service.errors import InvalidRequest
from omnipose.service.options import RequestOptions


@contextlib.contextmanager
def _boxes_refused() -> Iterator[None]:
    """A BoxError (malformed, absurd or too many boxes) is the client's: 422 / INVALID_ARGUMENT
    with the box check's message as it is."""
    try:
        yield
    except BoxError as exc:
        raise InvalidRequest(str(exc)) from None


def client_detections(boxes: Any, box_scores: Any, image_width: int, image_height: int,
                      max_persons: int) -> Detections:
    """The client's boxes (``[[x, y, w, h], ...]``, its JSON text, or an N x 4 array) and scores
    for an image of this size, or InvalidRequest. :func:`omnipose.service.boxes.parse_boxes` and
    :func:`omnipose.model.persons.client_persons` are the checks."""
    if isinstance(boxes, np.ndarray):
        boxes = boxes.tolist()
    with _boxes_refused():
        return client_persons(parse_boxes(boxes, image_width, image_height), box_scores,
                              max_persons)


def boxes_per_image(text: str, images: int) -> list[Any]:
    """REST batches: ``boxes`` JSON text holding one entry (a box list, or null to detect) per
    image, or InvalidRequest. Each entry is checked with its image, by the engine."""
    with _boxes_refused():
        per_image = load_json(text)
    if not isinstance(per_image, list) or len(per_image) != images:
        raise InvalidRequest(f"boxes must be a JSON list with one entry (a box list or null) per"
                             f" image: {images} entries")
    return per_image


class ImageRequest(RequestOptions):
    """One image to estimate with the client's options (every :class:`RequestOptions` field).
    ``boxes`` None means: detect people."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    data: bytes
    # x y w h per person, as the client sent them: a list, its JSON text, or an N x 4 array.
    # Checked once the image size is known (client_detections), so "outside the image" is too.
    boxes: Any = None
    box_scores: Any = None  # one per box (gRPC's Box.score), default 1.0

    def __init__(self, data: bytes | None = None, /, **values: Any) -> None:
        """``ImageRequest(data, flip=True, ...)`` or all by keyword."""
        if data is not None:
            values["data"] = data
        super().__init__(**values)

    def check(self) -> None:
        """The options' ranges (:meth:`RequestOptions.check`) and the box scores'. Boxes are
        checked by client_detections once the image size is known."""
        super().check()
        if self.box_scores is not None:
            scores = np.asarray(self.box_scores, dtype=np.float64).reshape(-1)
            bad = np.flatnonzero(~((scores >= 0) & (scores <= 1)))  # NaN fails both
            if len(bad):
                raise InvalidRequest(f"box {bad[0]} score {scores[bad[0]]:g} is not in [0, 1]")


@dataclass
class ImageResult:
    """Persons found in one image (keypoints in image pixels), stage timings, optional overlay."""

    width: int
    height: int
    persons: list[PersonPose]
    timings_ms: dict[str, float]
    rendered_jpeg: bytes | None = None
    detector_ran: bool | None = None  # frames of a tracked stream: whether the detector ran
