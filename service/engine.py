"""The pose engine: one dynamically batched pipeline behind both transports.

A request's image flows through stages that each run where they belong:

* image decoding, crop preparation, heatmap decoding and rendering run on a small CPU thread pool
  (``cpu_workers``), never on a model thread;
* person detection runs on one detector thread that coalesces images across requests
  (``detector_max_batch_size`` / ``detector_max_queue_delay_ms``);
* the pose network runs on ONE dedicated thread per device that coalesces person crops across
  requests and persons (``max_batch_size`` / ``max_queue_delay_ms``), so the device sees large
  batches and never two forward passes competing for it.

Admission control bounds the requests inside the engine (``max_queue_size``); beyond it a request
is refused at once (:class:`EngineOverloaded`) instead of queueing without limit. Every request has
a deadline; work whose deadline has passed is dropped before it reaches a model, and a cancelled
request (client gone) takes its queued work out of the queues. Every admitted request gets exactly
one answer: an :class:`ImageResult` or an :class:`EngineError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import cv2
import numpy as np
import torch

from model.render import draw_poses
from model.topdown import CropBatch, PersonPose
from service.boxes import BoxError, parse_boxes
from service.detection import Detections, PersonDetector, build_detector
from service.images import ImageError, decode_image, encode_jpeg
from service.loading import LoadedPoseModel, load_pose_model
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

RENDER_DEFAULT_MIN_SCORE = 0.2
WARMUP_IMAGE_SHAPE = (480, 640, 3)


# --- errors ----------------------------------------------------------------------------------
class ErrorCode(StrEnum):
    """Transport-neutral error kinds; each transport maps them to its own status codes."""

    INVALID_IMAGE = "invalid_image"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    INVALID_ARGUMENT = "invalid_argument"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class EngineError(Exception):
    """A request the engine answers with an error; ``message`` is meant for the client as is."""

    default_code = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code

    def prefixed(self, prefix: str) -> EngineError:
        """The same error with ``prefix`` in front of the message (e.g. the image's index)."""
        clone = copy.copy(self)
        clone.message = f"{prefix}: {self.message}"
        clone.args = (clone.message,)
        return clone


class InvalidRequest(EngineError):
    default_code = ErrorCode.INVALID_ARGUMENT


class EngineOverloaded(EngineError):
    """Admission refused: the engine already holds ``max_queue_size`` requests."""

    default_code = ErrorCode.OVERLOADED

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EngineError):
    default_code = ErrorCode.DEADLINE_EXCEEDED


class EngineUnavailable(EngineError):
    """Not ready yet (loading, warming up) or shutting down."""

    default_code = ErrorCode.UNAVAILABLE


_IMAGE_ERROR_CODES = {
    "invalid": ErrorCode.INVALID_IMAGE,
    "unsupported": ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    "too_large": ErrorCode.PAYLOAD_TOO_LARGE,
}


# --- requests and results --------------------------------------------------------------------
def client_boxes(value: Any, image_width: int | None = None,
                 image_height: int | None = None) -> np.ndarray:
    """Client boxes (``[[x, y, w, h], ...]`` or its JSON text) as N x 4, or InvalidRequest."""
    try:
        return parse_boxes(value, image_width, image_height)
    except BoxError as exc:
        raise InvalidRequest(str(exc)) from None


@dataclass
class ImageRequest:
    """One image to estimate, with the client's options. ``boxes`` None means: detect people."""

    data: bytes
    boxes: np.ndarray | None = None  # N x 4, x y w h (see client_boxes)
    box_scores: np.ndarray | None = None  # N, default 1.0
    flip: bool | None = None  # None: the service's flip_test setting
    min_keypoint_score: float = 0.0  # keypoints below it are reported as (0, 0, 0)
    min_instance_score: float = 0.0  # persons below it are left out
    max_persons: int | None = None  # keep the highest-scoring persons; capped by settings
    render: bool = False  # also return a JPEG with the skeletons drawn

    def validate(self) -> None:
        """Range checks shared by both transports (gRPC has no schema to enforce them)."""
        for name in ("min_keypoint_score", "min_instance_score"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1):
                raise InvalidRequest(f"{name} must be a number in [0, 1], got {value!r}")
        if self.max_persons is not None and self.max_persons < 1:
            raise InvalidRequest(f"max_persons must be at least 1, got {self.max_persons}")
        if self.boxes is not None:
            boxes = np.asarray(self.boxes, dtype=np.float64)
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise InvalidRequest(f"boxes must be N x 4 (x, y, w, h), got shape {boxes.shape}")
            if not np.isfinite(boxes).all():
                raise InvalidRequest("boxes contain NaN or infinity")
            bad = np.flatnonzero((boxes[:, 2] <= 0) | (boxes[:, 3] <= 0))
            if len(bad):
                raise InvalidRequest(f"boxes[{bad[0]}] must have positive width and height")
            if self.box_scores is not None and len(self.box_scores) != len(boxes):
                raise InvalidRequest(
                    f"got {len(boxes)} boxes but {len(self.box_scores)} box scores"
                )


