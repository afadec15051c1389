"""Heatmap regression losses with per-joint target weights (the published MSE and its OHKM
variant).

Both take predictions and targets ``[B, J, h, w]`` and weights ``[B, J]``; a joint with weight 0
(not annotated, or outside the crop) contributes nothing. Predicted and target maps are both
multiplied by the weight before the squared error, as in the published loss, and the result is
halved, so loss magnitudes are comparable with published training logs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

OHKM_TOP_K = 8


def _per_joint_squared_error(prediction: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """``[B, J]`` mean over pixels of 0.5 * (w * pred - w * target)^2, computed in float32."""
    prediction = prediction.float().flatten(2)
    target = target.float().flatten(2)
    weight = weight.float().reshape(*weight.shape[:2], 1)
    return 0.5 * ((prediction - target) * weight).pow(2).mean(dim=2)


class JointsMSELoss(nn.Module):
    """Mean over joints and persons of the weighted per-joint MSE."""

    def __init__(self, use_target_weight: bool = True) -> None:
        super().__init__()
        self.use_target_weight = use_target_weight

    def forward(self, prediction: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        if not self.use_target_weight:
            weight = torch.ones_like(weight)
        return _per_joint_squared_error(prediction, target, weight).mean()


class JointsOHKMLoss(nn.Module):
    """Online hard keypoint mining: per person, the mean of the ``top_k`` largest joint losses."""

    def __init__(self, use_target_weight: bool = True, top_k: int = OHKM_TOP_K) -> None:
        super().__init__()
        self.use_target_weight = use_target_weight
        self.top_k = top_k

    def forward(self, prediction: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        if not self.use_target_weight:
            weight = torch.ones_like(weight)
        per_joint = _per_joint_squared_error(prediction, target, weight)
        top_k = min(self.top_k, per_joint.shape[1])
        hardest, _ = per_joint.topk(top_k, dim=1)
        return hardest.mean()


def build_loss(name: str) -> nn.Module:
    if name == "mse":
        return JointsMSELoss()
    if name == "ohkm":
        return JointsOHKMLoss()
    raise ValueError(f"unknown loss {name!r}; expected 'mse' or 'ohkm'")
