"""Guarded int8 models: the file set ``omnipose quantize`` writes, and the one way to read it.

An int8 pose network is only usable together with the proof that it still estimates the same
poses as fp32. The artifact is a directory::

    NAME.int8/
        model.xml, model.bin   the quantised network (OpenVINO IR)
        int8.json              the sidecar: what it was made from and how, and the guard figures

The sidecar records the source weights' SHA-256, config name and input size, the quantiser
settings, the layers left in fp32, the calibration source and count, the openvino/nncf versions,
and the accuracy guard: its thresholds and the figures measured on a held-out set against the
fp32 network of the same backend on the same crops. A model that fails the guard is never
written as such a directory (``omnipose quantize`` refuses it), and :func:`load_int8_artifact`
refuses any directory whose sidecar is missing or unreadable, whose weights hash differs from the
weights being served, whose IR differs from the one measured, or whose figures do not pass the
project's thresholds (they are re-checked here, never taken from a stored "passed" flag).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ARTIFACT_FORMAT = "omnipose-int8"
ARTIFACT_VERSION = 1
SIDECAR_NAME = "int8.json"
MODEL_XML = "model.xml"
MODEL_BIN = "model.bin"


class Int8ArtifactError(ValueError):
    """An int8 artifact that must not be served (one line, says what to do)."""


@dataclass(frozen=True)
class GuardThresholds:
    """The accuracy guard of int8 against fp32 (issue #20); keypoint shifts in heatmap pixels."""

    max_ap_difference: float = 0.005  # |AP int8 - AP fp32|, COCO OKS AP (pycocotools)
    max_median_shift_px: float = 0.1
    max_p99_shift_px: float = 0.5
    max_confidence_bias: float = 0.01  # |mean(confidence int8 - confidence fp32)|

    def no_looser_than(self, other: GuardThresholds) -> bool:
        """Whether every threshold here is at least as strict as ``other``'s."""
        return all(getattr(self, name) <= getattr(other, name) for name in asdict(self))


PROJECT_THRESHOLDS = GuardThresholds()


@dataclass
class GuardReport:
    """The guard figures of one quantised network, measured on a held-out set."""

    ap_fp32: float
    ap_int8: float
    median_shift_px: float
    p99_shift_px: float
    confidence_bias: float  # mean over keypoints of confidence int8 - fp32
    keypoints: int  # keypoints compared (crops x joints)
    images: int  # held-out images
    held_out: str  # where the held-out set came from
    thresholds: GuardThresholds = field(default_factory=GuardThresholds)

    def failures(self, thresholds: GuardThresholds | None = None) -> list[str]:
        """What breaks ``thresholds`` (default: the report's own), one phrase each."""
        limits = thresholds or self.thresholds
        checks = [
            (abs(self.ap_int8 - self.ap_fp32), limits.max_ap_difference, "AP difference"),
            (self.median_shift_px, limits.max_median_shift_px, "median keypoint shift (px)"),
            (self.p99_shift_px, limits.max_p99_shift_px, "p99 keypoint shift (px)"),
            (abs(self.confidence_bias), limits.max_confidence_bias, "confidence bias"),
        ]
        failed = [f"{name} {value:.4f} > {limit}" for value, limit, name in checks
                  if not value <= limit]  # NaN fails
        if self.keypoints <= 0:
            failed.append("no keypoints compared")
        return failed

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuardReport:
        values = {k: v for k, v in data.items() if k != "passed"}
        values["thresholds"] = GuardThresholds(**values.get("thresholds", {}))
        return cls(**values)

    def summary(self) -> str:
        return (f"AP int8 {self.ap_int8:.4f} vs fp32 {self.ap_fp32:.4f}, keypoint shift median"
                f" {self.median_shift_px:.3f} px p99 {self.p99_shift_px:.3f} px, confidence bias"
                f" {self.confidence_bias:+.4f} ({self.keypoints} keypoints, {self.images} images)")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(path: str | Path) -> Path:
    """The sidecar of an artifact given as its directory or as any file in it."""
    path = Path(path)
    return path / SIDECAR_NAME if path.is_dir() else path.parent / SIDECAR_NAME


def write_int8_artifact(out_dir: str | Path, ov_model: Any, sidecar: dict[str, Any],
                        guard: GuardReport) -> Path:
    """Write the artifact directory ``out_dir`` (replacing one there) for a model that passed.

    Refuses a failing ``guard``: the check lives here as well as in the caller, so no code path
    can write a usable artifact of a failed model. Written into a temporary sibling and renamed,
    so a reader never sees half an artifact.
    """
    from omnipose.model.openvino_runtime import import_openvino

    openvino = import_openvino()

    if not guard.passed or not guard.thresholds.no_looser_than(PROJECT_THRESHOLDS):
        raise Int8ArtifactError(f"refusing to write an int8 model that fails the guard:"
                                f" {'; '.join(guard.failures(PROJECT_THRESHOLDS))}")
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        _remove_tree(staging)
    staging.mkdir(parents=True)
    openvino.save_model(ov_model, staging / MODEL_XML, compress_to_fp16=False)
    content = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        **sidecar,
        "guard": guard.to_dict(),
        "files": {name: file_sha256(staging / name) for name in (MODEL_XML, MODEL_BIN)},
    }
    (staging / SIDECAR_NAME).write_text(json.dumps(content, indent=2) + "\n")
    if out_dir.exists():
        _remove_tree(out_dir)
    staging.rename(out_dir)
    return out_dir


