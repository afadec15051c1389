"""How many CPUs this process may really use (affinity and cgroup quota) and the thread set-up
that follows from it."""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import torch

from service.settings import ServiceSettings

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(
    cpu_max: str | None = None, cfs_quota_us: str | None = None, cfs_period_us: str | None = None
) -> int | None:
    """Whole CPUs a cgroup CPU quota allows (rounded up), or None when unlimited or unreadable.

    Kubernetes CPU limits become a CFS quota, not a smaller CPU set: the process still sees
    every core of the node, and a thread per core would be throttled. cgroup v2 ``cpu.max`` reads
    "<quota> <period>" or "max <period>"; v1 has ``cpu.cfs_quota_us`` (-1: unlimited) and
    ``cpu.cfs_period_us``.
    """
    if cpu_max is not None:
        fields = cpu_max.split()
        if not fields or fields[0] == "max":
            return None
        quota, period = fields[0], fields[1] if len(fields) > 1 else "100000"
    elif cfs_quota_us is not None and cfs_period_us is not None:
        quota, period = cfs_quota_us.strip(), cfs_period_us.strip()
    else:
        return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


def read_cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> int | None:
    """The CPU quota of this process's cgroup (v2, else v1 controller folders), if any."""

    def read(path: Path) -> str | None:
        try:
            return path.read_text()
        except OSError:
            return None

    cpu_max = read(root / "cpu.max")
    if cpu_max is not None:
        return cgroup_cpu_limit(cpu_max=cpu_max)
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        quota, period = read(folder / "cpu.cfs_quota_us"), read(folder / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return cgroup_cpu_limit(cfs_quota_us=quota, cfs_period_us=period)
    return None


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = read_cgroup_cpu_limit(cgroup_root)
    return min(cpus, quota) if quota else cpus


def configure_threads(settings: ServiceSettings) -> int:
    """Give the pose forward the cores: torch intra-op threads = setting or the usable CPUs.

    OpenCV's own pool is turned off: its work here (decode, warps, HOG) runs on our small pools,
    and a second thread pool of CPU-count size would fight the forward pass for the same cores.
    """
    threads = settings.torch_threads or available_cpus()
    torch.set_num_threads(threads)
    cv2.setNumThreads(1)
    return threads
