"""Video streams through the real server: track ids, pose-guided boxes and per-stream state on
the bidirectional gRPC stream and under client stream_ids (REST, unary gRPC)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

from omnipose.proto import omnipose_pb2, omnipose_pb2_grpc
from omnipose.training import synth
from tests.conftest import ServerProcess, running_server, wait_until

FRAMES = 8
DETECT_EVERY = 4


@pytest.fixture(scope="module")
def video_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The embedded default model (it knows the synthetic people), HOG, two client streams."""
    args = [
        "--config",
        "coco-w8-96x64",
        "--detector",
        "hog",
        "--max-streams",
        "2",
        "--track-detect-every",
        str(DETECT_EVERY),
        "--stream-max-inflight",
        "4",
    ]
    with running_server(tmp_path_factory.mktemp("video"), "video", args) as process:
        yield process


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[bytes], dict]:
    """A rendered walk sequence: two people in separate lanes, JPEG frames and ground truth."""
    out = tmp_path_factory.mktemp("walk")
    path = synth.generate_sequence(out, "walk", "walk", FRAMES, seed=3)
    annotation = json.loads(path.read_text())
    frames = [
        (path.parent / image["file_name"]).read_bytes()
        for image in sorted(annotation["images"], key=lambda i: i["frame_id"])
    ]
    return frames, annotation


def _first_boxes(annotation: dict) -> list[list[float]]:
    return [a["bbox"] for a in annotation["annotations"] if a["image_id"] == 1]


def _same_identities(tracks_per_frame: list[dict[int, float]]) -> None:
    """Each frame's persons, keyed by track id, keep the left/right order of the first frame:
    the two walkers never swap ids and no id appears for a third person."""
    first = tracks_per_frame[0]
    assert len(first) == 2, tracks_per_frame
    order = sorted(first, key=first.get)
    for frame in tracks_per_frame[1:]:
        assert set(frame) <= set(order), tracks_per_frame
        if len(frame) == 2:
            assert sorted(frame, key=frame.get) == order, tracks_per_frame


def test_grpc_stream_tracks_people_and_reports_the_detector(video_server, walk) -> None:
    frames, annotation = walk
    boxes = omnipose_pb2.BoxList(
        boxes=[
            omnipose_pb2.Box(x=x, y=y, width=w, height=h) for x, y, w, h in _first_boxes(annotation)
        ]
    )

    def requests() -> Iterator[omnipose_pb2.StreamFrame]:
        for i, image in enumerate(frames):
            request = omnipose_pb2.EstimateRequest(image=image)
            if i == 0:  # start the tracks from known boxes; HOG is weak on rendered people
                request.boxes.CopyFrom(boxes)
            yield omnipose_pb2.StreamFrame(frame_id=i, request=request)

    with grpc.insecure_channel(video_server.grpc_target) as channel:
        stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
        results = list(stub.StreamEstimate(requests(), timeout=120))
    assert [r.frame_id for r in results] == list(range(FRAMES))
    responses = [r.response for r in results]
    ran = [r.detector_ran for r in responses]
    assert all(r.HasField("detector_ran") for r in responses)
    assert ran[0] is False  # client boxes
    assert ran[DETECT_EVERY] is True  # the scheduled detector frame
    assert ran.count(False) >= FRAMES - 3, ran  # most frames: pose-guided boxes
    tracks = [
        {p.track_id: p.bbox.x for p in r.persons if p.HasField("track_id")} for r in responses
    ]
    _same_identities(tracks)
    assert sum(len(t) == 2 for t in tracks) >= FRAMES - 2, tracks


def test_single_images_carry_no_tracks(video_server, walk) -> None:
    frames, _ = walk
    with grpc.insecure_channel(video_server.grpc_target) as channel:
        stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
        reply = stub.Estimate(omnipose_pb2.EstimateRequest(image=frames[0]), timeout=60)
    assert not reply.HasField("detector_ran")
    assert not any(p.HasField("track_id") for p in reply.persons)
    body = httpx.post(
        f"{video_server.http_url}/v1/pose", files={"image": frames[0]}, timeout=60
    ).json()
    assert "detector_ran" not in body
    assert all("track_id" not in p for p in body["persons"])


def _wait_for_streams(server: ServerProcess, expected: float, timeout: float = 20.0) -> None:
    wait_until(lambda: server.metric("omnipose_tracked_streams") == expected, timeout,
               f"omnipose_tracked_streams at {expected}")  # fmt: skip


