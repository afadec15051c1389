"""Model size and compute: parameter counts and multiply-accumulates per crop."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from omnipose.model.configs import ModelConfig
from omnipose.model.network import build_model


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not: the fixed Gaussian kernels count, as in the paper."""
    return sum(p.numel() for p in model.parameters())


class _FlopTally(TorchDispatchMode):
    """Adds up the FLOPs of every operator PyTorch's flop counter has a formula for.

    ``torch.utils.flop_counter.FlopCounterMode`` uses the same formulas, but it also decomposes
    every other operator into primitives to look for matrix products inside, and tracks which
    module each one runs in. The operators this network leaves after autograd's own
    decompositions (batch norm, ReLU, sums, concatenation, pooling) hold no matrix product, and
    only the total is wanted: running them as they are gives the same count, without the
    decomposition that made most of the time of a count (a second per network).
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        return out


def count_macs(model: nn.Module, input_size: tuple[int, int]) -> int:
    """Multiply-accumulates of one forward pass on a single ``(height, width)`` crop.

    Uses the formulas of PyTorch's flop counter (FLOPs = 2 x MACs), which count convolutions,
    transposed and grouped/depthwise ones included, and matrix products; element-wise ops (BN,
    ReLU, sums, pooling) are not counted, matching the usual convention for published MAC
    figures. The pass runs on meta tensors, so it is quick and leaves the model untouched.
    """
    height, width = input_size
    # Shapes are all the counter needs: run on meta tensors (no memory, no arithmetic).
    meta_state = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
    }
    crop = torch.empty(1, 3, height, width, device="meta")
    was_training = model.training
    model.eval()
    try:
        tally = _FlopTally()
        with torch.no_grad(), tally:
            functional_call(model, meta_state, (crop,))
    finally:
        model.train(was_training)
    return tally.flops // 2


def measure_size(config: ModelConfig) -> tuple[int, int]:
    """(parameters, MACs per crop) of ``config``'s network, built on the meta device because only
    shapes matter (seconds instead of initialising W48 weights)."""
    with torch.device("meta"):
        network = build_model(config)
    return count_parameters(network), count_macs(network, config.input_size)
