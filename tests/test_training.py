"""Training loop, checkpoints, resume, DDP, export, CLI and a learning test, on synthetic data.

Everything runs on the CPU with the tiny test-only width 8 at 96x64 (``synth-w8-96x64``), one
torch thread per process (two-core CI machine shared with the data-loading worker).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from omnipose.model.checkpoint import load_model, read_checkpoint
from omnipose.model.network import OmniPose, UpsampleFusion
from omnipose.training.cli import main as cli_main
from omnipose.training.config import ExperimentConfig, load_config
from omnipose.training.distributed import cleanup_distributed, init_distributed
from omnipose.training.engine import Trainer, TrainingError
from omnipose.training.evaluate import evaluate_model
from omnipose.training.init import (
    BACKBONE_PREFIXES,
    CLASSIFIER_PREFIXES,
    InitError,
    load_imagenet_backbone,
)
from omnipose.training.synth import generate_dataset

RECIPE = "synth-w8-96x64"


@pytest.fixture(scope="module")
def synth_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few synthetic images per split: enough for loop mechanics, not for learning."""
    root = tmp_path_factory.mktemp("synth_small")
    generate_dataset(root, 12, seed=3, split="train", workers=1, progress=False)
    generate_dataset(root, 4, seed=4, split="val", workers=1, progress=False)
    return root


def small_config(root: Path, output_dir: Path, *overrides: str) -> ExperimentConfig:
    return load_config(
        RECIPE,
        [
            f"data.root={root}",
            f"output_dir={output_dir}",
            "data.num_workers=0",
            "train.batch_size=4",
            "train.max_steps_per_epoch=2",
            "train.num_threads=1",
            "train.progress=false",
            "train.tensorboard=false",
            "test.batch_size=16",
            *overrides,
        ],
    )


# --- checkpoints and exact resume ---------------------------------------------------------------


def test_resume_continues_exactly_like_an_uninterrupted_run(synth_small: Path, tmp_path: Path):
    common = ("train.deterministic=true", "train.lr_steps=1", "train.val_every=5")
    straight = Trainer(small_config(synth_small, tmp_path / "straight", "train.epochs=2", *common),
                       echo=False).fit()  # fmt: skip
    assert len(straight.step_losses) == 4

    first_half = Trainer(small_config(synth_small, tmp_path / "split", "train.epochs=1", *common),
                         echo=False).fit()  # fmt: skip
    assert first_half.step_losses == straight.step_losses[:2]
    state = torch.load(first_half.last_checkpoint, weights_only=True)  # plain data only
    assert state["training_state"]["epoch"] == 1 and state["training_state"]["global_step"] == 2

    # a different seed proves that the RNG and weights come from the checkpoint, not the config
    resumed_trainer = Trainer(
        small_config(synth_small, tmp_path / "split", "train.epochs=2", "train.seed=99", *common),
        resume=first_half.last_checkpoint,
        echo=False,
    )
    decayed = resumed_trainer.config.train.lr * resumed_trainer.config.train.lr_factor
    assert resumed_trainer.optimizer.param_groups[0]["lr"] == pytest.approx(decayed)  # restored
    resumed = resumed_trainer.fit()
    assert resumed.step_losses == straight.step_losses[2:]
    straight_weights = read_checkpoint(straight.last_checkpoint).state_dict
    resumed_weights = read_checkpoint(resumed.last_checkpoint).state_dict
    for key, value in straight_weights.items():
        assert torch.equal(value, resumed_weights[key]), key

    # the best and last checkpoints are servable project files
    _, config, loaded = load_model(resumed.best_checkpoint)
    assert config.name == "coco-w8-96x64" and loaded.metadata["model_config"] == config.name
    assert "AP" in loaded.metadata["metrics"]


def test_resume_may_extend_the_schedule(synth_small: Path, tmp_path: Path) -> None:
    """A finished run continues with a longer schedule: the position (epoch, lr, Adam moments)
    comes from the checkpoint, the milestones and weight decay from the resuming config."""
    first = Trainer(
        small_config(synth_small, tmp_path, "train.epochs=1", "train.lr_steps=[1]",
                     "train.weight_decay=1e-4", "train.val_every=5"),
        echo=False,
    ).fit()  # fmt: skip
    longer = small_config(synth_small, tmp_path, "train.epochs=3", "train.lr_steps=[2]",
                          "train.weight_decay=0", "train.val_every=5")  # fmt: skip
    trainer = Trainer(longer, resume=first.last_checkpoint, echo=False)
    lr = longer.train.lr
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.1)  # decayed once
    assert sorted(trainer.scheduler.milestones) == [2]
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.0
    assert trainer.optimizer.state  # Adam's moments came along
    result = trainer.fit()
    assert [e.epoch for e in result.epochs] == [2, 3]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.01)  # new milestone


