"""The batching engine in-process: batch forming, splitting, flip groups, cancellation, deadlines,
admission control (requests and decoded pixels), failure isolation inside batches, shutdown,
CPU quota detection, and end-to-end correctness of batched results.

A "blob finder" stands in for the network where positions must be checked: its heatmaps are the
crop's brightness sampled on the heatmap grid, so a bright blob in the image becomes every joint's
peak and each person's keypoints must land on the blob inside its box, whatever batches the crops
rode in. A random convolution stands in where exact numerics and flip test matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from omnipose.model.configs import get_config
from omnipose.model.crops import crop_persons
from omnipose.model.detection import Detections, NoDetector, PersonDetector
from omnipose.model.persons import client_persons, detected_persons
from omnipose.model.topdown import TopDownPoseEstimator
from omnipose.model.transforms import IMAGENET_MEAN, IMAGENET_STD
from omnipose.service import resources
from omnipose.service.batcher import AllCoresRunner, Chunk, DynamicBatcher
from omnipose.service.boxes import BoxError
from omnipose.service.engine import PoseEngine
from omnipose.service.errors import (
    REQUEST_ID,
    DeadlineExceeded,
    EngineError,
    EngineOverloaded,
    EngineUnavailable,
    ErrorCode,
    InvalidRequest,
)
from omnipose.service.loading import LoadedPoseModel
from omnipose.service.metrics import STAGES, ServiceMetrics
from omnipose.service.requests import ImageRequest
from omnipose.service.resources import (
    InstanceLayout,
    LoneBatchRule,
    available_cpus,
    candidate_layouts,
    cgroup_cpu_limit,
    configure_threads,
    configured_layout,
    measure_layouts,
    measure_lone_batches,
    read_cgroup_cpu_limit,
)
from omnipose.service.settings import ServiceSettings

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
async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    stop = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < stop, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_batcher_coalesces_jobs_and_splits_large_ones() -> None:
    batches: list[int] = []

    def identity(chunks: Sequence[Chunk]) -> list[torch.Tensor]:
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


def test_batcher_spreads_one_request_over_idle_instances_and_keeps_its_order() -> None:
    """Two idle instances share a lone 4-crop request (2 + 2, at the same time); the part that
    finishes last is still put back in its place."""
    calls: list[tuple[str, int, int, float, float]] = []

    def slow_first_half(chunks: Sequence[Chunk]) -> list[torch.Tensor]:
        started = time.monotonic()
        time.sleep(0.4 if chunks[0].start == 0 else 0.1)  # the first half finishes last
        calls.append((threading.current_thread().name, chunks[0].start, chunks[-1].stop,
                      started, time.monotonic()))
        return [c.job.payload[c.start:c.stop] for c in chunks]

    async def scenario() -> torch.Tensor:
        batcher = DynamicBatcher("test", slow_first_half, lambda parts: torch.cat(parts), 8, 0.05,
                                 instances=2)
        await batcher.start()
        await wait_until(lambda: batcher.idle_instances == 2)  # both threads in their loops
        job = await batcher.submit(torch.arange(4), 4, time.monotonic() + 30)
        batcher.stop()
        return job.future.result()

    result = asyncio.run(scenario())
    assert torch.equal(result, torch.arange(4))
    assert sorted((start, stop) for _, start, stop, _, _ in calls) == [(0, 2), (2, 4)]
    assert len({name for name, *_ in calls}) == 2  # two instance threads
    (_, _, _, start_a, end_a), (_, _, _, start_b, end_b) = calls
    assert start_a < end_b and start_b < end_a  # they ran at the same time


def test_batcher_instances_take_full_batches_under_load() -> None:
    """With more work waiting than the idle instances can share, every batch is full."""
    sizes: list[int] = []
    release = threading.Event()

    def run(chunks: Sequence[Chunk]) -> list[list[int]]:
        release.wait(10)
        sizes.append(sum(c.stop - c.start for c in chunks))
        return [list(range(c.start, c.stop)) for c in chunks]

    async def scenario() -> None:
        batcher = DynamicBatcher("test", run, lambda parts: [x for p in parts for x in p], 4, 0.0,
                                 instances=2)
        await batcher.start()
        await wait_until(lambda: batcher.idle_instances == 2)  # both threads in their loops
        far = time.monotonic() + 30
        first = [asyncio.create_task(batcher.submit(i, 1, far)) for i in range(2)]
        # both instances now hold one unit each and are blocked
        await wait_until(lambda: batcher.idle_instances == 0 and batcher.depth == 0)
        rest = [asyncio.create_task(batcher.submit(i, 2, far)) for i in range(8)]
        await wait_until(lambda: batcher.depth == 16)  # all eight queued behind them
        release.set()
        results = await asyncio.gather(*first, *rest)
        batcher.stop()
        assert [job.future.result() for job in results[2:]] == [[0, 1]] * 8

    asyncio.run(scenario())
    assert sorted(sizes) == [1, 1, 4, 4, 4, 4]


def lone_three_batcher(observe: Callable[[str, Sequence[Chunk]], None]) -> DynamicBatcher:
    """Two instances, batches of up to 4 units, no batching delay; a lone batch of exactly 3
    units runs on "all cores", anything else "spread". ``observe(runner, chunks)`` sees every
    batch before it returns (each unit's result is its index in its job)."""

    def runner(name: str) -> Callable[[Sequence[Chunk]], list[list[int]]]:
        def run(chunks: Sequence[Chunk]) -> list[list[int]]:
            observe(name, chunks)
            return [list(range(c.start, c.stop)) for c in chunks]

        return run

    return DynamicBatcher("test", runner("spread"), lambda parts: [x for p in parts for x in p],
                          4, 0.0, instances=2,
                          all_cores=AllCoresRunner(lambda units: units == 3,
                                                   runner("all cores")))  # fmt: skip


def test_batcher_runs_a_lone_batch_on_all_cores_only_where_faster_and_alone() -> None:
    """Two instances whose all-cores runner is faster for 3 units only: a lone 3-unit job runs
    whole on it; a lone 2-unit job is spread 1 + 1; a 3-unit job arriving while an instance is
    busy is not alone and goes through the ordinary runner."""
    calls: list[tuple[str, int]] = []
    hold = threading.Event()

    def observe(name: str, chunks: Sequence[Chunk]) -> None:
        if any(c.job.payload == "hold" for c in chunks):
            hold.wait(10)
        calls.append((name, sum(c.stop - c.start for c in chunks)))

    async def scenario() -> list:
        batcher = lone_three_batcher(observe)
        await batcher.start()
        await wait_until(lambda: batcher.idle_instances == 2)
        far = time.monotonic() + 30
        results = [await batcher.submit("lone", 3, far), await batcher.submit("lone", 2, far)]
        await wait_until(lambda: batcher.idle_instances == 2)
        held = asyncio.create_task(batcher.submit("hold", 1, far))
        await wait_until(lambda: batcher.idle_instances == 1)  # one instance busy, held
        busy = asyncio.create_task(batcher.submit("busy", 3, far))
        await wait_until(lambda: len(calls) == 4)  # "busy" ran while "hold" is held
        hold.set()
        results += [await busy, await held]
        all_cores = batcher.all_cores_batches
        batcher.stop()
        return [job.future.result() for job in results], all_cores

    results, all_cores = asyncio.run(scenario())
    assert results == [[0, 1, 2], [0, 1], [0, 1, 2], [0]]
    assert calls[0] == ("all cores", 3)
    assert sorted(calls[1:3]) == [("spread", 1), ("spread", 1)]
    assert calls[3:] == [("spread", 3), ("spread", 1)]
    assert all_cores == 1


def test_other_instances_start_nothing_while_a_batch_has_every_core() -> None:
    """A job arriving during an all-cores batch waits for it instead of oversubscribing the
    cores, then runs as usual."""
    running: list[tuple[str, str]] = []
    release = threading.Event()

    def observe(name: str, chunks: Sequence[Chunk]) -> None:
        running.append((name, chunks[0].job.payload))
        if name == "all cores":
            release.wait(10)

    async def scenario() -> list:
        batcher = lone_three_batcher(observe)
        await batcher.start()
        await wait_until(lambda: batcher.idle_instances == 2)
        far = time.monotonic() + 30
        lone = asyncio.create_task(batcher.submit("lone", 3, far))
        await wait_until(lambda: len(running) == 1)
        later = asyncio.create_task(batcher.submit("later", 1, far))
        await asyncio.sleep(0.2)  # an idle instance would have started it by now
        started_meanwhile = list(running)
        release.set()
        await asyncio.gather(lone, later)
        batcher.stop()
        return started_meanwhile

    started_meanwhile = asyncio.run(scenario())
    assert started_meanwhile == [("all cores", "lone")]
    assert running == [("all cores", "lone"), ("spread", "later")]


def test_lone_batch_rule_compares_the_slowest_spread_instance_with_all_cores() -> None:
    # two single-threaded instances, one crop each at once: 160 ms; both cores on one instance:
    # 140 ms for one crop, 400 ms for four (about what W48 128x96 fp32 takes on the AVX2 dev
    # machine): 1 and 3 crops finish sooner on both cores, 2 and 4 split evenly
    rule = LoneBatchRule(instances=2, spread_one_s=0.16, all_cores_one_s=0.14,
                         all_cores_probe_s=0.40, probe_units=4)  # fmt: skip
    assert [u for u in range(1, 9) if rule.all_cores_faster(u)] == [1, 3]
    assert rule.spread_s(3) == pytest.approx(0.32) and rule.all_cores_s(3) == pytest.approx(0.3133,
                                                                                            abs=1e-3)
    poor_scaling = LoneBatchRule(instances=2, spread_one_s=0.16, all_cores_one_s=0.17,
                                 all_cores_probe_s=0.62, probe_units=4)  # fmt: skip
    assert not any(poor_scaling.all_cores_faster(u) for u in range(1, 9))


class SimulatedClock:
    """``perf_counter`` for code that times forwards: a forward reports how long it would take
    (``run``), and the next reading advances by the longest one reported since the last reading,
    as forwards running at once on their own cores would. Timings then follow from the threads a
    forward ran on, never from how busy the machine is."""

    def __init__(self) -> None:
        self.now, self.pending = 0.0, 0.0
        self._lock = threading.Lock()

    def run(self, seconds: float) -> None:
        with self._lock:
            self.pending = max(self.pending, seconds)

    def perf_counter(self) -> float:
        with self._lock:
            self.now, self.pending = self.now + self.pending, 0.0
            return self.now


def test_lone_batches_are_measured_on_threads_set_up_like_the_instances(monkeypatch) -> None:
    seen: list[tuple[str, int, int]] = []
    clock = SimulatedClock()
    monkeypatch.setattr(resources, "time", clock)

    # Spread forwards meet here, so each instance's thread runs one: with instant forwards one
    # pool thread could otherwise take both before the other starts. Forwards that never run at
    # once break the barrier (10 s) and the thread count below shows it.
    spread_together = threading.Barrier(2, timeout=10)

    def forward(units: int) -> None:
        threads = torch.get_num_threads()
        if threads == 1:
            with contextlib.suppress(threading.BrokenBarrierError):
                spread_together.wait()
        seen.append((threading.current_thread().name, threads, units))
        clock.run(0.02 * units / threads)  # a forward that scales perfectly with threads

    rule = measure_lone_batches(forward, InstanceLayout(2, 1), cpus=2, probe_units=4, repeats=1)
    spread = {name for name, threads, units in seen if threads == 1}
    assert len(spread) == 2  # one crop on each of two single-threaded instances at once
    assert {(threads, units) for _, threads, units in seen} == {(1, 1), (2, 1), (2, 4)}
    assert rule.all_cores_probe_s == pytest.approx(0.04)  # 4 crops on 2 threads
    assert rule.all_cores_one_s == pytest.approx(0.01)
    assert rule.spread_one_s == pytest.approx(0.02)  # one thread each, side by side


def test_batcher_cancelled_job_leaves_the_queue_and_never_runs() -> None:
    release = threading.Event()
    seen: list[int] = []

    def blocking(chunks: Sequence[Chunk]) -> list[int]:
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
        await wait_until(lambda: batcher.depth == 1)  # queued behind job 1
        depth_before = batcher.depth
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        depth_after = batcher.depth
        release.set()
        await first
        await wait_until(lambda: batcher.idle_instances == 1)  # back in its loop, nothing to run
        batcher.stop()
        return depth_before, depth_after

    depth_before, depth_after = asyncio.run(scenario())
    assert (depth_before, depth_after) == (1, 0)
    assert seen == [1]


def test_batcher_drops_expired_work_before_running_it() -> None:
    release = threading.Event()
    seen: list[str] = []

    def blocking(chunks: Sequence[Chunk]) -> list[str]:
        seen.extend(c.job.payload for c in chunks)
        release.wait(10)
        return [c.job.payload for c in chunks]

    async def scenario() -> None:
        batcher = DynamicBatcher("test", blocking, lambda parts: parts[0], 1, 0.0)
        await batcher.start()
        first = asyncio.create_task(batcher.submit("first", 1, time.monotonic() + 30))
        while not seen:
            await asyncio.sleep(0.01)
        late_deadline = time.monotonic() + 0.05
        late = asyncio.create_task(batcher.submit("late", 1, late_deadline))
        # queued, and its deadline passes while the only instance is busy
        await wait_until(lambda: batcher.depth == 1 and time.monotonic() > late_deadline + 0.05)
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
        engine = make_engine(blob_model(), max_batch_size=3, max_queue_delay_ms=100,
                             lone_request_waits_for_batch=True)
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

    chunks = [Chunk(FakeJob(a, True), 0, 2), Chunk(FakeJob(b, False), 0, 1),
              Chunk(FakeJob(c, True), 0, 3)]
    outputs = engine._run_pose_batch(chunks)
    flipped = estimator.forward(torch.cat([a, c]), True)
    assert torch.equal(outputs[0], flipped[:2])
    assert torch.equal(outputs[1], estimator.forward(b, False))
    assert torch.equal(outputs[2], flipped[2:])


@pytest.mark.parametrize(("instances", "all_cores"), [(1, False), (2, False), (2, True)])
def test_engine_result_equals_the_estimator_run_directly(random_model: LoadedPoseModel, images,
                                                         instances: int, all_cores: bool) -> None:
    """One request alone gives what prepare/forward/decode give by hand, for the service's flip
    setting and for a per-request override, with its crops on one instance, spread over two, or
    on one of two instances with both cores (a lone batch)."""
    boxes = np.array(images.bus_boxes)
    image_rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(images.bus, np.uint8), cv2.IMREAD_COLOR),
                             cv2.COLOR_BGR2RGB)
    estimator = random_model.estimator

    async def scenario() -> list:
        engine = make_engine(random_model, max_queue_delay_ms=0, model_instances=instances)
        if all_cores:  # as if measured: every lone batch is faster on one instance, 2 threads
            engine.lone_batch_rule = LoneBatchRule(instances, spread_one_s=1.0,
                                                   all_cores_one_s=0.0, all_cores_probe_s=0.0,
                                                   probe_units=4)  # fmt: skip
        await engine.start()
        results = [await engine.estimate(ImageRequest(images.bus, boxes=boxes, flip=flip))
                   for flip in (None, False)]
        assert engine._pose_batcher.all_cores_batches == (2 if all_cores else 0)
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


