"""Heatmap codec: Gaussian encoding, DARK decoding (vs a per-joint loop), flip-back."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from omnipose.model.codec import (
    _smooth_zero_padded,
    decode_heatmaps,
    encode_gaussian_heatmaps,
    flip_heatmaps_back,
)
from omnipose.model.skeleton import COCO_KEYPOINTS, MPII_KEYPOINTS


def loop_decode(
    heatmaps: np.ndarray, kernel: int = 11, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """The published decoding as a plain loop over persons and joints (facts file, steps 1-4).

    ``dtype`` is the precision the smoothed maps are stored and differentiated in: float32 as
    in the published code, float64 to check the algorithm without float32 rounding.
    """
    maps = np.array(heatmaps, dtype=dtype, copy=True)
    persons, joints, height, width = maps.shape
    coords = np.zeros((persons, joints, 2), dtype)
    confidences = np.zeros((persons, joints), np.float32)
    border = (kernel - 1) // 2
    for n in range(persons):
        for j in range(joints):
            heatmap = maps[n, j]
            flat_index = int(np.argmax(heatmap))
            peak = heatmap.max()
            confidences[n, j] = peak
            if peak <= 0:
                continue
            x, y = flat_index % width, flat_index // width
            padded = np.zeros((height + 2 * border, width + 2 * border))
            padded[border:-border, border:-border] = heatmap
            padded = cv2.GaussianBlur(padded, (kernel, kernel), 0)
            smoothed = padded[border:-border, border:-border].astype(dtype)
            smoothed *= peak / smoothed.max()
            log_map = np.log(np.maximum(smoothed, dtype(1e-10)))
            coords[n, j] = x, y
            if 1 < x < width - 2 and 1 < y < height - 2:
                dx = 0.5 * (log_map[y, x + 1] - log_map[y, x - 1])
                dy = 0.5 * (log_map[y + 1, x] - log_map[y - 1, x])
                dxx = 0.25 * (log_map[y, x + 2] - 2 * log_map[y, x] + log_map[y, x - 2])
                dyy = 0.25 * (log_map[y + 2, x] - 2 * log_map[y, x] + log_map[y - 2, x])
                dxy = 0.25 * (
                    log_map[y + 1, x + 1]
                    - log_map[y - 1, x + 1]
                    - log_map[y + 1, x - 1]
                    + log_map[y - 1, x - 1]
                )
                hessian = np.array([[dxx, dxy], [dxy, dyy]])
                if dxx * dyy - dxy**2 != 0:
                    coords[n, j] -= np.linalg.inv(hessian) @ np.array([dx, dy])
    return coords, confidences


def _multi_peak_heatmaps(
    rng: np.random.Generator, shape: tuple[int, int, int, int], sigma: float
) -> np.ndarray:
    """Network-like outputs: several Gaussians of random height and width plus noise."""
    persons, joints, height, width = shape
    maps = np.zeros(shape, np.float32)
    for _ in range(3):
        centers = np.stack(
            [rng.uniform(-1, width, (persons, joints)), rng.uniform(-1, height, (persons, joints))],
            axis=-1,
        )
        blobs, _ = encode_gaussian_heatmaps(
            centers, np.ones((persons, joints)), (height, width), sigma * rng.uniform(0.7, 1.5)
        )
        maps += blobs * rng.uniform(0.2, 1.0, (persons, joints, 1, 1)).astype(np.float32)
    return maps + rng.normal(0, 0.03, shape).astype(np.float32)


# ---------------------------------------------------------------- encoding


def test_encode_values_are_an_unbiased_gaussian_at_the_subpixel_location() -> None:
    keypoints = np.array([[[10.3, 20.7], [30.5, 40.25]]])
    heatmaps, weights = encode_gaussian_heatmaps(keypoints, np.ones((1, 2)), (64, 48), sigma=2.0)
    assert heatmaps.shape == (1, 2, 64, 48) and heatmaps.dtype == np.float32
    np.testing.assert_array_equal(weights, [[1.0, 1.0]])
    for j, (kx, ky) in enumerate(keypoints[0]):
        for x, y in [(10, 20), (11, 21), (30, 40), (31, 41), (0, 0), (25, 33)]:
            expected = np.exp(-((x - kx) ** 2 + (y - ky) ** 2) / (2 * 2.0**2))
            assert heatmaps[0, j, y, x] == pytest.approx(expected, abs=1e-6)
    # a keypoint exactly on a pixel peaks at exactly 1 there
    on_grid, _ = encode_gaussian_heatmaps(np.array([[[5.0, 7.0]]]), np.ones((1, 1)), (16, 16), 3.0)
    assert on_grid[0, 0, 7, 5] == 1.0 and on_grid.max() == 1.0


def test_encode_zero_weight_for_invisible_and_far_off_map_joints() -> None:
    sigma, height, width = 2.0, 64, 48
    keypoints = np.array(
        [
            [
                [10.0, 10.0],  # visible, on map
                [10.0, 10.0],  # invisible
                [-3 * sigma - 1.5, 10.0],  # window entirely left of the map
                [10.0, height + 3 * sigma + 0.5],  # window entirely below
                [-3 * sigma + 0.5, 10.0],  # off map, but its window reaches column 0
                [width + 3 * sigma - 0.5, 10.0],  # same on the right
            ]
        ]
    )
    visible = np.array([[1, 0, 1, 1, 1, 2]])
    heatmaps, weights = encode_gaussian_heatmaps(keypoints, visible, (height, width), sigma)
    np.testing.assert_array_equal(weights, [[1, 0, 0, 0, 1, 1]])
    assert weights.dtype == np.float32
    assert (heatmaps[0, 1:4] == 0).all()
    assert heatmaps[0, 4, :, 0].max() > 0 and heatmaps[0, 5, :, -1].max() > 0


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("sigma", [2.0, 3.0])
@pytest.mark.parametrize("heatmap_size", [(64, 48), (96, 72)])
def test_encode_then_decode_recovers_subpixel_locations(
    sigma: float, heatmap_size: tuple[int, int]
) -> None:
    height, width = heatmap_size
    # The zero padding of the smoothing step pulls peaks within ~1.5 sigma of a border inward
    # (published behaviour); "near the border" here is just beyond that reach.
    margin = 1.5 * sigma + 1.5
    xs = [
        margin,
        margin + 0.37,
        11.62,
        width / 2 + 0.41,
        width - 1 - margin - 0.21,
        width - 1 - margin,
    ]
    ys = [margin + 0.08, 17.45, height / 2 - 0.29, height - 1 - margin - 0.33, height - 1 - margin]
    keypoints = np.array([[x, y] for x in xs for y in ys]).reshape(2, -1, 2)
    heatmaps, _ = encode_gaussian_heatmaps(
        keypoints, np.ones(keypoints.shape[:2]), heatmap_size, sigma
    )

    coords, confidences = decode_heatmaps(heatmaps)
    assert coords.shape == keypoints.shape and confidences.shape == keypoints.shape[:2]
    np.testing.assert_allclose(coords, keypoints, atol=0.05)
    # the refinement is real: plain argmax is off by up to half a pixel
    argmax_error = np.abs(np.round(keypoints) - keypoints).max()
    assert argmax_error > 0.3
    np.testing.assert_allclose(confidences, heatmaps.max(axis=(2, 3)))


@pytest.mark.parametrize("kernel", [11, 7])
def test_both_smoothing_paths_equal_gaussian_blur_of_a_zero_padded_copy(kernel: int) -> None:
    """CPU float64 uses one stacked OpenCV call; other devices (and float32) use banded
    matrices. Both must equal the published blur of a zero-padded copy."""
    maps = np.random.default_rng(7).random((5, 20, 14))
    border = (kernel - 1) // 2
    expected = np.stack(
        [
            cv2.GaussianBlur(np.pad(m, border), (kernel, kernel), 0)[border:-border, border:-border]
            for m in maps
        ]
    )
    stacked_opencv = _smooth_zero_padded(torch.from_numpy(maps), kernel, torch.float64)
    banded = _smooth_zero_padded(torch.from_numpy(maps), kernel, torch.float32)
    assert banded.dtype == torch.float32
    np.testing.assert_allclose(stacked_opencv.numpy(), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(banded.numpy(), expected, rtol=0, atol=1e-6)


def test_decode_equals_per_joint_loop_on_noisy_multi_peak_heatmaps() -> None:
    rng = np.random.default_rng(0)
    heatmaps = _multi_peak_heatmaps(rng, (6, 17, 64, 48), sigma=2.0)
    coords, confidences = decode_heatmaps(heatmaps)
    expected_coords, expected_conf = loop_decode(heatmaps)
    np.testing.assert_allclose(coords, expected_coords, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(confidences, expected_conf)


def test_decode_equals_per_joint_loop_on_pure_noise() -> None:
    """Random noise: many local maxima, argmaxes anywhere, huge ill-conditioned Newton steps.

    Those steps reach hundreds of pixels, where float32 rounding alone moves them by ~1e-2,
    so the loop runs in float64 here; the algorithm itself must agree to 1e-3.
    """
    rng = np.random.default_rng(1)
    heatmaps = (rng.random((4, 17, 64, 48)) ** 4).astype(np.float32)
    coords, confidences = decode_heatmaps(heatmaps)
    expected_coords, expected_conf = loop_decode(heatmaps, dtype=np.float64)
    np.testing.assert_allclose(coords, expected_coords, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(confidences, expected_conf)


@pytest.mark.parametrize("sigma", [2.0, 3.0])
def test_decode_equals_per_joint_loop_on_gaussians_with_maxima_on_the_border(sigma: float) -> None:
    height, width = 96, 72
    near_edges = [-0.7, 0.0, 0.4, 1.0, 1.6, 2.0, 2.2]
    xs = [*near_edges, width - 3.0, width - 2.0, width - 1.0, width - 0.4]
    ys = [*near_edges, height - 3.0, height - 2.0, height - 1.0, height - 0.4]
    points = [(x, 40.2) for x in xs] + [(30.3, y) for y in ys] + [(0.0, 0.0), (width - 1, 5.3)]
    keypoints = np.array(points)[None]
    rng = np.random.default_rng(2)
    heatmaps, _ = encode_gaussian_heatmaps(
        keypoints, np.ones(keypoints.shape[:2]), (height, width), sigma
    )
    heatmaps = heatmaps + rng.normal(0, 0.01, heatmaps.shape).astype(np.float32)
    coords, _ = decode_heatmaps(heatmaps)
    expected_coords, _ = loop_decode(heatmaps)
    np.testing.assert_allclose(coords, expected_coords, rtol=0, atol=1e-3)
    # some maxima sit on the outermost rows/columns, where no refinement is allowed
    on_edge = (expected_coords == 0) | (expected_coords == width - 1)
    assert on_edge.any()


def test_decode_non_positive_maps_give_zero_coordinates_and_their_max_as_confidence() -> None:
    heatmaps = np.zeros((2, 3, 32, 24), np.float32)
    heatmaps[0, 0] = -0.5
    heatmaps[0, 0, 10, 7] = -0.1  # negative maximum away from the origin
    heatmaps[0, 2], _ = encode_gaussian_heatmaps(
        np.array([[[12.3, 15.6]]]), np.ones((1, 1)), (32, 24)
    )
    heatmaps[1, 1, 5, 5] = 1e-3  # tiny but positive: decoded
    coords, confidences = decode_heatmaps(heatmaps)

    assert np.isfinite(coords).all() and np.isfinite(confidences).all()
    np.testing.assert_array_equal(coords[0, 0], [0, 0])
    np.testing.assert_array_equal(coords[0, 1], [0, 0])
    np.testing.assert_array_equal(coords[1, 0], [0, 0])
    np.testing.assert_allclose(confidences[0, :2], [-0.1, 0.0], atol=1e-7)
    np.testing.assert_allclose(coords[0, 2], [12.3, 15.6], atol=0.05)
    np.testing.assert_allclose(coords[1, 1], [5, 5], atol=1e-3)


def test_decode_rescales_smoothed_maps_before_the_log_floor() -> None:
    """A faint peak (1.8e-10) stays above the 1e-10 floor only if smoothing keeps its maximum."""
    keypoints = np.array([[[20.3, 30.2]]])
    unit, _ = encode_gaussian_heatmaps(keypoints, np.ones((1, 1)), (64, 48), sigma=2.0)
    faint = unit * np.float32(1.8e-10)
    coords, confidences = decode_heatmaps(faint)
    np.testing.assert_allclose(coords, keypoints, atol=0.05)
    np.testing.assert_allclose(coords, loop_decode(faint)[0], atol=1e-3)
    assert confidences[0, 0] == faint.max() > 1.7e-10


def test_decode_keeps_the_integer_argmax_where_the_hessian_is_singular() -> None:
    """A peak below the log floor leaves a flat log map: zero Hessian, no Newton step."""
    heatmaps = np.zeros((1, 2, 64, 48), np.float32)
    heatmaps[0, 0, 30, 20] = 5e-11
    heatmaps[0, 1, 12, 7] = 1.0  # a normal peak beside it, which is refined
    coords, confidences = decode_heatmaps(heatmaps)
    assert np.isfinite(coords).all()
    np.testing.assert_array_equal(coords[0, 0], [20, 30])
    np.testing.assert_allclose(coords[0, 1], [7, 12], atol=1e-3)
    np.testing.assert_allclose(coords, loop_decode(heatmaps)[0], atol=1e-3)
    assert confidences[0, 0] == np.float32(5e-11)


def test_decode_ties_take_the_first_maximum_like_numpy() -> None:
    heatmaps = np.full((1, 2, 16, 16), 0.25, np.float32)
    heatmaps[0, 1, 8, 3] = heatmaps[0, 1, 8, 9] = heatmaps[0, 1, 12, 1] = 0.5
    coords, confidences = decode_heatmaps(heatmaps)
    expected_coords, _ = loop_decode(heatmaps)
    np.testing.assert_allclose(coords, expected_coords, atol=1e-3)
    np.testing.assert_array_equal(coords[0, 0], [0, 0])  # plateau: first pixel, on the edge
    assert abs(coords[0, 1, 0] - 3) < 1 and abs(coords[0, 1, 1] - 8) < 1
    np.testing.assert_array_equal(confidences, [[0.25, 0.5]])


def test_decode_torch_and_numpy_inputs_agree() -> None:
    heatmaps = _multi_peak_heatmaps(np.random.default_rng(3), (3, 16, 64, 64), sigma=2.0)
    from_numpy = decode_heatmaps(heatmaps)
    from_torch = decode_heatmaps(torch.from_numpy(heatmaps))
    from_float64 = decode_heatmaps(heatmaps.astype(np.float64))
    from_bfloat16_upcast = decode_heatmaps(torch.from_numpy(heatmaps).to(torch.bfloat16).float())
    from_bfloat16 = decode_heatmaps(torch.from_numpy(heatmaps).to(torch.bfloat16))
    np.testing.assert_allclose(from_bfloat16[0], from_bfloat16_upcast[0], atol=1e-5)
    for result in (from_torch, from_float64):
        assert isinstance(result[0], np.ndarray) and isinstance(result[1], np.ndarray)
        np.testing.assert_allclose(result[0], from_numpy[0], atol=1e-5)
        np.testing.assert_allclose(result[1], from_numpy[1], atol=1e-7)


def test_decode_blur_kernel_is_a_parameter() -> None:
    heatmaps = _multi_peak_heatmaps(np.random.default_rng(4), (2, 5, 64, 48), sigma=3.0)
    coords, _ = decode_heatmaps(heatmaps, blur_kernel=7)
    expected, _ = loop_decode(heatmaps, kernel=7)
    np.testing.assert_allclose(coords, expected, atol=1e-3)


def test_decode_empty_batch() -> None:
    coords, confidences = decode_heatmaps(torch.zeros(0, 17, 64, 48))
    assert coords.shape == (0, 17, 2) and confidences.shape == (0, 17)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_on_cuda_matches_cpu() -> None:
    heatmaps = torch.from_numpy(
        _multi_peak_heatmaps(np.random.default_rng(5), (4, 17, 96, 72), 3.0)
    )
    cpu = decode_heatmaps(heatmaps)
    cuda = decode_heatmaps(heatmaps.cuda())
    np.testing.assert_allclose(cuda[0], cpu[0], atol=1e-4)
    np.testing.assert_array_equal(cuda[1], cpu[1])


# ---------------------------------------------------------------- flip test


def _mirror(keypoints: np.ndarray, width: int, flip_index: np.ndarray) -> np.ndarray:
    """Keypoints as seen in the horizontally flipped map: x -> w-1-x, left/right swapped."""
    mirrored = keypoints.copy()
    mirrored[..., 0] = width - 1 - mirrored[..., 0]
    return mirrored[:, flip_index]


@pytest.mark.parametrize("spec", [COCO_KEYPOINTS, MPII_KEYPOINTS], ids=lambda s: s.dataset)
def test_flip_back_of_flipped_crop_heatmaps_equals_plain_heatmaps(spec) -> None:
    height, width = 64, 48
    rng = np.random.default_rng(6)
    keypoints = np.stack(
        [
            rng.uniform(4, width - 5, (2, spec.num_joints)),
            rng.uniform(4, height - 5, (2, spec.num_joints)),
        ],
        axis=-1,
    )
    visible = np.ones((2, spec.num_joints))
    plain, _ = encode_gaussian_heatmaps(keypoints, visible, (height, width))
    flipped_crop, _ = encode_gaussian_heatmaps(
        _mirror(keypoints, width, spec.flip_index()), visible, (height, width)
    )
    restored = flip_heatmaps_back(torch.from_numpy(flipped_crop), spec.flip_index())
    torch.testing.assert_close(restored, torch.from_numpy(plain), rtol=0, atol=1e-6)


def test_symmetric_pose_heatmaps_are_their_own_flip() -> None:
    """A left-right symmetric pose centred in the crop looks the same flipped; needs both the
    mirroring and the channel swap to come out equal."""
    height, width = 64, 48
    flip_index = COCO_KEYPOINTS.flip_index()
    center_x = (width - 1) / 2
    keypoints = np.zeros((1, 17, 2))
    keypoints[0, 0] = [center_x, 8.3]  # nose on the axis
    for row, (left, right) in enumerate(COCO_KEYPOINTS.flip_pairs):
        offset = 3.0 + 1.7 * row
        keypoints[0, left] = [center_x + offset, 10.0 + 6.1 * row]
        keypoints[0, right] = [center_x - offset, 10.0 + 6.1 * row]
    np.testing.assert_allclose(_mirror(keypoints, width, flip_index), keypoints)
    heatmaps, _ = encode_gaussian_heatmaps(keypoints, np.ones((1, 17)), (height, width))
    heatmaps = torch.from_numpy(heatmaps)

    torch.testing.assert_close(
        flip_heatmaps_back(heatmaps, flip_index), heatmaps, rtol=0, atol=1e-6
    )
    # neither half of the operation alone is enough
    assert not torch.allclose(heatmaps.flip(-1), heatmaps, atol=1e-3)
    assert not torch.allclose(heatmaps[:, flip_index], heatmaps, atol=1e-3)


def test_double_flip_is_identity_and_shift_moves_one_pixel_right() -> None:
    heatmaps = torch.rand(2, 17, 16, 12)
    flip_index = COCO_KEYPOINTS.flip_index()
    once = flip_heatmaps_back(heatmaps, flip_index)
    assert not torch.equal(once, heatmaps)
    torch.testing.assert_close(flip_heatmaps_back(once, list(flip_index)), heatmaps, rtol=0, atol=0)

    shifted = flip_heatmaps_back(heatmaps, flip_index, shift=True)
    assert shifted.shape == heatmaps.shape
    torch.testing.assert_close(shifted[..., 1:], once[..., :-1], rtol=0, atol=0)
    torch.testing.assert_close(shifted[..., 0], once[..., 0], rtol=0, atol=0)

    peak, _ = encode_gaussian_heatmaps(np.array([[[20.0, 30.0]]]), np.ones((1, 1)), (64, 48))
    decoded_plain, _ = decode_heatmaps(flip_heatmaps_back(torch.from_numpy(peak), [0]))
    decoded_shifted, _ = decode_heatmaps(
        flip_heatmaps_back(torch.from_numpy(peak), [0], shift=True)
    )
    np.testing.assert_allclose(decoded_plain[0, 0], [47 - 20.0, 30.0], atol=0.05)
    np.testing.assert_allclose(decoded_shifted[0, 0], [48 - 20.0, 30.0], atol=0.05)
