"""Which persons the pose network runs on, and which estimated persons are answered.

``omnipose predict``, bench and the serving engine must turn the same image and boxes into the
same persons, or their keypoints would differ. The rules live here once:

* detector output: the whole image becomes one box when nobody was found, but only when the user
  asked for it (a whole-image "person" on an empty scene is a made-up result), and at most
  ``max_persons`` boxes are kept, the highest-scoring ones (bounds the work one image can cause);
* client boxes are the caller's explicit request, so they are never silently dropped: more than
  ``max_persons`` of them is an error;
* on a tracked frame the detector's boxes are completed with the pose-guided boxes of tracks it
  missed (:func:`merge_guided`);
* the answer is filtered by the client's instance score, person count and keypoint score
  (:func:`filter_poses`).
"""

from __future__ import annotations

import numpy as np

from omnipose.model.detection import Detections, box_iou
from omnipose.model.topdown import PersonPose


class BoxError(ValueError):
    """Boxes that cannot be used; the message names the offending box."""


def detected_persons(detections: Detections, image_shape: tuple[int, ...], max_persons: int,
                     whole_image_if_no_person: bool) -> Detections:
    """The detector's boxes to estimate: the whole-image fallback if asked, the top ``max_persons``
    by score."""
    if len(detections) == 0 and whole_image_if_no_person:
        return Detections.whole_image(image_shape)
    return detections.top(max_persons)


def client_persons(boxes: np.ndarray, scores: np.ndarray | None, max_persons: int) -> Detections:
    """Client boxes as given (score 1 unless sent); BoxError beyond ``max_persons`` or when the
    scores do not match the boxes."""
    if len(boxes) > max_persons:
        raise BoxError(f"{len(boxes)} boxes given, over the limit of {max_persons} persons per"
                       " image")
    if scores is None:
        scores = np.ones(len(boxes))
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(boxes):
        raise BoxError(f"got {len(boxes)} boxes but {len(scores)} box scores")
    return Detections(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), scores)


def merge_guided(
    detected: tuple[np.ndarray, np.ndarray],
    guided: tuple[np.ndarray, np.ndarray],
    max_boxes: int,
    iou: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """Detector boxes plus the guided boxes of tracks no detection covers (IoU <= ``iou``): a
    detector that misses someone for a frame does not end the person's track. At most
    ``max_boxes``, detections first."""
    boxes, scores = detected
    extra_boxes, extra_scores = guided
    if len(extra_boxes):
        if len(boxes):
            covered = box_iou(extra_boxes, boxes).max(axis=1) > iou
            extra_boxes, extra_scores = extra_boxes[~covered], extra_scores[~covered]
        boxes = np.concatenate([boxes.reshape(-1, 4), extra_boxes])
        scores = np.concatenate([scores.reshape(-1), extra_scores])
    return boxes[:max_boxes], scores[:max_boxes]


def filter_poses(persons: list[PersonPose], max_persons: int, min_instance_score: float = 0.0,
                 min_keypoint_score: float = 0.0, min_box_score: float = 0.0) -> list[PersonPose]:
    """At most ``max_persons`` persons scoring ``min_instance_score`` or more whose box scored
    ``min_box_score`` or more, best first, with keypoints under ``min_keypoint_score`` zeroed (in
    a copy of each keypoint array)."""
    persons = [p for p in persons
               if p.score >= min_instance_score and p.box_score >= min_box_score]
    persons.sort(key=lambda p: p.score, reverse=True)
    persons = persons[:max_persons]
    if min_keypoint_score > 0:
        for person in persons:
            low = person.keypoints[:, 2] < min_keypoint_score
            person.keypoints = person.keypoints.copy()
            person.keypoints[low] = 0.0
    return persons
