"""The REST API of a real server process (uvicorn on loopback) with a real HTTP client.

Covers every endpoint, the documented response and error shapes, bad input of every kind (each
answered with a 4xx that names the problem, and the next request still served), batching of
concurrent requests (read back from /metrics), backpressure, deadlines, client disconnects and
graceful shutdown, body limits that hold for chunked uploads, and request ids (in-process app for
the one failure a real server cannot be made to have).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import cv2
import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from omnipose.proto import omnipose_pb2, omnipose_pb2_grpc
from omnipose.service.engine import Admitted, PoseEngine
from omnipose.service.metrics import ServiceMetrics
from omnipose.service.rest import create_app
from omnipose.service.schemas import (
    BatchPoseResponse,
    ErrorResponse,
    ModelDescription,
    PoseResponse,
)
from omnipose.service.settings import ServiceSettings
from tests.conftest import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_IMAGES_PER_BATCH,
    SLOW_QUEUE_DELAY_MS,
    ServerProcess,
    running_server,
    wait_until,
)

pytestmark = pytest.mark.slow

NUM_COCO_JOINTS = 17


def pose(client: httpx.Client, image: bytes, **params: object) -> httpx.Response:
    files = {"image": ("image.jpg", image, "image/jpeg")}
    query = {k: (json.dumps(v) if k == "boxes" else v) for k, v in params.items()}
    return client.post("/v1/pose", files=files, params=query)


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    """The common error shape, the status, and a message that names the problem."""
    assert response.status_code == status, response.text
    error = ErrorResponse.model_validate(response.json()).error
    for word in words:
        assert word.lower() in error.message.lower(), error.message


def assert_still_serving(client: httpx.Client, images) -> None:
    response = pose(client, images.bus, boxes=images.bus_boxes)
    assert response.status_code == 200, response.text
    assert len(response.json()["persons"]) == 2


# --- endpoints -------------------------------------------------------------------------------
def test_health_readiness_and_model(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready"}
    model = ModelDescription.model_validate(http.get("/v1/models").json())
    assert model.config.name == "coco-w18-128x96"
    assert http.get("/v1/models").json()["config"]["head"] == "waspv2"
    assert model.input_size == [128, 96] and model.heatmap_size == [32, 24]
    assert len(model.keypoints.joint_names) == NUM_COCO_JOINTS
    assert all(0 <= j < NUM_COCO_JOINTS for limb in model.keypoints.limbs for j in limb)
    assert model.detector == "hog" and model.trained is False
    assert model.name == "omnipose-coco-w18-128x96"
    assert model.flip_shift is False  # the published OmniPose setting, by default


def test_pose_with_client_boxes_multipart(http: httpx.Client, images) -> None:
    response = pose(http, images.bus, boxes=images.bus_boxes, image_id=42)
    assert response.status_code == 200, response.text
    body = PoseResponse.model_validate(response.json())
    assert (body.image.width, body.image.height) == images.bus_size
    assert body.model.name == "omnipose-coco-w18-128x96"
    assert len(body.persons) == 2
    assert sorted(p.bbox for p in body.persons) == sorted(images.bus_boxes)
    for person in body.persons:
        assert person.image_id == 42 and person.category_id == 1
        assert len(person.keypoints) == 3 * NUM_COCO_JOINTS
        assert next(iter(person.named_keypoints)) == "nose"
    assert "detection" not in body.timings_ms  # boxes given: no detector
    for stage in ("image_decode", "preprocess", "queue_wait", "pose_inference", "decode"):
        assert body.timings_ms[stage] >= 0


def test_pose_raw_body_runs_person_detection(http: httpx.Client, images) -> None:
    response = http.post("/v1/pose", content=images.bus, headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    body = PoseResponse.model_validate(response.json())
    assert body.timings_ms["detection"] > 0
    assert len(body.persons) >= 1  # the bus photo has four people; HOG finds some
    width, height = images.bus_size
    for person in body.persons:
        x, y, w, h = person.bbox
        assert x >= 0 and y >= 0 and x + w <= width + 1e-6 and y + h <= height + 1e-6


def test_form_fields_override_query_and_filters_apply(http: httpx.Client, images) -> None:
    boxes = [*images.bus_boxes, [150.0, 300.0, 80.0, 200.0]]
    files = {"image": ("bus.jpg", images.bus, "image/jpeg")}
    response = http.post("/v1/pose", files=files, params={"boxes": "[]"},
                         data={"boxes": json.dumps(boxes), "max_persons": "2"})
    assert response.status_code == 200, response.text
    assert len(response.json()["persons"]) == 2
    assert pose(http, images.bus, boxes=[]).json()["persons"] == []

    full = pose(http, images.bus, boxes=boxes).json()["persons"]
    threshold = 0.5
    cut = pose(http, images.bus, boxes=boxes, min_keypoint_score=threshold).json()["persons"]
    for raw, filtered in zip(full, cut, strict=True):
        raw_kps = np.array(raw["keypoints"]).reshape(-1, 3)
        cut_kps = np.array(filtered["keypoints"]).reshape(-1, 3)
        low = raw_kps[:, 2] < threshold
        assert np.all(cut_kps[low] == 0)
        np.testing.assert_allclose(cut_kps[~low], raw_kps[~low])
    cutoff = max(max(p["score"] for p in full) - 1e-6, 0.0)  # scores are rounded to 1e-6
    kept = pose(http, images.bus, boxes=boxes, min_instance_score=cutoff).json()["persons"]
    assert len(kept) == sum(p["score"] >= cutoff for p in full) >= 1
    assert all(p["score"] >= cutoff for p in kept)


def test_min_box_score_drops_detections_that_scored_lower(http: httpx.Client, images) -> None:
    detected = pose(http, images.bus).json()["persons"]  # the server's HOG detector
    scores = sorted(p["box_score"] for p in detected)
    assert len(set(scores)) >= 2, scores  # the bus photo gives detections of several scores
    cutoff = scores[len(scores) // 2]
    kept = pose(http, images.bus, min_box_score=cutoff).json()["persons"]
    assert sorted(p["box_score"] for p in kept) == [s for s in scores if s >= cutoff]
    refused = pose(http, images.bus, min_box_score=2)
    assert refused.status_code == 422 and "min_box_score" in refused.json()["error"]["message"]


def test_render_returns_a_jpeg_of_the_image(http: httpx.Client, images) -> None:
    response = pose(http, images.bus, boxes=images.bus_boxes, render="true")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-persons"] == "2"
    overlay = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
    assert (overlay.shape[1], overlay.shape[0]) == images.bus_size


def test_batch_results_come_back_in_order(http: httpx.Client, images) -> None:
    order = [images.zidane, images.bus, images.zidane]
    files = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(order)]
    boxes = [[[10, 10, 60, 120]], images.bus_boxes, None]
    response = http.post("/v1/pose/batch", files=files,
                         params={"boxes": json.dumps(boxes), "image_id": "7"})
    assert response.status_code == 200, response.text
    results = BatchPoseResponse.model_validate(response.json()).results
    sizes = [images.zidane_size, images.bus_size, images.zidane_size]
    assert [(r.image.width, r.image.height) for r in results] == sizes
    assert [len(r.persons) for r in results[:2]] == [1, 2]
    assert "detection" in results[2].timings_ms
    assert [p.image_id for p in results[1].persons] == [8, 8]


def test_openapi_documents_every_endpoint_and_error(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/pose", "/v1/pose/batch", "/v1/models", "/healthz", "/readyz", "/metrics"):
        assert path in paths
    single = paths["/v1/pose"]["post"]
    for status in ("400", "413", "415", "422", "429", "503", "504"):
        schema = single["responses"][status]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/ErrorResponse")
    ok = single["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/PoseResponse")
    assert "image/jpeg" in ok
    body = single["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["required"] == ["image"]
    assert "image/*" in body
    params = {p["name"]: p for p in single["parameters"]}
    assert {"boxes", "flip", "min_keypoint_score", "min_instance_score", "max_persons", "render",
            "X-Request-Timeout"} <= set(params)
    # ranges are enforced by the engine, still documented here
    assert params["min_keypoint_score"]["schema"]["maximum"] == 1
    assert params["max_persons"]["schema"]["minimum"] == 1
    batch = paths["/v1/pose/batch"]["post"]["responses"]["200"]["content"]
    assert batch["application/json"]["schema"]["$ref"].endswith("/BatchPoseResponse")
    assert paths["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"]["$ref"].endswith("/ModelDescription")


# --- bad input -------------------------------------------------------------------------------
def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge canvas: a decompression bomb's calling card."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def encoded(image_format: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40, 80, 120)).save(buffer, format=image_format)
    return buffer.getvalue()


BAD_IMAGES = {
    "empty": (lambda images: b"", 400, ["empty"]),
    "not an image": (lambda images: b"hello, this is text" * 10, 400, ["not a recognised"]),
    "truncated jpeg": (lambda images: images.bus[: len(images.bus) // 2], 400, ["truncated"]),
    "gif": (lambda images: encoded("GIF", (64, 48)), 415, ["GIF", "not supported"]),
    "over byte limit": (lambda images: images.bus + b"\0" * MAX_IMAGE_BYTES, 413, ["limit"]),
    "decompression bomb": (lambda images: png_header_claiming(50_000, 50_000), 413, []),
    "over pixel limit": (lambda images: encoded("PNG", (2100, 2000)), 413,
                         [str(MAX_IMAGE_PIXELS)]),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_get_a_4xx_naming_the_problem(http: httpx.Client, images, case: str) -> None:
    make, status, words = BAD_IMAGES[case]
    assert_error(pose(http, make(images), boxes=images.bus_boxes), status, *words)
    assert_still_serving(http, images)


BAD_BOXES = {
    "negative width": ("[[10, 10, -5, 20]]", ["box 0", "positive"]),
    "zero height": ("[[10, 10, 5, 20], [1, 2, 3, 0]]", ["box 1", "positive"]),
    "outside the image": ("[[5000, 10, 50, 50]]", ["box 0", "outside"]),
    "NaN": ("[[NaN, 10, 50, 50]]", ["box 0", "NaN"]),
    "wrong arity": ("[[10, 10, 50]]", ["box 0", "4 numbers"]),
    "not a list of boxes": ("{\"x\": 1}", ["list"]),
    "not JSON": ("[[10, 10, 50, 50", ["not valid JSON"]),
    "strings": ("[[\"a\", 10, 50, 50]]", ["numbers"]),
}


@pytest.mark.parametrize("case", list(BAD_BOXES))
def test_malformed_boxes_get_422(http: httpx.Client, images, case: str) -> None:
    boxes, words = BAD_BOXES[case]
    files = {"image": ("bus.jpg", images.bus, "image/jpeg")}
    assert_error(http.post("/v1/pose", files=files, params={"boxes": boxes}), 422, *words)
    assert_still_serving(http, images)


def test_bad_requests_of_other_kinds(http: httpx.Client, images) -> None:
    files = {"image": ("bus.jpg", images.bus, "image/jpeg")}
    assert_error(http.post("/v1/pose", content=b"{}", headers={"content-type": "application/json"}),
                 415, "content type")
    assert_error(http.post("/v1/pose", files={"picture": ("a.jpg", images.bus, "image/jpeg")}),
                 422, "'image'")
    assert_error(http.post("/v1/pose", files=files, params={"min_keypoint_score": "2"}), 422,
                 "min_keypoint_score")
    assert_error(http.post("/v1/pose", files=files, data={"max_persons": "0"}), 422, "max_persons")
    assert_error(http.post("/v1/pose", files=files, data={"box": "[]"}), 422, "box")
    assert_error(http.post("/v1/pose", files=files, headers={"X-Request-Timeout": "soon"}), 422,
                 "X-Request-Timeout")
    assert_error(http.post("/v1/pose", files=files, headers={"X-Request-Timeout": "-1"}), 422,
                 "X-Request-Timeout")
    two = [("image", (f"{i}.jpg", images.bus, "image/jpeg")) for i in range(2)]
    assert_error(http.post("/v1/pose", files=two), 422, "exactly one file", "/v1/pose/batch")
    too_many = [("images", (f"{i}.jpg", images.bus, "image/jpeg"))
                for i in range(MAX_IMAGES_PER_BATCH + 1)]
    assert_error(http.post("/v1/pose/batch", files=too_many), 413,
                 f"more than {MAX_IMAGES_PER_BATCH}", f"limit of {MAX_IMAGES_PER_BATCH}")
    bad_second = [("images", ("a.jpg", images.bus, "image/jpeg")),
                  ("images", ("b.jpg", b"garbage", "image/jpeg"))]
    assert_error(http.post("/v1/pose/batch", files=bad_second), 400, "images[1]")
    assert_error(http.post("/v1/pose/batch", files=bad_second[:1],
                           params={"boxes": "[[[1, 1, 5, 5]], null]"}), 422, "one entry")
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_still_serving(http, images)


def chunked(prefix: bytes, total: int, piece: int = 256 * 1024) -> Iterator[bytes]:
    """A request body of unknown length (httpx sends it chunked, with no Content-Length)."""
    yield prefix
    for _ in range(0, total, piece):
        yield b"\0" * piece


def multipart_head(field: str, boundary: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\";"
            f" filename=\"a.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()


def test_chunked_uploads_are_cut_off_at_the_limit(http: httpx.Client, images) -> None:
    """No Content-Length to check up front: the bytes are counted as they arrive, and the
    answer is 413 about the request body (not the image decoder's verdict on a body that was
    read whole). Small chunked bodies still work."""
    boundary = "omnipose-test-boundary"
    multipart = {"content-type": f"multipart/form-data; boundary={boundary}"}
    cases = [
        ("/v1/pose", {"content-type": "image/jpeg"}, images.bus, 3 * MAX_IMAGE_BYTES),
        ("/v1/pose", multipart, multipart_head("image", boundary) + images.bus,
         4 * MAX_IMAGE_BYTES),
        ("/v1/pose/batch", multipart, multipart_head("images", boundary) + images.bus,
         (MAX_IMAGES_PER_BATCH + 3) * MAX_IMAGE_BYTES),
    ]
    for path, headers, prefix, size in cases:
        response = http.post(path, content=chunked(prefix, size), headers=headers)
        assert response.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "request body", "over the limit")
    pieces = (images.bus[i:i + 4096] for i in range(0, len(images.bus), 4096))
    small = http.post("/v1/pose", content=pieces, headers={"content-type": "image/jpeg"},
                      params={"boxes": json.dumps(images.bus_boxes)})
    assert small.status_code == 200, small.text
    assert len(small.json()["persons"]) == 2
    assert_still_serving(http, images)


def test_image_id_is_a_number_only_for_plain_ascii_digits(http: httpx.Client, images) -> None:
    cases = {"²": "²", "٣": "٣", "42": 42, "007": 7, "1" * 20: "1" * 20, "cam-7": "cam-7"}
    for image_id, expected in cases.items():
        response = pose(http, images.bus, boxes=images.bus_boxes[:1], image_id=image_id)
        assert response.status_code == 200, response.text
        assert response.json()["persons"][0]["image_id"] == expected
    assert_error(pose(http, images.bus, boxes=[], image_id="x" * 201), 422, "image_id")


def test_every_response_carries_a_request_id(http: httpx.Client, images) -> None:
    responses = [http.get("/healthz"), http.get("/metrics"), http.get("/nowhere"),
                 pose(http, b"junk", boxes=[]), pose(http, images.bus, boxes=[])]
    ids = [response.headers["x-request-id"] for response in responses]
    assert all(re.fullmatch(r"[0-9a-f]{16}", request_id) for request_id in ids), ids
    assert len(set(ids)) == len(ids)
    echoed = http.get("/healthz", headers={"X-Request-Id": "trace-42.a"})
    assert echoed.headers["x-request-id"] == "trace-42.a"  # the client's own, when tame
    replaced = http.get("/healthz", headers={"X-Request-Id": "not tame {}" + "x" * 80})
    assert re.fullmatch(r"[0-9a-f]{16}", replaced.headers["x-request-id"])


def test_unexpected_errors_answer_only_a_request_id(caplog, monkeypatch) -> None:
    """The exception's text (paths, internals) goes to the log under the request id; the client
    gets the id, in the message and in X-Request-Id."""
    engine = PoseEngine(ServiceSettings(device="cpu", detector="none", warmup=False),
                        ServiceMetrics())

    async def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret: /srv/weights/model.pt is corrupt")

    monkeypatch.setattr(Admitted, "estimate", explode)
    engine.state = "ready"  # admission (before the body is read) needs no model: estimate fails
    app = create_app(engine)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://omnipose") as client:
            return await client.post("/v1/pose", content=b"image bytes",
                                     headers={"content-type": "image/jpeg"})

    with caplog.at_level(logging.ERROR, logger="omnipose.service.rest"):
        response = asyncio.run(call())
    assert_error(response, 500, "internal error")
    request_id = response.headers["x-request-id"]
    assert response.json()["error"]["message"] == f"internal error (request id {request_id})"
    assert "secret" not in response.text
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and "secret" in str(logged[0].exc_info[1])


# --- batching, metrics -----------------------------------------------------------------------
def test_concurrent_requests_are_coalesced_into_batches(server: ServerProcess, images) -> None:
    """24 concurrent requests of 2 persons each: every crop goes through the model exactly once,
    in fewer forward passes than requests (read from the batch-size histogram)."""
    labels = {"model": "pose"}
    before = server.scrape()
    requests = 24

    def one(_: int) -> int:
        with httpx.Client(base_url=server.http_url, timeout=120) as client:
            response = pose(client, images.bus, boxes=images.bus_boxes)
            assert response.status_code == 200, response.text
            return len(response.json()["persons"])

    with ThreadPoolExecutor(requests) as pool:
        assert list(pool.map(one, range(requests))) == [2] * requests
    after = server.scrape()

    def delta(name: str, **extra: str) -> float:
        key = (name, frozenset({**labels, **extra}.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    passes = delta("omnipose_batch_size_count")
    assert delta("omnipose_batch_size_sum") == 2 * requests
    assert 0 < passes < requests  # mean batch > 2 crops: requests shared forward passes
    assert delta("omnipose_batch_size_bucket", le="2.0") < passes  # some batch had > 2 crops


def test_metrics_cover_requests_stages_batches_and_model(http: httpx.Client, server, images):
    pose(http, images.bus, boxes=images.bus_boxes, render="true")
    http.post("/v1/pose", content=images.bus, headers={"content-type": "image/jpeg"})
    pose(http, b"junk", boxes=images.bus_boxes)
    samples = server.scrape()

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    assert value("omnipose_requests_total", transport="http", endpoint="/v1/pose",
                 status="200") >= 2
    assert value("omnipose_requests_total", transport="http", endpoint="/v1/pose",
                 status="400") >= 1
    assert value("omnipose_request_duration_seconds_count", transport="http",
                 endpoint="/v1/pose") >= 3
    for stage in ("image_decode", "detection", "preprocess", "queue_wait", "pose_inference",
                  "decode", "render"):
        assert value("omnipose_stage_duration_seconds_count", stage=stage) >= 1, stage
    assert value("omnipose_batch_size_count", model="pose") >= 1
    assert value("omnipose_batch_size_count", model="detector") >= 1
    assert value("omnipose_persons_per_image_count") >= 2
    assert ("omnipose_queue_depth", frozenset({"queue": "pose"}.items())) in samples
    assert value("omnipose_inflight_requests") == 0
    info = [dict(labels) for (name, labels) in samples if name == "omnipose_model_info"]
    assert info and info[0]["config"] == "coco-w18-128x96" and info[0]["detector"] == "hog"


# --- backpressure, deadlines, disconnects (slow server: one request at a time) ---------------
def wait_for_inflight(server: ServerProcess, count: int, timeout: float = 10.0) -> None:
    wait_until(lambda: server.metric("omnipose_inflight_requests") == count, timeout,
               f"{count} requests in flight")  # fmt: skip


def test_full_queue_gives_429_with_retry_after_and_resource_exhausted(slow_server, images):
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=slow_server.http_url,
                                                     timeout=60) as client:
        first = pool.submit(pose, client, images.bus, boxes=images.bus_boxes)
        wait_for_inflight(slow_server, 1)
        rejected = pose(client, images.bus, boxes=images.bus_boxes)
        assert_error(rejected, 429, "capacity")
        assert int(rejected.headers["retry-after"]) >= 1
        with grpc.insecure_channel(slow_server.grpc_target) as channel:
            stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
            boxes = omnipose_pb2.BoxList(boxes=[omnipose_pb2.Box(x=20, y=110, width=110,
                                                                 height=330)])
            with pytest.raises(grpc.RpcError) as refused:
                stub.Estimate(omnipose_pb2.EstimateRequest(image=images.bus, boxes=boxes),
                              timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity" in refused.value.details()
        assert first.result().status_code == 200  # the admitted request is still answered


def test_deadline_gives_504_and_frees_the_queue(slow_server, images) -> None:
    with httpx.Client(base_url=slow_server.http_url, timeout=60) as client:
        started = time.monotonic()
        response = client.post("/v1/pose", files={"image": ("a.jpg", images.bus, "image/jpeg")},
                               params={"boxes": json.dumps(images.bus_boxes)},
                               headers={"X-Request-Timeout": "0.3"})
        assert_error(response, 504, "deadline")
        assert time.monotonic() - started < SLOW_QUEUE_DELAY_MS / 1000
        assert slow_server.metric("omnipose_inflight_requests") == 0
        assert slow_server.metric("omnipose_queue_depth", queue="pose") == 0


def test_client_disconnect_frees_its_queued_work(slow_server, images) -> None:
    before = slow_server.metric("omnipose_requests_total", transport="http", endpoint="/v1/pose",
                                status="499")
    started = time.monotonic()
    with httpx.Client(base_url=slow_server.http_url, timeout=0.5) as client, \
            pytest.raises(httpx.ReadTimeout):
        pose(client, images.bus, boxes=images.bus_boxes)
    wait_for_inflight(slow_server, 0, timeout=SLOW_QUEUE_DELAY_MS / 1000)
    assert time.monotonic() - started < SLOW_QUEUE_DELAY_MS / 1000  # freed, not completed
    assert slow_server.metric("omnipose_queue_depth", queue="pose") == 0
    after = slow_server.metric("omnipose_requests_total", transport="http", endpoint="/v1/pose",
                               status="499")
    assert after == before + 1


# --- graceful shutdown -----------------------------------------------------------------------
def test_sigterm_answers_every_inflight_request_then_exits_0(tmp_path, images) -> None:
    args = ["--detector", "none", "--max-batch-size", "16", "--max-queue-delay-ms", "4000",
            "--lone-request-waits-for-batch"]
    with running_server(tmp_path, "shutdown", args) as server:
        results: dict[str, object] = {}

        def rest(name: str) -> None:
            with httpx.Client(base_url=server.http_url, timeout=60) as client:
                results[name] = pose(client, images.bus, boxes=images.bus_boxes).status_code

        def rpc(name: str) -> None:
            with grpc.insecure_channel(server.grpc_target) as channel:
                stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
                boxes = omnipose_pb2.BoxList(boxes=[omnipose_pb2.Box(x=20, y=110, width=110,
                                                                     height=330)])
                reply = stub.Estimate(omnipose_pb2.EstimateRequest(image=images.bus, boxes=boxes),
                                      timeout=60)
                results[name] = len(reply.persons)

        threads = [threading.Thread(target=rest, args=(f"rest{i}",)) for i in range(4)]
        threads += [threading.Thread(target=rpc, args=(f"grpc{i}",)) for i in range(2)]
        for thread in threads:
            thread.start()
        wait_for_inflight(server, len(threads))
        exit_code = server.terminate()
        for thread in threads:
            thread.join(30)
    assert exit_code == 0, server.log()
    assert results == {**{f"rest{i}": 200 for i in range(4)}, **{f"grpc{i}": 1 for i in range(2)}}


def test_jpeg_decode_on_the_device_path_through_a_real_server(
    http: httpx.Client, tmp_path, images
) -> None:
    """``--jpeg-decode device`` on a CPU server: torchvision decodes and the crops are cut from
    its tensor (the GPU code path). The answers have the OpenCV-decoding server's shape and its
    errors; the keypoints themselves are compared in-process (tests/test_device_jpeg.py): the
    test config's network is untrained on photos, its near-zero heatmaps have no stable peak."""
    truncated = images.bus[: len(images.bus) // 3]
    expected = [pose(http, data, boxes=images.bus_boxes) for data in (images.bus, truncated)]
    args = ["--detector", "none", "--jpeg-decode", "device"]
    with running_server(tmp_path, "jpeg-device", args) as server:
        with httpx.Client(base_url=server.http_url, timeout=60) as client:
            got = [pose(client, data, boxes=images.bus_boxes) for data in (images.bus, truncated)]
        assert server.metric("omnipose_jpeg_device_decode_fallbacks_total") == 0
    assert got[0].status_code == expected[0].status_code == 200, got[0].text
    body, want = (PoseResponse.model_validate(r.json()) for r in (got[0], expected[0]))
    assert (body.image.width, body.image.height) == (want.image.width, want.image.height)
    assert [p.bbox for p in body.persons] == [p.bbox for p in want.persons]
    assert got[1].status_code == expected[1].status_code == 400, got[1].text
    messages = [ErrorResponse.model_validate(r.json()).error.message for r in (got[1], expected[1])]
    assert messages[0] == messages[1] and "truncated or corrupt" in messages[0]


def test_http_connections_have_nagle_off() -> None:
    """Connections accepted on the server's socket send small writes at once (TCP_NODELAY).

    With Nagle on, a response written in two pieces on a kept-alive connection waited for the
    client's delayed ACK: every request after a connection's first took 40 ms longer (measured:
    GET /v1/models 44 ms, 1 ms with Nagle off; the figure belongs to bench, the option here).
    """
    import socket

    from omnipose.service.server import _bind

    async def scenario() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=_bind("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        nodelay = await asyncio.wait_for(accepted, 10)
        writer.close()
        server.close()
        await server.wait_closed()
        return nodelay

    assert asyncio.run(scenario()) != 0
