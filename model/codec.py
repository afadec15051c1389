"""Heatmap codec: Gaussian targets for training, DARK decoding and flip-test support.

Keypoints are in heatmap coordinates: (x, y) with pixel centers at integers, so a keypoint at
(3.0, 5.0) peaks exactly on ``heatmap[5, 3]``. Mapping to image coordinates is the caller's job
(the inverse crop transform built for the heatmap size, see :mod:`omnipose.model.transforms`).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

LOG_FLOOR = 1e-10
"""Smallest smoothed heatmap value before the log: keeps log finite on empty areas."""

DEFAULT_BLUR_KERNEL = 11


def encode_gaussian_heatmaps(
    keypoints: np.ndarray,
    visible: np.ndarray,
    heatmap_size: tuple[int, int],
    sigma: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased Gaussian targets ``[N, J, h, w]`` and target weights ``[N, J]``.

    Each Gaussian is centred on the exact sub-pixel keypoint (no rounding to the grid, which
    would bias the decoded location) with value 1 at that point. A joint gets weight 0 and an
    all-zero map when it is not visible or when its 3-sigma window, HRNet's half-open
    ``[mu - 3 sigma, mu + 3 sigma + 1)`` per axis, misses the map. The Gaussian is separable,
    so it is built as an outer product of two 1-D Gaussians.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    height, width = heatmap_size
    mu_x, mu_y = keypoints[..., 0], keypoints[..., 1]
    radius = 3.0 * sigma
    on_map = (
        (mu_x + radius + 1 > 0)
        & (mu_y + radius + 1 > 0)
        & (mu_x - radius < width)
        & (mu_y - radius < height)
    )
    weights = ((np.asarray(visible) > 0) & on_map).astype(np.float32)

    xs = np.arange(width, dtype=np.float64)
    ys = np.arange(height, dtype=np.float64)
    gauss_x = np.exp(-((xs - mu_x[..., None]) ** 2) / (2 * sigma**2))  # [N, J, w]
    gauss_y = np.exp(-((ys - mu_y[..., None]) ** 2) / (2 * sigma**2))  # [N, J, h]
    heatmaps = gauss_y[..., :, None] * gauss_x[..., None, :] * weights[..., None, None]
    return heatmaps.astype(np.float32), weights


def _gaussian_kernel_1d(kernel_size: int) -> np.ndarray:
    """OpenCV's 1-D Gaussian for ``sigma=0`` (sigma derived from the size), float64."""
    return cv2.getGaussianKernel(kernel_size, 0, cv2.CV_64F).reshape(-1)


def _banded_blur_matrix(size: int, kernel: torch.Tensor) -> torch.Tensor:
    """``[size, size]`` matrix applying the 1-D ``kernel`` with zeros beyond both ends."""
    radius = (kernel.numel() - 1) // 2
    positions = torch.arange(size, device=kernel.device)
    offset = positions[None, :] - positions[:, None] + radius  # column - row + radius
    inside = (offset >= 0) & (offset < kernel.numel())
    return torch.where(inside, kernel[offset.clamp(0, kernel.numel() - 1)], 0.0)


