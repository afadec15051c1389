"""Where start-up decisions are kept between restarts, and what makes one stale.

``backend=auto`` measures the candidate backends at start-up
(:mod:`omnipose.service.backend_choice`); the decision is stored here so a restart of the same
deployment on the same kind of machine skips the measurement. It is stored under a key of
everything the measurement depended on: the weights
(sha256), the network config and crop size, the precision setting, the candidate set with the
versions of the libraries behind it, the CPU (model name and flags, ISA limits set in the
environment) and the usable CPU count, and the probe itself. Any change of these is a different
file, so a stale decision is never read: the start measures again.

The cache folder is the ``cache_dir`` setting (``ServiceSettings.model_cache_dir``: else
``$XDG_CACHE_HOME/omnipose``, else ``~/.cache/omnipose``; in the Docker images
``/var/cache/omnipose/omnipose``, a volume), shared with the openvino backend's converted
models. A folder that cannot be written costs one warning per start and nothing else: the next
start measures again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from functools import cache
from pathlib import Path
from typing import Any

from omnipose.model.cpu_info import read_cpu_info

log = logging.getLogger(__name__)

KEY_FORMAT = 1  # bump when the key or the stored decision changes shape
DECISIONS_FOLDER = "backend-choice"
# Environment variables that cap the instruction set oneDNN/OpenVINO use: they change the speeds.
ISA_LIMIT_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OV_CPU_ISA")
# The Python distributions a backend's speed depends on (its runtime, and its model converter);
# a backend not named here is looked up under its own name.
BACKEND_LIBRARIES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnx"),
    "openvino": ("openvino",),
}
NOT_INSTALLED = "not installed"


def backend_libraries(backend: str) -> tuple[str, ...]:
    return BACKEND_LIBRARIES.get(backend, (backend,))


def library_version(name: str) -> str:
    """The installed version of distribution ``name`` (without importing it), or
    ``not installed``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "installed" if importlib.util.find_spec(name) is not None else NOT_INSTALLED


def library_versions(backends: list[str]) -> dict[str, str]:
    """Every library behind ``backends``, with its version."""
    return {name: library_version(name) for backend in backends
            for name in backend_libraries(backend)}  # fmt: skip


def backend_installed(backend: str) -> bool:
    return all(library_version(name) != NOT_INSTALLED for name in backend_libraries(backend))


@cache
def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The CPU's model name and a digest of its feature flags (what kernels it can run)."""
    cpu = read_cpu_info(cpuinfo)
    flags = " ".join(sorted(cpu.flags))
    return {"model": cpu.model or "unknown",
            "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()}  # fmt: skip


def isa_limits() -> dict[str, str]:
    return {name: os.environ[name] for name in ISA_LIMIT_VARIABLES if name in os.environ}


def package_version() -> str:
    try:
        return importlib.metadata.version("omnipose-serve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class DecisionCache:
    """JSON files, one per key, in ``<root>/backend-choice``. Reads never fail (a missing,
    unreadable or foreign file is a miss); a failed write is one warning."""

    def __init__(self, root: Path) -> None:
        self.folder = root / DECISIONS_FOLDER

    def path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.folder / f"{digest[:32]}.json"

    def load(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The decision stored under ``key``, or None."""
        path = self.path(key)
        try:
            stored = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.info("backend choice cache: ignoring %s (%s)", path, exc)
            return None
        if not isinstance(stored, dict) or stored.get("key") != key:
            return None  # a digest collision or a hand-edited file: measure again
        decision = stored.get("decision")
        return decision if isinstance(decision, dict) else None

    def store(self, key: dict[str, Any], decision: dict[str, Any]) -> bool:
        """Write the decision (atomically: a reader never sees half a file); False and one
        warning when the folder cannot be written."""
        path = self.path(key)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps({"key": key, "decision": decision}, indent=1))
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("cannot cache the backend choice in %s (%s): the next start measures"
                        " the backends again; set cache_dir to a writable folder to keep it",
                        self.folder, exc.strerror or exc)  # fmt: skip
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            return False
        return True
