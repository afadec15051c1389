"""Drawing estimated skeletons on images so a person can check them at a glance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import cv2
import numpy as np

from omnipose.model.skeleton import KeypointSpec


class _HasPose(Protocol):
    keypoints: np.ndarray  # J x 3
    bbox: np.ndarray  # x, y, w, h
    score: float


def draw_poses(image_bgr: np.ndarray, poses: Sequence[_HasPose], spec: KeypointSpec,
               min_score: float = 0.2, draw_boxes: bool = True) -> np.ndarray:
    """A copy of ``image_bgr`` with each person's limbs (dataset colours), joints and box drawn.

    Joints and limbs whose confidence is below ``min_score`` are not drawn, so what is shown is
    what the service would count as found. Line widths scale with the image size.
    """
    canvas = image_bgr.copy()
    thickness = max(1, round(max(canvas.shape[:2]) / 300))
    radius = thickness + 1
    for pose in poses:
        kps = np.asarray(pose.keypoints, dtype=np.float64)
        if draw_boxes:
            x, y, w, h = (round(v) for v in pose.bbox)
            cv2.rectangle(canvas, (x, y), (x + w, y + h), (255, 255, 255), max(1, thickness // 2))
            cv2.putText(canvas, f"{pose.score:.2f}", (x, max(0, y - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4 * thickness, (255, 255, 255), max(1, thickness // 2), cv2.LINE_AA)
        for (a, b), color in zip(spec.limbs, spec.limb_colors, strict=True):
            if kps[a, 2] < min_score or kps[b, 2] < min_score:
                continue
            pa = (round(kps[a, 0]), round(kps[a, 1]))
            pb = (round(kps[b, 0]), round(kps[b, 1]))
            cv2.line(canvas, pa, pb, color, thickness, cv2.LINE_AA)
        for x, y, conf in kps:
            if conf >= min_score:
                cv2.circle(canvas, (round(x), round(y)), radius, (0, 0, 255), -1,
                           cv2.LINE_AA)
    return canvas
