"""Keypoint definitions: joint names, left/right flip pairs, limbs to draw and OKS sigmas."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Colours are BGR (OpenCV order). Left limbs green, right limbs orange, centre/face blue: the
# convention of the COCO keypoint visualisations.
LEFT_BGR = (0, 255, 0)
RIGHT_BGR = (0, 128, 255)
CENTER_BGR = (255, 153, 51)


@dataclass(frozen=True)
class KeypointSpec:
    """Everything that depends on the dataset's joint layout rather than on the network."""

    dataset: str
    joint_names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    limbs: tuple[tuple[int, int], ...]  # 0-based joint index pairs
    limb_colors: tuple[tuple[int, int, int], ...]  # BGR, one per limb
    sigmas: tuple[float, ...]  # per-joint OKS sigmas (COCO's; MPII reuses the closest ones)

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    def flip_index(self) -> np.ndarray:
        """Permutation that maps each joint to its mirror-image joint (itself if unpaired)."""
        index = np.arange(self.num_joints)
        for left, right in self.flip_pairs:
            index[left], index[right] = right, left
        return index

    def to_dict(self) -> dict:
        """Plain-JSON form stored in checkpoints and reported by the service."""
        return {
            "dataset": self.dataset,
            "joint_names": list(self.joint_names),
            "flip_pairs": [list(p) for p in self.flip_pairs],
            "limbs": [list(p) for p in self.limbs],
            "limb_colors": [list(c) for c in self.limb_colors],
            "sigmas": list(self.sigmas),
        }

    @classmethod
    def from_dict(cls, data: dict) -> KeypointSpec:
        return cls(
            dataset=str(data["dataset"]),
            joint_names=tuple(data["joint_names"]),
            flip_pairs=tuple(tuple(p) for p in data["flip_pairs"]),
            limbs=tuple(tuple(p) for p in data["limbs"]),
            limb_colors=tuple(tuple(c) for c in data["limb_colors"]),
            sigmas=tuple(float(s) for s in data["sigmas"]),
        )


COCO_KEYPOINTS = KeypointSpec(
    dataset="coco",
    joint_names=(
        "nose", "left_eye", "right_eye", "left_ear", "right_ear",
        "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
        "left_wrist", "right_wrist", "left_hip", "right_hip",
        "left_knee", "right_knee", "left_ankle", "right_ankle",
    ),
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    # COCO's own skeleton (person_keypoints annotations), converted to 0-based indices.
    limbs=(
        (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
        (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
    ),
    limb_colors=(
        LEFT_BGR, LEFT_BGR, RIGHT_BGR, RIGHT_BGR, CENTER_BGR, LEFT_BGR, RIGHT_BGR, CENTER_BGR,
        LEFT_BGR, RIGHT_BGR, LEFT_BGR, RIGHT_BGR, CENTER_BGR, LEFT_BGR, RIGHT_BGR,
        LEFT_BGR, RIGHT_BGR, LEFT_BGR, RIGHT_BGR,
    ),
    sigmas=(
        0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
        0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
    ),
)

MPII_KEYPOINTS = KeypointSpec(
    dataset="mpii",
    joint_names=(
        "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
        "pelvis", "thorax", "upper_neck", "head_top",
        "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist",
    ),
    flip_pairs=((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13)),
    limbs=(
        (0, 1), (1, 2), (2, 6), (6, 3), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9),
        (7, 12), (12, 11), (11, 10), (7, 13), (13, 14), (14, 15),
    ),
    limb_colors=(
        RIGHT_BGR, RIGHT_BGR, RIGHT_BGR, LEFT_BGR, LEFT_BGR, LEFT_BGR, CENTER_BGR, CENTER_BGR,
        CENTER_BGR, RIGHT_BGR, RIGHT_BGR, RIGHT_BGR, LEFT_BGR, LEFT_BGR, LEFT_BGR,
    ),
    sigmas=(
        0.089, 0.087, 0.107, 0.107, 0.087, 0.089, 0.107, 0.079, 0.079, 0.035,
        0.062, 0.072, 0.079, 0.079, 0.072, 0.062,
    ),
)

KEYPOINT_SPECS: dict[str, KeypointSpec] = {"coco": COCO_KEYPOINTS, "mpii": MPII_KEYPOINTS}
