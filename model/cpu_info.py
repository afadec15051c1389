"""What this CPU is and which instructions it has, read from ``/proc/cpuinfo``.

The one parser of that file: precision's native-bf16 check, the OpenVINO compiled-model cache key
and the service's cached backend choice all read the CPU through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuInfo:
    """The first processor's model name and feature flags (x86 ``flags``, Arm ``Features``)."""

    model: str
    flags: frozenset[str]


def read_cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """The CPU as ``cpuinfo`` describes it; empty where the file cannot be read (not Linux)."""
    model, flags = "", None
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip() == "model name" and not model:
            model = value.strip()
        elif name.strip() in ("flags", "Features") and flags is None:
            flags = frozenset(value.split())
    return CpuInfo(model=model, flags=flags or frozenset())
