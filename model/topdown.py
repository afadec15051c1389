"""Top-down pose estimation: an image and person boxes in, COCO-format keypoints out.

The estimator holds the pose units of the pipeline and exposes them as three stages a server can
run on different threads: ``prepare`` (crops, :mod:`omnipose.model.crops`), ``forward`` (the
network through its runner, :mod:`omnipose.model.runners`; the only stage that must run on the
model worker) and ``decode`` (heatmaps -> image keypoints -> rescoring -> OKS-NMS, here). The whole
chain from an image, with person selection and tracking, is :mod:`omnipose.model.predictor`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from omnipose.model.codec import decode_heatmaps
from omnipose.model.configs import ModelConfig
from omnipose.model.crops import CropBatch, cut_crops, device_cut, host_cut
from omnipose.model.nms import oks_nms
from omnipose.model.precision import Precision, PrecisionSetting
from omnipose.model.runners import Runner, TorchRunner, as_runner, run_crops
from omnipose.model.skeleton import KeypointSpec
from omnipose.model.transforms import PIXEL_STD, get_affine_transforms, transform_points

# Published test-time conventions (see the reference facts).
KEYPOINT_SCORE_THRESHOLD = 0.2  # keypoints below it are left out of the instance score
OKS_NMS_THRESHOLD = 0.9


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


def instance_scores(keypoints: np.ndarray, box_scores: np.ndarray,
                    threshold: float = KEYPOINT_SCORE_THRESHOLD) -> np.ndarray:
    """Box score times the mean confidence of the keypoints above ``threshold`` (0 if none)."""
    conf = keypoints[..., 2]
    above = conf > threshold
    count = above.sum(axis=1)
    mean = np.where(count > 0, (conf * above).sum(axis=1) / np.maximum(count, 1), 0.0)
    return box_scores * mean


class TopDownPoseEstimator:
    """The pose units: crops for person boxes, the network through a runner, heatmap decoding.

    ``model`` is a torch network (run by a :class:`omnipose.model.runners.TorchRunner` on
    ``device`` in ``precision``) or any :class:`omnipose.model.runners.Runner` (its own device
    and precision then apply). Flip test (``flip_test``, ``flip_shift``) is applied around the
    runner by :func:`omnipose.model.runners.run_crops`.
    """

    def __init__(
        self,
        model: nn.Module | Runner,
        config: ModelConfig,
        keypoints: KeypointSpec | None = None,
        device: str | torch.device = "cpu",
        precision: PrecisionSetting = "fp32",
        flip_test: bool = True,
        flip_shift: bool = False,
    ) -> None:
        self.config = config
        self.keypoints = keypoints or config.keypoints
        self.runner = as_runner(model, device, precision)
        self.flip_test = flip_test
        self.flip_shift = flip_shift
        self._flip_index = self.keypoints.flip_index()

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def precision(self) -> Precision:
        return self.runner.precision

    @property
    def model(self) -> nn.Module | None:
        """The torch network, when the runner is torch's (None for other backends)."""
        return self.runner.network if isinstance(self.runner, TorchRunner) else None

    def use_buckets(self, largest: int, use_cuda_graphs: bool | None = None) -> list[int]:
        """Run the network in fixed batch-size buckets up to ``largest`` (CUDA graphs on CUDA),
        all captured and warmed now; returns the bucket sizes ([] for a runner without buckets).
        See model.buckets."""
        if not isinstance(self.runner, TorchRunner):
            return []
        return self.runner.use_buckets(self.config.input_size, largest, use_cuda_graphs)

    # --- stage 1: crops -------------------------------------------------------------------
    def prepare(self, image_rgb: np.ndarray, boxes_xywh: np.ndarray,
                box_scores: np.ndarray | None = None) -> CropBatch:
        """Crop every box (padded to the model's aspect ratio) and normalise; on the CPU."""
        return cut_crops(boxes_xywh, box_scores, self.config.input_size,
                         self.config.aspect_ratio, host_cut(image_rgb))

    def prepare_on_device(self, image: torch.Tensor, boxes_xywh: np.ndarray,
                          box_scores: np.ndarray | None = None) -> CropBatch:
        """:meth:`prepare` for a ``[1, 3, H, W]`` uint8 RGB image tensor already on a device
        (:func:`omnipose.model.device_crops.image_to_device`): the crops are sampled there, with the
        same affine matrices, and stay there."""
        return cut_crops(boxes_xywh, box_scores, self.config.input_size,
                         self.config.aspect_ratio, device_cut(image))

    # --- stage 2: network -----------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, flip_test: bool | None = None) -> torch.Tensor:
        """Heatmaps ``[N, J, h, w]`` (float32, on the runner's device) for crops
        ``[N, 3, H, W]`` of any N. With flip test the mirrored crops ride in the same call."""
        flip = self.flip_test if flip_test is None else flip_test
        return run_crops(self.runner, inputs, self.keypoints.num_joints,
                         self.config.heatmap_size, flip, self._flip_index, self.flip_shift)

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
