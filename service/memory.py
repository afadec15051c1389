"""Give freed heap memory back to the operating system once the service is quiet.

A flood of large uploads (REST bodies, gRPC messages, decoded images) is freed by Python when it
ends, but glibc keeps most of it in its arenas: large buffers stop being mmap'ed once the
allocator has raised its mmap threshold, and memory freed inside an arena is not returned. The
pod's RSS then stays at its peak, close to the memory limit, long after the flood. ``malloc_trim``
returns the free pages; it is called from a worker thread when no request is in progress and the
resident size has grown since the last trim, so a busy service never pays for it.

Some of a flood's memory is not even freed by Python when its requests end: grpcio's asyncio
transport objects form reference cycles that keep each closed connection's receive buffers (a
whole message) alive until the cycle collector runs, and large buffers do not count towards the
collector's thresholds. :class:`LargeRequestCollector` runs it after every ``bytes_between``
bytes of finished requests (at most every ``min_interval_s``); ``gc.freeze()`` once the model is
loaded keeps those collections cheap (the model's and torch's objects are never scanned again).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 2.0
GROWTH_BYTES = 64 * 1024 * 1024  # trim once the resident size grew by this much since the last
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident set size (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def glibc_malloc_trim() -> Callable[[], object] | None:
    """``malloc_trim(0)`` of the C library, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class IdleMemoryTrim:
    """Trims the heap when ``is_idle()`` and the resident size grew by ``growth_bytes``."""

    def __init__(
        self,
        is_idle: Callable[[], bool],
        trim: Callable[[], object] | None = None,
        measure: Callable[[], int] = resident_bytes,
        growth_bytes: int = GROWTH_BYTES,
        interval_s: float = CHECK_INTERVAL_S,
    ) -> None:
        self.is_idle = is_idle
        self.trim = trim if trim is not None else glibc_malloc_trim()
        self.measure = measure
        self.growth_bytes = growth_bytes
        self.interval_s = interval_s
        self.baseline = measure()  # resident size after the last trim (or at start)
        self.trims = 0

    async def check(self) -> bool:
        """One check; True if it trimmed."""
        if self.trim is None or not self.is_idle():
            return False
        if self.measure() - self.baseline < self.growth_bytes:
            return False
        before = self.measure()
        await asyncio.to_thread(self.trim)
        self.baseline = self.measure()
        self.trims += 1
        log.debug("heap trimmed while idle: RSS %.0f -> %.0f MiB", before / 2**20,
                  self.baseline / 2**20)
        return True

    async def run(self) -> None:
        """Check every ``interval_s`` until cancelled."""
        if self.trim is None:
            log.info("no malloc_trim in this C library: freed heap memory is not trimmed")
            return
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()


class LargeRequestCollector:
    """Runs the cycle collector once ``bytes_between`` bytes of finished requests (REST bodies,
    gRPC messages) accumulated, at most every ``min_interval_s``: a flood of large requests from
    new connections would otherwise keep one message per closed gRPC connection in memory."""

    def __init__(self, bytes_between: int = GROWTH_BYTES, min_interval_s: float = 0.25,
                 collect: Callable[[], object] = gc.collect) -> None:  # fmt: skip
        self.bytes_between = bytes_between
        self.min_interval_s = min_interval_s
        self.collect = collect
        self.pending = 0
        self.collections = 0
        self._last = -float("inf")

    def finished(self, request_bytes: int) -> None:
        """A request that held ``request_bytes`` of the byte budget has ended."""
        self.pending += request_bytes
        now = time.monotonic()
        if self.pending >= self.bytes_between and now - self._last >= self.min_interval_s:
            self.collect()
            self.pending = 0
            self._last = time.monotonic()
            self.collections += 1
