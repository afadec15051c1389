"""Synthetic COCO person-keypoints dataset: rendered articulated people with real occlusion labels.

Why it exists: the tests and the CPU training of the embedded default model need a dataset that
needs no download, is deterministic for a seed and still looks enough like people that a pose
network learns something transferable (joint appearance, left/right from the face, occlusion).

How a scene is made:

* a 3D skeleton (pelvis root, two-segment spine, neck, head with face points, arms with hands, legs
  with feet) with human proportions (fractions of body height), posed by joint angles that are
  clipped to anatomical limits (knees and elbows bend one way, hips and shoulders stay in plausible
  ranges) and sampled from pose families (standing, walking, running, arms raised, sitting,
  crouching, kneeling, bending, free);
* the body is a set of tapered capsules (spheres for the head and face details) that are ray-cast
  as impostors into a z-buffer with per-pixel depth and normals, shaded with a directional light,
  anti-aliased at the edges, in skin, hair, shirt, trousers and shoe colours;
* a pinhole camera with random field of view, pitch and roll projects everything; people are
  placed at depths that give heights from ~8 % to ~130 % of the image;
* each joint's label comes from the rendered buffers: ``v=0`` when it projects outside the image
  (COCO then stores x = y = 0), ``v=1`` when the pixel under it is owned by another person, a prop
  or a part of its own body that lies clearly in front of it (self-occlusion in side and back
  views), ``v=2`` otherwise.

People whose silhouette has no pixel in the image are not annotated; people that are visible but
have no labelled joint are annotated with ``num_keypoints`` 0, as COCO does. So are people whose
silhouette covers fewer than ``MIN_KEYPOINT_AREA`` pixels (32 x 32, COCO's "small"): COCO leaves
such people without keypoints, and a joint label on a 10-pixel figure is noise for training and
an unreachable target for evaluation.

Every image draws from its own ``numpy`` generator seeded with ``(seed, index)``, so the output is
byte-identical for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import json
import math
import multiprocessing as mp
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from omnipose.model.skeleton import COCO_KEYPOINTS

JPEG_QUALITY = 90
NUM_JOINTS = COCO_KEYPOINTS.num_joints
# COCO joint indices used below.
NOSE, L_EYE, R_EYE, L_EAR, R_EAR = 0, 1, 2, 3, 4
L_SHOULDER, R_SHOULDER, L_ELBOW, R_ELBOW, L_WRIST, R_WRIST = 5, 6, 7, 8, 9, 10
L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANKLE, R_ANKLE = 11, 12, 13, 14, 15, 16
BACKGROUND_ID = -1  # id-map value where no body or prop was drawn
PROP_ID = -2  # id-map value of occluding props (not people)
MIN_LIMB_RADIUS_PX = 0.75  # keeps every joint's nearest pixel inside its own limb at tiny scales
NEAR_PLANE_M = 0.1

# ---------------------------------------------------------------------------------------------
# Pose: joint angles with anatomical limits
# ---------------------------------------------------------------------------------------------

# Degrees. Flexion is forward (knee flexion bends the shin backward), abduction is away from the
# midline, twist is external rotation for limbs. Bilateral entries hold (left, right).
JOINT_LIMITS_DEG: dict[str, tuple[float, float]] = {
    "torso_bend": (-30.0, 95.0),
    "torso_side": (-30.0, 30.0),
    "torso_twist": (-40.0, 40.0),
    "neck_flex": (-45.0, 55.0),
    "neck_yaw": (-75.0, 75.0),
    "neck_tilt": (-35.0, 35.0),
    "shoulder_flex": (-60.0, 180.0),
    "shoulder_abd": (-15.0, 175.0),
    "shoulder_twist": (-70.0, 90.0),
    "elbow": (0.0, 150.0),
    "hip_flex": (-30.0, 130.0),
    "hip_abd": (-20.0, 55.0),
    "hip_twist": (-35.0, 35.0),
    "knee": (0.0, 155.0),
    "ankle": (-25.0, 50.0),  # plantar flexion positive
}
AXIAL_ANGLES = ("torso_bend", "torso_side", "torso_twist", "neck_flex", "neck_yaw", "neck_tilt")
LIMB_ANGLES = (
    "shoulder_flex", "shoulder_abd", "shoulder_twist", "elbow",
    "hip_flex", "hip_abd", "hip_twist", "knee", "ankle",
)  # fmt: skip


@dataclass
class Pose:
    """Joint angles in degrees: floats for the spine and neck, ``(left, right)`` for limbs."""

    angles: dict[str, np.ndarray]

    @classmethod
    def neutral(cls) -> Pose:
        """Upright, arms hanging slightly away from the body: every joint is visible from front."""
        angles = {name: np.zeros(()) for name in AXIAL_ANGLES}
        angles.update({name: np.zeros(2) for name in LIMB_ANGLES})
        angles["shoulder_abd"] = np.array([12.0, 12.0])
        angles["elbow"] = np.array([10.0, 10.0])
        angles["hip_abd"] = np.array([4.0, 4.0])
        return cls(angles)

    def clipped(self) -> Pose:
        """The same pose with every angle inside its anatomical range."""
        return Pose(
            {
                name: np.clip(np.asarray(value, dtype=np.float64), *JOINT_LIMITS_DEG[name])
                for name, value in self.angles.items()
            }
        )


POSE_FAMILIES = (
    "stand", "walk", "run", "arms_up", "one_arm_up", "sit", "crouch", "kneel", "bend", "free",
)  # fmt: skip
POSE_FAMILY_WEIGHTS = np.array([0.2, 0.17, 0.1, 0.09, 0.09, 0.08, 0.07, 0.05, 0.07, 0.08])
VIEWS = ("front", "side", "back")  # yaw within 60 deg of facing the camera, 60-120, beyond 120
VIEW_WEIGHTS = np.array([0.55, 0.25, 0.2])  # mostly frontal, as in photos


@dataclass(frozen=True)
class SceneOptions:
    """What a random scene may hold. The defaults are the full variety the default model trains
    on; narrower sets (one person, a few pose families, no tiny or cropped-off figures) make
    quick experiments and the learning test converge in minutes."""

    max_people: int = 4
    pose_families: tuple[str, ...] = POSE_FAMILIES
    # person height as a fraction of the image height, drawn log-uniformly; above ~0.75 many
    # figures run off the frame, as in photos
    height_range: tuple[float, float] = (0.08, 1.3)
    views: tuple[str, ...] = VIEWS

    def __post_init__(self) -> None:
        unknown = sorted(set(self.pose_families) - set(POSE_FAMILIES))
        if self.max_people < 1:
            raise ValueError("max_people must be at least 1")
        if not self.pose_families or unknown:
            raise ValueError(f"pose families must be some of {', '.join(POSE_FAMILIES)}")
        if not self.views or set(self.views) - set(VIEWS):
            raise ValueError(f"views must be some of {', '.join(VIEWS)}")
        low, high = self.height_range
        if not 0 < low <= high:
            raise ValueError(f"height range must satisfy 0 < low <= high, got {low}, {high}")

    def family_weights(self) -> np.ndarray | None:
        """Sampling weights over ``pose_families`` (None: all families, published weights)."""
        if self.pose_families == POSE_FAMILIES:
            return None
        indices = [POSE_FAMILIES.index(family) for family in self.pose_families]
        weights = POSE_FAMILY_WEIGHTS[indices]
        return weights / weights.sum()


def _standing_angles(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A relaxed upright pose that the families below modify."""
    u = rng.uniform
    return {
        "torso_bend": np.array(rng.normal(3.0, 4.0)),
        "torso_side": np.array(rng.normal(0.0, 3.0)),
        "torso_twist": np.array(rng.normal(0.0, 8.0)),
        "neck_flex": np.array(rng.normal(0.0, 12.0)),
        "neck_yaw": np.array(rng.normal(0.0, 25.0)),
        "neck_tilt": np.array(rng.normal(0.0, 6.0)),
        "shoulder_flex": u(-15.0, 30.0, 2),
        "shoulder_abd": u(3.0, 25.0, 2),
        "shoulder_twist": u(-20.0, 40.0, 2),
        "elbow": u(0.0, 50.0, 2),
        "hip_flex": u(-8.0, 12.0, 2),
        "hip_abd": u(0.0, 12.0, 2),
        "hip_twist": u(-10.0, 15.0, 2),
        "knee": u(0.0, 15.0, 2),
        "ankle": u(-5.0, 10.0, 2),
    }


