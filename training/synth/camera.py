"""The pinhole camera that projects the synthetic scenes, and the rotations bodies are posed with.

World coordinates are metres with x right, y up and z towards the camera; a body frame has x to
the person's left, y up and z forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def rot_x(degrees: float) -> np.ndarray:
    """Rotation about the body's left axis: positive tilts +y (up) towards +z (forward)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rot_y(degrees: float) -> np.ndarray:
    """Rotation about the up axis: positive turns +z (forward) towards +x (the body's left)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rot_z(degrees: float) -> np.ndarray:
    """Rotation about the forward axis: positive turns -y (down) towards +x (the body's left)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


# World (x right, y up, z towards the camera) to camera (x right, y down, z along the view).
_WORLD_TO_CAMERA_AXES = np.diag([1.0, -1.0, -1.0])


@dataclass(frozen=True)
class Camera:
    """Pinhole camera at the world origin looking down -z, tilted by ``pitch`` and ``roll``."""

    width: int
    height: int
    focal: float
    cx: float
    cy: float
    rotation: np.ndarray  # world -> camera, 3x3

    @classmethod
    def create(
        cls,
        width: int,
        height: int,
        fov_deg: float = 60.0,
        pitch: float = 0.0,
        roll: float = 0.0,
        principal_offset: tuple[float, float] = (0.0, 0.0),
    ) -> Camera:
        """``fov_deg`` is horizontal; positive ``pitch`` looks down."""
        focal = (width / 2) / math.tan(math.radians(fov_deg) / 2)
        tilt = rot_z(roll) @ rot_x(pitch)  # camera frame: x about the image rows
        return cls(
            width=width,
            height=height,
            focal=focal,
            cx=(width - 1) / 2 + principal_offset[0],
            cy=(height - 1) / 2 + principal_offset[1],
            rotation=tilt @ _WORLD_TO_CAMERA_AXES,
        )

    def to_camera(self, points_world: np.ndarray) -> np.ndarray:
        return np.asarray(points_world, dtype=np.float64) @ self.rotation.T

    def project(self, points_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (..., 2) (pixel centres at integers) and camera depth (...)."""
        cam = self.to_camera(points_world)
        depth = cam[..., 2]
        safe = np.maximum(depth, 1e-6)
        uv = np.stack(
            [self.cx + self.focal * cam[..., 0] / safe, self.cy + self.focal * cam[..., 1] / safe],
            axis=-1,
        )
        return uv, depth

    def backproject(self, u: float, v: float, depth: float) -> np.ndarray:
        """The world point that projects to pixel (u, v) at camera depth ``depth``."""
        cam = np.array([(u - self.cx) * depth / self.focal, (v - self.cy) * depth / self.focal,
                        depth])  # fmt: skip
        return self.rotation.T @ cam
