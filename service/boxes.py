"""Validation of client-supplied person boxes (COCO ``[x, y, w, h]`` convention)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


class BoxError(ValueError):
    """Boxes that cannot be used; the message names the offending box."""


def parse_boxes(value: Any, image_width: int | None = None,
                image_height: int | None = None) -> np.ndarray:
    """Validate a list of ``[x, y, w, h]`` boxes (or its JSON text) into an N x 4 float array.

    Rejects non-lists, wrong arity, non-numbers, NaN/inf, sides under one pixel and, when
    the image size is known, boxes that do not overlap the image at all.
    """
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BoxError(f"boxes are not valid JSON: {exc.msg}") from None
    if not isinstance(value, list):
        raise BoxError("boxes must be a JSON list of [x, y, w, h] lists")
    boxes = np.zeros((len(value), 4), dtype=np.float64)
    for i, box in enumerate(value):
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise BoxError(f"box {i} must be a list of 4 numbers [x, y, w, h], got {box!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise BoxError(f"box {i} must contain only numbers, got {box!r}")
        x, y, w, h = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise BoxError(f"box {i} contains NaN or infinity: {box!r}")
        if w <= 0 or h <= 0:
            raise BoxError(f"box {i} must have positive width and height, got w={w:g} h={h:g}")
        if w < 1 or h < 1:  # the crop transform divides by the padded width minus one pixel
            raise BoxError(f"box {i} must be at least 1 pixel wide and high, got w={w:g} h={h:g}")
        if image_width is not None and image_height is not None and (
            x >= image_width or y >= image_height or x + w <= 0 or y + h <= 0
        ):
            raise BoxError(
                f"box {i} {box!r} lies entirely outside the {image_width}x{image_height} image"
            )
        boxes[i] = (x, y, w, h)
    return boxes