def sample_pose(rng: np.random.Generator, family: str | None = None) -> Pose:
    """A random pose from one of ``POSE_FAMILIES`` (chosen at random unless given), clipped."""
    if family is None:
        family = POSE_FAMILIES[rng.choice(len(POSE_FAMILIES), p=POSE_FAMILY_WEIGHTS)]
    a = _standing_angles(rng)
    u = rng.uniform
    if family == "walk":
        swing = u(15.0, 32.0) * math.sin(u(0.0, 2.0 * math.pi))
        a["hip_flex"] = np.array([swing, -swing]) + u(-3.0, 3.0, 2)
        a["knee"] = np.where(a["hip_flex"] < 0, u(15.0, 60.0, 2), u(0.0, 20.0, 2))
        a["shoulder_flex"] = np.array([-swing, swing]) * u(0.5, 1.0) + u(-5.0, 5.0, 2)
        a["shoulder_abd"] = u(3.0, 15.0, 2)
        a["elbow"] = u(10.0, 45.0, 2)
    elif family == "run":
        swing = u(30.0, 55.0) * math.copysign(1.0, u(-1.0, 1.0))
        a["torso_bend"] = np.array(u(8.0, 25.0))
        a["hip_flex"] = np.array([swing, -0.5 * swing]) + u(-5.0, 5.0, 2)
        a["knee"] = np.where(a["hip_flex"] > 0, u(40.0, 100.0, 2), u(40.0, 120.0, 2))
        a["shoulder_flex"] = np.array([-swing, swing]) * u(0.7, 1.1) + u(-5.0, 5.0, 2)
        a["elbow"] = u(65.0, 115.0, 2)
        a["ankle"] = u(-10.0, 35.0, 2)
    elif family == "arms_up":
        overhead = rng.random(2) < 0.5
        a["shoulder_flex"] = np.where(overhead, u(110.0, 180.0, 2), u(-10.0, 40.0, 2))
        a["shoulder_abd"] = np.where(overhead, u(0.0, 40.0, 2), u(70.0, 165.0, 2))
        a["elbow"] = u(0.0, 110.0, 2)
        a["neck_flex"] = np.array(u(-40.0, 10.0))
    elif family == "one_arm_up":
        side = int(rng.integers(2))
        a["shoulder_flex"][side] = u(50.0, 175.0)
        a["shoulder_abd"][side] = u(0.0, 80.0)
        a["elbow"][side] = u(0.0, 130.0)
        a["shoulder_twist"][side] = u(-30.0, 80.0)
    elif family == "sit":
        a["hip_flex"] = u(70.0, 105.0, 2)
        a["knee"] = u(60.0, 115.0, 2)
        a["hip_abd"] = u(0.0, 25.0, 2)
        a["torso_bend"] = np.array(u(-10.0, 25.0))
        a["shoulder_flex"] = u(0.0, 70.0, 2)
        a["elbow"] = u(20.0, 110.0, 2)
    elif family == "crouch":
        a["hip_flex"] = u(95.0, 130.0, 2)
        a["knee"] = u(100.0, 150.0, 2)
        a["hip_abd"] = u(5.0, 35.0, 2)
        a["torso_bend"] = np.array(u(20.0, 55.0))
        a["ankle"] = u(-25.0, 0.0, 2)
        a["shoulder_flex"] = u(0.0, 100.0, 2)
        a["elbow"] = u(0.0, 120.0, 2)
    elif family == "kneel":
        side = int(rng.integers(2))
        a["hip_flex"][side], a["knee"][side] = u(-10.0, 15.0), u(80.0, 110.0)
        a["hip_flex"][1 - side], a["knee"][1 - side] = u(70.0, 100.0), u(70.0, 100.0)
        a["torso_bend"] = np.array(u(-5.0, 20.0))
        a["ankle"][side] = u(20.0, 50.0)
    elif family == "bend":
        bend = u(40.0, 90.0)
        a["torso_bend"] = np.array(bend)
        a["hip_flex"] = u(0.0, 20.0, 2)
        a["knee"] = u(0.0, 25.0, 2)
        a["shoulder_flex"] = bend + u(-25.0, 25.0, 2)  # arms hang towards the ground
        a["elbow"] = u(0.0, 40.0, 2)
        a["neck_flex"] = np.array(u(-40.0, 0.0))
    elif family == "free":
        for name, (low, high) in JOINT_LIMITS_DEG.items():
            shape = () if name in AXIAL_ANGLES else (2,)
            # Axial angles are drawn from the inner part of their range: extreme spine or neck
            # angles together look broken rather than athletic.
            scale = 0.6 if name in AXIAL_ANGLES else 1.0
            mid, half = (low + high) / 2, (high - low) / 2 * scale
            a[name] = np.asarray(u(mid - half, mid + half, shape))
    elif family != "stand":
        raise ValueError(f"unknown pose family {family!r}; expected one of {POSE_FAMILIES}")
    return Pose(a).clipped()


# ---------------------------------------------------------------------------------------------
# Skeleton, appearance and body primitives
# ---------------------------------------------------------------------------------------------


