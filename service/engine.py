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
from typing import Any, TypeVar

import numpy as np
import torch

from omnipose.model.render import draw_poses
from omnipose.model.topdown import KEYPOINT_SCORE_THRESHOLD, CropBatch, PersonPose
from omnipose.service.admission import Admission, BudgetLease
from omnipose.service.batcher import AllCoresRunner, DynamicBatcher, _Chunk
from omnipose.service.detection import Detections, PersonDetector, build_detector
from omnipose.service.errors import (
    IMAGE_ERROR_CODES,
    SHUTTING_DOWN,
    DeadlineExceeded,
    EngineError,
    EngineOverloaded,
    EngineUnavailable,
    ErrorCode,
    InvalidRequest,
    within_deadline,
)
from omnipose.service.images import (
    DecodedImage,
    ImageError,
    ImageHeader,
    decode_for_device,
    decode_jpeg_on_device,
    encode_jpeg,
    read_header,
)
from omnipose.service.loading import LoadedPoseModel, load_pose_model
from omnipose.service.metrics import ServiceMetrics
from omnipose.service.persons import crop_persons, detected_persons
from omnipose.service.requests import ImageRequest, ImageResult, client_detections
from omnipose.service.resources import (
    InstanceLayout,
    LoneBatchRule,
    available_cpus,
    candidate_layouts,
    configured_layout,
    measure_layouts,
    measure_lone_batches,
)
from omnipose.service.settings import ServiceSettings
from omnipose.service.tracking import (
    PoseTracker,
    StreamLimitError,
    StreamRegistry,
    TrackedStream,
    TrackingOptions,
    merge_guided,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

WARMUP_IMAGE_SHAPE = (480, 640, 3)
ANSWERED = "before it was answered"  # where a pipeline deadline passes (DeadlineExceeded)
LAYOUT_PROBE_BATCH = 4  # crops per forward when measuring instance layouts at start-up
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
        self.admission = Admission(settings, self.metrics)
        self.streams = StreamRegistry(settings.max_streams, settings.stream_idle_s)
        self._open_streams = 0  # bidirectional gRPC streams holding a tracker now
        self._pool = ThreadPoolExecutor(settings.cpu_workers, thread_name_prefix="omnipose-cpu")
        self._pose_batcher: DynamicBatcher | None = None
        self.layout: InstanceLayout | None = None  # pose model instances x threads, at start()
        self.lone_batch_rule: LoneBatchRule | None = None  # measured with the layout, on CPU
        self._detector_batcher: DynamicBatcher | None = None

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
            if self.pose_model is None:
                self.pose_model = await loop.run_in_executor(
                    None,
                    lambda: load_pose_model(
                        settings.weights,
                        settings.config,
                        settings.device,
                        settings.precision,
                        settings.flip_test,
                        settings.flip_shift,
                        settings.backend,
                    ),
                )
            if self.detector is None:
                self.detector = await loop.run_in_executor(
                    None,
                    lambda: build_detector(
                        settings.detector,
                        settings.detector_weights,
                        self._detector_device(),
                        settings.detector_min_score,
                    ),
                )
            self.layout = await loop.run_in_executor(None, self._choose_layout)
            if settings.warmup and self._jpeg_device() is not None:
                await loop.run_in_executor(None, self._warm_jpeg_decoder)
            if settings.warmup and self.pose_model.estimator.device.type == "cuda":
                await loop.run_in_executor(None, self._capture_buckets)
            self._publish_model_info()
            queue_depth = self.metrics.queue_depth
            self._pose_batcher = DynamicBatcher(
                "pose",
                self._run_pose_batch,
                lambda parts: torch.cat(parts, dim=0),
                settings.max_batch_size,
                settings.max_queue_delay_ms / 1000,
                on_depth=queue_depth.labels(queue="pose").set,
                on_start=self._start_pose_instance,
                instances=self.layout.instances,
                all_cores=self._all_cores_runner(),
            )
            self._detector_batcher = DynamicBatcher(
                "detector",
                self._run_detector_batch,
                lambda parts: parts[0],
                settings.detector_max_batch_size,
                settings.detector_max_queue_delay_ms / 1000,
                on_depth=queue_depth.labels(queue="detector").set,
                on_start=(lambda index: self._warm_detector()) if settings.warmup else None,
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

    def _detector_device(self) -> str:
        device = self.settings.device
        if device == "auto":
            return "cuda:0" if torch.cuda.is_available() else "cpu"
        return device

    def _publish_model_info(self) -> None:
        model = self.pose_model
        assert model is not None and self.detector is not None
        self.metrics.model_info.info(
            {
                "name": model.name,
                "version": model.version,
                "config": model.config.name,
                "weights_sha256": model.weights_sha256 or "",
                "trained": str(model.trained).lower(),
                "device": str(model.estimator.device),
                "precision": model.estimator.precision,
                "instances": str(self.layout.instances if self.layout else ""),
                "torch_threads": str(self.layout.threads if self.layout else ""),
                "detector": self.detector.name,
            }
        )

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

    # -- model instances and warm-up (on the model threads, before ready) ----------------------
    def _choose_layout(self) -> InstanceLayout:
        """Instances x threads from the settings, else measured on this machine (CPU only).

        Without warm-up (tests, quick starts) nothing is measured: one single-threaded instance
        per usable CPU, which measured fastest on the machines we have tried.
        """
        estimator = self.pose_model.estimator
        cpus = available_cpus()
        layout = configured_layout(self.settings, cpus, estimator.device.type)
        if layout is not None:
            return layout
        candidates = candidate_layouts(cpus)
        if not self.settings.warmup or len(candidates) == 1:
            return candidates[0]
        height, width = estimator.config.input_size
        batch = min(self.settings.max_batch_size, LAYOUT_PROBE_BATCH)
        probe = torch.zeros(batch, 3, height, width)

        def forward() -> int:
            estimator.forward(probe, flip_test=False)
            return batch

        measured = measure_layouts(forward, candidates)
        best = max(measured, key=measured.__getitem__)
        log.info(
            "pose model layout measured on %d CPU(s): %s -> %s",
            cpus,
            ", ".join(f"{layout}: {rate:.1f} crops/s" for layout, rate in measured.items()),
            best,
        )
        if (best.instances > 1 and batch > 1 and self.settings.lone_batch_on_all_cores
                and self.settings.backend == "torch"):  # fmt: skip
            self.lone_batch_rule = measure_lone_batches(
                lambda units: estimator.forward(probe[:units], flip_test=False), best, cpus, batch
            )
            log.info("pose model: lone batches measured: %s", self.lone_batch_rule)
        return best

    def _all_cores_runner(self) -> AllCoresRunner | None:
        """Lone pose batches on every core where the start-up measurement says it is faster and
        the request is the only one admitted."""
        rule = self.lone_batch_rule  # measured only when the setting is on, and for torch only
        if rule is None:  # (ONNX Runtime fixes its threads per session)
            return None
        faster = [units for units in range(1, self.settings.max_batch_size + 1)
                  if rule.all_cores_faster(units)]  # fmt: skip
        log.info("pose model: a lone batch of %s crop(s) runs on every core, others spread",
                 ", ".join(map(str, faster)) or "no")  # fmt: skip
        cores = self.layout.instances * self.layout.threads

        def run_on_all_cores(chunks: Sequence[_Chunk]) -> list[torch.Tensor]:
            torch.set_num_threads(cores)  # this instance thread's own OpenMP team
            try:
                return self._run_pose_batch(chunks)
            finally:
                torch.set_num_threads(self.layout.threads)

        def alone_and_faster(units: int) -> bool:
            # Alone in the service, not only in the queue: with other requests admitted (being
            # decoded, cut or answered) more work is coming, and spread instances serve it better.
            return self.admission.inflight <= 1 and rule.all_cores_faster(units)

        return AllCoresRunner(alone_and_faster, run_on_all_cores)

    def _capture_buckets(self) -> None:
        """On a GPU: every batch-size bucket a batch can need (flip doubles it) captured as a
        CUDA graph before ready, so no request pays for capture or cuDNN autotuning."""
        largest = self.settings.max_batch_size * (2 if self.settings.flip_test else 1)
        largest = max(largest, 2)  # a flipped single crop
        buckets = self.pose_model.estimator.use_buckets(largest)
        log.info("pose model: CUDA graphs captured for batch sizes %s", buckets)

    def _start_pose_instance(self, index: int) -> None:
        """On each pose instance's thread: its own torch thread count, then its warm-up."""
        if self.pose_model.estimator.device.type == "cpu":
            torch.set_num_threads(self.layout.threads)
        if self.settings.warmup:
            self._warm_pose()

    def _warm_pose(self) -> None:
        """One forward at max batch and one at batch 1, so first requests pay no start-up cost."""
        estimator = self.pose_model.estimator
        height, width = estimator.config.input_size
        for size in (self.settings.max_batch_size, 1):
            estimator.forward(torch.zeros(size, 3, height, width))
        if estimator.device.type == "cuda":
            torch.cuda.synchronize(estimator.device)

    def _warm_jpeg_decoder(self) -> None:
        """One small JPEG through the device decoder, so no request pays nvjpeg's set-up. A
        failure does not stop the start: every JPEG it refuses is decoded by OpenCV."""
        data = encode_jpeg(np.zeros((64, 64, 3), dtype=np.uint8))
        try:
            decode_jpeg_on_device(data, read_header(data), self._jpeg_device())
        except Exception as exc:
            log.warning(
                "device JPEG decoder warm-up failed (%s): OpenCV decodes what it refuses", exc
            )

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
            inputs = torch.cat(
                [chunks[i].job.payload[chunks[i].start : chunks[i].stop] for i in indices]
            )
            self.metrics.batch_size.labels(model="pose").observe(len(inputs))
            heatmaps = estimator.forward(inputs, flip_test=flip).cpu()
            offset = 0
            for i in indices:
                count = chunks[i].stop - chunks[i].start
                outputs[i] = heatmaps[offset : offset + count]
                offset += count
        return outputs

    def _run_detector_batch(self, chunks: Sequence[_Chunk]) -> list[Detections]:
        """One detector call for all images; a failure is retried image by image (batcher)."""
        self.metrics.batch_size.labels(model="detector").observe(len(chunks))
        return self.detector.detect_batch([chunk.job.payload for chunk in chunks])

    # -- admission and deadlines --------------------------------------------------------------
    def deadline_from(self, timeout_s: float | None) -> float:
        """Absolute deadline (time.monotonic) from the client's timeout, capped by settings."""
        return self.admission.deadline_from(timeout_s)

    @contextlib.contextmanager
    def _admission(self) -> Iterator[BudgetLease]:
        """Refuse while not ready, else hold a request slot (or refuse: overloaded)."""
        if self.state == "starting":
            raise EngineUnavailable("the model is still loading and warming up")
        if self.state == "failed":
            raise EngineUnavailable(f"the engine failed to start: {self._failure}")
        if self.state != "ready":
            raise EngineUnavailable(SHUTTING_DOWN)
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
    def admit(self) -> contextlib.AbstractContextManager[BudgetLease]:
        """Hold a request slot for the ``with`` block (or refuse: 503 / 429) before the request
        is even read, so a transport can refuse before receiving its bytes; pass the lease to
        :meth:`estimate` or :meth:`estimate_many`."""
        return self._admission()

    async def estimate(self, request: ImageRequest, timeout_s: float | None = None,
                       stream: TrackedStream | None = None,
                       admitted: BudgetLease | None = None,
                       deadline: float | None = None) -> ImageResult:
        """Persons in one image. Raises an EngineError subclass for anything but a result.

        Frames of a video stream (``stream``, from :meth:`open_stream`, or the client's
        ``request.stream_id``) are tracked: one at a time, in the order they arrive.
        ``admitted``: the lease of an :meth:`admit` block the caller already holds.
        ``deadline``: an absolute one (:meth:`deadline_from`) the caller started earlier, e.g.
        at admission, before reading the body; it replaces ``timeout_s``."""
        deadline = self.deadline_from(timeout_s) if deadline is None else deadline
        self._validate(request)
        if admitted is not None:
            return await self._estimate_admitted(request, deadline, stream, admitted)
        with self._admission() as lease:
            return await self._estimate_admitted(request, deadline, stream, lease)

    async def _estimate_admitted(self, request: ImageRequest, deadline: float,
                                 stream: TrackedStream | None,
                                 lease: BudgetLease) -> ImageResult:
        """One admitted image. A client ``stream_id`` is looked up only now, so a refused request
        registers no stream; a tracked frame waits for its stream within its own deadline."""
        if stream is None and request.stream_id is not None:
            try:
                stream = self.streams.acquire(request.stream_id, self.new_stream)
            except StreamLimitError as exc:
                raise EngineOverloaded(str(exc)) from None
            finally:
                self._publish_stream_count()
        try:
            if stream is None:
                return await within_deadline(
                    deadline, self._process(request, deadline, lease), ANSWERED)
            return await within_deadline(
                deadline, self._process_in_stream(request, deadline, lease, stream), ANSWERED)
        finally:
            if request.end_stream and request.stream_id is not None:
                self.streams.release(request.stream_id)
                self._publish_stream_count()

    async def _process_in_stream(self, request: ImageRequest, deadline: float,
                                 lease: BudgetLease, stream: TrackedStream) -> ImageResult:
        """A tracked frame, after the stream's earlier frames (each plans from the last)."""
        async with stream.lock:
            return await self._process(request, deadline, lease, stream.tracker)

    # -- video streams ------------------------------------------------------------------------
    def new_stream(self) -> TrackedStream:
        """Tracking state for one video stream, configured by the service settings."""
        if self.pose_model is None:
            raise EngineUnavailable("the model is still loading and warming up")
        s = self.settings
        options = TrackingOptions(
            detect_every=s.track_detect_every, max_missed=s.track_max_missed,
            smooth=s.track_smooth, min_cutoff=s.one_euro_min_cutoff, beta=s.one_euro_beta,
        )
        sigmas = np.asarray(self.pose_model.keypoints.sigmas)
        return TrackedStream(PoseTracker(sigmas, options))

    @contextlib.contextmanager
    def open_stream(self) -> Iterator[TrackedStream]:
        """A bidirectional stream's tracking state, released when the stream ends or is
        cancelled (leaving the ``with``)."""
        stream = self.new_stream()
        self._open_streams += 1
        self._publish_stream_count()
        try:
            yield stream
        finally:
            self._open_streams -= 1
            self._publish_stream_count()

    @property
    def tracked_streams(self) -> int:
        """Streams holding tracking state: open bidirectional streams and client stream_ids."""
        return self._open_streams + len(self.streams)

    def _publish_stream_count(self) -> None:
        self.metrics.tracked_streams.set(self.tracked_streams)

    async def estimate_many(
        self, requests: Sequence[ImageRequest], timeout_s: float | None = None,
        admitted: BudgetLease | None = None, deadline: float | None = None,
    ) -> list[ImageResult]:
        """Several images as one admitted request, answered in order; the first error fails all
        (its message names the image by index) and cancels the rest. ``admitted`` and
        ``deadline`` as for :meth:`estimate`."""
        deadline = self.deadline_from(timeout_s) if deadline is None else deadline
        if len(requests) > self.settings.max_images_per_batch:
            raise InvalidRequest(
                f"{len(requests)} images in one batch, over the limit of"
                f" {self.settings.max_images_per_batch}",
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
                self._validate(request)
            except EngineError as exc:
                raise exc.prefixed(f"images[{index}]") from None
        if admitted is not None:
            return await within_deadline(
                deadline, self._process_all(requests, deadline, admitted), ANSWERED)
        with self._admission() as lease:
            return await within_deadline(
                deadline, self._process_all(requests, deadline, lease), ANSWERED)

    async def _process_all(
        self, requests: Sequence[ImageRequest], deadline: float, lease: BudgetLease
    ) -> list[ImageResult]:
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

    def _read_header(self, data: bytes) -> ImageHeader:
        settings = self.settings
        try:
            return read_header(data, settings.max_image_bytes, settings.max_image_pixels,
                               settings.exif_orientation)
        except ImageError as exc:
            code = IMAGE_ERROR_CODES.get(exc.kind, ErrorCode.INVALID_IMAGE)
            raise InvalidRequest(str(exc), code) from None

    def _jpeg_device(self) -> torch.device | None:
        """Where JPEGs are decoded (``jpeg_decode``): the pose model's device, or None (OpenCV)."""
        device = self.pose_model.estimator.device
        mode = self.settings.jpeg_decode
        if mode == "device" or (mode == "auto" and device.type == "cuda"):
            return device
        return None

    def _jpeg_fallback(self, error: Exception) -> None:
        self.metrics.jpeg_device_decode_fallbacks.inc()
        log.debug("JPEG decoded by OpenCV: the device decoder refused it (%s)", error)

    def _decode(self, data: bytes, header: ImageHeader) -> DecodedImage:
        try:
            return decode_for_device(data, header, self._jpeg_device(), self._jpeg_fallback)
        except ImageError as exc:
            code = IMAGE_ERROR_CODES.get(exc.kind, ErrorCode.INVALID_IMAGE)
            raise InvalidRequest(str(exc), code) from None

    def _prepare(self, image: DecodedImage, persons: Detections) -> CropBatch:
        return crop_persons(self.pose_model.estimator, image, persons)

    def _client_persons(self, request: ImageRequest, width: int, height: int) -> Detections:
        return client_detections(request.boxes, request.box_scores, width, height,
                                 self.settings.max_persons)

    def _select_persons(self, persons: list[PersonPose],
                        request: ImageRequest) -> list[PersonPose]:
        """The client's filters: instance score, person count, keypoint score (cheap)."""
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

    def _render(self, image: DecodedImage, persons: list[PersonPose], min_score: float) -> bytes:
        image_bgr = image.host_bgr()  # an image decoded on the device is downloaded here
        return encode_jpeg(draw_poses(image_bgr, persons, self.pose_model.keypoints, min_score))

    async def _detect(self, image: DecodedImage, deadline: float) -> Detections:
        if self.detector.name == "none":
            return Detections.empty()
        # The detector reads host BGR: an image decoded on the device is downloaded (once) here.
        image_bgr = image.host_bgr() if image.on_host else await self._in_pool(image.host_bgr)
        job = await self._detector_batcher.submit(image_bgr, 1, deadline)
        return job.future.result()

    async def _process(
        self, request: ImageRequest, deadline: float, lease: BudgetLease,
        tracker: PoseTracker | None = None,
    ) -> ImageResult:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        # The decoded size is budgeted from the header, before the pixels exist: every image,
        # also each one of a batch, fits max_inflight_pixels before it is decoded.
        header = self._read_header(request.data)
        pixels = header.pixels
        await self.admission.reserve_pixels(lease, pixels)
        try:
            image = await self._in_pool(self._decode, request.data, header)
        except BaseException:
            self.admission.release_pixels(lease, pixels)
            raise
        self._observe(timings, "image_decode", time.perf_counter() - started)
        height, width = image.height, image.width

        detector_ran = False
        guided = None if tracker is None or request.boxes is not None else tracker.plan(width,
                                                                                         height)
        if request.boxes is not None:
            persons = self._client_persons(request, width, height)
        elif guided is not None:  # a tracked frame between detector frames: pose-guided boxes
            persons = Detections(*guided).top(self.settings.max_persons)
        else:
            detector_ran = True
            self._check_deadline(deadline, "image decoding")
            mark = time.perf_counter()
            detections = await self._detect(image, deadline)
            self._observe(timings, "detection", time.perf_counter() - mark)
            persons = detected_persons(
                detections,
                image.shape,
                self.settings.max_persons,
                self.settings.whole_image_if_no_person,
            )
            if tracker is not None:  # keep the tracked people the detector missed
                persons = Detections(*merge_guided((persons.boxes, persons.scores),
                                                   tracker.guided_boxes(width, height),
                                                   self.settings.max_persons))

        crops = None
        if len(persons):
            mark = time.perf_counter()
            crops = await self._in_pool(self._prepare, image, persons)
            self._observe(timings, "preprocess", time.perf_counter() - mark)
        if not request.render:  # from here on only the crops are needed: free the pixels
            image = None
            self.admission.release_pixels(lease, pixels)

        poses: list[PersonPose] = []
        if crops is not None:
            self._check_deadline(deadline, "preprocessing")
            flip = self.pose_model.estimator.flip_test if request.flip is None else request.flip
            job = await self._pose_batcher.submit(crops.inputs, len(crops), deadline, key=flip)
            self._observe(
                timings, "queue_wait", (job.first_batch_at or job.enqueued_at) - job.enqueued_at
            )
            self._observe(timings, "pose_inference", job.compute_s)
            mark = time.perf_counter()
            persons = await self._in_pool(self.pose_model.estimator.decode,
                                          job.future.result(), crops)
            if tracker is not None:
                # Its own step, before the client's filters (tracks see every person): a frame
                # cancelled by its deadline while decoding never updates the stream's tracks.
                persons = (await self._in_pool(tracker.update, persons, detector_ran)).persons
            poses = self._select_persons(persons, request)
            self._observe(timings, "decode", time.perf_counter() - mark)
        elif tracker is not None:  # nobody to estimate: tracks still age and expire
            tracker.update([], detector_ran)
        self.metrics.persons_per_image.observe(len(poses))

        rendered = None
        if request.render:
            mark = time.perf_counter()
            min_score = request.min_keypoint_score or KEYPOINT_SCORE_THRESHOLD
            rendered = await self._in_pool(self._render, image, poses, min_score)
            self._observe(timings, "render", time.perf_counter() - mark)
        timings["total"] = round((time.perf_counter() - started) * 1000, 3)
        return ImageResult(width, height, poses, timings, rendered,
                           detector_ran=detector_ran if tracker is not None else None)
