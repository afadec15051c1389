"""Named model configurations: ``DATASET-wWIDTH-HxW`` (e.g. ``coco-w48-384x288``).

A configuration fixes the network (dataset -> number of joints, width) and the crop size. The
same weights serve every input size of one dataset and width: the network is fully convolutional.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from model.skeleton import KEYPOINT_SPECS, KeypointSpec

HEATMAP_STRIDE = 4
WIDTHS = (48, 32, 18)
INPUT_SIZES = {"coco": ((384, 288), (256, 192), (128, 96)), "mpii": ((256, 256),)}
_NAME_PATTERN = re.compile(r"^(coco|mpii)-w(\d+)-(\d+)x(\d+)$")


class UnknownConfigError(KeyError, ValueError):
    """A configuration name that is not in the registry and cannot be parsed."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])


@dataclass(frozen=True)
class ModelConfig:
    """One deployable network + input-size combination."""

    dataset: str
    width: int
    input_height: int
    input_width: int

    @property
    def name(self) -> str:
        return f"{self.dataset}-w{self.width}-{self.input_height}x{self.input_width}"

    @property
    def keypoints(self) -> KeypointSpec:
        return KEYPOINT_SPECS[self.dataset]

    @property
    def num_joints(self) -> int:
        return self.keypoints.num_joints

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the network input crop."""
        return self.input_height, self.input_width

    @property
    def heatmap_size(self) -> tuple[int, int]:
        """(height, width) of the output heatmaps: a quarter of the input."""
        return self.input_height // HEATMAP_STRIDE, self.input_width // HEATMAP_STRIDE

    @property
    def aspect_ratio(self) -> float:
        """Width over height of the crop: boxes are widened or heightened to this ratio."""
        return self.input_width / self.input_height

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "dataset": self.dataset,
            "width": self.width,
            "input_size": [self.input_height, self.input_width],
        }


CONFIGS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for dataset, sizes in INPUT_SIZES.items()
    for width in WIDTHS
    for (h, w) in sizes
    for cfg in [ModelConfig(dataset, width, h, w)]
}


def get_config(name: str) -> ModelConfig:
    """Look a configuration up by name; unknown names list the known ones in the error."""
    if name in CONFIGS:
        return CONFIGS[name]
    match = _NAME_PATTERN.match(name)
    if match is None:
        known = ", ".join(sorted(CONFIGS))
        raise UnknownConfigError(
            f"unknown model config {name!r}; expected DATASET-wWIDTH-HxW, one of: {known}"
        )
    dataset, width = match.group(1), int(match.group(2))
    h, w = int(match.group(3)), int(match.group(4))
    if h % 32 or w % 32:
        raise UnknownConfigError(
            f"model config {name!r}: input height and width must be multiples of 32"
        )
    return ModelConfig(dataset, width, h, w)
