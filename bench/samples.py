"""Real photos with people in them (ultralytics ships two) and JPEGs with an EXIF orientation,
for the benchmark scripts and the tests alike."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import ultralytics
from PIL import Image

ASSETS = Path(ultralytics.__file__).resolve().parent / "assets"
BUS_JPG = ASSETS / "bus.jpg"  # 810 x 1080, four people standing, one partly cut off
ZIDANE_JPG = ASSETS / "zidane.jpg"  # 1280 x 720, two people close up
EXIF_ORIENTATION_TAG = 0x0112


def jpeg_with_orientation(image_bgr: np.ndarray, orientation: int) -> bytes:
    """A JPEG of the stored pixels ``image_bgr`` whose EXIF tag says ``orientation``."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    rgb = Image.fromarray(np.ascontiguousarray(image_bgr[:, :, ::-1]))
    rgb.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()
