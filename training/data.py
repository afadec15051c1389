"""Datasets for training and evaluation: COCO keypoints (and synthetic sets in its layout), MPII.

Layouts (the original project's)::

    COCO / synthetic: ROOT/annotations/person_keypoints_{SPLIT}.json
                      ROOT/images/{SPLIT}/FILE  or  ROOT/images/{SPLIT}.zip (read in place)
    MPII:             ROOT/annot/{SPLIT}.json   (HRNet's JSON: image, center, scale, joints,
                      joints_vis; joints 1-based there, 0-based here)
                      ROOT/images/FILE  or  ROOT/images.zip

Persons are stored as flat numpy arrays rather than a list of dicts, so forked DataLoader workers
share them without copy-on-write churn. Training samples are augmented as published (random
scale, rotation with probability 0.6, flip with joint swapping, half-body) from a random
generator seeded by (seed, epoch, index): the same sample gets the same augmentation whatever the
number of workers or processes, which makes resumed runs exact.

A missing or unreadable image raises :class:`DataError` naming the file: a broken data set should
stop a run, never silently shrink it.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
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
    BOX_PADDING,
    PIXEL_STD,
    box_to_center_scale,
    get_affine_transforms,
    normalize_crops,
    transform_points,
    warp_crops,
)
from omnipose.training.config import DataSection

# Joints counted as "upper body" by the half-body augmentation.
UPPER_BODY_JOINTS = {
    "coco": tuple(range(11)),  # face, shoulders, elbows, wrists
    "mpii": (7, 8, 9, 10, 11, 12, 13, 14, 15),  # thorax, neck, head, arms
}
HALF_BODY_PADDING = 1.5
FLIP_PROBABILITY = 0.5
MPII_CENTER_SHIFT = 15.0  # HRNet's conversion: center moved down by 15 * scale px ...
MPII_SCALE_PADDING = 1.25  # ... and the scale padded by 1.25
PERSON_CATEGORY_ID = 1
IMREAD_STORED_ORDER = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


class DataError(Exception):
    """The data set is missing or broken; the message is one line naming the file."""


# --- image sources ------------------------------------------------------------------------------


class ImageSource:
    """Reads RGB images by file name from a folder or a zip archive."""

    def read_bytes(self, file_name: str) -> bytes:
        raise NotImplementedError

    def location(self, file_name: str) -> str:
        """Human-readable path of one image, for error messages."""
        raise NotImplementedError

    def read_rgb(self, file_name: str) -> np.ndarray:
        """The image in STORED pixel order: EXIF orientation is ignored, because COCO and MPII
        label keypoints on the stored pixels (as the published training and evaluation read)."""
        data = self.read_bytes(file_name)
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), IMREAD_STORED_ORDER)
        if image is None:
            raise DataError(
                f"cannot decode image {self.location(file_name)} (corrupt or not an image)"
            )
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class FolderImages(ImageSource):
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def location(self, file_name: str) -> str:
        return str(self.directory / file_name)

    def read_bytes(self, file_name: str) -> bytes:
        try:
            return (self.directory / file_name).read_bytes()
        except OSError as error:
            location = self.location(file_name)
            raise DataError(f"cannot read image {location}: {error.strerror}") from None


class ZipImages(ImageSource):
    """Images read straight from a zip archive, without extraction.

    The archive handle is opened lazily in each process (a ``ZipFile`` shared across a fork
    would interleave seeks), and dropped when pickled for spawned workers. Members may sit under
    a top-level folder (``train2017/000...jpg`` in the official archives) or at the root.
    """

    def __init__(self, archive: Path) -> None:
        self.archive = Path(archive)
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None
        self._members: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"archive": self.archive}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["archive"])

    def location(self, file_name: str) -> str:
        return f"{self.archive}:{file_name}"

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            try:
                self._zip = zipfile.ZipFile(self.archive)
            except (OSError, zipfile.BadZipFile) as error:
                raise DataError(f"cannot open image archive {self.archive}: {error}") from None
            self._pid = os.getpid()
            members: dict[str, str] = {}
            for name in self._zip.namelist():
                if name.endswith("/"):
                    continue
                members.setdefault(name, name)
                if "/" in name:
                    members.setdefault(name.split("/", 1)[1], name)
            self._members = members
        return self._zip

    def read_bytes(self, file_name: str) -> bytes:
        archive = self._open()
        member = self._members.get(file_name)
        if member is None:
            raise DataError(f"cannot read image {self.location(file_name)}: not in the archive")
        try:
            return archive.read(member)
        except (OSError, zipfile.BadZipFile, RuntimeError) as error:
            raise DataError(f"cannot read image {self.location(file_name)}: {error}") from None


def open_image_source(directory: Path) -> ImageSource:
    """``DIR`` as a folder if it exists, else ``DIR.zip``."""
    directory = Path(directory)
    if directory.is_dir():
        return FolderImages(directory)
    archive = directory.parent / f"{directory.name}.zip"
    if archive.is_file():
        return ZipImages(archive)
    raise DataError(f"image folder {directory} not found (nor an archive {archive})")


# --- person records -----------------------------------------------------------------------------


@dataclass
class PersonRecords:
    """One row per person crop (ground-truth person or detection), grouped by image."""

    file_names: list[str]  # per image
    image_ids: np.ndarray  # per image: COCO image id (MPII: running index)
    image_index: np.ndarray  # per person: row in the image tables
    boxes: np.ndarray  # per person: x, y, w, h
    centers: np.ndarray  # per person: crop center (HRNet convention)
    scales: np.ndarray  # per person: crop size / 200, padded
    joints: np.ndarray  # per person: J x 2 image coordinates (0 where unknown)
    visible: np.ndarray  # per person: J, 1 where the joint is annotated
    scores: np.ndarray  # per person: box score (1 for ground truth)
    head_sizes: np.ndarray | None = None  # MPII: PCKh normaliser per person
    head_size_source: str = ""  # MPII: where the normalisers come from (see load_mpii_records)

    def __len__(self) -> int:
        return len(self.image_index)

    @property
    def num_images(self) -> int:
        return len(self.file_names)

    def persons_by_image(self) -> list[np.ndarray]:
        """Person rows of each image that has any, in image order."""
        order = np.argsort(self.image_index, kind="stable")
        cuts = np.flatnonzero(np.diff(self.image_index[order])) + 1
        return [group for group in np.split(order, cuts) if len(group)]


def coco_annotation_path(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"person_keypoints_{split}.json"


def coco_image_dir(root: str | Path, split: str) -> Path:
    return Path(root) / "images" / split


def mpii_annotation_path(root: str | Path, split: str) -> Path:
    return Path(root) / "annot" / f"{split}.json"


def mpii_gt_path(data: DataSection, split: str) -> Path | None:
    """The official ground truth for an MPII split: ``data.mpii_gt_file`` for the validation
    split when set, else ``ROOT/annot/gt_{split}.mat`` (``gt_valid.mat``) when it exists."""
    if data.mpii_gt_file and split == data.val_split:
        return Path(data.mpii_gt_file)
    default = Path(data.root) / "annot" / f"gt_{split}.mat"
    return default if default.is_file() else None


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"{what} {path} not found")
    try:
        with open(path) as stream:
            return json.load(stream)
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read {what} {path}: {error}") from None


def _coco_tables(
    data: dict, path: Path
) -> tuple[list[str], np.ndarray, dict[int, int], np.ndarray]:
    try:
        images = sorted(data["images"], key=lambda image: image["id"])
        file_names = [str(image["file_name"]) for image in images]
        image_ids = np.array([int(image["id"]) for image in images], dtype=np.int64)
        sizes = np.array([[image["width"], image["height"]] for image in images], dtype=np.float64)
    except (KeyError, TypeError) as error:
        raise DataError(f"annotation file {path}: malformed 'images' entry ({error!r})") from None
    row_of_id = {int(image_id): row for row, image_id in enumerate(image_ids)}
    return file_names, image_ids, row_of_id, sizes.reshape(-1, 2)


def clean_coco_box(
    box_xywh: list[float], area: float, image_width: float, image_height: float
) -> list[float] | None:
    """The published COCO ground-truth box cleaning; ``None`` when the person is dropped.

    Corners in pixel-index terms: x2 = x1 + max(0, w - 1) clipped to the image (same for y),
    kept when the annotated area is positive and x2 >= x1, y2 >= y1, and used as the inclusive
    box (x1, y1, x2 - x1 + 1, y2 - y1 + 1).
    """
    x, y, w, h = box_xywh
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(image_width - 1, x1 + max(0.0, w - 1))
    y2 = min(image_height - 1, y1 + max(0.0, h - 1))
    if area <= 0 or x2 < x1 or y2 < y1:
        return None
    return [x1, y1, x2 - x1 + 1, y2 - y1 + 1]


def load_coco_records(
    annotation_file: Path, model_config: ModelConfig, min_area: float = 0.0
) -> PersonRecords:
    """Ground-truth persons with at least one labelled keypoint (HRNet's selection).

    Boxes are cleaned as published (:func:`clean_coco_box`); crowd regions, boxes that cleaning
    rejects, persons without keypoints and persons whose annotated area is below ``min_area`` are
    left out.
    """
    data = _read_json(annotation_file, "annotation file")
    file_names, image_ids, row_of_id, sizes = _coco_tables(data, annotation_file)
    num_joints = model_config.num_joints
    rows, boxes, keypoints = [], [], []
    for annotation in data.get("annotations", []):
        if annotation.get("category_id", PERSON_CATEGORY_ID) != PERSON_CATEGORY_ID:
            continue
        if annotation.get("iscrowd", 0):
            continue
        kps = np.asarray(annotation.get("keypoints", []), dtype=np.float64)
        if kps.size != num_joints * 3 or kps.max(initial=0) <= 0:
            continue
        row = row_of_id.get(int(annotation["image_id"]))
        if row is None:
            continue
        width, height = sizes[row]
        box = [float(v) for v in annotation["bbox"]]
        area = float(annotation.get("area", box[2] * box[3]))
        cleaned = clean_coco_box(box, area, width, height)
        if cleaned is None or area < min_area:
            continue
        rows.append(row)
        boxes.append(cleaned)
        keypoints.append(kps.reshape(num_joints, 3))
    kps_array = np.asarray(keypoints, dtype=np.float64).reshape(-1, num_joints, 3)
    box_array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    centers, scales = box_to_center_scale(box_array, model_config.aspect_ratio)
    return PersonRecords(
        file_names=file_names,
        image_ids=image_ids,
        image_index=np.asarray(rows, dtype=np.int64),
        boxes=box_array,
        centers=centers,
        scales=scales,
        joints=kps_array[..., :2].astype(np.float32),
        visible=(kps_array[..., 2] > 0).astype(np.float32),
        scores=np.ones(len(rows)),
    )


def load_detection_records(
    annotation_file: Path, detections_file: Path, model_config: ModelConfig, score_threshold: float
) -> PersonRecords:
    """Person detections (COCO results format) as crops: category 1, score >= threshold.

    The annotation file supplies the image list (file names); detections of images not in it
    are an error, since they would silently vanish from the evaluation.
    """
    data = _read_json(annotation_file, "annotation file")
    file_names, image_ids, row_of_id, _ = _coco_tables(data, annotation_file)
    detections = _read_json(detections_file, "detections file")
    if not isinstance(detections, list):
        raise DataError(f"detections file {detections_file}: expected a list of detections")
    rows, boxes, scores = [], [], []
    for detection in detections:
        try:
            if int(detection.get("category_id", PERSON_CATEGORY_ID)) != PERSON_CATEGORY_ID:
                continue
            score = float(detection["score"])
            image_id = int(detection["image_id"])
            box = [float(v) for v in detection["bbox"]]
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"detections file {detections_file}: malformed entry ({error!r})"
            ) from None
        if score < score_threshold or len(box) != 4 or box[2] <= 0 or box[3] <= 0:
            continue
        if image_id not in row_of_id:
            raise DataError(
                f"detections file {detections_file}: image_id {image_id} is not in "
                f"{annotation_file}"
            )
        rows.append(row_of_id[image_id])
        boxes.append(box)
        scores.append(score)
    box_array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    centers, scales = box_to_center_scale(box_array, model_config.aspect_ratio)
    num_joints = model_config.num_joints
    return PersonRecords(
        file_names=file_names,
        image_ids=image_ids,
        image_index=np.asarray(rows, dtype=np.int64),
        boxes=box_array,
        centers=centers,
        scales=scales,
        joints=np.zeros((len(rows), num_joints, 2), np.float32),
        visible=np.zeros((len(rows), num_joints), np.float32),
        scores=np.asarray(scores, dtype=np.float64),
    )


def center_scale_to_box(
    centers: np.ndarray, scales: np.ndarray, padding: float = BOX_PADDING
) -> np.ndarray:
    """Inverse of ``box_to_center_scale`` for boxes already at the crop's aspect ratio."""
    sizes = np.asarray(scales, dtype=np.float64) * PIXEL_STD / padding
    corners = np.asarray(centers, dtype=np.float64) - (sizes - 1) * 0.5
    return np.concatenate([corners, sizes], axis=1)


def load_mpii_records(
    annotation_file: Path, model_config: ModelConfig, gt_file: Path | None = None
) -> PersonRecords:
    """HRNet's MPII JSON: center/scale per person (shifted and padded as HRNet does).

    PCKh normalisers: with ``gt_file`` (the official ``gt_valid.mat``, same persons in the same
    order) its head boxes, joints and missing-joint flags are used, as the published evaluation
    does; else ``head_box`` entries of the JSON; else the neck to head-top distance, which is
    NOT comparable with published figures (``head_size_source`` says which).
    """
    data = _read_json(annotation_file, "annotation file")
    if not isinstance(data, list):
        raise DataError(f"annotation file {annotation_file}: expected a list of persons")
    num_joints = model_config.num_joints
    file_names: list[str] = []
    row_of_name: dict[str, int] = {}
    rows, centers, scales, joints, visible, head_sizes = [], [], [], [], [], []
    boxed: list[bool] = []
    for entry in data:
        try:
            name = str(entry["image"])
            center = np.asarray(entry["center"], dtype=np.float64).reshape(2)
            scale = float(entry["scale"])
            person_joints = np.asarray(
                entry.get("joints", np.zeros((num_joints, 2))), dtype=np.float64
            ).reshape(num_joints, 2)
            person_visible = np.asarray(
                entry.get("joints_vis", np.zeros(num_joints)), dtype=np.float64
            ).reshape(num_joints)
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"annotation file {annotation_file}: malformed entry ({error!r})"
            ) from None
        if center[0] != -1:
            center[1] += MPII_CENTER_SHIFT * scale
            scale *= MPII_SCALE_PADDING
        if name not in row_of_name:
            row_of_name[name] = len(file_names)
            file_names.append(name)
        rows.append(row_of_name[name])
        centers.append(center)
        scales.append([scale, scale])
        joints.append(person_joints - 1.0)  # MATLAB 1-based -> 0-based
        visible.append((person_visible > 0).astype(np.float64))
        head_box = entry.get("head_box") or entry.get("headbox")
        boxed.append(head_box is not None)
        head_sizes.append(_head_size(head_box, person_joints))
    center_array = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    scale_array = np.asarray(scales, dtype=np.float64).reshape(-1, 2)
    joint_array = np.asarray(joints, dtype=np.float32).reshape(-1, num_joints, 2)
    visible_array = np.asarray(visible, dtype=np.float32).reshape(-1, num_joints)
    head_size_array = np.asarray(head_sizes, dtype=np.float64)
    if gt_file is not None:
        joint_array, visible_array, head_size_array = read_mpii_ground_truth(
            gt_file, len(rows), num_joints
        )
        source = MPII_SOURCE_GT_FILE
    elif all(boxed):
        source = MPII_SOURCE_JSON_BOXES
    else:
        source = MPII_SOURCE_NECK_HEAD
    return PersonRecords(
        file_names=file_names,
        image_ids=np.arange(len(file_names), dtype=np.int64),
        image_index=np.asarray(rows, dtype=np.int64),
        boxes=center_scale_to_box(center_array, scale_array),
        centers=center_array,
        scales=scale_array,
        joints=joint_array,
        visible=visible_array,
        scores=np.ones(len(rows)),
        head_sizes=head_size_array,
        head_size_source=source,
    )


