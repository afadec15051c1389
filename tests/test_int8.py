"""Guarded int8 (issue #20): ``omnipose quantize`` and the int8 artifact the service loads.

One small real run on the embedded default (W8 96x64): a synthetic calibration folder and a
different synthetic held-out folder (both cut through the service's crop pipeline), NNCF with
overflow fix, the real guard against OpenVINO fp32. On a CPU with AVX-512 the same artifact is
then checked under AVX2-only kernels in a subprocess (``ONEDNN_MAX_CPU_ISA=AVX2`` set before
openvino loads; the OpenVINO CPU plugin honours it, as the kernel names of its compiled model
show); on an AVX2 CPU the fixture's own run is that check. The artifact is then broken
deliberately for the loader, and served. The fixture keeps the heatmaps of the fp32 reference and
of the guarded int8 model from its own guard run (one pass each over the held-out crops), so the
AVX2 check measures only the int8 model there and compares it with those.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None:
    pytest.skip("needs the openvino extra (openvino, nncf)", allow_module_level=True)

from omnipose.model.checkpoint import load_model, save_checkpoint
from omnipose.model.int8_artifact import (
    SIDECAR_NAME,
    GuardReport,
    Int8ArtifactError,
    load_int8_artifact,
    read_int8_artifact,
    write_int8_artifact,
)
from omnipose.model.openvino_runtime import compiled_kernels, cpu_isa_flags
from omnipose.model.runners import Runner
from omnipose.service import loading
from omnipose.training.int8_guard import RecordingRunner, compare_heatmaps
from omnipose.training.quantize import (
    SHIPPED_SETTINGS,
    SYNTH_HELD_OUT_SEED,
    CropSource,
    openvino_runner,
    quantize_model,
)
from omnipose.training.synth import generate_dataset

CALIBRATION_IMAGES, CALIBRATION_CROPS = 40, 48
HELD_OUT_IMAGES = 60


def _synth(root: Path, split: str, seed: int, count: int) -> CropSource:
    annotations = generate_dataset(root, count, seed=seed, split=split, workers=1, progress=False)
    return CropSource(root / "images" / split, annotations)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("int8")
    calibration = _synth(root / "calibration", "train", 1, CALIBRATION_IMAGES)
    held_out = _synth(root / "held_out", "test", SYNTH_HELD_OUT_SEED, HELD_OUT_IMAGES)
    recorded: dict[str, list[RecordingRunner]] = {}

    def recording_runner(ov_model: object, precision: str) -> Runner:
        """The service's OpenVINO runner, keeping the heatmaps the guard computed with it."""
        runner = RecordingRunner(openvino_runner(ov_model, precision))
        recorded.setdefault(precision, []).append(runner)
        return runner

    result = quantize_model(loading.DEFAULT_WEIGHTS, root / "default.int8",
                            calibration=calibration, held_out=held_out,
                            calibration_crops_count=CALIBRATION_CROPS,
                            ladder=(SHIPPED_SETTINGS,), make_runner=recording_runner)
    (fp32,), (int8,) = recorded["fp32"], recorded["int8"]  # one reference, one attempt
    return {"root": root, "result": result, "held_out": held_out,
            "make_runner": recording_runner, "fp32_heatmaps": torch.cat(fp32.outputs),
            "int8_heatmaps": torch.cat(int8.outputs)}


def test_quantised_default_passes_the_guard_and_is_written(run: dict) -> None:
    result = run["result"]
    guard = result.attempts[-1].guard
    print(guard.summary())
    assert guard.passed, guard.failures()
    assert guard.ap_fp32 > 0.03 and guard.keypoints > 1000  # the trained model, a real check
    assert result.written == run["root"] / "default.int8"
    sidecar = json.loads((result.written / SIDECAR_NAME).read_text())
    assert sidecar["source"]["weights_sha256"] == load_model(loading.DEFAULT_WEIGHTS)[2].sha256
    assert sidecar["quantizer"]["overflow_fix"] == "enable"
    assert sidecar["calibration"]["crops"] == CALIBRATION_CROPS
    assert {"openvino", "nncf"} <= set(sidecar["runtime"])
    assert not Path(str(result.written) + ".rejected.json").exists()


