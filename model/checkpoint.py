"""Reading, validating and writing OmniPose checkpoints.

Loading only ever goes through ``torch.load(..., weights_only=True)``: a checkpoint is data, and a
file that needs arbitrary unpickling (which can execute code) is refused. Every failure is a
``CheckpointError`` with a one-line message naming the file and the problem, so the CLI and the
service can report it verbatim.

Project checkpoints are plain dicts (so ``weights_only`` can read them)::

    {"format": "omnipose-serve/1", "state_dict": {...}, "config": ModelConfig.to_dict(),
     "keypoints": KeypointSpec.to_dict(), "metadata": {...free JSON...}}

Published checkpoints (a bare state_dict, or one under ``state_dict``/``model``, keys possibly
prefixed ``module.``) load too; their configuration is inferred from tensor shapes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from model.configs import INPUT_SIZES, ModelConfig, get_config
from model.network import OmniPose, build_model
from model.skeleton import KEYPOINT_SPECS, KeypointSpec

CHECKPOINT_FORMAT = "omnipose-serve/1"
DEFAULT_CONFIG_NAME = "coco-w18-256x192"
_STATE_DICT_CONTAINER_KEYS = ("state_dict", "model")
_PREFIXES_TO_STRIP = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
_JOINTS_KEY = "waspv2.last_conv.6.weight"
_WIDTH_KEY = "transition1.0.0.weight"
_MAX_LISTED = 5
_HASH_CHUNK = 1 << 20


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message is one human-readable line."""


@dataclass
class LoadedCheckpoint:
    """What a checkpoint file holds, normalised (state_dict keys without wrapper prefixes)."""

    state_dict: dict[str, Tensor]
    config: ModelConfig | None
    keypoints: KeypointSpec | None
    metadata: dict[str, Any]
    sha256: str
    path: Path | None = field(default=None, compare=False)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed so multi-hundred-MB checkpoints need no extra memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _describe_load_failure(error: Exception) -> str:
    """Boil torch.load's multi-paragraph errors down to one clause."""
    text = str(error)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return (
            f"holds a pickled Python object ({unsafe.group(1)}); refusing to unpickle it "
            "(only weights_only=True loading is allowed)"
        )
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|$)", text, re.DOTALL)
    if detail:
        reason = " ".join(detail.group(1).split())
        return f"is not a PyTorch checkpoint loadable with weights_only=True ({reason})"
    lines = text.strip().splitlines()
    first_sentence = lines[0].split(". ")[0].rstrip(".")[:160] if lines else ""
    return f"is not a readable PyTorch checkpoint ({type(error).__name__}: {first_sentence})"


def _strip_key(key: str) -> str:
    for prefix in _PREFIXES_TO_STRIP:
        key = key.removeprefix(prefix)
    return key


def _strip_prefixes(state_dict: Mapping[str, Any], path: Path | str) -> dict[str, Tensor]:
    """Drop wrapper prefixes (``module.`` etc.) and check every entry is a named tensor."""
    cleaned: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(
                f"checkpoint {path}: state_dict entry {key!r} is a {type(value).__name__}, "
                "not a tensor"
            )
        name = _strip_key(key)
        if name in cleaned:
            raise CheckpointError(f"checkpoint {path}: duplicate key {name!r} after prefix removal")
        cleaned[name] = value
    return cleaned


def _extract_state_dict(payload: Any, path: Path) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise CheckpointError(
            f"checkpoint {path}: holds a {type(payload).__name__}, expected a state_dict or a dict"
        )
    for container in _STATE_DICT_CONTAINER_KEYS:
        if isinstance(payload.get(container), Mapping):
            return payload[container]
    if payload and all(isinstance(value, Tensor) for value in payload.values()):
        return payload
    keys = ", ".join(map(repr, list(payload)[:_MAX_LISTED]))
    raise CheckpointError(
        f"checkpoint {path}: no state_dict found (expected tensors, or a 'state_dict' or 'model' "
        f"entry; top-level keys: {keys or 'none'})"
    )


