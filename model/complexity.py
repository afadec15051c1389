"""Model size and compute: parameter counts and multiply-accumulates per crop."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from omnipose.model.configs import ModelConfig
from omnipose.model.network import build_model


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not: the fixed Gaussian kernels count, as in the paper."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int]) -> int:
    """Multiply-accumulates of one forward pass on a single ``(height, width)`` crop.

    Uses PyTorch's ``FlopCounterMode`` (FLOPs = 2 x MACs), which counts convolutions, transposed
    and grouped/depthwise ones included, and matrix products; element-wise ops (BN, ReLU, sums,
    pooling) are not counted, matching the usual convention for published MAC figures. The pass
    runs on meta tensors, so it is instant and leaves the model untouched.
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
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            functional_call(model, meta_state, (crop,))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def measure_size(config: ModelConfig) -> tuple[int, int]:
    """(parameters, MACs per crop) of ``config``'s network, built on the meta device because only
    shapes matter (seconds instead of initialising W48 weights)."""
    with torch.device("meta"):
        network = build_model(config)
    return count_parameters(network), count_macs(network, config.input_size)
