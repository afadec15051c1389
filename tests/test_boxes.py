"""Validation of client-supplied boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from omnipose.service.boxes import BoxError, parse_boxes


def test_accepts_lists_and_json() -> None:
    expected = np.array([[10, 20, 30, 40], [0.5, 1.5, 2.5, 3.5]])
    np.testing.assert_array_equal(parse_boxes([[10, 20, 30, 40], [0.5, 1.5, 2.5, 3.5]]), expected)
    np.testing.assert_array_equal(parse_boxes("[[10, 20, 30, 40], [0.5, 1.5, 2.5, 3.5]]"), expected)
    assert parse_boxes([]).shape == (0, 4)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("[[1, 2, 3", "not valid JSON"),
        ({"x": 1}, "must be a JSON list"),
        ([[1, 2, 3]], "box 0 must be a list of 4 numbers"),
        ([[1, 2, 3, 4], [1, 2, "a", 4]], "box 1 must contain only numbers"),
        ([[1, 2, math.nan, 4]], "NaN or infinity"),
        ([[1, 2, -3, 4]], "positive width and height"),
        ([[1, 2, 3, 0]], "positive width and height"),
        ([[1, 2, 0.5, 0.5]], "at least 1 pixel"),
        ([[True, 2, 3, 4]], "only numbers"),
    ],
)
def test_rejects_malformed_boxes(value, fragment: str) -> None:
    with pytest.raises(BoxError, match=fragment):
        parse_boxes(value)


def test_rejects_boxes_outside_the_image() -> None:
    with pytest.raises(BoxError, match="entirely outside the 100x50 image"):
        parse_boxes([[100, 0, 10, 10]], image_width=100, image_height=50)
    with pytest.raises(BoxError, match="box 0"):
        parse_boxes([[-20, -20, 10, 10]], image_width=100, image_height=50)
    # Partly outside is fine: the crop pads with zeros.
    assert parse_boxes([[-5, -5, 20, 20]], image_width=100, image_height=50).shape == (1, 4)
