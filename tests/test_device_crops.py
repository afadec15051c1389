"""Crops cut with an affine sampling grid (the GPU path) equal OpenCV's CPU crops.

Both take the same matrices from model.transforms.get_affine_transforms. Run on the CPU here; on
a GPU the same code runs on the device (bench/gpu.sh).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from omnipose.model.configs import get_config
from omnipose.model.device_crops import crop_on_device, image_to_device, normalize_on_device
from omnipose.model.topdown import TopDownPoseEstimator
from omnipose.model.transforms import (
    BOX_PADDING,
    box_to_center_scale,
    get_affine_transforms,
    normalize_crops,
    warp_crops,
)


def photo(images) -> np.ndarray:
    """bus.jpg as RGB: real edges, texture and flat regions."""
    bgr = cv2.imdecode(np.frombuffer(images.bus, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("rotation", [0.0, 30.0])
@pytest.mark.parametrize("output_size", [(96, 128), (192, 256)])
def test_grid_crops_equal_cv2_crops_within_one_grey_level(
    images, rotation: float, output_size: tuple[int, int]
) -> None:
    image = photo(images)
    height, width = image.shape[:2]
    # persons of many sizes, some partly outside the image (border handling), one tiny (zoom in)
    boxes = np.array(
        [
            [50, 400, 200, 500],
            [220, 380, 120, 470],
            [-60, 300, 180, 420],
            [width - 100, height - 200, 200, 300],
            [300, 500, 20, 30],
            [0, 0, width, height],
        ],
        dtype=np.float64,
    )
    centers, scales = box_to_center_scale(
        boxes, output_size[0] / output_size[1], padding=BOX_PADDING
    )
    affines = get_affine_transforms(centers, scales, np.full(len(boxes), rotation), output_size)
    expected = warp_crops(image, affines, output_size).astype(np.float64)  # [N, h, w, 3]
    got = crop_on_device(image_to_device(image, "cpu"), affines, output_size)
    got = got.permute(0, 2, 3, 1).double().numpy()
    difference = np.abs(got - expected)
    assert got.shape == expected.shape
    within = (difference <= 1.0).mean()
    assert within >= 0.999, f"only {within:.5f} of pixels within 1 grey level"
    assert difference.mean() < 0.25  # what rounding to integers alone gives on average


def test_device_normalisation_matches_the_cpu_one() -> None:
    crops = np.random.default_rng(0).integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    expected = normalize_crops(crops)
    got = normalize_on_device(torch.from_numpy(crops).permute(0, 3, 1, 2).float())
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_estimator_prepares_on_the_device_like_on_the_host(images) -> None:
    config = get_config("coco-w18-128x96")
    estimator = TopDownPoseEstimator(torch.nn.Identity(), config, device="cpu")
    image = photo(images)
    boxes = np.array(images.bus_boxes, dtype=np.float64)
    host = estimator.prepare(image, boxes)
    device = estimator.prepare_on_device(image_to_device(image, estimator.device), boxes)
    np.testing.assert_array_equal(device.centers, host.centers)
    np.testing.assert_array_equal(device.scales, host.scales)
    # one grey level is 1/255/std (about 0.018) in normalised units
    within = ((device.inputs - host.inputs).abs() <= 1.01 / 255 / 0.224).float().mean()
    assert within >= 0.999
