"""Data sets for training and evaluation built from a config: augmented training crops with
heatmap targets, and evaluation images.

Layouts (the original project's)::

    COCO / synthetic: ROOT/annotations/person_keypoints_{SPLIT}.json
                      ROOT/images/{SPLIT}/FILE  or  ROOT/images/{SPLIT}.zip (read in place)
    MPII:             ROOT/annot/{SPLIT}.json   (HRNet's JSON: image, center, scale, joints,
                      joints_vis; joints 1-based there, 0-based here)
                      ROOT/images/FILE  or  ROOT/images.zip

Annotation files are read by :mod:`omnipose.training.records`, images by
:mod:`omnipose.training.image_sources`. Training samples are augmented as published (random
scale, rotation with probability 0.6, flip with joint swapping, half-body) from a random
generator seeded by (seed, epoch, index): the same sample gets the same augmentation whatever the
number of workers or processes, which makes resumed runs exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from omnipose.model.codec import encode_gaussian_heatmaps
from omnipose.model.configs import ModelConfig
from omnipose.model.skeleton import KeypointSpec
from omnipose.model.transforms import (
    PIXEL_STD,
    get_affine_transforms,
    normalize_crops,
    transform_points,
    warp_crops,
)
from omnipose.training.config import DataSection
from omnipose.training.image_sources import ImageSource, open_image_source
from omnipose.training.records import (
    DataError,
    PersonRecords,
    coco_annotation_path,
    coco_image_dir,
    load_coco_records,
    load_detection_records,
    load_mpii_records,
    mpii_annotation_path,
    mpii_gt_path,
)

# Joints counted as "upper body" by the half-body augmentation.
UPPER_BODY_JOINTS = {
    "coco": tuple(range(11)),  # face, shoulders, elbows, wrists
    "mpii": (7, 8, 9, 10, 11, 12, 13, 14, 15),  # thorax, neck, head, arms
}
HALF_BODY_PADDING = 1.5
FLIP_PROBABILITY = 0.5


# --- building data sets from a config ----------------------------------------------------------


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"data root {root} not found")


def load_split(
    data: DataSection,
    model_config: ModelConfig,
    split: str,
    boxes_file: str | None = None,
    min_area: float = 0.0,
) -> tuple[PersonRecords, ImageSource, Path]:
    """Persons, image source and annotation file of one split of the configured data set.

    ``min_area`` filters ground-truth persons (training only: evaluation must see them all).
    """
    root = Path(data.root)
    _check_root(root)
    if data.format == "mpii":
        annotation_file = mpii_annotation_path(root, split)
        gt_file = mpii_gt_path(data, split)
        records = load_mpii_records(annotation_file, model_config, gt_file)
        return records, open_image_source(root / "images"), annotation_file
    annotation_file = coco_annotation_path(root, split)
    if boxes_file:
        records = load_detection_records(
            annotation_file, Path(boxes_file), model_config, data.box_score_threshold
        )
    else:
        records = load_coco_records(annotation_file, model_config, min_area)
    return records, open_image_source(coco_image_dir(root, split)), annotation_file


# --- training samples ---------------------------------------------------------------------------


def half_body_box(
    joints: np.ndarray,
    visible: np.ndarray,
    upper_body: tuple[int, ...],
    aspect_ratio: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Center and scale of a box around the upper or the lower body's visible joints.

    As published: the upper body is picked when a NORMAL sample is below 0.5 (probability about
    0.69, not 0.5) and it has more than two visible joints, else the lower body if it has more
    than two, else the upper; ``None`` when fewer than two joints would remain. The extent is
    measured in pixel-index terms, max - min + 1.
    """
    visible_joints = np.flatnonzero(visible > 0)
    is_upper = np.isin(visible_joints, upper_body)
    upper, lower = visible_joints[is_upper], visible_joints[~is_upper]
    if rng.standard_normal() < 0.5 and len(upper) > 2:
        selected = upper
    else:
        selected = lower if len(lower) > 2 else upper
    if len(selected) < 2:
        return None
    points = joints[selected].astype(np.float64)
    center = points.mean(axis=0)
    width, height = points.max(axis=0) - points.min(axis=0) + 1
    if width > aspect_ratio * height:
        height = width / aspect_ratio
    elif width < aspect_ratio * height:
        width = height * aspect_ratio
    scale = np.array([width, height]) / PIXEL_STD * HALF_BODY_PADDING
    return center, scale


def target_weights(
    heatmap_joints: np.ndarray, visible: np.ndarray, heatmap_size: tuple[int, int], sigma: float
) -> np.ndarray:
    """Published target weights ``[..., J]``: 1 for a labelled joint unless its 3-sigma window
    misses the heatmap.

    The window's corners are truncated to integers as published: upper-left
    ``int(mu - 3 sigma)``, bottom-right ``int(mu + 3 sigma + 1)``; the joint is dropped when
    upper-left >= the map size or bottom-right < 0 on either axis. (Truncation toward zero keeps
    a joint whose bottom-right lies in (-1, 0]; its target map is empty, as published.)
    """
    height, width = heatmap_size
    radius = 3.0 * sigma
    points = np.asarray(heatmap_joints, dtype=np.float64)
    upper_left = np.trunc(points - radius)
    bottom_right = np.trunc(points + radius + 1)
    misses = (
        (upper_left[..., 0] >= width)
        | (upper_left[..., 1] >= height)
        | (bottom_right[..., 0] < 0)
        | (bottom_right[..., 1] < 0)
    )
    return ((np.asarray(visible) > 0) & ~misses).astype(np.float32)


