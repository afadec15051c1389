"""The pose engine: one dynamically batched pipeline behind both transports.

A request's image flows through stages that each run where they belong:

* image decoding, crop preparation, heatmap decoding and rendering run on a small CPU thread pool
  (``cpu_workers``), never on a model thread; a JPEG may be decoded on the pose model's device
  (``jpeg_decode``: by default on CUDA), and then stays there unless the detector or rendering
  needs it on the host (:class:`omnipose.service.images.DecodedImage`);
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
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePath

import numpy as np
import torch

from omnipose.model.detection import Detections, PersonDetector
from omnipose.model.predictor import PosePredictor
from omnipose.service import startup
from omnipose.service.admission import Admission, BudgetLease
from omnipose.service.batcher import Chunk, DynamicBatcher
from omnipose.service.errors import (
    SHUTTING_DOWN,
    DeadlineExceeded,
    EngineError,
    EngineUnavailable,
    ErrorCode,
    InvalidRequest,
    within_deadline,
)
from omnipose.service.loading import LoadedPoseModel
from omnipose.service.metrics import ServiceMetrics
from omnipose.service.pipeline import ImagePipeline, run_detector_batch, run_pose_batch
from omnipose.service.requests import ImageRequest, ImageResult
from omnipose.service.resources import InstanceLayout, LoneBatchRule
from omnipose.service.settings import ServiceSettings
from omnipose.service.streams import StreamSessions
from omnipose.service.tracking import TrackedStream

log = logging.getLogger(__name__)

ANSWERED = "before it was answered"  # where a pipeline deadline passes (DeadlineExceeded)
NO_DETECTOR = (
    "this deployment has no person detector: send the person boxes with the request"
    " (boxes), or run the service with whole_image_if_no_person"
)


# Checkpoint metadata that describes how the weights were made, not what they serve: the training
# recipe names data locations, hosts and schedules. Clients get the model's identity (name and
# weights checksum) instead.
PRIVATE_METADATA_KEYS = frozenset({"training", "recipe", "args", "optimizer", "data"})


def public_description(description: dict) -> dict:
    """A model description fit for any client: no server file paths, no training recipe."""
    public = {key: value for key, value in description.items() if key != "weights_path"}
    public["metadata"] = {
        key: value for key, value in description.get("metadata", {}).items()
        if key not in PRIVATE_METADATA_KEYS
        and not (isinstance(value, str) and PurePath(value).is_absolute())
    }
    return public


def check_batch(requests: Sequence[ImageRequest], max_images: int,
                validate: Callable[[ImageRequest], None]) -> None:
    """Refuse a batch of images before admission: too many or none, stream frames or renders
    (one image only), or any image ``validate`` refuses (named by its index)."""
    if len(requests) > max_images:
        raise InvalidRequest(
            f"{len(requests)} images in one batch, over the limit of {max_images}",
            ErrorCode.PAYLOAD_TOO_LARGE,
        )
    if not requests:
        raise InvalidRequest("the batch contains no images")
    for index, request in enumerate(requests):
        if request.stream_id is not None:
            raise InvalidRequest(
                f"images[{index}]: stream_id is for one frame per request (Estimate, POST"
                " /v1/pose) or the StreamEstimate stream, not for batches"
            )
        if request.render:  # a rendered image holds its pixels until the whole batch ends
            raise InvalidRequest(
                f"images[{index}]: render is only available for one image (Estimate, POST"
                " /v1/pose), not for batches"
            )
        try:
            validate(request)
        except EngineError as exc:
            raise exc.prefixed(f"images[{index}]") from None


class PoseEngine:
    """Decode -> detect -> crop -> batched pose forward -> decode, shared by REST and gRPC.

    The engine orchestrates: start-up (:mod:`omnipose.service.startup`), admission and
    deadlines, the model threads (batchers), and streams (:mod:`omnipose.service.streams`); the
    stages of an image are the predictor's, placed by :mod:`omnipose.service.pipeline`."""

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
        self.predictor: PosePredictor | None = None  # the pipeline's units, once loaded
        if pose_model is not None:
            self._build_predictor()
        self.state = "starting"  # starting -> ready -> draining -> stopped (or failed)
        self._failure = ""  # why start() failed, for the answers refused afterwards
        self.admission = Admission(settings, self.metrics)
        self.stream_sessions = StreamSessions(settings, self.metrics, self._keypoint_sigmas)
        self.streams = self.stream_sessions.registry  # client stream_ids
        self._pool = ThreadPoolExecutor(settings.cpu_workers, thread_name_prefix="omnipose-cpu")
        self._pose_batcher: DynamicBatcher | None = None
        self.layout: InstanceLayout | None = None  # pose model instances x threads, at start()
        self.lone_batch_rule: LoneBatchRule | None = None  # measured with the layout, on CPU
        self._detector_batcher: DynamicBatcher | None = None
        self._pipeline: ImagePipeline | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    @property
    def inflight_pixels(self) -> int:
        """Decoded image pixels held by admitted requests (see max_inflight_pixels)."""
        return self.admission.inflight_pixels

    async def start(self) -> None:
        """Load what was not given, start the model threads, warm up, then report ready."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        try:
            if self.pose_model is None or self.detector is None:
                self.pose_model, self.detector = await loop.run_in_executor(
                    None, startup.load_models, settings, self.pose_model, self.detector)
            estimator = self.pose_model.estimator
            self.layout, measured_rule = await loop.run_in_executor(
                None, startup.choose_layout, settings, estimator)
            self.lone_batch_rule = measured_rule or self.lone_batch_rule
            jpeg_device = startup.jpeg_device(settings, estimator.device)
            if settings.warmup and jpeg_device is not None:
                await loop.run_in_executor(None, startup.warm_jpeg_decoder, jpeg_device)
            if settings.warmup and estimator.device.type == "cuda":
                await loop.run_in_executor(None, startup.capture_buckets, settings, estimator)
            self.metrics.model_info.info(
                startup.model_info(self.pose_model, self.detector, self.layout))
            self._build_predictor()
            self._start_batchers()
            self._pipeline = ImagePipeline(
                settings, self.metrics, self.admission, self.pose_model, self.predictor,
                self._pool, self._pose_batcher, self._detector_batcher,
                lambda: self.state == "stopped",
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
        log.info(
            "engine ready: %s on %s (%s), detector %s",
            self.pose_model.name,
            self.pose_model.estimator.device,
            self.layout,
            self.detector.name,
        )

    def _build_predictor(self) -> None:
        self.predictor = PosePredictor(self.pose_model.estimator, self.detector,
                                       self.settings.max_persons,
                                       self.settings.whole_image_if_no_person)

    def _start_batchers(self) -> None:
        """The model threads: pose instances (as the layout says) and one detector thread."""
        settings, estimator = self.settings, self.pose_model.estimator
        queue_depth = self.metrics.queue_depth
        all_cores = startup.all_cores_runner(
            self.lone_batch_rule, self.layout, settings.max_batch_size, self._run_pose_batch,
            lambda: self.admission.inflight,
        )
        self._pose_batcher = DynamicBatcher(
            "pose",
            self._run_pose_batch,
            lambda parts: torch.cat(parts, dim=0),
            settings.max_batch_size,
            settings.max_queue_delay_ms / 1000,
            on_depth=queue_depth.labels(queue="pose").set,
            on_start=lambda index: startup.start_pose_instance(settings, estimator, self.layout),
            instances=self.layout.instances,
            all_cores=all_cores,
            more_expected=(lambda: True) if settings.lone_request_waits_for_batch
            else self._images_before_pose,
        )
        detector = self.detector
        self._detector_batcher = DynamicBatcher(
            "detector",
            self._run_detector_batch,
            lambda parts: parts[0],
            settings.detector_max_batch_size,
            settings.detector_max_queue_delay_ms / 1000,
            on_depth=queue_depth.labels(queue="detector").set,
            on_start=(lambda index: startup.warm_detector(detector)) if settings.warmup else None,
        )

    def _images_before_pose(self) -> bool:
        """Whether admitted images are still on their way to the pose batcher (decoding,
        detection, cropping): only then does a partial pose batch wait for more (unless
        lone_request_waits_for_batch makes every partial batch wait)."""
        return self._pipeline is not None and self._pipeline.images_before_pose > 0

    def begin_drain(self) -> None:
        """Refuse new requests (503 / UNAVAILABLE); admitted ones still finish."""
        if self.state in ("starting", "ready"):
            self.state = "draining"

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every admitted request is answered; False if ``timeout`` ran out first."""
        return await self.admission.wait_idle(timeout)

    async def close(self) -> None:
        """Stop the model threads and the CPU pool; whatever still waits for either is answered
        503 / UNAVAILABLE (shutting down)."""
        self.state = "stopped"
        loop = asyncio.get_running_loop()
        for batcher in (self._pose_batcher, self._detector_batcher):
            if batcher is not None:
                await loop.run_in_executor(None, batcher.stop)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict:
        """What /v1/models and GetModel report."""
        if self.pose_model is None or self.detector is None:
            raise EngineUnavailable("the model is still loading")
        description = public_description(self.pose_model.describe())
        description["detector"] = self.detector.name
        description["max_batch_size"] = self.settings.max_batch_size
        if self.layout is not None:
            description["model_instances"] = self.layout.instances
            description["torch_threads"] = self.layout.threads
        return description

    # -- model threads ------------------------------------------------------------------------
    def _run_pose_batch(self, chunks: Sequence[Chunk]) -> list[torch.Tensor]:
        """Forward passes for one batch: crops with flip on and off go in separate passes."""
        return run_pose_batch(self.predictor, self.metrics, chunks)

    def _run_detector_batch(self, chunks: Sequence[Chunk]) -> list[Detections]:
        """One detector call for all images; a failure is retried image by image (batcher)."""
        return run_detector_batch(self.detector, self.metrics, chunks)

    # -- admission and deadlines --------------------------------------------------------------
    def deadline_from(self, timeout_s: float | None) -> float:
        """Absolute deadline (time.monotonic) from the client's timeout, capped by settings."""
        return self.admission.deadline_from(timeout_s)

    def check_admissible(self) -> None:
        """Raise what :meth:`admit` would raise now (503 not ready or draining, 429 queue full)
        without holding anything: a transport calls it before receiving a request's bytes, and
        admits once they are in, so an upload never holds an engine slot."""
        if self.state == "starting":
            raise EngineUnavailable("the model is still loading and warming up")
        if self.state == "failed":
            raise EngineUnavailable(f"the engine failed to start: {self._failure}")
        if self.state != "ready":
            raise EngineUnavailable(SHUTTING_DOWN)
        self.admission.check_capacity()

    @contextlib.contextmanager
    def _admission(self) -> Iterator[BudgetLease]:
        """Refuse while not ready, else hold a request slot (or refuse: overloaded)."""
        self.check_admissible()
        with self.admission.admit() as lease:
            yield lease

    def _validate(self, request: ImageRequest) -> None:
        """Everything checkable before admission: options, and boxes where nothing detects."""
        request.check()
        if (
            request.boxes is None
            and self.detector is not None
            and self.detector.name == "none"
            and not self.settings.whole_image_if_no_person
        ):
            raise InvalidRequest(NO_DETECTOR)

    # -- public API ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def admit(self, timeout_s: float | None = None, *,
              deadline: float | None = None) -> Iterator[Admitted]:
        """The one way work enters the engine: a request slot held for the ``with`` block (or a
        refusal: 503 / 429) and the request's deadline, started now, or the absolute
        ``deadline`` of a request whose clock started earlier (on arrival, before its body was
        received: see :meth:`check_admissible`)."""
        if deadline is None:
            deadline = self.deadline_from(timeout_s)
        elif deadline <= time.monotonic():
            raise DeadlineExceeded("the request's deadline passed while its body was received")
        with self._admission() as lease:
            yield Admitted(self, lease, deadline)

    async def estimate(self, request: ImageRequest, timeout_s: float | None = None,
                       stream: TrackedStream | None = None) -> ImageResult:
        """Persons in one image (checked, admitted, estimated); see :meth:`Admitted.estimate`.
        An invalid request is refused before it takes a slot."""
        self._validate(request)
        with self.admit(timeout_s) as admitted:
            return await admitted.estimate_checked(request, stream)

    async def estimate_many(self, requests: Sequence[ImageRequest],
                            timeout_s: float | None = None) -> list[ImageResult]:
        """Several images as one request; see :meth:`Admitted.estimate_many`."""
        check_batch(requests, self.settings.max_images_per_batch, self._validate)
        with self.admit(timeout_s) as admitted:
            return await admitted.estimate_many_checked(requests)

    # -- video streams ------------------------------------------------------------------------
    def _keypoint_sigmas(self) -> np.ndarray:
        if self.pose_model is None:
            raise EngineUnavailable("the model is still loading and warming up")
        return np.asarray(self.pose_model.keypoints.sigmas)

    def new_stream(self) -> TrackedStream:
        """Tracking state for one video stream, configured by the service settings."""
        return self.stream_sessions.new()

    def open_stream(self) -> contextlib.AbstractContextManager[TrackedStream]:
        """A bidirectional stream's tracking state, released when the stream ends or is
        cancelled (leaving the ``with``)."""
        return self.stream_sessions.open()

    @property
    def tracked_streams(self) -> int:
        """Streams holding tracking state: open bidirectional streams and client stream_ids."""
        return self.stream_sessions.count


