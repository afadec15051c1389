"""Which weights a server or CLI ends up with: the user's, the embedded default, or none."""

from __future__ import annotations

import pytest

from model.checkpoint import save_checkpoint
from model.configs import get_config
from model.network import build_model
from service import loading


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