def _rot_x(degrees: float) -> np.ndarray:
    """Rotation about the body's left axis: positive tilts +y (up) towards +z (forward)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(degrees: float) -> np.ndarray:
    """Rotation about the up axis: positive turns +z (forward) towards +x (the body's left)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_z(degrees: float) -> np.ndarray:
    """Rotation about the forward axis: positive turns -y (down) towards +x (the body's left)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


DOWN = np.array([0.0, -1.0, 0.0])
UP = np.array([0.0, 1.0, 0.0])

# BGR, 0..255. Skin tones span very light to very dark; hair covers the common natural colours.
SKIN_TONES = np.array(
    [
        [196, 224, 255], [160, 200, 240], [125, 194, 241], [105, 172, 224], [90, 150, 210],
        [66, 134, 198], [50, 105, 165], [36, 85, 141], [30, 62, 105], [25, 40, 60],
    ],
    dtype=np.float32,
)  # fmt: skip
HAIR_COLOURS = np.array(
    [[16, 18, 20], [25, 40, 60], [45, 75, 110], [110, 170, 200], [150, 150, 150], [30, 60, 140]],
    dtype=np.float32,
)
EYE_COLOUR = np.array([35.0, 30.0, 30.0], dtype=np.float32)


def _random_colour(rng: np.random.Generator, min_value: float = 0.05) -> np.ndarray:
    """A BGR colour drawn uniformly in HSV so saturated, pale and dark garments all occur."""
    hue, sat, val = rng.random(), rng.uniform(0.0, 1.0) ** 0.7, rng.uniform(min_value, 0.97)
    red, green, blue = colorsys.hsv_to_rgb(hue, sat, val)
    return np.array([blue, green, red], dtype=np.float32) * 255.0


@dataclass
class Appearance:
    """Colours (BGR 0..255) and clothing cut of one person."""

    skin: np.ndarray
    hair: np.ndarray
    shirt: np.ndarray
    trousers: np.ndarray
    shoes: np.ndarray
    long_sleeves: bool = True
    long_trousers: bool = True
    sleeveless: bool = False
    bald: bool = False
    long_hair: bool = False

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Appearance:
        skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] + rng.uniform(-12.0, 12.0, 3)
        hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] + rng.uniform(-8.0, 8.0, 3)
        shoes = _random_colour(rng) * 0.5 if rng.random() < 0.7 else _random_colour(rng)
        return cls(
            skin=np.clip(skin, 0, 255).astype(np.float32),
            hair=np.clip(hair, 0, 255).astype(np.float32),
            shirt=_random_colour(rng),
            trousers=_random_colour(rng),
            shoes=shoes.astype(np.float32),
            long_sleeves=bool(rng.random() < 0.55),
            long_trousers=bool(rng.random() < 0.75),
            sleeveless=bool(rng.random() < 0.1),
            bald=bool(rng.random() < 0.08),
            long_hair=bool(rng.random() < 0.3),
        )

    @classmethod
    def plain(cls) -> Appearance:
        """Fixed, clearly distinct colours for constructed test scenes."""
        return cls(
            skin=np.array([120, 170, 230], np.float32),
            hair=np.array([20, 25, 30], np.float32),
            shirt=np.array([200, 60, 40], np.float32),
            trousers=np.array([60, 50, 40], np.float32),
            shoes=np.array([20, 20, 20], np.float32),
        )


@dataclass
class Primitive:
    """A tapered capsule in world metres (a sphere when ``start`` equals ``end``)."""

    start: np.ndarray
    end: np.ndarray
    radius_start: float
    radius_end: float
    colour: np.ndarray
    min_radius_px: float = MIN_LIMB_RADIUS_PX
    # Heads only: hair colour and the head's up/forward axes in world coordinates.
    hair: np.ndarray | None = None
    head_axes: tuple[np.ndarray, np.ndarray] | None = None
    long_hair: bool = False
    # Parts of one rounded body (the torso) share this shading surface so that the seams
    # between their capsules do not show; depth still comes from each capsule.
    shading: TorsoShading | None = None


@dataclass
class TorsoShading:
    """A tube with an elliptical cross-section whose normals light every torso capsule."""

    start: np.ndarray  # world, bottom of the tube's axis
    end: np.ndarray  # world, top
    lateral: np.ndarray  # world unit vector across the shoulders
    half_width: float  # metres, shoulder to shoulder / 2
    half_depth: float  # metres, chest to back / 2

    def normals(
        self, camera: Camera, xs: np.ndarray, ys: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Camera-space unit normals (x, y, towards-camera) at pixels ``xs``, ``ys``."""
        (pa, pb), (za, zb) = camera.project(np.stack([self.start, self.end]))
        facing = float(camera.to_camera(self.lateral[None])[0, 2])  # 0: seen from the front
        width_m = math.sqrt(self.half_width**2 * (1 - facing**2) + self.half_depth**2 * facing**2)
        ex, ey = float(pb[0] - pa[0]), float(pb[1] - pa[1])
        px, py = xs - float(pa[0]), ys - float(pa[1])
        length2 = ex * ex + ey * ey
        t = np.clip((px * ex + py * ey) * (1.0 / max(length2, 1e-6)), 0.0, 1.0)
        width_px = camera.focal * width_m / (float(za) + t * float(zb - za))
        nx, ny = (px - t * ex) / width_px, (py - t * ey) / width_px
        norm2 = nx * nx + ny * ny
        scale = np.where(norm2 > 1.0, 1.0 / np.sqrt(np.maximum(norm2, 1e-12)), 1.0)
        nx, ny = nx * scale, ny * scale
        return nx, ny, np.sqrt(np.clip(1.0 - nx * nx - ny * ny, 0.0, 1.0))


@dataclass
class Person:
    """A posed body in world coordinates: its 17 COCO joints and the primitives that draw it."""

    joints: np.ndarray  # (17, 3) world metres, COCO order
    tolerances: np.ndarray  # (17,) metres a surface may lie in front of a joint and still show it
    primitives: list[Primitive]
    height: float


def make_person(
    pose: Pose,
    position: Sequence[float],
    *,
    yaw: float = 0.0,
    lean: float = 0.0,
    roll: float = 0.0,
    height: float = 1.7,
    girth: float = 1.0,
    appearance: Appearance | None = None,
    limb_scale: np.ndarray | None = None,
    head_scale: float = 1.0,
) -> Person:
    """Pose a body and place its pelvis at ``position`` (world metres: x right, y up, z towards
    the camera). ``yaw`` 0 faces the camera; positive turns the face to the person's left.

    Proportions are fractions of ``height`` from anthropometric tables (hip joints at 0.53 H,
    shoulders at 0.82 H, thigh 0.245 H, shin 0.246 H, upper arm 0.186 H, forearm 0.146 H).
    ``limb_scale`` (6,) multiplies torso, upper arm, forearm, thigh, shin and shoulder width.
    """
    appearance = appearance or Appearance.plain()
    h = height
    torso_k, upper_k, fore_k, thigh_k, shin_k, width_k = (
        np.ones(6) if limb_scale is None else np.asarray(limb_scale, dtype=np.float64)
    )
    ang = pose.clipped().angles
    a = {name: np.asarray(v, dtype=np.float64) for name, v in ang.items()}

    body_rot = _rot_y(yaw) @ _rot_x(lean) @ _rot_z(roll)
    pelvis_rot = _rot_y(float(a["torso_twist"]) * 0.2)
    half = (
        _rot_y(float(a["torso_twist"]) * 0.4)
        @ _rot_x(float(a["torso_bend"]) / 2)
        @ _rot_z(float(a["torso_side"]) / 2)
    )
    waist_rot = pelvis_rot @ half
    chest_rot = waist_rot @ half
    neck_rot = chest_rot @ _rot_y(float(a["neck_yaw"]) * 0.3) @ _rot_x(float(a["neck_flex"]) * 0.4)
    head_rot = (
        chest_rot
        @ _rot_y(float(a["neck_yaw"]))
        @ _rot_x(float(a["neck_flex"]))
        @ _rot_z(float(a["neck_tilt"]))
    )

    # Body-frame points (x = the person's left, y = up, z = forward), pelvis at the origin.
    waist = waist_rot @ np.array([0.0, 0.15 * h * torso_k, 0.0])
    chest_top = waist + chest_rot @ np.array([0.0, 0.148 * h * torso_k, 0.0])
    neck_top = chest_top + neck_rot @ np.array([0.0, 0.05 * h, 0.0])
    head_radius = 0.058 * h * head_scale
    head_centre = neck_top + head_rot @ np.array([0.0, 0.75 * head_radius, 0.2 * head_radius])

    def on_head(direction: Sequence[float], depth: float = 0.97) -> np.ndarray:
        unit = np.asarray(direction, dtype=np.float64)
        return head_centre + head_rot @ (unit / np.linalg.norm(unit) * depth * head_radius)

    points: dict[str, np.ndarray] = {
        "nose": on_head([0.0, -0.2, 1.0], 1.0),
        "left_eye": on_head([0.36, 0.2, 0.9]),
        "right_eye": on_head([-0.36, 0.2, 0.9]),
        "left_ear": on_head([1.0, 0.0, -0.12]),
        "right_ear": on_head([-1.0, 0.0, -0.12]),
    }
    skin, shirt, trousers = appearance.skin, appearance.shirt, appearance.trousers
    r = 0.001 * h * girth  # radii below are in thousandths of the height
    prims: list[Primitive] = []

    def capsule(
        p: np.ndarray,
        q: np.ndarray,
        rp: float,
        rq: float,
        colour: np.ndarray,
        shading: TorsoShading | None = None,
    ) -> None:
        prims.append(Primitive(p, q, rp * r, rq * r, colour, shading=shading))

    chest_width = (0.06 * h * width_k + 0.062 * h * girth) * 1.05
    upper_body = TorsoShading(waist, chest_top, chest_rot[:, 0], chest_width, 0.064 * h * girth)
    lower_body = TorsoShading(
        np.zeros(3), waist, pelvis_rot[:, 0], 0.115 * h * girth, 0.06 * h * girth
    )

    for side, sign in (("left", 1.0), ("right", -1.0)):
        i = 0 if side == "left" else 1
        shoulder = chest_top + chest_rot @ np.array([sign * 0.105 * h * width_k, -0.012 * h, 0.0])
        upper_rot = (
            chest_rot
            @ _rot_x(-float(a["shoulder_flex"][i]))
            @ _rot_z(sign * float(a["shoulder_abd"][i]))
            @ _rot_y(sign * float(a["shoulder_twist"][i]))
        )
        fore_rot = upper_rot @ _rot_x(-float(a["elbow"][i]))
        elbow = shoulder + upper_rot @ (DOWN * 0.186 * h * upper_k)
        wrist = elbow + fore_rot @ (DOWN * 0.146 * h * fore_k)
        hand_end = wrist + fore_rot @ np.array([0.0, -0.075 * h, 0.008 * h])

        hip = pelvis_rot @ np.array([sign * 0.058 * h, 0.0, 0.0])
        thigh_rot = (
            pelvis_rot
            @ _rot_x(-float(a["hip_flex"][i]))
            @ _rot_z(sign * float(a["hip_abd"][i]))
            @ _rot_y(sign * float(a["hip_twist"][i]))
        )
        shin_rot = thigh_rot @ _rot_x(float(a["knee"][i]))
        foot_rot = shin_rot @ _rot_x(float(a["ankle"][i]))
        knee = hip + thigh_rot @ (DOWN * 0.245 * h * thigh_k)
        ankle = knee + shin_rot @ (DOWN * 0.246 * h * shin_k)
        heel = ankle + foot_rot @ np.array([0.0, -0.022 * h, -0.018 * h])
        toe = ankle + foot_rot @ np.array([0.0, -0.03 * h, 0.11 * h])
        points.update(
            {
                f"{side}_shoulder": shoulder,
                f"{side}_elbow": elbow,
                f"{side}_wrist": wrist,
                f"{side}_hip": hip,
                f"{side}_knee": knee,
                f"{side}_ankle": ankle,
            }
        )
        sleeve = skin if appearance.sleeveless else shirt
        capsule(shoulder, elbow, 33, 26, sleeve)
        capsule(elbow, wrist, 26, 19, shirt if appearance.long_sleeves else skin)
        capsule(wrist, hand_end, 20, 17, skin)
        capsule(hip, knee, 56, 37, trousers)
        capsule(knee, ankle, 37, 24, trousers if appearance.long_trousers else skin)
        capsule(heel, toe, 22, 20, appearance.shoes)
        # Torso: chest and belly columns on each side make a body that is wide from the front and
        # thin from the side, which a single capsule could not.
        chest_side = chest_top + chest_rot @ np.array([sign * 0.06 * h * width_k, -0.035 * h, 0.0])
        waist_side = waist + waist_rot @ np.array([sign * 0.055 * h, 0.0, 0.0])
        hip_side = pelvis_rot @ np.array([sign * 0.055 * h, 0.02 * h, 0.0])
        capsule(chest_side, waist_side, 62, 55, shirt, upper_body)
        capsule(waist_side, hip_side, 55, 58, shirt, lower_body)
    # A central column fills the crease between the two sides of the chest and belly.
    sternum = chest_top + chest_rot @ np.array([0.0, -0.045 * h, 0.006 * h])
    belly = waist + waist_rot @ np.array([0.0, 0.0, 0.006 * h])
    capsule(sternum, belly, 62, 57, shirt, upper_body)
    capsule(belly, pelvis_rot @ np.array([0.0, 0.03 * h, 0.004 * h]), 57, 58, shirt, lower_body)
    capsule(points["left_shoulder"] * 0.8 + chest_top * 0.2,
            points["right_shoulder"] * 0.8 + chest_top * 0.2, 45, 45, shirt,
            upper_body)  # fmt: skip
    capsule(points["left_hip"], points["right_hip"], 60, 60, trousers, lower_body)
    capsule(chest_top + chest_rot @ np.array([0.0, -0.02 * h, 0.0]), neck_top, 30, 28, skin)
    prims.append(
        Primitive(
            head_centre, head_centre, head_radius, head_radius, skin,
            hair=None if appearance.bald else appearance.hair,
            head_axes=(head_rot @ UP, head_rot @ np.array([0.0, 0.0, 1.0])),
            long_hair=appearance.long_hair,
        )
    )  # fmt: skip
    # The jaw under the front of the cranium makes the head egg-shaped rather than a ball.
    jaw = head_centre + head_rot @ np.array([0.0, -0.35 * head_radius, 0.15 * head_radius])
    prims.append(Primitive(jaw, jaw, 0.75 * head_radius, 0.75 * head_radius, skin))
    face_radius = {"nose": 0.17, "left_eye": 0.09, "right_eye": 0.09, "left_ear": 0.16}
    face_radius["right_ear"] = face_radius["left_ear"]
    for name, fraction in face_radius.items():
        colour = EYE_COLOUR if name.endswith("eye") else skin * (0.9 if "ear" in name else 1.0)
        radius = fraction * head_radius
        prims.append(Primitive(points[name], points[name], radius, radius, colour))

    joints_body = np.stack([points[name] for name in COCO_KEYPOINTS.joint_names])
    # How far a surface may stand in front of a joint while the joint still counts as visible:
    # joints sit inside their limbs, so the limb's own near surface must not hide them. Limb
    # joints: 1.5 x the thickest capsule that meets them (thousandths of the height); face
    # points: 1.5 x their own sphere, except the ears, which sit on the head's silhouette in a
    # frontal view where the cranium curves towards the camera in front of them.
    limb_radius = np.array([45, 45, 33, 33, 26, 26, 60, 60, 40, 40, 28, 28], dtype=np.float64)
    face_allowance = np.array([0.17, 0.09, 0.09, 0.3, 0.3]) * head_radius
    tolerances = np.concatenate([face_allowance, limb_radius * r]) * 1.5 + 0.012 * h

    origin = np.asarray(position, dtype=np.float64)
    to_world = body_rot.T  # row-vector form: p_world = p_body @ body_rot.T + origin
    joints = joints_body @ to_world + origin
    for prim in prims:
        prim.start = prim.start @ to_world + origin
        prim.end = prim.end @ to_world + origin
        if prim.head_axes is not None:
            prim.head_axes = (body_rot @ prim.head_axes[0], body_rot @ prim.head_axes[1])
    for shading in (upper_body, lower_body):
        shading.start = shading.start @ to_world + origin
        shading.end = shading.end @ to_world + origin
        shading.lateral = body_rot @ shading.lateral
    return Person(joints=joints, tolerances=tolerances, primitives=prims, height=h)


# ---------------------------------------------------------------------------------------------
# Camera
# ---------------------------------------------------------------------------------------------

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
        tilt = _rot_z(roll) @ _rot_x(pitch)  # camera frame: x about the image rows
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


# ---------------------------------------------------------------------------------------------
# Rasterisation: capsule impostors into a z-buffer
# ---------------------------------------------------------------------------------------------


@dataclass
class Light:
    """Directional light in camera coordinates (pointing from surfaces towards the light)."""

    direction: np.ndarray = field(default_factory=lambda: np.array([-0.3, -0.5, -0.8]))
    ambient: float = 0.45

    def unit(self) -> np.ndarray:
        return self.direction / np.linalg.norm(self.direction)


@dataclass
class SceneRender:
    """A rendered scene with the buffers its labels come from."""

    image: np.ndarray  # (H, W, 3) uint8 BGR, before global lighting effects
    id_map: np.ndarray  # (H, W) int16: person index, BACKGROUND_ID or PROP_ID
    depth: np.ndarray  # (H, W) float32 camera depth of the nearest surface (inf: none)
    keypoints: np.ndarray  # (P, 17, 3) x, y, v in COCO convention
    boxes: np.ndarray  # (P, 4) x, y, w, h of the visible silhouette (zeros when none)
    areas: np.ndarray  # (P,) visible silhouette pixel count


def _draw_primitive(
    prim: Primitive,
    camera: Camera,
    owner: int,
    canvas: np.ndarray,
    zbuf: np.ndarray,
    idbuf: np.ndarray,
    light: np.ndarray,
    ambient: float,
) -> None:
    """Ray-cast one tapered capsule: per-pixel depth and normal from the closest axis point."""
    (uv_a, uv_b), (za, zb) = camera.project(np.stack([prim.start, prim.end]))
    if min(za, zb) <= NEAR_PLANE_M:
        return
    au, av = float(uv_a[0]), float(uv_a[1])
    bu, bv = float(uv_b[0]), float(uv_b[1])
    ra = max(camera.focal * prim.radius_start / za, prim.min_radius_px)
    rb = max(camera.focal * prim.radius_end / zb, prim.min_radius_px)
    height, width = zbuf.shape
    x0 = max(math.floor(min(au - ra, bu - rb)) - 1, 0)
    x1 = min(math.ceil(max(au + ra, bu + rb)) + 2, width)
    y0 = max(math.floor(min(av - ra, bv - rb)) - 1, 0)
    y1 = min(math.ceil(max(av + ra, bv + rb)) + 2, height)
    if x0 >= x1 or y0 >= y1:
        return
    px = np.arange(x0, x1, dtype=np.float32) - au
    py = np.arange(y0, y1, dtype=np.float32)[:, None] - av
    ex, ey = bu - au, bv - av
    length2 = ex * ex + ey * ey
    if length2 > 1e-6:
        t = np.clip((px * ex + py * ey) * (1.0 / length2), 0.0, 1.0)
    else:
        t = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    dx = px - t * ex
    dy = py - t * ey
    dist = np.sqrt(dx * dx + dy * dy)
    radius = ra + t * (rb - ra)
    alpha = np.clip(radius + 0.5 - dist, 0.0, 1.0)
    inside = alpha > 0.0
    if not inside.any():
        return
    # Work on the covered pixels only: a diagonal limb fills a small part of its box.
    rows, cols = np.nonzero(inside)
    t, dx, dy, dist, radius, alpha = (
        t[inside],
        dx[inside],
        dy[inside],
        dist[inside],
        radius[inside],
        alpha[inside],
    )
    inv = 1.0 / np.maximum(dist, radius)
    nx, ny = dx * inv, dy * inv
    nz = np.sqrt(np.clip(1.0 - nx * nx - ny * ny, 0.0, 1.0))  # towards the camera
    world_radius = prim.radius_start + t * (prim.radius_end - prim.radius_start)
    depth = za + t * (zb - za) - nz * world_radius
    rows += y0
    cols += x0
    front = depth < zbuf[rows, cols]
    if not front.any():
        return
    rows, cols, alpha, depth = rows[front], cols[front], alpha[front], depth[front]
    nx, ny, nz = nx[front], ny[front], nz[front]
    if prim.shading is not None:
        nx, ny, nz = prim.shading.normals(camera, cols.astype(np.float32), rows.astype(np.float32))
    lambert = np.clip(nx * light[0] + ny * light[1] - nz * light[2], 0.0, 1.0)
    shade = (ambient + (1.0 - ambient) * lambert)[:, None]
    colour = np.broadcast_to(prim.colour, (len(rows), 3))
    if prim.hair is not None and prim.head_axes is not None:
        up_cam, forward_cam = camera.to_camera(np.stack(prim.head_axes))
        n_up = nx * up_cam[0] + ny * up_cam[1] - nz * up_cam[2]
        n_forward = nx * forward_cam[0] + ny * forward_cam[1] - nz * forward_cam[2]
        # Hair covers the crown and the back of the head, down to the neck when long.
        back_limit, lowest = (-0.05, -0.9) if prim.long_hair else (-0.35, -0.35)
        hair = (n_up > 0.45) | ((n_forward < back_limit) & (n_up > lowest))
        colour = np.where(hair[:, None], prim.hair, colour)
    a = alpha[:, None]
    canvas[rows, cols] = a * (colour * shade) + (1.0 - a) * canvas[rows, cols]
    own = alpha >= 0.5
    zbuf[rows[own], cols[own]] = depth[own]
    idbuf[rows[own], cols[own]] = owner


def _label_joints(
    person: Person, index: int, camera: Camera, zbuf: np.ndarray, idbuf: np.ndarray
) -> np.ndarray:
    """(17, 3) COCO keypoints from the rendered buffers: 0 outside, 1 hidden, 2 visible."""
    uv, depth = camera.project(person.joints)
    height, width = zbuf.shape
    labels = np.zeros((NUM_JOINTS, 3), dtype=np.float64)
    inside = (
        (depth > NEAR_PLANE_M)
        & (uv[:, 0] >= 0) & (uv[:, 0] <= width - 1)
        & (uv[:, 1] >= 0) & (uv[:, 1] <= height - 1)
    )  # fmt: skip
    cols = np.clip(np.rint(uv[:, 0]), 0, width - 1).astype(np.intp)
    rows = np.clip(np.rint(uv[:, 1]), 0, height - 1).astype(np.intp)
    # The buffers are sampled at the nearest pixel centre, up to 0.7 px from the joint: near a
    # silhouette the surface depth changes fast there, so allow one pixel's footprint more.
    tolerance = person.tolerances + depth / camera.focal
    shown = (idbuf[rows, cols] == index) & (zbuf[rows, cols] >= depth - tolerance)
    labels[inside, :2] = uv[inside]
    labels[inside, 2] = np.where(shown[inside], 2.0, 1.0)
    return labels


def render_scene(
    camera: Camera,
    people: Sequence[Person],
    background: np.ndarray | None = None,
    props: Sequence[Primitive] = (),
    light: Light | None = None,
) -> SceneRender:
    """Draw people (and occluding props) over ``background`` and label every joint.

    Primitives are drawn far to near so anti-aliased edges blend over what lies behind them; the
    z-buffer keeps interpenetrating parts correct.
    """
    h, w = camera.height, camera.width
    if background is None:
        canvas = np.full((h, w, 3), 127.0, dtype=np.float32)
    else:
        canvas = np.asarray(background, dtype=np.float32).copy()
    zbuf = np.full((h, w), np.inf, dtype=np.float32)
    idbuf = np.full((h, w), BACKGROUND_ID, dtype=np.int16)
    light = light or Light()
    items = [(p, i) for i, person in enumerate(people) for p in person.primitives]
    items += [(p, PROP_ID) for p in props]
    depths = [float(camera.to_camera(np.stack([p.start, p.end]))[:, 2].mean()) for p, _ in items]
    direction = light.unit()
    for k in sorted(range(len(items)), key=lambda k: -depths[k]):
        prim, owner = items[k]
        _draw_primitive(prim, camera, owner, canvas, zbuf, idbuf, direction, light.ambient)

    keypoints = np.zeros((len(people), NUM_JOINTS, 3))
    boxes = np.zeros((len(people), 4))
    areas = np.zeros(len(people))
    for i, person in enumerate(people):
        keypoints[i] = _label_joints(person, i, camera, zbuf, idbuf)
        mask = idbuf == i
        areas[i] = float(mask.sum())
        if areas[i] > 0:
            cols = np.flatnonzero(mask.any(axis=0))
            rows = np.flatnonzero(mask.any(axis=1))
            boxes[i] = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
    image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    return SceneRender(image, idbuf, zbuf, keypoints, boxes, areas)


# ---------------------------------------------------------------------------------------------
# Backgrounds and global lighting
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Centred, size-normalised pixel coordinates, shared by every texture of one image size."""
    scale = float(max(height, width))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return (xs - width / 2) / scale, (ys - height / 2) / scale


def _directional(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Coordinate along a random direction, about -0.7..0.7 across the image."""
    xs, ys = _pixel_grid(height, width)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    return xs * math.cos(angle) + ys * math.sin(angle)


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One random texture layer (H, W, 3) float32 in 0..255."""
    kind = rng.choice(["noise", "stripes", "checker", "shapes", "gradient"])
    c1, c2 = _random_colour(rng), _random_colour(rng)
    if kind == "noise":
        cells = int(rng.integers(2, 40))
        channels = 3 if rng.random() < 0.3 else 1
        small = rng.random((cells, cells, channels), dtype=np.float32)
        mix = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        mix = np.clip(mix.reshape(height, width, channels), 0.0, 1.0)
        return c1 + mix * (c2 - c1)
    if kind == "stripes":
        period = rng.uniform(3.0, 40.0) / max(height, width)
        wave = np.sin(_directional(rng, height, width) * (2.0 * math.pi / period))
        mix = (wave > rng.uniform(-0.5, 0.5)).astype(np.float32) if rng.random() < 0.5 else (
            0.5 + 0.5 * wave)  # fmt: skip
        return c1 + mix[..., None] * (c2 - c1)
    if kind == "checker":
        size = rng.uniform(4.0, 48.0) / max(height, width)
        xs, ys = _pixel_grid(height, width)
        angle = rng.uniform(0.0, math.pi / 2)
        along = xs * math.cos(angle) + ys * math.sin(angle)
        across = ys * math.cos(angle) - xs * math.sin(angle)
        mix = (np.floor(along / size) + np.floor(across / size)) % 2
        return c1 + mix.astype(np.float32)[..., None] * (c2 - c1)
    if kind == "shapes":
        layer = np.empty((height, width, 3), np.float32)
        layer[:] = c1
        for _ in range(int(rng.integers(3, 16))):
            colour = tuple(float(c) for c in _random_colour(rng))
            cx, cy = (int(v) for v in rng.integers(0, (width, height)))
            size = int(rng.integers(3, max(height, width) // 3))
            shape = rng.integers(4)
            if shape == 0:
                cv2.circle(layer, (cx, cy), size, colour, -1, cv2.LINE_AA)
            elif shape == 1:
                cv2.rectangle(layer, (cx, cy), (cx + size, cy + int(rng.integers(3, size + 4))),
                              colour, -1)  # fmt: skip
            elif shape == 2:
                end = (int(rng.integers(0, width)), int(rng.integers(0, height)))
                cv2.line(layer, (cx, cy), end, colour, int(rng.integers(1, 8)), cv2.LINE_AA)
            else:
                axes = (size, int(rng.integers(2, size + 3)))
                angle = float(rng.uniform(0, 180))
                cv2.ellipse(layer, (cx, cy), axes, angle, 0, 360, colour, -1, cv2.LINE_AA)
        sigma = rng.uniform(0.0, 4.0)
        return cv2.GaussianBlur(layer, (0, 0), sigma) if sigma > 0.5 else layer
    ramp = np.clip(_directional(rng, height, width) * rng.uniform(0.7, 2.0) + 0.5, 0.0, 1.0)
    return c1 + ramp[..., None] * (c2 - c1)


def render_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Layered textures (gradients, noise, stripes, checks, blurred shapes) with a floor region."""
    image = _texture(rng, height, width)
    for _ in range(int(rng.integers(0, 3))):
        layer = _texture(rng, height, width)
        image = image + rng.uniform(0.2, 0.8) * (layer - image)
    if rng.random() < 0.5:  # a floor below a horizon, seen in most photos of people
        horizon = rng.uniform(0.3, 0.85) * height
        ys = np.arange(height, dtype=np.float32)[:, None, None]
        blend = np.clip((ys - horizon) / rng.uniform(1.0, 8.0), 0.0, 1.0)
        image = image + blend * (_texture(rng, height, width) - image)
    if rng.random() < 0.4:  # depth of field
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.7, 2.5))
    return image.astype(np.float32)


