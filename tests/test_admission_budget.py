"""Memory budgets applied per image, before pixels exist: a batch
request alone in the engine may not decode more pixels at once than ``max_inflight_pixels``."""

from __future__ import annotations

import asyncio

from omnipose.service.requests import ImageRequest
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
