"""JPEGs decoded by torchvision on the pose model's device (``jpeg_decode``) equal OpenCV's decode.

The device path is device-agnostic: here it runs on the CPU (torchvision's libjpeg-turbo, crops
cut with ``grid_sample`` by ``prepare_on_device``), exactly the code a GPU runs with nvjpeg
(``bench/gpu_check.py`` repeats the decode comparison there). The contract is the one the device
crops keep: within one grey level on at least 99.9% of pixels, same shape. Measured on the CPU,
both decoders give bit-identical pixels for baseline, progressive, 4:4:4/4:2:2/4:2:0 and grey
JPEGs (both are libjpeg-turbo with the same IDCT and upsampling); CMYK differs by one grey level
on most pixels (the colour conversion rounds differently).
"""

from __future__ import annotations

import asyncio
import io

import cv2
import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image
from torch import nn

from bench.samples import BUS_JPG, jpeg_with_orientation
from omnipose.model.configs import get_config
from omnipose.model.crops import crop_persons
from omnipose.model.detection import Detections, NoDetector, PersonDetector
from omnipose.model.topdown import TopDownPoseEstimator
from omnipose.service.engine import PoseEngine
from omnipose.service.errors import InvalidRequest
from omnipose.service.images import (
    DecodedImage,
    ImageError,
    ImageHeader,
    apply_exif_orientation,
    apply_exif_orientation_chw,
    decode_for_device,
    decode_jpeg_on_device,
    decode_pixels,
    read_header,
)
from omnipose.service.loading import LoadedPoseModel
from omnipose.service.metrics import ServiceMetrics
from omnipose.service.requests import ImageRequest
from omnipose.service.settings import ServiceSettings
from tests.test_images import asymmetric_image

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (not installed here).
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)
CONFIG = get_config("coco-w18-128x96")
FALLBACKS = "omnipose_jpeg_device_decode_fallbacks_total"


def device_as_bgr(image: torch.Tensor) -> np.ndarray:
    """A ``3 x H x W`` RGB tensor as the ``H x W x 3`` BGR array OpenCV gives."""
    return image.flip(0).permute(1, 2, 0).contiguous().cpu().numpy()


def assert_same_pixels(got: np.ndarray, expected: np.ndarray) -> float:
    """Same shape, within one grey level on >= 99.9% of pixels; returns the exact fraction."""
    assert got.shape == expected.shape and got.dtype == expected.dtype == np.uint8
    difference = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    within = float((difference <= 1).mean())
    assert within >= 0.999, f"only {within:.5f} of pixels within 1 grey level"
    return float((difference == 0).mean())


