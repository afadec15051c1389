"""Crop geometry of the top-down pipeline, in OmniPose's own pixel-centre convention.

A person box becomes a center and a scale (box size / ``pixel_std``, padded and fitted to the
model's aspect ratio). A similarity transform maps that scaled, possibly rotated box onto the
network input (or onto the heatmap, using the heatmap size); its inverse maps decoded heatmap
coordinates back to the image.

OmniPose differs from HRNet's original construction: it maps the pixel *centres* at the box
borders onto the pixel centres at the output borders, i.e. it works with "minus one" sizes:
zoom ``(out_w - 1) / (box_w - 1)`` and output centre ``((out_w - 1) / 2, (out_h - 1) / 2)``.
The published checkpoints were trained with it, so using HRNet's ``out_w / box_w`` and
``out_w / 2`` instead moves every keypoint by up to a few pixels (measured: 7.5 px on average on
bus.jpg at 256x192). A consequence worth having: mirroring about ``(out_w - 1) / 2`` is exact,
so the flip test needs no one-pixel shift. ``tests/data/reference/crop_transforms_golden.json``
holds matrices computed by the published code; the tests compare against every case.

Everything is batched over boxes except the single-box reference ``get_affine_transform``, which
follows the published three-point construction literally.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

PIXEL_STD = 200.0
"""HRNet's box-size unit: scales are box sizes in units of 200 pixels."""

BOX_PADDING = 1.25
"""Context added around a person box before cropping."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""RGB normalisation the published backbones were trained with."""