@dataclass
class ImageResult:
    """Persons found in one image (keypoints in image pixels), stage timings, optional overlay."""

    width: int
    height: int
    persons: list[PersonPose]
    timings_ms: dict[str, float]
    rendered_jpeg: bytes | None = None


# --- dynamic batcher -------------------------------------------------------------------------
@dataclass(eq=False)
class _Job:
    """Work of one image waiting for a model thread; may be split over several batches."""

    payload: Any  # pose: N x 3 x H x W crops; detector: a BGR image
    size: int  # units (crops or images)
    key: Hashable  # units with different keys never share a forward pass (flip on/off)
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.monotonic)
    taken: int = 0  # units handed to the worker so far
    parts: list = field(default_factory=list)
    first_batch_at: float | None = None
    compute_s: float = 0.0  # model time of the batches this job rode in
    done: bool = False


@dataclass
class _Chunk:
    job: _Job
    start: int
    stop: int


def _resolve(future: asyncio.Future, value: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless it was cancelled meanwhile (runs on the event loop)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class DynamicBatcher:
    """A dedicated thread that forms batches across requests and runs them one at a time.

    A batch closes when it holds ``max_batch_size`` units or when the oldest waiting job has
    waited ``max_delay_s``: under load batches fill at once, at low load latency is bounded.
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[Sequence[_Chunk]], list[Any]],
        combine: Callable[[list[Any]], Any],
        max_batch_size: int,
        max_delay_s: float,
        on_depth: Callable[[int], None] = lambda depth: None,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self._combine = combine
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._on_depth = on_depth
        self._on_start = on_start
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the thread; ``on_start`` (warm-up) runs on it first, errors are raised here."""
        loop = asyncio.get_running_loop()
        started: asyncio.Future = loop.create_future()

        def main() -> None:
            try:
                if self._on_start is not None:
                    self._on_start()
            except BaseException as exc:
                loop.call_soon_threadsafe(_resolve, started, None, exc)
                return
            loop.call_soon_threadsafe(_resolve, started, None)
            self._loop()

        self._thread = threading.Thread(target=main, name=f"omnipose-{self.name}", daemon=True)
        self._thread.start()
        await started

    def stop(self, timeout: float = 10.0) -> None:
        """Fail whatever still waits, then stop the thread after its current batch."""
        with self._cond:
            self._stopping = True
            leftovers = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in leftovers:
            job.loop.call_soon_threadsafe(
                _resolve, job.future, None, EngineUnavailable("the service is shutting down")
            )
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def depth(self) -> int:
        """Units waiting (not yet handed to the worker)."""
        with self._cond:
            return self._pending_units()

    # -- submission ---------------------------------------------------------------------------
    async def submit(self, payload: Any, size: int, deadline: float, key: Hashable = None) -> _Job:
        """Queue ``size`` units and wait for them; cancellation takes them out of the queue."""
        loop = asyncio.get_running_loop()
        job = _Job(payload, size, key, deadline, loop, loop.create_future())
        with self._cond:
            if self._stopping:
                raise EngineUnavailable("the service is shutting down")
            self._queue.append(job)
            self._on_depth(self._pending_units())
            self._cond.notify()
        try:
            await job.future
        except asyncio.CancelledError:
            self._remove(job)
            raise
        return job

    def _remove(self, job: _Job) -> None:
        with self._cond:
            job.done = True
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            self._on_depth(self._pending_units())

    def _pending_units(self) -> int:
        return sum(job.size - job.taken for job in self._queue)

    # -- worker thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                while (not self._stopping and self._queue
                       and self._pending_units() < self.max_batch_size):
                    # the head may change while waiting (cancelled), so recompute its close time
                    remaining = self._queue[0].enqueued_at + self.max_delay_s - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stopping:
                    return
                chunks, expired = self._take()
                self._on_depth(self._pending_units())
            for job in expired:
                job.loop.call_soon_threadsafe(
                    _resolve, job.future, None,
                    DeadlineExceeded("the request's deadline passed while it waited in the queue"),
                )
            if chunks:
                self._execute(chunks)

    def _take(self) -> tuple[list[_Chunk], list[_Job]]:
        """Up to max_batch_size units in arrival order; expired jobs are dropped, not run."""
        now = time.monotonic()
        chunks: list[_Chunk] = []
        expired: list[_Job] = []
        room = self.max_batch_size
        while self._queue and room > 0:
            job = self._queue[0]
            if job.deadline <= now:
                self._queue.popleft()
                job.done = True
                expired.append(job)
                continue
            count = min(room, job.size - job.taken)
            chunks.append(_Chunk(job, job.taken, job.taken + count))
            job.taken += count
            if job.first_batch_at is None:
                job.first_batch_at = now
            room -= count
            if job.taken == job.size:
                self._queue.popleft()
        return chunks, expired

    def _execute(self, chunks: list[_Chunk]) -> None:
        started = time.perf_counter()
        try:
            outputs = self._run_batch(chunks)
        except Exception as exc:  # a failed batch fails its requests, never the worker
            log.exception("%s batch of %d chunks failed", self.name, len(chunks))
            error = EngineError(f"{self.name} failed: {type(exc).__name__}: {exc}")
            for job in {id(c.job): c.job for c in chunks}.values():
                job.done = True
                job.loop.call_soon_threadsafe(_resolve, job.future, None, error)
            return
        elapsed = time.perf_counter() - started
        for chunk, output in zip(chunks, outputs, strict=True):
            job = chunk.job
            job.compute_s += elapsed
            job.parts.append(output)
            if chunk.stop == job.size and not job.done:
                job.done = True
                try:
                    value = self._combine(job.parts)
                except Exception as exc:
                    job.loop.call_soon_threadsafe(_resolve, job.future, None, exc)
                    continue
                job.loop.call_soon_threadsafe(_resolve, job.future, value)