def both_decodes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(device path on the CPU as BGR, OpenCV path) for the same bytes and header."""
    header = read_header(data)
    return device_as_bgr(decode_jpeg_on_device(data, header, "cpu")), decode_pixels(data, header)


def pillow_jpeg(image_bgr: np.ndarray, mode: str = "RGB", **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image_bgr[:, :, ::-1])).convert(mode).save(
        buffer, format="JPEG", quality=90, **options
    )
    return buffer.getvalue()


# --- the decode itself --------------------------------------------------------------------------
def test_bus_jpg_decodes_on_the_device_path_as_opencv_decodes_it() -> None:
    got, expected = both_decodes(BUS_JPG.read_bytes())
    assert got.shape == (1080, 810, 3)
    assert assert_same_pixels(got, expected) == 1.0  # measured: bit-identical on the CPU


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_turned_upright_as_on_the_host(orientation: int) -> None:
    """Synthetic JPEGs with an odd size (partial MCUs) and no symmetry, and a photo crop."""
    photo = cv2.imread(str(BUS_JPG))[100:337, 50:411]
    for stored in (asymmetric_image(63, 41), photo):
        data = jpeg_with_orientation(stored, orientation)
        assert read_header(data).orientation == orientation
        got, expected = both_decodes(data)
        height, width = stored.shape[:2]
        assert got.shape[:2] == ((width, height) if orientation >= 5 else (height, width))
        assert assert_same_pixels(got, expected) == 1.0  # measured: bit-identical on the CPU


@pytest.mark.parametrize("orientation", range(0, 10))
def test_tensor_orientation_steps_equal_the_array_ones(orientation: int) -> None:
    """The same table turns a ``C x H x W`` tensor as an ``H x W x C`` array (0, 9: unchanged)."""
    stored = asymmetric_image(7, 5)
    expected = apply_exif_orientation(stored, orientation)
    tensor = torch.from_numpy(stored).permute(2, 0, 1)
    got = apply_exif_orientation_chw(tensor, orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("mode", "options", "exact"),
    [
        ("RGB", {"progressive": True}, True),
        ("RGB", {"subsampling": 0}, True),  # 4:4:4
        ("RGB", {"subsampling": 1}, True),  # 4:2:2
        ("L", {}, True),  # one channel: both give three equal ones
        ("CMYK", {}, False),  # measured: 99.5% of values one grey level apart, none further
    ],
)
def test_other_jpeg_flavours_decode_alike(mode: str, options: dict, exact: bool) -> None:
    data = pillow_jpeg(cv2.imread(str(BUS_JPG))[::2, ::2], mode, **options)
    got, expected = both_decodes(data)
    same = assert_same_pixels(got, expected)
    assert same == 1.0 if exact else same < 1.0


def test_decoded_image_downloads_host_bgr_once() -> None:
    _, expected = both_decodes(BUS_JPG.read_bytes())
    rgb = torch.from_numpy(np.ascontiguousarray(expected[:, :, ::-1])).permute(2, 0, 1)
    image = DecodedImage(rgb=rgb)
    assert (image.width, image.height, image.shape) == (810, 1080, (1080, 810, 3))
    assert not image.on_host
    bgr = image.host_bgr()
    np.testing.assert_array_equal(bgr, expected)
    assert image.on_host and image.host_bgr() is bgr and bgr.flags.c_contiguous
    host = DecodedImage(bgr=expected)
    assert host.on_host and host.host_bgr() is expected and host.device_rgb is None
    with pytest.raises(ValueError):
        DecodedImage()


# --- errors and the fallback -------------------------------------------------------------------
def error_of(decode) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode()
    return info.value


@pytest.mark.parametrize("cut", [2, 3, 10])
def test_a_truncated_jpeg_is_the_same_error_on_both_paths(cut: int) -> None:
    data = BUS_JPG.read_bytes()
    data = data[: len(data) // cut]
    header = read_header(data)  # the header is intact: only the pixels are missing
    fallbacks = []
    on_host = error_of(lambda: decode_pixels(data, header))
    on_device = error_of(lambda: decode_for_device(data, header, "cpu", fallbacks.append))
    assert (on_device.kind, str(on_device)) == (on_host.kind, str(on_host))
    assert "truncated or corrupt" in str(on_host) and on_host.kind == "invalid"
    assert fallbacks == []  # neither could decode it: an error, not a fallback


def test_a_size_other_than_the_header_says_is_refused_on_the_device_path() -> None:
    data = BUS_JPG.read_bytes()
    header = read_header(data)
    lying = ImageHeader(header.format, header.width + 1, header.height, 1)
    on_host = error_of(lambda: decode_pixels(data, lying))
    on_device = error_of(lambda: decode_jpeg_on_device(data, lying, "cpu"))
    assert (on_device.kind, str(on_device)) == (on_host.kind, str(on_host))


def test_corrupt_but_decodable_data_decodes_alike() -> None:
    """Zeroed entropy-coded data is a libjpeg warning, not an error, on both paths."""
    data = bytearray(BUS_JPG.read_bytes())
    data[4000:4100] = bytes(100)
    got, expected = both_decodes(bytes(data))
    assert_same_pixels(got, expected)


def refuse_on_device(monkeypatch: pytest.MonkeyPatch) -> list:
    """torchvision's decode_jpeg raises as nvjpeg does for a flavour it lacks; returns the calls."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(kwargs.get("device"))
        raise RuntimeError("nvjpeg: unsupported JPEG (simulated)")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuse)
    return calls


def test_a_jpeg_the_device_decoder_refuses_is_decoded_by_opencv(monkeypatch) -> None:
    calls = refuse_on_device(monkeypatch)
    data = BUS_JPG.read_bytes()
    header = read_header(data)
    fallbacks = []
    image = decode_for_device(data, header, "cpu", fallbacks.append)
    assert calls == ["cpu"] and len(fallbacks) == 1 and "simulated" in str(fallbacks[0])
    assert image.on_host and image.device_rgb is None
    np.testing.assert_array_equal(image.host_bgr(), decode_pixels(data, header))


