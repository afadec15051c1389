"""The ``omnipose`` command as a user runs it: results, rendering, and one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bench.samples import BUS_JPG, ZIDANE_JPG
from omnipose.cli.main import main
from omnipose.cli.predict import image_id_for
from omnipose.model.checkpoint import save_checkpoint
from omnipose.model.configs import get_config
from omnipose.model.network import OmniPose, build_model
from omnipose.service import loading
from omnipose.service.server import add_settings_arguments, settings_from_args

LIGHT = "coco-w18-128x96"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_writes_coco_results_and_overlay(tmp_path, capsys) -> None:
    out, render = tmp_path / "results.json", tmp_path / "rendered"
    code, _, err = run_cli(capsys, "predict", str(BUS_JPG), "--config", LIGHT, "--device", "cpu",
                           "--out", str(out), "--render", str(render))
    assert code == 0, err
    results = json.loads(out.read_text())
    assert len(results) >= 2  # HOG finds at least two of the four people on the bus photo
    for annotation in results:
        assert annotation["category_id"] == 1
        assert len(annotation["keypoints"]) == 17 * 3
        x, y, w, h = annotation["bbox"]
        assert 0 <= x < 810 and 0 <= y < 1080 and w > 0 and h > 0
    overlay = cv2.imread(str(render / "bus_pose.jpg"))
    assert overlay.shape == (1080, 810, 3)
    assert np.abs(overlay.astype(int) - cv2.imread(str(BUS_JPG)).astype(int)).max() > 100
    if "NO WEIGHTS" in err:  # no embedded default: the untrained warning must be loud
        assert "meaningless" in err


def test_predict_with_boxes_mapping_for_two_images(tmp_path, capsys) -> None:
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({
        BUS_JPG.name: [[50, 400, 200, 500], [220, 400, 120, 480]],
        ZIDANE_JPG.name: [[100, 50, 500, 650]],
    }))  # fmt: skip
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "predict", str(BUS_JPG), str(ZIDANE_JPG), "--boxes", str(boxes),
                           "--detector", "none", "--config", LIGHT, "--no-flip", "--out", str(out))
    assert code == 0, err
    results = json.loads(out.read_text())
    by_image = {}
    for annotation in results:
        by_image.setdefault(annotation["image_file"], []).append(annotation["bbox"])
    assert sorted(by_image[str(ZIDANE_JPG)]) == [[100, 50, 500, 650]]
    assert 1 <= len(by_image[str(BUS_JPG)]) <= 2


def test_whole_image_fallback_is_explicit(tmp_path, capsys) -> None:
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 160, 3), 90, np.uint8))
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "predict", str(blank), "--config", LIGHT, "--out", str(out))
    assert code == 0 and json.loads(out.read_text()) == []
    assert "no person detected" in err
    code, _, _ = run_cli(capsys, "predict", str(blank), "--config", LIGHT, "--out", str(out),
                         "--whole-image-if-no-person")
    results = json.loads(out.read_text())
    assert code == 0 and [r["bbox"] for r in results] == [[0, 0, 160, 200]]


def mismatched_checkpoint(path: Path) -> Path:
    """A valid project checkpoint for MPII (16 joints), to be refused for a COCO config."""
    config = get_config("mpii-w18-256x256")
    save_checkpoint(path, build_model(config), config)
    return path


@pytest.mark.parametrize(
    ("make_args", "fragment"),
    [
        (lambda d: [str(d / "missing.jpg")], "missing.jpg: cannot read file"),
        (lambda d: [str(d / "empty.jpg")], "empty.jpg: the image is empty"),
        (lambda d: [str(d / "text.jpg")], "not a recognised image"),
        (lambda d: [str(BUS_JPG), "--weights", str(d / "text.jpg")], "text.jpg"),
        (lambda d: [str(BUS_JPG), "--weights", str(d / "nope.pt")], "nope.pt"),
        (lambda d: [str(BUS_JPG), "--weights", str(mismatched_checkpoint(d / "mpii.pt")),
                    "--config", "coco-w18-256x192"], "expects coco"),
        (lambda d: [str(BUS_JPG), "--config", "coco-w99-1x1"], "must be multiples of 32"),
        (lambda d: [str(BUS_JPG), "--config", "body-w18-256x192"], "unknown model config"),
        (lambda d: [str(BUS_JPG), "--boxes", str(d / "bad_boxes.json")], "positive width"),
        (lambda d: [str(BUS_JPG), "--boxes", str(d / "three_boxes.json"), "--max-persons", "2"],
         "3 boxes given, over the limit of 2"),
        (lambda d: [str(BUS_JPG), "--detector", "yolo", "--detector-weights",
                    str(d / "yolo.pt")], "YOLO weights file not found"),
        (lambda d: [str(BUS_JPG), "--device", "cuda:0"] if not torch.cuda.is_available()
         else [str(d / "missing.jpg")], "CUDA is not available|missing.jpg"),
    ],
)
def test_bad_inputs_give_one_line_errors(tmp_path, capsys, make_args, fragment) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image")
    (tmp_path / "bad_boxes.json").write_text("[[10, 10, -5, 20]]")
    (tmp_path / "three_boxes.json").write_text(json.dumps([[50, 400, 200, 500]] * 3))
    args = make_args(tmp_path)
    code, _, err = run_cli(capsys, "predict", *args, "--out", str(tmp_path / "r.json"))
    assert code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("omnipose predict: error:")]
    assert len(error_lines) == 1, err
    assert re.search(fragment, error_lines[0]), error_lines[0]
    assert "Traceback" not in err


def test_console_script_exit_status_and_info(tmp_path) -> None:
    """The installed entry point itself: a bad image exits non-zero with one line, no traceback."""
    script = Path(sys.executable).with_name("omnipose")
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    proc = subprocess.run([str(script), "predict", str(bad), "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("omnipose predict: error: ")
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([str(script), "info", "coco-w48-384x288", "mpii-w48-256x256"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "68,141,357" in proc.stdout and "68,141,308" in proc.stdout


def test_flip_shift_reaches_the_estimator_from_predict_and_serve(tmp_path, capsys,
                                                                monkeypatch) -> None:
    seen: list[bool] = []
    original = loading.load_pose_model

    def recording(*args, **kwargs):
        loaded = original(*args, **kwargs)
        seen.append(loaded.estimator.flip_shift)
        return loaded

    monkeypatch.setattr(loading, "load_pose_model", recording)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([[50, 400, 200, 500]]))
    for flag in ("--flip-shift", "--no-flip-shift"):
        code, _, err = run_cli(capsys, "predict", str(BUS_JPG), "--boxes", str(boxes),
                               "--detector", "none", "--config", LIGHT, flag,
                               "--out", str(tmp_path / "r.json"))
        assert code == 0, err
    assert seen == [True, False]

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    assert settings_from_args(parser.parse_args(["--flip-shift"])).flip_shift is True
    assert settings_from_args(parser.parse_args([])).flip_shift is False


def test_image_ids_come_only_from_plain_digit_file_names() -> None:
    assert image_id_for(Path("000000397133.jpg"), 5) == 397133  # COCO's file names
    assert image_id_for(Path("².jpg"), 5) == 5  # a digit to str.isdigit, not to int()
    assert image_id_for(Path("holiday.jpg"), 6) == 6


def released_head_training_checkpoint(path: Path) -> OmniPose:
    """A light WASPv1 network saved as the published training script's ``checkpoint.pth``."""
    generator = torch.Generator().manual_seed(11)
    network = OmniPose(num_joints=17, width=8, head="waspv1")
    with torch.no_grad():  # distinct values everywhere, BN statistics too: clear heatmap peaks
        for name, tensor in network.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(noise + 0.5 if "running_var" in name else (noise - 0.5) * 0.2)
    optimizer = torch.optim.Adam(OmniPose(17, 8, "waspv1").parameters(), lr=1e-3)
    for group in optimizer.param_groups:  # one real step so the state holds moments
        for parameter in group["params"]:
            parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    torch.save({
        "epoch": 140,
        "model": "omnipose",
        "state_dict": {f"module.{key}": value for key, value in network.state_dict().items()},
        "best_state_dict": network.state_dict(),
        "perf": np.float64(0.7512),
        "optimizer": optimizer.state_dict(),
    }, path)  # fmt: skip
    return network.eval()


