"""Image decoding with limits: every bad input becomes an ImageError with a message for the user.

The size is read from the header (Pillow, lazily) before any pixel is decoded, so a small file that
claims a huge canvas (a decompression bomb) is refused without allocating it.

EXIF orientation is one explicit step (:func:`apply_exif_orientation`): pixels are decoded as
stored (OpenCV is told to ignore the tag), then turned upright when asked, so the size read from
the header, the decoded array and the coordinates returned to clients always agree.

JPEGs can instead be decoded by torchvision on the pose model's device (nvjpeg on a GPU, its
libjpeg-turbo on the CPU): :func:`decode_for_device` returns a :class:`DecodedImage` that holds
either the host BGR array or the device RGB tensor, and falls back to OpenCV for any JPEG the
device decoder refuses, so no request the CPU decoder could decode ever fails because of it.
"""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
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


# The steps that turn stored pixels upright, per EXIF orientation, in this order: mirror the rows
# (upside down), mirror the columns (left-right), then transpose (swap rows and columns). One
# table for the host array and the device tensor, so both paths turn an image the same way.
UPRIGHT_STEPS = {
    1: (False, False, False),
    2: (False, True, False),  # mirror
    3: (True, True, False),  # half turn
    4: (True, False, False),  # upside-down mirror
    5: (False, False, True),  # transpose
    6: (True, False, True),  # the top is on the right: turn clockwise
    7: (True, True, True),  # transverse
    8: (False, True, True),  # the top is on the left: turn counter-clockwise
}


def apply_exif_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """The stored ``H x W x C`` pixels turned upright for EXIF ``orientation`` 1-8 (other values:
    unchanged); a view, not a copy.

    The tag says how the stored rows and columns map to the scene: 2 mirror, 3 half turn, 4
    upside-down mirror, 5 transpose, 6 the top is on the right (turn clockwise), 7 transverse,
    8 the top is on the left (turn counter-clockwise).
    """
    flip_rows, flip_columns, transpose = UPRIGHT_STEPS.get(orientation, UPRIGHT_STEPS[1])
    if flip_rows:
        image = image[::-1]
    if flip_columns:
        image = image[:, ::-1]
    return image.swapaxes(0, 1) if transpose else image


def apply_exif_orientation_chw(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """:func:`apply_exif_orientation` for a ``C x H x W`` tensor, on its own device."""
    flip_rows, flip_columns, transpose = UPRIGHT_STEPS.get(orientation, UPRIGHT_STEPS[1])
    dims = [dim for dim, flip in ((-2, flip_rows), (-1, flip_columns)) if flip]
    if dims:
        image = torch.flip(image, dims)
    return image.transpose(-2, -1) if transpose else image


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


def _truncated(header: ImageHeader) -> ImageError:
    return ImageError(f"the {header.format} image is truncated or corrupt and cannot be decoded")


def decode_pixels(data: bytes, header: ImageHeader) -> np.ndarray:
    """Decode bytes whose header :func:`read_header` accepted; upright per ``header``."""
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if image is None or image.shape[0] != header.height or image.shape[1] != header.width:
        raise _truncated(header)
    if header.orientation == 1:
        return image
    return np.ascontiguousarray(apply_exif_orientation(image, header.orientation))


def decode_jpeg_on_device(
    data: bytes, header: ImageHeader, device: torch.device | str
) -> torch.Tensor:
    """A JPEG whose header :func:`read_header` accepted, decoded by torchvision on ``device``
    (nvjpeg on CUDA, libjpeg-turbo on the CPU): a ``3 x H x W`` uint8 RGB tensor there, upright
    per ``header``.

    A decoded size other than the header's is the ImageError :func:`decode_pixels` raises; the
    decoder's own errors (a truncated file, a JPEG flavour nvjpeg lacks) propagate as they are:
    :func:`decode_for_device` answers them by decoding on the CPU.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    # torch wants a writable buffer; the copy is small next to the decoded image.
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    image = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    if image.ndim != 3 or tuple(image.shape) != (3, header.height, header.width):
        raise _truncated(header)
    return apply_exif_orientation_chw(image, header.orientation)


class DecodedImage:
    """One decoded, upright image, held where it was decoded: a host BGR array (OpenCV) or an RGB
    ``3 x H x W`` uint8 tensor on the pose model's device (torchvision).

    The crops are cut from whichever it holds (:func:`omnipose.model.crops.crop_persons`). Only
    the detector and rendering need the host BGR array; :meth:`host_bgr` makes it from the tensor on
    first need (on a GPU: colour order and layout changed there, then one download) and keeps it.
    It is lazy on purpose: a frame whose persons are the client's boxes or the tracker's
    pose-guided boxes, and that is not rendered, never leaves the device, so it costs no
    device-to-host copy and no host memory. One request's steps run one after another, so no lock.
    """

    def __init__(self, bgr: np.ndarray | None = None, rgb: torch.Tensor | None = None) -> None:
        if (bgr is None) == (rgb is None):
            raise ValueError("a DecodedImage holds a host BGR array or a device RGB tensor")
        self._bgr = bgr
        self.device_rgb = rgb  # 3 x H x W uint8 on the model's device, or None (host image)
        if rgb is not None:
            self.height, self.width = int(rgb.shape[1]), int(rgb.shape[2])
        else:
            self.height, self.width = int(bgr.shape[0]), int(bgr.shape[1])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(height, width, 3), as the host array's shape."""
        return self.height, self.width, 3

    @property
    def on_host(self) -> bool:
        """Whether :meth:`host_bgr` is ready without a download."""
        return self._bgr is not None

    def host_bgr(self) -> np.ndarray:
        """The ``H x W x 3`` BGR uint8 array on the host (downloaded once, then kept)."""
        if self._bgr is None:
            rgb = self.device_rgb.permute(1, 2, 0)  # H x W x 3
            if rgb.device.type == "cpu":  # torchvision's CPU decoder writes H x W x 3 already
                self._bgr = cv2.cvtColor(np.ascontiguousarray(rgb.numpy()), cv2.COLOR_RGB2BGR)
            else:  # reorder where it is fast, then one contiguous download
                self._bgr = rgb.flip(2).contiguous().cpu().numpy()
        return self._bgr


def decode_for_device(
    data: bytes,
    header: ImageHeader,
    device: torch.device | str | None,
    on_fallback: Callable[[Exception], None] | None = None,
) -> DecodedImage:
    """Decode bytes whose header :func:`read_header` accepted: a JPEG on ``device`` when one is
    given (:func:`decode_jpeg_on_device`), anything else with OpenCV on the host.

    When the device decoder fails, the image is decoded by OpenCV instead (its ImageError, if
    any, is what the caller gets: the same as with no device); ``on_fallback`` hears of every
    image the device decoder refused and OpenCV then decoded (not of images neither can decode).
    """
    if device is None or header.format != "JPEG":
        return DecodedImage(bgr=decode_pixels(data, header))
    try:
        return DecodedImage(rgb=decode_jpeg_on_device(data, header, device))
    except Exception as exc:  # any failure of the device decoder: the CPU has the last word
        image = DecodedImage(bgr=decode_pixels(data, header))
        if on_fallback is not None:
            on_fallback(exc)
        return image


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