def apply_global_lighting(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Brightness, contrast, colour cast, a directional light falloff, sensor noise and blur."""
    height, width = image.shape[:2]
    out = image.astype(np.float32)
    falloff = 1.0 + rng.uniform(-0.6, 0.6) * _directional(rng, height, width)
    out *= falloff[..., None]
    mean = float(out.mean())
    out = (out - mean) * rng.uniform(0.65, 1.3) + mean + rng.uniform(-35.0, 35.0)
    out *= rng.uniform(0.85, 1.15, 3).astype(np.float32)
    if rng.random() < 0.25:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.4, 1.1))
    sigma = rng.uniform(0.0, 7.0)
    if sigma > 1.0:
        out += rng.standard_normal(out.shape, dtype=np.float32) * sigma
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Random scenes
# ---------------------------------------------------------------------------------------------


def _sample_yaw(rng: np.random.Generator, views: tuple[str, ...] = VIEWS) -> float:
    """Mostly frontal views, as in photos, but with plenty of side and back views."""
    if views == VIEWS:
        view = VIEWS[int(np.searchsorted(np.cumsum(VIEW_WEIGHTS), rng.random(), side="right"))]
    else:
        weights = np.array([VIEW_WEIGHTS[VIEWS.index(v)] for v in views])
        view = views[rng.choice(len(views), p=weights / weights.sum())]
    if view == "front":
        return float(rng.uniform(-60.0, 60.0))
    if view == "side":
        return float(rng.choice([-1.0, 1.0]) * rng.uniform(60.0, 120.0))
    return float(rng.uniform(120.0, 240.0))


def sample_person(
    rng: np.random.Generator,
    camera: Camera,
    pelvis_uv: tuple[float, float],
    pixel_height: float,
    options: SceneOptions | None = None,
) -> Person:
    """A random person whose pelvis projects to ``pelvis_uv`` and who is ~``pixel_height`` tall."""
    options = options or SceneOptions()
    weights = options.family_weights()
    family = None if weights is None else options.pose_families[rng.choice(len(weights), p=weights)]
    if rng.random() < 0.1:  # children: shorter, with a relatively bigger head
        height, head_scale = rng.uniform(1.0, 1.45), 1.2
    else:
        height, head_scale = rng.uniform(1.5, 1.95), 1.0
    depth = max(camera.focal * height / pixel_height, 1.0)
    position = camera.backproject(pelvis_uv[0], pelvis_uv[1], depth)
    return make_person(
        sample_pose(rng, family),
        position,
        yaw=_sample_yaw(rng, options.views),
        lean=float(rng.normal(0.0, 5.0)),
        roll=float(rng.normal(0.0, 4.0)),
        height=float(height),
        girth=float(rng.uniform(0.85, 1.3)),
        appearance=Appearance.sample(rng),
        limb_scale=rng.uniform(0.95, 1.05, 6),
        head_scale=head_scale,
    )


def _sample_props(rng: np.random.Generator, camera: Camera) -> list[Primitive]:
    """Poles, posts and blobs in front of people, so that occlusion is not only by people."""
    props = []
    for _ in range(int(rng.integers(1, 3))):
        depth = rng.uniform(1.5, 8.0)
        start = camera.backproject(*rng.uniform(0, (camera.width, camera.height)), depth)
        end = camera.backproject(*rng.uniform(0, (camera.width, camera.height)), depth)
        radius = float(rng.uniform(0.03, 0.3))
        props.append(Primitive(start, end, radius, radius, _random_colour(rng)))
    return props


def sample_scene(
    rng: np.random.Generator,
    image_size: tuple[int, int] = (256, 256),
    options: SceneOptions | None = None,
) -> tuple[Camera, list[Person], list[Primitive], Light]:
    """A random camera, 1..``max_people`` people (often overlapping), maybe props, and a light."""
    options = options or SceneOptions()
    low, high = options.height_range
    height, width = image_size
    camera = Camera.create(
        width,
        height,
        fov_deg=rng.uniform(40.0, 75.0),
        pitch=rng.uniform(-12.0, 15.0),
        roll=rng.normal(0.0, 3.0),
        principal_offset=tuple(rng.uniform(-0.05, 0.05, 2) * (width, height)),
    )
    people: list[Person] = []
    anchors: list[tuple[float, float, float]] = []  # pelvis u, v and pixel height so far
    for _ in range(int(rng.integers(1, options.max_people + 1))):
        pixel_height = height * math.exp(rng.uniform(math.log(low), math.log(high)))
        if anchors and rng.random() < 0.4:  # deliberately overlap someone already placed
            u0, v0, h0 = anchors[int(rng.integers(len(anchors)))]
            u = u0 + rng.uniform(-0.25, 0.25) * h0
            v = v0 + rng.uniform(-0.15, 0.15) * h0
        else:
            u = rng.uniform(-0.05, 1.05) * width
            v = rng.uniform(0.25, 0.8) * height
        person = sample_person(rng, camera, (u, v), pixel_height, options)
        pelvis = person.joints[[L_HIP, R_HIP]].mean(axis=0)
        others = [p.joints[[L_HIP, R_HIP]].mean(axis=0) for p in people]
        if any(np.linalg.norm(pelvis - other) < 0.6 for other in others):
            continue  # two bodies in one place would interpenetrate
        people.append(person)
        anchors.append((u, v, pixel_height))
    props = _sample_props(rng, camera) if rng.random() < 0.2 else []
    direction = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.9, 0.3), -rng.uniform(0.3, 1.0)])
    light = Light(direction=direction, ambient=float(rng.uniform(0.3, 0.65)))
    return camera, people, props, light


MIN_KEYPOINT_AREA = 32 * 32


def _annotations(render: SceneRender) -> list[dict]:
    """COCO annotation dicts (without ids) for every person with a visible silhouette."""
    annotations = []
    for i in range(len(render.keypoints)):
        if render.areas[i] <= 0:
            continue  # entirely outside the image or hidden: nothing to annotate
        keypoints = render.keypoints[i]
        if render.areas[i] < MIN_KEYPOINT_AREA:
            keypoints = np.zeros_like(keypoints)  # too small to label, as in COCO
        rle = mask_utils.encode(np.asfortranarray((render.id_map == i).astype(np.uint8)))
        annotations.append(
            {
                **_person_annotation(render, i, keypoints),
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
            }
        )
    return annotations


def _person_annotation(render: SceneRender, i: int, keypoints: np.ndarray) -> dict:
    """The COCO fields of person ``i`` that images and sequences share (keypoints as given)."""
    flat: list[float | int] = []
    for x, y, v in keypoints:
        flat += [round(float(x), 2), round(float(y), 2), int(v)]
    return {
        "category_id": 1,
        "bbox": [float(b) for b in render.boxes[i]],
        "area": float(render.areas[i]),
        "iscrowd": 0,
        "num_keypoints": int((keypoints[:, 2] > 0).sum()),
        "keypoints": flat,
    }


def synthesize_image(
    rng: np.random.Generator,
    image_size: tuple[int, int] = (256, 256),
    options: SceneOptions | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """One finished image (uint8 BGR) and its COCO annotations (without ids)."""
    camera, people, props, light = sample_scene(rng, image_size, options)
    background = render_background(rng, *image_size)
    render = render_scene(camera, people, background, props, light)
    return apply_global_lighting(rng, render.image), _annotations(render)


# ---------------------------------------------------------------------------------------------
# Dataset writer and command line
# ---------------------------------------------------------------------------------------------


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``: independent of worker count and of other images."""
    return np.random.default_rng([seed, index])


def _init_worker() -> None:
    cv2.setNumThreads(1)  # the pool already uses every core; nested threads only contend


def _generate_and_write(job: tuple[int, int, str, tuple[int, int], SceneOptions]) -> list[dict]:
    seed, index, image_dir, image_size, options = job
    image, annotations = synthesize_image(image_rng(seed, index), image_size, options)
    path = Path(image_dir) / f"{index + 1:012d}.jpg"
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"could not write {path}")
    return annotations


