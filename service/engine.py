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

Memory is bounded too: besides the request count, the decoded pixels held by admitted requests are
budgeted (``max_inflight_pixels``); an image's pixels are released as soon as its crops are cut.
A failing model call fails only the request whose input made it fail: a failed batch is retried
one request at a time. Unexpected failures reach the client as "internal error (request id
...)"; the details go to the log under that id.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import torch

from model.render import draw_poses
from model.topdown import KEYPOINT_SCORE_THRESHOLD, CropBatch, PersonPose
from service.boxes import BoxError, parse_boxes
from service.detection import Detections, PersonDetector, build_detector
from service.images import ImageError, decode_image, encode_jpeg
from service.loading import LoadedPoseModel, load_pose_model
from service.metrics import ServiceMetrics
from service.persons import client_persons, crop_persons, detected_persons
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

WARMUP_IMAGE_SHAPE = (480, 640, 3)
CGROUP_ROOT = Path("/sys/fs/cgroup")
SHUTTING_DOWN = "the service is shutting down"
NO_DETECTOR = ("this deployment has no person detector: send the person boxes with the request"
               " (boxes), or run the service with whole_image_if_no_person")

# The id of the request being served, set by the transports; it travels into the model threads
# with each job so a failure there is logged under the id the client was given.
REQUEST_ID: ContextVar[str | None] = ContextVar("omnipose_request_id", default=None)
# A client's own request id is used only if it is this tame: it is echoed and logged verbatim.
_TAME_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


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


def new_request_id() -> str:
    """A short random id for correlating a client's answer with the server's log."""
    return uuid.uuid4().hex[:16]


def request_id_from(client_value: str | None) -> str:
    """The id the client sent (so its logs and ours line up) if it is tame, else a new one."""
    if client_value is not None and _TAME_REQUEST_ID.fullmatch(client_value):
        return client_value
    return new_request_id()


def internal_error(what: str, request_id: str | None = None) -> EngineError:
    """Log the exception being handled under a request id; the client gets only the id.

    Exception text can carry file paths, library internals or other clients' data, so it is
    for the log, never for the answer.
    """
    request_id = request_id or REQUEST_ID.get() or new_request_id()
    log.error("%s (request id %s)", what, request_id, exc_info=True)
    return EngineError(f"internal error (request id {request_id})", ErrorCode.INTERNAL)


_IMAGE_ERROR_CODES = {
    "invalid": ErrorCode.INVALID_IMAGE,
    "unsupported": ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    "too_large": ErrorCode.PAYLOAD_TOO_LARGE,
}