def test_a_request_alone_never_waits_for_a_batch_and_concurrent_ones_share_one(
        random_model: LoadedPoseModel, images) -> None:
    """The batch wait (here ten minutes) applies only while other admitted images are on their
    way to the pose model: a request alone runs at once, two sent together share one pass."""
    boxes = np.array(images.bus_boxes)

    async def scenario() -> tuple[tuple[float, float], tuple[float, float]]:
        engine = make_engine(random_model, max_queue_delay_ms=600_000, model_instances=1)
        await engine.start()
        try:
            await asyncio.wait_for(engine.estimate(ImageRequest(images.bus, boxes=boxes)), 120)
            alone = pose_batches(engine)
            await asyncio.wait_for(asyncio.gather(
                *(engine.estimate(ImageRequest(images.bus, boxes=boxes)) for _ in range(2))), 120)
            return alone, pose_batches(engine)
        finally:
            await engine.close()

    alone, after_pair = asyncio.run(scenario())
    assert alone == (1.0, 2.0)
    assert after_pair == (2.0, 6.0)  # the pair's four crops in one forward pass


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
                             max_queue_delay_ms=5000, lone_request_waits_for_batch=True)
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
        engine = make_engine(blob_model(), max_batch_size=64, max_queue_delay_ms=2000,
                             lone_request_waits_for_batch=True)
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
            await engine.estimate_many([good, ImageRequest(b"not an image", boxes=[])])
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