# --- the engine ------------------------------------------------------------------------------
def available_cpus() -> int:
    """CPUs this process may run on (container limits included where the OS applies them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(settings: ServiceSettings) -> int:
    """Give the pose forward the cores: torch intra-op threads = setting or all CPUs.

    OpenCV's own pool is turned off: its work here (decode, warps, HOG) runs on our small pools,
    and a second thread pool of CPU-count size would fight the forward pass for the same cores.
    """
    threads = settings.torch_threads or available_cpus()
    torch.set_num_threads(threads)
    cv2.setNumThreads(1)
    return threads


class PoseEngine:
    """Decode -> detect -> crop -> batched pose forward -> decode, shared by REST and gRPC."""

    def __init__(
        self,
        settings: ServiceSettings,
        metrics: ServiceMetrics | None = None,
        pose_model: LoadedPoseModel | None = None,
        detector: PersonDetector | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.pose_model = pose_model
        self.detector = detector
        self.state = "starting"  # starting -> ready -> draining -> stopped (or failed)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._latency_ewma_s = 0.5
        self._pool = ThreadPoolExecutor(settings.cpu_workers, thread_name_prefix="omnipose-cpu")
        self._pose_batcher: DynamicBatcher | None = None
        self._detector_batcher: DynamicBatcher | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def inflight(self) -> int:
        return self._inflight

    async def start(self) -> None:
        """Load what was not given, start the model threads, warm up, then report ready."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        try:
            if self.pose_model is None:
                self.pose_model = await loop.run_in_executor(None, lambda: load_pose_model(
                    settings.weights, settings.config, settings.device, settings.precision,
                    settings.flip_test,
                ))
            if self.detector is None:
                self.detector = await loop.run_in_executor(None, lambda: build_detector(
                    settings.detector, settings.detector_weights, self._detector_device(),
                    settings.detector_min_score,
                ))
            self._publish_model_info()
            queue_depth = self.metrics.queue_depth
            self._pose_batcher = DynamicBatcher(
                "pose", self._run_pose_batch, lambda parts: torch.cat(parts, dim=0),
                settings.max_batch_size, settings.max_queue_delay_ms / 1000,
                on_depth=queue_depth.labels(queue="pose").set,
                on_start=self._warm_pose if settings.warmup else None,
            )
            self._detector_batcher = DynamicBatcher(
                "detector", self._run_detector_batch, lambda parts: parts[0],
                settings.detector_max_batch_size, settings.detector_max_queue_delay_ms / 1000,
                on_depth=queue_depth.labels(queue="detector").set,
                on_start=self._warm_detector if settings.warmup else None,
            )
            await asyncio.gather(self._pose_batcher.start(), self._detector_batcher.start())
        except BaseException:
            self.state = "failed"
            raise
        self.state = "ready"
        log.info("engine ready: %s on %s, detector %s", self.pose_model.name,
                 self.pose_model.estimator.device, self.detector.name)

    def begin_drain(self) -> None:
        """Refuse new requests (503 / UNAVAILABLE); admitted ones still finish."""
        if self.state in ("starting", "ready"):
            self.state = "draining"

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every admitted request is answered; False if ``timeout`` ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop the model threads (failing anything still queued) and the CPU pool."""
        self.state = "stopped"
        loop = asyncio.get_running_loop()
        for batcher in (self._pose_batcher, self._detector_batcher):
            if batcher is not None:
                await loop.run_in_executor(None, batcher.stop)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _detector_device(self) -> str:
        device = self.settings.device
        if device == "auto":
            return "cuda:0" if torch.cuda.is_available() else "cpu"
        return device

    def _publish_model_info(self) -> None:
        model = self.pose_model
        assert model is not None and self.detector is not None
        self.metrics.model_info.info({
            "name": model.name,
            "version": model.version,
            "config": model.config.name,
            "weights_sha256": model.weights_sha256 or "",
            "trained": str(model.trained).lower(),
            "device": str(model.estimator.device),
            "precision": model.estimator.precision,
            "detector": self.detector.name,
        })

    def describe(self) -> dict:
        """What /v1/models and GetModel report."""
        if self.pose_model is None or self.detector is None:
            raise EngineUnavailable("the model is still loading")
        description = self.pose_model.describe()
        description["detector"] = self.detector.name
        description["max_batch_size"] = self.settings.max_batch_size
        return description

    # -- warm-up (on the model threads, before ready) -----------------------------------------
    def _warm_pose(self) -> None:
        """One forward at max batch and one at batch 1, so first requests pay no start-up cost."""
        estimator = self.pose_model.estimator
        height, width = estimator.config.input_size
        for size in (self.settings.max_batch_size, 1):
            estimator.forward(torch.zeros(size, 3, height, width))
        if estimator.device.type == "cuda":
            torch.cuda.synchronize(estimator.device)

    def _warm_detector(self) -> None:
        self.detector.detect_batch([np.zeros(WARMUP_IMAGE_SHAPE, dtype=np.uint8)])

    # -- model threads ------------------------------------------------------------------------
    def _run_pose_batch(self, chunks: Sequence[_Chunk]) -> list[torch.Tensor]:
        """Forward passes for one batch: crops with flip on and off go in separate passes."""
        estimator = self.pose_model.estimator
        outputs: list[torch.Tensor | None] = [None] * len(chunks)
        by_flip: dict[bool, list[int]] = {}
        for index, chunk in enumerate(chunks):
            by_flip.setdefault(bool(chunk.job.key), []).append(index)
        for flip, indices in by_flip.items():
            inputs = torch.cat([chunks[i].job.payload[chunks[i].start:chunks[i].stop]
                                for i in indices])
            self.metrics.batch_size.labels(model="pose").observe(len(inputs))
            heatmaps = estimator.forward(inputs, flip_test=flip).cpu()
            offset = 0
            for i in indices:
                count = chunks[i].stop - chunks[i].start
                outputs[i] = heatmaps[offset:offset + count]
                offset += count
        return outputs

    def _run_detector_batch(self, chunks: Sequence[_Chunk]) -> list[Detections]:
        self.metrics.batch_size.labels(model="detector").observe(len(chunks))
        return self.detector.detect_batch([chunk.job.payload for chunk in chunks])

    # -- admission and deadlines --------------------------------------------------------------
    def deadline_from(self, timeout_s: float | None) -> float:
        """Absolute deadline (time.monotonic) from the client's timeout, capped by settings."""
        if timeout_s is None:
            timeout_s = self.settings.default_deadline_s
        if not math.isfinite(timeout_s) or timeout_s <= 0:
            raise InvalidRequest(f"the request timeout must be a positive number of seconds,"
                                 f" got {timeout_s!r}")
        return time.monotonic() + min(timeout_s, self.settings.max_deadline_s)

    @contextlib.contextmanager
    def _admission(self) -> Iterator[None]:
        if self.state == "starting":
            raise EngineUnavailable("the model is still loading and warming up")
        if self.state != "ready":
            raise EngineUnavailable("the service is shutting down")
        if self._inflight >= self.settings.max_queue_size:
            retry_after = max(1, math.ceil(self._latency_ewma_s))
            raise EngineOverloaded(
                f"the service is at capacity ({self.settings.max_queue_size} requests in"
                f" progress); retry in about {retry_after} s", retry_after_s=retry_after,
            )
        self._inflight += 1
        self._idle.clear()
        self.metrics.inflight.set(self._inflight)
        self.metrics.queue_depth.labels(queue="admission").set(self._inflight)
        started = time.monotonic()
        try:
            yield
        finally:
            self._inflight -= 1
            self.metrics.inflight.set(self._inflight)
            self.metrics.queue_depth.labels(queue="admission").set(self._inflight)
            self._latency_ewma_s = 0.8 * self._latency_ewma_s + 0.2 * (time.monotonic() - started)
            if self._inflight == 0:
                self._idle.set()

    @staticmethod
    async def _within(deadline: float, work: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await work
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed before it was answered") \
                from None

    # -- public API ---------------------------------------------------------------------------
    async def estimate(self, request: ImageRequest, timeout_s: float | None = None) -> ImageResult:
        """Persons in one image. Raises an EngineError subclass for anything but a result."""
        deadline = self.deadline_from(timeout_s)
        request.validate()
        with self._admission():
            return await self._within(deadline, self._process(request, deadline))

    async def estimate_many(self, requests: Sequence[ImageRequest],
                            timeout_s: float | None = None) -> list[ImageResult]:
        """Several images as one admitted request, answered in order; the first error fails all
        (its message names the image by index) and cancels the rest."""
        deadline = self.deadline_from(timeout_s)
        if len(requests) > self.settings.max_images_per_batch:
            raise InvalidRequest(
                f"{len(requests)} images in one batch, over the limit of"
                f" {self.settings.max_images_per_batch}", ErrorCode.PAYLOAD_TOO_LARGE,
            )
        if not requests:
            raise InvalidRequest("the batch contains no images")
        for index, request in enumerate(requests):
            try:
                request.validate()
            except EngineError as exc:
                raise exc.prefixed(f"images[{index}]") from None
        with self._admission():
            return await self._within(deadline, self._process_all(requests, deadline))

    async def _process_all(self, requests: Sequence[ImageRequest],
                           deadline: float) -> list[ImageResult]:
        tasks = [asyncio.create_task(self._process(r, deadline)) for r in requests]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for index, task in enumerate(tasks):
                if task.done() and task.exception() is not None:
                    error = task.exception()
                    if isinstance(error, EngineError):
                        raise error.prefixed(f"images[{index}]") from None
                    raise error
            return [task.result() for task in tasks]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- the pipeline -------------------------------------------------------------------------
    async def _in_pool(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    def _observe(self, timings: dict[str, float], stage: str, seconds: float) -> None:
        timings[stage] = round(seconds * 1000, 3)
        self.metrics.stage_latency.labels(stage=stage).observe(seconds)

    @staticmethod
    def _check_deadline(deadline: float, stage: str) -> None:
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"the request's deadline passed during {stage}")

    def _decode(self, data: bytes) -> np.ndarray:
        try:
            return decode_image(data, self.settings.max_image_bytes, self.settings.max_image_pixels)
        except ImageError as exc:
            code = _IMAGE_ERROR_CODES.get(exc.kind, ErrorCode.INVALID_IMAGE)
            raise InvalidRequest(str(exc), code) from None

    def _prepare(self, image_bgr: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> CropBatch:
        image_rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        return self.pose_model.estimator.prepare(image_rgb, boxes, scores)

    def _decode_poses(self, heatmaps: torch.Tensor, crops: CropBatch,
                      request: ImageRequest) -> list[PersonPose]:
        persons = self.pose_model.estimator.decode(heatmaps, crops)
        persons = [p for p in persons if p.score >= request.min_instance_score]
        persons.sort(key=lambda p: p.score, reverse=True)
        limit = min(request.max_persons or self.settings.max_persons, self.settings.max_persons)
        persons = persons[:limit]
        if request.min_keypoint_score > 0:
            for person in persons:
                low = person.keypoints[:, 2] < request.min_keypoint_score
                person.keypoints = person.keypoints.copy()
                person.keypoints[low] = 0.0
        return persons

    def _render(self, image_bgr: np.ndarray, persons: list[PersonPose], min_score: float) -> bytes:
        return encode_jpeg(draw_poses(image_bgr, persons, self.pose_model.keypoints, min_score))

    async def _detect(self, image: np.ndarray, deadline: float) -> Detections:
        if self.detector.name == "none":
            return Detections.empty()
        job = await self._detector_batcher.submit(image, 1, deadline)
        return job.future.result()

    async def _process(self, request: ImageRequest, deadline: float) -> ImageResult:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        image = await self._in_pool(self._decode, request.data)
        self._observe(timings, "image_decode", time.perf_counter() - started)
        height, width = image.shape[:2]

        if request.boxes is not None:
            boxes = client_boxes(np.asarray(request.boxes).reshape(-1, 4).tolist(), width, height)
            scores = (np.ones(len(boxes)) if request.box_scores is None
                      else np.asarray(request.box_scores, dtype=np.float64))
        else:
            self._check_deadline(deadline, "image decoding")
            mark = time.perf_counter()
            detections = await self._detect(image, deadline)
            self._observe(timings, "detection", time.perf_counter() - mark)
            if len(detections) == 0 and self.settings.whole_image_if_no_person:
                detections = Detections.whole_image(image.shape)
            boxes, scores = detections.boxes, detections.scores
        if len(boxes) > self.settings.max_persons:  # bound the model work one image can cause
            keep = np.argsort(-scores, kind="stable")[:self.settings.max_persons]
            boxes, scores = boxes[keep], scores[keep]

        persons: list[PersonPose] = []
        if len(boxes):
            mark = time.perf_counter()
            crops = await self._in_pool(self._prepare, image, boxes, scores)
            self._observe(timings, "preprocess", time.perf_counter() - mark)
            self._check_deadline(deadline, "preprocessing")
            flip = self.pose_model.estimator.flip_test if request.flip is None else request.flip
            job = await self._pose_batcher.submit(crops.inputs, len(crops), deadline, key=flip)
            self._observe(timings, "queue_wait", (job.first_batch_at or job.enqueued_at)
                          - job.enqueued_at)
            self._observe(timings, "pose_inference", job.compute_s)
            mark = time.perf_counter()
            persons = await self._in_pool(self._decode_poses, job.future.result(), crops, request)
            self._observe(timings, "decode", time.perf_counter() - mark)
        self.metrics.persons_per_image.observe(len(persons))

        rendered = None
        if request.render:
            mark = time.perf_counter()
            min_score = request.min_keypoint_score or RENDER_DEFAULT_MIN_SCORE
            rendered = await self._in_pool(self._render, image, persons, min_score)
            self._observe(timings, "render", time.perf_counter() - mark)
        timings["total"] = round((time.perf_counter() - started) * 1000, 3)
        return ImageResult(width, height, persons, timings, rendered)