def _config_from_dict(data: Any, path: Path) -> ModelConfig:
    try:
        height, width = data["input_size"]
        return ModelConfig(str(data["dataset"]), int(data["width"]), int(height), int(width))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: malformed 'config' entry ({error!r})") from None


def _plain_metadata(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Project files carry ``metadata``; for others keep top-level scalars (epoch, perf, ...)."""
    metadata = payload.get("metadata")
    if isinstance(metadata, Mapping):
        return dict(metadata)
    return {
        key: value
        for key, value in payload.items()
        if isinstance(key, str) and isinstance(value, str | int | float | bool)
    }


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read any accepted checkpoint layout safely; raises CheckpointError on any problem."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: file not found")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: not a regular file")
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path}: file is empty")
        sha256 = file_sha256(path)
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except OSError as error:
        raise CheckpointError(f"checkpoint {path}: cannot read file ({error.strerror})") from None
    except Exception as error:  # torch.load raises many types for corrupt or unsafe files
        raise CheckpointError(f"checkpoint {path} {_describe_load_failure(error)}") from None

    raw_state_dict = _extract_state_dict(payload, path)
    state_dict = _strip_prefixes(raw_state_dict, path)
    config = keypoints = None
    metadata: dict[str, Any] = {}
    if raw_state_dict is not payload:  # a wrapper dict: may carry config, keypoints, metadata
        file_format = payload.get("format")
        if file_format is not None and file_format != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint {path}: unsupported format {file_format!r} "
                f"(this version reads {CHECKPOINT_FORMAT!r})"
            )
        if payload.get("config") is not None:
            config = _config_from_dict(payload["config"], path)
        if payload.get("keypoints") is not None:
            try:
                keypoints = KeypointSpec.from_dict(payload["keypoints"])
            except (KeyError, TypeError, ValueError) as error:
                raise CheckpointError(
                    f"checkpoint {path}: malformed 'keypoints' entry ({error!r})"
                ) from None
        metadata = _plain_metadata(payload)
    return LoadedCheckpoint(state_dict, config, keypoints, metadata, sha256, path)


def infer_architecture(state_dict: Mapping[str, Tensor]) -> tuple[int, int]:
    """``(num_joints, width)`` of an OmniPose state_dict, from the head and first transition."""
    state_dict = {_strip_key(key): value for key, value in state_dict.items()}
    missing = [key for key in (_JOINTS_KEY, _WIDTH_KEY) if key not in state_dict]
    if missing:
        raise CheckpointError(
            f"not an OmniPose state_dict: missing {', '.join(missing)} "
            f"({len(state_dict)} keys, e.g. {', '.join(list(state_dict)[:3]) or 'none'})"
        )
    head, transition = state_dict[_JOINTS_KEY], state_dict[_WIDTH_KEY]
    if head.dim() != 4 or transition.dim() != 4 or head.shape[1] != transition.shape[0]:
        raise CheckpointError(
            f"not an OmniPose state_dict: {_JOINTS_KEY} {tuple(head.shape)} does not fit "
            f"{_WIDTH_KEY} {tuple(transition.shape)}"
        )
    return int(head.shape[0]), int(transition.shape[0])


def _dataset_for_joints(num_joints: int, path: Path) -> str:
    for dataset in INPUT_SIZES:
        if KEYPOINT_SPECS[dataset].num_joints == num_joints:
            return dataset
    raise CheckpointError(
        f"checkpoint {path} has {num_joints} joints, which matches no known dataset "
        f"({', '.join(INPUT_SIZES)}); pass a model config"
    )


def _named_config(name: str) -> ModelConfig:
    try:
        return get_config(name)
    except KeyError as error:
        raise CheckpointError(str(error.args[0])) from None


def _resolve_config(
    checkpoint: LoadedCheckpoint, num_joints: int, width: int, config_name: str | None
) -> ModelConfig:
    """Checkpoint's own config (input size overridable) > named config > inferred from shapes."""
    requested = _named_config(config_name) if config_name else None
    stored = checkpoint.config
    if stored is not None:
        if requested is None:
            config = stored
        elif (requested.dataset, requested.width) == (stored.dataset, stored.width):
            config = requested
        else:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} is {stored.dataset} width {stored.width} "
                f"({stored.name}) but config {requested.name} expects {requested.dataset} "
                f"width {requested.width}"
            )
    elif requested is not None:
        config = requested
    else:
        dataset = _dataset_for_joints(num_joints, checkpoint.path or Path("?"))
        config = ModelConfig(dataset, width, *INPUT_SIZES[dataset][0])
    if (config.num_joints, config.width) != (num_joints, width):
        raise CheckpointError(
            f"checkpoint {checkpoint.path} has {num_joints} joints / width {width} but config "
            f"{config.name} expects {config.num_joints} joints / width {config.width}"
        )
    if checkpoint.keypoints is not None and checkpoint.keypoints.num_joints != num_joints:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} has {num_joints} heatmaps but its keypoint spec "
            f"names {checkpoint.keypoints.num_joints} joints"
        )
    return config


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} ({shown}{more})"


