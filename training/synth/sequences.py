"""Synthetic video sequences: people walking with ground-truth identities.

Used by the tracking tests and benchmarks (docs/video.md): each sequence is written as JPEG frames
and a PoseTrack-style COCO annotation file whose annotations carry a ``track_id``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from omnipose.training.synth.background import render_background
from omnipose.training.synth.body import Appearance, Person, make_person
from omnipose.training.synth.camera import Camera
from omnipose.training.synth.dataset import JPEG_QUALITY, coco_categories, person_annotation
from omnipose.training.synth.pose import Pose, standing_angles
from omnipose.training.synth.render import Light, SceneRender, render_scene

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
    base = standing_angles(rng)
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
        out.append(person_annotation(render, i, render.keypoints[i]))
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
