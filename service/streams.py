"""The engine's video streams: tracking state per stream, and the count the metrics report.

A stream is either a bidirectional gRPC stream (:meth:`StreamSessions.open`, freed when the call
ends) or a client ``stream_id`` sent with single requests (:meth:`StreamSessions.acquire`, kept
in a bounded registry that forgets idle streams).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np

from omnipose.service.errors import EngineOverloaded
from omnipose.service.metrics import ServiceMetrics
from omnipose.service.settings import ServiceSettings
from omnipose.service.tracking import (
    PoseTracker,
    StreamLimitError,
    StreamRegistry,
    TrackedStream,
    TrackingOptions,
)


class StreamSessions:
    """Tracking state of the streams in progress. ``sigmas`` gives the loaded model's keypoint
    sigmas (and raises while none is loaded)."""

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics,
                 sigmas: Callable[[], np.ndarray]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = StreamRegistry(settings.max_streams, settings.stream_idle_s)
        self._sigmas = sigmas
        self._open = 0  # bidirectional gRPC streams holding a tracker now

    def new(self) -> TrackedStream:
        """Tracking state for one video stream, configured by the service settings."""
        s = self.settings
        options = TrackingOptions(
            detect_every=s.track_detect_every, max_missed=s.track_max_missed,
            smooth=s.track_smooth, min_cutoff=s.one_euro_min_cutoff, beta=s.one_euro_beta,
        )
        return TrackedStream(PoseTracker(self._sigmas(), options))

    @contextlib.contextmanager
    def open(self) -> Iterator[TrackedStream]:
        """A bidirectional stream's tracking state, released when the stream ends or is
        cancelled (leaving the ``with``)."""
        stream = self.new()
        self._open += 1
        self.publish_count()
        try:
            yield stream
        finally:
            self._open -= 1
            self.publish_count()

    def acquire(self, stream_id: str) -> TrackedStream:
        """The client stream ``stream_id`` (new or known); EngineOverloaded past max_streams."""
        try:
            return self.registry.acquire(stream_id, self.new)
        except StreamLimitError as exc:
            raise EngineOverloaded(str(exc)) from None
        finally:
            self.publish_count()

    def release(self, stream_id: str) -> None:
        """Forget the client stream ``stream_id`` (its last frame was answered)."""
        self.registry.release(stream_id)
        self.publish_count()

    @property
    def count(self) -> int:
        """Streams holding tracking state: open bidirectional streams and client stream_ids."""
        return self._open + len(self.registry)

    def publish_count(self) -> None:
        self.metrics.tracked_streams.set(self.count)