MPII_HEAD_BOX_FACTOR = 0.6  # the MPII toolkit's PCKh normaliser: 0.6 x head-box diagonal
MPII_UPPER_NECK, MPII_HEAD_TOP = 8, 9
MPII_SOURCE_GT_FILE = "head boxes of gt_valid.mat"
MPII_SOURCE_JSON_BOXES = "head boxes of the annotation file"
MPII_SOURCE_NECK_HEAD = "neck to head-top distance (no head boxes)"
COMPARABLE_HEAD_SIZE_SOURCES = (MPII_SOURCE_GT_FILE, MPII_SOURCE_JSON_BOXES)


def read_mpii_ground_truth(
    gt_file: Path, num_persons: int, num_joints: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joints ``[N, J, 2]`` (0-based), visibility ``[N, J]`` and PCKh normalisers ``[N]`` from the
    official ``gt_valid.mat``: ``pos_gt_src`` ``[J, 2, N]`` (1-based), ``jnt_missing`` ``[J, N]``
    and ``headboxes_src`` ``[2, 2, N]`` (top-left, bottom-right); normaliser 0.6 x diagonal.
    """
    import scipy.io

    if not gt_file.is_file():
        raise DataError(f"MPII ground-truth file {gt_file} not found")
    try:
        mat = scipy.io.loadmat(str(gt_file))
    except (OSError, ValueError, TypeError) as error:
        raise DataError(f"cannot read MPII ground-truth file {gt_file}: {error}") from None
    missing_keys = [k for k in ("pos_gt_src", "jnt_missing", "headboxes_src") if k not in mat]
    if missing_keys:
        raise DataError(f"MPII ground-truth file {gt_file} lacks {', '.join(missing_keys)}")
    positions = np.asarray(mat["pos_gt_src"], dtype=np.float64)
    missing = np.asarray(mat["jnt_missing"], dtype=np.float64)
    boxes = np.asarray(mat["headboxes_src"], dtype=np.float64)
    expected = {
        "pos_gt_src": (positions, (num_joints, 2, num_persons)),
        "jnt_missing": (missing, (num_joints, num_persons)),
        "headboxes_src": (boxes, (2, 2, num_persons)),
    }
    for name, (array, shape) in expected.items():
        if array.shape != shape:
            raise DataError(
                f"MPII ground-truth file {gt_file}: {name} has shape {array.shape}, expected "
                f"{shape} ({num_persons} persons in the annotation file, in the same order)"
            )
    joints = positions.transpose(2, 0, 1) - 1.0  # MATLAB 1-based -> 0-based
    visible = (1.0 - missing).T
    head_sizes = MPII_HEAD_BOX_FACTOR * np.linalg.norm(boxes[1] - boxes[0], axis=0)
    return joints.astype(np.float32), visible.astype(np.float32), head_sizes


def _head_size(head_box: Any, joints: np.ndarray) -> float:
    """PCKh normaliser: 0.6 x head-box diagonal when the box is given (the MPII toolkit's
    definition), else the upper-neck to head-top segment length (PCKh's original definition).
    """
    if head_box is not None:
        x1, y1, x2, y2 = (float(v) for v in head_box)
        return MPII_HEAD_BOX_FACTOR * float(np.hypot(x2 - x1, y2 - y1))
    return float(np.linalg.norm(joints[MPII_HEAD_TOP] - joints[MPII_UPPER_NECK]))


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