def test_batches_refuse_render_because_rendered_images_hold_their_pixels() -> None:
    """A rendered image keeps its pixels until the whole batch ends, so a later image of the
    batch could wait for its own batch's pixel budget until the deadline."""
    async def scenario() -> None:
        engine = make_engine(blob_model())
        await engine.start()
        rendered = ImageRequest(blob_png([(60, 80)]), boxes=np.array([[30.0, 40, 60, 80]]),
                                render=True)
        with pytest.raises(InvalidRequest, match=r"images\[0\]: render is only available"):
            await engine.estimate_many([rendered])
        assert engine.inflight == 0
        assert len((await engine.estimate(rendered)).rendered_jpeg) > 0  # one image: fine
        await engine.close()

    asyncio.run(scenario())


def test_stream_ids_are_registered_only_for_admitted_requests() -> None:
    """A refused frame (not ready, overloaded) leaves no stream behind to fill max_streams."""
    async def scenario() -> None:
        loading = PoseEngine(ServiceSettings(config=CONFIG.name, device="cpu", warmup=False),
                             ServiceMetrics())
        with pytest.raises(EngineUnavailable, match="loading"), loading.open_stream():
            pass
        assert loading.tracked_streams == 0

        engine = make_engine(blob_model(), max_queue_size=1, max_batch_size=64,
                             max_queue_delay_ms=5000, lone_request_waits_for_batch=True)
        boxes = np.array([[30.0, 40, 60, 80]])
        frame = ImageRequest(blob_png([(60, 80)]), boxes=boxes, stream_id="cam")
        with pytest.raises(EngineUnavailable, match="loading"):
            await engine.estimate(frame)
        assert engine.tracked_streams == 0
        await engine.start()
        first = asyncio.create_task(engine.estimate(ImageRequest(frame.data, boxes=boxes)))
        await wait_until(lambda: engine._pose_batcher.depth > 0)
        with pytest.raises(EngineOverloaded):
            await engine.estimate(frame)
        assert engine.tracked_streams == 0
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await engine.close()

    asyncio.run(scenario())


