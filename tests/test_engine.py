"""The batching engine in-process: batch forming, splitting, flip groups, cancellation, deadlines,
admission control, and end-to-end correctness of batched results.

A "blob finder" stands in for the network where positions must be checked: its heatmaps are the
crop's brightness sampled on the heatmap grid, so a bright blob in the image becomes every joint's
peak and each person's keypoints must land on the blob inside its box, whatever batches the crops
rode in. A random convolution stands in where exact numerics and flip test matter.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from model.configs import get_config
from model.topdown import TopDownPoseEstimator
from model.transforms import IMAGENET_MEAN, IMAGENET_STD
from service.detection import Detections, NoDetector, PersonDetector
from service.engine import (
    DeadlineExceeded,
    DynamicBatcher,
    EngineOverloaded,
    EngineUnavailable,
    ErrorCode,
    ImageRequest,
    InvalidRequest,
    PoseEngine,
    _Chunk,
    configure_threads,
)
from service.loading import LoadedPoseModel
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

CONFIG = get_config("coco-w18-128x96")


class BlobFinder(nn.Module):
    """Heatmap = crop brightness every 4 pixels (input pixel 4i -> heatmap i), for all joints."""

    def __init__(self, num_joints: int) -> None:
        super().__init__()
        self.num_joints = num_joints
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = (x * self.std + self.mean).mean(dim=1, keepdim=True)
        return brightness[:, :, ::4, ::4].expand(-1, self.num_joints, -1, -1).contiguous()


def blob_png(centers: Sequence[tuple[float, float]], shape: tuple[int, int] = (240, 320),
             sigma: float = 6.0, brightness: Sequence[float] | None = None) -> bytes:
    """A dark PNG with a bright Gaussian blob at each centre (peak = ``brightness``, default 1)."""
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    image = np.zeros(shape)
    for (cx, cy), peak in zip(centers, brightness or [1.0] * len(centers), strict=True):
        image += peak * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
    gray = np.clip(image * 255, 0, 255).astype(np.uint8)
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    assert ok
    return buffer.tobytes()


def blob_model() -> LoadedPoseModel:
    estimator = TopDownPoseEstimator(BlobFinder(CONFIG.num_joints), CONFIG, device="cpu",
                                     flip_test=False)
    return LoadedPoseModel(estimator, CONFIG, CONFIG.keypoints, None, None, False)


@pytest.fixture(scope="module")
def random_model() -> LoadedPoseModel:
    """A random strided convolution: cheap, and unlike a symmetric blob finder (or the real
    network at initialisation, whose heatmaps are ~0) its flip-test output differs."""
    torch.manual_seed(0)
    network = nn.Conv2d(3, CONFIG.num_joints, kernel_size=5, stride=4, padding=2)
    estimator = TopDownPoseEstimator(network, CONFIG, device="cpu", flip_test=True)
    return LoadedPoseModel(estimator, CONFIG, CONFIG.keypoints, None, None, False)


def make_engine(model: LoadedPoseModel, detector: PersonDetector | None = None,
                **overrides: object) -> PoseEngine:
    settings = ServiceSettings(config=CONFIG.name, device="cpu", warmup=False, **overrides)
    return PoseEngine(settings, ServiceMetrics(), pose_model=model,
                      detector=detector or NoDetector())


def pose_batches(engine: PoseEngine) -> tuple[float, float]:
    """(number of pose forward passes, crops through them) from the engine's metrics."""
    registry = engine.metrics.registry
    count = registry.get_sample_value("omnipose_batch_size_count", {"model": "pose"}) or 0.0
    total = registry.get_sample_value("omnipose_batch_size_sum", {"model": "pose"}) or 0.0
    return count, total


