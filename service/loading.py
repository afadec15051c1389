"""Turning a weights file (or nothing) into a ready pose estimator: one place for CLI and server.

With no weights the embedded default checkpoint is used; if the package has none, a randomly
initialised network runs so the pipeline still works end to end, and the caller is told loudly
that its keypoints are meaningless.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import omnipose.model as model_package
from omnipose.model.checkpoint import load_model, read_checkpoint
from omnipose.model.configs import ModelConfig, get_config
from omnipose.model.int8_artifact import Int8Artifact, Int8ArtifactError, read_int8_artifact
from omnipose.model.precision import PrecisionSetting
from omnipose.model.runners import (
    RUNNER_FACTORIES,
    Runner,
    RunnerOptions,
    build_runner,
    resolve_device,
)
from omnipose.model.skeleton import KeypointSpec
from omnipose.model.topdown import TopDownPoseEstimator

log = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "onnxruntime", "openvino"]
# backend=auto's hook: (network, config, runner options) -> the runner and the choice behind it
# (an object with describe() and summary(): omnipose.service.backend_choice.BackendChoice).
RunnerChooser = Callable[[Any, ModelConfig, RunnerOptions], tuple[Runner, Any]]

DEFAULT_WEIGHTS = Path(model_package.__file__).resolve().parent / "weights" / "default.pt"
UNTRAINED_CONFIG = "coco-w18-256x192"
EMBEDDED_DEFAULT_NOTE = (
    "Using the embedded default model: trained on synthetic figures only (see"
    " model/weights/MODEL_CARD.md). For real photos pass --weights with the published COCO"
    " checkpoint or one trained on COCO."
)
UNTRAINED_WARNING = (
    "NO WEIGHTS: the pose network is randomly initialised, so every keypoint is meaningless. "
    "Pass --weights FILE (a published OmniPose checkpoint or one made by `omnipose train`)."
)


@dataclass
class LoadedPoseModel:
    """An estimator plus what clients need to know about it (for /v1/models and metrics)."""

    estimator: TopDownPoseEstimator
    config: ModelConfig
    keypoints: KeypointSpec
    weights_path: Path | None
    weights_sha256: str | None
    trained: bool
    metadata: dict = field(default_factory=dict)
    backend: str = "torch"
    int8: dict | None = None  # the guarded int8 artifact served (sidecar and guard figures)
    backend_choice: Any = None  # backend=auto: the BackendChoice behind ``backend``

    @property
    def name(self) -> str:
        return f"omnipose-{self.config.name}"

    @property
    def is_embedded_default(self) -> bool:
        return self.weights_path == DEFAULT_WEIGHTS

    @property
    def version(self) -> str:
        """Short content hash: two files with the same weights report the same version."""
        return self.weights_sha256[:12] if self.weights_sha256 else "untrained"

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "config": self.config.to_dict(),
            "keypoints": self.keypoints.to_dict(),
            "input_size": list(self.config.input_size),
            "heatmap_size": list(self.config.heatmap_size),
            "weights_path": str(self.weights_path) if self.weights_path else None,
            "weights_sha256": self.weights_sha256,
            "trained": self.trained,
            "device": str(self.estimator.device),
            "precision": self.estimator.precision,
            "backend": self.backend,
            "int8": self.int8,
            "backend_choice": self.backend_choice.describe() if self.backend_choice else None,
            "flip_test": self.estimator.flip_test,
            "flip_shift": self.estimator.flip_shift,
            "metadata": self.metadata,
        }


def resolve_weights(weights: str | Path | None) -> Path | None:
    """The file to load: the user's, else the embedded default if the package ships one."""
    if weights is not None:
        return Path(weights)
    return DEFAULT_WEIGHTS if DEFAULT_WEIGHTS.is_file() else None


def _default_if_it_fits(default: Path, config_name: str) -> Path | None:
    """The embedded default, unless ``config_name`` asks for another network (dataset, width, head).

    Asking for a configuration without weights then means a randomly initialised network of that
    configuration (for tests and throughput measurements), never a silent mismatch.
    """
    wanted = get_config(config_name)
    shipped = read_checkpoint(default).config
    network = (wanted.dataset, wanted.width, wanted.head)
    if shipped is not None and (shipped.dataset, shipped.width, shipped.head) == network:
        return default
    log.warning("the embedded default model is %s; no weights ship for %s",
                shipped.name if shipped else "unknown", config_name)
    return None


