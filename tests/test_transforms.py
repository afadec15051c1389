"""Crop geometry: box fitting, affine transforms (reference vs closed form), warping, points."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision import transforms as tv_transforms

from omnipose.model.configs import get_config
from omnipose.model.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PIXEL_STD,
    box_to_center_scale,
    get_affine_transform,
    get_affine_transforms,
    normalize_crops,
    transform_points,
    warp_crops,
)

GOLDEN_PATH = Path(__file__).parent / "data" / "reference" / "crop_transforms_golden.json"
"""Crop matrices computed by the published OmniPose code (a copy of ../shared/reference)."""
INPUT_SIZE_WH = (192, 256)  # coco 256x192 network input, (width, height)
HEATMAP_SIZE_WH = (48, 64)


def test_box_to_center_scale_fits_wide_and_tall_boxes_to_the_aspect_ratio() -> None:
    aspect_ratio = get_config("coco-w48-256x192").aspect_ratio  # 0.75
    boxes = np.array(
        [
            [10.0, 20.0, 300.0, 100.0],  # wide: height grows to 400
            [50.0, 60.0, 40.0, 400.0],  # tall: width grows to 300
            [0.0, 0.0, 150.0, 200.0],  # already 3:4, unchanged
        ]
    )
    centers, scales = box_to_center_scale(boxes, aspect_ratio)

    np.testing.assert_allclose(centers, [[159.5, 69.5], [69.5, 259.5], [74.5, 99.5]])
    np.testing.assert_allclose(scales[:, 0] / scales[:, 1], aspect_ratio)
    expected_sizes = np.array([[300.0, 400.0], [300.0, 400.0], [150.0, 200.0]]) * 1.25
    np.testing.assert_allclose(scales * PIXEL_STD, expected_sizes)


def test_box_to_center_scale_padding_and_pixel_std_are_parameters() -> None:
    _, scales = box_to_center_scale(np.array([[0.0, 0.0, 100.0, 100.0]]), 1.0, 1.0, 100.0)
    np.testing.assert_allclose(scales, [[1.0, 1.0]])


def _random_boxes(rng: np.random.Generator, count: int) -> tuple[np.ndarray, ...]:
    centers = rng.uniform(0, 1500, (count, 2))
    scales = rng.uniform(0.2, 4.0, (count, 1)) * np.array([[0.75, 1.0]])
    rotations = rng.uniform(-180, 180, count)
    return centers, scales, rotations


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("output_size", [INPUT_SIZE_WH, HEATMAP_SIZE_WH, (256, 256)])
def test_closed_form_equals_three_point_construction(
    inverse: bool, output_size: tuple[int, int]
) -> None:
    centers, scales, rotations = _random_boxes(np.random.default_rng(0), 50)
    rotations[:4] = [0.0, 90.0, -45.0, 180.0]
    batched = get_affine_transforms(centers, scales, rotations, output_size, inverse=inverse)
    assert batched.shape == (50, 2, 3)
    for i in range(50):
        single = get_affine_transform(centers[i], scales[i], rotations[i], output_size, inverse)
        np.testing.assert_allclose(batched[i], single, rtol=0, atol=1e-6)


def test_three_point_construction_matches_opencv_on_float32_points() -> None:
    """The published code solves the same three point pairs with cv2 on float32 points."""
    center, width, rotation = np.array([412.3, 287.9]), 333.0, 30.0
    angle = np.deg2rad(rotation)
    up = 0.5 * (width - 1) * np.array([np.sin(angle), -np.cos(angle)])  # turned by angle
    src = np.array([center, center + up, center + up + np.array([up[1], -up[0]])])
    out_w, out_h = INPUT_SIZE_WH
    mid = np.array([(out_w - 1) / 2, (out_h - 1) / 2])
    dst = np.array([mid, mid - [0, (out_w - 1) / 2], [0, 0]])
    dst[2] = dst[1] + [dst[1, 1] - dst[0, 1], dst[0, 0] - dst[1, 0]]
    opencv = cv2.getAffineTransform(src.astype(np.float32), dst.astype(np.float32))

    ours = get_affine_transform(
        center, np.array([width, 1.0]) / PIXEL_STD, rotation, (out_w, out_h)
    )
    probe = np.array([[[0.0, 0.0], [412.0, 288.0], [800.0, 600.0]]])
    mapped_ours = transform_points(probe, ours[None])
    mapped_cv = transform_points(probe, opencv[None])
    np.testing.assert_allclose(mapped_ours, mapped_cv, atol=1e-3)


GOLDEN_CASES = json.loads(GOLDEN_PATH.read_text())["cases"]


@pytest.mark.parametrize(
    "case",
    GOLDEN_CASES,
    ids=[f"{c['box_xywh']}-{c['output_wh']}-{c['rotation_deg']:g}" for c in GOLDEN_CASES],
)
def test_transforms_equal_the_published_pipeline(case: dict) -> None:
    """Every golden case: center/scale, forward and inverse, batched and single-box, to 1e-3."""
    output_wh = tuple(case["output_wh"])
    centers, scales = box_to_center_scale(
        np.array([case["box_xywh"]]), output_wh[0] / output_wh[1]
    )
    np.testing.assert_allclose(centers[0], case["center"], rtol=0, atol=1e-3)
    np.testing.assert_allclose(scales[0], case["scale"], rtol=0, atol=1e-3)
    rotations = np.array([case["rotation_deg"]])
    for inverse, key in ((False, "forward"), (True, "inverse")):
        batched = get_affine_transforms(centers, scales, rotations, output_wh, inverse=inverse)
        single = get_affine_transform(centers[0], scales[0], rotations[0], output_wh, inverse)
        np.testing.assert_allclose(batched[0], case[key], rtol=0, atol=1e-3, err_msg=key)
        np.testing.assert_allclose(single, case[key], rtol=0, atol=1e-3, err_msg=key)


def test_golden_data_covers_inputs_heatmaps_and_rotations() -> None:
    """The comparison above is only as strong as its cases: keep them varied."""
    assert len(GOLDEN_CASES) == 120
    assert {tuple(c["output_wh"]) for c in GOLDEN_CASES} >= {(288, 384), (72, 96), (48, 64)}
    assert {c["rotation_deg"] for c in GOLDEN_CASES} == {0.0, 30.0, -45.0}


def test_box_border_pixel_centres_go_to_output_border_pixel_centres() -> None:
    center, scale = np.array([[300.0, 200.0]]), np.array([[1.5, 2.0]])  # 300 x 400 px box
    transform = get_affine_transforms(center, scale, np.array([0.0]), INPUT_SIZE_WH)
    # the box spans pixel centres 150.5 .. 449.5 around x = 300; the output 0 .. 191
    points = np.array([[[150.5, 200.0], [449.5, 200.0], [300.0, 200.0]]])
    expected = np.array([[[0.0, 127.5], [191.0, 127.5], [95.5, 127.5]]])
    np.testing.assert_allclose(transform_points(points, transform), expected, atol=1e-9)


def test_heatmap_transform_is_built_for_the_heatmap_size_not_divided_by_stride() -> None:
    """With pixel-centre sizes, input / 4 would be off by 3/8 px; the heatmap one is its own."""
    centers, scales, rotations = _random_boxes(np.random.default_rng(1), 10)
    to_input = get_affine_transforms(centers, scales, rotations, INPUT_SIZE_WH)
    to_heatmap = get_affine_transforms(centers, scales, rotations, HEATMAP_SIZE_WH)
    ratio = (HEATMAP_SIZE_WH[0] - 1) / (INPUT_SIZE_WH[0] - 1)
    np.testing.assert_allclose(to_heatmap[:, :, :2], to_input[:, :, :2] * ratio, rtol=1e-9)
    assert not np.allclose(to_heatmap, to_input / 4, atol=1e-2)


@pytest.mark.parametrize("output_size", [INPUT_SIZE_WH, HEATMAP_SIZE_WH, (257, 255)])
def test_flip_about_the_output_centre_is_exact(output_size: tuple[int, int]) -> None:
    """Mirroring the image (x -> W - 1 - x, centre too) mirrors the crop exactly, no shift."""
    rng = np.random.default_rng(5)
    # smooth content: OpenCV quantises sampling positions to 1/32 px, which white noise would
    # turn into large grey-level differences even for an exact geometric mirror
    noise = rng.uniform(0, 255, (300, 400, 3)).astype(np.float32)
    image = cv2.GaussianBlur(noise, (0, 0), 4).clip(0, 255).astype(np.uint8)
    image_width = image.shape[1]
    boxes = np.array([[40.3, 20.8, 150.2, 230.6], [210.0, 50.0, 120.0, 160.0]])
    centers, scales = box_to_center_scale(boxes, output_size[0] / output_size[1])
    mirrored_centers = centers.copy()
    mirrored_centers[:, 0] = image_width - 1 - centers[:, 0]

    plain = get_affine_transforms(centers, scales, np.zeros(2), output_size)
    mirrored = get_affine_transforms(mirrored_centers, scales, np.zeros(2), output_size)
    points = rng.uniform(0, 300, (2, 17, 2))
    mirrored_points = points.copy()
    mirrored_points[..., 0] = image_width - 1 - points[..., 0]
    in_plain = transform_points(points, plain)
    in_mirrored = transform_points(mirrored_points, mirrored)
    np.testing.assert_allclose(
        in_mirrored[..., 0], output_size[0] - 1 - in_plain[..., 0], atol=1e-9
    )
    np.testing.assert_allclose(in_mirrored[..., 1], in_plain[..., 1], atol=1e-9)

    # the pixels agree too: the crop of the mirrored image is the mirrored crop
    crops = warp_crops(image, plain, output_size)
    crops_of_mirror = warp_crops(np.ascontiguousarray(image[:, ::-1]), mirrored, output_size)
    difference = np.abs(crops_of_mirror.astype(int) - crops[:, :, ::-1].astype(int))
    assert (difference <= 1).mean() > 0.999


def test_boxes_of_at_most_one_pixel_are_refused() -> None:
    with pytest.raises(ValueError, match="wider than 1 pixel"):
        get_affine_transforms(np.zeros((1, 2)), np.array([[0.004, 0.005]]), np.zeros(1), (48, 64))
    empty = get_affine_transforms(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), (48, 64))
    assert empty.shape == (0, 2, 3)


@pytest.mark.parametrize("rotation", [0.0, 30.0, -45.0, 120.0])
@pytest.mark.parametrize("scale_factor", [0.35, 1.0, 2.7])
def test_points_round_trip_through_heatmap_space(rotation: float, scale_factor: float) -> None:
    rng = np.random.default_rng(2)
    boxes = np.array([[100.0, 80.0, 220.0, 410.0], [600.0, 30.0, 500.0, 180.0]])
    centers, scales = box_to_center_scale(boxes, 0.75)
    scales = scales * scale_factor
    rotations = np.full(2, rotation)
    points = centers[:, None, :] + rng.uniform(-150, 150, (2, 17, 2))

    to_heatmap = get_affine_transforms(centers, scales, rotations, HEATMAP_SIZE_WH)
    to_image = get_affine_transforms(centers, scales, rotations, HEATMAP_SIZE_WH, inverse=True)
    in_heatmap = transform_points(points, to_heatmap)
    back = transform_points(in_heatmap, to_image)
    np.testing.assert_allclose(back, points, atol=0.1)
    # the round trip is not vacuous: heatmap coordinates differ from image ones
    assert np.abs(in_heatmap - points).max() > 10
    # distances shrink by exactly heatmap width / box width (a similarity)
    zoom = (HEATMAP_SIZE_WH[0] - 1) / (scales[:, 0] * PIXEL_STD - 1)
    image_dist = np.linalg.norm(points[:, 0] - points[:, 1], axis=1)
    heatmap_dist = np.linalg.norm(in_heatmap[:, 0] - in_heatmap[:, 1], axis=1)
    np.testing.assert_allclose(heatmap_dist, image_dist * zoom, rtol=1e-9)


@pytest.mark.parametrize("rotation", [0.0, 30.0, -45.0])
def test_bright_dot_lands_where_transform_points_predicts(rotation: float) -> None:
    image = np.zeros((480, 640, 3), np.uint8)
    dots = np.array([[250.0, 180.0], [330.0, 300.0]])
    for x, y in dots.astype(int):
        image[y - 1 : y + 2, x - 1 : x + 2] = 255  # 3x3 block centred on the dot
    centers, scales = box_to_center_scale(np.array([[200.0, 100.0, 200.0, 300.0]]), 0.75)
    transforms = get_affine_transforms(centers, scales, np.array([rotation]), INPUT_SIZE_WH)

    crops = warp_crops(image, transforms, INPUT_SIZE_WH)
    assert crops.shape == (1, 256, 192, 3) and crops.dtype == np.uint8
    predicted = transform_points(dots[None], transforms)[0]
    intensity = crops[0, :, :, 0].astype(np.float64)
    ys, xs = np.mgrid[: intensity.shape[0], : intensity.shape[1]]
    for px, py in predicted:
        near = (np.abs(xs - px) < 8) & (np.abs(ys - py) < 8)
        weights = intensity * near
        assert weights.sum() > 0, "dot missing from the crop"
        centroid = np.array([(weights * xs).sum(), (weights * ys).sum()]) / weights.sum()
        np.testing.assert_allclose(centroid, [px, py], atol=1.0)
    # nothing bright away from the predicted dots
    far = np.ones_like(intensity, bool)
    for px, py in predicted:
        far &= (np.abs(xs - px) >= 8) | (np.abs(ys - py) >= 8)
    assert intensity[far].max() == 0


def test_warp_crops_fills_outside_of_image_with_black() -> None:
    image = np.full((100, 100, 3), 200, np.uint8)
    centers, scales = np.array([[0.0, 0.0], [50.0, 50.0]]), np.array([[1.0, 1.0], [0.4, 0.4]])
    transforms = get_affine_transforms(centers, scales, np.zeros(2), (64, 64))
    crops = warp_crops(image, transforms, (64, 64))
    assert crops.shape == (2, 64, 64, 3)
    assert crops[0, :20, :20].max() == 0  # up-left of the image corner
    # the last output pixel lands half a pixel beyond the image's last pixel centre
    assert crops[0, 40:62, 40:62].min() == 200
    assert (crops[1] == 200).all()  # box fully inside


def test_warp_crops_matches_individual_opencv_calls() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    centers, scales, rotations = _random_boxes(rng, 3)
    centers = centers / 10
    transforms = get_affine_transforms(centers, scales * 0.3, rotations, (48, 64))
    crops = warp_crops(image, transforms, (48, 64))
    for crop, transform in zip(crops, transforms, strict=True):
        np.testing.assert_array_equal(crop, cv2.warpAffine(image, transform, (48, 64)))


def test_transform_points_is_batched_per_person() -> None:
    transforms = np.array(
        [[[1.0, 0.0, 5.0], [0.0, 1.0, -2.0]], [[0.0, -2.0, 0.0], [2.0, 0.0, 1.0]]]
    )
    points = np.array([[[1.0, 1.0], [0.0, 3.0]], [[1.0, 1.0], [0.0, 3.0]]])
    expected = np.array([[[6.0, -1.0], [5.0, 1.0]], [[-2.0, 3.0], [-6.0, 1.0]]])
    np.testing.assert_allclose(transform_points(points, transforms), expected)


def test_normalize_crops_matches_torchvision_to_tensor_and_normalize() -> None:
    rng = np.random.default_rng(4)
    crops = rng.integers(0, 256, (3, 16, 12, 3), dtype=np.uint8)
    reference_pipeline = tv_transforms.Compose(
        [tv_transforms.ToTensor(), tv_transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    expected = torch.stack([reference_pipeline(crop) for crop in crops])
    normalized = normalize_crops(crops)
    assert normalized.shape == (3, 3, 16, 12) and normalized.dtype == torch.float32
    torch.testing.assert_close(normalized, expected, rtol=0, atol=1e-6)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
