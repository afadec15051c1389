"""Person detectors: ultralytics YOLO, OpenCV's HOG people detector, or client-supplied boxes.

Every backend answers the same question for a batch of BGR images: where are the people, as
``x, y, w, h`` boxes with a score in [0, 1]. Weights are files the user points at; nothing here
ever downloads anything.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

DetectorKind = str  # "yolo" | "hog" | "none"
DETECTOR_KINDS = ("yolo", "hog", "none")


class DetectorError(RuntimeError):
    """A detector could not be built or run; the message is meant for the user as is."""


@dataclass
class Detections:
    """Person boxes of one image: ``boxes`` N x 4 (x, y, w, h, pixels), ``scores`` N in [0, 1]."""

    boxes: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), dtype=np.float64), np.zeros(0, dtype=np.float64))

    @classmethod
    def whole_image(cls, image_shape: Sequence[int]) -> Detections:
        """One box covering the image: the explicit fallback when nobody is detected."""
        height, width = image_shape[:2]
        return cls(np.array([[0.0, 0.0, float(width), float(height)]]), np.ones(1))

    def __len__(self) -> int:
        return len(self.boxes)

    def top(self, limit: int) -> Detections:
        """The ``limit`` highest-scoring boxes."""
        order = np.argsort(-self.scores, kind="stable")[:limit]
        return Detections(self.boxes[order], self.scores[order])


class PersonDetector(ABC):
    """Finds people in images; batched so a server can coalesce requests."""

    name: str = "detector"

    @abstractmethod
    def detect_batch(self, images_bgr: Sequence[np.ndarray]) -> list[Detections]:
        """Detections for each image, in order."""

    def detect(self, image_bgr: np.ndarray) -> Detections:
        return self.detect_batch([image_bgr])[0]


class NoDetector(PersonDetector):
    """For deployments where clients always send their own boxes: finds nobody."""

    name = "none"

    def detect_batch(self, images_bgr: Sequence[np.ndarray]) -> list[Detections]:
        return [Detections.empty() for _ in images_bgr]


class HogPersonDetector(PersonDetector):
    """OpenCV's built-in HOG + linear SVM people detector: weak, but offline and weight-free.

    Images are scaled down so the longer side is at most ``max_side`` (HOG cost grows with area)
    and never scaled up: an image smaller than the 64 x 128 detection window is padded instead,
    so a tiny or absurdly thin image costs nothing. SVM margins are squashed to (0, 1) with a
    logistic so scores are comparable with YOLO's; HOG only reports windows with a positive
    margin, so its scores start at 0.5 and ``min_score`` filters only above that.
    """

    name = "hog"
    WINDOW_WIDTH, WINDOW_HEIGHT = 64, 128

    def __init__(self, min_score: float = 0.25, max_side: int = 800, nms_iou: float = 0.45) -> None:
        self.min_score = min_score
        self.max_side = max_side
        self.nms_iou = nms_iou
        self._hit_threshold = max(0.0, float(np.log(min_score / (1.0 - min_score))))
        self._hog = cv2.HOGDescriptor()
        self._hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

    def _detect_one(self, image_bgr: np.ndarray) -> Detections:
        height, width = image_bgr.shape[:2]
        factor = min(1.0, self.max_side / max(height, width))
        scaled = image_bgr
        if factor < 1.0:
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            scaled = cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)
        pad_bottom = max(0, self.WINDOW_HEIGHT - scaled.shape[0])
        pad_right = max(0, self.WINDOW_WIDTH - scaled.shape[1])
        if pad_bottom or pad_right:
            scaled = cv2.copyMakeBorder(scaled, 0, pad_bottom, 0, pad_right, cv2.BORDER_CONSTANT)
        rects, margins = self._hog.detectMultiScale(
            scaled, hitThreshold=self._hit_threshold, winStride=(8, 8), padding=(8, 8), scale=1.05
        )
        if len(rects) == 0:
            return Detections.empty()
        boxes = np.asarray(rects, dtype=np.float64) / factor
        scores = 1.0 / (1.0 + np.exp(-np.asarray(margins, dtype=np.float64).reshape(-1)))
        keep = cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), self.min_score, self.nms_iou)
        keep = np.asarray(keep, dtype=int).reshape(-1)
        boxes, scores = clip_boxes(boxes[keep], width, height), scores[keep]
        valid = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)  # windows lying only on the padding
        return Detections(boxes[valid], scores[valid])

    def detect_batch(self, images_bgr: Sequence[np.ndarray]) -> list[Detections]:
        return [self._detect_one(image) for image in images_bgr]


class YoloPersonDetector(PersonDetector):
    """ultralytics YOLO restricted to the person class, batched over images.

    ``weights`` must be a local file: a missing file is an error, never a silent download.
    """

    name = "yolo"

    def __init__(self, weights: str | Path, device: str = "cpu", min_score: float = 0.25,
                 image_size: int = 640) -> None:
        os.environ["YOLO_OFFLINE"] = "1"
        path = Path(weights)
        if not path.is_file():
            raise DetectorError(
                f"YOLO weights file not found: {path} (download it yourself and pass its path;"
                " this service never downloads weights)"
            )
        from ultralytics import YOLO  # imported lazily: it is slow to import

        try:
            self._model = YOLO(str(path))
        except Exception as exc:  # ultralytics raises many types for a bad file
            raise DetectorError(f"cannot load YOLO weights {path}: {exc}") from exc
        self.device = device
        self.min_score = min_score
        self.image_size = image_size

    def detect_batch(self, images_bgr: Sequence[np.ndarray]) -> list[Detections]:
        if not images_bgr:
            return []
        results = self._model.predict(
            list(images_bgr), classes=[0], conf=self.min_score, device=self.device,
            imgsz=self.image_size, verbose=False,
        )
        out = []
        for result in results:
            xyxy = result.boxes.xyxy.cpu().numpy().astype(np.float64)
            scores = result.boxes.conf.cpu().numpy().astype(np.float64)
            boxes = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
            out.append(Detections(boxes.reshape(-1, 4), scores))
        return out


def clip_boxes(boxes_xywh: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip x, y, w, h boxes to the image."""
    x1 = np.clip(boxes_xywh[:, 0], 0, width)
    y1 = np.clip(boxes_xywh[:, 1], 0, height)
    x2 = np.clip(boxes_xywh[:, 0] + boxes_xywh[:, 2], 0, width)
    y2 = np.clip(boxes_xywh[:, 1] + boxes_xywh[:, 3], 0, height)
    return np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between x, y, w, h boxes ``a`` (N x 4) and ``b`` (M x 4) -> N x M."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    w = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]),
                0, None)  # fmt: skip
    h = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]),
                0, None)  # fmt: skip
    inter = w * h
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def build_detector(kind: DetectorKind, weights: str | Path | None = None, device: str = "cpu",
                   min_score: float = 0.25) -> PersonDetector:
    """The detector the user asked for, or a DetectorError that says what is missing."""
    if kind == "yolo":
        if weights is None:
            raise DetectorError("the yolo detector needs a weights file (--detector-weights FILE)")
        return YoloPersonDetector(weights, device=device, min_score=min_score)
    if kind == "hog":
        return HogPersonDetector(min_score=min_score)
    if kind == "none":
        return NoDetector()
    raise DetectorError(f"unknown detector {kind!r}; choose one of {', '.join(DETECTOR_KINDS)}")