AVX2_GUARD = r"""
import json, sys
import numpy as np
import torch
from omnipose.model.openvino_runtime import compiled_kernels
from omnipose.model.checkpoint import load_model
from omnipose.model.int8_artifact import load_int8_artifact
from omnipose.training.int8_guard import RecordingRunner, measure_guard
from omnipose.training.quantize import held_out_set, openvino_runner
weights, artifact, images, annotations, ap_fp32, fp32_heatmaps, out = sys.argv[1:8]
_, config, loaded = load_model(weights)
int8_model, _ = load_int8_artifact(artifact, loaded.sha256)
held_out = held_out_set(config, images, annotations, "test")
int8 = openvino_runner(int8_model, "int8")
# the kernels of the int8 runner's own compile configuration (explicit f32 for fp32 parts)
kernels = compiled_kernels(int8_model, int8.compile_config(2))
# the guard against the OpenVINO fp32 reference of the same held-out crops (measured natively)
reference = (float(ap_fp32), torch.from_numpy(np.load(fp32_heatmaps)))
recording = RecordingRunner(int8)
report = measure_guard(None, recording, config, held_out, fp32_result=reference)
np.save(out, torch.cat(recording.outputs).numpy())
print(json.dumps({"guard": report.to_dict(), "kernels": kernels}))
"""


def _assert_int8_convolutions_run_avx2_kernels(kernels: list[tuple[str, str]]) -> None:
    """Every convolution (where the int8 arithmetic is) on an AVX2 int8 kernel; a few of
    OpenVINO's own JIT kernels ignore an ISA cap (FakeQuantize and Reduce on 2026.4.1: printed)."""
    convolutions = {kernel for layer, kernel in kernels if "Convolution" in layer}
    assert any("avx2" in kernel and "i8" in kernel.lower() for kernel in convolutions)
    assert not any("avx512" in kernel for kernel in convolutions), convolutions
    assert not any("avx512" in kernel and "i8" in kernel.lower() for _, kernel in kernels)
    print("AVX-512 kernels left:", [pair for pair in kernels if "avx512" in pair[1]])


