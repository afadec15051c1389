"""One-Euro keypoint smoothing of tracked poses (Casiez et al., CHI 2012).

Each track has its own :class:`PoseSmoother`: one filter on the pose's centre (mean of its
confident joints), one on the joints' offsets from it. A walking person's steady translation then
passes through the centre filter, which follows speed, and the offsets filter can be slow (strong
smoothing) without making the whole body lag.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from omnipose.service.tracking import TrackingOptions


def _smoothing_factor(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """One-Euro filter over an array of values (e.g. J x 2 keypoints), each filtered on its own:
    a low-pass whose cutoff rises with the speed, so still joints stop jittering and fast ones
    do not lag."""

    def __init__(self, min_cutoff: float, beta: float, d_cutoff: float) -> None:
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self._value: np.ndarray | None = None
        self._speed: np.ndarray | None = None

    def __call__(self, value: np.ndarray, dt: float) -> np.ndarray:
        value = np.asarray(value, dtype=np.float64)
        if self._value is None or self._speed is None:
            self._value, self._speed = value.copy(), np.zeros_like(value)
            return value.copy()
        speed = (value - self._value) / dt
        a_d = _smoothing_factor(self.d_cutoff, dt)
        self._speed = a_d * speed + (1.0 - a_d) * self._speed
        cutoff = self.min_cutoff + self.beta * np.abs(self._speed)
        a = _smoothing_factor(cutoff, dt)
        self._value = a * value + (1.0 - a) * self._value
        return self._value.copy()


class PoseSmoother:
    """One track's keypoint smoothing: the centre of the confident joints and the joints'
    offsets from it, each through its own One-Euro filter."""

    def __init__(self, options: TrackingOptions) -> None:
        o = options
        self.centre = OneEuroFilter(o.min_cutoff, o.centre_beta, o.d_cutoff)
        self.offsets = OneEuroFilter(o.min_cutoff, o.beta, o.d_cutoff)
        self.threshold = o.keypoint_threshold

    def __call__(self, keypoints: np.ndarray, dt: float) -> np.ndarray:
        """Smoothed copy of ``keypoints`` (J x 3; confidences unchanged)."""
        xy = keypoints[:, :2]
        confident = keypoints[:, 2] > self.threshold
        centre = xy[confident].mean(axis=0) if confident.sum() >= 2 else xy.mean(axis=0)
        out = keypoints.copy()
        out[:, :2] = self.centre(centre, dt) + self.offsets(xy - centre, dt)
        return out
