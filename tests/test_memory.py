"""The idle heap trim: when it trims, and that glibc's trim really returns memory."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import weakref

import pytest

from omnipose.service.memory import (
    IdleMemoryTrim,
    LargeRequestCollector,
    glibc_malloc_trim,
    resident_bytes,
)

MIB = 2**20


class Scenario:
    """A fake resident size and a recording trim, so the rule is tested without the allocator."""

    def __init__(self) -> None:
        self.rss = 500 * MIB
        self.idle = True
        self.trimmed = 0

    def trim(self) -> None:
        self.trimmed += 1
        self.rss = 520 * MIB

    def trimmer(self) -> IdleMemoryTrim:
        return IdleMemoryTrim(lambda: self.idle, self.trim, lambda: self.rss, 64 * MIB, 0.01)


def test_trims_only_when_idle_and_grown() -> None:
    scenario = Scenario()
    trimmer = scenario.trimmer()
    assert not asyncio.run(trimmer.check())  # idle, not grown
    scenario.rss = 1200 * MIB
    scenario.idle = False
    assert not asyncio.run(trimmer.check())  # grown, busy
    scenario.idle = True
    assert asyncio.run(trimmer.check()) and scenario.trimmed == 1
    assert trimmer.baseline == 520 * MIB
    assert not asyncio.run(trimmer.check())  # nothing grew since
    assert scenario.trimmed == 1


def test_glibc_trim_returns_freed_heap_memory() -> None:
    """Many mid-sized blocks freed inside the heap stay resident until the trim."""
    trim = glibc_malloc_trim()
    if trim is None:
        pytest.skip("this C library has no malloc_trim")
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    block = 64 * 1024  # below the mmap threshold: served from the heap
    blocks = [libc.malloc(block) for _ in range(4000)]  # 250 MiB
    keep = blocks[-1]  # one block at the top keeps the heap from shrinking by itself
    for pointer in blocks:
        libc.memset(pointer, 1, block)
    for pointer in blocks[:-1]:
        libc.free(pointer)
    before = resident_bytes()
    trim()
    after = resident_bytes()
    libc.free(keep)
    assert before - after > 100 * MIB, (before / MIB, after / MIB)


def test_large_requests_trigger_the_cycle_collector_at_most_so_often() -> None:
    """Collections after every ``bytes_between`` bytes of finished requests, none more often
    than ``min_interval_s`` (here long: the second burst inside it waits)."""
    collected = []
    collector = LargeRequestCollector(bytes_between=100, min_interval_s=3600,
                                      collect=lambda: collected.append(1))  # fmt: skip
    collector.finished(60)
    assert not collected  # 60 of 100 bytes
    collector.finished(60)
    assert len(collected) == 1 and collector.pending == 0
    collector.finished(500)
    assert len(collected) == 1 and collector.pending == 500  # within the interval


def test_a_cycle_holding_a_large_buffer_is_freed_by_the_collection() -> None:
    """Why the collector exists: a reference cycle keeps its buffer until a collection, however
    large the buffer (the automatic collector counts objects, not bytes)."""

    class Holder:
        pass

    gc.disable()  # no automatic collection in between
    try:
        holder = Holder()
        holder.self = holder  # a cycle, as grpcio's transport objects form
        holder.buffer = bytearray(8 * 1024 * 1024)
        alive = weakref.ref(holder)
        del holder
        assert alive() is not None
        LargeRequestCollector(bytes_between=1, min_interval_s=0).finished(8 * 1024 * 1024)
        assert alive() is None
    finally:
        gc.enable()
