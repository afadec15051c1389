"""Person crops: the one place where network inputs are cut from an image.

Every caller (the service, ``omnipose predict``, bench and training's evaluation) cuts its crops
here, so the same image and boxes give the same network inputs everywhere. A box is padded to
the model's aspect ratio (:func:`omnipose.model.transforms.box_to_center_scale`), warped to the
input size with the affine matrices of :func:`omnipose.model.transforms.get_affine_transforms`
and ImageNet-normalised: on the host with OpenCV, or on the model's device with the same
matrices (:mod:`omnipose.model.device_crops`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import cv2
import numpy as np
import torch

from omnipose.model.detection import Detections
from omnipose.model.device_crops import crop_on_device, image_to_device, normalize_on_device
from omnipose.model.transforms import (
    BOX_PADDING,
    box_to_center_scale,
    get_affine_transforms,
    normalize_crops,
    warp_crops,
)

if TYPE_CHECKING:
    from omnipose.model.topdown import TopDownPoseEstimator


@dataclass
class CropBatch:
    """Network inputs for the persons of one image, with the geometry to map results back."""

    inputs: torch.Tensor  # N x 3 x H x W, float32, ImageNet-normalised
    centers: np.ndarray  # N x 2
    scales: np.ndarray  # N x 2 (box size / 200, padded)
    boxes: np.ndarray  # N x 4, x y w h in image pixels
    box_scores: np.ndarray  # N

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


class HeldImage(Protocol):
    """A decoded image held on the host (BGR) or as an RGB ``3 x H x W`` uint8 tensor on a
    device, as the service keeps it (:class:`omnipose.service.images.DecodedImage`)."""

    device_rgb: torch.Tensor | None

    def host_bgr(self) -> np.ndarray: ...


Cut = Callable[[np.ndarray, tuple[int, int]], torch.Tensor]  # affines [N, 2, 3], (W, H) -> crops


def cut_crops(boxes_xywh: np.ndarray, box_scores: np.ndarray | None,
              input_size: tuple[int, int], aspect_ratio: float, cut: Cut) -> CropBatch:
    """Crops ``[N, 3, H, W]`` of ``input_size`` (H, W) for boxes ``[N, 4]`` (x, y, w, h), cut by
    ``cut`` from the affine matrices; box scores default to 1."""
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    scores = (np.ones(len(boxes)) if box_scores is None
              else np.asarray(box_scores, dtype=np.float64).reshape(-1))
    if len(scores) != len(boxes):
        raise ValueError(f"got {len(boxes)} boxes but {len(scores)} box scores")
    height, width = input_size
    if len(boxes) == 0:
        empty = np.zeros((0, 2))
        return CropBatch(torch.zeros(0, 3, height, width), empty, empty, boxes, scores)
    centers, scales = box_to_center_scale(boxes, aspect_ratio, padding=BOX_PADDING)
    affines = get_affine_transforms(centers, scales, np.zeros(len(boxes)), (width, height))
    return CropBatch(cut(affines, (width, height)), centers, scales, boxes, scores)


def host_cut(image_rgb: np.ndarray) -> Cut:
    """Cutting from an ``[H, W, 3]`` uint8 RGB array on the host (OpenCV)."""
    return lambda affines, size: normalize_crops(warp_crops(image_rgb, affines, size))


def device_cut(image: torch.Tensor) -> Cut:
    """Cutting from a ``[1, 3, H, W]`` uint8 RGB tensor on a device; the crops stay there."""
    return lambda affines, size: normalize_on_device(crop_on_device(image, affines, size))


def crop_persons(estimator: TopDownPoseEstimator, image: np.ndarray | HeldImage,
                 persons: Detections, channels: Literal["bgr", "rgb"] = "bgr") -> CropBatch:
    """Network inputs of ``estimator`` for ``persons`` (their boxes and scores) in ``image``.

    A host image (an array in ``channels`` order, or a HeldImage holding BGR) is turned RGB (the
    network was trained on RGB), then cut on the host; on a GPU it is uploaded once (pinned,
    asynchronous) and cut there. An image held on the model's device (RGB already) is cut there
    as it is.
    """
    size, aspect = estimator.config.input_size, estimator.config.aspect_ratio
    device, boxes, scores = estimator.device, persons.boxes, persons.scores
    if not isinstance(image, np.ndarray):
        if image.device_rgb is not None:
            rgb = image.device_rgb.to(device).unsqueeze(0)  # [1, 3, H, W]
            return cut_crops(boxes, scores, size, aspect, device_cut(rgb))
        image, channels = image.host_bgr(), "bgr"
    image_rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if channels == "bgr" else image
    if device.type == "cuda":
        device_image = image_to_device(image_rgb, device, pin_memory=True)
        return cut_crops(boxes, scores, size, aspect, device_cut(device_image))
    return cut_crops(boxes, scores, size, aspect, host_cut(image_rgb))
