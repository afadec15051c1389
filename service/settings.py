"""Service settings: environment variables (prefix ``OMNIPOSE_``), an optional env file, CLI flags.

One place for every knob the service has. The batching knobs are named after Triton's dynamic
batcher (``max_batch_size``, ``max_queue_delay_ms``) so platform teams recognise them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/omnipose``, else ``~/.cache/omnipose`` (the XDG base directory rule)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "omnipose"


class ServiceSettings(BaseSettings):
    """Everything ``omnipose serve`` can be told. Env: ``OMNIPOSE_<FIELD>`` (case-insensitive)."""

    def model_cache_dir(self) -> Path:
        """``cache_dir``, or the default when it is not set."""
        return self.cache_dir or default_cache_dir()

    model_config = SettingsConfigDict(
        env_prefix="OMNIPOSE_",
        env_file=None,
        env_ignore_empty=True,
        extra="ignore",
        protected_namespaces=(),
    )

    # --- model -----------------------------------------------------------------------------
    weights: Path | None = Field(
        None, description="Pose checkpoint (project or published OmniPose); none: embedded default"
    )
    config: str | None = Field(
        None, description="Model config name, e.g. coco-w48-384x288; default: the checkpoint's own"
    )
    device: str = Field("auto", description="cpu, cuda, cuda:N, or auto (cuda when available)")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Pose model precision: auto = fp16 on CUDA, bf16 weights (channels"
        " last) on a CPU with native bf16 (AVX512-BF16/AMX), else fp32; fp16/bf16 only where the"
        " device supports them"
    )
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto", description="Pose network runtime: auto = on CPU, the guarded int8 model beside"
        " the weights if there is one for them (<weights>.int8, as omnipose quantize writes it;"
        " precision auto only), else the fastest of the installed"
        " backends in the precisions the CPU runs natively (or the one precision set), measured"
        " at start-up and cached in cache_dir (without warmup: the cached choice, else torch),"
        " on CUDA torch; torch (eager PyTorch); onnxruntime (the network exported to ONNX at"
        " start-up, fp32; needs the onnx extra); openvino (CPU only, fp32 or bf16 where the CPU"
        " has native bf16, auto as for torch; converted once and cached in cache_dir; needs the"
        " openvino extra)"
    )
    cache_dir: Path | None = Field(
        None, description="Where converted and compiled models (backend openvino) and start-up"
        " decisions (backend auto) are kept between starts, keyed by weights, config, input size,"
        " precision, library versions and CPU; none: $XDG_CACHE_HOME/omnipose, else"
        " ~/.cache/omnipose. Not writable: one warning, and every start converts and measures"
        " again",
    )
    int8_model: Path | None = Field(
        None, description="Guarded int8 model directory written by omnipose quantize for the"
        " loaded weights (its accuracy guard against fp32 passed, figures in /v1/models); runs"
        " in OpenVINO (backend openvino). int8 is never used without such a directory"
    )
    flip_test: bool = Field(True, description="Average with the mirrored crop")
    flip_shift: bool = Field(
        False, description="Flip test: shift the mirrored heatmaps one pixel right before"
        " averaging, as HRNet does; the published OmniPose leaves it off",
    )
    model_instances: int | None = Field(
        None, ge=1, description="Pose model instances, each with its own batch loop over one"
        " shared queue (Triton's instance groups); none: on CPU the instances x torch_threads"
        " layout measured fastest at start-up on the usable (cgroup-limited) CPUs, on a GPU 1",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per pose model instance; none: the usable"
        " CPUs divided by model_instances (or measured, see model_instances)",
    )
    lone_batch_on_all_cores: bool = Field(
        True, description="On CPU with a measured layout of several instances: the batch of a"
        " request alone in the service (every other instance idle) runs on one instance with every"
        " core when the start-up measurement says that is faster than spreading it over them",
    )

    # --- person detection --------------------------------------------------------------------
    detector: Literal["yolo", "hog", "none"] = Field(
        "hog", description="yolo (needs detector_weights), hog (OpenCV, offline), none (boxes only)"
    )
    detector_weights: Path | None = Field(None, description="Local ultralytics YOLO weights file")
    detector_min_score: float = Field(0.25, ge=0.0, le=1.0, description="Minimum person box score")
    whole_image_if_no_person: bool = Field(
        False, description="Use the whole image as one box when the detector finds nobody"
    )

    # --- dynamic batching (pose worker) ------------------------------------------------------
    max_batch_size: int = Field(16, ge=1, description="Most person crops in one pose forward pass")
    max_queue_delay_ms: float = Field(
        5.0, ge=0.0, description="Longest wait for more crops before running a partial batch,"
        " while other admitted images are still on their way to the pose model (decoding,"
        " detection); see lone_request_waits_for_batch"
    )
    lone_request_waits_for_batch: bool = Field(
        False, description="Apply max_queue_delay_ms to a request alone in the service too (no"
        " other image on its way to the pose model). Off: it runs at once, as waiting could only"
        " catch a request not yet sent. On: where the next request reliably comes within the"
        " delay (many evenly paced video streams on a GPU), lone requests wait to share batches",
    )
    detector_max_batch_size: int = Field(8, ge=1, description="Most images in one detector call")
    detector_max_queue_delay_ms: float = Field(2.0, ge=0.0, description="Detector batch wait")
    max_queue_size: int = Field(
        64, ge=1, description="Requests admitted, not finished; beyond: 429 / RESOURCE_EXHAUSTED"
    )
    cpu_workers: int = Field(
        2, ge=1, description="Threads for image decoding, crop preparation, decoding and rendering"
    )

    # --- limits ------------------------------------------------------------------------------
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest encoded image")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest decoded image (width x height): decompression bombs"
    )
    max_inflight_pixels: int = Field(
        200_000_000, ge=1, description="Decoded image pixels admitted and not yet released (an"
        " image is released once its crops are cut, or after rendering); beyond: 429 /"
        " RESOURCE_EXHAUSTED. Bounds memory: about 3 bytes per pixel. A request alone in the"
        " engine is never refused for it. Must be at least max_image_pixels",
    )
    exif_orientation: bool = Field(
        True, description="Turn images upright as their EXIF orientation tag says (phone"
        " photos); boxes and keypoints then refer to the upright image. Off: the pixels as stored",
    )
    jpeg_decode: Literal["auto", "cpu", "device"] = Field(
        "auto", description="Where JPEGs are decoded: auto = on the pose model's device when it"
        " is CUDA (torchvision, nvjpeg), else OpenCV on the CPU; cpu = always OpenCV; device ="
        " torchvision's decoder on the pose model's device, even on a CPU (what lets CPU tests"
        " run the GPU path). A JPEG the device decoder refuses is decoded by OpenCV (counted in"
        " omnipose_jpeg_device_decode_fallbacks_total); other formats always use OpenCV",
    )
    max_inflight_body_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="Request bytes received and not yet decoded, REST"
        " bodies and gRPC messages together (REST reserves its Content-Length before reading,"
        " 429 beyond; a gRPC Estimate/EstimateBatch call reserves its largest possible message"
        " before reading it and waits for room within its deadline). A request alone is never"
        " refused for it",
    )
    grpc_max_concurrent_rpcs: int = Field(
        128, ge=1, description="gRPC calls handled at once (streams count as one); beyond:"
        " RESOURCE_EXHAUSTED before the message is read. With grpc_max_message_bytes it bounds"
        " the memory gRPC requests can hold",
    )
    max_images_per_batch: int = Field(16, ge=1, description="Most images in one batch request")
    max_persons: int = Field(
        100, ge=1, description="Most persons estimated per image: detections beyond it are"
        " dropped (lowest score first); more client boxes than this is a 422 / INVALID_ARGUMENT",
    )
    default_deadline_s: float = Field(30.0, gt=0, description="Deadline when the client sets none")
    max_deadline_s: float = Field(120.0, gt=0, description="Cap on client-supplied deadlines")
    grpc_max_message_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="gRPC max receive/send message size"
    )
    stream_max_inflight: int = Field(
        8, ge=1, description="Frames of one gRPC stream being processed at once; the server stops"
        " reading further frames until results are sent (flow control holds the client back)",
    )
    # --- video streams (docs/video.md) -----------------------------------------------------
    track_detect_every: int = Field(
        5, ge=1, description="Tracked streams: run the detector on every Nth frame (and when a"
        " track is lost); in between, boxes come from the previous frame's keypoints",
    )
    track_max_missed: int = Field(
        30, ge=1, description="Frames a lost track is kept for re-identification, then dropped",
    )
    track_smooth: bool = Field(True, description="One-Euro keypoint smoothing on tracked streams")
    one_euro_min_cutoff: float = Field(
        1.0, gt=0, description="One-Euro minimum cutoff (Hz): lower is smoother, lags more",
    )
    one_euro_beta: float = Field(
        0.01, ge=0, description="One-Euro speed coefficient of the joints' offsets from the"
        " pose's centre: higher lags less on fast limb motion",
    )
    max_streams: int = Field(
        64, ge=1, description="Client stream_ids (REST, unary gRPC) tracked at once; beyond:"
        " 429 / RESOURCE_EXHAUSTED",
    )
    stream_idle_s: float = Field(
        60.0, gt=0, description="A client stream_id without frames for this long is forgotten",
    )

    # --- network -----------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Interface both servers bind to")
    http_port: int = Field(8000, ge=0, le=65535, description="REST (FastAPI) port")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port")
    http_max_connections: int = Field(
        1000, ge=1, description="Open HTTP connections served at once; a request on a connection"
        " beyond it is answered 503 before its body is read",
    )
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="Time a client has to send a request line and headers (from"
        " connecting, or from a request's first byte); beyond: 408 and the connection closes",
    )
    http_keepalive_timeout_s: float = Field(
        5.0, gt=0, description="Idle keep-alive HTTP connections close after this many seconds"
    )
    http_max_header_bytes: int = Field(
        16384, ge=1024, description="Largest HTTP request line plus headers (a long URL counts);"
        " beyond: 431",
    )
    http_body_idle_timeout_s: float = Field(
        10.0, gt=0, description="A request body that sends no byte for this long, or that"
        " averages under http_body_min_rate_bytes_s once it has taken this long, gets 408",
    )
    http_body_min_rate_bytes_s: float = Field(
        1024.0, ge=0, description="Slowest average request body upload accepted (bytes/s), checked"
        " once the body has taken http_body_idle_timeout_s",
    )
    # --- security ----------------------------------------------------------------------------
    api_key_sha256: str | None = Field(
        None, description="Accepted API keys as SHA-256 hex digests, comma-separated; with"
        " api_keys_file unset too, no key is required",
    )
    api_keys_file: Path | None = Field(
        None, description="File of accepted API keys (a mounted Secret): one key, or"
        " sha256:<hex digest>, per line",
    )
    metrics_access: Literal["open", "auth", "off"] = Field(
        "open", description="/metrics: open, auth (API key required when keys are set) or off"
    )
    docs_access: Literal["open", "auth", "off"] = Field(
        "open", description="/docs and /openapi.json: open, auth or off"
    )
    reflection_access: Literal["open", "auth", "off"] = Field(
        "open", description="gRPC server reflection: open, auth or off"
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) for TLS on both ports; needs tls_key_file"
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    grpc_tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: gRPC requires client certificates it signed (mTLS)"
    )
    warmup: bool = Field(True, description="Run warm-up passes before reporting ready")
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="Time to finish in-flight work on SIGTERM"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level")

    @model_validator(mode="after")
    def _tls_files_come_together(self) -> ServiceSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.grpc_tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("grpc_tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        return self

    @model_validator(mode="after")
    def _pixel_budget_holds_one_image(self) -> ServiceSettings:
        """A budget smaller than the largest image allowed would serialise large images."""
        if self.max_image_pixels > self.max_inflight_pixels:
            raise ValueError(
                f"max_inflight_pixels ({self.max_inflight_pixels}) must be at least"
                f" max_image_pixels ({self.max_image_pixels})"
            )
        return self
