"""Admission control: how much work the engine accepts, so nothing queues without limit.

Two budgets bound an engine: the number of admitted requests (``max_queue_size``) and the decoded
image pixels they hold (``max_inflight_pixels``). Beyond either a request is refused at once
(:class:`EngineOverloaded`, with a Retry-After from the recent latency) instead of waiting.
Deadlines come from the client's timeout, capped by ``max_deadline_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from service.errors import EngineOverloaded, InvalidRequest
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings


@dataclass(eq=False)
class PixelLease:
    """Decoded pixels one admitted request holds against ``max_inflight_pixels``."""

    held: int = 0
    released: asyncio.Event = field(default_factory=asyncio.Event)  # set when ``held`` drops


class Admission:
    """Counts admitted requests and their decoded pixels; refuses what is over budget.

    Used from the event loop only, so it needs no lock.
    """

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.inflight = 0
        self.inflight_pixels = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._latency_ewma_s = 0.5

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
        return max(1, math.ceil(self._latency_ewma_s))

    @contextlib.contextmanager
    def admit(self) -> Iterator[PixelLease]:
        """Hold one request slot for the ``with`` block, or raise EngineOverloaded."""
        if self.inflight >= self.settings.max_queue_size:
            retry_after = self.retry_after_s()
            raise EngineOverloaded(
                f"the service is at capacity ({self.settings.max_queue_size} requests in"
                f" progress); retry in about {retry_after} s",
                retry_after_s=retry_after,
            )
        self.inflight += 1
        self._idle.clear()
        self.metrics.inflight.set(self.inflight)
        self.metrics.queue_depth.labels(queue="admission").set(self.inflight)
        started = time.monotonic()
        lease = PixelLease()
        try:
            yield lease
        finally:
            self.release_pixels(lease, lease.held)
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)
            self.metrics.queue_depth.labels(queue="admission").set(self.inflight)
            self._latency_ewma_s = 0.8 * self._latency_ewma_s + 0.2 * (time.monotonic() - started)
            if self.inflight == 0:
                self._idle.set()

    def hold_pixels(self, lease: PixelLease, pixels: int) -> None:
        """Count a decoded image against max_inflight_pixels, or refuse the request (429).

        A request alone in the engine is never refused, so any image within max_image_pixels,
        and any batch, can be served when it is quiet.
        """
        budget = self.settings.max_inflight_pixels
        others = self.inflight_pixels - lease.held
        if others > 0 and self.inflight_pixels + pixels > budget:
            retry_after = self.retry_after_s()
            raise EngineOverloaded(
                f"the service is at capacity ({self.inflight_pixels} decoded image pixels in"
                f" progress, the limit is {budget}); retry in about {retry_after} s",
                retry_after_s=retry_after,
            )
        lease.held += pixels
        self.inflight_pixels += pixels
        self.metrics.inflight_pixels.set(self.inflight_pixels)

    async def reserve_pixels(self, lease: PixelLease, pixels: int) -> None:
        """Count an image's pixels (from its header, before decoding) against the budget.

        Pixels held by other requests over the budget: refused (429), as in
        :meth:`hold_pixels`. A request alone whose own images would pass the budget (a large
        batch) waits for its earlier images to release theirs instead, so the budget bounds a
        batch too; one image alone always fits (``max_image_pixels <= max_inflight_pixels``).
        """
        budget = self.settings.max_inflight_pixels
        while (
            lease.held > 0
            and self.inflight_pixels - lease.held == 0
            and self.inflight_pixels + pixels > budget
        ):
            lease.released.clear()
            await lease.released.wait()
        self.hold_pixels(lease, pixels)

    def release_pixels(self, lease: PixelLease, pixels: int) -> None:
        pixels = min(pixels, lease.held)
        if pixels:
            lease.released.set()
        lease.held -= pixels
        self.inflight_pixels -= pixels
        self.metrics.inflight_pixels.set(self.inflight_pixels)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every admitted request is answered; False if ``timeout`` ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
