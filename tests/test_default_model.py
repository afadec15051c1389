"""The embedded default checkpoint that ships in the package: present, documented, and trained."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from omnipose.model.checkpoint import read_checkpoint
from omnipose.model.configs import EMBEDDED_DEFAULT_CONFIG
from omnipose.service import loading
from omnipose.training.config import load_config
from omnipose.training.evaluate import evaluate_model
from omnipose.training.synth import generate_dataset

MODEL_CARD = loading.DEFAULT_WEIGHTS.parent / "MODEL_CARD.md"
MAX_BYTES = 25 * 1024 * 1024  # the most the repository may carry for it
# Measured on 40 fresh images of the default synthetic scenes (seed 777, none of the training,
# val or test seeds): AP 0.076, mean OKS 0.495 with flip test (0.066 / 0.478 before the
# fine-tuning under the corrected crop convention); floors at about half of the first.
AP_FLOOR = 0.03
OKS_FLOOR = 0.40


def test_default_checkpoint_ships_with_its_model_card() -> None:
    path = loading.DEFAULT_WEIGHTS
    assert path.is_file(), f"{path} is missing: see {MODEL_CARD.name} for how to make it"
    assert path.stat().st_size <= MAX_BYTES
    card = MODEL_CARD.read_text()
    assert "synthetic figures only" in card and "published" in card
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    assert re.search(rf"SHA-256 `{sha256}`", card), "model card names another file"
    checkpoint = read_checkpoint(path)
    assert checkpoint.config is not None and checkpoint.config.name == "coco-w8-96x64"
    assert checkpoint.config.name == EMBEDDED_DEFAULT_CONFIG  # what `omnipose info` lists
    training = checkpoint.metadata["training"]
    assert training["data_root"] == "data/synth" and training["recipe"]["name"] == "synth-w8-96x64"
    assert checkpoint.metadata["metrics"]["AP"] > 0


def test_no_weights_means_the_trained_default(tmp_path: Path) -> None:
    loaded = loading.load_pose_model(device="cpu")
    assert loaded.trained and loaded.is_embedded_default
    assert loaded.config.name == "coco-w8-96x64"


@pytest.mark.slow
def test_default_model_locates_joints_on_unseen_synthetic_people(tmp_path: Path) -> None:
    """Held-out AP of the shipped weights, through the project's own evaluation."""
    generate_dataset(tmp_path, 40, seed=777, split="fresh", workers=1, progress=False)
    config = load_config("synth-w8-96x64", [f"data.root={tmp_path}", "data.val_split=fresh",
                                            "data.num_workers=0"])  # fmt: skip
    network = loading.load_pose_model(device="cpu").estimator.model
    result = evaluate_model(network, config, device=torch.device("cpu"), progress=False)
    print(result.metrics)
    assert result.metrics["AP"] >= AP_FLOOR
    assert result.metrics["OKS"] >= OKS_FLOOR
