"""The openvino backend: equal to torch, explicit precision, concurrent callers, the on-disk cache
of converted models, and clear errors for what it does not run."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("openvino")

from omnipose.model import openvino_runtime
from omnipose.model import precision as precision_module
from omnipose.model.configs import get_config
from omnipose.model.network import build_model
from omnipose.model.openvino_runtime import (
    IR_NAME,
    OpenVinoRunner,
    blobs_key,
    ir_key,
    usable_cache_dir,
)
from omnipose.model.runners import RunnerOptions, TorchRunner, build_runner
from omnipose.model.topdown import TopDownPoseEstimator
from omnipose.service import loading, startup
from tests.conftest import choose_layout_as_if_2x1_fastest, randomised

CONFIG = get_config("coco-w8-96x64")


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    return randomised(build_model(CONFIG), seed=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def runner(network: torch.nn.Module, cache: Path) -> OpenVinoRunner:
    """Built (converted) once for the module, into ``cache``."""
    built = build_runner("openvino", network, CONFIG.input_size, "cpu", "fp32",
                         RunnerOptions(cache_dir=cache, config_name=CONFIG.name))
    assert isinstance(built, OpenVinoRunner) and built.converted
    return built


def crops(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, *CONFIG.input_size, generator=torch.Generator().manual_seed(seed))


def test_runner_equals_torch_at_any_batch(runner: OpenVinoRunner,
                                          network: torch.nn.Module) -> None:
    assert (runner.backend, runner.precision, runner.device.type) == ("openvino", "fp32", "cpu")
    for batch in (1, 3):
        inputs = crops(batch, seed=batch)
        with torch.inference_mode():
            expected = network(inputs)
        got = runner.run(inputs)
        assert got.shape == expected.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_precision_hint_is_always_explicit(runner: OpenVinoRunner) -> None:
    """fp32 stays f32 even on a CPU whose OpenVINO default is bf16."""
    runner.run(crops(1, seed=0))
    runner.run(crops(2, seed=0))
    # every model compiled so far: the layout's, and the all-core one of lone calls if made
    compiled = [*runner._compiled.values(), *([runner._all_cores] if runner._all_cores else [])]
    assert compiled
    for model in compiled:
        hint = str(model.get_property("INFERENCE_PRECISION_HINT"))
        assert hint in ("<Type: 'float32'>", "f32"), hint
    assert runner.compile_config(1)["INFERENCE_PRECISION_HINT"] == "f32"


def test_concurrent_callers_get_what_sequential_calls_get(runner: OpenVinoRunner) -> None:
    inputs = [crops(2, seed=10 + index) for index in range(2)]
    expected = [runner.run(batch) for batch in inputs]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def call(index: int) -> None:
        torch.set_num_threads(1)  # as a 2 x 1 instance layout does
        barrier.wait()
        for _ in range(5):
            results[index].append(runner.run(inputs[index]))

    threads = [threading.Thread(target=call, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for index in range(2):
        assert len(results[index]) == 5
        for got in results[index]:
            torch.testing.assert_close(got, expected[index], rtol=1e-5, atol=1e-6)


def test_a_lone_call_runs_on_every_core_with_the_same_result(
        runner: OpenVinoRunner, network: torch.nn.Module) -> None:
    """2 streams x 1 thread (a 2 x 1 instance layout): a call alone in the runner runs on the
    model compiled for one stream on both cores; its heatmaps equal torch's."""
    layout = OpenVinoRunner(runner.ov_model, "fp32", threads=1, streams=2, cpus=2)
    inputs = crops(3, seed=7)
    with torch.inference_mode():
        expected = network(inputs)
    torch.testing.assert_close(layout.run(inputs), expected, rtol=1e-4, atol=1e-5)
    lone = layout._all_cores
    assert lone is not None and lone.get_property("NUM_STREAMS") == 1
    assert lone.get_property("INFERENCE_NUM_THREADS") == 2
    unsplit = OpenVinoRunner(runner.ov_model, "fp32", threads=1, streams=2, cpus=2)
    unsplit.lone_on_all_cores = False
    torch.testing.assert_close(unsplit.run(inputs), expected, rtol=1e-4, atol=1e-5)
    assert unsplit._all_cores is None  # off: the layout's own streams


def test_streams_follow_the_callers_thread_count() -> None:
    class Unused:
        """No model is compiled while only the configuration is asked for."""

    runner = OpenVinoRunner(Unused(), "fp32", cpus=4)  # type: ignore[arg-type]
    assert runner.layout(1) == (4, 1) and runner.compile_config(1)["INFERENCE_NUM_THREADS"] == 4
    assert runner.layout(2) == (2, 2) and runner.layout(4) == (1, 4)
    fixed = OpenVinoRunner.__new__(OpenVinoRunner)
    fixed.threads, fixed.streams, fixed.cpus = 3, 2, 4
    assert fixed.layout(1) == (2, 3)


def test_second_build_reads_the_cached_model(runner: OpenVinoRunner, network: torch.nn.Module,
                                             cache: Path) -> None:
    inputs = crops(2, seed=5)
    expected = runner.run(inputs)  # compiles now if no earlier test ran the module's runner
    irs = list(cache.rglob(IR_NAME))
    assert len(irs) == 1
    written = irs[0].stat().st_mtime_ns
    again = OpenVinoRunner.from_network(network, CONFIG.input_size, "fp32", cache_dir=cache,
                                        config_name=CONFIG.name)
    assert not again.converted
    assert irs[0].stat().st_mtime_ns == written
    assert list(irs[0].parent.glob("compiled-fp32-*/*.blob")), "compiled blobs are cached too"
    torch.testing.assert_close(again.run(inputs), expected, rtol=0, atol=0)


