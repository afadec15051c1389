"""The pose pipeline (model.predictor) and its runners (model.runners).

The reference chain below is written out from the low-level functions (transforms, the network,
codec), not through the estimator or any runner, so the predictor is checked against the
published convention rather than against itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import pytest
import torch

from omnipose.model.codec import decode_heatmaps, flip_heatmaps_back
from omnipose.model.detection import Detections, PersonDetector
from omnipose.model.persons import BoxError
from omnipose.model.predictor import PosePredictor
from omnipose.model.runners import (
    RUNNER_FACTORIES,
    OnnxRuntimeRunner,
    Runner,
    TorchRunner,
    build_runner,
)
from omnipose.model.topdown import PersonPose, TopDownPoseEstimator, instance_scores
from omnipose.model.transforms import (
    BOX_PADDING,
    box_to_center_scale,
    get_affine_transforms,
    normalize_crops,
    transform_points,
    warp_crops,
)
from omnipose.service import loading


@pytest.fixture(scope="module")
def model() -> loading.LoadedPoseModel:
    return loading.load_pose_model(device="cpu", precision="fp32", flip_test=True)


@pytest.fixture(scope="module")
def bus(images) -> tuple[np.ndarray, np.ndarray]:
    image_bgr = cv2.imdecode(np.frombuffer(images.bus, np.uint8), cv2.IMREAD_COLOR)
    return image_bgr, np.array(images.bus_boxes)


def reference_poses(loaded: loading.LoadedPoseModel, image_bgr: np.ndarray,
                    boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints [N, J, 3] and instance scores [N] by the published recipe, step by step."""
    config, network = loaded.config, loaded.estimator.model
    height, width = config.input_size
    centers, scales = box_to_center_scale(boxes, config.aspect_ratio, padding=BOX_PADDING)
    affines = get_affine_transforms(centers, scales, np.zeros(len(boxes)), (width, height))
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    crops = normalize_crops(warp_crops(rgb, affines, (width, height)))
    with torch.inference_mode():
        plain = network(crops).float()
        mirrored = network(torch.flip(crops, dims=[3])).float()
    flip_index = loaded.keypoints.flip_index()
    heatmaps = (plain + flip_heatmaps_back(mirrored, flip_index, shift=False)) * 0.5
    coords, confidences = decode_heatmaps(heatmaps)
    h, w = heatmaps.shape[-2:]
    inverse = get_affine_transforms(centers, scales, np.zeros(len(boxes)), (w, h), inverse=True)
    keypoints = np.concatenate([transform_points(coords, inverse), confidences[..., None]], -1)
    return keypoints, instance_scores(keypoints, np.ones(len(boxes)))


def by_box(persons: list[PersonPose]) -> list[PersonPose]:
    return sorted(persons, key=lambda p: tuple(p.bbox))


def test_predictor_with_boxes_equals_the_published_recipe(model, bus) -> None:
    image_bgr, boxes = bus
    prediction = PosePredictor(model.estimator).predict(image_bgr, boxes)
    assert prediction.candidates == 2 and not prediction.detector_ran
    keypoints, scores = reference_poses(model, image_bgr, boxes)
    got = by_box(prediction.persons)
    assert len(got) == 2  # far apart: OKS-NMS keeps both
    order = sorted(range(2), key=lambda i: tuple(boxes[i]))
    for person, i in zip(got, order, strict=True):
        np.testing.assert_array_equal(person.bbox, boxes[i])
        np.testing.assert_allclose(person.keypoints, keypoints[i], rtol=0, atol=1e-4)
        assert person.score == pytest.approx(scores[i], abs=1e-5)


class RecordingRunner:
    """Another backend: the torch runner's output (optionally changed), with the crops it saw."""

    backend = "recording"

    def __init__(self, inner: Runner, offset: float = 0.0) -> None:
        self.inner, self.offset = inner, offset
        self.device, self.precision = inner.device, inner.precision
        self.seen: list[torch.Tensor] = []

    def run(self, crops: torch.Tensor) -> torch.Tensor:
        self.seen.append(crops.clone())
        heatmaps = self.inner.run(crops)
        if self.offset:  # move every joint's peak: a backend that computes something else
            heatmaps = torch.roll(heatmaps, shifts=2, dims=3)
        return heatmaps


def predictor_with(loaded: loading.LoadedPoseModel, runner: Runner) -> PosePredictor:
    estimator = TopDownPoseEstimator(runner, loaded.config, loaded.keypoints, flip_test=True)
    return PosePredictor(estimator)


