"""The application layer: person detection, the engine, and the REST + gRPC pose service."""

import os

# How idle OpenMP threads wait, set before torch loads (libgomp reads it once); every entry point
# imports this package first. It matters only for model instances with more than one torch
# thread: the default layout is one single-threaded instance per core, which has no OpenMP team
# to wait for. For multi-threaded instances spinning is bounded (GOMP_SPINCOUNT): unbounded
# spinning (libgomp's default) made a 2-thread forward 30-50x slower as soon as another process
# wanted a core, while passive waiting costs up to 2x latency on an idle machine. bench/
# wait_policy.py measures the policies; OMP_WAIT_POLICY or GOMP_SPINCOUNT set by the user win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")