def test_a_tracked_frame_waits_for_its_stream_within_its_own_deadline() -> None:
    """Frames of one stream run one at a time; one queued behind a slow frame must still time
    out at its own deadline and give its admission slot back, not when the slow one ends."""
    async def scenario() -> float:
        engine = make_engine(blob_model(), max_batch_size=64, max_queue_delay_ms=2000,
                             lone_request_waits_for_batch=True)
        await engine.start()
        frame = ImageRequest(blob_png([(60, 80)]), boxes=np.array([[30.0, 40, 60, 80]]),
                             stream_id="cam")
        holder = asyncio.create_task(engine.estimate(frame, timeout_s=10))
        await wait_until(lambda: engine._pose_batcher.depth > 0)  # holds the stream ~2 s
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await engine.estimate(frame, timeout_s=0.3)
        waited = time.monotonic() - started
        assert engine.inflight == 1  # only the holder keeps a slot
        assert len((await holder).persons) == 1
        await engine.close()
        return waited

    assert asyncio.run(scenario()) < 1.5


def test_instance_layouts_from_settings_or_for_measurement() -> None:
    def layout(**settings: object) -> InstanceLayout | None:
        return configured_layout(ServiceSettings(**settings), 8, "cpu")

    assert candidate_layouts(8) == [InstanceLayout(8, 1), InstanceLayout(4, 2),
                                    InstanceLayout(2, 4), InstanceLayout(1, 8)]
    assert candidate_layouts(1) == [InstanceLayout(1, 1)]
    assert layout() is None  # measured at start-up
    assert layout(model_instances=2) == InstanceLayout(2, 4)
    assert layout(torch_threads=4) == InstanceLayout(2, 4)
    assert layout(model_instances=3, torch_threads=1) == InstanceLayout(3, 1)
    assert configured_layout(ServiceSettings(), 8, "cuda") == InstanceLayout(1, 8)


