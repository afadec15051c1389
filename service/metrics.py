"""Prometheus metrics of the service: one registry, names in Prometheus style with units.

Buckets span 0.1 ms to 60 s so both a cached small crop on GPU and a large batch on CPU land in
a finite bucket.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
PERSON_COUNT_BUCKETS = (0, 1, 2, 3, 4, 5, 8, 10, 15, 20, 30, 50, 100)

# Pipeline stages timed per image; their series exist from start-up (at zero), so dashboards
# and alerts see every stage before the first request instead of "no data".
STAGES = (
    "image_decode", "queue_wait", "detection", "preprocess", "pose_inference", "decode", "render",
)


class ServiceMetrics:
    """All metrics on a private registry (so tests can build several services in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "omnipose_requests",
            "Requests answered, by transport, endpoint and status (HTTP code or gRPC code name).",
            ["transport", "endpoint", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "omnipose_request_duration_seconds",
            "End-to-end request latency as seen by the server.",
            ["transport", "endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.stage_latency = Histogram(
            "omnipose_stage_duration_seconds",
            "Time spent per pipeline stage, per image (queue_wait: admitted -> model worker).",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        for stage in STAGES:
            self.stage_latency.labels(stage=stage)
        self.batch_size = Histogram(
            "omnipose_batch_size",
            "Items per forward pass: person crops for the pose model, images for the detector.",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "omnipose_queue_depth",
            "Items waiting in each queue (admission: requests; pose: crops; detector: images).",
            ["queue"],
            registry=r,
        )
        self.persons_per_image = Histogram(
            "omnipose_persons_per_image",
            "Persons returned per image.",
            buckets=PERSON_COUNT_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "omnipose_inflight_requests",
            "Requests admitted and not yet answered.",
            registry=r,
        )
        self.inflight_pixels = Gauge(
            "omnipose_inflight_pixels",
            "Decoded image pixels held by admitted requests (limit: max_inflight_pixels).",
            registry=r,
        )
        self.tracked_streams = Gauge(
            "omnipose_tracked_streams",
            "Video streams holding tracking state (open gRPC streams and client stream_ids).",
            registry=r,
        )
        self.inflight_body_bytes = Gauge(
            "omnipose_inflight_body_bytes",
            "HTTP request body bytes held by requests in progress (limit:"
            " max_inflight_body_bytes).",
            registry=r,
        )
        self.jpeg_device_decode_fallbacks = Counter(
            "omnipose_jpeg_device_decode_fallbacks",
            "JPEGs the device decoder (torchvision; nvjpeg on a GPU) refused and OpenCV then"
            " decoded on the CPU (jpeg_decode auto on CUDA, or device).",
            registry=r,
        )
        self.model_info = Info(
            "omnipose_model",
            "The loaded pose model: name, config, weights checksum, device, precision, backend"
            " (with backend=auto: the choice's source and its measured table), detector.",
            registry=r,
        )
