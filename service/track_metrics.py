"""Tracking and smoothing metrics on sequences with ground truth (bench/track_eval.py, tests).

* **MOTA, IDF1, identity switches** come from ``motmetrics`` (the py-motmetrics package of the
  MOTChallenge tooling). Predictions are matched to ground-truth people per frame by box IoU
  (MOTChallenge's rule, IoU >= 0.5); the IoU matrix is computed here because motmetrics 1.4's own
  helper calls ``np.asfarray``, which NumPy 2 removed.
* **Jitter**: the mean frame-to-frame acceleration of keypoints, ``|k[t] - 2 k[t-1] + k[t-2]|``
  in pixels, over joints labelled in three consecutive frames of one ground-truth person matched
  to one predicted track. Real motion accelerates too, so the ground truth's own figure on the
  same joints is reported beside it.
* **Keypoint error**: mean pixel distance to the ground truth over the same matched joints.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from omnipose.model.detection import box_iou
from omnipose.model.skeleton import COCO_KEYPOINTS

MATCH_IOU = 0.5
MIN_SCORED_JOINTS = 6  # people with fewer joints in view (a third of a body) are not scored


@dataclass
class FramePeople:
    """People of one frame: ids, x y w h boxes, J x 3 keypoints (x, y, visibility/score)."""

    ids: list[int]
    boxes: np.ndarray
    keypoints: np.ndarray


@dataclass
class TrackingScores:
    mota: float
    idf1: float
    id_switches: int
    switches_by_gt: dict[int, int]
    jitter_px: float
    gt_jitter_px: float
    keypoint_error_px: float
    frames: int
    extra: dict = field(default_factory=dict)


def evaluate_sequence(
    truth: list[FramePeople], predicted: list[FramePeople], match: str = "iou"
) -> TrackingScores:
    """Scores of one sequence's predictions against its ground truth (frames aligned).

    ``match``: "iou" pairs people by box IoU >= 0.5 (MOTChallenge); "oks" by keypoint OKS >=
    0.5 against the ground truth's labelled joints, with the ground-truth box area as scale (a
    pose tracker's own criterion, as PoseTrack matches by keypoints, indifferent to how a
    pose's box is drawn)."""
    if match not in ("iou", "oks"):
        raise ValueError(f"match must be 'iou' or 'oks', got {match!r}")
    import motmetrics as mm  # imported lazily: pulls in pandas

    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} ground-truth frames but {len(predicted)} predicted")
    accumulator = mm.MOTAccumulator(auto_id=True)
    truth = [_scored(gt, pred) for gt, pred in zip(truth, predicted, strict=True)]
    predicted = [pred for _, pred in truth]
    truth = [gt for gt, _ in truth]
    frame_ids = []
    for gt, pred in zip(truth, predicted, strict=True):
        if match == "iou":
            similarity = box_iou(gt.boxes, pred.boxes) if len(gt.ids) and len(pred.ids) else (
                np.zeros((len(gt.ids), len(pred.ids))))  # fmt: skip
        else:
            similarity = _oks_matrix(gt, pred)
        distances = np.where(similarity >= MATCH_IOU, 1.0 - similarity, np.nan)
        frame_ids.append(accumulator.update(gt.ids, pred.ids, distances))
    events = accumulator.mot_events
    matched = events[events.Type.isin(["MATCH", "SWITCH"])]
    pairs: dict[int, dict[int, int]] = defaultdict(dict)  # frame -> gt id -> predicted id
    for (frame_id, _), gt_id, track_id in zip(matched.index, matched.OId, matched.HId,
                                              strict=True):  # fmt: skip
        pairs[int(frame_id)][int(gt_id)] = int(track_id)
    matches: list[dict[int, int]] = []  # per frame: gt id -> predicted index
    for frame_id, pred in zip(frame_ids, predicted, strict=True):
        index = {track_id: i for i, track_id in enumerate(pred.ids)}
        matches.append({gt: index[track] for gt, track in pairs[int(frame_id)].items()})
    summary = mm.metrics.create().compute(accumulator, metrics=["mota", "idf1", "num_switches"])
    switches = accumulator.mot_events[accumulator.mot_events.Type == "SWITCH"]
    by_gt: dict[int, int] = defaultdict(int)
    for gt_id in switches.OId:
        by_gt[int(gt_id)] += 1

    accelerations, gt_accelerations, errors = [], [], []
    for t in range(len(truth)):
        for gt_id, j in matches[t].items():
            g = _gt_keypoints(truth[t], gt_id)
            p = predicted[t].keypoints[j]
            labelled = g[:, 2] > 0
            errors.extend(np.linalg.norm(p[labelled, :2] - g[labelled, :2], axis=1))
            if t < 2:
                continue
            window = []
            for back in (1, 2):
                k = matches[t - back].get(gt_id)
                if k is None or predicted[t - back].ids[k] != predicted[t].ids[j]:
                    break
                earlier = truth[t - back]
                window.append((predicted[t - back].keypoints[k], _gt_keypoints(earlier, gt_id)))
            if len(window) < 2:
                continue
            (p1, g1), (p2, g2) = window
            joints = labelled & (g1[:, 2] > 0) & (g2[:, 2] > 0)
            accelerations.extend(np.linalg.norm(p[joints, :2] - 2 * p1[joints, :2]
                                                + p2[joints, :2], axis=1))  # fmt: skip
            gt_accelerations.extend(np.linalg.norm(g[joints, :2] - 2 * g1[joints, :2]
                                                   + g2[joints, :2], axis=1))  # fmt: skip

    def mean(values: list) -> float:
        return float(np.mean(values)) if values else float("nan")

    return TrackingScores(
        mota=float(summary["mota"].iloc[0]),
        idf1=float(summary["idf1"].iloc[0]),
        id_switches=int(summary["num_switches"].iloc[0]),
        switches_by_gt=dict(by_gt),
        jitter_px=mean(accelerations),
        gt_jitter_px=mean(gt_accelerations),
        keypoint_error_px=mean(errors),
        frames=len(truth),
    )


