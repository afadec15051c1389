"""Writing a synthetic COCO person-keypoints dataset: images and their annotation file.

Every image draws from its own ``numpy`` generator seeded with ``(seed, index)``, so the output is
byte-identical for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from omnipose.model.skeleton import COCO_KEYPOINTS
from omnipose.training.synth.background import apply_global_lighting, render_background
from omnipose.training.synth.pose import POSE_FAMILIES, VIEWS
from omnipose.training.synth.render import SceneRender, render_scene
from omnipose.training.synth.scene import SceneOptions, sample_scene

JPEG_QUALITY = 90
# Silhouettes below COCO's "small" (32 x 32 px) are annotated without keypoints, as in COCO.
MIN_KEYPOINT_AREA = 32 * 32
# A spawned worker first imports numpy, OpenCV and the renderer (about as long as rendering this
# many images), so by default a worker is started only for every this many images.
IMAGES_PER_DEFAULT_WORKER = 16


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
                **person_annotation(render, i, keypoints),
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
            }
        )
    return annotations


def person_annotation(render: SceneRender, i: int, keypoints: np.ndarray) -> dict:
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
    ``workers`` (default ``min(4, cpu count)``, fewer for a few images: one per
    ``IMAGES_PER_DEFAULT_WORKER``, since a worker's start costs about that much rendering).
    Workers are spawned processes, so a script that calls this with ``workers > 1`` needs the
    usual ``if __name__ == "__main__":`` guard.
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
    if workers is None:
        workers = min(4, os.cpu_count() or 1, max(1, num_images // IMAGES_PER_DEFAULT_WORKER))

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