def load_pose_model(
    weights: str | Path | None = None,
    config_name: str | None = None,
    device: str = "auto",
    precision: PrecisionSetting = "fp32",
    flip_test: bool = True,
    flip_shift: bool = False,
    backend: Backend = "torch",
    cache_dir: Path | None = None,
    cpus: int | None = None,
    int8_model: str | Path | None = None,
    choose_runner: RunnerChooser | None = None,
) -> LoadedPoseModel:
    """Load weights (or the default) and wrap them in a TopDownPoseEstimator on ``device``.

    ``backend`` names the runner (:data:`omnipose.model.runners.RUNNER_FACTORIES`):
    ``onnxruntime`` exports the loaded network to ONNX in memory and runs that graph in ONNX
    Runtime (fp32: ``auto`` precision means fp32 there; fp16/bf16 are refused); ``openvino``
    converts it to OpenVINO (CPU; fp32, or bf16 on CPUs with native bf16; ``auto`` as for torch),
    keeping the converted and compiled model in ``cache_dir`` (None: converted at every start).
    ``cpus``: the usable CPUs OpenVINO spreads its streams over (None: the process affinity).
    ``int8_model`` serves a guarded int8 artifact of these weights (``omnipose quantize``,
    :mod:`omnipose.model.int8_artifact`) in OpenVINO instead; int8 is refused without one.
    ``auto`` asks ``choose_runner`` (the service's start-up measurement,
    :class:`omnipose.service.backend_choice.AutoBackend`).
    """
    path = resolve_weights(weights)
    if weights is None and path is not None and config_name is not None:
        path = _default_if_it_fits(path, config_name)
    if path is None:
        log.warning(UNTRAINED_WARNING)
    elif weights is None:
        log.warning(EMBEDDED_DEFAULT_NOTE)
    network, config, checkpoint = load_model(
        path, config_name or (UNTRAINED_CONFIG if path is None else None), device="cpu"
    )
    keypoints = (checkpoint.keypoints if checkpoint and checkpoint.keypoints else config.keypoints)
    int8 = None
    choice = None
    options = RunnerOptions(cache_dir=cache_dir, weights_sha256=checkpoint.sha256 if checkpoint
                            else None, config_name=config.name, cpus=cpus)
    artifact = None
    if int8_model is not None:
        artifact = checked_int8_artifact(int8_model, options.weights_sha256, config)
    elif backend == "auto" and precision == "auto":
        artifact = _int8_beside(path, options.weights_sha256, config, device)
    if artifact is not None or precision == "int8":
        runner, int8 = _int8_runner(artifact, backend, device, cpus)
    elif backend == "auto":
        if choose_runner is None:
            raise ValueError("backend auto is chosen by the service at start-up; name a backend"
                             f" ({', '.join(RUNNER_FACTORIES)})")
        runner, choice = choose_runner(network, config, options)
    else:
        runner = build_runner(backend, network, config.input_size, device, precision, options)
    estimator = TopDownPoseEstimator(runner, config, keypoints, flip_test=flip_test,
                                     flip_shift=flip_shift)
    return LoadedPoseModel(
        estimator=estimator,
        config=config,
        keypoints=keypoints,
        weights_path=path,
        weights_sha256=checkpoint.sha256 if checkpoint else None,
        trained=path is not None,
        metadata=dict(checkpoint.metadata) if checkpoint else {},
        backend=runner.backend,
        backend_choice=choice,
        int8=int8,
    )


def int8_beside(weights: Path) -> Path:
    """Where ``omnipose quantize`` output for ``weights`` is looked for by ``backend=auto``:
    ``<weights without suffix>.int8`` beside it (the embedded default ships ``default.int8``)."""
    return weights.with_suffix(".int8")


def checked_int8_artifact(path: str | Path, weights_sha256: str | None,
                          config: ModelConfig) -> Int8Artifact:
    """The int8 artifact at ``path``, checked for these weights and this crop size."""
    artifact = read_int8_artifact(path, weights_sha256)
    quantised_for = artifact.sidecar.get("source", {}).get("input_size")
    if list(quantised_for or []) != list(config.input_size):
        raise Int8ArtifactError(f"{path}: quantised for input size {quantised_for}, but the model"
                                f" config {config.name} is {config.input_size}")
    return artifact


def _int8_beside(weights: Path | None, weights_sha256: str | None, config: ModelConfig,
                 device: str) -> Int8Artifact | None:
    """backend=auto on the CPU: the guarded int8 artifact beside the weights, if there is one
    for these very weights and this crop size; anything else is logged and ignored (auto then
    measures the float backends as usual)."""
    if weights is None or resolve_device(device).type != "cpu":
        return None
    candidate = int8_beside(weights)
    if not candidate.is_dir():
        return None
    try:
        artifact = checked_int8_artifact(candidate, weights_sha256, config)
    except Int8ArtifactError as exc:
        log.warning("backend auto: not serving the int8 model beside the weights: %s", exc)
        return None
    try:
        from omnipose.model.openvino_runtime import import_openvino

        import_openvino()
    except ImportError:
        log.warning("backend auto: %s is not served: the openvino extra is not installed",
                    candidate.name)
        return None
    log.info("backend auto: serving the guarded int8 model %s (its accuracy guard passed)",
             candidate.name)
    return artifact


def _int8_runner(artifact: Int8Artifact | None, backend: str, device: str,
                 cpus: int | None) -> tuple[Runner, dict]:
    """The OpenVINO int8 runner of a checked artifact, and its description for /v1/models."""
    if artifact is None:
        raise ValueError("int8 is served only from a guarded int8 model: pass --int8-model DIR"
                         " written by `omnipose quantize` for these weights")
    if backend not in ("openvino", "auto"):
        raise ValueError(f"an int8 model runs in OpenVINO: use --backend openvino or auto, not"
                         f" {backend}")
    if device not in ("auto", "cpu"):
        raise ValueError(f"an int8 OpenVINO model runs on the CPU, not {device}")
    from omnipose.model.openvino_runtime import OpenVinoRunner, openvino_core

    ov_model = openvino_core().read_model(artifact.model_xml)
    return OpenVinoRunner(ov_model, "int8", cpus=cpus), artifact.describe()