def test_measured_layouts_run_each_instance_on_its_own_thread() -> None:
    seen: dict[str, int] = {}

    def forward() -> int:
        seen[threading.current_thread().name] = torch.get_num_threads()
        time.sleep(0.01)
        return 3

    rates = measure_layouts(forward, [InstanceLayout(2, 1), InstanceLayout(1, 2)],
                            seconds_per_layout=0.1)
    assert set(rates) == {InstanceLayout(2, 1), InstanceLayout(1, 2)}
    # sleeping "forwards" overlap perfectly: two instances deliver about twice the crops
    assert rates[InstanceLayout(2, 1)] > 1.5 * rates[InstanceLayout(1, 2)] > 0
    assert sorted(seen.values()) == [1, 1, 2]  # each thread ran with its layout's thread count


def test_configure_threads_gives_torch_the_configured_cores() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(ServiceSettings(torch_threads=1)) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --- failures inside a batch fail only their own request -------------------------------------
def in_context(request_id: str) -> contextvars.Context:
    """A context in which the transports would have set this request id."""
    context = contextvars.copy_context()
    context.run(REQUEST_ID.set, request_id)
    return context


def assert_generic_internal(error: BaseException, request_id: str | None = None) -> None:
    """An INTERNAL error that names a request id and nothing of the exception's own text."""
    assert isinstance(error, EngineError), repr(error)
    assert error.code == ErrorCode.INTERNAL
    assert error.message.startswith("internal error (request id ")
    if request_id is not None:
        assert error.message == f"internal error (request id {request_id})"
    assert "secret" not in error.message


def test_batcher_fails_only_the_culprit_and_drops_the_rest_of_it(caplog) -> None:
    """Jobs a (2 units), poison (3) and b (2) with batches of 4: the first batch [a, poison 0:2]
    fails, is re-run chunk by chunk, only poison fails, and its third unit never runs."""
    calls: list[list[tuple[str, int, int]]] = []

    def run(chunks: Sequence[Chunk]) -> list[list[int]]:
        calls.append([(c.job.payload[0], c.start, c.stop) for c in chunks])
        if any(c.job.payload[0] == "poison" for c in chunks):
            raise ValueError("secret detail: /opt/weights/model.pt")
        return [c.job.payload[1][c.start:c.stop] for c in chunks]

    async def scenario() -> tuple[list, int]:
        batcher = DynamicBatcher("test", run, lambda parts: [x for p in parts for x in p], 4, 0.3)
        await batcher.start()
        far = time.monotonic() + 30
        tasks = [asyncio.create_task(batcher.submit((name, list(range(n))), n, far),
                                     context=in_context(f"req-{name}"))
                 for name, n in (("a", 2), ("poison", 3), ("b", 2))]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        depth = batcher.depth
        batcher.stop()
        return results, depth

    with caplog.at_level(logging.ERROR, logger="omnipose.service.errors"):
        (a, poison, b), depth = asyncio.run(scenario())
    assert calls == [[("a", 0, 2), ("poison", 0, 2)], [("a", 0, 2)], [("poison", 0, 2)],
                     [("b", 0, 2)]]
    assert a.future.result() == [0, 1] and b.future.result() == [0, 1]
    assert_generic_internal(poison, "req-poison")
    assert depth == 0
    logged = [r for r in caplog.records if "req-poison" in r.getMessage()]
    assert logged and "secret detail" in str(logged[0].exc_info[1])  # details: log only