def test_predict_loads_the_authors_training_checkpoint_layout(tmp_path) -> None:
    """``omnipose predict`` as a user runs it on a WASPv1 ``checkpoint.pth``, no head named."""
    weights = tmp_path / "checkpoint.pth"
    released_head_training_checkpoint(weights)
    boxes = [[50, 400, 200, 500], [220, 400, 120, 480]]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    out = tmp_path / "results.json"
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(
        [sys.executable, "-m", "omnipose.cli", "predict", str(BUS_JPG), "--weights", str(weights),
         "--config", "coco-w8-128x96", "--detector", "none", "--boxes",
         str(tmp_path / "boxes.json"), "--device", "cpu", "--precision", "fp32",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "WASPv1" in proc.stderr and "coco-w8-128x96-waspv1" in proc.stderr
    results = json.loads(out.read_text())
    assert sorted(r["bbox"] for r in results) == sorted(boxes)

    # The same weights in process give the same keypoints: the file was loaded as it is.
    loaded = loading.load_pose_model(weights, "coco-w8-128x96", device="cpu")
    assert loaded.config.name == "coco-w8-128x96-waspv1"
    assert loaded.describe()["config"]["head"] == "waspv1"
    image_rgb = cv2.cvtColor(cv2.imread(str(BUS_JPG)), cv2.COLOR_BGR2RGB)
    expected = {
        tuple(pose.bbox.tolist()): pose.keypoints
        for pose in loaded.estimator.estimate(image_rgb, np.array(boxes, dtype=float))
    }
    for annotation in results:
        keypoints = np.array(annotation["keypoints"]).reshape(17, 3)
        np.testing.assert_allclose(keypoints, expected[tuple(annotation["bbox"])], atol=1e-3)


def test_info_is_quick_and_names_recipes_and_the_embedded_default() -> None:
    """The stored table prints without importing torch; a training recipe shows its network."""
    script = (
        "import sys; from omnipose.cli.main import main; main(['info']); "
        "main(['info', 'synth-w8-96x64']); assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "coco-w8-96x64: the embedded default model" in proc.stdout
    assert sum(line.startswith("coco-w8-96x64 ") for line in lines) == 2
    assert "synth-w8-96x64: the training recipe of coco-w8-96x64" in proc.stdout


def test_info_shows_the_head(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "omnipose.cli", "info", "coco-w48-384x288-waspv1", "coco-w8-96x64"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    header, released, light = proc.stdout.strip().splitlines()
    assert header.split()[:2] == ["config", "head"]
    assert released.split()[:2] == ["coco-w48-384x288-waspv1", "WASPv1"]
    assert "68,197,613" in released
    assert light.split()[:2] == ["coco-w8-96x64", "WASPv2"]


def test_serve_help_is_plain_text(capsys) -> None:
    """No docstring markup or Python names in ``omnipose serve --help``; flags say what to give."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at any space
    assert text.startswith("usage: omnipose serve [OPTIONS]")
    for markup in ("``", ":class:", ":func:", "ServiceSettings", "add_serve_parser"):
        assert markup not in text, markup
    assert "--max-inflight-pixels N" in text and "--shutdown-grace-s SECONDS" in text
    assert "at least --max-image-pixels" in text  # other settings named as their flags


def test_training_overrides_may_follow_options(capsys) -> None:
    """``eval NAME --weights FILE data.root=DIR`` reads as the same command with the override
    first; a stray word that is no override is still refused."""
    from omnipose.cli.main import build_parser, parse_arguments

    args = parse_arguments(build_parser("eval"), [
        "eval", "synth-w8-96x64", "train.lr=1e-4", "--weights", "w.pt", "data.root=data/synth",
        "--split", "test"])  # fmt: skip
    assert args.overrides == ["train.lr=1e-4", "data.root=data/synth"] and args.split == "test"
    with pytest.raises(SystemExit):
        parse_arguments(build_parser("predict"), ["predict", "a.jpg", "--out", "r.json", "k=v"])
    assert "unrecognized arguments: k=v" in capsys.readouterr().err
