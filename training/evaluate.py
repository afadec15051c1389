"""Evaluation as published: COCO OKS AP/AR (pycocotools) and MPII PCKh.

Inference goes through the service's pipeline stages
(:class:`omnipose.model.predictor.PosePredictor`: its crops, runner with flip test, DARK decoding,
instance rescoring and OKS-NMS), batched across the images of a loader batch, so the figures
measure what is served. COCO: every person box of an image (ground truth or detections) is
estimated, the instance score is box score x mean confidence of keypoints above 0.2, OKS-NMS at
0.9 removes duplicates, and pycocotools' keypoint evaluation scores the results. MPII: one crop
per annotated person (its center/scale), PCKh as published (see :func:`mpii_metrics`).

Under DDP each rank estimates a share of the images; rank 0 gathers and scores them, and every
rank receives the metrics.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from omnipose.model.configs import ModelConfig
from omnipose.model.detection import Detections
from omnipose.model.predictor import PosePredictor
from omnipose.model.runners import Runner
from omnipose.model.skeleton import KeypointSpec
from omnipose.model.topdown import OKS_NMS_THRESHOLD, PersonPose, TopDownPoseEstimator
from omnipose.training.config import ExperimentConfig
from omnipose.training.data import EvalImages, collate_list, fork_safe_opencv, load_split
from omnipose.training.distributed import DistContext, broadcast_object, gather_objects
from omnipose.training.image_sources import ImageSource
from omnipose.training.records import COMPARABLE_HEAD_SIZE_SOURCES, PersonRecords

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APM", "APL", "AR", "AR50", "AR75", "ARM", "ARL")
MEAN_OKS = "OKS"  # mean over evaluated persons of their best-matching prediction's OKS
PCKH_THRESHOLD = 0.5
PCKH_LOW_THRESHOLD = 0.11  # the published "Mean@0.1" is read at index 11 of 0.00, 0.01, ...
MPII_EXCLUDED_FROM_MEAN = (6, 7)  # pelvis, thorax: always near the crop center
COMPARABLE = "comparable"  # metrics key: 1.0 when PCKh uses head boxes as published, else 0.0
MPII_GROUPS = {  # joint groups of the published MPII table; pairs averaged without weights
    "Head": (9,),  # head top only
    "Shoulder": (12, 13),
    "Elbow": (11, 14),
    "Wrist": (10, 15),
    "Hip": (2, 3),
    "Knee": (1, 4),
    "Ankle": (0, 5),
}
IMAGES_PER_LOADER_BATCH = 8


@dataclass
class EvalResult:
    """Metrics of one evaluation; ``primary`` (AP or mean PCKh, 0..1) picks the best model."""

    kind: str  # "coco" or "mpii"
    metrics: dict[str, float]
    primary_name: str
    num_images: int
    num_persons: int
    notes: list[str] = field(default_factory=list)  # printed under the table
    results: list[dict] = field(default_factory=list)  # COCO results format (rank 0)
    samples: list[tuple[np.ndarray, list[PersonPose]]] = field(default_factory=list)

    @property
    def primary(self) -> float:
        return float(self.metrics.get(self.primary_name, 0.0))

    def table(self) -> str:
        """Fixed-width table for the terminal."""
        names = list(self.metrics)
        width = max(7, *(len(name) + 1 for name in names))
        header = "".join(f"{name:>{width}}" for name in names)
        values = "".join(f"{self.metrics[name]:>{width}.4f}" for name in names)
        return "\n".join([header, values, *self.notes])


# --- metrics --------------------------------------------------------------------------------------


def coco_keypoint_eval(ground_truth: str | Path | Any, results: list[dict]) -> dict[str, float]:
    """pycocotools OKS evaluation of COCO results-format keypoints -> AP, AP50, ..., ARL, OKS.

    ``OKS`` (not a COCO summary figure) is the mean over non-ignored ground-truth persons of the
    best OKS any prediction in the image reaches: unlike AP it moves smoothly early in training,
    long before predictions pass the 0.5 OKS threshold. ``ground_truth`` is an annotation file or
    a ``pycocotools.coco.COCO``. Empty results score 0 (pycocotools cannot load an empty list).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys((*COCO_STAT_NAMES, MEAN_OKS), 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco_gt = ground_truth if isinstance(ground_truth, COCO) else COCO(str(ground_truth))
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "keypoints")
        evaluator.params.useSegm = None
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.maximum(evaluator.stats, 0.0)  # -1 means "no such objects": report 0
    metrics = {name: float(value) for name, value in zip(COCO_STAT_NAMES, stats, strict=True)}
    metrics[MEAN_OKS] = _mean_best_oks(evaluator)
    return metrics


