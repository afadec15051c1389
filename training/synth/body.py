"""Synthetic people: appearance, the capsule primitives a body is drawn with, and posing.

``make_person`` builds a 3D skeleton with human proportions (fractions of body height) from a
``Pose`` and dresses it in tapered capsules (spheres for the head and face details) in skin, hair,
shirt, trousers and shoe colours. Each joint carries a depth tolerance so that the surface of its
own limb does not count as hiding it.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from omnipose.model.skeleton import COCO_KEYPOINTS
from omnipose.training.synth.camera import Camera, rot_x, rot_y, rot_z
from omnipose.training.synth.pose import Pose

MIN_LIMB_RADIUS_PX = 0.75  # keeps every joint's nearest pixel inside its own limb at tiny scales
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


def random_colour(rng: np.random.Generator, min_value: float = 0.05) -> np.ndarray:
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
        shoes = random_colour(rng) * 0.5 if rng.random() < 0.7 else random_colour(rng)
        return cls(
            skin=np.clip(skin, 0, 255).astype(np.float32),
            hair=np.clip(hair, 0, 255).astype(np.float32),
            shirt=random_colour(rng),
            trousers=random_colour(rng),
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

    body_rot = rot_y(yaw) @ rot_x(lean) @ rot_z(roll)
    pelvis_rot = rot_y(float(a["torso_twist"]) * 0.2)
    half = (
        rot_y(float(a["torso_twist"]) * 0.4)
        @ rot_x(float(a["torso_bend"]) / 2)
        @ rot_z(float(a["torso_side"]) / 2)
    )
    waist_rot = pelvis_rot @ half
    chest_rot = waist_rot @ half
    neck_rot = chest_rot @ rot_y(float(a["neck_yaw"]) * 0.3) @ rot_x(float(a["neck_flex"]) * 0.4)
    head_rot = (
        chest_rot
        @ rot_y(float(a["neck_yaw"]))
        @ rot_x(float(a["neck_flex"]))
        @ rot_z(float(a["neck_tilt"]))
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
            @ rot_x(-float(a["shoulder_flex"][i]))
            @ rot_z(sign * float(a["shoulder_abd"][i]))
            @ rot_y(sign * float(a["shoulder_twist"][i]))
        )
        fore_rot = upper_rot @ rot_x(-float(a["elbow"][i]))
        elbow = shoulder + upper_rot @ (DOWN * 0.186 * h * upper_k)
        wrist = elbow + fore_rot @ (DOWN * 0.146 * h * fore_k)
        hand_end = wrist + fore_rot @ np.array([0.0, -0.075 * h, 0.008 * h])

        hip = pelvis_rot @ np.array([sign * 0.058 * h, 0.0, 0.0])
        thigh_rot = (
            pelvis_rot
            @ rot_x(-float(a["hip_flex"][i]))
            @ rot_z(sign * float(a["hip_abd"][i]))
            @ rot_y(sign * float(a["hip_twist"][i]))
        )
        shin_rot = thigh_rot @ rot_x(float(a["knee"][i]))
        foot_rot = shin_rot @ rot_x(float(a["ankle"][i]))
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
