"""The int8 accuracy guard: a quantised network against its fp32 original on held-out persons.

Both networks run through the project's evaluation (:func:`omnipose.training.evaluate.
estimate_records`: the service's crops, runner, DARK decoding, rescoring, OKS-NMS) on the same
held-out images and boxes, one pass per crop (no flip test: averaging a crop with its mirror would
hide part of the quantisation error, so this is the stricter check). Compared:

* COCO OKS AP (pycocotools) of each, which must stay within the threshold of each other;
* where each keypoint lands on the heatmap (DARK-decoded, heatmap pixels) for the very same
  crops: median and 99th percentile of the shift over every joint of every crop;
* the mean confidence bias (int8 minus fp32 peak value), which moves instance scores and thereby
  the order of results and the keypoint-threshold decisions clients make.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omnipose.model.codec import decode_heatmaps
from omnipose.model.configs import ModelConfig
from omnipose.model.int8_artifact import GuardReport, GuardThresholds
from omnipose.model.precision import Precision
from omnipose.model.runners import Runner
from omnipose.training.evaluate import coco_keypoint_eval, coco_results, estimate_records
from omnipose.training.image_sources import ImageSource
from omnipose.training.records import PersonRecords

GUARD_BATCH_SIZE = 16


@dataclass
class HeldOut:
    """Held-out persons (with keypoints, for AP), their images and annotation file."""

    records: PersonRecords
    images: ImageSource
    annotation_file: Path
    description: str

    @property
    def num_images(self) -> int:
        return len(self.records.persons_by_image())


@dataclass
class RecordingRunner:
    """A runner that keeps every batch of heatmaps it returns (on the host), so that two runs
    over the same held-out set can be compared crop by crop without a second pass."""

    inner: Runner
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def backend(self) -> str:
        return self.inner.backend

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def precision(self) -> Precision:
        return self.inner.precision

    def run(self, crops: torch.Tensor) -> torch.Tensor:
        heatmaps = self.inner.run(crops)
        self.outputs.append(heatmaps.detach().float().cpu())
        return heatmaps


def evaluate_runner(runner: Runner, model_config: ModelConfig,
                    held_out: HeldOut) -> tuple[float, torch.Tensor]:
    """COCO AP of ``runner`` on ``held_out`` (no flip test) and all its heatmaps, in order."""
    recording = RecordingRunner(runner)
    outputs, _ = estimate_records(
        recording, model_config, held_out.records, held_out.images, device=runner.device,
        flip_test=False, batch_size=GUARD_BATCH_SIZE, progress=False,
    )
    metrics = coco_keypoint_eval(held_out.annotation_file, coco_results(outputs, held_out.records))
    heatmaps = torch.cat(recording.outputs) if recording.outputs else torch.zeros(0)
    return metrics["AP"], heatmaps


def compare_heatmaps(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
    """Per-keypoint shift (heatmap px) and confidence difference of ``candidate`` against
    ``reference``, heatmaps ``[N, J, h, w]`` of the same crops."""
    if reference.shape != candidate.shape:
        raise ValueError(f"heatmaps of different crops: {tuple(reference.shape)} vs"
                         f" {tuple(candidate.shape)}")
    ref_xy, ref_conf = decode_heatmaps(reference)
    xy, conf = decode_heatmaps(candidate)
    shift = np.linalg.norm(xy.astype(np.float64) - ref_xy, axis=-1).reshape(-1)
    return shift, (conf.astype(np.float64) - ref_conf).reshape(-1)


def measure_guard(fp32: Runner | None, int8: Runner, model_config: ModelConfig,
                  held_out: HeldOut, thresholds: GuardThresholds | None = None,
                  fp32_result: tuple[float, torch.Tensor] | None = None) -> GuardReport:
    """The guard figures of ``int8`` against ``fp32`` on ``held_out``; ``fp32_result`` reuses an
    earlier :func:`evaluate_runner` of the fp32 model on the same set (several candidates, one
    reference), and ``fp32`` may then be None."""
    if fp32_result is None:
        if fp32 is None:
            raise ValueError("measure_guard needs the fp32 runner or its fp32_result")
        fp32_result = evaluate_runner(fp32, model_config, held_out)
    ap_fp32, reference = fp32_result
    ap_int8, candidate = evaluate_runner(int8, model_config, held_out)
    shift, confidence = compare_heatmaps(reference, candidate)
    finite = bool(np.isfinite(shift).all() and np.isfinite(confidence).all())
    return GuardReport(
        ap_fp32=float(ap_fp32),
        ap_int8=float(ap_int8),
        median_shift_px=float(np.median(shift)) if finite and shift.size else float("nan"),
        p99_shift_px=float(np.percentile(shift, 99)) if finite and shift.size else float("nan"),
        confidence_bias=float(confidence.mean()) if finite and shift.size else float("nan"),
        keypoints=int(shift.size),
        images=held_out.num_images,
        held_out=held_out.description,
        thresholds=thresholds or GuardThresholds(),
    )