class Admitted:
    """An admitted request: its slot (``lease``, also holding its pixel budget) and its absolute
    ``deadline``. Everything an admitted request asks of the engine goes through here."""

    def __init__(self, engine: PoseEngine, lease: BudgetLease, deadline: float) -> None:
        self.engine = engine
        self.lease = lease
        self.deadline = deadline

    async def estimate(self, request: ImageRequest,
                       stream: TrackedStream | None = None) -> ImageResult:
        """Persons in one image. Raises an EngineError subclass for anything but a result.

        Frames of a video stream (``stream``, from :meth:`PoseEngine.open_stream`, or the
        client's ``request.stream_id``) are tracked: one at a time, in the order they arrive. A
        client ``stream_id`` is looked up only now, so a refused request registers no stream; a
        tracked frame waits for its stream within its own deadline."""
        self.engine._validate(request)
        return await self.estimate_checked(request, stream)

    async def estimate_checked(self, request: ImageRequest,
                               stream: TrackedStream | None = None) -> ImageResult:
        """:meth:`estimate` of a request already validated (:meth:`PoseEngine.estimate` checks
        before admission, so an invalid request never takes a slot)."""
        engine = self.engine
        if stream is None and request.stream_id is not None:
            stream = engine.stream_sessions.acquire(request.stream_id)
        try:
            if stream is None:
                work = engine._pipeline.process(request, self.deadline, self.lease)
            else:
                work = self._process_in_stream(request, stream)
            return await within_deadline(self.deadline, work, ANSWERED)
        finally:
            if request.end_stream and request.stream_id is not None:
                engine.stream_sessions.release(request.stream_id)

    async def _process_in_stream(self, request: ImageRequest,
                                 stream: TrackedStream) -> ImageResult:
        """A tracked frame, after the stream's earlier frames (each plans from the last)."""
        async with stream.lock:
            return await self.engine._pipeline.process(request, self.deadline, self.lease,
                                                       stream.tracker)

    async def estimate_many(self, requests: Sequence[ImageRequest]) -> list[ImageResult]:
        """Several images as one request, answered in order; the first error fails all (its
        message names the image by index) and cancels the rest."""
        engine = self.engine
        check_batch(requests, engine.settings.max_images_per_batch, engine._validate)
        return await self.estimate_many_checked(requests)

    async def estimate_many_checked(self, requests: Sequence[ImageRequest]) -> list[ImageResult]:
        """:meth:`estimate_many` of requests already checked as a batch."""
        return await within_deadline(self.deadline, self._process_all(requests), ANSWERED)

    async def _process_all(self, requests: Sequence[ImageRequest]) -> list[ImageResult]:
        process = self.engine._pipeline.process
        tasks = [asyncio.create_task(process(r, self.deadline, self.lease)) for r in requests]
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