def coco_categories() -> list[dict]:
    """The single COCO person category with its keypoint names and 1-based skeleton."""
    return [
        {
            "id": 1,
            "name": "person",
            "supercategory": "person",
            "keypoints": list(COCO_KEYPOINTS.joint_names),
            "skeleton": [[a + 1, b + 1] for a, b in COCO_KEYPOINTS.limbs],
        }
    ]


def generate_dataset(
    out_dir: Path,
    num_images: int,
    seed: int,
    split: str = "train",
    image_size: tuple[int, int] = (256, 256),
    max_people: int = 4,
    workers: int | None = None,
    *,
    pose_families: Sequence[str] = POSE_FAMILIES,
    height_range: tuple[float, float] = (0.08, 1.3),
    views: Sequence[str] = VIEWS,
    progress: bool = True,
) -> Path:
    """Write ``num_images`` rendered images and ``annotations/person_keypoints_{split}.json``.

    Returns the annotation file's path. The same seed gives byte-identical files for any
    ``workers`` (default ``min(4, cpu count)``). Workers are spawned processes, so a script that
    calls this with ``workers > 1`` needs the usual ``if __name__ == "__main__":`` guard.
    """
    if num_images < 0 or seed < 0:
        raise ValueError("num_images and seed must be >= 0")
    options = SceneOptions(max_people, tuple(pose_families), tuple(height_range), tuple(views))
    out_dir = Path(out_dir)
    image_dir = out_dir / "images" / split
    annotation_path = out_dir / "annotations" / f"person_keypoints_{split}.json"
    image_dir.mkdir(parents=True, exist_ok=True)
    annotation_path.parent.mkdir(parents=True, exist_ok=True)
    height, width = image_size
    jobs = [(seed, i, str(image_dir), (height, width), options) for i in range(num_images)]
    workers = min(4, os.cpu_count() or 1) if workers is None else workers

    def results() -> Iterator[list[dict]]:
        if workers <= 1 or num_images < 2:
            yield from map(_generate_and_write, jobs)
            return
        # spawn: the parent may hold torch/OpenMP threads, which fork does not copy safely.
        context = mp.get_context("spawn")
        with context.Pool(min(workers, num_images), initializer=_init_worker) as pool:
            chunk = max(1, min(8, num_images // (4 * workers)))
            yield from pool.imap(_generate_and_write, jobs, chunksize=chunk)

    images, annotations = [], []
    bar = tqdm(results(), total=num_images, desc="synth", unit="img", disable=not progress)
    for index, image_annotations in enumerate(bar):
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height}
        )
        for annotation in image_annotations:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    dataset = {
        "info": {
            "description": "OmniPose Serve synthetic person keypoints (training.synth)",
            "seed": seed,
            "split": split,
            "version": "1.0",
            "scene": dataclasses.asdict(options),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    annotation_path.write_text(json.dumps(dataset, separators=(",", ":")))
    return annotation_path


# ---------------------------------------------------------------------------------------------
# Video sequences: people walking with ground-truth identities (tracking tests and benchmarks)
# ---------------------------------------------------------------------------------------------

SEQUENCE_KINDS = ("walk", "cross", "enter_exit")
SEQUENCE_FPS = 25
# Pixel overlap of two people's visible boxes (IoU) above which both count as "crossing": the
# tracking target "no identity switch for people who do not cross" is judged on the others.
CROSSING_IOU = 0.05


@dataclass
class Walker:
    """One person of a sequence: a fixed body and appearance moving along a straight image path.

    The pelvis moves linearly in the image from ``start_uv`` to ``end_uv`` over frames
    ``first_frame``..``last_frame`` at a constant camera depth; the legs and arms swing in a
    walking cycle whose phase advances with the distance walked, so the feet do not slide.
    """

    track_id: int
    start_uv: tuple[float, float]
    end_uv: tuple[float, float]
    first_frame: int
    last_frame: int
    height_m: float
    pixel_height: float
    base_angles: dict[str, np.ndarray]
    appearance: Appearance
    girth: float
    stride_phase: float

    def active(self, frame: int) -> bool:
        return self.first_frame <= frame <= self.last_frame

    def person(self, camera: Camera, frame: int) -> Person:
        span = max(self.last_frame - self.first_frame, 1)
        t = (frame - self.first_frame) / span
        u = self.start_uv[0] + t * (self.end_uv[0] - self.start_uv[0])
        v = self.start_uv[1] + t * (self.end_uv[1] - self.start_uv[1])
        depth = camera.focal * self.height_m / self.pixel_height
        position = camera.backproject(u, v, depth)
        direction = 1.0 if self.end_uv[0] >= self.start_uv[0] else -1.0
        # One stride (two steps) per ~1.4 body heights walked, in pixels at this depth.
        walked = abs(u - self.start_uv[0])
        phase = self.stride_phase + 2.0 * math.pi * walked / (1.4 * self.pixel_height)
        swing = 24.0 * math.sin(phase)
        angles = {name: np.array(value, dtype=np.float64) for name, value in
                  self.base_angles.items()}  # fmt: skip
        angles["hip_flex"] = np.array([swing, -swing])
        # The leg swinging back bends at the knee, the forward one is nearly straight.
        angles["knee"] = np.array([max(0.0, -swing) * 1.6 + 5.0, max(0.0, swing) * 1.6 + 5.0])
        angles["shoulder_flex"] = np.array([-swing, swing]) * 0.8
        angles["elbow"] = np.array([20.0, 20.0])
        return make_person(
            Pose(angles),
            position,
            yaw=direction * 40.0,  # three-quarter view in the walking direction
            height=self.height_m,
            girth=self.girth,
            appearance=self.appearance,
        )


def _sample_walker(
    rng: np.random.Generator,
    track_id: int,
    start_uv: tuple[float, float],
    end_uv: tuple[float, float],
    frames: tuple[int, int],
    pixel_height: float,
) -> Walker:
    base = _standing_angles(rng)
    base["neck_yaw"] = np.array(rng.normal(0.0, 10.0))
    return Walker(
        track_id=track_id,
        start_uv=start_uv,
        end_uv=end_uv,
        first_frame=frames[0],
        last_frame=frames[1],
        height_m=float(rng.uniform(1.55, 1.9)),
        pixel_height=pixel_height,
        base_angles=base,
        appearance=Appearance.sample(rng),
        girth=float(rng.uniform(0.9, 1.2)),
        stride_phase=float(rng.uniform(0.0, 2.0 * math.pi)),
    )


def sample_walkers(
    rng: np.random.Generator, kind: str, num_frames: int, image_size: tuple[int, int]
) -> list[Walker]:
    """The people of one sequence of ``kind``:

    * ``walk``: two people walking the same way at the same speed in separate lanes (never
      overlapping), both in view throughout;
    * ``cross``: two people walking towards each other at different depths; the nearer one passes
      in front of the other halfway through;
    * ``enter_exit``: at walking speed, one person walks out of the frame halfway through; a
      second walks in from the other edge a while before and is in view at the end.
    """
    height, width = image_size
    last = num_frames - 1
    scale = rng.uniform(0.55, 0.7) * height  # pixel height of the first person
    row = 0.55 * height  # pelvis row
    direction = 1.0 if rng.random() < 0.5 else -1.0

    def lane(start: float, end: float) -> tuple[tuple[float, float], tuple[float, float]]:
        if direction < 0:
            start, end = width - start, width - end
        return (start, row), (end, row)

    if kind == "walk":
        gap = rng.uniform(0.45, 0.5) * width
        first = lane(0.22 * width, 0.22 * width + 0.28 * width)
        a = _sample_walker(rng, 1, *first, (0, last), scale)
        second = lane(0.22 * width + gap, 0.22 * width + gap + 0.28 * width)
        b = _sample_walker(rng, 2, *second, (0, last), scale * rng.uniform(0.9, 1.0))
        return [a, b]
    if kind == "cross":
        a = _sample_walker(rng, 1, *lane(0.12 * width, 0.88 * width), (0, last), scale)
        far_start, far_end = lane(0.85 * width, 0.15 * width)
        far_row = row - 0.04 * height  # further away: higher in the image, smaller
        b = _sample_walker(rng, 2, (far_start[0], far_row), (far_end[0], far_row), (0, last),
                           scale * rng.uniform(0.7, 0.8))  # fmt: skip
        return [a, b]
    if kind == "enter_exit":
        # Walking speed: ~0.035 body heights per frame (1.4 m/s at 25 fps for a 1.7 m person).
        step = 0.035 * scale * rng.uniform(1.0, 1.3) * direction
        margin = 0.35 * scale  # a pelvis this far outside the frame leaves no pixel in view
        outside_start = -margin if direction > 0 else width + margin
        outside_end = width + margin if direction > 0 else -margin
        leaves = int(0.55 * last)  # the first person walks out of the frame here
        first = (outside_end - step * leaves, row), (outside_end, row)
        a = _sample_walker(rng, 1, *first, (0, leaves), scale)
        enters = int(0.3 * last)  # the second walks in here and is still in view at the end
        second = (outside_start, row), (outside_start + step * (last - enters), row)
        b = _sample_walker(rng, 2, *second, (enters, last), scale)
        return [a, b]
    raise ValueError(f"unknown sequence kind {kind!r}; expected one of {SEQUENCE_KINDS}")


def synthesize_sequence(
    rng: np.random.Generator,
    kind: str,
    num_frames: int,
    image_size: tuple[int, int] = (240, 320),
) -> Iterator[tuple[np.ndarray, list[dict]]]:
    """Frames (uint8 BGR) of one sequence and each frame's annotations (without ids): COCO
    keypoint annotations of the visible people plus their ``track_id``.

    The camera, background and light are fixed for the sequence and frames get no random global
    lighting, so any frame-to-frame change comes from the people moving.
    """
    height, width = image_size
    walkers = sample_walkers(rng, kind, num_frames, image_size)
    camera = Camera.create(width, height, fov_deg=55.0, pitch=float(rng.uniform(-3.0, 3.0)))
    background = render_background(rng, height, width)
    light = Light(direction=np.array([rng.uniform(-0.6, 0.6), -0.5, -0.8]),
                  ambient=float(rng.uniform(0.4, 0.6)))  # fmt: skip
    for frame in range(num_frames):
        present = [w for w in walkers if w.active(frame)]
        render = render_scene(camera, [w.person(camera, frame) for w in present], background,
                              light=light)  # fmt: skip
        annotations = []
        for walker, annotation in zip(present, _sequence_annotations(render), strict=True):
            if annotation is not None:
                annotations.append({**annotation, "track_id": walker.track_id})
        yield render.image, annotations


def _sequence_annotations(render: SceneRender) -> list[dict | None]:
    """Per person of ``render``: its annotation, or None when no pixel of it is in view.

    Unlike training images, small people keep their joint labels: a track's ground truth must
    not vanish while the person is in view."""
    out: list[dict | None] = []
    for i in range(len(render.keypoints)):
        if render.areas[i] <= 0:
            out.append(None)
            continue
        out.append(_person_annotation(render, i, render.keypoints[i]))
    return out


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    h = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = w * h
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def crossing_tracks(annotations: Sequence[dict]) -> list[int]:
    """Track ids whose visible box overlaps another person's (IoU > CROSSING_IOU) in some
    frame: the people for whom an identity switch can be excused."""
    by_frame: dict[int, list[dict]] = {}
    for annotation in annotations:
        by_frame.setdefault(annotation["image_id"], []).append(annotation)
    crossing: set[int] = set()
    for people in by_frame.values():
        for i, a in enumerate(people):
            for b in people[i + 1 :]:
                if _box_iou(a["bbox"], b["bbox"]) > CROSSING_IOU:
                    crossing.update((a["track_id"], b["track_id"]))
    return sorted(crossing)


def generate_sequence(
    out_dir: Path,
    name: str,
    kind: str,
    num_frames: int,
    seed: int,
    image_size: tuple[int, int] = (240, 320),
) -> Path:
    """Write one sequence as ``out_dir/name/frames/NNNNNN.jpg`` and
    ``out_dir/name/annotations.json`` (PoseTrack-style COCO JSON, see docs/video.md).
    Returns the annotation file's path."""
    if kind not in SEQUENCE_KINDS:
        raise ValueError(f"unknown sequence kind {kind!r}; expected one of {SEQUENCE_KINDS}")
    if num_frames < 2:
        raise ValueError("a sequence needs at least 2 frames")
    root = Path(out_dir) / name
    frame_dir = root / "frames"
    frame_dir.mkdir(parents=True, exist_ok=True)
    height, width = image_size
    images, annotations = [], []
    rng = np.random.default_rng([seed, SEQUENCE_KINDS.index(kind), num_frames])
    for index, (image, people) in enumerate(synthesize_sequence(rng, kind, num_frames,
                                                                image_size)):  # fmt: skip
        file_name = f"{index + 1:06d}.jpg"
        path = frame_dir / file_name
        if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise OSError(f"could not write {path}")
        image_id = index + 1
        images.append({"id": image_id, "file_name": f"frames/{file_name}", "frame_id": index,
                       "vid_id": name, "nframes": num_frames, "width": width,
                       "height": height})  # fmt: skip
        for person in people:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **person})
    dataset = {
        "info": {
            "description": "OmniPose Serve synthetic video sequence (training.synth)",
            "seed": seed,
            "kind": kind,
            "fps": SEQUENCE_FPS,
            "version": "1.0",
            "crossing_track_ids": crossing_tracks(annotations),
        },
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    path = root / "annotations.json"
    path.write_text(json.dumps(dataset, separators=(",", ":")))
    return path


def generate_sequences(
    out_dir: Path,
    num_sequences: int,
    num_frames: int,
    seed: int,
    image_size: tuple[int, int] = (240, 320),
    kinds: Sequence[str] = SEQUENCE_KINDS,
    progress: bool = True,
) -> list[Path]:
    """``num_sequences`` sequences cycling through ``kinds``, named ``KIND-NN``; their
    annotation files."""
    paths = []
    for index in tqdm(range(num_sequences), desc="sequences", disable=not progress):
        kind = kinds[index % len(kinds)]
        name = f"{kind}-{index:02d}"
        paths.append(generate_sequence(out_dir, name, kind, num_frames, seed + index, image_size))
    return paths


def _image_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 256x256, got {text!r}") from None
    if height < 16 or width < 16:
        raise argparse.ArgumentTypeError("image size must be at least 16x16")
    return height, width


def _pose_families(text: str) -> tuple[str, ...]:
    families = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in families if f not in POSE_FAMILIES]
    if not families or unknown:
        choices = ",".join(POSE_FAMILIES)
        named = ", ".join(unknown) or repr(text)
        raise argparse.ArgumentTypeError(f"unknown pose family {named}; choose from {choices}")
    return families


