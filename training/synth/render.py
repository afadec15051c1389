"""Rasterisation of synthetic scenes and the joint labels read from the rendered buffers.

Every body part is a tapered capsule ray-cast as an impostor into a z-buffer with per-pixel depth
and normals, shaded with a directional light and anti-aliased at the edges. A joint is labelled
``v=0`` when it projects outside the image, ``v=1`` when the pixel under it belongs to another
person, a prop or a part of its own body clearly in front of it, and ``v=2`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from omnipose.training.synth.body import Person, Primitive
from omnipose.training.synth.camera import Camera
from omnipose.training.synth.pose import NUM_JOINTS

BACKGROUND_ID = -1  # id-map value where no body or prop was drawn
PROP_ID = -2  # id-map value of occluding props (not people)
NEAR_PLANE_M = 0.1


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
