"""The top-down pipeline end to end: boxes -> crops -> heatmaps -> image keypoints -> OKS-NMS.

A "blob finder" stands in for the network: it resamples the crop's intensity onto the heatmap grid
with corner pixel centres aligned (the crop convention's own input -> heatmap relation), so a
Gaussian blob drawn in the image becomes a Gaussian heatmap peak for every joint. Whatever the
pipeline returns must then land on the blob, which checks the crop geometry, the heatmap decoder
and the back-projection together against a position known in advance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omnipose.model.configs import get_config
from omnipose.model.topdown import TopDownPoseEstimator, instance_scores
from omnipose.model.transforms import IMAGENET_MEAN, IMAGENET_STD

CONFIG = get_config("coco-w18-256x192")


class BlobFinder(nn.Module):
    """Heatmap = crop brightness resampled to the heatmap size, border pixel centres aligned.

    That is exactly how the pixel-centre crop convention relates the input and heatmap
    transforms (input pixel ``i * (in_w - 1) / (hm_w - 1)`` -> heatmap pixel ``i``), so a
    correct pipeline puts the decoded peak back on the blob.
    """

    def __init__(self, num_joints: int) -> None:
        super().__init__()
        self.num_joints = num_joints
        self.mean = nn.Parameter(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), requires_grad=False)
        self.std = nn.Parameter(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = (x * self.std + self.mean).mean(dim=1, keepdim=True)
        heatmap_size = (x.shape[2] // 4, x.shape[3] // 4)
        heatmap = F.interpolate(brightness, size=heatmap_size, mode="bilinear", align_corners=True)
        return heatmap.expand(-1, self.num_joints, -1, -1).contiguous()


def blob_image(centers: list[tuple[float, float]], sigma: float = 14.0,
               shape: tuple[int, int] = (480, 640)) -> np.ndarray:
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    image = np.zeros(shape, np.float64)
    for cx, cy in centers:
        image = np.maximum(image, np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2)))
    return np.repeat((image * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def estimator(flip_test: bool = False, precision: str = "fp32") -> TopDownPoseEstimator:
    return TopDownPoseEstimator(BlobFinder(CONFIG.num_joints), CONFIG, flip_test=flip_test,
                                precision=precision)


@pytest.mark.parametrize("box", [[250.0, 120.0, 110.0, 170.0], [200.0, 60.0, 260.0, 300.0]])
def test_keypoints_land_on_the_blob(box: list[float]) -> None:
    blob = (301.3, 207.8)
    poses = estimator().estimate(blob_image([blob]), np.array([box]), np.array([0.9]))
    assert len(poses) == 1
    kps = poses[0].keypoints
    # Box -> crop scale: image pixels per input pixel; allow a quarter input pixel of error.
    pixels_per_input = max(box[2] / 192, box[3] / 256) * 1.25
    np.testing.assert_allclose(kps[:, 0], blob[0], atol=0.25 * pixels_per_input)
    np.testing.assert_allclose(kps[:, 1], blob[1], atol=0.25 * pixels_per_input)
    assert np.all(kps[:, 2] > 0.9)
    np.testing.assert_allclose(poses[0].score, 0.9 * kps[:, 2].mean(), rtol=1e-6)
    np.testing.assert_array_equal(poses[0].bbox, box)


def test_flip_test_keeps_keypoints_on_the_blob() -> None:
    blob = (320.0, 240.0)
    box = [260.0, 150.0, 120.0, 180.0]
    plain = estimator(flip_test=False).estimate(blob_image([blob]), np.array([box]))[0]
    flipped = estimator(flip_test=True).estimate(blob_image([blob]), np.array([box]))[0]
    pixels_per_input = max(box[2] / 192, box[3] / 256) * 1.25
    # Mirroring about the crop's centre pixel is exact in this convention: no shift is needed,
    # so flip-averaged keypoints stay where the plain ones are (bilinear rounding aside).
    np.testing.assert_allclose(flipped.keypoints[:, :2], plain.keypoints[:, :2],
                               atol=0.05 * pixels_per_input)
    assert np.all(flipped.keypoints[:, 2] > 0.9)
    # HRNet's one-pixel shift, wrong for this convention, moves them by half a heatmap pixel
    shifted_estimator = estimator(flip_test=True)
    shifted_estimator.flip_shift = True
    shifted = shifted_estimator.estimate(blob_image([blob]), np.array([box]))[0]
    offset = shifted.keypoints[:, 0] - plain.keypoints[:, 0]
    np.testing.assert_allclose(offset, 0.5 * 4 * pixels_per_input, rtol=0.25)


def test_many_people_in_one_batch_and_oks_nms_removes_duplicates() -> None:
    blobs = [(120.0, 100.0), (400.0, 300.0), (560.0, 120.0)]
    boxes = np.array([
        [70, 30, 100, 140],  # person 1
        [72, 32, 98, 138],  # a duplicate box of person 1, lower score
        [340, 220, 120, 170],
        [510, 50, 100, 140],
    ], dtype=float)  # fmt: skip
    scores = np.array([0.9, 0.6, 0.8, 0.7])
    poses = estimator().estimate(blob_image(blobs), boxes, scores)
    assert len(poses) == 3
    found = sorted((round(p.keypoints[:, 0].mean()), round(p.keypoints[:, 1].mean()))
                   for p in poses)
    assert found == sorted((round(x), round(y)) for x, y in blobs)
    assert 0.6 not in [p.box_score for p in poses]
    assert [p.score for p in poses] == sorted((p.score for p in poses), reverse=True)
    # Without NMS every box is answered.
    assert len(estimator().estimate(blob_image(blobs), boxes, scores, nms_threshold=None)) == 4


def test_no_boxes_gives_no_people() -> None:
    assert estimator().estimate(blob_image([(10.0, 10.0)]), np.zeros((0, 4))) == []


def test_box_score_count_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 boxes but 1 box scores"):
        estimator().prepare(blob_image([]), np.ones((2, 4)), np.ones(1))


def test_bf16_on_cpu_agrees_with_fp32() -> None:
    image, box = blob_image([(301.3, 207.8)]), np.array([[250.0, 120.0, 110.0, 170.0]])
    fp32 = estimator().estimate(image, box)[0].keypoints
    bf16 = estimator(precision="bf16").estimate(image, box)[0].keypoints
    np.testing.assert_allclose(bf16[:, :2], fp32[:, :2], atol=1.0)


def test_fp16_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is allowed")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        estimator(precision="fp16")


def test_instance_score_ignores_low_confidence_keypoints() -> None:
    keypoints = np.zeros((2, 4, 3))
    keypoints[0, :, 2] = [0.9, 0.7, 0.1, 0.05]
    keypoints[1, :, 2] = [0.1, 0.1, 0.1, 0.1]
    np.testing.assert_allclose(instance_scores(keypoints, np.array([0.5, 1.0])), [0.4, 0.0])


def test_coco_annotation_layout() -> None:
    pose = estimator().estimate(blob_image([(301.3, 207.8)]), np.array([[250, 120, 110, 170.0]]))[0]
    annotation = pose.to_coco(42, CONFIG.keypoints)
    assert annotation["image_id"] == 42 and annotation["category_id"] == 1
    assert len(annotation["keypoints"]) == 17 * 3
    assert list(annotation["named_keypoints"]) == list(CONFIG.keypoints.joint_names)
    nose = annotation["named_keypoints"]["nose"]
    assert nose["x"] == pytest.approx(annotation["keypoints"][0], abs=0.01)