def test_only_jpegs_go_to_the_device_decoder(monkeypatch) -> None:
    calls = refuse_on_device(monkeypatch)
    ok, png = cv2.imencode(".png", asymmetric_image())
    assert ok
    image = decode_for_device(png.tobytes(), read_header(png.tobytes()), "cpu")
    assert calls == [] and image.on_host
    data = BUS_JPG.read_bytes()
    assert decode_for_device(data, read_header(data), None).on_host and calls == []


# --- crops -------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", [1, 6])
def test_crops_from_the_device_path_equal_crops_from_the_opencv_path(orientation: int) -> None:
    estimator = TopDownPoseEstimator(nn.Identity(), CONFIG, device="cpu")
    stored = cv2.imread(str(BUS_JPG))
    data = jpeg_with_orientation(stored, orientation)
    header = read_header(data)
    on_device = decode_for_device(data, header, "cpu")
    on_host = decode_for_device(data, header, None)
    assert on_device.device_rgb is not None and on_host.device_rgb is None
    width, height = on_host.width, on_host.height
    assert (on_device.width, on_device.height) == (width, height)
    boxes = np.array(
        [[50, 400, 200, 500], [-60, 300, 180, 420], [width - 100, height - 200, 200, 300],
         [0, 0, width, height]], dtype=np.float64,
    )  # fmt: skip
    persons = Detections(boxes, np.full(len(boxes), 0.9))
    host = crop_persons(estimator, on_host, persons)  # cv2.warpAffine
    device = crop_persons(estimator, on_device, persons)  # grid_sample on the decoded tensor
    assert not on_device.on_host, "cropping must not download the device image"
    np.testing.assert_array_equal(device.centers, host.centers)
    np.testing.assert_array_equal(device.scales, host.scales)
    assert device.inputs.shape == host.inputs.shape
    # one grey level is 1/255/std (about 0.018) in normalised units
    within = ((device.inputs - host.inputs).abs() <= 1.01 / 255 / 0.224).float().mean()
    assert within >= 0.999, f"only {float(within):.5f} of crop values within 1 grey level"


# --- through the engine ------------------------------------------------------------------------
class RecordingDetector(PersonDetector):
    """Two fixed boxes; keeps every image it was given."""

    name = "recording"

    def __init__(self, boxes: list[list[float]]) -> None:
        self.boxes = np.array(boxes, dtype=np.float64)
        self.seen: list[np.ndarray] = []

    def detect_batch(self, images_bgr):
        self.seen.extend(images_bgr)
        return [Detections(self.boxes, np.full(len(self.boxes), 0.9)) for _ in images_bgr]


@pytest.fixture(scope="module")
def random_model() -> LoadedPoseModel:
    """A random strided convolution: cheap, and its keypoints move with the crops' pixels."""
    torch.manual_seed(0)
    network = nn.Conv2d(3, CONFIG.num_joints, kernel_size=5, stride=4, padding=2)
    estimator = TopDownPoseEstimator(network, CONFIG, device="cpu", flip_test=True)
    return LoadedPoseModel(estimator, CONFIG, CONFIG.keypoints, None, None, False)


def run_engine(
    model: LoadedPoseModel,
    requests: list[ImageRequest],
    jpeg_decode: str,
    detector: PersonDetector | None = None,
) -> tuple[list, ServiceMetrics]:
    settings = ServiceSettings(
        config=CONFIG.name,
        device="cpu",
        warmup=False,
        jpeg_decode=jpeg_decode,
        max_queue_delay_ms=0,
    )
    metrics = ServiceMetrics()

    async def scenario() -> list:
        engine = PoseEngine(settings, metrics, pose_model=model, detector=detector or NoDetector())
        await engine.start()
        try:
            return [await engine.estimate(request) for request in requests]
        finally:
            await engine.close()

    return asyncio.run(scenario()), metrics


def count_downloads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """The shapes of device images copied to the host (DecodedImage.host_bgr) from now on."""
    downloads = []
    original = DecodedImage.host_bgr

    def counting_host_bgr(self):
        if not self.on_host:
            downloads.append(self.shape)
        return original(self)

    monkeypatch.setattr(DecodedImage, "host_bgr", counting_host_bgr)
    return downloads


def keypoints_of(result) -> np.ndarray:
    return np.stack([person.keypoints for person in result.persons])


