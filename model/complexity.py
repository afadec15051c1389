"""Model size and compute: parameter counts and multiply-accumulates per crop."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from omnipose.model.configs import CONFIGS, get_config
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


def config_table(names: Sequence[str] | None = None) -> list[str]:
    """``omnipose info``'s table, header first: one row per config (all registered by default).

    Builds each network to count its parameters and MACs, so a row is never out of date; on
    the meta device, because only shapes matter (seconds instead of initialising W48 weights).
    """
    lines = [
        f"{'config':<24} {'head':<6} {'joints':>6} {'input':>9} {'heatmap':>8} "
        f"{'params':>12} {'GMACs':>7}"
    ]
    for name in names or list(CONFIGS):  # the registry lists dataset, width, head, then size
        config = get_config(name)
        with torch.device("meta"):
            network = build_model(config)
        macs = count_macs(network, config.input_size)
        h, w = config.input_size
        hh, hw = config.heatmap_size
        lines.append(
            f"{config.name:<24} {config.head_label:<6} {config.num_joints:>6} {f'{h}x{w}':>9} "
            f"{f'{hh}x{hw}':>8} {count_parameters(network):>12,} {macs / 1e9:>7.2f}"
        )
    return lines