def _check_compatible(model: nn.Module, state_dict: Mapping[str, Tensor], path: Path) -> None:
    """Explain a strict-load failure in one line before load_state_dict would raise."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit OmniPose: {'; '.join(problems)}")


def load_model(
    path: str | Path | None,
    config_name: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[OmniPose, ModelConfig, LoadedCheckpoint | None]:
    """Network in eval mode on ``device`` with the checkpoint's weights (random if no path)."""
    if path is None:
        config = _named_config(config_name or DEFAULT_CONFIG_NAME)
        return build_model(config).to(device).eval(), config, None

    checkpoint = read_checkpoint(path)
    num_joints, width = infer_architecture(checkpoint.state_dict)
    config = _resolve_config(checkpoint, num_joints, width, config_name)
    model = build_model(config)
    _check_compatible(model, checkpoint.state_dict, Path(path))
    try:
        model.load_state_dict(checkpoint.state_dict, strict=True)
    except RuntimeError as error:  # e.g. dtype that cannot be copied; keys/shapes checked above
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path}: cannot load weights ({first_line})") from None
    return model.to(device).eval(), config, checkpoint


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside DataParallel/DDP (``module``) or torch.compile (``_orig_mod``)."""
    for attribute in ("module", "_orig_mod"):
        inner = getattr(model, attribute, None)
        if isinstance(inner, nn.Module):
            return _unwrap(inner)
    return model


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    config: ModelConfig,
    metadata: dict | None = None,
) -> None:
    """Write a project checkpoint atomically: readers see the old file or the complete new one."""
    path = Path(path)
    network = _unwrap(model)
    if isinstance(network, OmniPose) and (network.num_joints, network.width) != (
        config.num_joints,
        config.width,
    ):
        raise ValueError(
            f"model has {network.num_joints} joints / width {network.width} but config "
            f"{config.name} expects {config.num_joints} / {config.width}"
        )
    try:  # round-trip through JSON: guarantees plain types that weights_only can read back
        plain_metadata = json.loads(json.dumps(metadata or {}, allow_nan=True))
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {error}") from None
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "config": config.to_dict(),
        "keypoints": config.keypoints.to_dict(),
        "metadata": plain_metadata,
    }
    atomic_torch_save(payload, path)


def atomic_torch_save(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a truncated file.
    """
    _atomic_write(Path(path), lambda stream: torch.save(payload, stream))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``data`` to ``path`` as atomically as :func:`atomic_torch_save` (e.g. an ONNX graph)."""
    _atomic_write(Path(path), lambda stream: stream.write(data))


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a model file is meant to be shared
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX); harmless no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