def box_to_center_scale(
    boxes_xywh: np.ndarray,
    aspect_ratio: float,
    padding: float = BOX_PADDING,
    pixel_std: float = PIXEL_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """Convert ``[N, 4]`` (x, y, w, h) boxes to centers ``[N, 2]`` and scales ``[N, 2]``.

    The box is grown (never shrunk) along one side to the crop's width/height ratio so that the
    crop is not distorted; ``scale * pixel_std`` is then the padded box size in image pixels.
    """
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    x, y, w, h = boxes.T
    centers = np.stack([x + (w - 1) * 0.5, y + (h - 1) * 0.5], axis=1)
    too_narrow = w < aspect_ratio * h
    fitted_w = np.where(too_narrow, h * aspect_ratio, w)
    fitted_h = np.where(too_narrow, h, w / aspect_ratio)
    scales = np.stack([fitted_w, fitted_h], axis=1) / pixel_std * padding
    return centers, scales


def _rotate(vector: np.ndarray, rotation_rad: float) -> np.ndarray:
    """Rotate a 2-vector counter-clockwise in (x right, y down) array terms by ``rotation_rad``."""
    sin, cos = np.sin(rotation_rad), np.cos(rotation_rad)
    return np.array([vector[0] * cos - vector[1] * sin, vector[0] * sin + vector[1] * cos])


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Point completing a right angle at ``b`` (``a - b`` turned by 90 degrees, added to ``b``)."""
    direction = a - b
    return b + np.array([-direction[1], direction[0]])


def _affine_from_point_pairs(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Exact ``[2, 3]`` affine matrix mapping three ``src`` points onto three ``dst`` points.

    Same system as ``cv2.getAffineTransform`` but solved in float64: OpenCV only accepts float32
    points, whose rounding (about 1e-4 px for image-sized coordinates) would otherwise leak into
    the matrix.
    """
    homogeneous = np.concatenate([src, np.ones((3, 1))], axis=1)  # [3, 3]
    return np.linalg.solve(homogeneous, dst).T


def _output_center(output_size: tuple[int, int]) -> np.ndarray:
    """Centre of an output of (width, height) pixels in pixel-centre coordinates."""
    out_width, out_height = output_size
    return np.array([0.5 * (out_width - 1.0), 0.5 * (out_height - 1.0)])


def _checked_box_widths(box_widths: np.ndarray) -> np.ndarray:
    """Padded box widths in pixels; the convention divides by ``width - 1``, so it must be > 1."""
    if np.any(~np.isfinite(box_widths)) or np.any(box_widths <= 1.0):
        raise ValueError(
            f"crop boxes must be wider than 1 pixel after padding, got {box_widths.min():g}"
        )
    return box_widths


def get_affine_transform(
    center: np.ndarray,
    scale: np.ndarray,
    rotation_deg: float,
    output_size: tuple[int, int],
    inverse: bool = False,
    pixel_std: float = PIXEL_STD,
) -> np.ndarray:
    """Reference ``[2, 3]`` crop transform of one box, built from three point pairs.

    The box center goes to the output center ``((out_w - 1) / 2, (out_h - 1) / 2)``; the point
    ``(box_w - 1) / 2`` above the center (rotated by ``rotation_deg``) goes ``(out_w - 1) / 2``
    above the output center; a third point at a right angle fixes the orientation.
    ``output_size`` is (width, height); only the box width sets the zoom, as in the published
    code. ``inverse=True`` maps output -> image.
    """
    center = np.asarray(center, dtype=np.float64).reshape(2)
    src_width = _checked_box_widths(np.asarray(scale, np.float64).reshape(-1)[:1] * pixel_std)[0]
    dst_width = output_size[0]
    src_up = _rotate(np.array([0.0, -0.5 * (src_width - 1.0)]), np.deg2rad(rotation_deg))
    dst_up = np.array([0.0, -0.5 * (dst_width - 1.0)])

    src = np.zeros((3, 2))
    dst = np.zeros((3, 2))
    src[0] = center
    src[1] = center + src_up
    dst[0] = _output_center(output_size)
    dst[1] = dst[0] + dst_up
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    if inverse:
        return _affine_from_point_pairs(dst, src)
    return _affine_from_point_pairs(src, dst)


def get_affine_transforms(
    centers: np.ndarray,
    scales: np.ndarray,
    rotations: np.ndarray,
    output_size: tuple[int, int],
    inverse: bool = False,
    pixel_std: float = PIXEL_STD,
) -> np.ndarray:
    """Batched ``[N, 2, 3]`` version of :func:`get_affine_transform`, in closed form.

    The three-point construction always yields a similarity: zoom
    ``s = (out_w - 1) / (box_w - 1)`` and a rotation by ``-rotation`` about the box center,
    which lands on the output center. Writing it down directly avoids a linear solve per box.
    """
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    num_boxes = centers.shape[0]
    if num_boxes == 0:
        return np.empty((0, 2, 3))
    box_widths = np.asarray(scales, dtype=np.float64).reshape(num_boxes, -1)[:, 0] * pixel_std
    _checked_box_widths(box_widths)
    rotations_rad = np.deg2rad(np.broadcast_to(np.asarray(rotations, np.float64), (num_boxes,)))
    out_width = output_size[0]
    out_center = _output_center(output_size)
    sin, cos = np.sin(rotations_rad), np.cos(rotations_rad)

    transforms = np.empty((num_boxes, 2, 3))
    if inverse:
        zoom = (box_widths - 1.0) / (out_width - 1.0)
        linear = zoom[:, None, None] * np.stack(
            [np.stack([cos, -sin], 1), np.stack([sin, cos], 1)], 1
        )
        transforms[:, :, :2] = linear
        transforms[:, :, 2] = centers - linear @ out_center
    else:
        zoom = (out_width - 1.0) / (box_widths - 1.0)
        linear = zoom[:, None, None] * np.stack(
            [np.stack([cos, sin], 1), np.stack([-sin, cos], 1)], 1
        )
        transforms[:, :, :2] = linear
        transforms[:, :, 2] = out_center - np.einsum("nij,nj->ni", linear, centers)
    return transforms


def warp_crops(
    image: np.ndarray, transforms: np.ndarray, output_size: tuple[int, int]
) -> np.ndarray:
    """Cut ``N`` crops ``[N, h, w, 3]`` out of one ``[H, W, 3]`` uint8 image.

    Bilinear sampling with a black constant border, as the published test-time pipeline does;
    ``output_size`` is (width, height).
    """
    out_width, out_height = output_size
    transforms = np.asarray(transforms, dtype=np.float64).reshape(-1, 2, 3)
    crops = np.empty(
        (transforms.shape[0], out_height, out_width, image.shape[2]), dtype=image.dtype
    )
    for crop, transform in zip(crops, transforms, strict=True):
        crop[...] = cv2.warpAffine(
            image,
            transform,
            (out_width, out_height),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        ).reshape(crop.shape)
    return crops


def transform_points(points: np.ndarray, transforms: np.ndarray) -> np.ndarray:
    """Apply one ``[2, 3]`` affine transform per person to its ``[J, 2]`` points (batched)."""
    points = np.asarray(points, dtype=np.float64)
    transforms = np.asarray(transforms, dtype=np.float64)
    return np.einsum("nij,nkj->nki", transforms[:, :, :2], points) + transforms[:, None, :, 2]


def normalize_crops(crops: np.ndarray) -> torch.Tensor:
    """uint8 RGB crops ``[N, h, w, 3]`` -> network input ``[N, 3, h, w]`` float32.

    Same arithmetic as torchvision's ToTensor (divide by 255) followed by Normalize, so inputs
    match what the published checkpoints were trained on.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return tensor.sub(mean).div(std).contiguous()
