"""Which persons the pose network runs on, and their crops: one rule for the CLI and the service.

``omnipose predict`` and the serving engine must turn the same image and boxes into the same
crops, or their keypoints would differ. The rules live here once:

* detector output: the whole image becomes one box when nobody was found, but only when the user
  asked for it (a whole-image "person" on an empty scene is a made-up result), and at most
  ``max_persons`` boxes are kept, the highest-scoring ones (bounds the work one image can cause);
* client boxes are the caller's explicit request, so they are never silently dropped: more than
  ``max_persons`` of them is an error;
* images arrive as OpenCV BGR (or as RGB tensors decoded on the model's device), the network
  was trained on RGB.
"""

from __future__ import annotations

import cv2
import numpy as np

from omnipose.model.device_crops import image_to_device
from omnipose.model.topdown import CropBatch, TopDownPoseEstimator
from omnipose.service.boxes import BoxError
from omnipose.service.detection import Detections
from omnipose.service.images import DecodedImage


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


def crop_persons(estimator: TopDownPoseEstimator, image: np.ndarray | DecodedImage,
                 persons: Detections) -> CropBatch:
    """Network inputs for ``persons``. A host BGR image (an array, or a DecodedImage holding one)
    goes BGR -> RGB, then the estimator's crops; on a GPU it is uploaded once (pinned,
    asynchronous) and the crops are cut there (model.device_crops). An image decoded on the
    model's device (RGB already) is cropped there as it is."""
    if isinstance(image, DecodedImage):
        if image.device_rgb is not None:
            rgb = image.device_rgb.to(estimator.device).unsqueeze(0)  # [1, 3, H, W]
            return estimator.prepare_on_device(rgb, persons.boxes, persons.scores)
        image = image.host_bgr()
    image_rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if estimator.device.type == "cuda":
        device_image = image_to_device(image_rgb, estimator.device, pin_memory=True)
        return estimator.prepare_on_device(device_image, persons.boxes, persons.scores)
    return estimator.prepare(image_rgb, persons.boxes, persons.scores)