def _oks_matrix(gt: FramePeople, pred: FramePeople) -> np.ndarray:
    """COCO OKS (ground-truth labelled joints, ground-truth box area) -> len(gt) x len(pred)."""
    out = np.zeros((len(gt.ids), len(pred.ids)))
    if not len(gt.ids) or not len(pred.ids):
        return out
    variances = (2.0 * np.asarray(COCO_KEYPOINTS.sigmas)) ** 2
    for i, (box, truth) in enumerate(zip(gt.boxes, gt.keypoints, strict=True)):
        labelled = truth[:, 2] > 0
        area = max(float(box[2] * box[3]), 1.0)
        d2 = ((pred.keypoints[:, :, :2] - truth[None, :, :2]) ** 2).sum(axis=2)
        terms = np.exp(-d2 / variances[None] / (2.0 * area))
        out[i] = terms[:, labelled].mean(axis=1) if labelled.any() else 0.0
    return out


def _scored(gt: FramePeople, pred: FramePeople) -> tuple[FramePeople, FramePeople]:
    """Leave out ground-truth people with under MIN_SCORED_JOINTS labelled joints (a leg at the
    frame's edge) and the predictions that overlap them best, so that finding them is neither a
    miss nor a false positive (as MOTChallenge ignores heavily truncated people)."""
    counts = (gt.keypoints[:, :, 2] > 0).sum(axis=1) if len(gt.ids) else np.zeros(0)
    ignored = counts < MIN_SCORED_JOINTS
    if not ignored.any():
        return gt, pred
    drop = np.zeros(len(pred.ids), dtype=bool)
    if len(pred.ids):
        iou = box_iou(pred.boxes, gt.boxes)
        best = iou.argmax(axis=1)
        drop = ignored[best] & (iou.max(axis=1) >= MATCH_IOU)
    keep_gt, keep_pred = ~ignored, ~drop
    return (
        FramePeople([i for i, k in zip(gt.ids, keep_gt, strict=True) if k], gt.boxes[keep_gt],
                    gt.keypoints[keep_gt]),
        FramePeople([i for i, k in zip(pred.ids, keep_pred, strict=True) if k],
                    pred.boxes[keep_pred], pred.keypoints[keep_pred]),
    )  # fmt: skip


def _gt_keypoints(frame: FramePeople, gt_id: int) -> np.ndarray:
    return frame.keypoints[frame.ids.index(gt_id)]


def load_ground_truth(annotation: dict) -> list[FramePeople]:
    """Per frame of a sequence's annotations.json (docs/video.md): its people."""
    by_image: dict[int, list[dict]] = defaultdict(list)
    for person in annotation["annotations"]:
        by_image[person["image_id"]].append(person)
    frames = []
    for image in sorted(annotation["images"], key=lambda i: i["frame_id"]):
        people = by_image.get(image["id"], [])
        frames.append(FramePeople(
            ids=[int(p["track_id"]) for p in people],
            boxes=np.array([p["bbox"] for p in people], dtype=np.float64).reshape(-1, 4),
            keypoints=np.array([p["keypoints"] for p in people],
                               dtype=np.float64).reshape(len(people), -1, 3) if people
            else np.zeros((0, 17, 3)),
        ))  # fmt: skip
    return frames
