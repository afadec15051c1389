"""OKS similarity and greedy OKS-NMS on hand-made poses."""

from __future__ import annotations

import numpy as np
import pytest

from omnipose.model.nms import oks_nms, oks_similarity
from omnipose.model.skeleton import COCO_KEYPOINTS

SIGMAS = np.array(COCO_KEYPOINTS.sigmas)
UNIFORM_SIGMA = 0.05
UNIFORM_SIGMAS = np.full(17, UNIFORM_SIGMA)
AREA = 10_000.0


def _pose(origin: tuple[float, float], score: float = 0.9) -> np.ndarray:
    """A 17-joint pose spread over ~100 px, (x, y, score) per joint."""
    rng = np.random.default_rng(0)  # the same body shape every call
    offsets = rng.uniform(0, 100, (17, 2))
    pose = np.empty((17, 3))
    pose[:, :2] = np.asarray(origin) + offsets
    pose[:, 2] = score
    return pose


def _shifted(pose: np.ndarray, dx: float) -> np.ndarray:
    moved = pose.copy()
    moved[:, 0] += dx
    return moved


def _shift_for_oks(target_oks: float, area: float = AREA, sigma: float = UNIFORM_SIGMA) -> float:
    """Shift of every joint giving ``target_oks`` with uniform sigmas, from COCO's formula
    exp(-d^2 / (2 * area * (2 sigma)^2)) solved for d."""
    return float(np.sqrt(-np.log(target_oks) * 2 * area * (2 * sigma) ** 2))


def test_oks_similarity_follows_coco_formula() -> None:
    base = _pose((0, 0))
    others = np.stack([base, _shifted(base, 3.0), _shifted(base, 40.0)])
    oks = oks_similarity(base, others, AREA, np.full(3, AREA), SIGMAS)
    expected_shift3 = np.mean(np.exp(-(3.0**2) / (2 * AREA * (2 * SIGMAS) ** 2)))
    assert oks.shape == (3,)
    assert oks[0] == pytest.approx(1.0)
    assert oks[1] == pytest.approx(expected_shift3, rel=1e-9)
    assert oks[2] < 0.2


def test_oks_similarity_averages_the_two_areas() -> None:
    base = _pose((0, 0))
    shift = 5.0
    oks = oks_similarity(base, _shifted(base, shift)[None], 4_000.0, np.array([12_000.0]), SIGMAS)
    expected = np.mean(np.exp(-(shift**2) / (2 * 8_000.0 * (2 * SIGMAS) ** 2)))
    assert oks[0] == pytest.approx(expected, rel=1e-9)
    swapped = oks_similarity(
        base, _shifted(base, shift)[None], 12_000.0, np.array([4_000.0]), SIGMAS
    )
    assert swapped[0] == pytest.approx(oks[0], rel=1e-12)


def test_oks_similarity_visibility_threshold_counts_confident_joints_only() -> None:
    base = _pose((0, 0))
    other = _shifted(base, 2.0)
    other[:8, :2] += 500.0  # wildly wrong joints...
    other[:8, 2] = 0.1  # ...that the other pose is unsure about
    with_all = oks_similarity(base, other[None], AREA, np.array([AREA]), SIGMAS)
    confident = oks_similarity(base, other[None], AREA, np.array([AREA]), SIGMAS, 0.2)
    expected = np.mean(np.exp(-(2.0**2) / (2 * AREA * (2 * SIGMAS[8:]) ** 2)))
    assert confident[0] == pytest.approx(expected, rel=1e-9)
    assert with_all[0] < 0.6
    nobody = other.copy()
    nobody[:, 2] = 0.0
    assert oks_similarity(base, nobody[None], AREA, np.array([AREA]), SIGMAS, 0.2)[0] == 0.0


def test_near_identical_poses_keep_only_the_higher_score() -> None:
    base = _pose((50, 50))
    keypoints = np.stack([base, _shifted(base, 0.5)])
    kept = oks_nms(keypoints, np.array([0.7, 0.8]), np.full(2, AREA), SIGMAS)
    assert kept == [1]


def test_distant_poses_are_all_kept_best_first() -> None:
    keypoints = np.stack([_pose((0, 0)), _pose((400, 0)), _pose((0, 400)), _pose((400, 400))])
    scores = np.array([0.3, 0.9, 0.5, 0.7])
    kept = oks_nms(keypoints, scores, np.full(4, AREA), SIGMAS)
    assert kept == [1, 3, 2, 0]


@pytest.mark.parametrize("pair_oks", [0.5, 0.9])
def test_threshold_decides_between_kept_and_suppressed(pair_oks: float) -> None:
    base = _pose((0, 0))
    keypoints = np.stack([base, _shifted(base, _shift_for_oks(pair_oks))])
    scores, areas = np.array([0.9, 0.8]), np.full(2, AREA)
    measured = oks_similarity(base, keypoints[1:], AREA, areas[1:], UNIFORM_SIGMAS)
    assert measured[0] == pytest.approx(pair_oks, rel=1e-6)

    assert oks_nms(keypoints, scores, areas, UNIFORM_SIGMAS, threshold=pair_oks - 0.01) == [0]
    assert oks_nms(keypoints, scores, areas, UNIFORM_SIGMAS, threshold=pair_oks + 0.01) == [0, 1]


def test_greedy_suppression_only_by_kept_poses() -> None:
    """A suppresses B, B would suppress C, but A does not: C survives."""
    step = _shift_for_oks(0.95)  # A-B and B-C at OKS 0.95; A-C much lower
    base = _pose((0, 0))
    keypoints = np.stack([_shifted(base, 2 * step), base, _shifted(base, step)])  # C, A, B
    kept = oks_nms(keypoints, np.array([0.5, 0.9, 0.7]), np.full(3, AREA), UNIFORM_SIGMAS, 0.9)
    assert kept == [1, 0]


def test_empty_input_keeps_nothing() -> None:
    assert oks_nms(np.zeros((0, 17, 3)), np.zeros(0), np.zeros(0), SIGMAS) == []


def test_single_pose_is_kept() -> None:
    assert oks_nms(_pose((0, 0))[None], np.array([0.1]), np.array([AREA]), SIGMAS) == [0]
