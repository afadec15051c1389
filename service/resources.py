"""How many CPUs this process may really use (affinity and cgroup quota), how the pose model
spreads over them (instances x threads, measured on the machine it starts on), and the thread
set-up that follows."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import torch

from omnipose.service.settings import ServiceSettings

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


@dataclass(frozen=True)
class LoneBatchRule:
    """Whether a lone batch (every other instance idle, nothing else waiting) finishes sooner
    spread over the instances or on one instance with every core, from latencies measured at
    start-up (:func:`measure_lone_batches`).

    Spread, the slowest instance runs ``ceil(units / instances)`` crops, each taking what one
    crop per instance took with all instances running at once. On every core, the time is
    interpolated (and extrapolated) from one crop and ``probe_units`` crops. With two
    single-threaded instances, 1 or 3 crops can finish sooner on both cores (one instance has
    nothing to do, or runs 2 crops while the other runs 1); 2 and 4 split evenly. Machines
    differ, hence the measurement.
    """

    instances: int
    spread_one_s: float  # one crop on every instance at once
    all_cores_one_s: float  # one crop on one instance with every core
    all_cores_probe_s: float  # probe_units crops on one instance with every core
    probe_units: int

    def all_cores_s(self, units: int) -> float:
        per_crop = (self.all_cores_probe_s - self.all_cores_one_s) / (self.probe_units - 1)
        return self.all_cores_one_s + (units - 1) * max(per_crop, 0.0)

    def spread_s(self, units: int) -> float:
        return math.ceil(units / self.instances) * self.spread_one_s

    def all_cores_faster(self, units: int) -> bool:
        return self.all_cores_s(units) < self.spread_s(units)

    def __str__(self) -> str:
        """The measured latencies in milliseconds, for the start-up log."""
        return (
            f"1 crop on each of {self.instances} instances at once {self.spread_one_s * 1e3:.1f}"
            f" ms; on one instance with every core: 1 crop {self.all_cores_one_s * 1e3:.1f} ms,"
            f" {self.probe_units} crops {self.all_cores_probe_s * 1e3:.1f} ms"
        )


def measure_lone_batches(
    forward: Callable[[int], object], layout: InstanceLayout, cpus: int, probe_units: int,
    repeats: int = 3,
) -> LoneBatchRule:
    """Latencies behind a :class:`LoneBatchRule`: ``forward(n)`` runs a batch of n crops.

    Each is the median of ``repeats`` after a warm-up, measured on threads set up as the
    service's instances are (the all-cores batch on a thread with ``cpus`` torch threads).
    """

    def timed(threads: int, units: int, count: int = 1) -> float:
        """Median time of ``count`` batches of ``units`` at once, one per pool thread."""
        with ThreadPoolExecutor(count, initializer=torch.set_num_threads,
                                initargs=(threads,)) as pool:  # fmt: skip
            times = []
            for _ in range(repeats + 1):  # the first warms every thread's OpenMP team up
                started = time.perf_counter()
                for future in [pool.submit(forward, units) for _ in range(count)]:
                    future.result()
                times.append(time.perf_counter() - started)
        return sorted(times[1:])[repeats // 2]

    return LoneBatchRule(
        instances=layout.instances,
        spread_one_s=timed(layout.threads, 1, count=layout.instances),
        all_cores_one_s=timed(cpus, 1),
        all_cores_probe_s=timed(cpus, probe_units),
        probe_units=probe_units,
    )


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