def test_a_detector_failure_on_one_image_fails_only_that_request() -> None:
    calls: list[list[int]] = []

    class PickyDetector(PersonDetector):
        """Finds one person, but raises on any batch holding a 300-pixel-wide image."""

        name = "picky"

        def detect_batch(self, images_bgr):
            calls.append([image.shape[1] for image in images_bgr])
            if any(image.shape[1] == 300 for image in images_bgr):
                raise RuntimeError("secret: detector crashed")
            return [Detections(np.array([[40.0, 40.0, 60.0, 80.0]]), np.array([0.9]))
                    for _ in images_bgr]

    good, bad = blob_png([(70, 80)]), blob_png([(70, 80)], shape=(200, 300))

    async def scenario() -> list:
        # a batch closes only when full: all three images ride in the first detector call
        engine = make_engine(blob_model(), PickyDetector(), detector_max_batch_size=3,
                             detector_max_queue_delay_ms=5000)
        await engine.start()
        results = await asyncio.gather(*(engine.estimate(ImageRequest(data))
                                          for data in (good, bad, good)), return_exceptions=True)
        await engine.close()
        return results

    first, failed, third = asyncio.run(scenario())
    assert sorted(calls[0]) == [300, 320, 320]  # one batch with all three images failed
    assert sorted(calls[1:]) == [[300], [320], [320]]  # then each image was tried alone
    assert len(first.persons) == len(third.persons) == 1
    assert_generic_internal(failed)


