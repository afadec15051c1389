"""Reading, validating and writing OmniPose checkpoints.

Loading only ever goes through ``torch.load(..., weights_only=True)``: a checkpoint is data, and a
file that needs arbitrary unpickling (which can execute code) is refused. Every failure is a
``CheckpointError`` with a one-line message naming the file and the problem, so the CLI and the
service can report it verbatim.

Project checkpoints are plain dicts (so ``weights_only`` can read them)::

    {"format": "omnipose-serve/1", "state_dict": {...}, "config": ModelConfig.to_dict(),
     "keypoints": KeypointSpec.to_dict(), "metadata": {...free JSON...}}

Published and HRNet-style training files load too: a bare state_dict (``model_best.pth``,
``final_state.pth``), one under ``state_dict``/``model``, or the training script's
``checkpoint.pth`` (``best_state_dict`` is preferred over ``state_dict``, whose keys carry
DataParallel's ``module.`` prefix; ``perf`` is a numpy scalar, ``optimizer`` an Adam state).
Their configuration is inferred from tensor shapes, and the head (WASPv1 or WASPv2) from the keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from omnipose.model.configs import DEFAULT_HEAD, HEAD_LABELS, INPUT_SIZES, ModelConfig, get_config
from omnipose.model.network import HEAD_OUTPUT_KEYS, OmniPose, build_model
from omnipose.model.skeleton import KEYPOINT_SPECS, KeypointSpec

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "omnipose-serve/1"
DEFAULT_CONFIG_NAME = "coco-w18-256x192"
# Searched in this order: a training checkpoint's best epoch beats its last one.
_STATE_DICT_CONTAINER_KEYS = ("best_state_dict", "state_dict", "model")
_PREFIXES_TO_STRIP = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
_WIDTH_KEY = "transition1.0.0.weight"
# numpy scalar types whose dtype classes may be rebuilt (plain numbers only: no objects, strings,
# structured or datetime types).
_NUMPY_NUMERIC_TYPES = (
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
)
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
    entry: str | None = None  # the wrapper key the weights came from; None for a bare state_dict


class Architecture(NamedTuple):
    """What the tensors of a state_dict say about the network that made them."""

    num_joints: int
    width: int
    head: str


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed so multi-hundred-MB checkpoints need no extra memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def numpy_scalar_globals() -> list[Any]:
    """The allow-list ``weights_only`` loading needs for numpy scalars (HRNet-style ``perf``).

    numpy pickles a scalar as ``multiarray.scalar(dtype, raw bytes)``, under ``numpy.core``
    (numpy 1.x files) or ``numpy._core`` (numpy 2.x files); the dtype is rebuilt by
    ``numpy.dtype`` and its state set on its class (``numpy.dtypes.Float64DType``, ...). Only
    plain numeric dtype classes are listed, so arrays, object, string and structured values stay
    refused. Both names map to the installed numpy's function.
    """
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtype_classes = dict.fromkeys(type(np.dtype(kind)) for kind in _NUMPY_NUMERIC_TYPES)
    return [
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        (multiarray.scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtype_classes,
    ]


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


def _extract_state_dict(payload: Any, path: Path) -> tuple[Mapping[str, Any], str | None]:
    """The weights in ``payload`` and the wrapper key they sit under (None: bare state_dict)."""
    if not isinstance(payload, Mapping):
        raise CheckpointError(
            f"checkpoint {path}: holds a {type(payload).__name__}, expected a state_dict or a dict"
        )
    for container in _STATE_DICT_CONTAINER_KEYS:
        if isinstance(payload.get(container), Mapping):
            return payload[container], container
    if payload and all(isinstance(value, Tensor) for value in payload.values()):
        return payload, None
    keys = ", ".join(map(repr, list(payload)[:_MAX_LISTED]))
    entries = ", ".join(map(repr, _STATE_DICT_CONTAINER_KEYS))
    raise CheckpointError(
        f"checkpoint {path}: no state_dict found (expected tensors, or a {entries} entry; "
        f"top-level keys: {keys or 'none'})"
    )


def _config_from_dict(data: Any, path: Path) -> ModelConfig:
    try:
        height, width = data["input_size"]
        head = str(data.get("head", DEFAULT_HEAD))  # files from before WASPv1 have no head
        return ModelConfig(str(data["dataset"]), int(data["width"]), int(height), int(width), head)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: malformed 'config' entry ({error!r})") from None


def _plain_metadata(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Project files carry ``metadata``; for others keep top-level scalars (epoch, perf, ...).

    numpy scalars become Python numbers so the metadata stays plain JSON.
    """
    metadata = payload.get("metadata")
    if isinstance(metadata, Mapping):
        return dict(metadata)
    return {
        key: value.item() if isinstance(value, np.generic) else value
        for key, value in payload.items()
        if isinstance(key, str) and isinstance(value, str | int | float | bool | np.generic)
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
        with torch.serialization.safe_globals(numpy_scalar_globals()):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except OSError as error:
        raise CheckpointError(f"checkpoint {path}: cannot read file ({error.strerror})") from None
    except Exception as error:  # torch.load raises many types for corrupt or unsafe files
        raise CheckpointError(f"checkpoint {path} {_describe_load_failure(error)}") from None

    raw_state_dict, entry = _extract_state_dict(payload, path)
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
    return LoadedCheckpoint(state_dict, config, keypoints, metadata, sha256, path, entry)


def infer_architecture(state_dict: Mapping[str, Tensor]) -> Architecture:
    """Joints, width and head of an OmniPose state_dict, from its head and first transition.

    The head is named by which head's final conv the keys hold (``waspv2.*`` for WASPv2,
    ``wasp.*``/``decoder.*`` for WASPv1); that conv's shape is ``(joints, width, 1, 1)``.
    """
    state_dict = {_strip_key(key): value for key, value in state_dict.items()}
    heads = [head for head, key in HEAD_OUTPUT_KEYS.items() if key in state_dict]
    if len(heads) > 1:
        raise CheckpointError(
            "not an OmniPose state_dict: it holds both heads "
            f"({', '.join(HEAD_OUTPUT_KEYS[head] for head in heads)})"
        )
    if not heads or _WIDTH_KEY not in state_dict:
        missing = [] if heads else [" or ".join(HEAD_OUTPUT_KEYS.values())]
        missing += [] if _WIDTH_KEY in state_dict else [_WIDTH_KEY]
        raise CheckpointError(
            f"not an OmniPose state_dict: missing {', '.join(missing)} "
            f"({len(state_dict)} keys, e.g. {', '.join(list(state_dict)[:3]) or 'none'})"
        )
    head = heads[0]
    output_key = HEAD_OUTPUT_KEYS[head]
    output, transition = state_dict[output_key], state_dict[_WIDTH_KEY]
    if output.dim() != 4 or transition.dim() != 4 or output.shape[1] != transition.shape[0]:
        raise CheckpointError(
            f"not an OmniPose state_dict: {output_key} {tuple(output.shape)} does not fit "
            f"{_WIDTH_KEY} {tuple(transition.shape)}"
        )
    return Architecture(int(output.shape[0]), int(transition.shape[0]), head)


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
    checkpoint: LoadedCheckpoint, architecture: Architecture, config_name: str | None
) -> ModelConfig:
    """Checkpoint's own config (input size overridable) > named config > inferred from shapes.

    The head always follows the weights: a file with WASPv1 keys builds WASPv1 even when the
    config name asks for the default WASPv2 (the authors' released files are WASPv1), and the
    switch is logged.
    """
    num_joints, width, head = architecture
    path = checkpoint.path
    requested = _named_config(config_name) if config_name else None
    stored = checkpoint.config
    if stored is not None:
        if stored.head != head:
            raise CheckpointError(
                f"checkpoint {path}: its config {stored.name} names the {stored.head_label} head "
                f"but its weights are {HEAD_LABELS[head]}"
            )
        if requested is None:
            config = stored
        elif (requested.dataset, requested.width) == (stored.dataset, stored.width):
            config = requested
        else:
            raise CheckpointError(
                f"checkpoint {path} is {stored.dataset} width {stored.width} "
                f"({stored.name}) but config {requested.name} expects {requested.dataset} "
                f"width {requested.width}"
            )
    elif requested is not None:
        config = requested
    else:
        dataset = _dataset_for_joints(num_joints, path or Path("?"))
        config = ModelConfig(dataset, width, *INPUT_SIZES[dataset][0], head)
    if (config.num_joints, config.width) != (num_joints, width):
        raise CheckpointError(
            f"checkpoint {path} has {num_joints} joints / width {width} but config "
            f"{config.name} expects {config.num_joints} joints / width {config.width}"
        )
    if checkpoint.keypoints is not None and checkpoint.keypoints.num_joints != num_joints:
        raise CheckpointError(
            f"checkpoint {path} has {num_joints} heatmaps but its keypoint spec "
            f"names {checkpoint.keypoints.num_joints} joints"
        )
    if config.head != head:
        switched = dataclasses.replace(config, head=head)
        log.info(
            "checkpoint %s holds %s weights: using config %s instead of %s",
            path,
            switched.head_label,
            switched.name,
            config.name,
        )
        config = switched
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
    if checkpoint.entry not in (None, "state_dict"):
        log.info("checkpoint %s: using the weights under %r", path, checkpoint.entry)
    architecture = infer_architecture(checkpoint.state_dict)
    config = _resolve_config(checkpoint, architecture, config_name)
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
    if isinstance(network, OmniPose) and (network.num_joints, network.width, network.head) != (
        config.num_joints,
        config.width,
        config.head,
    ):
        raise ValueError(
            f"model has {network.num_joints} joints / width {network.width} / head "
            f"{network.head} but config {config.name} expects {config.num_joints} / "
            f"{config.width} / {config.head}"
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
