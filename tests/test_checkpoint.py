"""Checkpoint reading/writing: accepted layouts, safe loading, and one-line errors for bad files."""

from __future__ import annotations

import hashlib
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from omnipose.model.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    file_sha256,
    infer_architecture,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from omnipose.model.configs import get_config
from omnipose.model.network import OmniPose
from omnipose.model.skeleton import COCO_KEYPOINTS
from tests.conftest import randomised


class NotAWeight:
    """A custom class: unpickling it would need arbitrary code, which loading must refuse."""

    def __init__(self) -> None:
        self.payload = "anything"


@pytest.fixture(scope="module")
def coco_w8() -> OmniPose:
    """A narrow but structurally complete network: checkpoints of a few MB keep tests fast."""
    return randomised(OmniPose(num_joints=17, width=8), seed=0)


@pytest.fixture(scope="module")
def released_w8() -> OmniPose:
    """The released head (WASPv1) on a narrow backbone."""
    return randomised(OmniPose(num_joints=17, width=8, head="waspv1"), seed=2)


@pytest.fixture(scope="module")
def crop() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def heatmaps(model: OmniPose, crop: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(crop)


def assert_one_line_error(error: pytest.ExceptionInfo, path: Path, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_round_trip_keeps_outputs_config_and_metadata(
    tmp_path: Path, coco_w8: OmniPose, crop: torch.Tensor
) -> None:
    path = tmp_path / "ckpt" / "model.pt"
    config = get_config("coco-w8-128x96")
    metadata = {"train": {"dataset": "coco-2017", "epochs": 3}, "val_ap": 0.5, "tags": ("a", 1)}
    save_checkpoint(path, coco_w8, config, metadata)

    model, loaded_config, checkpoint = load_model(path)
    assert loaded_config == config
    assert not model.training
    assert checkpoint is not None
    assert checkpoint.metadata == {**metadata, "tags": ["a", 1]}  # JSON-normalised
    assert checkpoint.keypoints == COCO_KEYPOINTS
    assert checkpoint.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == checkpoint.sha256
    assert torch.equal(heatmaps(model, crop), heatmaps(coco_w8, crop))
    # The file is a plain dict that any weights_only reader can open.
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["config"]["name"] == config.name
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left over


def test_save_replaces_existing_file_and_rejects_non_json_metadata(
    tmp_path: Path, coco_w8: OmniPose
) -> None:
    path = tmp_path / "model.pt"
    config = get_config("coco-w8-256x192")
    save_checkpoint(path, coco_w8, config, {"version": 1})
    save_checkpoint(path, coco_w8, config, {"version": 2})
    assert read_checkpoint(path).metadata == {"version": 2}
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(path, coco_w8, config, {"bad": object()})
    assert read_checkpoint(path).metadata == {"version": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    with pytest.raises(ValueError, match="expects"):
        save_checkpoint(path, coco_w8, get_config("mpii-w8-256x256"))


def test_config_name_may_override_input_size_only(tmp_path: Path, coco_w8: OmniPose) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, coco_w8, get_config("coco-w8-256x192"))
    _, config, _ = load_model(path, "coco-w8-128x96")
    assert config.name == "coco-w8-128x96"
    with pytest.raises(CheckpointError) as error:
        load_model(path, "coco-w18-256x192")
    assert_one_line_error(error, path, "coco-w8-256x192", "coco-w18-256x192", "expects")


@pytest.mark.parametrize(
    ("layout", "prefix"),
    [("bare", ""), ("state_dict", ""), ("model", ""), ("bare", "module."), ("model", "module.")],
)
def test_published_layouts_load(
    tmp_path: Path, coco_w8: OmniPose, crop: torch.Tensor, layout: str, prefix: str
) -> None:
    state = {prefix + key: value for key, value in coco_w8.state_dict().items()}
    payload = state if layout == "bare" else {layout: state, "epoch": 210, "perf": 0.75}
    path = tmp_path / "published.pth"
    torch.save(payload, path)

    model, config, checkpoint = load_model(path)
    # No config stored: dataset from the joint count, width from shapes, largest input size.
    assert config.name == "coco-w8-384x288"
    assert checkpoint is not None and checkpoint.config is None
    assert all(not key.startswith("module.") for key in checkpoint.state_dict)
    assert checkpoint.metadata == ({} if layout == "bare" else {"epoch": 210, "perf": 0.75})
    assert torch.equal(heatmaps(model, crop), heatmaps(coco_w8, crop))


def test_inferred_mpii_and_explicit_config(tmp_path: Path) -> None:
    path = tmp_path / "mpii.pth"
    torch.save(OmniPose(num_joints=16, width=8).state_dict(), path)
    assert load_model(path)[1].name == "mpii-w8-256x256"
    with pytest.raises(CheckpointError) as error:
        load_model(path, "coco-w8-256x192")
    assert_one_line_error(error, path, "16 joints / width 8", "expects 17 joints / width 8")


def test_config_mismatch_in_width(tmp_path: Path, coco_w8: OmniPose) -> None:
    path = tmp_path / "bare.pth"
    torch.save(coco_w8.state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_model(path, "coco-w18-256x192")
    assert_one_line_error(error, path, "17 joints / width 8", "expects 17 joints / width 18")


def test_unknown_config_name_is_a_checkpoint_error(tmp_path: Path, coco_w8: OmniPose) -> None:
    path = tmp_path / "bare.pth"
    torch.save(coco_w8.state_dict(), path)
    with pytest.raises(CheckpointError, match="unknown model config"):
        load_model(path, "nonsense")


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save(NotAWeight(), path)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert_one_line_error(error, path, "NotAWeight", "weights_only")

    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": NotAWeight()}, nested)
    with pytest.raises(CheckpointError) as error:
        load_model(nested)
    assert_one_line_error(error, nested, "NotAWeight")


def test_missing_empty_and_garbage_files(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(CheckpointError) as error:
        load_model(missing)
    assert_one_line_error(error, missing, "not found")

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError) as error:
        load_model(empty)
    assert_one_line_error(error, empty, "empty")

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError) as error:
        load_model(garbage)
    assert_one_line_error(error, garbage, "not a")

    with pytest.raises(CheckpointError) as error:
        read_checkpoint(tmp_path)
    assert_one_line_error(error, tmp_path, "not a regular file")


def test_truncated_and_non_state_dict_files(tmp_path: Path, coco_w8: OmniPose) -> None:
    full = tmp_path / "full.pt"
    torch.save({"conv1.weight": torch.zeros(2, 2)}, full)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(full.read_bytes()[:200])
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(truncated)
    assert_one_line_error(error, truncated, "not a")

    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(listing)
    assert_one_line_error(error, listing, "holds a list")

    wrong_format = tmp_path / "other.pt"
    torch.save({"format": "other/9", "state_dict": coco_w8.state_dict()}, wrong_format)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(wrong_format)
    assert_one_line_error(error, wrong_format, "unsupported format", "other/9")


def test_wrong_shape_is_reported(tmp_path: Path, coco_w8: OmniPose) -> None:
    state = dict(coco_w8.state_dict())
    state["stage2.0.branches.0.0.conv1.weight"] = torch.zeros(8, 8, 1, 1)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert_one_line_error(
        error, path, "shape mismatches 1", "stage2.0.branches.0.0.conv1.weight (8, 8, 1, 1)"
    )


def test_missing_and_unexpected_keys_are_listed_with_counts(
    tmp_path: Path, coco_w8: OmniPose
) -> None:
    state = dict(coco_w8.state_dict())
    removed = [key for key in state if key.startswith("stage3.1.")][:7]
    for key in removed:
        del state[key]
    state["extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "keys.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert_one_line_error(
        error, path, "missing keys 7 (", removed[0], "+2 more", "unexpected keys 1 (extra_head"
    )


def test_extra_keys_alone_are_refused(tmp_path: Path, coco_w8: OmniPose) -> None:
    state = {**coco_w8.state_dict(), "final_layer.weight": torch.zeros(17, 48, 1, 1)}
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert_one_line_error(error, path, "unexpected keys 1 (final_layer.weight)")
    assert "missing" not in str(error.value)


@pytest.mark.parametrize(
    ("num_joints", "width", "head"),
    [(17, 18, "waspv2"), (17, 32, "waspv2"), (16, 18, "waspv2"), (17, 8, "waspv1"),
     (16, 18, "waspv1")],
)  # fmt: skip
def test_infer_architecture(num_joints: int, width: int, head: str) -> None:
    state = OmniPose(num_joints=num_joints, width=width, head=head).state_dict()
    assert infer_architecture(state) == (num_joints, width, head)
    prefixed = {f"module.{key}": value for key, value in state.items()}
    assert infer_architecture(prefixed) == (num_joints, width, head)


@pytest.mark.parametrize(("dataset", "joints"), [("coco", 17), ("mpii", 16)])
@pytest.mark.parametrize("head", ["waspv1", "waspv2"])
def test_head_and_dataset_are_recognised_from_the_keys(
    tmp_path: Path, dataset: str, joints: int, head: str
) -> None:
    path = tmp_path / "model_best.pth"
    torch.save(OmniPose(num_joints=joints, width=8, head=head).state_dict(), path)
    model, config, _ = load_model(path)
    assert (config.dataset, config.width, config.head, model.head) == (dataset, 8, head, head)
    assert config.name.endswith("-waspv1") == (head == "waspv1")


def test_released_weights_switch_a_waspv2_config_to_waspv1(
    tmp_path: Path, released_w8: OmniPose, crop: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    """The authors' files are WASPv1: naming the input size alone must be enough to load them."""
    path = tmp_path / "final_state.pth"
    torch.save(released_w8.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="omnipose.model.checkpoint"):
        model, config, _ = load_model(path, "coco-w8-256x192")
    assert config.name == "coco-w8-256x192-waspv1" and config.head == "waspv1"
    assert "WASPv1" in caplog.text and "coco-w8-256x192-waspv1 instead of coco-w8-256x192" in (
        caplog.text
    )
    assert torch.equal(heatmaps(model, crop), heatmaps(released_w8, crop))
    # ... and the other way round: WASPv2 weights under a -waspv1 name build WASPv2.
    other = tmp_path / "v2.pth"
    torch.save(OmniPose(num_joints=17, width=8).state_dict(), other)
    assert load_model(other, "coco-w8-256x192-waspv1")[1].name == "coco-w8-256x192"


def test_waspv1_project_checkpoint_round_trip(
    tmp_path: Path, released_w8: OmniPose, crop: torch.Tensor
) -> None:
    path = tmp_path / "released.pt"
    config = get_config("coco-w8-128x96-waspv1")
    save_checkpoint(path, released_w8, config)
    assert torch.load(path, weights_only=True)["config"]["head"] == "waspv1"
    model, loaded_config, _ = load_model(path)
    assert loaded_config == config
    assert torch.equal(heatmaps(model, crop), heatmaps(released_w8, crop))
    with pytest.raises(ValueError, match="head"):
        save_checkpoint(path, released_w8, get_config("coco-w8-128x96"))


def test_stored_head_that_contradicts_the_weights_is_refused(
    tmp_path: Path, coco_w8: OmniPose
) -> None:
    path = tmp_path / "lying.pt"
    save_checkpoint(path, coco_w8, get_config("coco-w8-128x96"))
    payload = torch.load(path, weights_only=True)
    payload["config"]["head"] = "waspv1"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert_one_line_error(error, path, "WASPv1 head", "weights are WASPv2")


def test_state_dict_with_both_heads_is_refused(
    tmp_path: Path, coco_w8: OmniPose, released_w8: OmniPose
) -> None:
    path = tmp_path / "both.pth"
    torch.save({**coco_w8.state_dict(), **released_w8.state_dict()}, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert "\n" not in str(error.value) and "both heads" in str(error.value)


def adam_state_after_one_step(model: OmniPose) -> dict:
    """A real optimizer state, as the training script stores it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model.train()(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
    loss.square().mean().backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return optimizer.state_dict()


def training_script_checkpoint(best: OmniPose, last: OmniPose, with_best: bool = True) -> dict:
    """``checkpoint.pth`` as the published (HRNet-style) training script writes it."""
    payload = {
        "epoch": 141,
        "model": "omnipose",
        "state_dict": {f"module.{key}": value for key, value in last.state_dict().items()},
        "perf": np.float64(0.7512),  # the validation AP, a numpy scalar
        "optimizer": adam_state_after_one_step(
            OmniPose(num_joints=last.num_joints, width=last.width, head=last.head)
        ),
    }
    if with_best:
        payload["best_state_dict"] = best.state_dict()
    return payload


def test_training_script_checkpoint_loads_its_best_weights(
    tmp_path: Path, released_w8: OmniPose, crop: torch.Tensor
) -> None:
    last = randomised(OmniPose(num_joints=17, width=8, head="waspv1"), seed=9)
    path = tmp_path / "checkpoint.pth"
    torch.save(training_script_checkpoint(best=released_w8, last=last), path)

    model, config, checkpoint = load_model(path, "coco-w8-128x96")
    assert config.name == "coco-w8-128x96-waspv1"
    assert checkpoint is not None and checkpoint.entry == "best_state_dict"
    assert checkpoint.metadata == {"epoch": 141, "model": "omnipose", "perf": 0.7512}
    assert type(checkpoint.metadata["perf"]) is float  # plain JSON, not numpy
    assert torch.equal(heatmaps(model, crop), heatmaps(released_w8, crop))

    # Without best_state_dict the (module.-prefixed) last weights are used.
    torch.save(training_script_checkpoint(best=released_w8, last=last, with_best=False), path)
    model, _, checkpoint = load_model(path)
    assert checkpoint is not None and checkpoint.entry == "state_dict"
    assert torch.equal(heatmaps(model, crop), heatmaps(last, crop))


def test_numpy_allow_list_is_scoped_to_checkpoint_reading(
    tmp_path: Path, released_w8: OmniPose
) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save(training_script_checkpoint(released_w8, released_w8), path)
    before = set(torch.serialization.get_safe_globals())
    read_checkpoint(path)
    # a set: adding and removing the scoped entries may reorder torch's own collection
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(Exception, match=r"multiarray\.scalar"):  # plain torch.load still refuses
        torch.load(path, weights_only=True)


def rename_pickled_global(path: Path, old: bytes, new: bytes) -> None:
    """Rewrite a torch zip checkpoint's pickle, e.g. to the name numpy 1.x writes."""
    with zipfile.ZipFile(path) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for info, data in entries:
            if info.filename.endswith("/data.pkl"):
                assert old in data
                data = data.replace(old, new)
            target.writestr(info, data)


def test_numpy_1_scalar_name_is_accepted(tmp_path: Path, released_w8: OmniPose) -> None:
    path = tmp_path / "numpy1.pth"
    torch.save({"state_dict": released_w8.state_dict(), "perf": np.float64(0.5)}, path)
    rename_pickled_global(path, b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert read_checkpoint(path).metadata == {"perf": 0.5}


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (np.zeros(3), "multiarray._reconstruct"),  # arrays are not on the list
        (np.str_("best"), "StrDType"),  # nor non-numeric scalars
        (np.datetime64("2021-03-18"), "DateTime64DType"),
    ],
)
def test_numpy_values_beyond_numeric_scalars_are_refused(
    tmp_path: Path, coco_w8: OmniPose, extra: object, fragment: str
) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": coco_w8.state_dict(), "perf": extra}, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert_one_line_error(error, path, fragment, "weights_only")


@pytest.mark.parametrize("value", [np.float32(0.25), np.int64(7), np.bool_(True)])
def test_numeric_numpy_scalars_become_plain_metadata(
    tmp_path: Path, coco_w8: OmniPose, value: np.generic
) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": coco_w8.state_dict(), "value": value}, path)
    stored = read_checkpoint(path).metadata["value"]
    assert stored == value.item() and type(stored) is type(value.item())


def test_infer_architecture_rejects_other_networks(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not an OmniPose state_dict"):
        infer_architecture({"fc.weight": torch.zeros(10, 5), "fc.bias": torch.zeros(10)})
    path = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(10, 5)}, path)
    with pytest.raises(CheckpointError, match="not an OmniPose state_dict"):
        load_model(path)


def test_unknown_joint_count_needs_a_config(tmp_path: Path) -> None:
    path = tmp_path / "hands.pth"
    torch.save(OmniPose(num_joints=21, width=8).state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    assert_one_line_error(error, path, "21 joints", "no known dataset")


def test_no_path_gives_random_model_for_config() -> None:
    model, config, checkpoint = load_model(None, "mpii-w8-256x256")
    assert checkpoint is None and config.name == "mpii-w8-256x256"
    assert not model.training and (model.num_joints, model.width) == (16, 8)
    default_model, default_config, _ = load_model(None)  # the built-in default config
    assert (default_model.num_joints, default_model.width) == (
        default_config.num_joints,
        default_config.width,
    )