# --- the batcher on its own ------------------------------------------------------------------
def test_batcher_coalesces_jobs_and_splits_large_ones() -> None:
    batches: list[int] = []

    def identity(chunks: Sequence[_Chunk]) -> list[torch.Tensor]:
        batches.append(sum(c.stop - c.start for c in chunks))
        return [c.job.payload[c.start:c.stop] for c in chunks]

    async def scenario() -> list[torch.Tensor]:
        batcher = DynamicBatcher("test", identity, lambda parts: torch.cat(parts), 8, 0.3)
        await batcher.start()
        sizes = [3, 5, 2, 11, 1, 4]
        offsets = np.cumsum([0, *sizes])
        payloads = [torch.arange(offsets[i], offsets[i] + n) for i, n in enumerate(sizes)]
        far = time.monotonic() + 30
        jobs = await asyncio.gather(*(batcher.submit(p, len(p), far) for p in payloads))
        batcher.stop()
        return payloads, [job.future.result() for job in jobs]

    payloads, results = asyncio.run(scenario())
    for payload, result in zip(payloads, results, strict=True):
        assert torch.equal(payload, result)  # split parts come back whole and in order
    assert sum(batches) == 26
    assert max(batches) <= 8
    assert len(batches) < 6  # fewer forward passes than jobs: they were coalesced


def test_batcher_cancelled_job_leaves_the_queue_and_never_runs() -> None:
    release = threading.Event()
    seen: list[int] = []

    def blocking(chunks: Sequence[_Chunk]) -> list[int]:
        seen.extend(c.job.payload for c in chunks)
        release.wait(10)
        return [c.job.payload for c in chunks]

    async def scenario() -> tuple[int, int]:
        batcher = DynamicBatcher("test", blocking, lambda parts: parts[0], 1, 0.0)
        await batcher.start()
        far = time.monotonic() + 30
        first = asyncio.create_task(batcher.submit(1, 1, far))
        while not seen:  # the worker is now busy with job 1
            await asyncio.sleep(0.01)
        second = asyncio.create_task(batcher.submit(2, 1, far))
        await asyncio.sleep(0.05)
        depth_before = batcher.depth
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        depth_after = batcher.depth
        release.set()
        await first
        await asyncio.sleep(0.05)
        batcher.stop()
        return depth_before, depth_after

    depth_before, depth_after = asyncio.run(scenario())
    assert (depth_before, depth_after) == (1, 0)
    assert seen == [1]


def test_batcher_drops_expired_work_before_running_it() -> None:
    release = threading.Event()
    seen: list[str] = []

    def blocking(chunks: Sequence[_Chunk]) -> list[str]:
        seen.extend(c.job.payload for c in chunks)
        release.wait(10)
        return [c.job.payload for c in chunks]

    async def scenario() -> None:
        batcher = DynamicBatcher("test", blocking, lambda parts: parts[0], 1, 0.0)
        await batcher.start()
        first = asyncio.create_task(batcher.submit("first", 1, time.monotonic() + 30))
        while not seen:
            await asyncio.sleep(0.01)
        late = asyncio.create_task(batcher.submit("late", 1, time.monotonic() + 0.05))
        await asyncio.sleep(0.15)
        release.set()
        await first
        with pytest.raises(DeadlineExceeded):
            await late
        batcher.stop()

    asyncio.run(scenario())
    assert seen == ["first"]


# --- the engine ------------------------------------------------------------------------------
def test_batched_results_land_on_each_persons_blob() -> None:
    """Several images, two persons each, batches smaller than the crops: every keypoint must be
    back on the blob of its own box in its own image."""
    scenes = [[(60, 80), (230, 150)], [(100, 120), (250, 60)], [(40, 190), (280, 180)]]

    async def scenario() -> tuple[list, tuple[float, float]]:
        engine = make_engine(blob_model(), max_batch_size=3, max_queue_delay_ms=100)
        await engine.start()
        requests = [
            ImageRequest(blob_png(centers), boxes=np.array(
                [[cx - 30, cy - 40, 60, 80] for cx, cy in centers], dtype=float))
            for centers in scenes
        ]
        results = await asyncio.gather(*(engine.estimate(r) for r in requests))
        await engine.close()
        return results, pose_batches(engine)

    results, (passes, crops) = asyncio.run(scenario())
    assert crops == 6
    assert passes >= 2  # max_batch_size 3 forces splitting
    for centers, result in zip(scenes, results, strict=True):
        assert (result.width, result.height) == (320, 240)
        assert len(result.persons) == 2
        for person in result.persons:
            box_center = person.bbox[:2] + person.bbox[2:] / 2
            expected = min(centers, key=lambda c: np.hypot(*(np.array(c) - box_center)))
            errors = np.hypot(*(person.keypoints[:, :2] - np.array(expected)).T)
            assert errors.max() < 3.0, (expected, person.keypoints[:3])


