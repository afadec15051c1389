"""Validation of client-supplied person boxes (COCO ``[x, y, w, h]`` convention)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from omnipose.model.persons import BoxError

# No real person box is this far from the origin (or this large) in pixels; beyond it float
# arithmetic in the crop transform loses all precision, so such boxes are refused outright.
MAX_BOX_COORDINATE = 1e6
# A box may stick out of the image (a person cut by the frame) but not dwarf it.
MAX_BOX_TO_IMAGE_RATIO = 10.0
# Box JSON is a list of lists: anything deeper is malformed (and deep enough, a RecursionError).
MAX_JSON_DEPTH = 3


def _json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether ``text`` nests brackets deeper than ``limit`` (strings skipped), checked without
    recursion so that a hostile ``[[[[...`` cannot exhaust the parser's stack."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def load_json(text: str | bytes, what: str = "boxes", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse client JSON text, refusing nesting deeper than ``max_depth`` with a BoxError."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise BoxError(f"{what} are not valid UTF-8 JSON text") from None
    if _json_depth_exceeds(text, max_depth):
        raise BoxError(f"{what} are nested more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BoxError(f"{what} are not valid JSON: {exc.msg}") from None


def parse_boxes(value: Any, image_width: int | None = None,
                image_height: int | None = None) -> np.ndarray:
    """Validate a list of ``[x, y, w, h]`` boxes (or its JSON text) into an N x 4 float array.

    Rejects JSON nested too deeply, non-lists, wrong arity, non-numbers, NaN/inf, sides under
    one pixel, coordinates beyond ``MAX_BOX_COORDINATE`` and, when the image size is known,
    boxes that do not overlap the image at all or are many times larger than it.
    """
    if isinstance(value, (str, bytes)):
        value = load_json(value)
    if not isinstance(value, list):
        raise BoxError("boxes must be a JSON list of [x, y, w, h] lists")
    boxes = np.zeros((len(value), 4), dtype=np.float64)
    for i, box in enumerate(value):
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise BoxError(f"box {i} must be a list of 4 numbers [x, y, w, h], got {box!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise BoxError(f"box {i} must contain only numbers, got {box!r}")
        try:
            x, y, w, h = (float(v) for v in box)
        except OverflowError:  # a JSON integer with hundreds of digits
            raise BoxError(f"box {i} has numbers too large for a box: {box!r}") from None
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise BoxError(f"box {i} contains NaN or infinity: {box!r}")
        if w <= 0 or h <= 0:
            raise BoxError(f"box {i} must have positive width and height, got w={w:g} h={h:g}")
        if w < 1 or h < 1:  # the crop transform divides by the padded width minus one pixel
            raise BoxError(f"box {i} must be at least 1 pixel wide and high, got w={w:g} h={h:g}")
        if max(abs(x), abs(y), w, h, abs(x + w), abs(y + h)) > MAX_BOX_COORDINATE:
            raise BoxError(
                f"box {i} {box!r} has coordinates beyond {MAX_BOX_COORDINATE:g} pixels"
            )
        if image_width is not None and image_height is not None and max(
            w / image_width, h / image_height
        ) > MAX_BOX_TO_IMAGE_RATIO:
            raise BoxError(
                f"box {i} {box!r} is more than {MAX_BOX_TO_IMAGE_RATIO:g} times the"
                f" {image_width}x{image_height} image"
            )
        if image_width is not None and image_height is not None and (
            x >= image_width or y >= image_height or x + w <= 0 or y + h <= 0
        ):
            raise BoxError(
                f"box {i} {box!r} lies entirely outside the {image_width}x{image_height} image"
            )
        boxes[i] = (x, y, w, h)
    return boxes
