"""The pose pipeline: an image (and optional person boxes) in, estimated persons out.

One chain, used by the service, ``omnipose predict``, bench and training's evaluation, built from
small units that can each be swapped:

* detector: BGR image -> person boxes ``[N, 4]`` (x, y, w, h) + scores ``[N]``
  (:mod:`omnipose.model.detection`);
* persons: client boxes, detections, pose-guided boxes -> the persons to estimate
  (:mod:`omnipose.model.persons`);
* crop: image + boxes -> crops ``[N, 3, H, W]`` float32 (:mod:`omnipose.model.crops`);
* runner: crops -> heatmaps ``[N, J, h, w]``, flip test around it (:mod:`omnipose.model.runners`);
* decode: heatmaps -> keypoints ``[N, J, 3]`` in the image, rescoring, OKS-NMS
  (:meth:`omnipose.model.topdown.TopDownPoseEstimator.decode`, :mod:`omnipose.model.nms`);
* tracker (optional): the persons of a video frame -> tracked persons (any :class:`Tracker`).

:meth:`PosePredictor.predict` runs the chain synchronously for one image. A server that batches
the network across requests calls the stages itself, in this order: :meth:`~PosePredictor.plan`
(and, when it says the detector must run, detection then :meth:`~PosePredictor.after_detection`),
:meth:`~PosePredictor.prepare`, :meth:`~PosePredictor.run` (on its model thread, any batch),
:meth:`~PosePredictor.decode`, :meth:`~PosePredictor.track`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from omnipose.model.crops import CropBatch, HeldImage, crop_persons
from omnipose.model.detection import Detections, PersonDetector
from omnipose.model.persons import client_persons, detected_persons, merge_guided
from omnipose.model.topdown import OKS_NMS_THRESHOLD, PersonPose, TopDownPoseEstimator

Boxes = tuple[np.ndarray, np.ndarray]  # boxes [N, 4] (x, y, w, h) and scores [N]


class TrackedFrame(Protocol):
    persons: list[PersonPose]  # every person of the frame, tracked ones with their track id


class Tracker(Protocol):
    """What the pipeline needs of a video tracker (:class:`omnipose.service.tracking.PoseTracker`
    is one): where to look in the next frame, and the frame's persons to follow."""

    def plan(self, width: int, height: int) -> Boxes | None:
        """Pose-guided boxes for a frame between detector frames; None: run the detector."""
        ...

    def guided_boxes(self, width: int, height: int) -> Boxes:
        """The guided boxes of the tracked persons, to complete a detector frame."""
        ...

    def update(self, persons: list[PersonPose], detector_ran: bool) -> TrackedFrame:
        ...


@dataclass
class Prediction:
    """The persons of one image, as :meth:`PosePredictor.predict` finds them."""

    persons: list[PersonPose]  # best first when tracked, else in OKS-NMS order
    candidates: int  # person boxes the network ran on
    detector_ran: bool


class PosePredictor:
    """The pipeline's units put together: ``estimator`` (crops, runner, decoding), an optional
    ``detector``, the person rules (``max_persons``, ``whole_image_if_no_person``)."""

    def __init__(self, estimator: TopDownPoseEstimator, detector: PersonDetector | None = None,
                 max_persons: int = 100, whole_image_if_no_person: bool = False) -> None:
        self.estimator = estimator
        self.detector = detector
        self.max_persons = max_persons
        self.whole_image_if_no_person = whole_image_if_no_person

    # --- persons ----------------------------------------------------------------------------
    def plan(self, width: int, height: int, boxes: np.ndarray | None = None,
             box_scores: np.ndarray | None = None,
             tracker: Tracker | None = None) -> Detections | None:
        """The persons of an image known without the detector: the client's ``boxes`` (a
        BoxError beyond ``max_persons``), else the tracker's pose-guided boxes between detector
        frames; None when the detector must run (then :meth:`after_detection`)."""
        if boxes is not None:
            return client_persons(boxes, box_scores, self.max_persons)
        guided = None if tracker is None else tracker.plan(width, height)
        if guided is not None:
            return Detections(*guided).top(self.max_persons)
        return None

    def after_detection(self, detections: Detections, image_shape: tuple[int, ...],
                        tracker: Tracker | None = None) -> Detections:
        """The persons of a detector frame: the top ``max_persons`` (or the whole image, if
        asked, when nobody was found), plus the tracked persons the detector missed."""
        persons = detected_persons(detections, image_shape, self.max_persons,
                                   self.whole_image_if_no_person)
        if tracker is None:
            return persons
        height, width = image_shape[:2]
        return Detections(*merge_guided((persons.boxes, persons.scores),
                                        tracker.guided_boxes(width, height), self.max_persons))

    # --- crops, network, decoding -----------------------------------------------------------
    def prepare(self, image: np.ndarray | HeldImage, persons: Detections,
                channels: Literal["bgr", "rgb"] = "bgr") -> CropBatch:
        """Crops ``[N, 3, H, W]`` for ``persons`` in ``image`` (see :mod:`omnipose.model.crops`)."""
        return crop_persons(self.estimator, image, persons, channels)

    def run(self, crops: torch.Tensor, flip: bool | None = None) -> torch.Tensor:
        """Heatmaps ``[N, J, h, w]`` for crops ``[N, 3, H, W]`` of one image or many; ``flip``
        None means the estimator's flip-test setting."""
        return self.estimator.forward(crops, flip)

    def decode(self, heatmaps: torch.Tensor | np.ndarray, crops: CropBatch,
               nms_threshold: float | None = OKS_NMS_THRESHOLD) -> list[PersonPose]:
        """Persons in image coordinates from one image's heatmaps ``[N, J, h, w]``: decoded,
        rescored, duplicates removed by OKS-NMS (unless ``nms_threshold`` is None)."""
        return self.estimator.decode(heatmaps, crops, nms_threshold)

    @staticmethod
    def track(tracker: Tracker | None, persons: list[PersonPose],
              detector_ran: bool) -> list[PersonPose]:
        """The frame's persons after the tracker saw them (as they are without a tracker). A
        frame with nobody to estimate is tracked too: tracks still age and expire."""
        if tracker is None:
            return persons
        return tracker.update(persons, detector_ran).persons

    # --- the whole chain --------------------------------------------------------------------
    def predict(self, image_bgr: np.ndarray, boxes: np.ndarray | None = None,
                box_scores: np.ndarray | None = None, tracker: Tracker | None = None,
                flip: bool | None = None) -> Prediction:
        """The persons of one BGR image ``[H, W, 3]``: in ``boxes`` ``[N, 4]`` (x, y, w, h) when
        given, else where the detector (or the ``tracker``'s plan) finds them."""
        height, width = image_bgr.shape[:2]
        persons = self.plan(width, height, boxes, box_scores, tracker)
        detector_ran = persons is None
        if persons is None:
            if self.detector is None:
                raise ValueError("this predictor has no person detector: pass the person boxes")
            detections = self.detector.detect(image_bgr)
            persons = self.after_detection(detections, image_bgr.shape, tracker)
        poses: list[PersonPose] = []
        if len(persons):
            crops = self.prepare(image_bgr, persons)
            poses = self.decode(self.run(crops.inputs, flip), crops)
        return Prediction(self.track(tracker, poses, detector_ran), len(persons), detector_ran)