class PoisonedBlobFinder(BlobFinder):
    """The blob finder, but any batch holding an almost white crop raises (a 'bad input')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = (x * self.std + self.mean).mean(dim=(1, 2, 3))
        if (brightness > 0.9).any():
            raise RuntimeError("secret: illegal memory access at 0xdeadbeef")
        return super().forward(x)


def white_png(shape: tuple[int, int] = (240, 320)) -> bytes:
    ok, buffer = cv2.imencode(".png", np.full((*shape, 3), 255, np.uint8))
    assert ok
    return buffer.tobytes()


@pytest.mark.parametrize("instances", [1, 2])
def test_a_pose_failure_on_one_request_fails_only_that_request(instances: int) -> None:
    estimator = TopDownPoseEstimator(PoisonedBlobFinder(CONFIG.num_joints), CONFIG,
                                     device="cpu", flip_test=False)
    model = LoadedPoseModel(estimator, CONFIG, CONFIG.keypoints, None, None, False)
    two = blob_png([(60, 80), (230, 150)])
    two_boxes = [[30.0, 40.0, 60.0, 80.0], [200.0, 110.0, 60.0, 80.0]]

    async def scenario() -> tuple[list, tuple[float, float]]:
        # 2 + 1 + 1 crops fill one batch of 4 exactly: they ride together, then get isolated
        engine = make_engine(model, max_batch_size=4, max_queue_delay_ms=5000,
                             model_instances=instances, lone_request_waits_for_batch=True)
        await engine.start()
        results = await asyncio.gather(
            engine.estimate(ImageRequest(two, boxes=two_boxes)),
            engine.estimate(ImageRequest(white_png(), boxes=[[130.0, 80.0, 60.0, 80.0]])),
            engine.estimate(ImageRequest(two, boxes=two_boxes[:1])),
            return_exceptions=True)
        await engine.close()
        return results, pose_batches(engine)

    (both, failed, one), (passes, crops) = asyncio.run(scenario())
    assert len(both.persons) == 2 and len(one.persons) == 1
    assert_generic_internal(failed)
    if instances == 1:  # one instance: the batch composition is exact
        assert passes == 4 and crops == 8  # the full batch, then each request's crops alone


# --- memory: the decoded-pixel budget ----------------------------------------------------------
class OneBoxDetector(PersonDetector):
    name = "one-box"

    def detect_batch(self, images_bgr):
        return [Detections(np.array([[30.0, 40.0, 60.0, 80.0]]), np.array([0.9]))
                for _ in images_bgr]


def test_pixel_budget_refuses_a_second_image_while_the_first_holds_its_pixels() -> None:
    image = blob_png([(60, 80)])
    pixels = 320 * 240
    boxes = [[30.0, 40.0, 60.0, 80.0]]

    async def until(condition) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        # slow batches: requests stay where they are for as long as the test looks at them
        engine = make_engine(blob_model(), OneBoxDetector(), max_image_pixels=pixels,
                             max_inflight_pixels=pixels + 1000, detector_max_batch_size=8,
                             detector_max_queue_delay_ms=5000, max_batch_size=64,
                             max_queue_delay_ms=5000, lone_request_waits_for_batch=True)
        await engine.start()
        detecting = asyncio.create_task(engine.estimate(ImageRequest(image)))
        await until(lambda: engine._detector_batcher.depth == 1)  # decoded, waiting to detect
        assert engine.inflight_pixels == pixels
        with pytest.raises(EngineOverloaded, match="pixels") as refused:
            await engine.estimate(ImageRequest(image, boxes=boxes))
        assert refused.value.code == ErrorCode.OVERLOADED and refused.value.retry_after_s >= 1
        assert engine.inflight == 1  # the refused request left nothing behind
        detecting.cancel()
        await asyncio.gather(detecting, return_exceptions=True)
        assert engine.inflight_pixels == 0

        # crops cut: the decoded image is released, so such requests fit side by side
        waiting = []
        for count in (1, 2):
            waiting.append(asyncio.create_task(engine.estimate(ImageRequest(image, boxes=boxes))))
            await until(lambda count=count: engine._pose_batcher.depth == count)
            assert engine.inflight_pixels == 0
        # ... unless the image is still needed for rendering
        rendering = asyncio.create_task(engine.estimate(ImageRequest(image, boxes=boxes,
                                                                     render=True)))
        await until(lambda: engine._pose_batcher.depth == 3)
        assert engine.inflight_pixels == pixels
        for task in (*waiting, rendering):
            task.cancel()
        await asyncio.gather(*waiting, rendering, return_exceptions=True)
        assert engine.inflight_pixels == 0 and engine.inflight == 0
        assert engine.metrics.registry.get_sample_value("omnipose_inflight_pixels") == 0
        await engine.close()

    asyncio.run(scenario())


def test_pixel_budget_must_hold_the_largest_image() -> None:
    with pytest.raises(ValidationError, match="max_inflight_pixels"):
        ServiceSettings(max_image_pixels=1_000_000, max_inflight_pixels=999_999)
    assert ServiceSettings().max_inflight_pixels >= ServiceSettings().max_image_pixels


# --- boxes: who supplies them, and how many ----------------------------------------------------
def test_without_a_detector_boxes_are_required_unless_the_whole_image_fallback_is_on() -> None:
    data = blob_png([(60, 80)])

    async def scenario() -> list:
        results = []
        for fallback in (False, True):
            engine = make_engine(blob_model(), whole_image_if_no_person=fallback)
            await engine.start()
            try:
                results.append(await engine.estimate(ImageRequest(data)))
            except InvalidRequest as exc:
                results.append(exc)
            assert len((await engine.estimate(ImageRequest(data, boxes=[]))).persons) == 0
            await engine.close()
        return results

    refused, whole = asyncio.run(scenario())
    assert isinstance(refused, InvalidRequest) and refused.code == ErrorCode.INVALID_ARGUMENT
    assert "no person detector" in refused.message and "boxes" in refused.message
    assert [list(p.bbox) for p in whole.persons] == [[0, 0, 320, 240]]


def test_client_boxes_over_max_persons_are_refused_detections_are_truncated() -> None:
    scores = [0.1, 0.9, 0.5, 0.8, 0.2]

    class FiveBoxDetector(PersonDetector):
        name = "five"

        def detect_batch(self, images_bgr):
            boxes = np.array([[10.0 + 50 * i, 40.0, 40.0, 80.0] for i in range(5)])
            return [Detections(boxes, np.array(scores)) for _ in images_bgr]

    data = blob_png([(60, 80)])

    async def scenario() -> tuple:
        engine = make_engine(blob_model(), FiveBoxDetector(), max_persons=2)
        await engine.start()
        with pytest.raises(InvalidRequest, match="3 boxes given, over the limit of 2") as refused:
            await engine.estimate(ImageRequest(data, boxes=[[10.0, 10, 20, 20]] * 3))
        detected = await engine.estimate(ImageRequest(data))
        await engine.close()
        return refused.value, detected

    refused, detected = asyncio.run(scenario())
    assert refused.code == ErrorCode.INVALID_ARGUMENT
    assert sorted(p.box_score for p in detected.persons) == pytest.approx([0.8, 0.9])


def test_person_selection_shared_by_cli_and_engine(random_model: LoadedPoseModel) -> None:
    boxes = np.array([[0.0, 0, 10, 10], [5, 5, 10, 10], [1, 1, 4, 4]])
    detections = Detections(boxes, np.array([0.2, 0.9, 0.5]))
    top = detected_persons(detections, (100, 80, 3), 2, whole_image_if_no_person=False)
    assert top.scores.tolist() == [0.9, 0.5] and top.boxes.tolist() == boxes[[1, 2]].tolist()
    assert len(detected_persons(Detections.empty(), (100, 80, 3), 5, False)) == 0
    whole = detected_persons(Detections.empty(), (100, 80, 3), 5, True)
    assert whole.boxes.tolist() == [[0, 0, 80, 100]]
    kept = client_persons(boxes, None, 3)  # client boxes: order kept, score 1
    assert kept.boxes.tolist() == boxes.tolist() and kept.scores.tolist() == [1, 1, 1]
    with pytest.raises(BoxError, match="limit of 2"):
        client_persons(boxes, None, 2)
    with pytest.raises(BoxError, match="3 boxes but 2 box scores"):
        client_persons(boxes, [0.5, 0.5], 3)
    # the network sees RGB: a blue BGR image gives the crops of the same image read as RGB
    image_bgr = np.zeros((100, 80, 3), np.uint8)
    image_bgr[..., 0] = 255
    crops = crop_persons(random_model.estimator, image_bgr, kept)
    direct = random_model.estimator.prepare(image_bgr[..., ::-1].copy(), boxes)
    assert torch.equal(crops.inputs, direct.inputs)


# --- shutdown and start-up failures ------------------------------------------------------------
def test_work_dropped_by_a_closing_engine_is_unavailable_not_cancelled() -> None:
    """After the grace period the CPU pool drops queued work: those requests are answered
    UNAVAILABLE (503), not reported as cancelled by the client (499)."""
    request = ImageRequest(blob_png([(60, 80)]), boxes=[[30.0, 40.0, 60.0, 80.0]])

    async def scenario() -> list:
        engine = make_engine(blob_model(), cpu_workers=1)
        await engine.start()
        release = threading.Event()
        engine._pool.submit(release.wait, 10)  # the only CPU worker is busy
        single = asyncio.create_task(engine.estimate(request))
        batch = asyncio.create_task(engine.estimate_many([request, request]))
        while engine.inflight < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # both are waiting for the CPU pool now
        await engine.close()
        release.set()
        return await asyncio.gather(single, batch, return_exceptions=True)

    for outcome in asyncio.run(scenario()):
        assert isinstance(outcome, EngineUnavailable), repr(outcome)
        assert "shutting down" in outcome.message


def test_a_failed_start_says_why() -> None:
    async def scenario() -> EngineUnavailable:
        settings = ServiceSettings(config=CONFIG.name, device="cpu", warmup=False,
                                   detector="yolo")  # no detector_weights: cannot start
        engine = PoseEngine(settings, ServiceMetrics(), pose_model=blob_model())
        with pytest.raises(Exception, match="weights"):
            await engine.start()
        with pytest.raises(EngineUnavailable) as refused:
            await engine.estimate(ImageRequest(blob_png([(60, 80)]), boxes=[]))
        await engine.close()
        return refused.value

    refused = asyncio.run(scenario())
    assert refused.message.startswith("the engine failed to start: ")
    assert "weights" in refused.message and "shutting down" not in refused.message


def test_flip_shift_setting_reaches_the_estimator() -> None:
    async def scenario() -> tuple[bool, dict]:
        settings = ServiceSettings(config=CONFIG.name, device="cpu", warmup=False,
                                   detector="none", flip_shift=True)
        engine = PoseEngine(settings, ServiceMetrics())
        await engine.start()
        flip_shift, description = engine.pose_model.estimator.flip_shift, engine.describe()
        await engine.close()
        return flip_shift, description

    flip_shift, description = asyncio.run(scenario())
    assert flip_shift is True and description["flip_shift"] is True


def test_every_stage_series_exists_from_the_start() -> None:
    registry = ServiceMetrics().registry
    for stage in STAGES:
        assert registry.get_sample_value("omnipose_stage_duration_seconds_count",
                                         {"stage": stage}) == 0.0


# --- CPU quota (Kubernetes limits) -------------------------------------------------------------
@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu.max": "400000 100000\n"}, 4),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
     3),
    ({}, None),
])
def test_cgroup_cpu_quota_caps_the_cpus(tmp_path: Path, files: dict[str, str],
                                        expected: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert read_cgroup_cpu_limit(tmp_path) == expected
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == (min(affinity, expected) if expected else affinity)


def test_cgroup_cpu_limit_parses_only_sane_contents() -> None:
    assert cgroup_cpu_limit(cpu_max="200000 50000") == 4
    assert cgroup_cpu_limit(cpu_max="garbage") is None
    assert cgroup_cpu_limit(cpu_max="") is None
    assert cgroup_cpu_limit(cfs_quota_us="0", cfs_period_us="100000") is None
    assert cgroup_cpu_limit(cfs_quota_us="100000", cfs_period_us="100000") == 1
    assert cgroup_cpu_limit() is None
