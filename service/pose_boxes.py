"""Boxes derived from poses: a pose's extent, the boxes grown around it, and box arithmetic.

Tracking gives the tracker and the next frame's crops boxes built from poses rather than from the
detector (see :mod:`omnipose.service.tracking`); this module holds that geometry. Boxes are
``x, y, w, h`` in image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_ASPECT = 0.35  # pose boxes are at least this wide for their height (and the converse)


def pose_extent(keypoints: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Centre and size of the confident joints' extent, or None with fewer than two of them."""
    confident = keypoints[keypoints[:, 2] > threshold, :2]
    if len(confident) < 2:
        return None
    low, high = confident.min(axis=0), confident.max(axis=0)
    size = np.maximum(high - low, 1.0)
    # A body seen from the side has its joints nearly in a line: keep the box at least
    # MIN_ASPECT as wide as it is tall (and the other way round), around the joints' centre.
    size = np.maximum(size, MIN_ASPECT * size[::-1])
    return (low + high) / 2, size


def box_around(extent: tuple[np.ndarray, np.ndarray], margin: float) -> np.ndarray:
    """x, y, w, h of ``extent`` grown by ``margin`` x its size on each side (joints sit inside
    the body: the head top, hands and feet lie beyond them)."""
    centre, size = extent
    half = size * (0.5 + margin)
    return np.array([centre[0] - half[0], centre[1] - half[1], 2 * half[0], 2 * half[1]])


def pose_box(keypoints: np.ndarray, threshold: float, margin: float) -> np.ndarray | None:
    """The confident joints' extent grown by ``margin`` (see :func:`box_around`), or None."""
    extent = pose_extent(keypoints, threshold)
    return None if extent is None else box_around(extent, margin)


def box_area(box: np.ndarray | None) -> float:
    """w x h of an x, y, w, h box; 0 for no box."""
    return 0.0 if box is None else float(box[2] * box[3])


def inside_image(box: np.ndarray, width: int, height: int) -> bool:
    """Whether the x, y, w, h ``box`` lies wholly inside a ``width`` x ``height`` image."""
    return bool(box[0] >= 0 and box[1] >= 0 and box[0] + box[2] <= width
                and box[1] + box[3] <= height)  # fmt: skip


def clip_box(box: np.ndarray, width: int, height: int) -> np.ndarray | None:
    """``box`` cut to the image, or None when too little of it (under 2 px a side) remains."""
    x1, y1 = max(box[0], 0.0), max(box[1], 0.0)
    x2, y2 = min(box[0] + box[2], float(width)), min(box[1] + box[3], float(height))
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    return np.array([x1, y1, x2 - x1, y2 - y1])


@dataclass(frozen=True)
class CropFit:
    """Where a person's crop box sat around their pose on the last frame whose box came from
    the detector: its centre's offset from the pose extent's centre and its size, both in
    units of the extent's size (a person leaving or turning shrinks the crop with them). A
    guided crop built with it is placed and sized like the detector's box, so the pose model
    sees what it sees on detector frames. A crop built from the extent alone drifts: the
    joints' extent is off-centre in the body (ankles above the soles, the head's top above the
    eyes), so a crop centred on it is off-centre too, the next pose comes out a little shifted
    and shortened, and the crop after that more so."""

    offset: np.ndarray  # (crop centre - extent centre) / extent size, x and y
    size: np.ndarray  # crop width and height / extent width and height

    @classmethod
    def measure(cls, crop_box: np.ndarray, extent: tuple[np.ndarray, np.ndarray]) -> CropFit:
        centre, size = extent
        crop_box = np.asarray(crop_box, dtype=np.float64)
        offset = (crop_box[:2] + crop_box[2:] / 2 - centre) / size
        return cls(offset, crop_box[2:] / size)

    def box(self, extent: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """x, y, w, h of the crop box for a pose of this ``extent``."""
        centre = extent[0] + self.offset * extent[1]
        size = self.size * extent[1]
        return np.concatenate([centre - size / 2, size])
