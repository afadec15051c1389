"""Memory budgets applied per image, before pixels exist: a batch
request alone in the engine may not decode more pixels at once than ``max_inflight_pixels``."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from omnipose.service import admission as admission_module
from omnipose.service.admission import Admission, SharedBudget
from omnipose.service.errors import EngineOverloaded
from omnipose.service.metrics import ServiceMetrics
from omnipose.service.requests import ImageRequest
from omnipose.service.settings import ServiceSettings
from tests.test_engine import OneBoxDetector, blob_model, blob_png, make_engine


def test_a_batch_alone_stays_within_the_pixel_budget() -> None:
    image = blob_png([(60, 80)])
    pixels = 320 * 240
    budget = 2 * pixels

    async def scenario() -> tuple[int, int]:
        # A slow detector keeps decoded images waiting: each holds its pixels meanwhile.
        engine = make_engine(
            blob_model(),
            OneBoxDetector(),
            max_image_pixels=pixels,
            max_inflight_pixels=budget,
            detector_max_batch_size=8,
            detector_max_queue_delay_ms=200,
        )
        await engine.start()
        peak = 0
        hold = engine.admission.hold_pixels

        def recording_hold(lease, count: int) -> None:
            nonlocal peak
            hold(lease, count)
            peak = max(peak, engine.admission.inflight_pixels)

        engine.admission.hold_pixels = recording_hold
        try:
            results = await engine.estimate_many([ImageRequest(image) for _ in range(6)])
        finally:
            await engine.close()
        assert engine.inflight_pixels == 0
        return peak, len(results)

    peak, answered = asyncio.run(scenario())
    assert answered == 6  # waited for its own images, was not refused
    assert 0 < peak <= budget, f"{peak} decoded pixels held at once, budget {budget}"


# --- the shared budget of request bytes, and Retry-After ---------------------------------------
def test_a_waiting_reservation_is_granted_when_room_is_given_back() -> None:
    """take_within (a gRPC message's reservation) waits while others hold the budget, is
    granted once they give enough back, and is refused (429 / RESOURCE_EXHAUSTED) at its
    deadline if they never do."""

    async def scenario() -> tuple[bool, int, bool]:
        budget = SharedBudget("bytes", 100, lambda used: None, lambda: 3)
        with budget.lease() as holder, budget.lease() as waiter:
            budget.take(holder, 80)
            waiting = asyncio.create_task(budget.take_within(waiter, 50, time.monotonic() + 30))
            await asyncio.sleep(0)
            blocked = not waiting.done()
            budget.give_back(holder, 40)  # 40 + 50 fits in 100
            await asyncio.wait_for(waiting, 5)
            granted = waiter.held
            budget.give_back(waiter, 50)
            with budget.lease() as late:
                try:  # the holder's 40 + 70 never fit: refused when its (past) deadline is
                    await budget.take_within(late, 70, time.monotonic())
                    refused = False
                except EngineOverloaded as exc:
                    refused = exc.retry_after_s == 3
        return blocked, granted, refused

    blocked, granted, refused = asyncio.run(scenario())
    assert blocked and granted == 50 and refused


def test_retry_after_follows_the_median_latency_and_the_queue() -> None:
    """Retry-After is the median time admitted requests took (here 4 s on a stepped clock),
    scaled by how full the queue is: 4 s at a full queue, 1 s with it a quarter full."""
    clock = [1000.0]
    admission = Admission(ServiceSettings(max_queue_size=4), ServiceMetrics())
    assert admission.retry_after_s() == 1  # nothing measured yet

    async def scenario() -> tuple[int, int]:
        for took in (3.5, 4.0, 9.0):
            with admission.admit():
                clock[0] += took
        with admission.admit():
            quarter = admission.retry_after_s()
            with admission.admit(), admission.admit(), admission.admit():
                try:
                    with admission.admit():
                        pass
                except EngineOverloaded as exc:
                    return quarter, exc.retry_after_s
        raise AssertionError("a fifth request was admitted into a queue of 4")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(admission_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
        quarter, full = asyncio.run(scenario())
    assert (quarter, full) == (1, 4)
