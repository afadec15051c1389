"""How idle OpenMP threads wait: set in the environment before torch loads (libgomp reads it once).

It matters only for model instances with more than one torch thread: the default layout is one
single-threaded instance per core, which has no OpenMP team to wait for. For multi-threaded
instances spinning is bounded (``GOMP_SPINCOUNT``): libgomp's default unbounded spinning makes a
2-thread forward 30-50x slower as soon as another process wants a core, while passive waiting
costs up to 2x latency on an idle machine. bench/wait_policy.py measures the policies.

This module imports nothing heavy, so an entry point can call :func:`configure_openmp` before the
imports that load torch.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

BOUNDED_SPIN_COUNT = "3000"


def configure_openmp(environ: MutableMapping[str, str] = os.environ) -> None:
    """Bound OpenMP spinning unless the user chose a policy (``OMP_WAIT_POLICY`` or
    ``GOMP_SPINCOUNT`` already set win). Call before torch is imported; later it has no effect
    on this process (child processes still inherit it)."""
    if "OMP_WAIT_POLICY" not in environ:
        environ.setdefault("GOMP_SPINCOUNT", BOUNDED_SPIN_COUNT)
