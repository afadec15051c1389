"""Top-down pose estimation: an image and person boxes in, COCO-format keypoints out.

The work is split into three stages so a server can run them on different threads:
``prepare`` (crop + normalise, CPU), ``forward`` (the network, on the model's device; the only
stage that must run on the model worker) and ``decode`` (heatmaps -> image keypoints -> OKS-NMS).
``estimate`` chains them for simple callers such as the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from omnipose.model.buckets import BucketedForward, bucket_sizes
from omnipose.model.codec import decode_heatmaps, flip_heatmaps_back
from omnipose.model.configs import ModelConfig
from omnipose.model.device_crops import crop_on_device, normalize_on_device
from omnipose.model.nms import oks_nms
from omnipose.model.precision import (
    Precision,
    PrecisionSetting,
    cast_inputs,
    cast_network,
    check_precision,
    resolve_precision,
)
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

# Published test-time conventions (see the reference facts).
KEYPOINT_SCORE_THRESHOLD = 0.2  # keypoints below it are left out of the instance score
OKS_NMS_THRESHOLD = 0.9


@dataclass
class CropBatch:
    """Network inputs for the persons of one image, with the geometry to map results back."""

    inputs: torch.Tensor  # N x 3 x H x W, float32, ImageNet-normalised
    centers: np.ndarray  # N x 2
    scales: np.ndarray  # N x 2 (box size / 200, padded)
    boxes: np.ndarray  # N x 4, x y w h in image pixels
    box_scores: np.ndarray  # N

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class PersonPose:
    """One estimated person in image coordinates."""

    bbox: np.ndarray  # x, y, w, h
    box_score: float
    keypoints: np.ndarray  # J x 3: x, y, confidence
    score: float  # box score x mean confidence of keypoints above KEYPOINT_SCORE_THRESHOLD
    track_id: int | None = None  # video streams: the person's identity, once a confirmed track

    def to_coco(self, image_id: int | str, spec: KeypointSpec, category_id: int = 1) -> dict:
        """COCO results-format annotation, plus keypoints by name for human readers."""
        kps = self.keypoints.astype(float)
        return {
            "image_id": image_id,
            "category_id": category_id,
            "bbox": [round(float(v), 2) for v in self.bbox],
            "keypoints": [round(float(v), 4) for v in kps.reshape(-1)],
            "score": round(float(self.score), 6),
            "box_score": round(float(self.box_score), 6),
            "named_keypoints": {
                name: {"x": round(x, 2), "y": round(y, 2), "score": round(c, 4)}
                for name, (x, y, c) in zip(spec.joint_names, kps.tolist(), strict=True)
            },
        }


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when available; anything else is passed to torch as given."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return resolved


def instance_scores(keypoints: np.ndarray, box_scores: np.ndarray,
                    threshold: float = KEYPOINT_SCORE_THRESHOLD) -> np.ndarray:
    """Box score times the mean confidence of the keypoints above ``threshold`` (0 if none)."""
    conf = keypoints[..., 2]
    above = conf > threshold
    count = above.sum(axis=1)
    mean = np.where(count > 0, (conf * above).sum(axis=1) / np.maximum(count, 1), 0.0)
    return box_scores * mean


class TopDownPoseEstimator:
    """Runs an OmniPose network over person crops and turns heatmaps into image keypoints."""

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        keypoints: KeypointSpec | None = None,
        device: str | torch.device = "cpu",
        precision: PrecisionSetting = "fp32",
        flip_test: bool = True,
        flip_shift: bool = False,
    ) -> None:
        self.config = config
        self.keypoints = keypoints or config.keypoints
        self.device = resolve_device(device)
        self.precision: Precision = resolve_precision(self.device, precision)
        check_precision(self.device, self.precision)
        self.flip_test = flip_test
        self.flip_shift = flip_shift
        self.model = cast_network(model.to(self.device).eval(), self.precision)
        self._flip_index = self.keypoints.flip_index()
        self._bucketed: BucketedForward | None = None

    def use_buckets(self, largest: int, use_cuda_graphs: bool | None = None) -> list[int]:
        """Run the network in fixed batch-size buckets up to ``largest`` (CUDA graphs on CUDA),
        all captured and warmed now; returns the bucket sizes. See model.buckets."""
        height, width = self.config.input_size
        example = cast_inputs(torch.zeros(1, 3, height, width, device=self.device),
                              self.precision)
        self._bucketed = BucketedForward(self.model, example, bucket_sizes(largest),
                                         use_cuda_graphs)
        self._bucketed.warm_up()
        return self._bucketed.buckets

    # --- stage 1: crops -------------------------------------------------------------------
    def prepare(self, image_rgb: np.ndarray, boxes_xywh: np.ndarray,
                box_scores: np.ndarray | None = None) -> CropBatch:
        """Crop every box (padded to the model's aspect ratio) and normalise; on the CPU."""
        return self._crop(boxes_xywh, box_scores, lambda affines, size: normalize_crops(
            warp_crops(image_rgb, affines, size)))

    def prepare_on_device(self, image: torch.Tensor, boxes_xywh: np.ndarray,
                          box_scores: np.ndarray | None = None) -> CropBatch:
        """:meth:`prepare` for a ``[1, 3, H, W]`` uint8 RGB image tensor already on a device
        (:func:`omnipose.model.device_crops.image_to_device`): the crops are sampled there, with the
        same affine matrices, and stay there."""
        return self._crop(boxes_xywh, box_scores, lambda affines, size: normalize_on_device(
            crop_on_device(image, affines, size)))

    def _crop(self, boxes_xywh: np.ndarray, box_scores: np.ndarray | None,
              cut: Callable[[np.ndarray, tuple[int, int]], torch.Tensor]) -> CropBatch:
        boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
        scores = (np.ones(len(boxes)) if box_scores is None
                  else np.asarray(box_scores, dtype=np.float64).reshape(-1))
        if len(scores) != len(boxes):
            raise ValueError(f"got {len(boxes)} boxes but {len(scores)} box scores")
        height, width = self.config.input_size
        if len(boxes) == 0:
            empty = np.zeros((0, 2))
            return CropBatch(torch.zeros(0, 3, height, width), empty, empty, boxes, scores)
        centers, scales = box_to_center_scale(boxes, self.config.aspect_ratio, padding=BOX_PADDING)
        affines = get_affine_transforms(centers, scales, np.zeros(len(boxes)), (width, height))
        return CropBatch(cut(affines, (width, height)), centers, scales, boxes, scores)

    # --- stage 2: network -----------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, flip_test: bool | None = None) -> torch.Tensor:
        """Heatmaps (float32, on the model's device) for a batch of normalised crops of any size.

        With flip test the mirrored crops ride in the same forward pass (one batch of 2N).
        """
        flip = self.flip_test if flip_test is None else flip_test
        n = inputs.shape[0]
        if n == 0:
            h, w = self.config.heatmap_size
            return torch.zeros(0, self.keypoints.num_joints, h, w, device=self.device)
        if self.device.type == "cuda" and inputs.device.type == "cpu":
            inputs = inputs.pin_memory()  # page-locked: the copy below is asynchronous
        x = inputs.to(self.device, non_blocking=True)
        if flip:
            x = torch.cat([x, torch.flip(x, dims=[3])], dim=0)
        run = self._bucketed or self.model
        heatmaps = run(cast_inputs(x, self.precision)).float()
        if flip:
            flipped = flip_heatmaps_back(heatmaps[n:], self._flip_index, shift=self.flip_shift)
            heatmaps = (heatmaps[:n] + flipped) * 0.5
        return heatmaps

    # --- stage 3: heatmaps -> keypoints ---------------------------------------------------
    def decode(self, heatmaps: torch.Tensor | np.ndarray, crops: CropBatch,
               nms_threshold: float | None = OKS_NMS_THRESHOLD) -> list[PersonPose]:
        """Decode (DARK), map back to the image, rescore and suppress duplicates with OKS-NMS."""
        if len(crops) == 0:
            return []
        coords, confidences = decode_heatmaps(heatmaps)
        h, w = heatmaps.shape[-2:]
        inverse = get_affine_transforms(
            crops.centers, crops.scales, np.zeros(len(crops)), (int(w), int(h)), inverse=True
        )
        image_xy = transform_points(coords, inverse)
        keypoints = np.concatenate([image_xy, confidences[..., None]], axis=-1)
        scores = instance_scores(keypoints, crops.box_scores)
        order = list(range(len(crops)))
        if nms_threshold is not None and len(crops) > 1:
            # The padded, aspect-fitted crop area, as the published evaluation uses for OKS.
            areas = np.prod(crops.scales * PIXEL_STD, axis=1)
            sigmas = np.asarray(self.keypoints.sigmas)
            order = oks_nms(keypoints, scores, areas, sigmas, threshold=nms_threshold)
        return [
            PersonPose(crops.boxes[i].copy(), float(crops.box_scores[i]), keypoints[i],
                       float(scores[i]))
            for i in order
        ]

    def estimate(self, image_rgb: np.ndarray, boxes_xywh: np.ndarray,
                 box_scores: np.ndarray | None = None,
                 nms_threshold: float | None = OKS_NMS_THRESHOLD) -> list[PersonPose]:
        """All three stages in one call, for callers without their own scheduling."""
        crops = self.prepare(image_rgb, boxes_xywh, box_scores)
        return self.decode(self.forward(crops.inputs), crops, nms_threshold)
