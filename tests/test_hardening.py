"""Hostile-but-honest clients against a real server on loopback: portrait phone photos (EXIF
orientation), hostile JSON, absurd boxes, unknown parameters, malformed HTTP, slow and idle
connections, and shutdown. Each test here failed on the service before the hardening issue."""

from __future__ import annotations

import json

import cv2
import grpc
import httpx
import numpy as np
import pytest

from omnipose_cli.main import main as cli_main
from omnipose_grpc import omnipose_pb2 as pb
from omnipose_grpc import omnipose_pb2_grpc
from tests.conftest import ServerProcess
from tests.samples import BUS_JPG
from tests.test_images import jpeg_with_orientation
from tests.test_service_rest import assert_error, assert_still_serving, pose

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


# --- defect 2: EXIF orientation ---------------------------------------------------------------
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


# --- defect 3 and 7: hostile JSON, absurd boxes --------------------------------------------------
@pytest.mark.parametrize("depth", [5, 1000, 100_000])
def test_deeply_nested_boxes_get_422(http: httpx.Client, images, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    files = {"image": ("bus.jpg", images.bus, "image/jpeg")}
    assert_error(http.post("/v1/pose", files=files, data={"boxes": nested}), 422, "nested")
    batch = {"images": ("bus.jpg", images.bus, "image/jpeg")}
    assert_error(http.post("/v1/pose/batch", files=batch, data={"boxes": nested}), 422, "nested")
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
