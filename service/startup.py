"""What the engine does once, before it reports ready: load the models it was not given,
measure how the pose model spreads over this machine's CPUs, and warm up every model so no
request pays a first-call cost.

* instance layout (instances x threads): from the settings, else measured here on the CPU
  (:func:`choose_layout`); with it, where the service runs torch with several instances, whether a
  lone batch is faster on every core (:class:`omnipose.service.resources.LoneBatchRule`);
* warm-up: CUDA graphs captured for every batch-size bucket on a GPU (:func:`capture_buckets`),
  one forward per pose instance (:func:`warm_pose`), the device JPEG decoder
  (:func:`warm_jpeg_decoder`) and the detector (:func:`warm_detector`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from omnipose.model.detection import PersonDetector, build_detector
from omnipose.model.topdown import TopDownPoseEstimator
from omnipose.service.backend_choice import AutoBackend
from omnipose.service.batcher import AllCoresRunner, Chunk
from omnipose.service.images import decode_jpeg_on_device, encode_jpeg, read_header
from omnipose.service.loading import LoadedPoseModel, load_pose_model
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

log = logging.getLogger(__name__)

WARMUP_IMAGE_SHAPE = (480, 640, 3)
LAYOUT_PROBE_BATCH = 4  # crops per forward when measuring instance layouts at start-up


def load_models(settings: ServiceSettings, pose_model: LoadedPoseModel | None,
                detector: PersonDetector | None) -> tuple[LoadedPoseModel, PersonDetector]:
    """The pose model and the detector the settings name, for whichever was not given."""
    if pose_model is None:
        pose_model = load_pose_model(
            settings.weights,
            settings.config,
            settings.device,
            settings.precision,
            settings.flip_test,
            settings.flip_shift,
            settings.backend,
            settings.model_cache_dir(),
            available_cpus(),
            int8_model=settings.int8_model,
            choose_runner=AutoBackend(settings).runner,
        )
    if detector is None:
        detector = build_detector(
            settings.detector,
            settings.detector_weights,
            detector_device(settings),
            settings.detector_min_score,
        )
    return pose_model, detector


def model_info(model: LoadedPoseModel, detector: PersonDetector,
               layout: InstanceLayout | None) -> dict[str, str]:
    """The model-info metric's labels: what runs, where, and how it is spread; with
    backend=auto, where the choice came from and its table in one line."""
    choice = model.backend_choice
    return {
        "name": model.name,
        "version": model.version,
        "config": model.config.name,
        "weights_sha256": model.weights_sha256 or "",
        "trained": str(model.trained).lower(),
        "device": str(model.estimator.device),
        "precision": model.estimator.precision,
        "backend": model.backend,
        "backend_choice": choice.source if choice else "configured",
        "backend_table": choice.summary() if choice else "",
        "instances": str(layout.instances if layout else ""),
        "torch_threads": str(layout.threads if layout else ""),
        "detector": detector.name,
    }


def detector_device(settings: ServiceSettings) -> str:
    """Where the detector runs: the configured device, ``auto`` resolved."""
    if settings.device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return settings.device


def jpeg_device(settings: ServiceSettings, model_device: torch.device) -> torch.device | None:
    """Where JPEGs are decoded (``jpeg_decode``): the pose model's device, or None (OpenCV)."""
    mode = settings.jpeg_decode
    if mode == "device" or (mode == "auto" and model_device.type == "cuda"):
        return model_device
    return None


# Backends whose thread count follows the calling thread's, so a lone batch can borrow the idle
# instances' cores: torch's OpenMP team; OpenVINO's runner compiles, and ONNX Runtime's opens a
# session, per thread count.
ALL_CORES_BACKENDS = ("torch", "openvino", "onnxruntime")