# --- requests and results --------------------------------------------------------------------
def client_boxes(value: Any, image_width: int | None = None,
                 image_height: int | None = None) -> np.ndarray:
    """Client boxes (``[[x, y, w, h], ...]``, its JSON text, or an array) as N x 4, or
    InvalidRequest. :func:`service.boxes.parse_boxes` is the one place boxes are checked."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    try:
        return parse_boxes(value, image_width, image_height)
    except BoxError as exc:
        raise InvalidRequest(str(exc)) from None


def _check_unit_interval(name: str, value: Any) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1):
        raise InvalidRequest(f"{name} must be a number in [0, 1], got {value!r}")


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

    def validate(self) -> None:
        """The option checks of every transport (REST's schema and gRPC's messages only type
        them): the one place their ranges are enforced. Boxes are checked by client_boxes."""
        _check_unit_interval("min_keypoint_score", self.min_keypoint_score)
        _check_unit_interval("min_instance_score", self.min_instance_score)
        if self.max_persons is not None and not (
                isinstance(self.max_persons, int) and self.max_persons >= 1):
            raise InvalidRequest(f"max_persons must be at least 1, got {self.max_persons!r}")
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
    request_id: str | None = None  # for the log, if this job's input makes the model fail
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
    If a batch fails, its chunks are run again one at a time, so only the job whose input fails
    is failed (and the rest of it, if it was split, is taken out of the queue).
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
                _resolve, job.future, None, EngineUnavailable(SHUTTING_DOWN)
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
        job = _Job(payload, size, key, deadline, loop, loop.create_future(),
                   request_id=REQUEST_ID.get())
        with self._cond:
            if self._stopping:
                raise EngineUnavailable(SHUTTING_DOWN)
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

    def _fail(self, job: _Job, error: EngineError) -> None:
        """Answer ``job`` with ``error`` and take its units still waiting out of the queue."""
        with self._cond:
            job.done = True
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            self._on_depth(self._pending_units())
        job.loop.call_soon_threadsafe(_resolve, job.future, None, error)

    def _execute(self, chunks: list[_Chunk]) -> None:
        started = time.perf_counter()
        try:
            outputs = self._run_batch(chunks)
        except Exception:  # a failed batch fails only the culprit, never the worker
            if len(chunks) > 1:
                log.warning("%s batch of %d chunks failed; running them one at a time",
                            self.name, len(chunks), exc_info=True)
                for chunk in chunks:
                    if not chunk.job.done:
                        self._execute([chunk])
                return
            job = chunks[0].job
            self._fail(job, internal_error(f"the {self.name} model failed on a request's input",
                                           job.request_id))
            return
        elapsed = time.perf_counter() - started
        for chunk, output in zip(chunks, outputs, strict=True):
            job = chunk.job
            if job.done:  # cancelled or failed meanwhile
                continue
            job.compute_s += elapsed
            job.parts.append(output)
            if chunk.stop == job.size:
                job.done = True
                try:
                    value = self._combine(job.parts)
                except Exception:
                    error = internal_error(f"combining {self.name} results failed",
                                           job.request_id)
                    job.loop.call_soon_threadsafe(_resolve, job.future, None, error)
                    continue
                job.loop.call_soon_threadsafe(_resolve, job.future, value)


# --- the engine ------------------------------------------------------------------------------
def cgroup_cpu_limit(cpu_max: str | None = None, cfs_quota_us: str | None = None,
                     cfs_period_us: str | None = None) -> int | None:
    """Whole CPUs a cgroup CPU quota allows (rounded up), or None when unlimited or unreadable.

    Kubernetes CPU limits become a CFS quota, not a smaller CPU set: the process still sees
    every core of the node, and a thread per core would be throttled. cgroup v2 ``cpu.max`` reads
    "<quota> <period>" or "max <period>"; v1 has ``cpu.cfs_quota_us`` (-1: unlimited) and
    ``cpu.cfs_period_us``.
    """
    if cpu_max is not None:
        fields = cpu_max.split()
        if not fields or fields[0] == "max":
            return None
        quota, period = fields[0], fields[1] if len(fields) > 1 else "100000"
    elif cfs_quota_us is not None and cfs_period_us is not None:
        quota, period = cfs_quota_us.strip(), cfs_period_us.strip()
    else:
        return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


def read_cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> int | None:
    """The CPU quota of this process's cgroup (v2, else v1 controller folders), if any."""
    def read(path: Path) -> str | None:
        try:
            return path.read_text()
        except OSError:
            return None

    cpu_max = read(root / "cpu.max")
    if cpu_max is not None:
        return cgroup_cpu_limit(cpu_max=cpu_max)
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        quota, period = read(folder / "cpu.cfs_quota_us"), read(folder / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return cgroup_cpu_limit(cfs_quota_us=quota, cfs_period_us=period)
    return None


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = read_cgroup_cpu_limit(cgroup_root)
    return min(cpus, quota) if quota else cpus


def configure_threads(settings: ServiceSettings) -> int:
    """Give the pose forward the cores: torch intra-op threads = setting or the usable CPUs.

    OpenCV's own pool is turned off: its work here (decode, warps, HOG) runs on our small pools,
    and a second thread pool of CPU-count size would fight the forward pass for the same cores.
    """
    threads = settings.torch_threads or available_cpus()
    torch.set_num_threads(threads)
    cv2.setNumThreads(1)
    return threads


@dataclass(eq=False)
class _PixelLease:
    """Decoded pixels one admitted request holds against ``max_inflight_pixels``."""

    held: int = 0


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
        self._failure = ""  # why start() failed, for the answers refused afterwards
        self._inflight = 0
        self._inflight_pixels = 0
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

    @property
    def inflight_pixels(self) -> int:
        """Decoded image pixels held by admitted requests (see max_inflight_pixels)."""
        return self._inflight_pixels

    async def start(self) -> None:
        """Load what was not given, start the model threads, warm up, then report ready."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        try:
            if self.pose_model is None:
                self.pose_model = await loop.run_in_executor(None, lambda: load_pose_model(
                    settings.weights, settings.config, settings.device, settings.precision,
                    settings.flip_test, settings.flip_shift,
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
        except asyncio.CancelledError:
            self.state = "draining"  # stopped while loading: a shutdown, not a failure
            raise
        except BaseException as exc:
            self.state = "failed"
            self._failure = str(exc) or type(exc).__name__
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
        """Stop the model threads and the CPU pool; whatever still waits for either is answered
        503 / UNAVAILABLE (shutting down)."""
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
        """One detector call for all images; a failure is retried image by image (batcher)."""
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

    def _retry_after_s(self) -> int:
        return max(1, math.ceil(self._latency_ewma_s))

    @contextlib.contextmanager
    def _admission(self) -> Iterator[_PixelLease]:
        if self.state == "starting":
            raise EngineUnavailable("the model is still loading and warming up")
        if self.state == "failed":
            raise EngineUnavailable(f"the engine failed to start: {self._failure}")
        if self.state != "ready":
            raise EngineUnavailable(SHUTTING_DOWN)
        if self._inflight >= self.settings.max_queue_size:
            retry_after = self._retry_after_s()
            raise EngineOverloaded(
                f"the service is at capacity ({self.settings.max_queue_size} requests in"
                f" progress); retry in about {retry_after} s", retry_after_s=retry_after,
            )
        self._inflight += 1
        self._idle.clear()
        self.metrics.inflight.set(self._inflight)
        self.metrics.queue_depth.labels(queue="admission").set(self._inflight)
        started = time.monotonic()
        lease = _PixelLease()
        try:
            yield lease
        finally:
            self._release_pixels(lease, lease.held)
            self._inflight -= 1
            self.metrics.inflight.set(self._inflight)
            self.metrics.queue_depth.labels(queue="admission").set(self._inflight)
            self._latency_ewma_s = 0.8 * self._latency_ewma_s + 0.2 * (time.monotonic() - started)
            if self._inflight == 0:
                self._idle.set()

    def _hold_pixels(self, lease: _PixelLease, pixels: int) -> None:
        """Count a decoded image against max_inflight_pixels, or refuse the request (429).

        Runs on the event loop (no lock needed). A request alone in the engine is never refused,
        so any image within max_image_pixels, and any batch, can be served when it is quiet.
        """
        budget = self.settings.max_inflight_pixels
        others = self._inflight_pixels - lease.held
        if others > 0 and self._inflight_pixels + pixels > budget:
            retry_after = self._retry_after_s()
            raise EngineOverloaded(
                f"the service is at capacity ({self._inflight_pixels} decoded image pixels in"
                f" progress, the limit is {budget}); retry in about {retry_after} s",
                retry_after_s=retry_after,
            )
        lease.held += pixels
        self._inflight_pixels += pixels
        self.metrics.inflight_pixels.set(self._inflight_pixels)

    def _release_pixels(self, lease: _PixelLease, pixels: int) -> None:
        pixels = min(pixels, lease.held)
        lease.held -= pixels
        self._inflight_pixels -= pixels
        self.metrics.inflight_pixels.set(self._inflight_pixels)

    def _validate(self, request: ImageRequest) -> None:
        """Everything checkable before admission: options, and boxes where nothing detects."""
        request.validate()
        if (request.boxes is None and self.detector is not None and self.detector.name == "none"
                and not self.settings.whole_image_if_no_person):
            raise InvalidRequest(NO_DETECTOR)

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
        self._validate(request)
        with self._admission() as lease:
            return await self._within(deadline, self._process(request, deadline, lease))

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
                self._validate(request)
            except EngineError as exc:
                raise exc.prefixed(f"images[{index}]") from None
        with self._admission() as lease:
            return await self._within(deadline, self._process_all(requests, deadline, lease))

    async def _process_all(self, requests: Sequence[ImageRequest], deadline: float,
                           lease: _PixelLease) -> list[ImageResult]:
        tasks = [asyncio.create_task(self._process(r, deadline, lease)) for r in requests]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for index, task in enumerate(tasks):
                if not task.done():
                    continue
                if task.cancelled():  # nobody but a closing engine cancels these tasks
                    raise EngineUnavailable(SHUTTING_DOWN)
                error = task.exception()
                if error is None:
                    continue
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
        """Run on the CPU pool. Work the pool drops because the engine closed (not because the
        client went away) is answered UNAVAILABLE, not as a cancelled call."""
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._pool, function, *args)
        except RuntimeError:  # submitted after the pool was shut down
            if self.state == "stopped":
                raise EngineUnavailable(SHUTTING_DOWN) from None
            raise
        try:
            return await future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.state == "stopped" and not (task is not None and task.cancelling()):
                raise EngineUnavailable(SHUTTING_DOWN) from None
            raise

    def _observe(self, timings: dict[str, float], stage: str, seconds: float) -> None:
        timings[stage] = round(seconds * 1000, 3)
        self.metrics.stage_latency.labels(stage=stage).observe(seconds)

    @staticmethod
    def _check_deadline(deadline: float, stage: str) -> None:
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"the request's deadline passed during {stage}")

    def _decode(self, data: bytes) -> np.ndarray:
        try:
            return decode_image(data, self.settings.max_image_bytes, self.settings.max_image_pixels,
                                self.settings.exif_orientation)
        except ImageError as exc:
            code = _IMAGE_ERROR_CODES.get(exc.kind, ErrorCode.INVALID_IMAGE)
            raise InvalidRequest(str(exc), code) from None

    def _prepare(self, image_bgr: np.ndarray, persons: Detections) -> CropBatch:
        return crop_persons(self.pose_model.estimator, image_bgr, persons)

    def _client_persons(self, request: ImageRequest, width: int, height: int) -> Detections:
        boxes = client_boxes(request.boxes, width, height)
        try:
            return client_persons(boxes, request.box_scores, self.settings.max_persons)
        except BoxError as exc:
            raise InvalidRequest(str(exc)) from None

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

    async def _process(self, request: ImageRequest, deadline: float,
                       lease: _PixelLease) -> ImageResult:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        image = await self._in_pool(self._decode, request.data)
        self._observe(timings, "image_decode", time.perf_counter() - started)
        height, width = image.shape[:2]
        pixels = height * width
        self._hold_pixels(lease, pixels)

        if request.boxes is not None:
            persons = self._client_persons(request, width, height)
        else:
            self._check_deadline(deadline, "image decoding")
            mark = time.perf_counter()
            detections = await self._detect(image, deadline)
            self._observe(timings, "detection", time.perf_counter() - mark)
            persons = detected_persons(detections, image.shape, self.settings.max_persons,
                                       self.settings.whole_image_if_no_person)

        crops = None
        if len(persons):
            mark = time.perf_counter()
            crops = await self._in_pool(self._prepare, image, persons)
            self._observe(timings, "preprocess", time.perf_counter() - mark)
        if not request.render:  # from here on only the crops are needed: free the pixels
            image = None
            self._release_pixels(lease, pixels)

        poses: list[PersonPose] = []
        if crops is not None:
            self._check_deadline(deadline, "preprocessing")
            flip = self.pose_model.estimator.flip_test if request.flip is None else request.flip
            job = await self._pose_batcher.submit(crops.inputs, len(crops), deadline, key=flip)
            self._observe(timings, "queue_wait", (job.first_batch_at or job.enqueued_at)
                          - job.enqueued_at)
            self._observe(timings, "pose_inference", job.compute_s)
            mark = time.perf_counter()
            poses = await self._in_pool(self._decode_poses, job.future.result(), crops, request)
            self._observe(timings, "decode", time.perf_counter() - mark)
        self.metrics.persons_per_image.observe(len(poses))

        rendered = None
        if request.render:
            mark = time.perf_counter()
            min_score = request.min_keypoint_score or KEYPOINT_SCORE_THRESHOLD
            rendered = await self._in_pool(self._render, image, poses, min_score)
            self._observe(timings, "render", time.perf_counter() - mark)
        timings["total"] = round((time.perf_counter() - started) * 1000, 3)
        return ImageResult(width, height, poses, timings, rendered)
