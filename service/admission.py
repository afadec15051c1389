"""Admission control: how much work the engine accepts, so nothing queues without limit.

Budgets bound an engine: the number of admitted requests (``max_queue_size``), the decoded image
pixels they hold (``max_inflight_pixels``) and the request bytes received but not yet decoded,
REST bodies and gRPC messages alike (``max_inflight_body_bytes``, see service.uploads). Beyond
any of them a request is refused at once (:class:`EngineOverloaded`, with a Retry-After from the
measured median latency) instead of waiting; a gRPC message, whose size is unknown until it is
read, waits for its reservation instead (:meth:`SharedBudget.take_within`). Deadlines come from
the client's timeout, capped by ``max_deadline_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from omnipose.service.errors import EngineOverloaded, InvalidRequest
from omnipose.service.metrics import ServiceMetrics
from omnipose.service.settings import ServiceSettings

LATENCY_WINDOW = 128  # admitted requests whose latency sets Retry-After


@dataclass(eq=False)
class BudgetLease:
    """What one request holds against a :class:`SharedBudget`."""

    held: int = 0
    released: asyncio.Event = field(default_factory=asyncio.Event)  # set when ``held`` drops
    peak: int = 0  # the most it held at once


class SharedBudget:
    """A quantity (pixels, bytes) shared by the requests in progress, with one refusal rule.

    Taking more than the limit is refused (429) while other requests hold some of it; a request
    alone is never refused, so anything within the per-request limits is served when the service
    is quiet. Event-loop only, so it needs no lock.
    """

    def __init__(self, what: str, limit: int, on_change: Callable[[int], None],
                 retry_after_s: Callable[[], int]) -> None:  # fmt: skip
        self.what = what  # in messages: "{used} {what} in progress"
        self.limit = limit
        self.used = 0
        self._on_change = on_change
        self._retry_after_s = retry_after_s
        self._freed: asyncio.Event | None = None  # set when some is given back (for waiters)
        self.on_lease_end: Callable[[int], None] | None = None  # called with a lease's peak

    @contextlib.contextmanager
    def lease(self) -> Iterator[BudgetLease]:
        """A lease for the ``with`` block; whatever it still holds is given back at the end."""
        lease = BudgetLease()
        try:
            yield lease
        finally:
            self.give_back(lease, lease.held)
            if self.on_lease_end is not None and lease.peak:
                self.on_lease_end(lease.peak)

    def others_hold(self, lease: BudgetLease) -> bool:
        return self.used - lease.held > 0

    def take(self, lease: BudgetLease, count: int) -> None:
        """Hold ``count`` more for ``lease``, or refuse the request (EngineOverloaded)."""
        if count <= 0:
            return
        if self.others_hold(lease) and self.used + count > self.limit:
            retry_after = self._retry_after_s()
            raise EngineOverloaded(
                f"the service is at capacity ({self.used} {self.what} in progress, the limit is"
                f" {self.limit}); retry in about {retry_after} s",
                retry_after_s=retry_after,
            )
        lease.held += count
        lease.peak = max(lease.peak, lease.held)
        self.used += count
        self._on_change(self.used)

    def fits(self, lease: BudgetLease, count: int) -> bool:
        """Whether :meth:`take` of ``count`` would succeed now."""
        return not self.others_hold(lease) or self.used + count <= self.limit

    async def take_within(self, lease: BudgetLease, count: int, deadline: float) -> None:
        """:meth:`take`, waiting (until ``deadline``, time.monotonic) for others to give some
        back instead of refusing: for a gRPC message, which grpcio would otherwise receive whole
        before anything could refuse it. Past the deadline: EngineOverloaded."""
        while not self.fits(lease, count):
            if self._freed is None:
                self._freed = asyncio.Event()
            freed = self._freed
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await freed.wait()
            except TimeoutError:
                break  # take() below refuses with the usual message
        self.take(lease, count)

    def give_back(self, lease: BudgetLease, count: int) -> None:
        count = min(count, lease.held)
        if count <= 0:
            return
        lease.held -= count
        self.used -= count
        lease.released.set()
        self._on_change(self.used)
        if self._freed is not None:  # wake every waiter; each checks again whether it fits
            self._freed.set()
            self._freed = None


class Admission:
    """Counts admitted requests and their decoded pixels; refuses what is over budget.

    Used from the event loop only, so it needs no lock.
    """

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.inflight = 0
        self.pixels = SharedBudget("decoded image pixels", settings.max_inflight_pixels,
                                   metrics.inflight_pixels.set, self.retry_after_s)
        # Bytes received and not yet decoded: REST bodies and gRPC messages share it.
        self.body_bytes = SharedBudget("bytes of request bodies", settings.max_inflight_body_bytes,
                                       metrics.inflight_body_bytes.set, self.retry_after_s)
        self._idle = asyncio.Event()
        self._idle.set()
        self._latencies_s: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def deadline_from(self, timeout_s: float | None) -> float:
        """Absolute deadline (time.monotonic) from the client's timeout, capped by settings."""
        if timeout_s is None:
            timeout_s = self.settings.default_deadline_s
        if not math.isfinite(timeout_s) or timeout_s <= 0:
            raise InvalidRequest(
                f"the request timeout must be a positive number of seconds, got {timeout_s!r}"
            )
        return time.monotonic() + min(timeout_s, self.settings.max_deadline_s)

    def retry_after_s(self) -> int:
        """Seconds a refused client should wait (Retry-After, gRPC ``retry-after``): the median
        time an admitted request spent in the service over the last :data:`LATENCY_WINDOW`,
        scaled by how full the queue is: a client refused at a full queue waits about one median
        latency, one refused by a byte or pixel budget with the queue a quarter full a quarter
        of it. At least 1 s, at most ``max_deadline_s``."""
        if not self._latencies_s:
            return 1
        median = statistics.median(self._latencies_s)
        fill = min(1.0, self.inflight / self.settings.max_queue_size)
        return max(1, min(math.ceil(median * fill), math.ceil(self.settings.max_deadline_s)))

    def check_capacity(self) -> None:
        """Refuse (EngineOverloaded) if a request would be refused a slot now; holds nothing.
        REST checks this before reading a body, then admits once the body is in."""
        if self.inflight >= self.settings.max_queue_size:
            retry_after = self.retry_after_s()
            raise EngineOverloaded(
                f"the service is at capacity ({self.settings.max_queue_size} requests in"
                f" progress); retry in about {retry_after} s",
                retry_after_s=retry_after,
            )

    @contextlib.contextmanager
    def admit(self) -> Iterator[BudgetLease]:
        """Hold one request slot for the ``with`` block, or raise EngineOverloaded."""
        self.check_capacity()
        self.inflight += 1
        self._idle.clear()
        self.metrics.inflight.set(self.inflight)
        self.metrics.queue_depth.labels(queue="admission").set(self.inflight)
        started = time.monotonic()
        try:
            with self.pixels.lease() as lease:
                yield lease
        finally:
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)
            self.metrics.queue_depth.labels(queue="admission").set(self.inflight)
            self._latencies_s.append(time.monotonic() - started)
            if self.inflight == 0:
                self._idle.set()

    @property
    def inflight_pixels(self) -> int:
        return self.pixels.used

    def hold_pixels(self, lease: BudgetLease, pixels: int) -> None:
        """Count a decoded image against max_inflight_pixels, or refuse the request (429).

        A request alone in the engine is never refused, so any image within max_image_pixels,
        and any batch, can be served when it is quiet.
        """
        self.pixels.take(lease, pixels)

    async def reserve_pixels(self, lease: BudgetLease, pixels: int) -> None:
        """Count an image's pixels (from its header, before decoding) against the budget.

        Pixels held by other requests over the budget: refused (429), as in
        :meth:`hold_pixels`. A request alone whose own images would pass the budget (a large
        batch) waits for its earlier images to release theirs instead, so the budget bounds a
        batch too; one image alone always fits (``max_image_pixels <= max_inflight_pixels``).
        """
        while (
            lease.held > 0
            and not self.pixels.others_hold(lease)
            and self.pixels.used + pixels > self.pixels.limit
        ):
            lease.released.clear()
            await lease.released.wait()
        self.hold_pixels(lease, pixels)

    def release_pixels(self, lease: BudgetLease, pixels: int) -> None:
        self.pixels.give_back(lease, pixels)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every admitted request is answered; False if ``timeout`` ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