def test_engine_device_decode_gives_the_keypoints_of_the_cpu_decode(
    random_model, images, monkeypatch
) -> None:
    """Client boxes, no render: the image never leaves the device, and the keypoints are those of
    OpenCV's decode cropped on the device by hand (what jpeg_decode=cpu gives on a GPU, where
    both paths crop with prepare_on_device; on a CPU model the cpu path crops with cv2, whose
    one-grey-level differences move a random network's flat heatmap peaks by pixels)."""
    boxes = np.array(images.bus_boxes)
    downloads = count_downloads(monkeypatch)
    (result,), metrics = run_engine(random_model, [ImageRequest(images.bus, boxes=boxes)], "device")
    assert downloads == []
    assert metrics.registry.get_sample_value(FALLBACKS) == 0

    estimator = random_model.estimator
    image_bgr = decode_pixels(images.bus, read_header(images.bus))
    rgb = torch.from_numpy(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)
    crops = estimator.prepare_on_device(rgb.unsqueeze(0), boxes)
    expected = estimator.decode(estimator.forward(crops.inputs), crops)
    expected.sort(key=lambda p: p.score, reverse=True)
    assert (result.width, result.height) == (image_bgr.shape[1], image_bgr.shape[0])
    assert len(result.persons) == len(expected) == 2
    for got, want in zip(result.persons, expected, strict=True):
        np.testing.assert_allclose(got.keypoints, want.keypoints, atol=1e-3)


def test_engine_downloads_a_device_image_once_for_detector_and_render(
    random_model, images, monkeypatch
) -> None:
    downloads = count_downloads(monkeypatch)
    detector = RecordingDetector(images.bus_boxes)
    request = ImageRequest(images.bus, render=True)
    (result,), _ = run_engine(random_model, [request], "device", detector)
    expected = decode_pixels(images.bus, read_header(images.bus))
    assert downloads == [expected.shape]  # the detector's download, reused by the render
    assert len(detector.seen) == 1 and len(result.persons) == 2
    assert_same_pixels(detector.seen[0], expected)
    rendered = cv2.imdecode(np.frombuffer(result.rendered_jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert rendered.shape == expected.shape


@pytest.mark.parametrize(("jpeg_decode", "tried"), [("device", 1), ("auto", 0), ("cpu", 0)])
def test_engine_falls_back_to_opencv_and_counts_it(
    random_model, images, monkeypatch, jpeg_decode: str, tried: int
) -> None:
    """A refused JPEG is answered from OpenCV's decode (auto on a CPU model never tries)."""
    calls = refuse_on_device(monkeypatch)
    requests = [ImageRequest(images.bus, boxes=np.array(images.bus_boxes))]
    (result,), metrics = run_engine(random_model, requests, jpeg_decode)
    (expected,), _ = run_engine(random_model, requests, "cpu")
    assert len(calls) == tried
    assert metrics.registry.get_sample_value(FALLBACKS) == tried
    np.testing.assert_array_equal(keypoints_of(result), keypoints_of(expected))


def test_engine_answers_a_truncated_jpeg_as_invalid_on_the_device_path(
    random_model, images
) -> None:
    data = BUS_JPG.read_bytes()
    request = ImageRequest(data[: len(data) // 3], boxes=np.array(images.bus_boxes))
    errors = []
    for jpeg_decode in ("device", "cpu"):
        with pytest.raises(InvalidRequest) as info:
            run_engine(random_model, [request], jpeg_decode)
        errors.append((info.value.code, str(info.value)))
    assert errors[0] == errors[1] and "truncated or corrupt" in errors[0][1]


@pytest.mark.parametrize("refuse", [False, True])
def test_the_device_decoder_is_warmed_before_ready_and_a_failure_does_not_stop_the_start(
    random_model, monkeypatch, caplog, refuse: bool
) -> None:
    calls = []
    decode = torchvision.io.decode_jpeg

    def recording(*args, **kwargs):
        calls.append(kwargs.get("device"))
        if refuse:
            raise RuntimeError("nvjpeg: no decoder (simulated)")
        return decode(*args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", recording)
    settings = ServiceSettings(config=CONFIG.name, device="cpu", jpeg_decode="device",
                               warmup=True, model_instances=1, torch_threads=1)  # fmt: skip
    metrics = ServiceMetrics()

    async def scenario() -> bool:
        engine = PoseEngine(settings, metrics, pose_model=random_model, detector=NoDetector())
        await engine.start()
        ready = engine.ready
        await engine.close()
        return ready

    assert asyncio.run(scenario())
    assert calls == [torch.device("cpu")]
    assert metrics.registry.get_sample_value(FALLBACKS) == 0  # a warm-up is no request
    assert ("warm-up failed" in caplog.text) == refuse
