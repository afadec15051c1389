"""Person crops cut on the model's device (GPU) with an affine sampling grid.

The CPU path (:func:`omnipose.model.transforms.warp_crops`) runs ``cv2.warpAffine`` once per person
on the host and ships float crops to the device. Here the decoded image goes to the device once
(uint8, a quarter of the bytes of float crops) and every crop is sampled there with
``torch.nn.functional.grid_sample``, from the SAME ``[N, 2, 3]`` matrices
:func:`omnipose.model.transforms.get_affine_transforms` returns, so any change of the crop
convention there applies here too. OpenCV's conventions are reproduced: the matrix maps source to
crop pixels (``dst(x, y) = src(M^-1 (x, y))``), pixel centres at integers, a black constant border,
and source positions quantised to 1/32 pixel as cv2's fixed-point bilinear does (``INTER_BITS =
5``), which keeps the two paths within one grey level (tests/test_device_crops.py). Runs on any
device, so the CPU checks it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from omnipose.model.transforms import IMAGENET_MEAN, IMAGENET_STD

CV2_SUBPIXEL_STEPS = 32  # cv2 bilinear warps quantise source positions to 1/32 pixel
CV2_FIXED_POINT = 1024  # ... after computing them in 1/1024 pixel steps (AB_BITS = 10)


def sampling_grid(
    transforms: np.ndarray | torch.Tensor,
    source_size: tuple[int, int],
    output_size: tuple[int, int],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``grid_sample`` grid ``[N, out_h, out_w, 2]`` (align_corners=True) for source->crop
    affine matrices ``[N, 2, 3]``; sizes are (width, height)."""
    matrices = torch.as_tensor(np.asarray(transforms, dtype=np.float64)).reshape(-1, 2, 3)
    full = torch.zeros(matrices.shape[0], 3, 3, dtype=torch.float64)
    full[:, :2] = matrices
    full[:, 2, 2] = 1.0
    inverse = torch.linalg.inv(full)[:, :2].to(device)  # crop pixel -> source pixel
    out_width, out_height = output_size
    ys, xs = torch.meshgrid(
        torch.arange(out_height, dtype=torch.float64, device=device),
        torch.arange(out_width, dtype=torch.float64, device=device),
        indexing="ij",
    )
    # cv2's fixed point: the x term and the (y, offset) term each rounded to 1/1024 pixel, then
    # their sum rounded (half up) to 1/32; ties are common (zooms like 0.512), so it matters.
    one = CV2_FIXED_POINT
    x_term = torch.round(inverse[:, None, None, :, 0] * xs[None, ..., None] * one)
    y_term = torch.round(
        (inverse[:, None, None, :, 1] * ys[None, ..., None] + inverse[:, None, None, :, 2]) * one
    )
    steps = one // CV2_SUBPIXEL_STEPS
    source = torch.floor((x_term + y_term + steps // 2) / steps) / CV2_SUBPIXEL_STEPS
    width, height = source_size
    scale = torch.tensor(
        [2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], dtype=torch.float64, device=device
    )
    return (source * scale - 1.0).float()


def image_to_device(
    image_rgb: np.ndarray | torch.Tensor, device: torch.device | str, pin_memory: bool = False
) -> torch.Tensor:
    """An ``[H, W, 3]`` uint8 image as a ``[1, 3, H, W]`` uint8 tensor on ``device``.

    With ``pin_memory`` (CUDA) the host copy is page-locked so the upload is asynchronous.
    """
    tensor = torch.as_tensor(image_rgb)
    if tensor.device.type == "cpu" and pin_memory and torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True).permute(2, 0, 1).unsqueeze(0)


def crop_on_device(
    image: torch.Tensor, transforms: np.ndarray | torch.Tensor, output_size: tuple[int, int]
) -> torch.Tensor:
    """Crops ``[N, 3, out_h, out_w]`` in 0-255 float32 from a ``[1, 3, H, W]`` image tensor."""
    _, _, height, width = image.shape
    grid = sampling_grid(transforms, (width, height), output_size, image.device)
    source = image.float().expand(grid.shape[0], -1, -1, -1)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def normalize_on_device(crops: torch.Tensor) -> torch.Tensor:
    """0-255 crops ``[N, 3, h, w]`` -> network input: ImageNet mean/std, as normalize_crops."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=crops.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=crops.device).view(1, 3, 1, 1)
    return crops.div(255).sub(mean).div(std).contiguous()
