"""Reduced precision and ``precision=auto``: what auto picks, and the accuracy guard it relies on.

The guard: on the default model's held-out synthetic test split (the model card's, never seen in
training or selection), bf16 weights in channels-last layout keep COCO AP within 0.005 of fp32
and move the median keypoint by at most 0.1 heatmap pixel (one pass per crop, no flip test).
bf16 is checked on any CPU (oneDNN emulates it where the CPU lacks it: slower, same numbers), so
the guard holds wherever auto could pick it. OpenVINO bf16 (backend=openvino, where auto picks
it on CPUs with native bf16) is held to the same guard there. fp16 is auto's choice on CUDA
only; its guard needs a GPU (bench/gpu.sh).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from omnipose.model import precision as precision_module
from omnipose.model.codec import decode_heatmaps
from omnipose.model.openvino_runtime import import_openvino
from omnipose.model.precision import Precision, cast_inputs, cast_network, resolve_precision
from omnipose.model.topdown import TopDownPoseEstimator
from omnipose.service import loading

try:  # usage telemetry declined, as the runner imports it
    openvino = import_openvino()
except ImportError:  # the openvino extra is not installed: the guard checks torch only
    openvino = None

AP_TOLERANCE = 0.005
MEDIAN_SHIFT_TOLERANCE_PX = 0.1
# The model card's held-out test split (docs: model/weights/MODEL_CARD.md).
TEST_SPLIT_SEED, TEST_SPLIT_IMAGES = 20261126, 500


def test_auto_picks_fp16_on_cuda_bf16_on_native_bf16_cpus_else_fp32(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert precision_module.cpu_has_native_bf16.__wrapped__(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512bw\n")
    assert not precision_module.cpu_has_native_bf16.__wrapped__(cpuinfo)

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision(cuda, "auto") == "fp16"
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision(cpu, "auto") == "bf16"
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision(cpu, "auto") == "fp32"
    assert resolve_precision(cpu, "fp32") == "fp32"  # explicit choices are kept


def test_bf16_estimator_casts_weights_and_crops() -> None:
    network = loading.load_pose_model(device="cpu").estimator.model
    estimator = TopDownPoseEstimator(
        copy.deepcopy(network),
        loading.load_pose_model(device="cpu").config,
        device="cpu",
        precision="bf16",
    )
    weight = next(estimator.model.parameters())
    assert weight.dtype == torch.bfloat16
    conv = next(m for m in estimator.model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    height, width = estimator.config.input_size
    heatmaps = estimator.forward(torch.randn(2, 3, height, width))
    assert heatmaps.dtype == torch.float32 and torch.isfinite(heatmaps).all()


class InPrecision(nn.Module):
    """A network run as the estimator runs it in ``precision`` (cast weights and crops).

    Keeps every batch of heatmaps it returns, so the guard compares keypoints of the very crops
    the evaluation ran without a second pass over the split (bf16 is emulated, and slow, on CPUs
    without native support).
    """

    def __init__(self, network: nn.Module, precision: Precision) -> None:
        super().__init__()
        self.precision = precision
        self.network = cast_network(copy.deepcopy(network), precision)
        self.outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heatmaps = self.network(cast_inputs(x, self.precision)).float()
        self.outputs.append(heatmaps.detach().cpu())
        return heatmaps


class OpenVinoInPrecision(nn.Module):
    """The openvino backend in ``precision``, run as the evaluation runs a network, keeping its
    heatmaps like :class:`InPrecision`."""

    def __init__(self, network: nn.Module, input_size: tuple[int, int], precision: str) -> None:
        super().__init__()
        from omnipose.model.openvino_runtime import OpenVinoRunner

        self.runner = OpenVinoRunner.from_network(network, input_size, precision)  # type: ignore[arg-type]
        self.outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heatmaps = self.runner.run(x)
        self.outputs.append(heatmaps.detach().cpu())
        return heatmaps


@pytest.mark.slow
def test_bf16_accuracy_guard_on_the_held_out_synthetic_split(tmp_path: Path) -> None:
    from omnipose.training.config import load_config
    from omnipose.training.data import load_split
    from omnipose.training.evaluate import evaluate_model
    from omnipose.training.synth import generate_dataset

    generate_dataset(
        tmp_path, TEST_SPLIT_IMAGES, seed=TEST_SPLIT_SEED, split="test", workers=1, progress=False
    )
    config = load_config("synth-w8-96x64", [f"data.root={tmp_path}", "data.val_split=test",
                                            "data.num_workers=0"])  # fmt: skip
    network = loading.load_pose_model(device="cpu", precision="fp32").estimator.model
    cpu = torch.device("cpu")
    loaded = load_split(config.data, config.model_config(), "test", config.data.val_boxes)
    runs: dict[str, nn.Module] = {name: InPrecision(network, name) for name in ("fp32", "bf16")}
    if precision_module.cpu_has_native_bf16() and openvino is not None:
        # OpenVINO bf16 (backend=openvino, auto precision on such CPUs) under the same guard
        runs["openvino bf16"] = OpenVinoInPrecision(network, config.model_config().input_size,
                                                    "bf16")
    # Without flip test: averaging a crop's two heatmaps would also average away part of bf16's
    # rounding, so one pass per crop is the stricter check (and half the emulated-bf16 cost).
    ap = {name: evaluate_model(run, config, device=cpu, progress=False, flip_test=False,
                               loaded=loaded).metrics["AP"]
          for name, run in runs.items()}  # fmt: skip
    print(ap)
    assert ap["fp32"] > 0.03  # the trained default, not a broken load
    # keypoints of the same crops (evaluation order is deterministic), in heatmap pixels
    located = {name: decode_heatmaps(torch.cat(run.outputs).numpy())[0]
               for name, run in runs.items()}  # fmt: skip
    for name in runs.keys() - {"fp32"}:
        assert abs(ap[name] - ap["fp32"]) <= AP_TOLERANCE, name
        assert located["fp32"].shape == located[name].shape
        shift = np.linalg.norm(located[name] - located["fp32"], axis=-1)
        print(f"{name}: median shift {np.median(shift):.4f} px over {shift.size} keypoints")
        assert shift.size > 1000
        assert np.median(shift) <= MEDIAN_SHIFT_TOLERANCE_PX, name
