"""Admission before bytes, against a real server on loopback: a full queue or a full budget of
request bytes is refused before a body or gRPC message is read, uploads are received without
holding an engine slot (slow ones cannot starve fast clients), bodies that stall or trickle get
408, and a body whose Content-Type disagrees with its bytes gets 415."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Iterator

import grpc
import httpx
import pytest

from omnipose.proto import omnipose_pb2 as pb
from omnipose.proto import omnipose_pb2_grpc
from tests.conftest import ServerProcess, running_server, wait_until
from tests.test_hardening import connect, json_error, read_until_closed
from tests.test_service_rest import pose, wait_for_inflight

pytestmark = pytest.mark.slow

ADMISSION_QUEUE = 2
BODY_BUDGET = 3_000_000
SMALL_IMAGE_LIMIT = 2_000_000
BODY_IDLE_S = 2.0  # above the 1 s request deadline of the slow-upload test, so 504 comes first


@pytest.fixture(scope="module")
def admission_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [
        "--detector", "none",
        "--max-queue-size", str(ADMISSION_QUEUE),
        "--max-inflight-body-bytes", str(BODY_BUDGET),
        "--max-image-bytes", str(SMALL_IMAGE_LIMIT),
        "--max-images-per-batch", "4",
        "--grpc-max-concurrent-rpcs", "2",
        "--http-header-timeout-s", "30",
        "--http-body-idle-timeout-s", str(BODY_IDLE_S),
        "--no-warmup",  # admission limits only: no model figures needed
    ]  # fmt: skip
    with running_server(tmp_path_factory.mktemp("admission"), "admission", args) as process:
        yield process


def body_bytes(server: ServerProcess) -> float:
    return server.metric("omnipose_inflight_body_bytes")


def start_upload(
    server: ServerProcess,
    length: int,
    sent: bytes = b"",
    path: str = "/v1/pose",
    content_type: str = "image/jpeg",
    extra_headers: str = "",
) -> socket.socket:
    """A request whose head declares ``length`` body bytes, of which only ``sent`` are sent."""
    sock = connect(server)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{extra_headers}"
        f"Content-Length: {length}\r\n\r\n".encode()
        + sent
    )
    return sock


def answer_without_body(sock: socket.socket) -> tuple[int, dict]:
    """The server's answer, received while the body is still unsent: it never read the body."""
    raw, _ = read_until_closed(sock, limit_s=15)
    return json_error(raw)


def answered(sock: socket.socket) -> bool:
    """Whether the server has sent anything on ``sock`` yet (without waiting)."""
    return bool(select.select([sock], [], [], 0)[0])


# --- the engine queue ------------------------------------------------------------------------
def test_full_queue_is_refused_before_the_body_is_read(slow_server, images) -> None:
    """slow_server admits one request and keeps it queued for seconds: the next upload is
    refused 429 while its body is still unsent."""
    with httpx.Client(base_url=slow_server.http_url, timeout=60) as client:
        holder = threading.Thread(target=pose, args=(client, images.bus),
                                  kwargs={"boxes": images.bus_boxes})
        holder.start()
        try:
            wait_for_inflight(slow_server, 1)
            with start_upload(slow_server, 1_500_000, sent=b"\xff\xd8" + b"\0" * 1000) as sock:
                status, error = answer_without_body(sock)
            assert status == 429 and "capacity" in error["message"]
        finally:
            holder.join()


class Trickle:
    """Uploads that send ``piece`` bytes every ``every_s`` (fast enough for the minimum rate,
    never idle): slow clients on a thin link, each holding a connection and body budget."""

    def __init__(self, server: ServerProcess, count: int, length: int = 100_000,
                 piece: int = 2048, every_s: float = 0.5) -> None:  # fmt: skip
        self.socks = [start_upload(server, length, sent=b"\xff\xd8\xff") for _ in range(count)]
        self.stop = threading.Event()
        self.piece, self.every_s = piece, every_s
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            for sock in self.socks:
                sock.send(b"\0" * self.piece)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for sock in self.socks:
            sock.close()


def test_trickling_uploads_do_not_starve_fast_clients(admission_server, images) -> None:
    """More slow uploads than the engine queue holds: they hold body budget, not engine slots,
    so a fast client is still served (it used to get 429 until they finished or timed out)."""
    trickle = Trickle(admission_server, ADMISSION_QUEUE + 2)
    try:
        wait_until(lambda: body_bytes(admission_server) == 100_000 * (ADMISSION_QUEUE + 2),
                   what="the trickling uploads' bodies reserved")  # fmt: skip
        with httpx.Client(base_url=admission_server.http_url, timeout=60) as client:
            for _ in range(2):
                response = pose(client, images.bus, boxes=images.bus_boxes)
                assert response.status_code == 200, response.text
        assert not any(answered(sock) for sock in trickle.socks)  # still uploading
        assert admission_server.metric("omnipose_inflight_requests") == 0  # no slot held
    finally:
        trickle.close()
    wait_until(lambda: body_bytes(admission_server) == 0, what="the budget given back")


@pytest.mark.parametrize(
    ("piece", "every_s", "said"),
    [(0, 0.0, "no byte of the request body arrived"), (1, 0.25, "under the minimum")],
    ids=["stalled", "trickling-under-the-minimum-rate"],
)
def test_a_stalled_or_too_slow_body_gets_408(admission_server, piece, every_s, said) -> None:
    if piece:
        trickle = Trickle(admission_server, 1, piece=piece, every_s=every_s)
        sock = trickle.socks[0]
    else:
        trickle, sock = None, start_upload(admission_server, 100_000, sent=b"\xff\xd8\xff")
    try:
        raw, _ = read_until_closed(sock, limit_s=BODY_IDLE_S * 4)
        status, error = json_error(raw)
        assert status == 408 and said in error["message"], error
    finally:
        if trickle:
            trickle.close()
        sock.close()
    wait_until(lambda: body_bytes(admission_server) == 0, what="the budget given back")


