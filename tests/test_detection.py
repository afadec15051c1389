"""Person detectors: HOG on a real photo, YOLO's offline loading path, explicit fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

from bench.samples import BUS_JPG, ZIDANE_JPG
from omnipose.model.detection import (
    Detections,
    DetectorError,
    HogPersonDetector,
    NoDetector,
    YoloPersonDetector,
    build_detector,
)
from omnipose.service.images import read_image_file


def test_hog_finds_people_on_the_bus_photo() -> None:
    image = read_image_file(BUS_JPG)
    detections = HogPersonDetector().detect(image)
    assert len(detections) >= 2
    assert np.all((detections.scores > 0) & (detections.scores < 1))
    boxes = detections.boxes
    assert np.all(boxes[:, 2:] > 0)
    assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 0] + boxes[:, 2] <= image.shape[1] + 1e-6)
    # People are taller than wide.
    assert np.all(boxes[:, 3] > boxes[:, 2])


def test_hog_handles_tiny_and_blank_images() -> None:
    detector = HogPersonDetector()
    assert len(detector.detect(np.zeros((40, 30, 3), np.uint8))) == 0
    assert len(detector.detect(np.full((480, 640, 3), 127, np.uint8))) == 0


def test_hog_never_upscales_thin_images() -> None:
    """A 1 x 40000 image once became a 491 MB upscaled copy; now it is padded, not enlarged."""
    import tracemalloc

    detector = HogPersonDetector()
    tracemalloc.start()
    try:
        result = detector.detect(np.zeros((1, 40_000, 3), np.uint8))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(result) == 0
    assert peak < 50 * 1024 * 1024


def test_hog_min_score_filters_above_one_half() -> None:
    image = read_image_file(BUS_JPG)
    loose, strict = HogPersonDetector(min_score=0.25).detect(image), HogPersonDetector(
        min_score=0.72).detect(image)
    assert np.all(loose.scores >= 0.5)
    assert np.all(strict.scores >= 0.72) and len(strict) < len(loose)


def test_no_detector_finds_nobody_and_whole_image_is_explicit() -> None:
    image = np.zeros((50, 80, 3), np.uint8)
    assert len(NoDetector().detect(image)) == 0
    whole = Detections.whole_image(image.shape)
    np.testing.assert_array_equal(whole.boxes, [[0, 0, 80, 50]])


def test_top_keeps_highest_scores() -> None:
    detections = Detections(np.arange(12, dtype=float).reshape(3, 4) + 1, np.array([0.2, 0.9, 0.5]))
    top = detections.top(2)
    np.testing.assert_array_equal(top.scores, [0.9, 0.5])
    np.testing.assert_array_equal(top.boxes[0], detections.boxes[1])


def test_yolo_missing_weights_is_an_error_not_a_download(tmp_path) -> None:
    with pytest.raises(DetectorError, match="YOLO weights file not found"):
        YoloPersonDetector(tmp_path / "yolov8n.pt")
    with pytest.raises(DetectorError, match="needs a weights file"):
        build_detector("yolo", None)
    with pytest.raises(DetectorError, match="unknown detector"):
        build_detector("rcnn")


def test_yolo_runs_batched_on_local_weights(tmp_path) -> None:
    """Real ultralytics code path on a locally built (untrained) YOLO file: no network needed."""
    from ultralytics import YOLO

    weights = tmp_path / "yolo-untrained.pt"
    YOLO("yolov8n.yaml").save(str(weights))
    detector = YoloPersonDetector(weights, min_score=0.0, image_size=320)
    images = [read_image_file(BUS_JPG), read_image_file(ZIDANE_JPG)]
    results = detector.detect_batch(images)
    assert len(results) == 2
    for result, image in zip(results, images, strict=True):
        assert result.boxes.shape[1] == 4 and len(result.boxes) == len(result.scores)
        assert np.all(result.boxes[:, 0] >= -1) and np.all(result.boxes[:, 0] <= image.shape[1])


def test_yolo_garbage_file_is_a_clear_error(tmp_path) -> None:
    weights = tmp_path / "broken.pt"
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(DetectorError, match="cannot load YOLO weights"):
        YoloPersonDetector(weights)
