"""Hostile-but-honest clients against a real server on loopback: portrait phone photos (EXIF
orientation), hostile JSON, absurd boxes, unknown parameters, malformed HTTP, slow and idle
connections, shutdown past the grace period, and admission before the body is read."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import cv2
import grpc
import httpx
import numpy as np
import pytest

from bench.local_server import running
from bench.samples import BUS_JPG, jpeg_with_orientation
from omnipose.cli.main import main as cli_main
from omnipose.proto import omnipose_pb2 as pb
from omnipose.proto import omnipose_pb2_grpc
from tests.conftest import (
    REPO_ROOT,
    STARTUP_TIMEOUT_S,
    STOP_TIMEOUT_S,
    ServerProcess,
    running_server,
    server_process,
    wait_until,
)
from tests.test_service_rest import assert_error, assert_still_serving, pose, wait_for_inflight

pytestmark = pytest.mark.slow


def portrait_photo(images, orientation: int) -> tuple[bytes, tuple[int, int]]:
    """The bus photo stored sideways, as a phone stores a portrait shot, with the EXIF tag that
    turns it upright; and the upright size (width, height)."""
    upright = cv2.imdecode(np.frombuffer(images.bus, np.uint8), cv2.IMREAD_COLOR)
    stored = {
        6: cv2.rotate(upright, cv2.ROTATE_90_COUNTERCLOCKWISE),
        8: cv2.rotate(upright, cv2.ROTATE_90_CLOCKWISE),
        3: cv2.rotate(upright, cv2.ROTATE_180),
    }[orientation]
    return jpeg_with_orientation(stored, orientation), (upright.shape[1], upright.shape[0])


# --- EXIF orientation -------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_portrait_photos_are_served_upright_over_rest(
    http: httpx.Client, images, orientation: int
) -> None:
    data, (width, height) = portrait_photo(images, orientation)
    response = pose(http, data, boxes=images.bus_boxes)
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": width, "height": height}
    # Keypoints are in the upright image: the same people as the upright photo gives.
    plain = pose(http, images.bus, boxes=images.bus_boxes).json()["persons"]
    rotated = response.json()["persons"]
    assert len(rotated) == len(plain) == 2
    for a, b in zip(plain, rotated, strict=True):
        ka, kb = np.reshape(a["keypoints"], (-1, 3)), np.reshape(b["keypoints"], (-1, 3))
        assert np.median(np.abs(ka[:, :2] - kb[:, :2])) < 8.0  # JPEG re-encoding noise only


def test_portrait_photo_is_served_upright_over_grpc(server: ServerProcess, images) -> None:
    data, (width, height) = portrait_photo(images, 6)
    with grpc.insecure_channel(server.grpc_target) as channel:
        reply = omnipose_pb2_grpc.PoseEstimationStub(channel).Estimate(
            pb.EstimateRequest(image=data), timeout=60
        )
    assert (reply.width, reply.height) == (width, height)


def test_predict_turns_portrait_photos_upright(tmp_path, capsys) -> None:
    upright = cv2.imread(str(BUS_JPG))
    photo = tmp_path / "portrait.jpg"
    photo.write_bytes(jpeg_with_orientation(cv2.rotate(upright, cv2.ROTATE_90_CLOCKWISE), 8))
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([[40, 220, 220, 660]]))
    common = [
        "predict",
        str(photo),
        "--config",
        "coco-w18-128x96",
        "--device",
        "cpu",
        "--boxes",
        str(boxes),
    ]
    out = tmp_path / "upright.json"
    assert cli_main([*common, "--out", str(out)]) == 0, capsys.readouterr().err
    assert len(json.loads(out.read_text())) == 1
    # Switched off, the stored (sideways, 1080 wide) pixels are used and the box still fits.
    assert cli_main([*common, "--no-exif-orientation", "--out", str(out)]) == 0


# --- hostile JSON, absurd boxes ---------------------------------------------------------------
@pytest.mark.parametrize("depth", [5, 1000, 100_000])
def test_deeply_nested_boxes_get_422(http: httpx.Client, images, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    files = {"image": ("bus.jpg", images.bus, "image/jpeg")}
    # Deep enough, the form field's size limit answers first: 422 about the boxes either way.
    word = "nested" if depth < 10_000 else "boxes"
    assert_error(http.post("/v1/pose", files=files, data={"boxes": nested}), 422, word)
    batch = {"images": ("bus.jpg", images.bus, "image/jpeg")}
    assert_error(http.post("/v1/pose/batch", files=batch, data={"boxes": nested}), 422, word)
    if depth <= 1000:  # also as a query parameter (a URL of this length is allowed)
        assert_error(http.post("/v1/pose", files=files, params={"boxes": nested}), 422, "nested")
    assert_still_serving(http, images)


@pytest.mark.parametrize(
    "box",
    [
        [-1e300, -1e300, 2e300, 2e300],
        [0, 0, 1e7, 1e7],
        [10, 10, 10**400, 50],
        [0, 0, 100_000, 100_000],  # overlaps the image but is hundreds of times its size
    ],
)
def test_absurd_boxes_get_422(http: httpx.Client, images, box: list) -> None:
    files = {"image": ("bus.jpg", images.bus, "image/jpeg")}
    response = http.post("/v1/pose", files=files, data={"boxes": json.dumps([box])})
    assert_error(response, 422, "box 0")


def test_absurd_boxes_get_invalid_argument_over_grpc(server: ServerProcess, images) -> None:
    request = pb.EstimateRequest(image=images.bus)
    request.boxes.boxes.append(pb.Box(x=-1e300, y=-1e300, width=2e300, height=2e300))
    with (
        grpc.insecure_channel(server.grpc_target) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        omnipose_pb2_grpc.PoseEstimationStub(channel).Estimate(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "box 0" in info.value.details()


# --- connection limits, timeouts, malformed HTTP ----------------------------------------------
HEADER_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 4
MAX_HEADER_BYTES = 4096


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [
        "--detector",
        "none",
        "--http-header-timeout-s",
        str(HEADER_TIMEOUT_S),
        "--http-keepalive-timeout-s",
        "1",
        "--http-max-connections",
        str(MAX_CONNECTIONS),
        "--http-max-header-bytes",
        str(MAX_HEADER_BYTES),
    ]
    args.append("--no-warmup")  # transport limits only: no model figures needed
    with running_server(tmp_path_factory.mktemp("guarded"), "guarded", args) as process:
        yield process


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.http_port), timeout=10)


def read_until_closed(sock: socket.socket, limit_s: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, chunks = time.monotonic(), []
    sock.settimeout(limit_s)
    with contextlib.suppress(ConnectionResetError):  # closed with our unsent body pending
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - started


def json_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head.lower(), head
    return status, json.loads(body)["error"]


def test_silent_connection_gets_408_and_is_closed(guarded_server: ServerProcess) -> None:
    with connect(guarded_server) as sock:
        raw, waited = read_until_closed(sock)
    status, error = json_error(raw)
    assert status == 408 and "did not arrive" in error["message"]
    assert waited < HEADER_TIMEOUT_S + 3


def test_slowloris_request_head_is_cut_off(guarded_server: ServerProcess) -> None:
    """Bytes that keep trickling do not extend the time allowed for the request head."""
    with connect(guarded_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for i in range(40):
                time.sleep(0.1)
                sock.sendall(f"X-Slow-{i}: y\r\n".encode())
        raw, _ = read_until_closed(sock)
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 3
    assert json_error(raw)[0] == 408


def test_idle_keepalive_connection_is_closed(guarded_server: ServerProcess) -> None:
    with connect(guarded_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        raw, waited = read_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 200") and b'"ok"' in raw
    assert waited < 5  # the keep-alive timeout (1 s) closed it, not the client


def models_status(server: ServerProcess) -> int:
    """The status of ``GET /v1/models`` on a new connection (probes are answered even over the
    connection limit, so they cannot show it)."""
    return httpx.get(f"{server.http_url}/v1/models", timeout=10).status_code


def test_connections_over_the_limit_get_503_before_their_body_is_read(
    guarded_server: ServerProcess, images
) -> None:
    holders = []
    try:
        for _ in range(MAX_CONNECTIONS):  # complete heads, bodies never sent: connections held
            sock = connect(guarded_server)
            sock.sendall(
                b"POST /v1/pose HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: 1000000\r\n\r\n"
            )
            holders.append(sock)
        # every holder is counted once a new connection's request is refused
        wait_until(lambda: models_status(guarded_server) == 503, what="connections counted")
        with connect(guarded_server) as sock:
            sock.sendall(
                b"POST /v1/pose HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: 50000000\r\n\r\n" + b"\0" * 1000
            )
            raw, _ = read_until_closed(sock)
        status, error = json_error(raw)
        assert status == 503 and "too many open connections" in error["message"]
        # Probes are answered over the limit: a connection flood must not fail liveness.
        for probe in ("/healthz", "/readyz"):
            with connect(guarded_server) as sock:
                sock.sendall(f"GET {probe} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                raw, _ = read_until_closed(sock)
            assert raw.startswith(b"HTTP/1.1 200"), (probe, raw[:200])
            assert b"connection: close" in raw.lower()
    finally:
        for sock in holders:
            sock.close()
    wait_until(lambda: models_status(guarded_server) == 200, what="served again")


def test_over_long_url_gets_431_in_the_json_shape(guarded_server: ServerProcess) -> None:
    response = httpx.get(
        f"{guarded_server.http_url}/healthz", params={"x": "a" * 10_000}, timeout=10
    )
    assert response.status_code == 431
    assert "over 4096 bytes" in response.json()["error"]["message"]


def test_malformed_request_line_gets_400_in_the_json_shape(guarded_server) -> None:
    with connect(guarded_server) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        raw, _ = read_until_closed(sock)
    status, error = json_error(raw)
    assert status == 400 and "not valid HTTP" in error["message"]


# --- shutdown past the grace period -------------------------------------------------------------
def test_requests_past_the_shutdown_grace_get_json_503_and_new_ones_are_answered(
    tmp_path, images
) -> None:
    """A batcher that waits 60 s for a full batch keeps requests in flight past a 2 s grace."""
    args = [
        "--detector",
        "none",
        "--max-batch-size",
        "16",
        "--max-queue-delay-ms",
        "60000",
        "--lone-request-waits-for-batch",
        "--shutdown-grace-s",
        "2",
    ]
    with running_server(tmp_path, "grace", args) as server:
        with ThreadPoolExecutor(3) as pool:
            clients = [httpx.Client(base_url=server.http_url, timeout=60) for _ in range(2)]
            inflight = [pool.submit(pose, c, images.bus, boxes=images.bus_boxes) for c in clients]
            wait_for_inflight(server, 2)
            server.process.send_signal(signal.SIGTERM)
            # During the grace the port still answers, with the common error shape.
            wait_until(lambda: httpx.get(f"{server.http_url}/readyz", timeout=10).status_code
                       == 503, what="readiness off after SIGTERM")  # fmt: skip
            refused = pose(
                httpx.Client(base_url=server.http_url, timeout=10),
                images.bus,
                boxes=images.bus_boxes,
            )
            assert_error(refused, 503)
            for future in inflight:
                assert_error(future.result(timeout=30), 503, "grace period")
        assert server.process.wait(30) == 0
    log = server.log()
    assert "Exception in ASGI application" not in log and "Traceback" not in log, log


def test_a_server_whose_port_was_taken_is_started_again_on_new_ports(tmp_path) -> None:
    """A free port may be taken before the server binds it (a parallel test worker, another job):
    the server exits saying it cannot listen, and the launcher starts it on new ports."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = server_process(tmp_path, "taken-port", ["--detector", "none"])
        process.http_port = port
        with running(process, STARTUP_TIMEOUT_S, STOP_TIMEOUT_S) as server:
            assert server.http_port != port
            assert httpx.get(f"{server.http_url}/readyz", timeout=10).status_code == 200