def mirror_image(image: np.ndarray) -> np.ndarray:
    """The horizontally mirrored image (pixel x -> W - 1 - x), contiguous for OpenCV."""
    return np.ascontiguousarray(image[:, ::-1])


class KeypointTrainDataset(Dataset):
    """Augmented person crops with Gaussian heatmap targets.

    ``__getitem__`` returns (input ``[3, H, W]`` float32 normalised, heatmaps ``[J, h, w]``,
    target weights ``[J]``, index). Call :meth:`set_epoch` before each epoch so augmentation
    differs between epochs while staying reproducible.
    """

    def __init__(
        self,
        records: PersonRecords,
        images: ImageSource,
        model_config: ModelConfig,
        data: DataSection,
        keypoints: KeypointSpec | None = None,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        self.records = records
        self.images = images
        self.model_config = model_config
        self.data = data
        self.keypoints = keypoints or model_config.keypoints
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.flip_index = self.keypoints.flip_index()
        self.upper_body = UPPER_BODY_JOINTS.get(self.keypoints.dataset, ())

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_geometry(
        self, index: int, image_width: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """Augmented crop affine ``[2, 3]``, heatmap joints ``[J, 2]``, visibility ``[J]`` and
        whether the sample is flipped.

        As published, a flipped sample works on the MIRRORED image: joint x -> W - 1 - x and
        box center x -> W - 1 - c_x before the transforms are built, left/right joints swapped;
        the crop affine then applies to the mirrored image. Targets are placed with the
        transform built for the heatmap size (never input coordinates / 4).
        """
        records, data = self.records, self.data
        joints = records.joints[index].astype(np.float64)
        visible = records.visible[index].copy()
        center = records.centers[index].copy()
        scale = records.scales[index].copy()
        rotation = 0.0
        flip = False
        if self.augment:
            if visible.sum() > data.half_body_min_joints and rng.random() < data.half_body_prob:
                half_body = half_body_box(
                    joints, visible, self.upper_body, self.model_config.aspect_ratio, rng
                )
                if half_body is not None:
                    center, scale = half_body
            factor = data.scale_factor
            scale = scale * np.clip(rng.standard_normal() * factor + 1, 1 - factor, 1 + factor)
            if rng.random() <= data.rotation_prob:
                limit = data.rotation_factor
                rotation = float(np.clip(rng.standard_normal() * limit, -2 * limit, 2 * limit))
            flip = data.flip and rng.random() <= FLIP_PROBABILITY
        if flip:  # work in mirrored-image coordinates from here on
            center = np.array([image_width - 1 - center[0], center[1]])
            joints = np.stack([image_width - 1 - joints[:, 0], joints[:, 1]], axis=1)
            joints, visible = joints[self.flip_index], visible[self.flip_index]
        height, width = self.model_config.input_size
        heatmap_height, heatmap_width = self.model_config.heatmap_size
        rotations = np.array([rotation])
        crop_affine = get_affine_transforms(center[None], scale[None], rotations, (width, height))[
            0
        ]
        heatmap_affine = get_affine_transforms(
            center[None], scale[None], rotations, (heatmap_width, heatmap_height)
        )
        heatmap_joints = transform_points(joints[None], heatmap_affine)[0]
        return crop_affine, heatmap_joints, visible, flip

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        records = self.records
        image = self.images.read_rgb(records.file_names[records.image_index[index]])
        rng = np.random.default_rng([self.seed, self.epoch, index])
        crop_affine, heatmap_joints, visible, flip = self.sample_geometry(
            index, image.shape[1], rng
        )
        if flip:
            image = mirror_image(image)
        height, width = self.model_config.input_size
        crops = warp_crops(image, crop_affine[None], (width, height))
        heatmap_size = self.model_config.heatmap_size
        heatmaps, _ = encode_gaussian_heatmaps(
            heatmap_joints[None], visible[None], heatmap_size, self.data.sigma
        )  # its maps are empty wherever the published rule below drops the joint
        weights = target_weights(heatmap_joints, visible, heatmap_size, self.data.sigma)
        return (
            normalize_crops(crops)[0],
            torch.from_numpy(heatmaps[0]),
            torch.from_numpy(weights),
            index,
        )


# --- evaluation samples -------------------------------------------------------------------------


class EvalImages(Dataset):
    """One item per image with persons to evaluate: (image row, RGB image, person rows).

    Cropping happens in the main process through ``TopDownPoseEstimator.prepare`` (so evaluation
    crops exactly as the service does); the workers do the expensive part, decoding images.
    """

    def __init__(
        self, records: PersonRecords, images: ImageSource, max_images: int | None = None
    ) -> None:
        self.records = records
        self.images = images
        groups = records.persons_by_image()
        self.groups = groups[:max_images] if max_images is not None else groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, item: int) -> tuple[int, np.ndarray, np.ndarray]:
        persons = self.groups[item]
        image_row = int(self.records.image_index[persons[0]])
        image = self.images.read_rgb(self.records.file_names[image_row])
        return image_row, image, persons


def collate_list(batch: list[Any]) -> list[Any]:
    """Keep evaluation items as a list (images differ in size)."""
    return batch


def fork_safe_opencv(num_workers: int) -> None:
    """Turn OpenCV's thread pool off in this process before DataLoader workers fork from it.

    The pool does not survive ``fork``: a worker forked from a process whose pool has run, and
    that then reconfigures it (``cv2.setNumThreads``) or runs a parallel OpenCV call, can wait
    forever for pool threads that exist only in the parent (seen here as a worker hung in
    ``setNumThreads`` after in-process dataset synthesis). With the pool off, workers inherit a
    sequential OpenCV, which is what they should run anyway: the workers are the parallelism.
    """
    if num_workers > 0:
        cv2.setNumThreads(0)
