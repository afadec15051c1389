"""Which weights a server or CLI ends up with: the user's, the embedded default, or none."""

from __future__ import annotations

import pytest
import torch

from omnipose.model.checkpoint import save_checkpoint
from omnipose.model.configs import get_config
from omnipose.model.network import OmniPose, build_model
from omnipose.service import loading
from omnipose.service.schemas import ModelDescription


@pytest.fixture
def shipped_default(tmp_path, monkeypatch):
    """A small checkpoint standing in for model/weights/default.pt."""
    config = get_config("coco-w8-96x64")
    path = tmp_path / "default.pt"
    save_checkpoint(path, build_model(config), config, {"data": "synthetic"})
    monkeypatch.setattr(loading, "DEFAULT_WEIGHTS", path)
    return path


def test_no_weights_uses_the_embedded_default(shipped_default) -> None:
    loaded = loading.load_pose_model(device="cpu")
    assert loaded.trained and loaded.is_embedded_default
    assert loaded.config.name == "coco-w8-96x64"
    assert loaded.metadata == {"data": "synthetic"}


def test_default_accepts_another_input_size_of_the_same_network(shipped_default) -> None:
    loaded = loading.load_pose_model(config_name="coco-w8-128x96", device="cpu")
    assert loaded.is_embedded_default and loaded.config.input_size == (128, 96)


def test_a_config_the_default_does_not_fit_gets_an_untrained_network(shipped_default) -> None:
    loaded = loading.load_pose_model(config_name="coco-w18-128x96", device="cpu")
    assert not loaded.trained and loaded.weights_path is None
    assert loaded.config.name == "coco-w18-128x96"


def test_without_a_shipped_default_the_network_is_untrained(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(loading, "DEFAULT_WEIGHTS", tmp_path / "absent.pt")
    loaded = loading.load_pose_model(device="cpu")
    assert not loaded.trained and loaded.version == "untrained"


def test_a_head_the_default_does_not_have_gets_an_untrained_network(shipped_default) -> None:
    loaded = loading.load_pose_model(config_name="coco-w8-96x64-waspv1", device="cpu")
    assert not loaded.trained and loaded.config.head == "waspv1"
    assert loaded.estimator.model.head == "waspv1"


def test_released_head_is_reported_in_the_model_description(tmp_path) -> None:
    path = tmp_path / "model_best.pth"
    torch.save(OmniPose(num_joints=17, width=8, head="waspv1").state_dict(), path)
    loaded = loading.load_pose_model(path, "coco-w8-96x64", device="cpu")
    # what /v1/models reports (the engine adds the detector and batch size)
    description = ModelDescription.model_validate(
        {**loaded.describe(), "detector": "none", "max_batch_size": 1}
    )
    assert description.name == "omnipose-coco-w8-96x64-waspv1"
    assert description.config.head == "waspv1"
