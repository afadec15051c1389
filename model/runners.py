"""Runners: the one interface an inference backend implements, and the backends we have.

A runner runs the pose network and nothing else:

    crops ``[N, 3, H, W]`` float32 (ImageNet-normalised, on the runner's device or the host)
        -> heatmaps ``[N, J, h, w]`` float32 on the runner's device.

Everything around the network is the same for every backend and lives here once, in
:func:`run_crops`: moving the crops to the device, **flip test** (the mirrored crops ride in the
same call as a batch of 2N, and their heatmaps are mirrored back and averaged) and the empty
batch. Flip test belongs to this function rather than to each runner so that every backend
mirrors and averages identically and a new backend cannot get it subtly wrong.

Adding a backend is one class with ``backend``, ``device``, ``precision`` and ``run`` (the
:class:`Runner` protocol) plus one entry in :data:`RUNNER_FACTORIES`, which builds it from the
loaded torch network.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from omnipose.model.buckets import BucketedForward, bucket_sizes
from omnipose.model.codec import flip_heatmaps_back
from omnipose.model.precision import (
    Precision,
    PrecisionSetting,
    cast_inputs,
    cast_network,
    check_precision,
    resolve_precision,
)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when available; anything else is passed to torch as given."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return resolved


@runtime_checkable
class Runner(Protocol):
    """An inference backend of the pose network."""

    backend: str  # the name users pick it by (``--backend``), a key of RUNNER_FACTORIES
    device: torch.device  # where its inputs should be and its heatmaps come back
    precision: Precision  # what it computes in (reported in /v1/models and metrics)

    def run(self, crops: torch.Tensor) -> torch.Tensor:
        """Heatmaps ``[N, J, h, w]`` float32 on :attr:`device` for crops ``[N, 3, H, W]``
        float32 (any N >= 1)."""
        ...


class TorchRunner:
    """The torch network on its device in its precision; optionally in fixed batch-size buckets
    (CUDA graphs on CUDA, see :mod:`omnipose.model.buckets`)."""

    backend = "torch"

    def __init__(self, network: nn.Module, device: str | torch.device = "cpu",
                 precision: PrecisionSetting = "fp32") -> None:
        self.device = resolve_device(device)
        self.precision: Precision = resolve_precision(self.device, precision)
        check_precision(self.device, self.precision)
        self.network = cast_network(network.to(self.device).eval(), self.precision)
        self._bucketed: BucketedForward | None = None

    def use_buckets(self, input_size: tuple[int, int], largest: int,
                    use_cuda_graphs: bool | None = None) -> list[int]:
        """Run in buckets up to ``largest`` crops, all captured and warmed now; the bucket sizes.
        ``input_size``: the crops' (H, W)."""
        height, width = input_size
        example = cast_inputs(torch.zeros(1, 3, height, width, device=self.device),
                              self.precision)
        self._bucketed = BucketedForward(self.network, example, bucket_sizes(largest),
                                         use_cuda_graphs)
        self._bucketed.warm_up()
        return self._bucketed.buckets

    def run(self, crops: torch.Tensor) -> torch.Tensor:
        network = self._bucketed or self.network
        return network(cast_inputs(crops.to(self.device), self.precision)).float()