def _views(text: str) -> tuple[str, ...]:
    views = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in views if v not in VIEWS]
    if not views or unknown:
        named = ", ".join(unknown) or repr(text)
        raise argparse.ArgumentTypeError(f"unknown view {named}; choose from {','.join(VIEWS)}")
    return views


def _height_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(":"))
    except ValueError:
        message = f"expected LOW:HIGH such as 0.3:0.7, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return low, high


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="dataset root directory")
    parser.add_argument("--images", type=_non_negative, default=1000, help="number of images")
    parser.add_argument("--seed", type=_non_negative, default=0, help="random seed")
    parser.add_argument("--split", default="train", help="split name (default: train)")
    parser.add_argument(
        "--size", type=_image_size, default=None, help="HxW (images 256x256, sequences 240x320)"
    )
    parser.add_argument("--max-people", type=_positive, default=4, help="people per image, max")
    parser.add_argument(
        "--pose-families",
        type=_pose_families,
        default=POSE_FAMILIES,
        metavar="F1,F2",
        help=f"comma-separated subset of: {','.join(POSE_FAMILIES)} (default: all)",
    )
    parser.add_argument(
        "--views",
        type=_views,
        default=VIEWS,
        metavar="V1,V2",
        help="comma-separated subset of: front,side,back (default: all)",
    )
    parser.add_argument(
        "--height-range",
        type=_height_range,
        default=(0.08, 1.3),
        metavar="LOW:HIGH",
        help="person height / image height, log-uniform (default 0.08:1.3)",
    )
    parser.add_argument(
        "--workers", type=_positive, default=None, help="processes (default: min(4, cpus))"
    )
    video = parser.add_argument_group("video sequences (docs/video.md)")
    video.add_argument(
        "--sequences",
        type=_positive,
        default=None,
        metavar="N",
        help="render N video sequences with track ids instead of images",
    )
    video.add_argument("--frames", type=_positive, default=60, help="frames per sequence (60)")
    video.add_argument(
        "--kinds",
        type=_sequence_kinds,
        default=SEQUENCE_KINDS,
        metavar="K1,K2",
        help=f"sequence kinds, cycled: {','.join(SEQUENCE_KINDS)} (default: all)",
    )


