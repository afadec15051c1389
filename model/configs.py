"""Named model configurations: ``DATASET-wWIDTH-HxW[-waspv1]`` (e.g. ``coco-w48-384x288``).

A configuration fixes the network (dataset -> number of joints, width, head) and the crop size.
The same weights serve every input size of one dataset, width and head: the network is fully
convolutional. The head is WASPv2 (the published code) unless the name ends in ``-waspv1``, the
head of the checkpoints the authors released; the checkpoint loader picks the head from the keys
of the file, whatever the name says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from omnipose.model.skeleton import KEYPOINT_SPECS, KeypointSpec

HEATMAP_STRIDE = 4
WIDTHS = (48, 32, 18)
INPUT_SIZES = {"coco": ((384, 288), (256, 192), (128, 96)), "mpii": ((256, 256),)}
HEADS = ("waspv2", "waspv1")
DEFAULT_HEAD = "waspv2"
HEAD_LABELS = {"waspv2": "WASPv2", "waspv1": "WASPv1"}
RELEASED_WIDTH = 48  # the authors' downloadable checkpoints (WASPv1 head)
EMBEDDED_DEFAULT_CONFIG = "coco-w8-96x64"  # the network of model/weights/default.pt
_NAME_PATTERN = re.compile(r"^(coco|mpii)-w(\d+)-(\d+)x(\d+)(?:-(waspv1))?$")


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
    head: str = DEFAULT_HEAD

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise UnknownConfigError(f"unknown head {self.head!r}; expected one of {HEADS}")

    @property
    def name(self) -> str:
        suffix = "" if self.head == DEFAULT_HEAD else f"-{self.head}"
        return f"{self.dataset}-w{self.width}-{self.input_height}x{self.input_width}{suffix}"

    @property
    def head_label(self) -> str:
        """``WASPv2`` / ``WASPv1`` for people (tables, logs)."""
        return HEAD_LABELS[self.head]

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
            "head": self.head,
            "input_size": [self.input_height, self.input_width],
        }


# Every width with the WASPv2 head, plus the released W48 networks with their WASPv1 head.
CONFIGS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for dataset, sizes in INPUT_SIZES.items()
    for width in WIDTHS
    for head in HEADS
    if head == DEFAULT_HEAD or width == RELEASED_WIDTH
    for (h, w) in sizes
    for cfg in [ModelConfig(dataset, width, h, w, head)]
}


def get_config(name: str) -> ModelConfig:
    """Look a configuration up by name; unknown names list the known ones in the error."""
    if name in CONFIGS:
        return CONFIGS[name]
    match = _NAME_PATTERN.match(name)
    if match is None:
        known = ", ".join(sorted(CONFIGS))
        raise UnknownConfigError(
            f"unknown model config {name!r}; expected DATASET-wWIDTH-HxW[-waspv1], one of: {known}"
        )
    dataset, width = match.group(1), int(match.group(2))
    h, w = int(match.group(3)), int(match.group(4))
    if h % 32 or w % 32:
        raise UnknownConfigError(
            f"model config {name!r}: input height and width must be multiples of 32"
        )
    return ModelConfig(dataset, width, h, w, match.group(5) or DEFAULT_HEAD)
