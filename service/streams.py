"""The engine's video streams: tracking state per stream, and the count the metrics report.

A stream is either a bidirectional gRPC stream (:meth:`StreamSessions.open`, freed when the call
ends) or a client ``stream_id`` sent with single requests (:meth:`StreamSessions.acquire`, kept
in a bounded registry that forgets idle streams).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

import numpy as np

from omnipose.service.errors import EngineOverloaded
from omnipose.service.metrics import ServiceMetrics
from omnipose.service.settings import ServiceSettings
from omnipose.service.tracking import PoseTracker, TrackedStream, TrackingOptions


class StreamLimitError(RuntimeError):
    """Too many client streams are open."""


class StreamRegistry:
    """Tracking state of streams that clients feed frame by frame (REST or unary gRPC) under a
    ``stream_id`` of their choosing: at most ``max_streams`` at once, each dropped after
    ``idle_s`` seconds without a frame. Thread-safe."""

    def __init__(self, max_streams: int, idle_s: float) -> None:
        self.max_streams, self.idle_s = max_streams, idle_s
        self._streams: OrderedDict[str, TrackedStream] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._streams

    def acquire(self, stream_id: str, factory: Callable[[], TrackedStream]) -> TrackedStream:
        """The stream's state, created with ``factory()`` when new; StreamLimitError when full."""
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            stream = self._streams.get(stream_id)
            if stream is None:
                if len(self._streams) >= self.max_streams:
                    raise StreamLimitError(
                        f"{len(self._streams)} streams are open, the limit is {self.max_streams};"
                        f" streams expire after {self.idle_s:g} s without frames"
                    )
                stream = factory()
                self._streams[stream_id] = stream
            stream.last_used = now
            self._streams.move_to_end(stream_id)
            return stream

    def release(self, stream_id: str) -> bool:
        """Forget a stream now (the client ended it); whether it existed."""
        with self._lock:
            return self._streams.pop(stream_id, None) is not None

    def _expire(self, now: float) -> None:
        """Drop streams idle for over ``idle_s``, oldest first. A stream whose frame is being
        processed is not idle, however long that frame takes (deadlines may exceed idle_s)."""
        for stream_id, stream in list(self._streams.items()):
            if now - stream.last_used <= self.idle_s:
                break
            if not stream.lock.locked():
                del self._streams[stream_id]


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