def test_resume_refuses_weights_only_files(synth_small: Path, tmp_path: Path) -> None:
    run = Trainer(small_config(synth_small, tmp_path, "train.epochs=1"), echo=False).fit()
    with pytest.raises(TrainingError, match="no training state"):
        Trainer(small_config(synth_small, tmp_path / "b", "train.epochs=2"),
                resume=run.best_checkpoint, echo=False)  # fmt: skip


def test_best_model_is_picked_by_ap_then_mean_oks(synth_small: Path, tmp_path: Path) -> None:
    trainer = Trainer(small_config(synth_small, tmp_path), echo=False)
    trainer.best_metric, trainer.best_metrics = 0.0, {"AP": 0.0, "OKS": 0.20}
    assert trainer._is_improvement({"AP": 0.0, "OKS": 0.25}, 0.0)  # AP still 0: OKS decides
    assert not trainer._is_improvement({"AP": 0.0, "OKS": 0.15}, 0.0)
    assert trainer._is_improvement({"AP": 0.01, "OKS": 0.05}, 0.01)  # AP first
    trainer.best_metric = 0.02
    assert not trainer._is_improvement({"AP": 0.01, "OKS": 0.9}, 0.01)


# --- distributed ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, root: str, output: str) -> None:
    """One rank of a gloo DDP run, as torchrun would start it (environment variables)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    try:
        # the published batch is one step's whole batch: 4 over 2 processes -> 2 each
        config = small_config(Path(root), Path(output) / "run", "train.epochs=1",
                              "train.batch_size=4", "train.max_steps_per_epoch=3")  # fmt: skip
        trainer = Trainer(config, context, echo=False)
        result = trainer.fit()
        torch.save(
            {
                "state_dict": {k: v.cpu() for k, v in trainer.network.state_dict().items()},
                "steps": len(result.step_losses),
                "batch_per_process": trainer.batch_per_process,
                "best": result.best_metric,
            },
            Path(output) / f"rank{rank}.pt",
        )
    finally:
        cleanup_distributed()


@pytest.mark.slow
def test_two_process_gloo_ddp_keeps_ranks_identical(synth_small: Path, tmp_path: Path) -> None:
    mp.spawn(
        _ddp_worker, args=(2, _free_port(), str(synth_small), str(tmp_path)), nprocs=2, join=True
    )
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["steps"] == rank1["steps"] == 3
    assert rank0["batch_per_process"] == rank1["batch_per_process"] == 2
    metadata = read_checkpoint(tmp_path / "run" / "last.pt").metadata
    assert metadata["training"]["batch_size_total"] == 4 == metadata["training"]["recipe"][
        "train"]["batch_size"]  # fmt: skip
    assert rank0["best"] == rank1["best"]  # metric broadcast from rank 0
    initial = OmniPose(17, 8).state_dict()
    changed = 0
    for key, value in rank0["state_dict"].items():
        assert torch.equal(value, rank1["state_dict"][key]), key
        changed += int(not torch.equal(value, initial[key]))
    assert changed > 100  # it trained
    written = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert written == ["last.pt", "model_best.pt", "train.log"]  # rank 0 only, once


# --- starting points: ImageNet backbone, OmniPose checkpoint -------------------------------------


def _imagenet_file(path: Path, width: int, layout: str) -> dict[str, torch.Tensor]:
    """An HRNet-W``width`` ImageNet classification state_dict built from our own backbone's key
    names and shapes (no download), plus the classification head both layouts carry.

    ``timm``: a bare state_dict as timm's ``hrnet_wNN`` stores it. ``original``: the
    HRNet-Image-Classification layout saved from DataParallel (``module.`` keys under
    ``state_dict``) without ``num_batches_tracked`` (files of old PyTorch versions lack them).
    """
    torch.manual_seed(width)
    model = OmniPose(17, width)
    fusion_only = tuple(
        f"{name}.{index}."
        for name, module in model.named_modules()
        if isinstance(module, UpsampleFusion)
        for index in range(2, len(module))
    )  # fmt: skip  HRNet's upsampling fusion stops after conv1x1 (0) and BN (1)
    weights = {
        key: torch.randn_like(value.float()).to(value.dtype) if value.is_floating_point() else value
        for key, value in model.state_dict().items()
        if key.startswith(BACKBONE_PREFIXES) and not key.startswith(fusion_only)
    }
    head_bias = layout.startswith("timm")
    weights["incre_modules.0.0.conv1.weight"] = torch.randn(32, width, 1, 1)
    weights["downsamp_modules.0.0.weight"] = torch.randn(256, 128, 3, 3)
    weights["final_layer.0.weight"] = torch.randn(2048, 1024, 1, 1)
    if head_bias:
        weights["final_layer.0.bias"] = torch.randn(2048)
    weights["classifier.weight"] = torch.randn(1000, 2048)
    weights["classifier.bias"] = torch.randn(1000)
    if layout == "timm":
        torch.save(weights, path)
    elif layout == "timm-safetensors":  # the format timm's hub files come in
        from safetensors.torch import save_file

        save_file(weights, str(path))
    else:
        weights = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
        torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, path)
    return weights


@pytest.mark.parametrize("layout", ["timm", "timm-safetensors", "original"])
def test_imagenet_init_maps_both_layouts_onto_the_backbone(layout, tmp_path: Path, caplog):
    suffix = ".safetensors" if layout.endswith("safetensors") else ".pth"
    path = tmp_path / f"hrnet_w8_{layout}{suffix}"
    weights = _imagenet_file(path, 8, layout)
    model = OmniPose(17, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.DEBUG, logger="omnipose.training.init"):
        report = load_imagenet_backbone(model, path)
    after = model.state_dict()
    head = [k for k in weights if k.startswith(CLASSIFIER_PREFIXES)]
    assert sorted(report.unused) == sorted(head)
    assert sorted(report.used) == sorted(set(weights) - set(head))
    for key in report.used:  # every mapped tensor landed in the parameter of the same role
        assert torch.equal(after[key], weights[key]), key
    # the stem, a branch block, a transition and HRNet's 1x1 conv + BN of an upsampling fusion
    for key in (
        "conv1.weight",
        "layer1.0.downsample.0.weight",
        "transition3.3.0.0.weight",
        "stage4.2.branches.3.3.bn2.running_var",
        "stage3.1.fuse_layers.0.2.0.weight",
        "stage3.1.fuse_layers.0.2.1.bias",
        "stage4.0.fuse_layers.3.0.2.0.weight",
    ):
        assert torch.equal(after[key], weights[key]), key  # fmt: skip
    # OmniPose's transposed-conv fusion and the head keep their initialisation
    for key in ("stage3.1.fuse_layers.0.2.2.weight", "stage3.1.fuse_layers.0.2.3.weight"):
        assert key in report.not_initialised and torch.equal(after[key], before[key])
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("waspv2."))
    assert not any(key.startswith("waspv2.") for key in report.not_initialised)
    summary = report.summary()
    assert f"{len(report.used)} of {len(weights)} file tensors used" in summary
    assert f"{len(head)} unused ({len(head)} of the classification head)" in summary
    assert "0 missing from the file" in summary
    logged = caplog.text
    assert "used [" in logged and "classifier.weight" in logged and "fuse_layers.0.2.2" in logged


def test_imagenet_init_refuses_other_widths_and_non_hrnet_files(tmp_path: Path) -> None:
    path = tmp_path / "hrnet_w16.pth"
    _imagenet_file(path, 16, "timm")
    with pytest.raises(InitError, match="HRNet-W16 but the model is W8; use the hrnet_w8"):
        load_imagenet_backbone(OmniPose(17, 8), path)
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(InitError, match="not an HRNet backbone"):
        load_imagenet_backbone(OmniPose(17, 8), path)


def test_init_starts_training_from_the_given_weights(synth_small: Path, tmp_path: Path, capsys):
    imagenet = tmp_path / "hrnet_w8.pth"
    weights = _imagenet_file(imagenet, 8, "timm")
    config = small_config(synth_small, tmp_path / "a", f"model.pretrained={imagenet}")
    trainer = Trainer(config)
    assert torch.equal(trainer.network.state_dict()["stage2.0.branches.1.0.conv1.weight"],
                       weights["stage2.0.branches.1.0.conv1.weight"])  # fmt: skip
    assert "ImageNet init" in capsys.readouterr().out
    # fine-tuning: any OmniPose checkpoint, here the published checkpoint.pth layout
    torch.manual_seed(5)
    source = OmniPose(17, 8)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in
                                           source.state_dict().items()}}, checkpoint)  # fmt: skip
    config = small_config(synth_small, tmp_path / "b", f"model.init_weights={checkpoint}")
    tuned = Trainer(config, echo=False).network.state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in source.state_dict().items())
    both = small_config(synth_small, tmp_path / "c", f"model.pretrained={imagenet}",
                        f"model.init_weights={checkpoint}")  # fmt: skip
    with pytest.raises(TrainingError, match="give one"):
        Trainer(both, echo=False)


def test_cli_init_argument(tmp_path: Path, capsys) -> None:
    imagenet = tmp_path / "hrnet.pth"
    imagenet.write_bytes(b"x")
    argv = ["train", RECIPE, "--init", "imagenet", str(imagenet), "train.epochs=3",
            "--print-config"]  # fmt: skip
    assert cli_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["pretrained"] == str(imagenet) and printed["train"]["epochs"] == 3
    assert cli_main(["train", RECIPE, "--init", str(imagenet), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["init_weights"] == str(imagenet)
    assert cli_main(["train", RECIPE, "--init", "imagenet", "/no/such.pth"]) == 2
    assert "--init: file /no/such.pth not found" in capsys.readouterr().err


# --- command line and export --------------------------------------------------------------------


def test_cli_train_eval_export_round_trip(synth_small: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    code = cli_main([
        "train", RECIPE, f"data.root={synth_small}", "data.num_workers=0",
        "--set", "train.epochs=1", "train.max_steps_per_epoch=1", "train.batch_size=4",
        "train.num_threads=1", "train.progress=false", "--output-dir", str(run_dir),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "epoch 1/1" in out and "img/s" in out and "val AP" in out
    assert (run_dir / "tensorboard").is_dir() and any((run_dir / "tensorboard").iterdir())

    code = cli_main(["eval", RECIPE, f"data.root={synth_small}", "data.num_workers=0",
                     "--weights", str(run_dir / "model_best.pt"), "--no-flip",
                     "--results", str(tmp_path / "results.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "AP50" in out and "flip test off" in out
    assert (tmp_path / "results.json").stat().st_size > 0

    exported = tmp_path / "serve.pt"
    assert cli_main(["export", "--weights", str(run_dir / "last.pt"), "--out", str(exported)]) == 0
    assert "training_state" not in torch.load(exported, weights_only=True)  # slim
    model, _, loaded = load_model(exported)
    metadata = loaded.metadata
    assert metadata["input_size"] == [96, 64] and len(metadata["joints"]) == 17
    assert [5, 6] in metadata["flip_pairs"] and [15, 13] in metadata["skeleton"]
    assert metadata["training"]["train_split"] == "train" and "AP" in metadata["metrics"]
    trained = read_checkpoint(run_dir / "last.pt").state_dict
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    # a published-style bare state_dict with the DataParallel prefix exports too
    bare = tmp_path / "published.pth"
    torch.save({f"module.{k}": v for k, v in trained.items()}, bare)
    assert cli_main(["export", "--weights", str(bare), "--out", str(tmp_path / "p.pt"),
                     "--config", "coco-w8-128x96"]) == 0  # fmt: skip
    _, published_config, published = load_model(tmp_path / "p.pt")
    assert published_config.name == "coco-w8-128x96"
    assert published.metadata["training"]["source"].startswith("published")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "no-such-recipe"], "unknown training config 'no-such-recipe'"),
        (["train", RECIPE, "data.root=/no/such/dir"], "data root /no/such/dir not found"),
        (["train", RECIPE, "train.epochs=zero"], "bad value for train.epochs"),
        (["eval", RECIPE, "--weights", "/no/such.pt"], "weights file /no/such.pt not found"),
        (["export", "--weights", "/no/such.pt", "--out", "x.pt"], "/no/such.pt: file not found"),
        (["train", RECIPE, "--resume", "/no/last.pt"], "resume checkpoint /no/last.pt not found"),
    ],
)
def test_cli_user_errors_are_one_line(argv, message, synth_small: Path, capsys) -> None:
    if "--resume" in argv:  # needs real data to get as far as reading the checkpoint
        argv = [argv[0], argv[1], f"data.root={synth_small}", "data.num_workers=0", *argv[2:]]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


# --- learning -------------------------------------------------------------------------------------

# One standing, camera-facing person of 0.4-0.7 x the image height per image: the full synthetic
# variety needs tens of thousands of crops before AP leaves zero (AP 0.007 after 51k crops of the
# default set), which no test can afford. On this set, with crops at the ground-truth box (no
# scale augmentation) and a high learning rate, held-out OKS rises from ~0.02 to 0.3-0.45 within
# 100 steps: early on the number of steps matters more than their size, so the batches are small
# (4 crops: about 0.7 x the time of 8 at the same step count). 132 steps leave a margin, the lr
# dropping x0.1 for the last 22.
LEARNING_SCENE = {"max_people": 1, "pose_families": ("stand",), "views": ("front",),
                  "height_range": (0.4, 0.7)}  # fmt: skip
TRAIN_IMAGES, HELDOUT_IMAGES = 240, 60
EPOCHS, STEPS_PER_EPOCH, BATCH, LR = 6, 22, 4, 5e-3  # 132 optimiser steps, 528 crops
LR_STEP = 5  # lr x0.1 for the last epoch
# Calibrated on data/training-seed draws (CPU, 1 thread): after 132 steps of 4 crops held-out OKS
# 0.455, 0.454, 0.371 and AP 0.039, 0.052, 0.014 (this test's seeds first; untrained OKS
# 0.019-0.029, AP 0). With 8 crops a step the test's seeds gave OKS 0.463, AP 0.041. The floors
# are about two thirds of the slowest draw. Fewer steps do not hold AP: 100 steps (5 epochs of 20,
# lr x0.1 for the last) gave OKS 0.439, 0.418, 0.283 and AP 0.025, 0.025, 0.000 on the same kind
# of draws (data seeds 11, 21, 31; training seeds 42, 1, 2); 88 steps (4 x 22) gave this test's
# seeds OKS 0.392, AP 0.005. Those draws ran on an AVX-512 CPU; float rounding differs between
# CPUs, so the trajectory does too: on a 2-vCPU AVX2-only EPYC this test's seeds give OKS 0.388,
# AP 0.011, a thinner margin over the AP floor: any change of rounding (optimiser kernel, torch
# version) should be checked against this test on such a CPU too.
AP_FLOOR = 0.009
OKS_FLOOR = 0.25
OKS_GAIN = 5.0  # trained mean OKS over the untrained network's


@pytest.mark.slow
def test_training_learns_held_out_poses(tmp_path: Path) -> None:
    """The loop must learn: held-out COCO OKS and AP of the trained network against the same
    network before training, evaluated in the same test.

    The run is bounded by optimiser steps (one thread, no loader worker), so a loaded machine
    makes it slower, never different. Augmentation is off (flip, rotation and half-body slow the
    first few thousand samples down; held-out crops are cut at ground-truth boxes, so random
    scale adds nothing the evaluation asks for), and the held-out set is evaluated without flip
    test.
    """
    generate_dataset(tmp_path, TRAIN_IMAGES, seed=11, split="train", workers=1, progress=False,
                     **LEARNING_SCENE)  # fmt: skip
    generate_dataset(tmp_path, HELDOUT_IMAGES, seed=12, split="heldout", workers=1,
                     progress=False, **LEARNING_SCENE)  # fmt: skip
    config = load_config(
        RECIPE,
        [
            f"data.root={tmp_path}", "data.val_split=heldout", f"output_dir={tmp_path / 'run'}",
            "data.num_workers=0", "train.num_threads=1", f"train.batch_size={BATCH}",
            f"train.epochs={EPOCHS}", f"train.max_steps_per_epoch={STEPS_PER_EPOCH}",
            f"train.val_every={EPOCHS}", f"train.lr={LR}", f"train.lr_steps={LR_STEP}",
            "data.scale_factor=0", "data.rotation_prob=0", "data.half_body_prob=0",
            "data.flip=false", "test.flip_test=false", "train.progress=false",
            "train.tensorboard=false",
        ],
    )  # fmt: skip
    trainer = Trainer(config, echo=False)
    cpu = torch.device("cpu")
    untrained = evaluate_model(trainer.network, config, device=cpu, progress=False)
    result = trainer.fit()
    trained = evaluate_model(trainer.network, config, device=cpu, progress=False)
    print(f"held-out untrained {untrained.metrics}\nheld-out trained {trained.metrics}")
    assert len(result.step_losses) == EPOCHS * STEPS_PER_EPOCH
    assert result.epochs[-1].loss < 0.6 * result.epochs[0].loss
    assert trained.metrics["OKS"] >= OKS_FLOOR
    assert trained.metrics["OKS"] >= OKS_GAIN * untrained.metrics["OKS"]
    assert trained.metrics["AP"] >= AP_FLOOR
    assert trained.metrics["AP"] >= 10 * untrained.metrics["AP"]
    assert trained.metrics["AP"] == pytest.approx(result.best_metric)  # same model, same path