@pytest.mark.parametrize("multipart", [False, True], ids=["raw", "multipart"])
def test_a_slow_upload_is_answered_at_its_deadline(admission_server, multipart) -> None:
    """The deadline runs from the request's arrival, not from the end of the body: an upload
    still unsent at its deadline is answered 504 and its body bytes are released, while the
    client still holds the connection open. It never held an engine slot."""
    content_type = "multipart/form-data; boundary=b" if multipart else "image/jpeg"
    head = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n") if multipart else b""  # fmt: skip
    with start_upload(admission_server, 100_000, sent=head + b"\xff\xd8" + b"\0" * 1000,
                      content_type=content_type,
                      extra_headers="X-Request-Timeout: 1\r\n") as sock:  # fmt: skip
        wait_until(lambda: body_bytes(admission_server) == 100_000, what="body reserved")
        assert admission_server.metric("omnipose_inflight_requests") == 0
        status, error = answer_without_body(sock)
        assert status == 504 and "body was still being received" in error["message"], error
        wait_until(lambda: body_bytes(admission_server) == 0, what="the budget given back")


# --- the budget of request bytes (REST bodies and gRPC messages) ------------------------------
def test_body_byte_budget_refuses_before_reading(admission_server) -> None:
    with start_upload(admission_server, 1_900_000, sent=b"\0" * 1000) as holder:
        wait_until(lambda: body_bytes(admission_server) == 1_900_000, what="body reserved")
        with start_upload(admission_server, 1_900_000) as sock:
            status, error = answer_without_body(sock)
        assert status == 429 and "bytes of request bodies" in error["message"]
        holder.close()
    wait_until(lambda: body_bytes(admission_server) == 0, what="the budget given back")


def test_grpc_message_waits_for_room_in_the_shared_byte_budget(admission_server, images) -> None:
    """A gRPC Estimate reserves its largest possible message (max_image_bytes + 1 MiB) before
    grpcio reads it: while a REST upload holds most of the budget the call is not read (it
    runs out its deadline waiting), and once the upload ends the same call is served."""
    request = pb.EstimateRequest(image=images.bus, boxes=pb.BoxList(
        boxes=[pb.Box(x=x, y=y, width=w, height=h) for x, y, w, h in images.bus_boxes]))
    with grpc.insecure_channel(admission_server.grpc_target) as channel:
        stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
        with start_upload(admission_server, 1_900_000, sent=b"\0" * 1000):
            wait_until(lambda: body_bytes(admission_server) == 1_900_000, what="body reserved")
            with pytest.raises(grpc.RpcError) as refused:
                stub.Estimate(request, timeout=1.5)
            assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: body_bytes(admission_server) == 0, what="the budget given back")
        assert stub.Estimate(request, timeout=60).width > 0


def test_oversized_batch_part_is_cut_off_while_it_is_read(admission_server) -> None:
    """The whole body is within the batch limit; its first image part is not: 413 as soon as
    that part passes max_image_bytes, before the rest of the body is sent."""
    boundary = "cut-off-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="images";'
        f' filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    ).encode()
    part = head + b"\0" * (SMALL_IMAGE_LIMIT + 100_000)
    declared = 3 * SMALL_IMAGE_LIMIT  # under the batch body limit (4 images)
    with start_upload(
        admission_server,
        declared,
        sent=part,
        path="/v1/pose/batch",
        content_type=f"multipart/form-data; boundary={boundary}",
    ) as sock:
        status, error = answer_without_body(sock)
    assert status == 413 and "'images[0]'" in error["message"], error


def test_grpc_calls_beyond_the_limit_are_refused(admission_server, images) -> None:
    with grpc.insecure_channel(admission_server.grpc_target) as channel:
        stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
        closed = threading.Event()
        def open_stream() -> grpc.Future:  # a stream that sends nothing until the test ends
            return stub.StreamEstimate(iter(closed.wait, True), timeout=60)

        idle = [open_stream() for _ in range(2)]
        try:
            def refused() -> bool:
                # A probe that reached the server before a stream took that stream's place (the
                # stream was refused): open it again, so both limits' slots end up held by streams.
                for i, call in enumerate(idle):
                    if call.done():
                        idle[i] = open_stream()
                try:
                    stub.GetModel(pb.GetModelRequest(), timeout=10)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                    return True
                return False  # the streams are not both open yet

            wait_until(refused, timeout=30, what="a third call refused")
        finally:
            closed.set()
            for call in idle:
                call.cancel()


# --- content type against the bytes ----------------------------------------------------------
def test_jpeg_bytes_labelled_png_get_415_naming_both(http, images) -> None:
    response = http.post("/v1/pose", content=images.bus, headers={"content-type": "image/png"},
                         params={"boxes": json.dumps(images.bus_boxes)})
    assert response.status_code == 415, response.text
    message = response.json()["error"]["message"]
    assert "'image/png'" in message and "JPEG" in message and "'image/jpeg'" in message


def test_a_generic_image_type_is_sniffed_not_refused(http, images) -> None:
    response = http.post("/v1/pose", content=images.bus, headers={"content-type": "image/*"},
                         params={"boxes": json.dumps(images.bus_boxes)})
    assert response.status_code == 200, response.text