def test_flip_groups_run_as_separate_passes(random_model: LoadedPoseModel) -> None:
    """Crops asking for flip test and crops that do not share a batch but not a forward pass."""
    estimator = random_model.estimator
    torch.manual_seed(1)
    a, b, c = (torch.randn(n, 3, *CONFIG.input_size) for n in (2, 1, 3))
    assert not torch.allclose(estimator.forward(a, True), estimator.forward(a, False))

    engine = make_engine(random_model)

    class FakeJob:
        def __init__(self, payload: torch.Tensor, flip: bool) -> None:
            self.payload, self.key = payload, flip

    chunks = [_Chunk(FakeJob(a, True), 0, 2), _Chunk(FakeJob(b, False), 0, 1),
              _Chunk(FakeJob(c, True), 0, 3)]
    outputs = engine._run_pose_batch(chunks)
    flipped = estimator.forward(torch.cat([a, c]), True)
    assert torch.equal(outputs[0], flipped[:2])
    assert torch.equal(outputs[1], estimator.forward(b, False))
    assert torch.equal(outputs[2], flipped[2:])


def test_engine_result_equals_the_estimator_run_directly(random_model: LoadedPoseModel,
                                                         images) -> None:
    """One request alone in its batch gives what prepare/forward/decode give by hand, for the
    service's flip setting and for a per-request override."""
    boxes = np.array(images.bus_boxes)
    image_rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(images.bus, np.uint8), cv2.IMREAD_COLOR),
                             cv2.COLOR_BGR2RGB)
    estimator = random_model.estimator

    async def scenario() -> list:
        engine = make_engine(random_model, max_queue_delay_ms=0)
        await engine.start()
        results = [await engine.estimate(ImageRequest(images.bus, boxes=boxes, flip=flip))
                   for flip in (None, False)]
        await engine.close()
        return results

    results = asyncio.run(scenario())
    for flip, result in zip((estimator.flip_test, False), results, strict=True):
        crops = estimator.prepare(image_rgb, boxes)
        expected = estimator.decode(estimator.forward(crops.inputs, flip), crops)
        expected.sort(key=lambda p: p.score, reverse=True)
        assert len(result.persons) == len(expected) == 2
        for got, want in zip(result.persons, expected, strict=True):
            np.testing.assert_allclose(got.keypoints, want.keypoints, atol=1e-4)
            np.testing.assert_allclose(got.bbox, want.bbox)
    assert not np.allclose(results[0].persons[0].keypoints, results[1].persons[0].keypoints)


def test_person_filters_and_keypoint_threshold() -> None:
    """Blobs of different brightness give persons of different confidence to filter on."""
    centers = [(60, 80), (230, 150), (150, 60)]
    data = blob_png(centers, brightness=[1.0, 0.7, 0.3])
    boxes = np.array([[cx - 30, cy - 40, 60, 80] for cx, cy in centers], dtype=float)

    async def scenario() -> list:
        engine = make_engine(blob_model(), max_queue_delay_ms=0)
        await engine.start()
        results = [await engine.estimate(ImageRequest(data, boxes=boxes, **options))
                   for options in ({}, {"max_persons": 2}, {"min_keypoint_score": 0.5},
                                   {"min_instance_score": 0.5})]
        await engine.close()
        return results

    plain, top2, thresholded, confident = asyncio.run(scenario())
    assert len(plain.persons) == 3
    scores = [p.score for p in plain.persons]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] > 0.5 > scores[2]  # the dim blob's person is the unconfident one
    assert [p.score for p in top2.persons] == scores[:2]
    assert [p.score for p in confident.persons] == [s for s in scores if s >= 0.5]
    low_total = 0
    for raw, cut in zip(plain.persons, thresholded.persons, strict=True):
        low = raw.keypoints[:, 2] < 0.5
        low_total += low.sum()
        assert np.all(cut.keypoints[low] == 0)
        np.testing.assert_array_equal(cut.keypoints[~low], raw.keypoints[~low])
    assert 0 < low_total < 3 * CONFIG.num_joints


