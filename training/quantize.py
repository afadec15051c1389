"""``omnipose quantize``: guarded int8 for OpenVINO (NNCF post-training quantisation).

1. The loaded weights become an OpenVINO model (through the project's ONNX export, whose node
   names are the torch module paths, so layers can be named for fp32 fallbacks).
2. Calibration crops are cut by the service's own pipeline (:meth:`omnipose.model.predictor.
   PosePredictor.prepare`: box -> centre/scale -> warp -> normalise) from a COCO-format folder
   (images + annotations JSON with person boxes) or from the synthetic generator.
3. NNCF quantises with ``overflow_fix=ENABLE``: weights use 7 of their 8 bits, so the int8
   products cannot saturate the 16-bit intermediate of AVX2/AVX-512 without VNNI, and the model
   computes the same on VNNI and non-VNNI CPUs (without it, AVX2 outputs drift: issue #20).
4. The guard (:mod:`omnipose.training.int8_guard`) compares int8 with fp32, both in OpenVINO on
   the same held-out crops. A failure tries the next step of :data:`LADDER` (each keeps what the
   previous tried): min/max activation ranges, sensitive layers left fp32 (stem, WASP head with
   the final heatmap conv), full bias correction, no bias correction. The
   first passing model is written (:func:`omnipose.model.int8_artifact.write_int8_artifact`);
   if none passes nothing usable is written, only ``OUT.rejected.json`` with every attempt's
   figures, so the failure can be inspected and never mistaken for a model.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import omnipose.model as model_package
from omnipose.model.checkpoint import load_model
from omnipose.model.configs import ModelConfig
from omnipose.model.detection import Detections
from omnipose.model.int8_artifact import GuardReport, GuardThresholds, write_int8_artifact
from omnipose.model.openvino_runtime import convert_network, import_openvino
from omnipose.model.predictor import PosePredictor
from omnipose.model.runners import Runner
from omnipose.model.topdown import TopDownPoseEstimator
from omnipose.training.image_sources import open_image_source
from omnipose.training.int8_guard import HeldOut, evaluate_runner, measure_guard
from omnipose.training.records import DataError, clean_coco_box, load_coco_records

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT = Path(model_package.__file__).resolve().parent / "weights" / "default.pt"
# The model card's splits: calibration from the training split's generator, the guard on the
# held-out test split (never seen in training or selection).
SYNTH_CALIBRATION_SEED = 1
SYNTH_HELD_OUT_SEED = 20261126
# Layers that int8 hurts most in a heatmap network: the stem (raw pixels), the WASP head
# (atrous branches summed into the heatmap features) and the final 1x1 heatmap conv.
SENSITIVE_LAYERS = (r"^/conv1/", r"^/conv2/", r"^/waspv2/")
QUANTISED_TYPES = ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData")


@dataclass(frozen=True)
class QuantizerSettings:
    """One NNCF configuration (recorded in the artifact's sidecar)."""

    name: str
    preset: str = "performance"  # performance: symmetric activations; mixed: asymmetric
    activations_range: str = "default"  # NNCF's default, or a RangeEstimatorParametersSet name
    fp32_patterns: tuple[str, ...] = ()  # regexes of ONNX node names kept in fp32
    fast_bias_correction: bool = True
    bias_correction: bool = True
    overflow_fix: str = "enable"  # NNCF OverflowFix: enable | first_layer_only | disable

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fp32_patterns": list(self.fp32_patterns)}


_BASE = QuantizerSettings("default")
_MINMAX = replace(_BASE, name="minmax-ranges", activations_range="MINMAX")
_SENSITIVE = replace(_MINMAX, name="sensitive-layers-fp32", fp32_patterns=SENSITIVE_LAYERS)
# In order (each keeps what the one before tried). On the embedded default, NNCF's default
# activation ranges clip the heatmap peaks (confidence bias -0.05, p99 shift 1.1 px on 77 held-out
# images) while min/max ranges keep them; asymmetric activations (preset mixed) were worse.
LADDER: tuple[QuantizerSettings, ...] = (
    _BASE,
    _MINMAX,
    _SENSITIVE,
    replace(_SENSITIVE, name="full-bias-correction", fast_bias_correction=False),
    replace(_SENSITIVE, name="no-bias-correction", bias_correction=False),
)
# What the shipped default's artifact was made with (model/weights/MODEL_CARD.md).
SHIPPED_SETTINGS = _SENSITIVE


# --- person crops -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropSource:
    """COCO-format persons: ``images`` folder + ``annotations`` JSON, or (``images`` None) a
    synthetic split rendered with ``seed`` (``count`` images) by :mod:`omnipose.training.synth`."""

    images: Path | None = None
    annotations: Path | None = None
    seed: int = SYNTH_CALIBRATION_SEED
    count: int = 300

    def describe(self) -> str:
        if self.images is None:
            return f"synthetic (omnipose synth --seed {self.seed}, {self.count} images)"
        name = self.annotations.name if self.annotations else "?"
        return f"COCO-format folder {self.images.name} ({name})"  # no server paths

    def materialise(self, workdir: Path, split: str) -> tuple[Path, Path]:
        """(image folder, annotation file): the given ones, or rendered into ``workdir``."""
        if self.images is not None:
            if self.annotations is None or not self.annotations.is_file():
                raise DataError(f"annotation file {self.annotations} not found")
            return self.images, self.annotations
        from omnipose.training.synth import generate_dataset

        annotations = generate_dataset(workdir / split, self.count, seed=self.seed, split=split,
                                       workers=1, progress=False)
        return workdir / split / "images" / split, annotations


def _boxes_by_image(annotation_file: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(file name, person boxes x y w h) per image of a COCO-format file: every non-crowd
    person box, cleaned as published (keypoints are not needed to calibrate)."""
    data = json.loads(annotation_file.read_text())
    try:
        images = {image["id"]: image for image in data["images"]}
        boxes: dict[int, list[list[float]]] = {}
        for annotation in data["annotations"]:
            image = images[annotation["image_id"]]
            box = clean_coco_box(annotation["bbox"], annotation.get("area", 1.0),
                                 image["width"], image["height"])
            if box is not None and not annotation.get("iscrowd", 0):
                boxes.setdefault(annotation["image_id"], []).append(box)
    except (KeyError, TypeError) as error:
        raise DataError(f"annotation file {annotation_file}: malformed ({error!r})") from None
    for image_id in sorted(boxes):
        yield images[image_id]["file_name"], np.asarray(boxes[image_id], dtype=np.float64)


def calibration_crops(network: nn.Module, model_config: ModelConfig, image_dir: Path,
                      annotation_file: Path, limit: int) -> torch.Tensor:
    """Up to ``limit`` network inputs ``[N, 3, H, W]``, cut exactly as the service cuts them."""
    predictor = PosePredictor(TopDownPoseEstimator(network, model_config, device="cpu"))
    images = open_image_source(image_dir)
    crops: list[torch.Tensor] = []
    taken = 0
    for file_name, boxes in _boxes_by_image(annotation_file):
        if taken >= limit:
            break
        image = images.read_rgb(file_name)
        batch = predictor.prepare(image, Detections(boxes, np.ones(len(boxes))), channels="rgb")
        crops.append(batch.inputs[: limit - taken])
        taken += len(crops[-1])
    if not taken:
        raise DataError(f"no person boxes to calibrate on in {annotation_file}")
    return torch.cat(crops)


def held_out_set(model_config: ModelConfig, image_dir: str | Path, annotation_file: str | Path,
                 description: str) -> HeldOut:
    """The persons (with keypoints, for AP) the guard is measured on."""
    image_dir, annotation_file = Path(image_dir), Path(annotation_file)
    records = load_coco_records(annotation_file, model_config)
    if not len(records):
        raise DataError(f"no persons with keypoints in {annotation_file} to check the guard on")
    return HeldOut(records, open_image_source(image_dir), annotation_file, description)


# --- OpenVINO + NNCF ----------------------------------------------------------------------------


def quantize_openvino(ov_model: Any, crops: torch.Tensor, settings: QuantizerSettings) -> Any:
    """NNCF post-training quantisation of ``ov_model`` calibrated on ``crops`` (batch 1 each)."""
    import_openvino()  # before nncf imports it: usage telemetry declined
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    advanced = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix(settings.overflow_fix),
        disable_bias_correction=not settings.bias_correction,
    )
    if settings.activations_range != "default":
        advanced.activations_range_estimator_params = getattr(
            RangeEstimatorParametersSet, settings.activations_range)
    ignored = (nncf.IgnoredScope(patterns=list(settings.fp32_patterns), validate=False)
               if settings.fp32_patterns else None)
    samples = [crop[None].numpy() for crop in crops]
    return nncf.quantize(
        ov_model.clone(), nncf.Dataset(samples), preset=nncf.QuantizationPreset(settings.preset),
        subset_size=len(samples), fast_bias_correction=settings.fast_bias_correction,
        ignored_scope=ignored, advanced_parameters=advanced,
    )


def fp32_layers(quantised: Any) -> list[str]:
    """Weighted layers of ``quantised`` whose activation input is not quantised (they run fp32)."""
    kept = []
    for op in quantised.get_ordered_ops():
        if op.get_type_name() not in QUANTISED_TYPES:
            continue
        source = op.input_value(0).get_node()
        if source.get_type_name() != "FakeQuantize":
            kept.append(re.sub(r"/WithoutBiases$", "", op.get_friendly_name()))
    return kept


RunnerFactory = Callable[[Any, str], Runner]  # (openvino.Model, "fp32" | "int8") -> runner


def openvino_runner(ov_model: Any, precision: str) -> Runner:
    """The service's OpenVINO runner (explicit precision, never an implicit hint)."""
    from omnipose.model.openvino_runtime import OpenVinoRunner

    return OpenVinoRunner(ov_model, precision)  # type: ignore[arg-type]


@dataclass
class Attempt:
    settings: QuantizerSettings
    guard: GuardReport
    fp32_layers: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.to_dict(), "guard": self.guard.to_dict(),
                "fp32_layers": self.fp32_layers}


@dataclass(frozen=True)
class Fp32Reference:
    """The fp32 side of a quantisation: the converted model (quantised from, never changed) and
    its AP and heatmaps on the held-out crops. Another quantisation of the same weights against
    the same held-out set (another calibration set, another ladder) starts from it instead of
    converting and measuring again."""

    ov_model: Any
    ap: float
    heatmaps: torch.Tensor


@dataclass
class QuantizeResult:
    written: Path | None  # the artifact, or None when every attempt failed the guard
    attempts: list[Attempt] = field(default_factory=list)
    rejected: Path | None = None  # the report of a failure
    fp32: Fp32Reference | None = None  # what another quantisation of the same weights can reuse

    @property
    def passed(self) -> Attempt | None:
        return self.attempts[-1] if self.written is not None else None


def quantize_model(weights: str | Path | None, out: str | Path, *, config_name: str | None = None,
                   calibration: CropSource = CropSource(),
                   held_out: CropSource = CropSource(seed=SYNTH_HELD_OUT_SEED, count=500),
                   calibration_crops_count: int = 300,
                   ladder: tuple[QuantizerSettings, ...] = LADDER,
                   thresholds: GuardThresholds | None = None,
                   make_runner: RunnerFactory = openvino_runner,
                   fp32: Fp32Reference | None = None) -> QuantizeResult:
    """Quantise ``weights`` (None: the embedded default), guard each of ``ladder`` in turn,
    write the first that passes. ``fp32``: an earlier result's ``fp32`` for the same weights,
    config and held-out set."""
    network, model_config, loaded = load_model(weights or EMBEDDED_DEFAULT, config_name,
                                               device="cpu")
    if loaded is None:
        raise DataError("quantize needs trained weights: an untrained network has no accuracy"
                        " to guard")
    network.eval()
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="omnipose-quantize-") as folder:
        workdir = Path(folder)
        calib_images, calib_annotations = calibration.materialise(workdir, "calibration")
        held_images, held_annotations = held_out.materialise(workdir, "held_out")
        if calibration == held_out or calib_annotations.resolve() == held_annotations.resolve():
            raise DataError("calibration and held-out sets must be different images")
        crops = calibration_crops(network, model_config, calib_images, calib_annotations,
                                  calibration_crops_count)
        check = held_out_set(model_config, held_images, held_annotations, held_out.describe())
        if fp32 is None:
            ov_model = convert_network(network, model_config.input_size)
            fp32 = Fp32Reference(ov_model, *evaluate_runner(make_runner(ov_model, "fp32"),
                                                            model_config, check))
        attempts: list[Attempt] = []
        for settings in ladder:
            quantised = quantize_openvino(fp32.ov_model, crops, settings)
            guard = measure_guard(None, make_runner(quantised, "int8"), model_config, check,
                                  thresholds, fp32_result=(fp32.ap, fp32.heatmaps))
            attempts.append(Attempt(settings, guard, fp32_layers(quantised)))
            log.info("int8 %s: %s: %s", settings.name, "PASS" if guard.passed else "FAIL",
                     guard.summary())
            if guard.passed:
                _rejected_path(out).unlink(missing_ok=True)  # a stale failure report
                sidecar = _sidecar(loaded.sha256, model_config, attempts[-1], calibration,
                                   len(crops), attempts)
                return QuantizeResult(write_int8_artifact(out, quantised, sidecar, guard),
                                      attempts, fp32=fp32)
    return QuantizeResult(None, attempts, _write_rejected(out, loaded.sha256, model_config,
                                                          attempts), fp32)