def test_cancelled_grpc_stream_frees_its_state(video_server, walk) -> None:
    frames, _ = walk
    _wait_for_streams(video_server, 0)

    def endless() -> Iterator[omnipose_pb2.StreamFrame]:
        i = 0
        while True:
            yield omnipose_pb2.StreamFrame(
                frame_id=i, request=omnipose_pb2.EstimateRequest(image=frames[i % FRAMES])
            )
            i += 1
            time.sleep(0.05)

    with grpc.insecure_channel(video_server.grpc_target) as channel:
        stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
        call = stub.StreamEstimate(endless(), timeout=120)
        assert next(call).frame_id == 0
        _wait_for_streams(video_server, 1)  # the open stream holds a tracker
        call.cancel()
        with pytest.raises(grpc.RpcError) as error:
            list(call)
        assert error.value.code() == grpc.StatusCode.CANCELLED
    _wait_for_streams(video_server, 0)  # released by the cancellation


def test_rest_stream_id_tracks_frames_and_end_stream_releases(video_server, walk) -> None:
    frames, annotation = walk
    url = f"{video_server.http_url}/v1/pose"
    _wait_for_streams(video_server, 0)
    tracks = []
    for i, image in enumerate(frames[:5]):
        data = {"stream_id": "cam-1"}
        if i == 0:
            data["boxes"] = json.dumps(_first_boxes(annotation))
        if i == 4:
            data["end_stream"] = "true"
        response = httpx.post(url, files={"image": image}, data=data, timeout=60)
        assert response.status_code == 200, video_server.log()
        body = response.json()
        assert body["detector_ran"] is (i == DETECT_EVERY)
        for person in body["persons"]:  # COCO's fields are all still there
            assert {"image_id", "category_id", "bbox", "keypoints", "score"} <= set(person)
        tracks.append({p["track_id"]: p["bbox"][0] for p in body["persons"] if "track_id" in p})
        if i < 4:
            assert video_server.metric("omnipose_tracked_streams") == 1
    _same_identities(tracks)
    _wait_for_streams(video_server, 0)


def test_unary_grpc_stream_id_and_stream_limit(video_server, walk) -> None:
    frames, _ = walk
    with grpc.insecure_channel(video_server.grpc_target) as channel:
        stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
        for stream_id in ("a", "b"):
            reply = stub.Estimate(
                omnipose_pb2.EstimateRequest(image=frames[0], stream_id=stream_id), timeout=60
            )
            assert reply.HasField("detector_ran") and reply.detector_ran
        with pytest.raises(grpc.RpcError) as error:  # --max-streams 2
            stub.Estimate(omnipose_pb2.EstimateRequest(image=frames[0], stream_id="c"), timeout=60)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit is 2" in error.value.details()
        for stream_id in ("a", "b"):
            stub.Estimate(
                omnipose_pb2.EstimateRequest(image=frames[1], stream_id=stream_id, end_stream=True),
                timeout=60,
            )
    _wait_for_streams(video_server, 0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stream_id": "x" * 129}, "stream_id must be 1 to 128"),
        ({"end_stream": "true"}, "end_stream needs the stream_id"),
    ],
)
def test_bad_stream_options_are_rejected(video_server, walk, data, message) -> None:
    frames, _ = walk
    response = httpx.post(
        f"{video_server.http_url}/v1/pose", files={"image": frames[0]}, data=data, timeout=60
    )
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]["message"]


def test_batches_refuse_stream_ids(video_server, walk) -> None:
    """A batch's images run in parallel: they cannot be consecutive frames of one stream."""
    frames, _ = walk
    response = httpx.post(f"{video_server.http_url}/v1/pose/batch",
                          files=[("images", frames[0]), ("images", frames[1])],
                          data={"stream_id": "cam-1"}, timeout=60)  # fmt: skip
    assert response.status_code == 422, response.text
    assert "stream_id is for one frame per request" in response.json()["error"]["message"]
    with grpc.insecure_channel(video_server.grpc_target) as channel:
        stub = omnipose_pb2_grpc.PoseEstimationStub(channel)
        batch = omnipose_pb2.EstimateBatchRequest(
            images=[omnipose_pb2.EstimateRequest(image=frames[0], stream_id="cam-1")]
        )
        with pytest.raises(grpc.RpcError) as error:
            stub.EstimateBatch(batch, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
