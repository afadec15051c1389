"""Dynamic batching: a dedicated model thread forms batches across requests.

Jobs (one image's crops, or one image for the detector) wait in one queue; the worker takes up to
``max_batch_size`` units in arrival order, splitting a large job over several batches. Expired
jobs are dropped before they reach the model, cancelled ones leave the queue, and a failed batch
fails only the job whose input made it fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.errors import (
    REQUEST_ID,
    SHUTTING_DOWN,
    DeadlineExceeded,
    EngineError,
    EngineUnavailable,
    internal_error,
)

log = logging.getLogger(__name__)


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
    taken: int = 0  # units handed to the worker so far
    parts: list = field(default_factory=list)
    first_batch_at: float | None = None
    compute_s: float = 0.0  # model time of the batches this job rode in
    done: bool = False


@dataclass
class _Chunk:
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
    """A dedicated thread that forms batches across requests and runs them one at a time.

    A batch closes when it holds ``max_batch_size`` units or when the oldest waiting job has
    waited ``max_delay_s``: under load batches fill at once, at low load latency is bounded.
    If a batch fails, its chunks are run again one at a time, so only the job whose input fails
    is failed (and the rest of it, if it was split, is taken out of the queue).
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[Sequence[_Chunk]], list[Any]],
        combine: Callable[[list[Any]], Any],
        max_batch_size: int,
        max_delay_s: float,
        on_depth: Callable[[int], None] = lambda depth: None,
        on_start: Callable[[], None] | None = None,
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
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the thread; ``on_start`` (warm-up) runs on it first, errors are raised here."""
        loop = asyncio.get_running_loop()
        started: asyncio.Future = loop.create_future()

        def main() -> None:
            try:
                if self._on_start is not None:
                    self._on_start()
            except BaseException as exc:
                loop.call_soon_threadsafe(_resolve, started, None, exc)
                return
            loop.call_soon_threadsafe(_resolve, started, None)
            self._loop()

        self._thread = threading.Thread(target=main, name=f"omnipose-{self.name}", daemon=True)
        self._thread.start()
        await started

    def stop(self, timeout: float = 10.0) -> None:
        """Fail whatever still waits, then stop the thread after its current batch."""
        with self._cond:
            self._stopping = True
            leftovers = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in leftovers:
            job.loop.call_soon_threadsafe(
                _resolve, job.future, None, EngineUnavailable(SHUTTING_DOWN)
            )
        if self._thread is not None:
            self._thread.join(timeout)

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

    # -- worker thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                while (
                    not self._stopping
                    and self._queue
                    and self._pending_units() < self.max_batch_size
                ):
                    # the head may change while waiting (cancelled), so recompute its close time
                    remaining = self._queue[0].enqueued_at + self.max_delay_s - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stopping:
                    return
                chunks, expired = self._take()
                self._on_depth(self._pending_units())
            for job in expired:
                job.loop.call_soon_threadsafe(
                    _resolve,
                    job.future,
                    None,
                    DeadlineExceeded("the request's deadline passed while it waited in the queue"),
                )
            if chunks:
                self._execute(chunks)

    def _take(self) -> tuple[list[_Chunk], list[_Job]]:
        """Up to max_batch_size units in arrival order; expired jobs are dropped, not run."""
        now = time.monotonic()
        chunks: list[_Chunk] = []
        expired: list[_Job] = []
        room = self.max_batch_size
        while self._queue and room > 0:
            job = self._queue[0]
            if job.deadline <= now:
                self._queue.popleft()
                job.done = True
                expired.append(job)
                continue
            count = min(room, job.size - job.taken)
            chunks.append(_Chunk(job, job.taken, job.taken + count))
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

    def _execute(self, chunks: list[_Chunk]) -> None:
        started = time.perf_counter()
        try:
            outputs = self._run_batch(chunks)
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
        elapsed = time.perf_counter() - started
        for chunk, output in zip(chunks, outputs, strict=True):
            job = chunk.job
            if job.done:  # cancelled or failed meanwhile
                continue
            job.compute_s += elapsed
            job.parts.append(output)
            if chunk.stop == job.size:
                job.done = True
                try:
                    value = self._combine(job.parts)
                except Exception:
                    error = internal_error(f"combining {self.name} results failed", job.request_id)
                    job.loop.call_soon_threadsafe(_resolve, job.future, None, error)
                    continue
                job.loop.call_soon_threadsafe(_resolve, job.future, value)