def _mean_best_oks(evaluator: Any) -> float:
    """Mean best OKS per non-ignored ground-truth person (0 where the image has no prediction)."""
    best: list[float] = []
    for (image_id, category_id), ground_truths in evaluator._gts.items():
        counted = np.array([not gt["ignore"] for gt in ground_truths], dtype=bool)
        if not counted.any():
            continue
        ious = evaluator.ious.get((image_id, category_id), [])
        if len(ious) == 0:
            best.extend([0.0] * int(counted.sum()))
            continue
        best.extend(np.asarray(ious).max(axis=0)[counted].tolist())
    return float(np.mean(best)) if best else 0.0


def pckh(
    predictions: np.ndarray,
    ground_truth: np.ndarray,
    visible: np.ndarray,
    head_sizes: np.ndarray,
    threshold: float = PCKH_THRESHOLD,
) -> tuple[np.ndarray, float]:
    """Per-joint PCKh (fraction of visible joints within ``threshold`` x head size) and the
    visibility-weighted mean over joints other than pelvis and thorax.

    Joints never visible get NaN per-joint values and no weight in the mean.
    """
    predictions = np.asarray(predictions, dtype=np.float64)
    ground_truth = np.asarray(ground_truth, dtype=np.float64)
    visible = np.asarray(visible) > 0
    distances = np.linalg.norm(predictions - ground_truth, axis=2)
    normalised = distances / np.maximum(np.asarray(head_sizes, dtype=np.float64)[:, None], 1e-12)
    hits = ((normalised <= threshold) & visible).sum(axis=0).astype(np.float64)
    counts = visible.sum(axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_joint = np.where(counts > 0, hits / counts, np.nan)
    included = np.ones(len(counts), dtype=bool)
    included[[j for j in MPII_EXCLUDED_FROM_MEAN if j < len(included)]] = False
    weights = counts * included
    total = weights.sum()
    mean = float((np.nan_to_num(per_joint) * weights).sum() / total) if total else 0.0
    return per_joint, mean


def mpii_metrics(
    predictions: np.ndarray, records: PersonRecords, spec: KeypointSpec
) -> dict[str, float]:
    """PCKh as published: per joint and per group at 0.5 ("Head" is head-top only, left/right
    pairs averaged without weights), "Mean" weighted by joint counts over all joints but pelvis
    and thorax, "Mean@0.1" at threshold 0.11 (the published table reads that index), every joint
    by name, and ``comparable`` (1.0 when the normalisers are head boxes, see
    :func:`mpii_head_size_note`).
    """
    if records.head_sizes is None:
        raise ValueError("MPII records carry no head sizes")
    per_joint, mean = pckh(predictions, records.joints, records.visible, records.head_sizes)
    _, mean_low = pckh(
        predictions, records.joints, records.visible, records.head_sizes, PCKH_LOW_THRESHOLD
    )
    metrics: dict[str, float] = {}
    for group, joints in MPII_GROUPS.items():
        metrics[group] = float(np.mean(np.nan_to_num(per_joint[list(joints)])))
    metrics["Mean"] = mean
    metrics["Mean@0.1"] = mean_low
    for name, value in zip(spec.joint_names, per_joint, strict=True):
        metrics[name] = float(np.nan_to_num(value))
    metrics[COMPARABLE] = float(records.head_size_source in COMPARABLE_HEAD_SIZE_SOURCES)
    return metrics


def mpii_head_size_note(records: PersonRecords) -> str:
    """One line saying which PCKh normaliser was used, and loudly when it is not comparable."""
    if records.head_size_source in COMPARABLE_HEAD_SIZE_SOURCES:
        return f"PCKh normaliser: 0.6 x head-box diagonal ({records.head_size_source})"
    return (
        f"NOT COMPARABLE with published PCKh: normaliser is the {records.head_size_source}; "
        "give the official gt_valid.mat (data.mpii_gt_file or ROOT/annot/gt_valid.mat)"
    )


# --- inference ------------------------------------------------------------------------------------


def _unwrap(model: nn.Module | Runner) -> nn.Module | Runner:
    inner = getattr(model, "module", None)
    return _unwrap(inner) if isinstance(inner, nn.Module) else model


def estimate_records(
    model: nn.Module | Runner,
    model_config: ModelConfig,
    records: PersonRecords,
    images: ImageSource,
    *,
    device: torch.device,
    flip_test: bool = True,
    flip_shift: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    nms_threshold: float | None = OKS_NMS_THRESHOLD,
    max_images: int | None = None,
    context: DistContext | None = None,
    progress: bool = True,
    keep_samples: int = 0,
) -> tuple[list[tuple[int, list[PersonPose]]], list[tuple[np.ndarray, list[PersonPose]]]]:
    """Poses for every image of ``records`` handled by this rank: ``[(image_row, poses)]``.

    With ``nms_threshold=None`` the poses of an image come back in the order of its person rows
    (one per row), which MPII evaluation relies on. ``model`` may also be any runner (the int8
    guard evaluates OpenVINO models this way). ``keep_samples`` images (with their poses)
    are also returned for visualisation.
    """
    context = context or DistContext(device=device)
    predictor = PosePredictor(TopDownPoseEstimator(
        _unwrap(model), model_config, device=device, flip_test=flip_test, flip_shift=flip_shift
    ))
    dataset = EvalImages(records, images, max_images)
    shard = Subset(dataset, range(context.rank, len(dataset), context.world_size))
    fork_safe_opencv(num_workers)
    loader = DataLoader(
        shard,
        batch_size=IMAGES_PER_LOADER_BATCH,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_list,
    )
    outputs: list[tuple[int, list[PersonPose]]] = []
    samples: list[tuple[np.ndarray, list[PersonPose]]] = []
    bar = tqdm(
        total=len(shard),
        desc="eval",
        unit="img",
        disable=not (progress and context.is_main),
        leave=False,
    )
    with torch.inference_mode():
        for items in loader:
            crops = [
                predictor.prepare(image, Detections(records.boxes[rows], records.scores[rows]),
                                  channels="rgb")
                for _, image, rows in items
            ]
            inputs = torch.cat([crop.inputs for crop in crops])
            heatmaps = (
                torch.cat([predictor.run(chunk) for chunk in inputs.split(batch_size)])
                if len(inputs)
                else inputs.new_zeros(0)
            )
            start = 0
            for (image_row, image, _), crop in zip(items, crops, strict=True):
                image_heatmaps = heatmaps[start : start + len(crop)]
                start += len(crop)
                poses = predictor.decode(image_heatmaps, crop, nms_threshold=nms_threshold)
                outputs.append((image_row, poses))
                if len(samples) < keep_samples:
                    samples.append((image, poses))
            bar.update(len(items))
    bar.close()
    return outputs, samples


def coco_results(outputs: list[tuple[int, list[PersonPose]]], records: PersonRecords) -> list[dict]:
    """COCO results-format dicts (image_id, category_id, keypoints, score)."""
    results = []
    for image_row, poses in outputs:
        image_id = int(records.image_ids[image_row])
        for pose in poses:
            results.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "keypoints": [round(float(v), 3) for v in pose.keypoints.reshape(-1)],
                    "score": float(pose.score),
                }
            )
    return results


