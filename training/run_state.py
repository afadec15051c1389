"""What ``last.pt`` stores besides the weights so that a resumed run continues exactly: the RNG
states of every library and the learning-rate schedule's position.

Everything is kept as tensors and plain types, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import collections
import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU + CUDA) as tensors and plain numbers."""
    version, python_state, gauss = random.getstate()
    kind, numpy_keys, numpy_pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(python_state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(numpy_keys, dtype=np.int64)),
            "pos": int(numpy_pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` captured (CUDA states only where GPUs exist)."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


def scheduler_state(scheduler: torch.optim.lr_scheduler.MultiStepLR) -> dict[str, Any]:
    """The scheduler's state with its milestone counter as a plain dict of ints."""
    state = dict(scheduler.state_dict())
    state["milestones"] = {int(k): int(v) for k, v in state["milestones"].items()}
    return state


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.MultiStepLR, state: dict) -> bool:
    """Restore the scheduler's position; the configured milestones stay in force.

    The milestones come from the resuming run's config, not the checkpoint, so a run can be
    resumed with a longer schedule (``train.epochs=40 train.lr_steps=[30,36]``). With an
    unchanged config this is the exact restore. Returns whether the milestones changed.
    """
    state = dict(state)
    stored = collections.Counter({int(k): int(v) for k, v in state["milestones"].items()})
    configured = collections.Counter(scheduler.milestones)
    state["milestones"] = configured
    scheduler.load_state_dict(state)
    return stored != configured