def _versions() -> dict[str, str]:
    openvino = import_openvino()
    import nncf

    return {"openvino": openvino.get_version(), "nncf": nncf.__version__,
            "torch": torch.__version__}


def _sidecar(weights_sha256: str, model_config: ModelConfig, chosen: Attempt,
             calibration: CropSource, crops: int, attempts: list[Attempt]) -> dict[str, Any]:
    return {
        "source": {"weights_sha256": weights_sha256, "config": model_config.name,
                   "input_size": list(model_config.input_size),
                   "heatmap_size": list(model_config.heatmap_size)},
        "quantizer": {"tool": "nncf.quantize (OpenVINO backend, post-training)",
                      **chosen.settings.to_dict()},
        "fp32_layers": chosen.fp32_layers,
        "calibration": {"source": calibration.describe(), "crops": crops},
        "runtime": _versions(),
        "attempts": [attempt.to_dict() for attempt in attempts],
    }


def _rejected_path(out: Path) -> Path:
    return out.with_name(out.name + ".rejected.json")


def _write_rejected(out: Path, weights_sha256: str, model_config: ModelConfig,
                    attempts: list[Attempt]) -> Path:
    """``OUT.rejected.json``: every attempt's figures, no model; an old artifact at ``out`` is
    left alone (it passed its own guard for its own weights)."""
    path = _rejected_path(out)
    path.write_text(json.dumps({
        "usable": False,
        "reason": "no quantiser setting passed the int8 accuracy guard",
        "source": {"weights_sha256": weights_sha256, "config": model_config.name},
        "runtime": _versions(),
        "attempts": [attempt.to_dict() for attempt in attempts],
    }, indent=2) + "\n")
    return path