def evaluate_model(
    model: nn.Module,
    config: ExperimentConfig,
    *,
    device: torch.device,
    context: DistContext | None = None,
    boxes_file: str | None = None,
    flip_test: bool | None = None,
    split: str | None = None,
    progress: bool = True,
    keep_samples: int = 0,
    loaded: tuple[PersonRecords, ImageSource, Path] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on the configured validation split (COCO AP or MPII PCKh).

    ``loaded`` passes records already read (the trainer reads them once per run).
    """
    context = context or DistContext(device=device)
    model_config = config.model_config()
    data = config.data
    boxes_file = boxes_file if boxes_file is not None else data.val_boxes
    if loaded is None:
        loaded = load_split(data, model_config, split or data.val_split, boxes_file)
    records, images, annotation_file = loaded
    flip = config.test.flip_test if flip_test is None else flip_test
    is_mpii = data.format == "mpii"
    outputs, samples = estimate_records(
        model,
        model_config,
        records,
        images,
        device=device,
        flip_test=flip,
        flip_shift=config.test.flip_shift,
        batch_size=config.test.batch_size,
        num_workers=data.num_workers,
        nms_threshold=None if is_mpii else config.test.oks_nms_threshold,
        max_images=data.max_val_images,
        context=context,
        progress=progress,
        keep_samples=keep_samples,
    )
    plain = [
        (row, [(pose.bbox, pose.box_score, pose.keypoints, pose.score) for pose in poses])
        for row, poses in outputs
    ]
    gathered = gather_objects(plain, context)
    result: EvalResult | None = None
    if context.is_main:
        all_outputs = [
            (row, [PersonPose(*fields) for fields in poses])
            for part in gathered
            for row, poses in part
        ]
        all_outputs.sort(key=lambda item: item[0])
        num_persons = sum(len(poses) for _, poses in all_outputs)
        if is_mpii:
            metrics = _mpii_from_outputs(all_outputs, records, model_config.keypoints)
            result = EvalResult("mpii", metrics, "Mean", len(all_outputs), num_persons)
            result.notes = [mpii_head_size_note(records)]
        else:
            results = coco_results(all_outputs, records)
            image_ids = {int(records.image_ids[row]) for row, _ in all_outputs}
            metrics = coco_keypoint_eval(
                _restricted_ground_truth(annotation_file, image_ids, data.max_val_images), results
            )
            result = EvalResult(
                "coco", metrics, "AP", len(all_outputs), num_persons, results=results
            )
        result.samples = samples
    metrics_everywhere = broadcast_object(
        None
        if result is None
        else (
            result.kind,
            result.metrics,
            result.primary_name,
            result.num_images,
            result.num_persons,
            result.notes,
        ),
        context,
    )
    if result is None:
        result = EvalResult(*metrics_everywhere)
    return result


def _restricted_ground_truth(
    annotation_file: Path, image_ids: set[int], max_images: int | None
) -> Any:
    """The annotation file, or (for ``max_images`` quick runs) a COCO limited to those images."""
    if max_images is None:
        return annotation_file
    from pycocotools.coco import COCO

    with open(annotation_file) as stream:
        data = json.load(stream)
    data["images"] = [image for image in data["images"] if image["id"] in image_ids]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in image_ids]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


def _mpii_from_outputs(
    outputs: list[tuple[int, list[PersonPose]]], records: PersonRecords, spec: KeypointSpec
) -> dict[str, float]:
    """Scatter per-image poses back to person rows (same order as ``persons_by_image``)."""
    groups = records.persons_by_image()
    rows_of_image = {int(records.image_index[group[0]]): group for group in groups}
    predictions = np.zeros_like(records.joints, dtype=np.float64)
    evaluated = np.zeros(len(records), dtype=bool)
    for image_row, poses in outputs:
        rows = rows_of_image[image_row]
        for row, pose in zip(rows, poses, strict=True):
            predictions[row] = pose.keypoints[:, :2]
            evaluated[row] = True
    subset = PersonRecords(
        file_names=records.file_names,
        image_ids=records.image_ids,
        image_index=records.image_index[evaluated],
        boxes=records.boxes[evaluated],
        centers=records.centers[evaluated],
        scales=records.scales[evaluated],
        joints=records.joints[evaluated],
        visible=records.visible[evaluated],
        scores=records.scores[evaluated],
        head_sizes=None if records.head_sizes is None else records.head_sizes[evaluated],
        head_size_source=records.head_size_source,
    )
    return mpii_metrics(predictions[evaluated], subset, spec)
