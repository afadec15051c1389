"""ONNX export (``omnipose export --format onnx``) and the onnxruntime backend of the service."""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from omnipose.cli.main import main
from omnipose.model import onnx_runtime
from omnipose.model.configs import get_config
from omnipose.model.network import build_model
from omnipose.model.onnx_runtime import (
    export_onnx,
    max_difference,
    read_onnx_metadata,
    shared_exports,
)
from omnipose.model.runners import OnnxRuntimeRunner
from omnipose.model.topdown import TopDownPoseEstimator
from omnipose.service import loading
from omnipose.service.engine import PoseEngine
from omnipose.service.metrics import ServiceMetrics
from omnipose.service.requests import ImageRequest
from omnipose.service.settings import ServiceSettings
from tests.conftest import choose_layout_as_if_2x1_fastest


@pytest.mark.parametrize("name", ["coco-w8-96x64", "coco-w8-96x64-waspv1"])  # both heads
def test_export_has_a_dynamic_batch_and_equals_pytorch(name: str) -> None:
    config = get_config(name)
    torch.manual_seed(0)
    network = build_model(config).eval()
    graph = export_onnx(network, config.input_size, {"model_config": config.name})
    assert read_onnx_metadata(graph) == {"model_config": config.name}
    runtime = OnnxRuntimeRunner(graph)
    for batch in (1, 4, 7):  # exported with 2: other sizes prove the batch is dynamic
        crops = torch.randn(batch, 3, *config.input_size)
        with torch.inference_mode():
            expected = network(crops)
        got = runtime.run(crops)
        assert got.shape == expected.shape == (batch, config.num_joints, *config.heatmap_size)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert max_difference(network, graph, config.input_size) < 1e-4


def test_equal_networks_are_exported_once_inside_shared_exports(monkeypatch) -> None:
    """backend=auto's candidates are copies of one network: inside shared_exports() the second
    export of an equal network (same weights, architecture, size) is the first one's graph; a
    network with other weights, another size, or an export outside the block traces again."""
    traced = []

    def counting_export(network, input_size, metadata):
        traced.append(input_size)
        return f"graph {len(traced)}".encode()

    monkeypatch.setattr(onnx_runtime, "_export", counting_export)
    config = get_config("coco-w8-96x64")
    network = build_model(config).eval()
    other_weights = copy.deepcopy(network)
    with torch.no_grad():
        next(other_weights.parameters()).add_(1.0)
    with shared_exports():
        first = export_onnx(network, config.input_size)
        assert export_onnx(copy.deepcopy(network), config.input_size) is first
        assert export_onnx(other_weights, config.input_size) != first
        assert export_onnx(network, (128, 96)) != first
    assert export_onnx(network, config.input_size) != first
    assert len(traced) == 4


def test_cli_exports_the_default_model_to_onnx(tmp_path: Path, capsys) -> None:
    out = tmp_path / "default.onnx"
    assert (
        main(
            [
                "export",
                "--weights",
                str(loading.DEFAULT_WEIGHTS),
                "--format",
                "onnx",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "largest heatmap difference" in printed
    difference = float(printed.rsplit("difference", 1)[1])
    assert difference < 1e-4
    metadata = read_onnx_metadata(out)
    assert metadata["model_config"] == "coco-w8-96x64" and len(metadata["joints"]) == 17


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_backend_serves_what_torch_serves(images, backend: str, tmp_path: Path) -> None:
    """The whole service (2 instances x 1 thread) on each backend against torch's answer."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    boxes = np.array(images.bus_boxes)

    async def run(backend: str) -> list:
        settings = ServiceSettings(
            device="cpu",
            detector="none",
            warmup=False,
            precision="fp32",
            backend=backend,
            model_instances=2,
            torch_threads=1,
            cache_dir=tmp_path,
        )
        engine = PoseEngine(settings, ServiceMetrics())
        await engine.start()
        assert engine.describe()["backend"] == backend
        assert engine.describe()["precision"] == "fp32"
        result = await engine.estimate(ImageRequest(images.bus, boxes=boxes))
        await engine.close()
        return result.persons

    torch_persons, other_persons = asyncio.run(run("torch")), asyncio.run(run(backend))
    assert len(torch_persons) == len(other_persons) == 2
    for a, b in zip(torch_persons, other_persons, strict=True):
        np.testing.assert_allclose(a.keypoints, b.keypoints, atol=1e-3)


def test_onnxruntime_backend_refuses_reduced_precision() -> None:
    with pytest.raises(ValueError, match="onnxruntime backend runs fp32"):
        loading.load_pose_model(device="cpu", precision="bf16", backend="onnxruntime")


def test_a_lone_batch_is_measured_and_runs_on_every_core_on_onnxruntime(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a measured 2 x 1 layout the engine measures lone batches on ONNX Runtime as on
    torch: the runner opens one session per caller's thread count, so both single-threaded
    instances share one session and a lone batch runs in a two-thread one, with equal heatmaps."""
    config = get_config("coco-w8-96x64")
    torch.manual_seed(0)
    network = build_model(config).eval()
    runner = OnnxRuntimeRunner(export_onnx(network, config.input_size))
    estimator = TopDownPoseEstimator(runner, config, flip_test=False)
    layout, rule = choose_layout_as_if_2x1_fastest(monkeypatch, estimator, backend="onnxruntime")
    assert (layout.instances, layout.threads) == (2, 1)
    assert rule is not None and min(rule.spread_one_s, rule.all_cores_one_s) > 0
    assert {threads: session.get_session_options().intra_op_num_threads
            for threads, session in runner._sessions.items()} == {1: 1, 2: 2}  # fmt: skip

    inputs = torch.randn(3, 3, *config.input_size)
    with torch.inference_mode():
        expected = network(inputs)
    for threads, callers in ((1, 2), (2, 1)):  # the two instances at once; a lone batch
        with ThreadPoolExecutor(callers, initializer=torch.set_num_threads,
                                initargs=(threads,)) as pool:  # fmt: skip
            for heatmaps in pool.map(lambda _: runner.run(inputs), range(callers)):
                torch.testing.assert_close(heatmaps, expected, atol=1e-4, rtol=1e-4)
    assert len(runner._sessions) == 2  # no session per thread