def test_swapping_the_runner_changes_only_the_network_step(model, bus) -> None:
    image_bgr, boxes = bus
    expected = by_box(PosePredictor(model.estimator).predict(image_bgr, boxes).persons)
    assert isinstance(model.estimator.runner, Runner)

    same = RecordingRunner(model.estimator.runner)
    got = by_box(predictor_with(model, same).predict(image_bgr, boxes).persons)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
    (crops,) = same.seen  # one call: the mirrored crops ride with the plain ones
    assert crops.shape == (4, 3, *model.config.input_size)
    torch.testing.assert_close(crops[2:], torch.flip(crops[:2], dims=[3]))

    other = RecordingRunner(model.estimator.runner, offset=1.0)
    changed = by_box(predictor_with(model, other).predict(image_bgr, boxes).persons)
    torch.testing.assert_close(other.seen[0], crops, rtol=0, atol=0)  # same crops in
    for a, b in zip(changed, expected, strict=True):
        np.testing.assert_array_equal(a.bbox, b.bbox)  # same persons out ...
        assert a.box_score == b.box_score
        assert not np.allclose(a.keypoints[:, :2], b.keypoints[:, :2])  # ... other keypoints


def test_onnxruntime_runner_predicts_what_torch_predicts(model, bus) -> None:
    image_bgr, boxes = bus
    network = model.estimator.model
    runner = build_runner("onnxruntime", network, model.config.input_size, "cpu", "auto")
    assert isinstance(runner, OnnxRuntimeRunner) and runner.precision == "fp32"
    expected = by_box(PosePredictor(model.estimator).predict(image_bgr, boxes).persons)
    got = by_box(predictor_with(model, runner).predict(image_bgr, boxes).persons)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a.keypoints, b.keypoints, rtol=0, atol=1e-3)


def test_runner_registry_builds_each_backend_and_refuses_unknown_ones() -> None:
    assert set(RUNNER_FACTORIES) >= {"torch", "onnxruntime"}
    network = torch.nn.Conv2d(3, 17, kernel_size=4, stride=4)
    runner = build_runner("torch", network, (64, 48), "cpu", "fp32")
    assert isinstance(runner, TorchRunner) and runner.backend == "torch"
    assert runner.run(torch.zeros(3, 3, 64, 48)).shape == (3, 17, 16, 12)
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        build_runner("tensorrt", network, (64, 48))
    with pytest.raises(ValueError, match="onnxruntime backend runs fp32"):
        build_runner("onnxruntime", network, (64, 48), "cpu", "bf16")


class FixedDetector(PersonDetector):
    name = "fixed"

    def __init__(self, detections: Detections) -> None:
        self.detections, self.calls = detections, 0

    def detect_batch(self, images_bgr: Sequence[np.ndarray]) -> list[Detections]:
        self.calls += len(images_bgr)
        return [self.detections for _ in images_bgr]


def test_person_rules_detector_fallback_and_limits(model, bus) -> None:
    image_bgr, boxes = bus
    nobody = FixedDetector(Detections.empty())
    assert PosePredictor(model.estimator, nobody).predict(image_bgr).persons == []
    whole = PosePredictor(model.estimator, nobody, whole_image_if_no_person=True)
    (person,) = whole.predict(image_bgr).persons
    height, width = image_bgr.shape[:2]
    np.testing.assert_array_equal(person.bbox, [0, 0, width, height])

    three = FixedDetector(Detections(np.vstack([boxes, boxes[:1]]), np.array([0.9, 0.8, 0.3])))
    top_two = PosePredictor(model.estimator, three, max_persons=2).predict(image_bgr)
    assert top_two.detector_ran and top_two.candidates == 2  # the lowest score dropped
    with pytest.raises(BoxError, match="over the limit of 1"):
        PosePredictor(model.estimator, three, max_persons=1).predict(image_bgr, boxes)
    with pytest.raises(ValueError, match="no person detector"):
        PosePredictor(model.estimator).predict(image_bgr)


class PlannedTracker:
    """A tracker that plans the given boxes (or asks for the detector) and records updates."""

    def __init__(self, planned: tuple[np.ndarray, np.ndarray] | None,
                 guided: tuple[np.ndarray, np.ndarray]) -> None:
        self.planned, self.guided = planned, guided
        self.updates: list[tuple[int, bool]] = []

    def plan(self, width: int, height: int):
        return self.planned

    def guided_boxes(self, width: int, height: int):
        return self.guided

    def update(self, persons: list[PersonPose], detector_ran: bool):
        self.updates.append((len(persons), detector_ran))

        class Frame:
            pass

        frame = Frame()
        frame.persons = persons[:1]
        return frame


def test_a_tracker_plans_the_boxes_and_sees_every_frame(model, bus) -> None:
    image_bgr, boxes = bus
    detector = FixedDetector(Detections(boxes[:1], np.array([0.9])))
    predictor = PosePredictor(model.estimator, detector)
    guided = PlannedTracker((boxes, np.array([0.7, 0.6])), (np.zeros((0, 4)), np.zeros(0)))
    prediction = predictor.predict(image_bgr, tracker=guided)
    assert detector.calls == 0 and not prediction.detector_ran
    assert guided.updates == [(2, False)] and len(prediction.persons) == 1  # the tracker's answer

    # A detector frame keeps the tracked person the detector missed (the second box).
    missed = PlannedTracker(None, (boxes[1:], np.array([0.5])))
    prediction = predictor.predict(image_bgr, tracker=missed)
    assert detector.calls == 1 and prediction.detector_ran and prediction.candidates == 2
    assert missed.updates == [(2, True)]
