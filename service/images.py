"""Image decoding with limits: every bad input becomes an ImageError with a message for the user.

The size is read from the header (Pillow, lazily) before any pixel is decoded, so a small file that
claims a huge canvas (a decompression bomb) is refused without allocating it.

EXIF orientation is one explicit step (:func:`apply_exif_orientation`): pixels are decoded as
stored (OpenCV is told to ignore the tag), then turned upright when asked, so the size read from
the header, the decoded array and the coordinates returned to clients always agree.
"""

from __future__ import annotations

import io
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

SUPPORTED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "BMP": "image/bmp",
                     "WEBP": "image/webp", "TIFF": "image/tiff"}
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
EXIF_ORIENTATION_TAG = 0x0112
# Orientations whose upright image swaps width and height (a quarter turn is involved).
SWAPS_AXES = {5, 6, 7, 8}


def _pillow_open(buffer: io.BytesIO) -> Image.Image:
    """Pillow's own ``Image.open``.

    Importing ultralytics replaces ``Image.open`` with a wrapper that pip-installs a HEIF plugin
    when it meets unknown bytes; a server must answer bad input with an error, not an install.
    """
    patches = sys.modules.get("ultralytics.utils.patches")
    opener = getattr(patches, "_image_open", Image.open)
    return opener(buffer)


class ImageError(ValueError):
    """The bytes are not an acceptable image. ``kind`` lets transports pick a status code."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind  # invalid | unsupported | too_large


def apply_exif_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels turned upright for EXIF ``orientation`` 1-8 (other values: unchanged).

    The tag says how the stored rows and columns map to the scene: 2 mirror, 3 half turn, 4
    upside-down mirror, 5 transpose, 6 the top is on the right (turn clockwise), 7 transverse,
    8 the top is on the left (turn counter-clockwise).
    """
    if orientation == 2:
        return image[:, ::-1]
    if orientation == 3:
        return image[::-1, ::-1]
    if orientation == 4:
        return image[::-1]
    if orientation == 5:
        return image.swapaxes(0, 1)
    if orientation == 6:
        return image[::-1].swapaxes(0, 1)
    if orientation == 7:
        return image[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return image[:, ::-1].swapaxes(0, 1)
    return image


def _orientation(header: Image.Image) -> int:
    """The EXIF orientation tag (1 when absent or unreadable: the pixels are already upright)."""
    try:
        value = header.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not make a decodable image unusable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, before any pixel is decoded: enough to budget the decoded size."""

    format: str
    width: int  # as stored
    height: int
    orientation: int  # EXIF 1-8; 1 when ignored or absent

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES,
                max_pixels: int = DEFAULT_MAX_PIXELS,
                exif_orientation: bool = True) -> ImageHeader:
    """Check the encoded bytes and their header against the limits; decodes no pixel."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(
            f"the image is {len(data)} bytes, over the limit of {max_bytes} bytes", kind="too_large"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _pillow_open(io.BytesIO(data)) as header:
                fmt, (width, height) = header.format, header.size
                orientation = _orientation(header) if exif_orientation else 1
    except UnidentifiedImageError:
        raise ImageError("the data is not a recognised image (corrupt or not an image)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError(
            "the image declares an implausibly large canvas", kind="too_large"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"the image header cannot be read: {exc}") from None
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError(
            f"image format {fmt} is not supported; send one of {', '.join(SUPPORTED_FORMATS)}",
            kind="unsupported",
        )
    if width * height > max_pixels:
        raise ImageError(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of"
            f" {max_pixels} pixels", kind="too_large",
        )
    return ImageHeader(fmt, width, height, orientation)


def decode_pixels(data: bytes, header: ImageHeader) -> np.ndarray:
    """Decode bytes whose header :func:`read_header` accepted; upright per ``header``."""
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if image is None or image.shape[0] != header.height or image.shape[1] != header.width:
        raise ImageError(f"the {header.format} image is truncated or corrupt and cannot be decoded")
    if header.orientation == 1:
        return image
    return np.ascontiguousarray(apply_exif_orientation(image, header.orientation))


def decode_image(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS,
                 exif_orientation: bool = True) -> np.ndarray:
    """Decode encoded image bytes to a BGR uint8 array (H x W x 3), enforcing the limits.

    With ``exif_orientation`` (the default) the result is the upright image the EXIF tag
    describes (phone photos); without it, the pixels as stored.
    """
    return decode_pixels(data, read_header(data, max_bytes, max_pixels, exif_orientation))


def read_image_file(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES,
                    max_pixels: int = DEFAULT_MAX_PIXELS,
                    exif_orientation: bool = True) -> np.ndarray:
    """Read and decode an image file, with the file name in every error message."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ImageError(f"{file}: cannot read file ({exc.strerror or exc})") from None
    try:
        return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels,
                            exif_orientation=exif_orientation)
    except ImageError as exc:
        raise ImageError(f"{file}: {exc}", kind=exc.kind) from None


def encode_jpeg(image_bgr: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of a BGR image (for rendered overlays)."""
    ok, buffer = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError("could not encode the rendered image as JPEG")
    return buffer.tobytes()
