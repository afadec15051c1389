"""The gRPC API of a real server process with the generated stubs: every RPC, stream ordering
and flow control, health and reflection, status codes for bad input and size limits, deadlines,
request ids. Also checks that the checked-in modules of ``omnipose.proto`` match
``proto/omnipose.proto``."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from omnipose.proto import omnipose_pb2 as pb
from omnipose.proto import omnipose_pb2_grpc
from omnipose.proto.generate import GENERATED, REPO_ROOT, generate
from omnipose.service.grpc_server import PoseEstimationService
from omnipose.service.metrics import ServiceMetrics
from tests.conftest import (
    GRPC_MAX_MESSAGE_BYTES,
    MAX_IMAGE_BYTES,
    SLOW_QUEUE_DELAY_MS,
    STREAM_MAX_INFLIGHT,
    ServerProcess,
    wait_until,
)
from tests.test_service_rest import BAD_IMAGES, png_header_claiming, wait_for_inflight

pytestmark = pytest.mark.slow

SERVICE = "omnipose.v1.PoseEstimation"


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.Channel) -> omnipose_pb2_grpc.PoseEstimationStub:
    return omnipose_pb2_grpc.PoseEstimationStub(channel)


def box_list(boxes: list[list[float]]) -> pb.BoxList:
    return pb.BoxList(boxes=[pb.Box(x=x, y=y, width=w, height=h) for x, y, w, h in boxes])


def estimate_request(image: bytes, boxes: list[list[float]] | None = None,
                     **options: object) -> pb.EstimateRequest:
    request = pb.EstimateRequest(image=image, **options)
    if boxes is not None:
        request.boxes.CopyFrom(box_list(boxes))
    return request


def assert_still_serving(stub, images) -> None:
    reply = stub.Estimate(estimate_request(images.bus, images.bus_boxes), timeout=30)
    assert len(reply.persons) == 2


def test_generated_modules_match_the_proto(tmp_path) -> None:
    for path in generate(tmp_path):
        checked_in = REPO_ROOT / "proto" / path.name
        assert path.name in GENERATED
        assert checked_in.read_bytes() == path.read_bytes(), (
            f"proto/{path.name} is stale: run `python -m omnipose.proto.generate`")


def test_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {service.name for service in reply.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


def test_get_model(stub) -> None:
    model = stub.GetModel(pb.GetModelRequest(), timeout=10)
    assert model.config == "coco-w18-128x96" and model.dataset == "coco"
    assert (model.input_height, model.input_width) == (128, 96)
    assert (model.heatmap_height, model.heatmap_width) == (32, 24)
    assert len(model.joint_names) == 17 == len(model.sigmas)
    assert model.joint_names[0] == "nose"
    assert all(p.first < 17 and p.second < 17 for p in model.limbs) and len(model.limbs) > 10
    assert model.detector == "hog" and not model.trained


def test_estimate_with_boxes_and_with_detection(stub, images) -> None:
    joint_names = list(stub.GetModel(pb.GetModelRequest(), timeout=10).joint_names)
    reply = stub.Estimate(estimate_request(images.bus, images.bus_boxes), timeout=30)
    assert (reply.width, reply.height) == images.bus_size
    assert reply.model.name == "omnipose-coco-w18-128x96"
    assert len(reply.persons) == 2
    got_boxes = sorted([p.bbox.x, p.bbox.y, p.bbox.width, p.bbox.height] for p in reply.persons)
    assert got_boxes == sorted(images.bus_boxes)
    for person in reply.persons:
        assert [k.name for k in person.keypoints] == joint_names
        assert person.bbox.score == pytest.approx(1.0)
    assert "pose_inference" in reply.timings_ms and "detection" not in reply.timings_ms

    detected = stub.Estimate(estimate_request(images.bus), timeout=30)
    assert detected.timings_ms["detection"] > 0
    assert len(detected.persons) >= 1
    none = stub.Estimate(estimate_request(images.bus, []), timeout=30)
    assert len(none.persons) == 0 and "detection" not in none.timings_ms


def test_estimate_options_and_render(stub, images) -> None:
    boxes = [*images.bus_boxes, [150.0, 300.0, 80.0, 200.0]]
    assert len(stub.Estimate(estimate_request(images.bus, boxes, max_persons=1),
                             timeout=30).persons) == 1
    rendered = stub.Estimate(estimate_request(images.bus, boxes, render=True), timeout=30)
    assert rendered.rendered_jpeg[:2] == b"\xff\xd8" and "render" in rendered.timings_ms
    scored = estimate_request(images.bus, images.bus_boxes)
    scored.boxes.boxes[0].score = 0.5
    reply = stub.Estimate(scored, timeout=30)
    assert sorted(round(p.bbox.score, 3) for p in reply.persons) == [0.5, 1.0]


def test_estimate_batch_in_order(stub, images) -> None:
    request = pb.EstimateBatchRequest(images=[
        estimate_request(images.zidane, [[10, 10, 60, 120]]),
        estimate_request(images.bus, images.bus_boxes),
        estimate_request(images.zidane, []),
    ])
    reply = stub.EstimateBatch(request, timeout=30)
    assert [(r.width, r.height) for r in reply.results] == [
        images.zidane_size, images.bus_size, images.zidane_size]
    assert [len(r.persons) for r in reply.results] == [1, 2, 0]


def test_stream_results_come_back_in_frame_order(stub, images) -> None:
    """Frames with unordered ids, different images and one bad frame: results follow the order
    the frames were sent, the bad frame gets an error, and the stream goes on."""
    frame_ids = [907, 3, 55, 1, 800, 12, 13, 2, 64, 5, 77, 31]
    bad = {55}

    def frames() -> Iterator[pb.StreamFrame]:
        for index, frame_id in enumerate(frame_ids):
            image = b"not an image" if frame_id in bad else (
                images.bus if index % 2 else images.zidane)
            boxes = images.bus_boxes if index % 2 else [[10, 10, 60, 120]]
            yield pb.StreamFrame(frame_id=frame_id, request=estimate_request(image, boxes))

    results = list(stub.StreamEstimate(frames(), timeout=60))
    assert [r.frame_id for r in results] == frame_ids
    for index, result in enumerate(results):
        if result.frame_id in bad:
            assert result.WhichOneof("outcome") == "error"
            assert result.error.code == "INVALID_ARGUMENT" and "image" in result.error.message
        else:
            assert result.WhichOneof("outcome") == "response"
            expected = images.bus_size if index % 2 else images.zidane_size
            assert (result.response.width, result.response.height) == expected
            assert len(result.response.persons) == (2 if index % 2 else 1)


def test_stream_keeps_a_bounded_number_of_frames_in_flight(server: ServerProcess, stub,
                                                           images) -> None:
    """A client that sends 16 frames at once never has more than stream_max_inflight of them
    inside the server (sampled from the in-flight gauge while the stream runs)."""
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, int(server.metric("omnipose_inflight_requests")))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        frames = (pb.StreamFrame(frame_id=i, request=estimate_request(images.bus,
                                                                       images.bus_boxes))
                  for i in range(16))
        results = list(stub.StreamEstimate(frames, timeout=60))
    finally:
        done.set()
        sampler.join()
    assert [r.frame_id for r in results] == list(range(16))
    assert 1 <= peak <= STREAM_MAX_INFLIGHT


CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 413: grpc.StatusCode.INVALID_ARGUMENT,
         415: grpc.StatusCode.INVALID_ARGUMENT}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_get_the_matching_status(stub, images, case: str) -> None:
    make, http_status, words = BAD_IMAGES[case]
    with pytest.raises(grpc.RpcError) as error:
        stub.Estimate(estimate_request(make(images), images.bus_boxes), timeout=30)
    assert error.value.code() == CODES[http_status]
    for word in words:
        assert word.lower() in error.value.details().lower()
    assert_still_serving(stub, images)


@pytest.mark.parametrize(("boxes", "words"), [
    ([[10, 10, -5, 20]], ["box 0", "positive"]),
    ([[10, 10, 50, 50], [5000, 10, 50, 50]], ["box 1", "outside"]),
    ([[float("nan"), 10, 50, 50]], ["box 0", "nan"]),
])
def test_malformed_boxes_are_invalid_argument(stub, images, boxes, words) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Estimate(estimate_request(images.bus, boxes), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in error.value.details().lower()
    assert_still_serving(stub, images)


def test_min_box_score_drops_persons_whose_box_scored_lower(stub, images) -> None:
    request = estimate_request(images.bus, images.bus_boxes)
    request.boxes.boxes[0].score, request.boxes.boxes[1].score = 0.3, 0.9
    assert len(stub.Estimate(request, timeout=30).persons) == 2
    request.min_box_score = 0.5
    kept = stub.Estimate(request, timeout=30).persons
    assert len(kept) == 1
    assert kept[0].bbox.x == pytest.approx(images.bus_boxes[1][0], abs=1)


def test_invalid_options_and_batch_errors(stub, images) -> None:
    invalid = [
        estimate_request(images.bus, images.bus_boxes, min_keypoint_score=1.5),
        estimate_request(images.bus, images.bus_boxes, min_instance_score=-0.1),
        estimate_request(images.bus, images.bus_boxes, min_box_score=1.5),
    ]
    scored = estimate_request(images.bus, images.bus_boxes)
    scored.boxes.boxes[0].score = 2.0
    invalid.append(scored)
    for request in invalid:
        with pytest.raises(grpc.RpcError) as error:
            stub.Estimate(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    batch = pb.EstimateBatchRequest(images=[estimate_request(images.bus, images.bus_boxes),
                                            estimate_request(b"junk", images.bus_boxes)])
    with pytest.raises(grpc.RpcError) as error:
        stub.EstimateBatch(batch, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[1]" in error.value.details()
    assert_still_serving(stub, images)


def test_oversized_messages_and_images_are_refused(stub, images) -> None:
    """gRPC's own message limit answers RESOURCE_EXHAUSTED (it cannot be changed); the service's
    image limits answer INVALID_ARGUMENT, so clients never retry a request that cannot pass."""
    oversized = images.bus + b"\0" * GRPC_MAX_MESSAGE_BYTES
    with pytest.raises(grpc.RpcError) as error:
        stub.Estimate(estimate_request(oversized, images.bus_boxes), timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.value.details().lower()
    # under the message limit but over the image limit: the service's own check
    big_image = images.bus + b"\0" * MAX_IMAGE_BYTES
    assert len(big_image) < GRPC_MAX_MESSAGE_BYTES
    with pytest.raises(grpc.RpcError) as error:
        stub.Estimate(estimate_request(big_image, images.bus_boxes), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        stub.Estimate(estimate_request(png_header_claiming(50_000, 50_000)), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_still_serving(stub, images)


def test_errors_carry_the_request_id_in_trailing_metadata(stub, images) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Estimate(estimate_request(b"junk", []), timeout=30)
    assert re.fullmatch(r"[0-9a-f]{16}", dict(error.value.trailing_metadata())["x-request-id"])
    with pytest.raises(grpc.RpcError) as error:
        stub.Estimate(estimate_request(b"junk", []), timeout=30,
                      metadata=(("x-request-id", "trace-7"),))
    assert dict(error.value.trailing_metadata())["x-request-id"] == "trace-7"


class AbortedCall(Exception):
    """What grpc.aio's context.abort raises, for the fake context below."""