def _smooth_zero_padded(
    maps: torch.Tensor, kernel_size: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Gaussian blur of ``[M, h, w]`` maps with zeros outside the map, computed in ``dtype``.

    Equal to padding with zeros, ``cv2.GaussianBlur(kxk, sigma 0)`` and cropping the padding
    away: the padding is as wide as the kernel radius, so OpenCV's own border rule never
    reaches the kept area. The kernel is separable and the padding is zeros, so on CPU all maps
    are stacked, with ``radius`` zero rows between them, into one image for a single OpenCV
    call (float64 convolutions in torch are slow on CPU); elsewhere the blur is
    ``B_h @ map @ B_w^T`` with banded matrices, one batched matmul on the maps' device.
    """
    kernel_np = _gaussian_kernel_1d(kernel_size)
    if maps.device.type == "cpu" and dtype == torch.float64:
        radius = (kernel_size - 1) // 2
        num_maps, height, width = maps.shape
        stacked = np.zeros((num_maps, height + radius, width), np.float64)
        stacked[:, :height] = maps.numpy()  # converts to float64 while copying
        blurred = cv2.sepFilter2D(
            stacked.reshape(-1, width), -1, kernel_np, kernel_np, borderType=cv2.BORDER_CONSTANT
        )
        return torch.from_numpy(blurred.reshape(num_maps, height + radius, width)[:, :height])
    maps = maps.to(dtype)
    kernel = torch.as_tensor(kernel_np, dtype=dtype, device=maps.device)
    rows = _banded_blur_matrix(maps.shape[-2], kernel)
    cols = _banded_blur_matrix(maps.shape[-1], kernel)
    return rows @ maps @ cols.T


# Stencil offsets (dx, dy) needed for the derivatives at the argmax, in a fixed order.
_STENCIL = (
    (0, 0), (1, 0), (-1, 0), (2, 0), (-2, 0), (0, 1), (0, -1), (0, 2), (0, -2),
    (1, 1), (-1, 1), (1, -1), (-1, -1),
)  # fmt: skip


def decode_heatmaps(
    heatmaps: torch.Tensor | np.ndarray, blur_kernel: int = DEFAULT_BLUR_KERNEL
) -> tuple[np.ndarray, np.ndarray]:
    """DARK-decode ``[N, J, h, w]`` heatmaps -> (x, y) ``[N, J, 2]``, confidences ``[N, J]``.

    Integer argmax, refined by one Newton step on the log of the Gaussian-smoothed heatmap
    (the heatmap modulation of the published OmniPose/DARK code), for all persons and joints at
    once. Torch inputs are decoded on their own device; results come back as float32 numpy.
    Coordinates are zero where the heatmap maximum is not positive. As published, the zero
    padding of the smoothing pulls peaks within about 1.5 sigma + 1 px of a border inward.
    """
    maps = torch.as_tensor(heatmaps)
    num_persons, num_joints, height, width = maps.shape
    # The Newton step is ill-conditioned on flat or noisy maps, where float32 rounding alone
    # moves it by 1e-2 px or more: compute in float64 (MPS has none).
    compute_dtype = torch.float32 if maps.device.type == "mps" else torch.float64
    maps = maps.detach().reshape(num_persons * num_joints, height, width)
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.to(compute_dtype)
    num_maps = maps.shape[0]
    if num_maps == 0 or height * width == 0:
        return (
            np.zeros((num_persons, num_joints, 2), np.float32),
            np.zeros((num_persons, num_joints), np.float32),
        )

    # 1. integer argmax (first maximum in row-major order) and confidence.
    flat_maps = maps.reshape(num_maps, -1)
    max_values = flat_maps.amax(dim=1)
    flat_index = flat_maps.argmax(dim=1)  # first maximum on ties, like numpy
    max_values = max_values.to(compute_dtype)
    ix = flat_index % width
    iy = torch.div(flat_index, width, rounding_mode="floor")
    found = max_values > 0

    # 2. smooth, then restore each map's original maximum; 3. log with a floor. Both are
    # pointwise, so they are applied to the stencil samples only.
    smoothed = _smooth_zero_padded(maps, blur_kernel, compute_dtype).reshape(num_maps, -1)
    smoothed_max = smoothed.amax(dim=1)
    ratio = torch.where(smoothed_max != 0, max_values / smoothed_max, torch.ones_like(max_values))

    # 4. derivatives at the argmax; Newton step where the stencil fits and H is invertible.
    interior = found & (ix > 1) & (ix < width - 2) & (iy > 1) & (iy < height - 2)
    offsets = torch.tensor(_STENCIL, device=maps.device)
    sample_x = (ix[:, None] + offsets[:, 0]).clamp(0, width - 1)
    sample_y = (iy[:, None] + offsets[:, 1]).clamp(0, height - 1)
    samples = smoothed.gather(1, sample_y * width + sample_x) * ratio[:, None]
    samples = torch.log(torch.clamp(samples, min=LOG_FLOOR))
    center, xp1, xm1, xp2, xm2, yp1, ym1, yp2, ym2, pp, mp, pm, mm = samples.unbind(dim=1)
    dx = 0.5 * (xp1 - xm1)
    dy = 0.5 * (yp1 - ym1)
    dxx = 0.25 * (xp2 - 2 * center + xm2)
    dyy = 0.25 * (yp2 - 2 * center + ym2)
    dxy = 0.25 * (pp - pm - mp + mm)
    det = dxx * dyy - dxy * dxy
    refine = interior & (det != 0)
    safe_det = torch.where(refine, det, torch.ones_like(det))
    step_x = -(dyy * dx - dxy * dy) / safe_det
    step_y = -(dxx * dy - dxy * dx) / safe_det
    x = ix.to(compute_dtype) + torch.where(refine, step_x, torch.zeros_like(step_x))
    y = iy.to(compute_dtype) + torch.where(refine, step_y, torch.zeros_like(step_y))

    coords = torch.stack([x, y], dim=1)
    coords = torch.where(found[:, None], coords, torch.zeros_like(coords))
    coords_np = coords.reshape(num_persons, num_joints, 2).cpu().numpy().astype(np.float32)
    conf_np = max_values.reshape(num_persons, num_joints).cpu().numpy().astype(np.float32)
    return coords_np, conf_np


def flip_heatmaps_back(
    heatmaps: torch.Tensor, flip_index: Sequence[int] | np.ndarray, shift: bool = False
) -> torch.Tensor:
    """Turn heatmaps of a horizontally flipped crop into heatmaps of the plain crop.

    Mirrors along the width and swaps left/right joint channels (``flip_index[j]`` is the joint
    that ``j`` becomes under mirroring). ``shift=True`` moves the result one pixel right, HRNet's
    correction for its flip alignment; the published OmniPose leaves it off.
    """
    index = torch.as_tensor(np.asarray(flip_index, dtype=np.int64), device=heatmaps.device)
    flipped = heatmaps.flip(-1).index_select(1, index)
    if shift:
        flipped = torch.cat([flipped[..., :1], flipped[..., :-1]], dim=-1)
    return flipped
