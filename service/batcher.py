"""Dynamic batching over model instances: dedicated model threads form batches across requests.

Jobs (one image's crops, or one image for the detector) wait in ONE queue; each model instance
(Triton's instance groups: ``instances`` threads, each running its own forward passes with its own
OpenMP team) takes up to ``max_batch_size`` units in arrival order, splitting a large job over
several batches. When several instances are idle, a batch takes only its share of the waiting
units, so one request's crops are spread over the idle instances (low latency for one client);
under load every instance takes full batches (throughput for many). A lone batch (every other
instance idle, nothing else waiting) may instead run on one instance with every core
(:class:`AllCoresRunner`), where the machine runs it faster that way; the other instances then
start nothing until it ends, so the cores are never oversubscribed. Expired jobs are dropped
before they reach the model, cancelled ones leave the queue, and a failed batch fails only the
job whose input made it fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from omnipose.service.errors import (
    REQUEST_ID,
    SHUTTING_DOWN,
    DeadlineExceeded,
    EngineError,
    EngineUnavailable,
    internal_error,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AllCoresRunner:
    """How an instance runs a lone batch with the idle instances' cores too.

    ``faster(units)`` says whether that beats spreading the units over the idle instances;
    ``run_batch`` runs a batch as the batcher's own runner does, on every core.
    """

    faster: Callable[[int], bool]
    run_batch: Callable[[Sequence[Chunk]], list[Any]]


@dataclass(eq=False)
class _Job:
    """Work of one image waiting for a model thread; may be split over several batches."""

    payload: Any  # pose: N x 3 x H x W crops; detector: a BGR image
    size: int  # units (crops or images)
    key: Hashable  # units with different keys never share a forward pass (flip on/off)
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    request_id: str | None = None  # for the log, if this job's input makes the model fail
    enqueued_at: float = field(default_factory=time.monotonic)
    taken: int = 0  # units handed to an instance so far
    finished: int = 0  # units whose outputs are in
    parts: dict[int, Any] = field(default_factory=dict)  # output by start unit (any order)
    first_batch_at: float | None = None
    compute_started: float | None = None  # perf_counter when its first batch started
    compute_s: float = 0.0  # from its first batch's start to its last batch's end
    done: bool = False


@dataclass
class Chunk:
    """Units ``start:stop`` of one job, as they ride in one batch (what a batch runner gets)."""

    job: _Job
    start: int
    stop: int


def _resolve(future: asyncio.Future, value: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless it was cancelled meanwhile (runs on the event loop)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class DynamicBatcher:
    """Model threads (``instances``) that form batches across requests from one shared queue.

    Each instance runs one batch at a time. A batch closes when it holds ``max_batch_size`` units,
    when the oldest waiting job has waited ``max_delay_s``, or when ``more_expected()`` says no
    other work is on its way (then waiting could only catch requests not yet sent): under load
    batches fill at once, at low load latency is bounded, and a request alone never waits.
    If a batch fails, its chunks are run again one at a time, so only the job whose input fails
    is failed (and the rest of it, if it was split, is taken out of the queue).
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[Sequence[Chunk]], list[Any]],
        combine: Callable[[list[Any]], Any],
        max_batch_size: int,
        max_delay_s: float,
        on_depth: Callable[[int], None] = lambda depth: None,
        on_start: Callable[[int], None] | None = None,
        instances: int = 1,
        all_cores: AllCoresRunner | None = None,
        more_expected: Callable[[], bool] = lambda: True,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self._combine = combine
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._on_depth = on_depth
        self._on_start = on_start
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.instances = instances
        self._idle_instances = 0  # instances waiting for work (they share the queue's units)
        self._all_cores = all_cores if instances > 1 else None
        self._more_expected = more_expected
        self._cores_lent = False  # an all-cores batch runs: the other instances wait for it
        self.all_cores_batches = 0  # lone batches run on every core (tests, metrics)
        self._threads: list[threading.Thread] = []

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the instance threads; ``on_start(index)`` (thread set-up, warm-up) runs on each
        first, and its errors are raised here."""
        loop = asyncio.get_running_loop()
        started = [loop.create_future() for _ in range(self.instances)]

        def main(index: int) -> None:
            try:
                if self._on_start is not None:
                    self._on_start(index)
            except BaseException as exc:
                loop.call_soon_threadsafe(_resolve, started[index], None, exc)
                return
            loop.call_soon_threadsafe(_resolve, started[index], None)
            self._loop()

        for index in range(self.instances):
            thread = threading.Thread(
                target=main, args=(index,), name=f"omnipose-{self.name}-{index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        try:
            await asyncio.gather(*started)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Fail whatever still waits, then stop the threads after their current batches."""
        with self._cond:
            self._stopping = True
            leftovers = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in leftovers:
            job.loop.call_soon_threadsafe(
                _resolve, job.future, None, EngineUnavailable(SHUTTING_DOWN)
            )
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def idle_instances(self) -> int:
        """Instances waiting for work."""
        with self._cond:
            return self._idle_instances

    @property
    def depth(self) -> int:
        """Units waiting (not yet handed to the worker)."""
        with self._cond:
            return self._pending_units()

    # -- submission ---------------------------------------------------------------------------
    async def submit(self, payload: Any, size: int, deadline: float, key: Hashable = None) -> _Job:
        """Queue ``size`` units and wait for them; cancellation takes them out of the queue."""
        loop = asyncio.get_running_loop()
        job = _Job(
            payload, size, key, deadline, loop, loop.create_future(), request_id=REQUEST_ID.get()
        )
        with self._cond:
            if self._stopping:
                raise EngineUnavailable(SHUTTING_DOWN)
            self._queue.append(job)
            self._on_depth(self._pending_units())
            self._cond.notify()
        try:
            await job.future
        except asyncio.CancelledError:
            self._remove(job)
            raise
        return job

    def _remove(self, job: _Job) -> None:
        with self._cond:
            job.done = True
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            self._on_depth(self._pending_units())

    def _pending_units(self) -> int:
        return sum(job.size - job.taken for job in self._queue)

    # -- instance threads ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._idle_instances += 1
                try:
                    while (not self._queue or self._cores_lent) and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        return
                    while (
                        not self._stopping
                        and self._queue
                        and self._pending_units() < self.max_batch_size
                    ):
                        # the head may change while waiting (cancelled): recompute its close time
                        head = self._queue[0]
                        remaining = head.enqueued_at + self.max_delay_s - time.monotonic()
                        if remaining <= 0 or head.taken:  # a split job's rest goes at once
                            break
                        if not self._more_expected():  # nothing on its way to join the batch
                            break
                        self._cond.wait(remaining)
                    if self._stopping:
                        return
                    on_all_cores = self._runs_on_all_cores()
                    chunks, expired = self._take(
                        self.max_batch_size if on_all_cores else self._share()
                    )
                    if on_all_cores and chunks:
                        self.all_cores_batches += 1
                        self._cores_lent = True
                finally:
                    self._idle_instances -= 1
                self._on_depth(self._pending_units())
                if self._queue:  # units left: wake an idle instance for them
                    self._cond.notify()
            for job in expired:
                job.loop.call_soon_threadsafe(
                    _resolve,
                    job.future,
                    None,
                    DeadlineExceeded("the request's deadline passed while it waited in the queue"),
                )
            if chunks:
                try:
                    self._execute(chunks, on_all_cores)
                finally:
                    if on_all_cores:
                        with self._cond:
                            self._cores_lent = False
                            self._cond.notify_all()

    def _runs_on_all_cores(self) -> bool:
        """A lone batch (every instance idle, the waiting units fit one batch) that runs faster
        on one instance with every core than spread over all of them."""
        if self._all_cores is None or self._idle_instances < self.instances:
            return False
        pending = self._pending_units()
        return pending <= self.max_batch_size and self._all_cores.faster(pending)

    def _share(self) -> int:
        """Units this instance takes: a full batch, or with other instances idle only its share,
        so that one request's crops run on all of them at once."""
        pending = self._pending_units()
        if self._idle_instances <= 1 or pending >= self.max_batch_size * self._idle_instances:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, math.ceil(pending / self._idle_instances)))

    def _take(self, room: int) -> tuple[list[Chunk], list[_Job]]:
        """Up to ``room`` units in arrival order; expired jobs are dropped, not run."""
        now = time.monotonic()
        chunks: list[Chunk] = []
        expired: list[_Job] = []
        while self._queue and room > 0:
            job = self._queue[0]
            if job.deadline <= now:
                self._queue.popleft()
                job.done = True
                expired.append(job)
                continue
            count = min(room, job.size - job.taken)
            chunks.append(Chunk(job, job.taken, job.taken + count))
            job.taken += count
            if job.first_batch_at is None:
                job.first_batch_at = now
            room -= count
            if job.taken == job.size:
                self._queue.popleft()
        return chunks, expired

    def _fail(self, job: _Job, error: EngineError) -> None:
        """Answer ``job`` with ``error`` and take its units still waiting out of the queue."""
        with self._cond:
            job.done = True
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            self._on_depth(self._pending_units())
        job.loop.call_soon_threadsafe(_resolve, job.future, None, error)

    def _execute(self, chunks: list[Chunk], on_all_cores: bool = False) -> None:
        started = time.perf_counter()
        try:
            run = self._all_cores.run_batch if on_all_cores and self._all_cores else self._run_batch
            outputs = run(chunks)
        except Exception:  # a failed batch fails only the culprit, never the worker
            if len(chunks) > 1:
                log.warning(
                    "%s batch of %d chunks failed; running them one at a time",
                    self.name,
                    len(chunks),
                    exc_info=True,
                )
                for chunk in chunks:
                    if not chunk.job.done:
                        self._execute([chunk])
                return
            job = chunks[0].job
            self._fail(
                job,
                internal_error(
                    f"the {self.name} model failed on a request's input", job.request_id
                ),
            )
            return
        finished = time.perf_counter()
        for chunk, output in zip(chunks, outputs, strict=True):
            job = chunk.job
            with self._cond:  # other instances may be finishing other parts of this job
                if job.done:  # cancelled or failed meanwhile
                    continue
                if job.compute_started is None or started < job.compute_started:
                    job.compute_started = started
                job.compute_s = finished - job.compute_started
                job.parts[chunk.start] = output
                job.finished += chunk.stop - chunk.start
                if job.finished < job.size:
                    continue
                job.done = True
            try:
                value = self._combine([job.parts[start] for start in sorted(job.parts)])
            except Exception:
                error = internal_error(f"combining {self.name} results failed", job.request_id)
                job.loop.call_soon_threadsafe(_resolve, job.future, None, error)
                continue
            job.loop.call_soon_threadsafe(_resolve, job.future, value)