# --- no leaks, the right codes ----------------------------------------------------------------
def test_model_description_leaks_no_server_path_or_training_recipe(http: httpx.Client) -> None:
    response = http.get("/v1/models")
    assert response.status_code == 200
    text = response.text
    assert "weights_path" not in response.json()
    assert str(REPO_ROOT) not in text and "/model/weights/" not in text
    assert "training" not in response.json()["metadata"] and "recipe" not in text
    assert response.json()["version"]  # the identity of the weights is still given


@pytest.mark.parametrize("method", ["Estimate", "EstimateBatch", "GetModel"])
def test_malformed_protobuf_gets_invalid_argument(server: ServerProcess, method: str) -> None:
    before = server.metric(
        "omnipose_requests_total", transport="grpc", endpoint=method, status="INVALID_ARGUMENT"
    )
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = channel.unary_unary(f"/omnipose.v1.PoseEstimation/{method}")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\x0a\xff\xff\xff\xff\xff", timeout=10)  # a length prefix past the end
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed protobuf" in info.value.details()
    assert "Traceback" not in info.value.details() and "Error" not in info.value.details()
    after = server.metric(
        "omnipose_requests_total", transport="grpc", endpoint=method, status="INVALID_ARGUMENT"
    )
    assert after == before + 1


def test_malformed_stream_frame_gets_invalid_argument(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = channel.stream_stream("/omnipose.v1.PoseEstimation/StreamEstimate")
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([b"\x12\xff\xff\xff\xff\xff"]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "StreamFrame" in info.value.details()


def test_grpc_deadline_expiries_are_counted_as_deadline_exceeded(slow_server, images) -> None:
    def count(status: str) -> float:
        return slow_server.metric(
            "omnipose_requests_total", transport="grpc", endpoint="Estimate", status=status
        )

    before = count("DEADLINE_EXCEEDED"), count("CANCELLED")
    request = pb.EstimateRequest(image=images.bus)
    request.boxes.boxes.append(pb.Box(x=20, y=110, width=110, height=330))
    with grpc.insecure_channel(slow_server.grpc_target) as channel:
        stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
        for _ in range(4):
            with pytest.raises(grpc.RpcError) as info:
                stub.Estimate(request, timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for_inflight(slow_server, 0)
    wait_until(lambda: count("DEADLINE_EXCEEDED") >= before[0] + 4, what="4 expiries counted")
    assert (count("DEADLINE_EXCEEDED"), count("CANCELLED")) == (before[0] + 4, before[1])


@pytest.mark.parametrize("endpoint", ["/v1/pose", "/v1/pose/batch"])
def test_unknown_query_parameters_get_422(http: httpx.Client, images, endpoint: str) -> None:
    field = "image" if endpoint == "/v1/pose" else "images"
    files = {field: ("bus.jpg", images.bus, "image/jpeg")}
    response = http.post(endpoint, files=files, params={"min_keypoint_scor": "0.5"})
    assert_error(response, 422, "min_keypoint_scor", "unknown")


def test_early_answer_drains_a_small_body_and_keeps_the_connection(guarded_server) -> None:
    """An error answered before the body is read (here an unknown query parameter) reads and
    drops a small body, so the answer is not lost to a reset and the connection is reusable."""
    body = b"\xff\xd8" + b"\0" * 200_000
    head = (
        "POST /v1/pose?nope=1 HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with connect(guarded_server) as sock:
        sock.sendall(head + body + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw, _ = read_until_closed(sock)
    first, _, second = raw.partition(b"HTTP/1.1 200")
    assert first.startswith(b"HTTP/1.1 422") and b"nope" in first
    assert b'"ok"' in second