def _sequence_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in SEQUENCE_KINDS]
    if not kinds or unknown:
        named = ", ".join(unknown) or repr(text)
        choices = ",".join(SEQUENCE_KINDS)
        raise argparse.ArgumentTypeError(f"unknown sequence kind {named}; choose from {choices}")
    return kinds


def _run_synth(args: argparse.Namespace) -> int:
    if args.sequences:
        if args.frames < 2:
            raise SystemExit("synth: error: --frames must be at least 2 for a sequence")
        paths = generate_sequences(
            args.out,
            args.sequences,
            args.frames,
            args.seed,
            image_size=args.size or (240, 320),
            kinds=args.kinds,
        )
        for path in paths:
            print(path)
        return 0
    path = generate_dataset(
        args.out,
        args.images,
        args.seed,
        split=args.split,
        image_size=args.size or (256, 256),
        max_people=args.max_people,
        workers=args.workers,
        pose_families=args.pose_families,
        height_range=args.height_range,
        views=args.views,
    )
    print(path)
    return 0


def add_synth_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``synth`` on a CLI's subcommands; ``args.func(args)`` then runs it."""
    parser = subparsers.add_parser(
        "synth",
        help="render a synthetic COCO person-keypoints dataset",
        description="Render articulated people with COCO keypoints and occlusion labels.",
    )
    _add_arguments(parser)
    parser.set_defaults(func=_run_synth)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omnipose.training.synth", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_arguments(parser)
    return _run_synth(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
