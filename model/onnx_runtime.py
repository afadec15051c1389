"""ONNX export of the pose network, and the checks that the exported graph equals it.

The export is head-agnostic: it traces whatever network ``build_model`` made (WASPv2, or any
other head) from crops ``[batch, 3, H, W]`` to heatmaps ``[batch, J, h, w]``, with the batch
dimension dynamic, so nothing here names a layer. The runner that executes such a graph is
:class:`omnipose.model.runners.OnnxRuntimeRunner`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

INPUT_NAME, OUTPUT_NAME = "crops", "heatmaps"
OPSET = 18
METADATA_KEY = "omnipose"

# Graphs exported inside a shared_exports() block, by what determines them (export_key).
_shared: dict[str, bytes] | None = None
_shared_lock = threading.Lock()


def state_dict_sha256(network: nn.Module) -> str:
    """A content hash of the network's weights, for networks that came from no file."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(np.ascontiguousarray(tensor.detach().cpu().float().numpy()).tobytes())
    return digest.hexdigest()


def export_key(network: nn.Module, input_size: tuple[int, int],
               metadata: dict[str, Any] | None) -> str:  # fmt: skip
    """What an export depends on: the weights, the architecture (the modules' repr), the crop
    size, the metadata and the exporter's opset."""
    parts = {"weights": state_dict_sha256(network), "modules": repr(network),
             "input_size": list(input_size), "metadata": metadata, "opset": OPSET}  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def shared_exports() -> Iterator[None]:
    """Within the block, :func:`export_onnx` of a network equal to one already exported in it
    (same weights, architecture, crop size and metadata) returns that graph instead of tracing
    again: backend=auto builds ONNX Runtime and OpenVINO (converted from the same export) from
    copies of one network, and an export takes seconds. The graphs are dropped on leaving, so a
    serving process holds none it does not use."""
    global _shared
    with _shared_lock:
        outermost = _shared is None
        if outermost:
            _shared = {}
    try:
        yield
    finally:
        if outermost:
            with _shared_lock:
                _shared = None


def export_onnx(
    network: nn.Module, input_size: tuple[int, int], metadata: dict[str, Any] | None = None
) -> bytes:
    """The network as an ONNX graph (bytes) with a dynamic batch; ``metadata`` (JSON-able) is
    stored in the graph's metadata properties under ``omnipose``. Inside :func:`shared_exports`,
    an equal network's graph is exported once."""
    shared = _shared
    if shared is None:
        return _export(network, input_size, metadata)
    key = export_key(network, input_size, metadata)
    graph = shared.get(key)
    if graph is None:
        graph = shared[key] = _export(network, input_size, metadata)
    return graph


def _export(
    network: nn.Module, input_size: tuple[int, int], metadata: dict[str, Any] | None
) -> bytes:
    import onnx

    height, width = input_size
    example = torch.zeros(2, 3, height, width)
    buffer = io.BytesIO()
    network = network.eval()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter on purpose: torch.export's (dynamo=True) gives the same graph
        # (max difference 3e-22 on coco-w8-96x64) but took 128 s instead of a few seconds on a
        # 2-core machine, and backend=onnxruntime exports at every start-up. Its deprecation
        # notices say nothing the caller can act on.
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX",
                                DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        # The network's checks on H and W (multiples of 32, branch sizes) become constants of
        # the trace: right, because H and W are fixed in the graph (only the batch is dynamic).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning,
                                module=r"omnipose\.model\.")
        torch.onnx.export(
            network,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,  # TorchScript exporter: seconds, not minutes
        )
    graph = onnx.load_from_string(buffer.getvalue())
    if metadata is not None:
        entry = graph.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.checker.check_model(graph)
    return graph.SerializeToString()


def read_onnx_metadata(model: bytes | str | Path) -> dict[str, Any]:
    """The ``omnipose`` metadata stored by :func:`export_onnx` ({} if none)."""
    import onnx

    graph = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    for entry in graph.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    return {}


def max_difference(
    network: nn.Module,
    onnx_model: bytes,
    input_size: tuple[int, int],
    batch_sizes: tuple[int, ...] = (1, 3),
) -> float:
    """Largest absolute heatmap difference between the graph in ONNX Runtime and the network in
    PyTorch, on random crops at each batch size (checks the dynamic batch too)."""
    from omnipose.model.runners import OnnxRuntimeRunner

    runtime = OnnxRuntimeRunner(onnx_model)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.inference_mode():
        for batch in batch_sizes:
            crops = torch.randn(batch, 3, *input_size, generator=generator)
            expected = network.eval()(crops)
            worst = max(worst, float((runtime.run(crops) - expected).abs().max()))
    return worst