def test_detector_batches_images_across_requests() -> None:
    calls: list[int] = []

    class OneBoxDetector(PersonDetector):
        name = "fake"

        def detect_batch(self, images_bgr):
            calls.append(len(images_bgr))
            return [Detections(np.array([[40.0, 40.0, 60.0, 80.0]]), np.array([0.9]))
                    for _ in images_bgr]

    async def scenario() -> list:
        engine = make_engine(blob_model(), OneBoxDetector(), detector_max_batch_size=4,
                             detector_max_queue_delay_ms=200)
        await engine.start()
        data = blob_png([(70, 80)])
        results = await asyncio.gather(*(engine.estimate(ImageRequest(data)) for _ in range(6)))
        await engine.close()
        return results

    results = asyncio.run(scenario())
    assert sum(calls) == 6 and max(calls) <= 4 and len(calls) < 6
    for result in results:
        assert len(result.persons) == 1
        np.testing.assert_allclose(result.persons[0].bbox, [40, 40, 60, 80])
        assert result.persons[0].box_score == pytest.approx(0.9)
        assert "detection" in result.timings_ms


def test_admission_rejects_beyond_queue_size_and_cancel_frees_the_slot() -> None:
    async def scenario() -> None:
        engine = make_engine(blob_model(), max_queue_size=1, max_batch_size=64,
                             max_queue_delay_ms=5000)
        await engine.start()
        request = ImageRequest(blob_png([(60, 80)]), boxes=np.array([[30.0, 40, 60, 80]]))
        first = asyncio.create_task(engine.estimate(request))
        while engine._pose_batcher.depth == 0:  # queued at the pose model, waiting for a batch
            await asyncio.sleep(0.01)
        with pytest.raises(EngineOverloaded) as overloaded:
            await engine.estimate(request)
        assert overloaded.value.retry_after_s >= 1
        assert overloaded.value.code == ErrorCode.OVERLOADED
        first.cancel()  # a client going away
        with pytest.raises(asyncio.CancelledError):
            await first
        assert engine.inflight == 0
        assert engine._pose_batcher.depth == 0
        assert pose_batches(engine) == (0, 0)
        await engine.close()

    asyncio.run(scenario())


def test_deadline_passes_while_queued_and_the_model_never_runs_it() -> None:
    async def scenario() -> float:
        engine = make_engine(blob_model(), max_batch_size=64, max_queue_delay_ms=2000)
        await engine.start()
        request = ImageRequest(blob_png([(60, 80)]), boxes=np.array([[30.0, 40, 60, 80]]))
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await engine.estimate(request, timeout_s=0.2)
        elapsed = time.monotonic() - started
        await asyncio.sleep(2.2)  # past the batch delay: the dropped job must not run then
        assert pose_batches(engine) == (0, 0)
        assert engine.inflight == 0
        await engine.close()
        return elapsed

    assert asyncio.run(scenario()) < 1.5


def test_requests_refused_while_loading_and_while_draining() -> None:
    async def scenario() -> None:
        engine = make_engine(blob_model())
        request = ImageRequest(blob_png([(60, 80)]), boxes=np.array([[30.0, 40, 60, 80]]))
        with pytest.raises(EngineUnavailable, match="loading"):
            await engine.estimate(request)
        await engine.start()
        assert len((await engine.estimate(request)).persons) == 1
        engine.begin_drain()
        with pytest.raises(EngineUnavailable, match="shutting down"):
            await engine.estimate(request)
        await engine.close()

    asyncio.run(scenario())


def test_batch_errors_name_the_image_and_limits_apply() -> None:
    async def scenario() -> None:
        engine = make_engine(blob_model(), max_images_per_batch=2)
        await engine.start()
        good = ImageRequest(blob_png([(60, 80)]), boxes=np.array([[30.0, 40, 60, 80]]))
        with pytest.raises(InvalidRequest, match=r"images\[1\].*not a recognised image") as bad:
            await engine.estimate_many([good, ImageRequest(b"not an image")])
        assert bad.value.code == ErrorCode.INVALID_IMAGE
        with pytest.raises(InvalidRequest, match="over the limit of 2") as too_many:
            await engine.estimate_many([good] * 3)
        assert too_many.value.code == ErrorCode.PAYLOAD_TOO_LARGE
        outside = ImageRequest(good.data, boxes=np.array([[500.0, 40, 60, 80]]))
        with pytest.raises(InvalidRequest, match="outside"):
            await engine.estimate(outside)
        assert len(await engine.estimate_many([good, good])) == 2  # still serving
        await engine.close()

    asyncio.run(scenario())


def test_configure_threads_gives_torch_the_configured_cores() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(ServiceSettings(torch_threads=1)) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
