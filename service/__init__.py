"""The application layer: person detection, the CLI, and the REST + gRPC pose service."""

import os

# OpenMP's default busy-waiting makes torch slow down 10-40x as soon as another process or thread
# wants a core (measured: a batch of 8 went from 0.4 s to 16 s). Every entry point imports this
# package before torch, so set the passive policy here unless the user chose one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
