"""One admitted image's way through the engine: the predictor's stages, each where it belongs.

The stages are :class:`omnipose.model.predictor.PosePredictor`'s (persons, crops, network,
decoding, tracking); this module only places them: image decoding, crops, heatmap decoding,
tracking and rendering on the engine's CPU pool, detection and the network on the model threads
(the engine's batchers, which coalesce work across requests), with the request's deadline checked
before each model stage and its pixels released as soon as its crops are cut.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from omnipose.model.crops import CropBatch
from omnipose.model.detection import Detections, PersonDetector
from omnipose.model.persons import filter_poses
from omnipose.model.predictor import PosePredictor
from omnipose.model.render import draw_poses
from omnipose.model.topdown import KEYPOINT_SCORE_THRESHOLD, PersonPose
from omnipose.service.admission import Admission, BudgetLease
from omnipose.service.batcher import Chunk, DynamicBatcher
from omnipose.service.errors import (
    IMAGE_ERROR_CODES,
    SHUTTING_DOWN,
    DeadlineExceeded,
    EngineUnavailable,
    ErrorCode,
    InvalidRequest,
)
from omnipose.service.images import (
    DecodedImage,
    ImageError,
    ImageHeader,
    decode_for_device,
    encode_jpeg,
    read_header,
)
from omnipose.service.loading import LoadedPoseModel
from omnipose.service.metrics import ServiceMetrics
from omnipose.service.requests import ImageRequest, ImageResult, client_detections
from omnipose.service.settings import ServiceSettings
from omnipose.service.startup import jpeg_device
from omnipose.service.tracking import PoseTracker

log = logging.getLogger(__name__)

T = TypeVar("T")


def run_pose_batch(predictor: PosePredictor, metrics: ServiceMetrics,
                   chunks: Sequence[Chunk]) -> list[torch.Tensor]:
    """Forward passes for one batch: crops with flip on and off go in separate passes."""
    outputs: list[torch.Tensor | None] = [None] * len(chunks)
    by_flip: dict[bool, list[int]] = {}
    for index, chunk in enumerate(chunks):
        by_flip.setdefault(bool(chunk.job.key), []).append(index)
    for flip, indices in by_flip.items():
        inputs = torch.cat(
            [chunks[i].job.payload[chunks[i].start : chunks[i].stop] for i in indices]
        )
        metrics.batch_size.labels(model="pose").observe(len(inputs))
        heatmaps = predictor.run(inputs, flip).cpu()
        offset = 0
        for i in indices:
            count = chunks[i].stop - chunks[i].start
            outputs[i] = heatmaps[offset : offset + count]
            offset += count
    return outputs


def run_detector_batch(detector: PersonDetector, metrics: ServiceMetrics,
                       chunks: Sequence[Chunk]) -> list[Detections]:
    """One detector call for all images; a failure is retried image by image (batcher)."""
    metrics.batch_size.labels(model="detector").observe(len(chunks))
    return detector.detect_batch([chunk.job.payload for chunk in chunks])


class ImagePipeline:
    """The stages of one image, on the engine's pool and model threads. ``stopped()`` says
    whether the engine has closed (work its pool drops is then answered UNAVAILABLE)."""

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics, admission: Admission,
                 pose_model: LoadedPoseModel, predictor: PosePredictor,
                 pool: ThreadPoolExecutor, pose_batcher: DynamicBatcher,
                 detector_batcher: DynamicBatcher, stopped: Callable[[], bool]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.admission = admission
        self.pose_model = pose_model
        self.predictor = predictor
        self._pool = pool
        self._pose_batcher = pose_batcher
        self._detector_batcher = detector_batcher
        self._stopped = stopped
        self._jpeg_device = jpeg_device(settings, pose_model.estimator.device)
        # Images admitted whose crops are not queued for the pose model yet: a partial pose batch
        # waits (max_queue_delay_ms) only while some are on their way, not for requests that
        # have not arrived, so a request alone runs at once (see lone_request_waits_for_batch).
        self.images_before_pose = 0

    async def _in_pool(self, function: Callable[..., T], *args: Any) -> T:
        """Run on the CPU pool. Work the pool drops because the engine closed (not because the
        client went away) is answered UNAVAILABLE, not as a cancelled call."""
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._pool, function, *args)
        except RuntimeError:  # submitted after the pool was shut down
            if self._stopped():
                raise EngineUnavailable(SHUTTING_DOWN) from None
            raise
        try:
            return await future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._stopped() and not (task is not None and task.cancelling()):
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

    def _jpeg_fallback(self, error: Exception) -> None:
        self.metrics.jpeg_device_decode_fallbacks.inc()
        log.debug("JPEG decoded by OpenCV: the device decoder refused it (%s)", error)

    def _decode(self, data: bytes, header: ImageHeader) -> DecodedImage:
        try:
            return decode_for_device(data, header, self._jpeg_device, self._jpeg_fallback)
        except ImageError as exc:
            code = IMAGE_ERROR_CODES.get(exc.kind, ErrorCode.INVALID_IMAGE)
            raise InvalidRequest(str(exc), code) from None

    def _decode_and_cut(self, request: ImageRequest, header: ImageHeader
                        ) -> tuple[DecodedImage, Detections, CropBatch | None, float]:
        """Decoding, the client's boxes and their crops in one pool call: one thread hop per
        image instead of two (the latency of a request alone). Also returns when decoding
        ended (perf_counter), so both stages are timed as before."""
        image = self._decode(request.data, header)
        decoded_at = time.perf_counter()
        persons = client_detections(request.boxes, request.box_scores, image.width,
                                    image.height, self.predictor.max_persons)
        crops = self.predictor.prepare(image, persons) if len(persons) else None
        return image, persons, crops, decoded_at

    def _planned_persons(self, request: ImageRequest, width: int, height: int,
                         tracker: PoseTracker | None) -> Detections | None:
        """The client's boxes or the tracker's guided ones; None when the detector must run."""
        if request.boxes is None:
            return self.predictor.plan(width, height, tracker=tracker)
        return client_detections(request.boxes, request.box_scores, width, height,
                                 self.predictor.max_persons)

    def _render(self, image: DecodedImage, persons: list[PersonPose], min_score: float) -> bytes:
        image_bgr = image.host_bgr()  # an image decoded on the device is downloaded here
        return encode_jpeg(draw_poses(image_bgr, persons, self.pose_model.keypoints, min_score))

    async def _detect(self, image: DecodedImage, deadline: float) -> Detections:
        if self.predictor.detector is None or self.predictor.detector.name == "none":
            return Detections.empty()
        # The detector reads host BGR: an image decoded on the device is downloaded (once) here.
        image_bgr = image.host_bgr() if image.on_host else await self._in_pool(image.host_bgr)
        job = await self._detector_batcher.submit(image_bgr, 1, deadline)
        return job.future.result()

    async def process(self, request: ImageRequest, deadline: float, lease: BudgetLease,
                      tracker: PoseTracker | None = None) -> ImageResult:
        """The persons of one admitted image (a frame of ``tracker``'s stream when given)."""
        self.images_before_pose += 1
        on_its_way = True  # until its crops are queued for the pose model (or it has none)

        def reached_pose() -> None:
            nonlocal on_its_way
            if on_its_way:
                on_its_way = False
                self.images_before_pose -= 1

        try:
            return await self._process(request, deadline, lease, tracker, reached_pose)
        finally:
            reached_pose()

    async def _process(self, request: ImageRequest, deadline: float, lease: BudgetLease,
                       tracker: PoseTracker | None, reached_pose: Callable[[], None]
                       ) -> ImageResult:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        # The decoded size is budgeted from the header, before the pixels exist: every image,
        # also each one of a batch, fits max_inflight_pixels before it is decoded.
        header = self._read_header(request.data)
        pixels = header.pixels
        await self.admission.reserve_pixels(lease, pixels)
        crops = persons = None
        try:
            if request.boxes is not None and tracker is None:  # the persons need no model
                image, persons, crops, decoded_at = await self._in_pool(
                    self._decode_and_cut, request, header)
            else:
                image = await self._in_pool(self._decode, request.data, header)
                decoded_at = time.perf_counter()
        except BaseException:
            self.admission.release_pixels(lease, pixels)
            raise
        self._observe(timings, "image_decode", decoded_at - started)
        height, width = image.height, image.width
        if crops is not None:
            self._observe(timings, "preprocess", time.perf_counter() - decoded_at)

        if persons is None:
            persons = self._planned_persons(request, width, height, tracker)
        detector_ran = persons is None
        if persons is None:
            self._check_deadline(deadline, "image decoding")
            mark = time.perf_counter()
            detections = await self._detect(image, deadline)
            self._observe(timings, "detection", time.perf_counter() - mark)
            persons = self.predictor.after_detection(detections, image.shape, tracker)

        if crops is None and len(persons):
            mark = time.perf_counter()
            crops = await self._in_pool(self.predictor.prepare, image, persons)
            self._observe(timings, "preprocess", time.perf_counter() - mark)
        if not request.render:  # from here on only the crops are needed: free the pixels
            image = None
            self.admission.release_pixels(lease, pixels)

        poses: list[PersonPose] = []
        if crops is not None:
            self._check_deadline(deadline, "preprocessing")
            flip = self.pose_model.estimator.flip_test if request.flip is None else request.flip
            reached_pose()
            job = await self._pose_batcher.submit(crops.inputs, len(crops), deadline, key=flip)
            self._observe(
                timings, "queue_wait", (job.first_batch_at or job.enqueued_at) - job.enqueued_at
            )
            self._observe(timings, "pose_inference", job.compute_s)
            mark = time.perf_counter()
            persons = await self._in_pool(self.predictor.decode, job.future.result(), crops)
            if tracker is not None:
                # Its own step, before the client's filters (tracks see every person): a frame
                # cancelled by its deadline while decoding never updates the stream's tracks.
                persons = await self._in_pool(self.predictor.track, tracker, persons,
                                              detector_ran)
            poses = self._filter(persons, request)
            self._observe(timings, "decode", time.perf_counter() - mark)
        else:  # nobody to estimate: a stream's tracks still age and expire
            reached_pose()
            self.predictor.track(tracker, [], detector_ran)
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

    def _filter(self, persons: list[PersonPose], request: ImageRequest) -> list[PersonPose]:
        """The client's filters: instance score, person count, keypoint score (cheap)."""
        limit = min(request.max_persons or self.settings.max_persons, self.settings.max_persons)
        return filter_poses(persons, limit, request.min_instance_score,
                            request.min_keypoint_score, request.min_box_score)
