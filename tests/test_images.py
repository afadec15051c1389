"""Image decoding limits and error messages."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from bench.samples import BUS_JPG, jpeg_with_orientation
from omnipose.service.images import ImageError, decode_image, read_image_file


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims a huge canvas but carries almost no data (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_decodes_real_photo_as_bgr() -> None:
    data = BUS_JPG.read_bytes()
    image = decode_image(data)
    assert image.shape == (1080, 810, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, cv2.imread(str(BUS_JPG)))


@pytest.mark.parametrize(
    ("data", "fragment", "kind"),
    [
        (b"", "empty", "invalid"),
        (b"definitely not an image", "not a recognised image", "invalid"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "not a recognised image|header", "invalid"),
    ],
)
def test_rejects_bad_bytes(data: bytes, fragment: str, kind: str) -> None:
    with pytest.raises(ImageError, match=fragment) as info:
        decode_image(data)
    assert info.value.kind == kind


def test_rejects_truncated_jpeg() -> None:
    data = BUS_JPG.read_bytes()
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 3])


def test_rejects_unsupported_format() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="GIF")
    with pytest.raises(ImageError, match="GIF is not supported") as info:
        decode_image(buffer.getvalue())
    assert info.value.kind == "unsupported"


def test_rejects_over_byte_limit() -> None:
    with pytest.raises(ImageError, match="over the limit of 1000 bytes") as info:
        decode_image(BUS_JPG.read_bytes(), max_bytes=1000)
    assert info.value.kind == "too_large"


def test_rejects_decompression_bomb_before_decoding() -> None:
    with pytest.raises(ImageError) as info:
        decode_image(png_header_claiming(50_000, 50_000), max_pixels=40_000_000)
    assert info.value.kind == "too_large"


def test_rejects_over_pixel_limit() -> None:
    with pytest.raises(ImageError, match="874800 pixels, over the limit"):
        decode_image(BUS_JPG.read_bytes(), max_pixels=100_000)


def test_file_errors_name_the_file(tmp_path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: the image is empty"):
        read_image_file(empty)
    with pytest.raises(ImageError, match=r"missing\.jpg: cannot read file"):
        read_image_file(tmp_path / "missing.jpg")


def asymmetric_image(width: int = 64, height: int = 40) -> np.ndarray:
    """No mirror or rotation maps it onto itself: any wrong orientation step shows."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 4, ys * 6, (xs + 2 * ys) % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_image(orientation: int) -> None:
    """All 8 orientations, against Pillow's own ``exif_transpose`` of the same stored pixels."""
    from PIL import ImageOps

    data = jpeg_with_orientation(asymmetric_image(), orientation)
    stored = decode_image(data, exif_orientation=False)
    assert stored.shape == (40, 64, 3)
    upright = decode_image(data)
    reference = Image.fromarray(stored)
    reference.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(reference))
    assert upright.shape == expected.shape
    assert upright.shape[:2] == ((64, 40) if orientation >= 5 else (40, 64))
    np.testing.assert_array_equal(upright, expected)


def test_rotated_decompression_bomb_is_refused_from_the_header() -> None:
    """The orientation does not let a huge canvas past the header check."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG", exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline frame header: height and width follow the precision
    data[sof + 5 : sof + 9] = struct.pack(">HH", 7_000, 8_000)
    with pytest.raises(ImageError, match="over the limit") as info:
        decode_image(bytes(data), max_pixels=40_000_000)
    assert info.value.kind == "too_large"
