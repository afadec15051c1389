"""Body poses for the synthetic people: joint angles with anatomical limits and pose families.

A pose is a set of joint angles (spine, neck, and per side shoulder, elbow, hip, knee, ankle)
clipped to anatomical ranges, so knees and elbows bend one way and hips and shoulders stay
plausible. ``sample_pose`` draws from pose families (standing, walking, running, arms raised,
sitting, crouching, kneeling, bending, free) that photos of people commonly show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from omnipose.model.skeleton import COCO_KEYPOINTS

NUM_JOINTS = COCO_KEYPOINTS.num_joints
# COCO joint indices.
NOSE, L_EYE, R_EYE, L_EAR, R_EAR = 0, 1, 2, 3, 4
L_SHOULDER, R_SHOULDER, L_ELBOW, R_ELBOW, L_WRIST, R_WRIST = 5, 6, 7, 8, 9, 10
L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANKLE, R_ANKLE = 11, 12, 13, 14, 15, 16

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


def standing_angles(rng: np.random.Generator) -> dict[str, np.ndarray]:
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
    a = standing_angles(rng)
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
