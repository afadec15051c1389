"""Random scenes: a camera, people placed at depths that give varied sizes, props and a light.

People are placed at depths that give heights from ~8 % to ~130 % of the image and often overlap
someone already placed, so that occlusion between people is common.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from omnipose.training.synth.body import Appearance, Person, Primitive, make_person, random_colour
from omnipose.training.synth.camera import Camera
from omnipose.training.synth.pose import (
    L_HIP,
    POSE_FAMILIES,
    POSE_FAMILY_WEIGHTS,
    R_HIP,
    VIEW_WEIGHTS,
    VIEWS,
    sample_pose,
)
from omnipose.training.synth.render import Light


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
        props.append(Primitive(start, end, radius, radius, random_colour(rng)))
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
