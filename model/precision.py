"""Inference precision: fp32, or fp16/bf16 weights in channels-last layout, and ``auto``.

Reduced precision here means the weights themselves are cast (not autocast): on CPUs with native
bf16 (AVX512-BF16 or AMX) oneDNN then runs bf16 convolutions end to end in channels-last layout,
1.8-2.6x faster than fp32 on the dev machine; on CUDA fp16 weights use the tensor cores.
``auto`` takes that speed only where the accuracy guard was checked (tests/test_precision.py: the
default model's held-out AP within 0.005 of fp32, median keypoint shift at most 0.1 heatmap px):
fp16 on CUDA, bf16 on a CPU with native bf16, fp32 everywhere else.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from omnipose.model.cpu_info import read_cpu_info

# int8: a quantised model, run by the openvino backend only (torch refuses it).
Precision = Literal["fp32", "fp16", "bf16", "int8"]
PrecisionSetting = Literal["auto", "fp32", "fp16", "bf16", "int8"]
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU computes bf16 natively (oneDNN otherwise emulates it, slower than fp32)."""
    return not read_cpu_info(cpuinfo).flags.isdisjoint(NATIVE_BF16_CPU_FLAGS)


def resolve_precision(device: torch.device, precision: PrecisionSetting) -> Precision:
    """``auto`` -> fp16 on CUDA, bf16 on a CPU with native bf16, else fp32; others as given."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def check_precision(device: torch.device, precision: Precision) -> None:
    """torch's precisions: fp16 needs CUDA; bf16 needs CUDA with bf16 support, or a CPU; int8 is
    not one of them."""
    if precision == "int8":
        raise ValueError("precision int8 runs on the openvino backend from a quantised model;"
                         " the torch backend runs fp32, fp16 or bf16")
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose fp32, fp16 or bf16")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16 is not supported on {device}")


def cast_network(network: nn.Module, precision: Precision) -> nn.Module:
    """The network (in place) with weights in ``precision``; reduced ones in channels-last."""
    if precision == "fp32":
        return network
    return network.to(dtype=DTYPES[precision], memory_format=torch.channels_last)


def cast_inputs(inputs: torch.Tensor, precision: Precision) -> torch.Tensor:
    """Crops in the network's dtype and memory layout (a no-op for fp32)."""
    if precision == "fp32":
        return inputs
    return inputs.to(dtype=DTYPES[precision]).contiguous(memory_format=torch.channels_last)
