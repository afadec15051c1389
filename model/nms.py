"""Object keypoint similarity (COCO's OKS) and greedy OKS non-maximum suppression.

Top-down pipelines decode one pose per detected box; overlapping detections of the same person
then yield near-identical poses. OKS-NMS keeps the best-scored one of each such group.
"""

from __future__ import annotations

import numpy as np

OKS_EPSILON = float(np.spacing(1))
"""Guards the division for zero-area boxes without changing any realistic OKS."""


def oks_similarity(
    pose: np.ndarray,
    others: np.ndarray,
    pose_area: float,
    other_areas: np.ndarray,
    sigmas: np.ndarray,
    visibility_threshold: float | None = None,
) -> np.ndarray:
    """OKS between one pose ``[J, 3]`` (x, y, score) and ``M`` poses ``[M, J, 3]`` -> ``[M]``.

    COCO's formula with per-joint variances ``(2 sigma)^2``; the object scale is the mean of
    the two areas, so the measure is symmetric. With ``visibility_threshold`` only joints whose
    scores exceed it in both poses count (OKS 0 if none do).
    """
    pose = np.asarray(pose, dtype=np.float64)
    others = np.asarray(others, dtype=np.float64).reshape(-1, *pose.shape)
    other_areas = np.asarray(other_areas, dtype=np.float64).reshape(-1)
    variances = (2.0 * np.asarray(sigmas, dtype=np.float64)) ** 2

    squared_distances = ((others[:, :, :2] - pose[None, :, :2]) ** 2).sum(axis=2)  # [M, J]
    mean_areas = (pose_area + other_areas)[:, None] / 2.0 + OKS_EPSILON
    exponent = squared_distances / variances[None, :] / mean_areas / 2.0
    similarity_terms = np.exp(-exponent)

    if visibility_threshold is None:
        return similarity_terms.mean(axis=1)
    counted = (pose[None, :, 2] > visibility_threshold) & (others[:, :, 2] > visibility_threshold)
    num_counted = counted.sum(axis=1)
    total = np.where(counted, similarity_terms, 0.0).sum(axis=1)
    return np.where(num_counted > 0, total / np.maximum(num_counted, 1), 0.0)


def oks_nms(
    keypoints: np.ndarray,
    scores: np.ndarray,
    areas: np.ndarray,
    sigmas: np.ndarray,
    threshold: float = 0.9,
    visibility_threshold: float | None = None,
) -> list[int]:
    """Greedy OKS-NMS over ``N`` poses ``[N, J, 3]``: indices kept, highest score first.

    The best remaining pose is kept and every remaining pose with OKS above ``threshold`` to it
    is dropped, until none remain. Equal scores keep the lower index first (stable order).
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    areas = np.asarray(areas, dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    while order.size > 0:
        best, rest = int(order[0]), order[1:]
        kept.append(best)
        similarity = oks_similarity(
            keypoints[best], keypoints[rest], areas[best], areas[rest], sigmas, visibility_threshold
        )
        order = rest[similarity <= threshold]
    return kept