class RecordingContext:
    """The few ServicerContext methods the service calls, recording what it answers."""

    def __init__(self) -> None:
        self.trailing_metadata: tuple = ()

    def invocation_metadata(self) -> tuple:
        return ()

    def time_remaining(self) -> float:
        return 10.0

    def set_trailing_metadata(self, metadata: tuple) -> None:
        self.trailing_metadata = metadata

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple = ()):
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata
        raise AbortedCall


def test_unexpected_errors_answer_only_a_request_id(caplog) -> None:
    class ExplodingEngine:
        async def estimate(self, *args: object) -> None:
            raise RuntimeError("secret: /srv/weights/model.pt is corrupt")

    service = PoseEstimationService(ExplodingEngine(), ServiceMetrics(), 1)
    context = RecordingContext()
    with caplog.at_level(logging.ERROR, logger="omnipose.service.errors"), \
            pytest.raises(AbortedCall):
        asyncio.run(service.Estimate(estimate_request(b"image", []), context))
    request_id = dict(context.trailing_metadata)["x-request-id"]
    assert context.code == grpc.StatusCode.INTERNAL
    assert context.details == f"internal error (request id {request_id})"
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and "secret" in str(logged[0].exc_info[1])


def test_metrics_count_grpc_calls_by_status(server: ServerProcess, stub, images) -> None:
    def count(status: str) -> float:
        return server.metric("omnipose_requests_total", transport="grpc", endpoint="Estimate",
                             status=status)

    ok, invalid = count("OK"), count("INVALID_ARGUMENT")
    stub.Estimate(estimate_request(images.bus, images.bus_boxes), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Estimate(estimate_request(b"", images.bus_boxes), timeout=30)
    assert (count("OK"), count("INVALID_ARGUMENT")) == (ok + 1, invalid + 1)


# --- deadlines and overload (slow server: one request at a time, slow batches) ---------------
def test_deadline_exceeded_and_the_slot_is_freed(slow_server: ServerProcess, images) -> None:
    with grpc.insecure_channel(slow_server.grpc_target) as channel:
        stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            stub.Estimate(estimate_request(images.bus, images.bus_boxes), timeout=0.4)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for_inflight(slow_server, 0, timeout=SLOW_QUEUE_DELAY_MS / 1000)
        assert time.monotonic() - started < SLOW_QUEUE_DELAY_MS / 1000
        assert slow_server.metric("omnipose_queue_depth", queue="pose") == 0


def test_overload_is_resource_exhausted_with_retry_after(slow_server: ServerProcess,
                                                         images) -> None:
    with grpc.insecure_channel(slow_server.grpc_target) as channel:
        stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
        first = stub.Estimate.future(estimate_request(images.bus, images.bus_boxes), timeout=30)
        wait_for_inflight(slow_server, 1)
        with pytest.raises(grpc.RpcError) as error:
            stub.Estimate(estimate_request(images.bus, images.bus_boxes), timeout=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry_after = dict(error.value.trailing_metadata())["retry-after"]
        assert int(retry_after) >= 1
        assert len(first.result().persons) == 2


def test_cancelled_call_frees_its_queued_work(slow_server: ServerProcess, images) -> None:
    def cancelled() -> float:
        return slow_server.metric("omnipose_requests_total", transport="grpc",
                                  endpoint="Estimate", status="CANCELLED")

    before = cancelled()
    with grpc.insecure_channel(slow_server.grpc_target) as channel:
        stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
        started = time.monotonic()
        call = stub.Estimate.future(estimate_request(images.bus, images.bus_boxes), timeout=30)
        wait_until(lambda: slow_server.metric("omnipose_queue_depth", queue="pose") == 2,
                   SLOW_QUEUE_DELAY_MS / 2000, "two crops queued")  # fmt: skip
        call.cancel()
        wait_for_inflight(slow_server, 0, timeout=SLOW_QUEUE_DELAY_MS / 1000)
        assert time.monotonic() - started < SLOW_QUEUE_DELAY_MS / 1000  # freed, not completed
    assert slow_server.metric("omnipose_queue_depth", queue="pose") == 0
    wait_until(lambda: cancelled() == before + 1, 5, "the cancelled call recorded")
