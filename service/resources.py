"""How many CPUs this process may really use (affinity and cgroup quota), how the pose model
spreads over them (instances x threads, measured on the machine it starts on), and the thread
set-up that follows."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class InstanceLayout:
    """How the pose model uses the CPUs: ``instances`` model threads, each running its forward
    passes with ``threads`` torch intra-op (OpenMP) threads (Triton's instance groups)."""

    instances: int
    threads: int

    def __str__(self) -> str:
        return f"{self.instances} instance(s) x {self.threads} thread(s)"


def candidate_layouts(cpus: int) -> list[InstanceLayout]:
    """Layouts that use exactly ``cpus`` cores: one instance per core first, one big last."""
    return [
        InstanceLayout(cpus // threads, threads)
        for threads in range(1, cpus + 1)
        if cpus % threads == 0
    ]


def configured_layout(
    settings: ServiceSettings, cpus: int, device_type: str
) -> InstanceLayout | None:
    """The layout the settings fix, or None when it is to be measured (CPU, neither given).

    On an accelerator one instance drives the device (its batches are what make it fast); the
    CPU threads then only feed it.
    """
    instances, threads = settings.model_instances, settings.torch_threads
    if device_type != "cpu":
        return InstanceLayout(instances or 1, threads or cpus)
    if instances and threads:
        return InstanceLayout(instances, threads)
    if instances:
        return InstanceLayout(instances, max(1, cpus // instances))
    if threads:
        return InstanceLayout(max(1, cpus // threads), threads)
    return None


def measure_layouts(
    forward: Callable[[], int],
    layouts: Sequence[InstanceLayout],
    seconds_per_layout: float = 1.5,
    min_rounds: int = 2,
) -> dict[InstanceLayout, float]:
    """Units per second of each layout: ``forward()`` (returns the units it ran) on every
    instance thread at once, after one warm-up call each, for about ``seconds_per_layout``."""
    return {
        layout: _throughput(forward, layout, seconds_per_layout, min_rounds) for layout in layouts
    }


def _throughput(
    forward: Callable[[], int], layout: InstanceLayout, seconds: float, min_rounds: int
) -> float:
    barrier = threading.Barrier(layout.instances + 1)
    done = [0] * layout.instances
    stop_at = [0.0]

    def work(index: int) -> None:
        torch.set_num_threads(layout.threads)
        forward()  # warm-up: this thread's OpenMP team, allocator, one-time kernels
        barrier.wait()
        barrier.wait()  # the clock has started
        rounds = 0
        while rounds < min_rounds or time.perf_counter() < stop_at[0]:
            done[index] += forward()
            rounds += 1

    threads = [
        threading.Thread(target=work, args=(i,), daemon=True) for i in range(layout.instances)
    ]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    stop_at[0] = started + seconds
    barrier.wait()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)