def choose_layout(settings: ServiceSettings,
                  estimator: TopDownPoseEstimator) -> tuple[InstanceLayout, LoneBatchRule | None]:
    """Instances x threads from the settings, else measured on this machine (CPU only), and the
    lone-batch rule where it was measured (else None).

    Without warm-up (tests, quick starts) nothing is measured: one single-threaded instance
    per usable CPU, which measured fastest on the machines we have tried.
    """
    cpus = available_cpus()
    layout = configured_layout(settings, cpus, estimator.device.type)
    if layout is not None:
        return layout, None
    candidates = candidate_layouts(cpus)
    if not settings.warmup or len(candidates) == 1:
        return candidates[0], None
    height, width = estimator.config.input_size
    batch = min(settings.max_batch_size, LAYOUT_PROBE_BATCH)
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
    rule = None
    if (best.instances > 1 and batch > 1 and settings.lone_batch_on_all_cores
            and estimator.runner.backend in ALL_CORES_BACKENDS):  # fmt: skip
        rule = measure_lone_batches(
            lambda units: estimator.forward(probe[:units], flip_test=False), best, cpus, batch
        )
        log.info("pose model: lone batches measured: %s", rule)
    return best, rule


def all_cores_runner(rule: LoneBatchRule | None, layout: InstanceLayout, max_batch_size: int,
                     run_batch: Callable[[Sequence[Chunk]], list[Any]],
                     inflight: Callable[[], int]) -> AllCoresRunner | None:
    """Lone pose batches on every core where the start-up measurement says it is faster and
    the request is the only one admitted (``inflight() <= 1``)."""
    if rule is None:  # measured only when the setting is on, for ALL_CORES_BACKENDS
        return None
    faster = [units for units in range(1, max_batch_size + 1) if rule.all_cores_faster(units)]
    log.info("pose model: a lone batch of %s crop(s) runs on every core, others spread",
             ", ".join(map(str, faster)) or "no")  # fmt: skip
    cores = layout.instances * layout.threads

    def run_on_all_cores(chunks: Sequence[Chunk]) -> list[Any]:
        torch.set_num_threads(cores)  # this instance thread's own OpenMP team
        try:
            return run_batch(chunks)
        finally:
            torch.set_num_threads(layout.threads)

    def alone_and_faster(units: int) -> bool:
        # Alone in the service, not only in the queue: with other requests admitted (being
        # decoded, cut or answered) more work is coming, and spread instances serve it better.
        return inflight() <= 1 and rule.all_cores_faster(units)

    return AllCoresRunner(alone_and_faster, run_on_all_cores)


def capture_buckets(settings: ServiceSettings, estimator: TopDownPoseEstimator) -> None:
    """On a GPU: every batch-size bucket a batch can need (flip doubles it) captured as a
    CUDA graph before ready, so no request pays for capture or cuDNN autotuning."""
    largest = settings.max_batch_size * (2 if settings.flip_test else 1)
    largest = max(largest, 2)  # a flipped single crop
    buckets = estimator.use_buckets(largest)
    log.info("pose model: CUDA graphs captured for batch sizes %s", buckets)


def start_pose_instance(settings: ServiceSettings, estimator: TopDownPoseEstimator,
                        layout: InstanceLayout) -> None:
    """On each pose instance's thread: its own torch thread count, then its warm-up."""
    if estimator.device.type == "cpu":
        torch.set_num_threads(layout.threads)
    if settings.warmup:
        warm_pose(settings, estimator)


def warm_pose(settings: ServiceSettings, estimator: TopDownPoseEstimator) -> None:
    """One forward at max batch and one at batch 1, so first requests pay no start-up cost."""
    height, width = estimator.config.input_size
    for size in (settings.max_batch_size, 1):
        estimator.forward(torch.zeros(size, 3, height, width))
    if estimator.device.type == "cuda":
        torch.cuda.synchronize(estimator.device)


def warm_jpeg_decoder(device: torch.device) -> None:
    """One small JPEG through the device decoder, so no request pays nvjpeg's set-up. A
    failure does not stop the start: every JPEG it refuses is decoded by OpenCV."""
    data = encode_jpeg(np.zeros((64, 64, 3), dtype=np.uint8))
    try:
        decode_jpeg_on_device(data, read_header(data), device)
    except Exception as exc:
        log.warning(
            "device JPEG decoder warm-up failed (%s): OpenCV decodes what it refuses", exc
        )


def warm_detector(detector: PersonDetector) -> None:
    detector.detect_batch([np.zeros(WARMUP_IMAGE_SHAPE, dtype=np.uint8)])