def test_cache_keys_change_with_what_changes_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    base = ir_key("a" * 64, CONFIG.name, CONFIG.input_size)
    assert ir_key("b" * 64, CONFIG.name, CONFIG.input_size) != base
    assert ir_key("a" * 64, "coco-w8-96x64-waspv1", CONFIG.input_size) != base
    assert ir_key("a" * 64, CONFIG.name, (128, 96)) != base
    assert blobs_key("fp32") != blobs_key("bf16")
    uncapped = blobs_key("fp32")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert blobs_key("fp32") != uncapped


def test_unwritable_cache_warns_once_and_runs_uncached(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger=openvino_runtime.__name__):
        assert usable_cache_dir(blocker / "cache") is None
    assert len(caplog.records) == 1 and "runs uncached" in caplog.records[0].getMessage()
    assert usable_cache_dir(None) is None
    assert usable_cache_dir(tmp_path / "fine") == tmp_path / "fine" / "openvino"


def test_bf16_is_refused_without_native_bf16(runner: OpenVinoRunner,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match="needs a CPU with native bf16"):
        OpenVinoRunner(runner.ov_model, "bf16")


def test_bf16_where_native_runs_in_bf16_close_to_fp32(runner: OpenVinoRunner) -> None:
    if not precision_module.cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16")
    bf16 = OpenVinoRunner(runner.ov_model, "bf16", threads=torch.get_num_threads(), streams=1)
    compiled = bf16._compiled[torch.get_num_threads()]
    assert "bf" in str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
    inputs = crops(2, seed=7)
    assert bf16.run(inputs).shape == runner.run(inputs).shape


def test_unknown_and_unsupported_precisions_are_clear_errors(runner: OpenVinoRunner,
                                                             network: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="runs fp32, bf16, int8, not 'fp16'"):
        OpenVinoRunner(runner.ov_model, "fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="runs fp32 or bf16, not fp16"):
        build_runner("openvino", network, CONFIG.input_size, "cpu", "fp16")
    with pytest.raises(ValueError, match="needs a quantised model"):
        build_runner("openvino", network, CONFIG.input_size, "cpu", "int8")
    with pytest.raises(ValueError, match="int8 runs on the openvino backend"):
        TorchRunner(torch.nn.Conv2d(3, 17, 4), "cpu", "int8")
    with pytest.raises(ValueError, match="at least 1"):
        OpenVinoRunner(runner.ov_model, "fp32", threads=0)


def test_service_reports_the_openvino_backend(cache: Path) -> None:
    """/v1/models' description and the model-info metric name the backend and precision."""
    loaded = loading.load_pose_model(device="cpu", precision="auto", backend="openvino",
                                     cache_dir=cache)
    described = loaded.describe()
    auto = "bf16" if precision_module.cpu_has_native_bf16() else "fp32"  # as torch's auto
    assert (described["backend"], described["precision"]) == ("openvino", auto)

    class Detector:
        name = "none"

    info = startup.model_info(loaded, Detector(), None)  # type: ignore[arg-type]
    assert (info["backend"], info["precision"]) == ("openvino", auto)


def test_openvino_is_imported_without_its_telemetry_package() -> None:
    """``import openvino`` posts usage telemetry unless opted out: imported through the runner,
    its telemetry package cannot load, so OpenVINO falls back to its no-op stub and starts no
    sender thread."""
    import subprocess
    import sys

    script = (
        "import sys, threading\n"
        "from omnipose.model.openvino_runtime import import_openvino\n"
        "import_openvino()\n"
        "from openvino.tools.ovc import telemetry_utils\n"
        "print(sys.modules['openvino_telemetry'] is None, len(threading.enumerate()),"
        " telemetry_utils.tm.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out[:2] == ["True", "1"] and out[2].endswith("telemetry_stub")


def test_conversion_starts_no_telemetry_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """openvino.convert_model would send OpenVINO's usage telemetry: the runner converts without
    it, so the service makes no network calls."""
    openvino = openvino_runtime.import_openvino()

    def telemetry(*args: object, **kwargs: object) -> None:
        raise AssertionError("openvino.convert_model starts usage telemetry")

    monkeypatch.setattr(openvino, "convert_model", telemetry)
    before = set(threading.enumerate())
    ov_model = openvino_runtime.convert_network(torch.nn.Conv2d(3, 17, 4, stride=4), (64, 48))
    assert ov_model.inputs[0].get_partial_shape().to_string() == "[?,3,64,48]"
    assert set(threading.enumerate()) <= before


def test_a_lone_batch_is_measured_and_can_take_every_core_on_openvino(
        runner: OpenVinoRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a measured 2 x 1 layout the engine measures lone batches on the OpenVINO runner as
    on torch's (the runner follows the calling thread's thread count), and a lone batch sent as
    one call runs on one stream with both cores, not spread 2 + 1 over two 1-thread streams."""
    served = OpenVinoRunner(runner.ov_model, "fp32", cpus=2)  # threads from each caller
    estimator = TopDownPoseEstimator(served, CONFIG, flip_test=False)
    layout, rule = choose_layout_as_if_2x1_fastest(monkeypatch, estimator, backend="openvino",
                                                   precision="fp32")
    assert (layout.instances, layout.threads) == (2, 1)
    assert rule is not None and min(rule.spread_one_s, rule.all_cores_one_s) > 0
    compiled = [*served._compiled.values(), *([served._all_cores] if served._all_cores else [])]
    assert any(model.get_property("INFERENCE_NUM_THREADS") == 2
               and model.get_property("NUM_STREAMS") == 1 for model in compiled)