class OnnxRuntimeRunner:
    """An exported pose network (:func:`omnipose.model.onnx_runtime.export_onnx`) in ONNX
    Runtime, fp32. A call runs with the calling thread's torch thread count, as torch does, so
    the service's instance layout carries over: one session per thread count, shared by every
    thread that calls with it (``InferenceSession.run`` may be called concurrently). With one
    intra-op thread ORT computes on the calling thread, so single-threaded instances share a
    session without sharing cores; a lone batch on every core gets its own session."""

    backend = "onnxruntime"
    precision: Precision = "fp32"

    def __init__(self, onnx_model: bytes, device: torch.device | str = "cpu") -> None:
        self.onnx_model = onnx_model
        self.device = torch.device(device)
        self._sessions: dict[int, Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_network(cls, network: nn.Module, input_size: tuple[int, int],
                     device: torch.device | str = "cpu") -> OnnxRuntimeRunner:
        from omnipose.model.onnx_runtime import export_onnx

        return cls(export_onnx(network, input_size), device)

    def _session(self) -> Any:
        """The session for this thread's torch thread count (its intra-op threads)."""
        threads = torch.get_num_threads()
        session = self._sessions.get(threads)
        if session is None:
            with self._lock:  # two instance threads starting at once create it once
                session = self._sessions.get(threads)
                if session is None:
                    session = self._sessions[threads] = self._new_session(threads)
        return session

    def _new_session(self, threads: int) -> Any:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if (
            self.device.type == "cuda"
            and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")
        return onnxruntime.InferenceSession(self.onnx_model, options, providers=providers)

    def run(self, crops: torch.Tensor) -> torch.Tensor:
        from omnipose.model.onnx_runtime import INPUT_NAME, OUTPUT_NAME

        inputs = np.ascontiguousarray(crops.detach().float().cpu().numpy())
        (heatmaps,) = self._session().run([OUTPUT_NAME], {INPUT_NAME: inputs})
        return torch.from_numpy(heatmaps).to(crops.device)


@dataclass(frozen=True)
class RunnerOptions:
    """What a backend may need beyond the network: where converted models are cached and what
    identifies the weights in that cache (None: hashed from the network's state_dict)."""

    cache_dir: Path | None = None
    weights_sha256: str | None = None
    config_name: str | None = None
    cpus: int | None = None  # usable CPUs (cgroup-aware, from the service); None: affinity


def _torch_runner(network: nn.Module, input_size: tuple[int, int], device: torch.device,
                  precision: PrecisionSetting, options: RunnerOptions) -> Runner:
    return TorchRunner(network, device, precision)


def _onnxruntime_runner(network: nn.Module, input_size: tuple[int, int], device: torch.device,
                        precision: PrecisionSetting, options: RunnerOptions) -> Runner:
    if precision not in ("auto", "fp32"):
        raise ValueError(f"the onnxruntime backend runs fp32, not {precision}")
    return OnnxRuntimeRunner.from_network(network, input_size, device)


def _openvino_runner(network: nn.Module, input_size: tuple[int, int], device: torch.device,
                     precision: PrecisionSetting, options: RunnerOptions) -> Runner:
    """fp32 or bf16 (``auto`` as for torch: bf16 on CPUs with native bf16, which passes the same
    accuracy guard, tests/test_precision.py); int8 needs a quantised model, which a torch
    network is not."""
    from omnipose.model.openvino_runtime import OpenVinoRunner

    if device.type != "cpu":
        raise ValueError(f"the openvino backend runs on the CPU, not {device}; set device=cpu")
    if precision == "int8":
        raise ValueError("precision int8 on the openvino backend needs a quantised model file,"
                         " not a torch network")
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"the openvino backend runs fp32 or bf16, not {precision}")
    return OpenVinoRunner.from_network(
        network, input_size, resolve_precision(device, precision),  # type: ignore[arg-type]
        cache_dir=options.cache_dir, weights_sha256=options.weights_sha256,
        config_name=options.config_name, cpus=options.cpus,
    )


RunnerFactory = Callable[
    [nn.Module, tuple[int, int], torch.device, PrecisionSetting, RunnerOptions], Runner
]

# Backend name -> how to build its runner from the loaded torch network (on the CPU), the crop
# size (H, W), the resolved device, the precision setting and the backend options.
RUNNER_FACTORIES: dict[str, RunnerFactory] = {
    "torch": _torch_runner,
    "onnxruntime": _onnxruntime_runner,
    "openvino": _openvino_runner,
}


def build_runner(backend: str, network: nn.Module, input_size: tuple[int, int],
                 device: str | torch.device = "cpu",
                 precision: PrecisionSetting = "fp32",
                 options: RunnerOptions | None = None) -> Runner:
    """The runner of ``backend`` for ``network``; ValueError for an unknown backend."""
    factory = RUNNER_FACTORIES.get(backend)
    if factory is None:
        raise ValueError(f"unknown backend {backend!r}; choose one of"
                         f" {', '.join(RUNNER_FACTORIES)}")
    return factory(network, input_size, resolve_device(device), precision,
                   options or RunnerOptions())


def as_runner(network: nn.Module | Runner, device: str | torch.device = "cpu",
              precision: PrecisionSetting = "fp32") -> Runner:
    """A runner as given, or a torch network wrapped in a :class:`TorchRunner`."""
    if isinstance(network, nn.Module):
        return TorchRunner(network, device, precision)
    return network


@torch.inference_mode()
def run_crops(runner: Runner, crops: torch.Tensor, num_joints: int,
              heatmap_size: tuple[int, int], flip: bool,
              flip_index: np.ndarray | list[int] | None = None,
              flip_shift: bool = False) -> torch.Tensor:
    """Heatmaps ``[N, J, h, w]`` float32 on the runner's device for crops ``[N, 3, H, W]``.

    With ``flip`` the mirrored crops ride in the same call (one batch of 2N) and their heatmaps,
    mirrored back (joints swapped by ``flip_index``, optionally shifted one pixel), are averaged
    with the plain ones.
    """
    n = crops.shape[0]
    if n == 0:
        return torch.zeros(0, num_joints, *heatmap_size, device=runner.device)
    if runner.device.type == "cuda" and crops.device.type == "cpu":
        crops = crops.pin_memory()  # page-locked: the copy below is asynchronous
    x = crops.to(runner.device, non_blocking=True)
    if flip:
        x = torch.cat([x, torch.flip(x, dims=[3])], dim=0)
    heatmaps = runner.run(x)
    if flip:
        flipped = flip_heatmaps_back(heatmaps[n:], flip_index, shift=flip_shift)
        heatmaps = (heatmaps[:n] + flipped) * 0.5
    return heatmaps
