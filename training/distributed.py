"""Process-group setup for DistributedDataParallel runs launched by ``torchrun``.

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them the run
is a plain single process and every helper here degrades to a no-op. NCCL is used on GPUs, gloo
on CPU. Only rank 0 writes checkpoints and logs (``DistContext.is_main``).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)  # long validation passes on rank 0 only


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job and which device it drives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def resolve_training_device(device: str, local_rank: int) -> torch.device:
    """``auto`` -> this process's GPU (``cuda:LOCAL_RANK``) when CUDA exists, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    return resolved


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group if launched by torchrun (or an equivalent environment)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = resolve_training_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=PROCESS_GROUP_TIMEOUT,
            device_id=resolved if resolved.type == "cuda" else None,
        )
    return DistContext(rank, world_size, local_rank, resolved)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(value: float, context: DistContext) -> float:
    """Average a Python number over ranks (identity without a process group)."""
    if not context.distributed or not is_initialized():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / context.world_size


def all_reduce_sum(value: float, context: DistContext) -> float:
    if not context.distributed or not is_initialized():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def broadcast_buffers(module: torch.nn.Module, context: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP syncs buffers only at the start of the next forward, so after the last training step
    each rank holds statistics of its own batches; evaluation shards and the saved model must
    all use the same ones.
    """
    if not context.distributed or not is_initialized():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def gather_objects(obj: Any, context: DistContext) -> list[Any]:
    """Every rank's ``obj`` in rank order (a one-element list without a process group)."""
    if not context.distributed or not is_initialized():
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, context: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not context.distributed or not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