def _remove_tree(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@dataclass
class Int8Artifact:
    """A validated artifact: the IR to compile, and what /v1/models shows about it."""

    path: Path
    model_xml: Path
    guard: GuardReport
    sidecar: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """The artifact as clients see it (name, settings, fp32 layers, guard figures; no server
        paths)."""
        keys = ("source", "quantizer", "fp32_layers", "calibration", "runtime")
        return {"name": self.path.name, **{key: self.sidecar.get(key) for key in keys},
                "guard": self.guard.to_dict()}


def read_int8_artifact(path: str | Path, weights_sha256: str | None) -> Int8Artifact:
    """The artifact at ``path`` (its directory or a file in it), checked for serving the weights
    whose SHA-256 is ``weights_sha256``; :class:`Int8ArtifactError` says why it cannot be used."""
    side = sidecar_path(path)
    directory = side.parent
    if not side.is_file():
        raise Int8ArtifactError(
            f"{path}: no {SIDECAR_NAME} guard sidecar; int8 is served only from a directory"
            " written by `omnipose quantize` (a model that passed its accuracy guard)")
    try:
        sidecar = json.loads(side.read_text())
        if sidecar.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"format is {sidecar.get('format')!r}, not {ARTIFACT_FORMAT!r}")
        if sidecar.get("version") != ARTIFACT_VERSION:
            raise ValueError(f"version {sidecar.get('version')!r} is not {ARTIFACT_VERSION}")
        guard = GuardReport.from_dict(sidecar["guard"])
        source_hash = sidecar["source"]["weights_sha256"]
        files = dict(sidecar["files"])
    except (ValueError, KeyError, TypeError) as error:
        raise Int8ArtifactError(f"{side}: unreadable int8 sidecar ({error})") from None
    if weights_sha256 is None or source_hash != weights_sha256:
        raise Int8ArtifactError(
            f"{directory}: quantised from weights {str(source_hash)[:12]}, but the weights being"
            f" served are {str(weights_sha256)[:12]}; run `omnipose quantize` for these weights")
    failures = guard.failures(PROJECT_THRESHOLDS)
    if failures:
        raise Int8ArtifactError(f"{directory}: the int8 model did not pass the accuracy guard"
                                f" ({'; '.join(failures)}); it must not be served")
    for name in (MODEL_XML, MODEL_BIN):
        file = directory / name
        if not file.is_file():
            raise Int8ArtifactError(f"{directory}: {name} is missing")
        if file_sha256(file) != files.get(name):
            raise Int8ArtifactError(f"{directory}: {name} is not the file the guard measured"
                                    " (its SHA-256 differs from the sidecar's)")
    return Int8Artifact(directory, directory / MODEL_XML, guard, sidecar)


def load_int8_artifact(path: str | Path, weights_sha256: str | None) -> tuple[Any, GuardReport]:
    """(openvino.Model, guard report) of a checked artifact (see :func:`read_int8_artifact`)."""
    from omnipose.model.openvino_runtime import openvino_core

    artifact = read_int8_artifact(path, weights_sha256)
    return openvino_core().read_model(artifact.model_xml), artifact.guard
