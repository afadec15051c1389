"""Turn a training checkpoint (or a published one) into the serving checkpoint.

The output is a project checkpoint written by ``omnipose.model.checkpoint.save_checkpoint``
(atomic): weights, the model config and keypoint spec, and metadata that a reader of the file needs
without the training run at hand: joints, skeleton, flip pairs, input size, what it was trained
on and how well it did. Optimizer state and RNG states of a ``last.pt`` are left behind.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from torch import nn

from omnipose.model.checkpoint import load_model, save_checkpoint
from omnipose.model.configs import ModelConfig

PUBLISHED_SOURCE = "published checkpoint (no project metadata)"


def build_export_metadata(
    source_metadata: dict[str, Any],
    config_name: str,
    keypoints: Any,
    input_size: tuple[int, int],
    heatmap_size: tuple[int, int],
    source_path: Path,
    source_sha256: str,
    is_project_file: bool,
) -> dict[str, Any]:
    """Metadata of the serving file: self-describing, JSON-only."""
    training = source_metadata.get("training") if is_project_file else None
    metrics = source_metadata.get("metrics") if is_project_file else None
    if not is_project_file:  # published files carry loose scalars such as epoch / perf
        metrics = {"published_perf": source_metadata["perf"]} if "perf" in source_metadata else {}
    return {
        "model_config": config_name,
        "input_size": list(input_size),
        "heatmap_size": list(heatmap_size),
        "dataset": keypoints.dataset,
        "joints": list(keypoints.joint_names),
        "skeleton": [list(limb) for limb in keypoints.limbs],
        "flip_pairs": [list(pair) for pair in keypoints.flip_pairs],
        "training": training or {"source": PUBLISHED_SOURCE},
        "metrics": metrics or {},
        "best_epoch": source_metadata.get("best_epoch", source_metadata.get("epoch")),
        "source": {
            "file": source_path.name,
            "sha256": source_sha256,
            "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    }


def export_model(
    weights: str | Path, out: str | Path, config_name: str | None = None
) -> dict[str, Any]:
    """Write the serving checkpoint ``out`` from ``weights``; returns the metadata written.

    ``config_name`` picks the input size (and must agree with the file's dataset and width);
    without it the file's own config is used, or one inferred from tensor shapes.
    Raises ``omnipose.model.checkpoint.CheckpointError`` with a one-line message on unusable input.
    """
    model, config, metadata = _load_with_export_metadata(weights, config_name)
    save_checkpoint(out, model, config, metadata)
    return metadata


def _load_with_export_metadata(
    weights: str | Path, config_name: str | None
) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """The network, its config and the serving metadata, for either export format."""
    model, config, loaded = load_model(weights, config_name, "cpu")
    assert loaded is not None  # a path was given
    metadata = build_export_metadata(
        loaded.metadata,
        config.name,
        config.keypoints,
        config.input_size,
        config.heatmap_size,
        Path(weights),
        loaded.sha256,
        loaded.config is not None,  # a project file, not a published one
    )
    return model, config, metadata


def export_onnx_model(
    weights: str | Path, out: str | Path, config_name: str | None = None
) -> tuple[dict[str, Any], float]:
    """Write ``out`` as an ONNX graph (dynamic batch, the serving metadata embedded) from
    ``weights``; returns the metadata and the largest heatmap difference between ONNX Runtime and
    PyTorch on random crops at batch 1 and 3 (the check that the graph is the network)."""
    from omnipose.model.checkpoint import atomic_write_bytes
    from omnipose.model.onnx_runtime import export_onnx, max_difference

    model, config, metadata = _load_with_export_metadata(weights, config_name)
    graph = export_onnx(model, config.input_size, metadata)
    difference = max_difference(model, graph, config.input_size)
    atomic_write_bytes(out, graph)
    return metadata, difference