@pytest.fixture(scope="module")
def capped_run(run: dict) -> dict | None:
    """The guarded int8 model under ``ONEDNN_MAX_CPU_ISA=AVX2`` in a subprocess: its kernels,
    its guard against the fixture's fp32 reference and its heatmaps. None on a CPU whose best is
    AVX2: there the cap changes nothing, and the fixture's own guard run was the AVX2 run."""
    if "avx512f" not in cpu_isa_flags():
        return None
    root, result = run["root"], run["result"]
    fp32_heatmaps, out = root / "fp32_heatmaps.npy", root / "avx2_heatmaps.npy"
    np.save(fp32_heatmaps, run["fp32_heatmaps"].numpy())
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    held_out = run["held_out"]
    completed = subprocess.run(
        [sys.executable, "-c", AVX2_GUARD, str(loading.DEFAULT_WEIGHTS), str(result.written),
         str(held_out.images), str(held_out.annotations),
         repr(result.attempts[-1].guard.ap_fp32), str(fp32_heatmaps), str(out)],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    answer = json.loads(completed.stdout.strip().splitlines()[-1])
    return {"kernels": [tuple(pair) for pair in answer["kernels"]],
            "guard": GuardReport.from_dict(answer["guard"]),
            "heatmaps": torch.from_numpy(np.load(out))}


def test_the_int8_model_passes_the_guard_on_avx2_kernels(run: dict,
                                                        capped_run: dict | None) -> None:
    if capped_run is None:  # this CPU's own kernels are the AVX2 ones
        int8_model, _ = load_int8_artifact(run["result"].written, _sha())
        config = openvino_runner(int8_model, "int8").compile_config(2)
        kernels, guard = compiled_kernels(int8_model, config), run["result"].attempts[-1].guard
    else:
        kernels, guard = capped_run["kernels"], capped_run["guard"]
    _assert_int8_convolutions_run_avx2_kernels(kernels)
    print("AVX2:", guard.summary())
    assert guard.passed, guard.failures()


def test_the_int8_model_computes_the_same_on_avx2_and_avx512(run: dict,
                                                            capped_run: dict | None) -> None:
    """Overflow fix: no saturating VPMADDUBSW on AVX2, so both ISAs give the same heatmaps."""
    if capped_run is None:
        pytest.skip("this CPU has no AVX-512 kernels to compare the AVX2 ones with")
    native = run["int8_heatmaps"]  # from the guard run that wrote the artifact
    shift, confidence = compare_heatmaps(native, capped_run["heatmaps"])
    print(f"AVX2 vs native int8: shift p99 {np.percentile(shift, 99):.4f} px,"
          f" confidence max {np.abs(confidence).max():.2e}")
    assert np.percentile(shift, 99) <= 0.05 and np.abs(confidence).max() <= 1e-3


def _sha() -> str:
    loaded = load_model(loading.DEFAULT_WEIGHTS)[2]
    assert loaded is not None
    return loaded.sha256


def _grey_calibration(root: Path) -> CropSource:
    """A deliberately useless calibration set: flat grey images, so activation ranges are
    far too narrow for real persons."""
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(1, 9):
        cv2.imwrite(str(root / "images" / f"{i}.jpg"), np.full((256, 256, 3), 128, np.uint8))
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 256, "height": 256})
        annotations.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0,
                            "bbox": [60, 30, 100, 180], "area": 18000})
    (root / "boxes.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return CropSource(root / "images", root / "boxes.json")


def test_a_model_that_breaks_the_guard_is_refused_and_nothing_usable_is_written(
        run: dict) -> None:
    root = run["root"] / "broken"
    out = root / "broken.int8"
    result = quantize_model(loading.DEFAULT_WEIGHTS, out, calibration=_grey_calibration(root),
                            held_out=run["held_out"], calibration_crops_count=8,
                            ladder=(SHIPPED_SETTINGS,), make_runner=run["make_runner"],
                            fp32=run["result"].fp32)  # the same weights and held-out set
    guard = result.attempts[-1].guard
    print("broken:", guard.summary())
    assert result.written is None and not guard.passed
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    rejected = json.loads(result.rejected.read_text())
    assert rejected["usable"] is False and rejected["attempts"][0]["guard"]["passed"] is False
    with pytest.raises(Int8ArtifactError, match="fails the guard"):  # no other way to write it
        write_int8_artifact(out, None, {}, guard)


def _copy(run: dict, name: str) -> Path:
    copy = run["root"] / name
    shutil.copytree(run["result"].written, copy)
    return copy


def _edit_sidecar(artifact: Path, change) -> None:
    path = artifact / SIDECAR_NAME
    sidecar = json.loads(path.read_text())
    change(sidecar)
    path.write_text(json.dumps(sidecar))


def test_loader_refuses_other_weights_a_failed_or_missing_guard_and_a_changed_model(
        run: dict) -> None:
    sha = _sha()
    assert read_int8_artifact(run["result"].written, sha).guard.passed
    with pytest.raises(Int8ArtifactError, match="quantised from weights"):
        read_int8_artifact(run["result"].written, "0" * 64)

    failed = _copy(run, "failed.int8")
    _edit_sidecar(failed, lambda s: s["guard"].update(p99_shift_px=0.9, passed=True))
    with pytest.raises(Int8ArtifactError, match="did not pass the accuracy guard"):
        read_int8_artifact(failed, sha)  # figures are re-checked, the stored flag is not trusted
    looser = _copy(run, "looser.int8")
    _edit_sidecar(looser, lambda s: s["guard"].update(
        ap_int8=s["guard"]["ap_fp32"] - 0.2, thresholds={"max_ap_difference": 1.0}))
    with pytest.raises(Int8ArtifactError, match="did not pass"):  # project thresholds apply
        read_int8_artifact(looser, sha)

    missing = _copy(run, "missing.int8")
    (missing / SIDECAR_NAME).unlink()
    with pytest.raises(Int8ArtifactError, match=r"no int8\.json guard sidecar"):
        read_int8_artifact(missing, sha)
    changed = _copy(run, "changed.int8")
    with open(changed / "model.bin", "r+b") as stream:
        stream.seek(100)
        stream.write(b"\x7f")
    with pytest.raises(Int8ArtifactError, match="not the file the guard measured"):
        read_int8_artifact(changed, sha)


def test_service_serves_int8_only_from_a_guarded_artifact(run: dict) -> None:
    from omnipose.service.engine import public_description
    from omnipose.service.schemas import ModelDescription

    with pytest.raises(ValueError, match="only from a guarded int8 model"):
        loading.load_pose_model(backend="openvino", precision="int8", device="cpu")
    missing = _copy(run, "unguarded.int8")
    (missing / SIDECAR_NAME).unlink()
    with pytest.raises(Int8ArtifactError, match="guard sidecar"):
        loading.load_pose_model(backend="openvino", device="cpu", int8_model=missing)
    with pytest.raises(ValueError, match="runs in OpenVINO"):
        loading.load_pose_model(backend="torch", device="cpu", int8_model=run["result"].written)

    served = loading.load_pose_model(backend="openvino", device="cpu",
                                     int8_model=run["result"].written)
    assert served.estimator.precision == "int8"
    height, width = served.config.input_size
    heatmaps = served.estimator.forward(torch.randn(2, 3, height, width))
    assert heatmaps.shape == (2, 17, *served.config.heatmap_size)
    described = ModelDescription(**{**public_description(served.describe()), "detector": "none",
                                    "max_batch_size": 16})
    assert described.int8 is not None and described.int8["guard"]["passed"] is True
    assert described.int8["guard"]["p99_shift_px"] <= 0.5
    assert "/" not in json.dumps(described.int8["name"])  # no server paths


def test_the_shipped_int8_default_is_a_guarded_artifact_of_the_embedded_default() -> None:
    shipped = loading.DEFAULT_WEIGHTS.parent / "default.int8"
    artifact = read_int8_artifact(shipped, _sha())  # hash, IR files and figures all checked
    assert artifact.guard.images >= 300 and artifact.guard.keypoints >= 9000  # the full split
    assert artifact.sidecar["calibration"]["crops"] == 300
    assert artifact.sidecar["quantizer"]["overflow_fix"] == "enable"


def test_quantize_command_refuses_half_a_folder_source_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from omnipose.cli.main import main

    code = main(["quantize", "--out", str(tmp_path / "x.int8"), "--held-out-images",
                 str(tmp_path)])
    assert code == 2 and not (tmp_path / "x.int8").exists()
    assert "give both an image folder and its annotations JSON" in capsys.readouterr().err


def test_backend_auto_serves_the_guarded_int8_beside_the_weights(tmp_path: Path) -> None:
    def must_not_measure(*args):
        raise AssertionError("backend auto measured although a guarded int8 model was beside")

    default = loading.DEFAULT_WEIGHTS
    served = loading.load_pose_model(backend="auto", precision="auto", device="cpu",
                                     choose_runner=must_not_measure)
    assert (served.backend, served.estimator.precision) == ("openvino", "int8")
    assert served.int8 is not None and served.int8["name"] == "default.int8"

    # An explicit precision is a request for float: auto measures instead.
    chosen: list[str] = []

    def measure(network, config, options):
        chosen.append(config.name)
        from omnipose.model.runners import TorchRunner

        return TorchRunner(network, "cpu", "fp32"), None

    fp32 = loading.load_pose_model(backend="auto", precision="fp32", device="cpu",
                                   choose_runner=measure)
    assert chosen and fp32.int8 is None

    # Retrained weights beside the old int8 directory: the hash differs, so it is not served.
    network, config, _ = load_model(default, device="cpu")
    with torch.no_grad():
        next(network.parameters()).add_(0.01)
    retrained = tmp_path / "retrained.pt"
    save_checkpoint(retrained, network, config)
    shutil.copytree(default.parent / "default.int8", loading.int8_beside(retrained))
    chosen.clear()
    kept = loading.load_pose_model(retrained, precision="auto", backend="auto", device="cpu",
                                   choose_runner=measure)
    assert chosen and kept.int8 is None
