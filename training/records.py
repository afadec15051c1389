"""Person records of the training and evaluation data sets, read from their annotation files.

Layouts (the original project's)::

    COCO / synthetic: ROOT/annotations/person_keypoints_{SPLIT}.json
    MPII:             ROOT/annot/{SPLIT}.json   (HRNet's JSON: image, center, scale, joints,
                      joints_vis; joints 1-based there, 0-based here)

Persons are stored as flat numpy arrays rather than a list of dicts, so forked DataLoader workers
share them without copy-on-write churn. A missing or malformed file raises :class:`DataError`
naming the file: a broken data set should stop a run, never silently shrink it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnipose.model.configs import ModelConfig
from omnipose.model.transforms import BOX_PADDING, PIXEL_STD, box_to_center_scale
from omnipose.training.config import DataSection

MPII_CENTER_SHIFT = 15.0  # HRNet's conversion: center moved down by 15 * scale px ...
MPII_SCALE_PADDING = 1.25  # ... and the scale padded by 1.25
PERSON_CATEGORY_ID = 1


class DataError(Exception):
    """The data set is missing or broken; the message is one line naming the file."""


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
