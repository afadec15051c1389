"""Starting points for training: ImageNet HRNet backbones and OmniPose checkpoints.

``--init imagenet FILE`` (``model.pretrained``) maps ImageNet classification weights of HRNet
onto OmniPose's backbone (a PyTorch file, or ``.safetensors`` as timm's hub publishes them).
Both published layouts are read: timm's ``hrnet_w18/w32/w48`` (``timm/models/hrnet.py``) and
the original HRNet-Image-Classification ``cls_hrnet.py``. Their backbones use the same module
tree, and so the same key names, as OmniPose's backbone: ``conv1``, ``bn1``, ``conv2``,
``bn2``, ``layer1``, ``transition1-3``, ``stage2-4`` with ``branches`` and ``fuse_layers``. They
differ only outside the backbone's tensors (timm's ``nn.Identity`` where the original stores
``None``, neither holding tensors; the classification head). What does NOT carry over:

- the classification head of the file (``incre_modules``, ``downsamp_modules``, ``final_layer``,
  ``classifier``): unused;
- OmniPose's improved upsampling fusions: HRNet's ``fuse_layers.i.j`` for a lower-resolution
  source is 1x1 conv (index 0) + BN (index 1) + nearest upsampling, OmniPose's is the same 1x1
  conv + BN followed by transposed convs, BNs and a fixed Gaussian (index 2 on). Indices 0 and 1
  are mapped, the rest keep their initialisation;
- the WASP head and decoder: initialised as for training from scratch.

``--init FILE`` (``model.init_weights``) fine-tunes from any OmniPose checkpoint through
:func:`omnipose.model.checkpoint.load_model`, which builds the head the file holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from omnipose.model.checkpoint import CheckpointError, read_checkpoint
from omnipose.model.network import UpsampleFusion

logger = logging.getLogger(__name__)

BACKBONE_PREFIXES = (
    "conv1.", "bn1.", "conv2.", "bn2.", "layer1.",
    "transition1.", "transition2.", "transition3.", "stage2.", "stage3.", "stage4.",
)  # fmt: skip
CLASSIFIER_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
_WIDTH_KEY = "stage2.0.branches.0.0.conv1.weight"  # [width, width, 3, 3] in HRNet-Wwidth


class InitError(Exception):
    """A starting-point file cannot be used; the message is one line."""


@dataclass
class BackboneInit:
    """What an ImageNet file contributed: file keys used and unused, model keys left as built."""

    path: Path
    layout: str
    used: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    not_initialised: list[str] = field(default_factory=list)  # backbone tensors without a source
    omnipose_only: tuple[str, ...] = ()  # prefixes of the fusion parts HRNet does not have

    def summary(self) -> str:
        unused_head = sum(1 for key in self.unused if key.startswith(CLASSIFIER_PREFIXES))
        fusion = sum(1 for key in self.not_initialised if key.startswith(self.omnipose_only))
        missing = len(self.not_initialised) - fusion
        return (
            f"ImageNet init {self.path} ({self.layout}): {len(self.used)} of "
            f"{len(self.used) + len(self.unused)} file tensors used, {len(self.unused)} unused "
            f"({unused_head} of the classification head); backbone tensors left as initialised: "
            f"{fusion} of OmniPose's transposed-conv fusions, {missing} missing from the file; "
            "the head starts from scratch (lists at debug level)"
        )


def _omnipose_only_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of OmniPose's upsampling-fusion parts that HRNet does not have."""
    prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, UpsampleFusion):
            prefixes += [f"{name}.{index}." for index in range(2, len(module))]
    return tuple(prefixes)


def _backbone_width(state_dict: dict[str, torch.Tensor]) -> int | None:
    tensor = state_dict.get(_WIDTH_KEY)
    return int(tensor.shape[0]) if tensor is not None and tensor.ndim == 4 else None


def _layout(state_dict: dict[str, torch.Tensor], width: int) -> str:
    has_head = any(key.startswith(CLASSIFIER_PREFIXES) for key in state_dict)
    kind = "classification" if has_head else "backbone only"
    return f"HRNet-W{width} ImageNet {kind}, timm / HRNet-Image-Classification key layout"


def read_imagenet_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file (timm's hub format) or a PyTorch file read with
    ``weights_only=True`` (bare or under ``state_dict``/``model``); ``module.`` stripped."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise InitError(f"ImageNet init {path}: file not found")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            message = f"ImageNet init {path}: not a readable safetensors file ({error})"
            raise InitError(message) from None
        return {key.removeprefix("module."): value for key, value in tensors.items()}
    try:
        return read_checkpoint(path).state_dict
    except CheckpointError as error:
        raise InitError(f"ImageNet init: {error}") from None


def load_imagenet_backbone(model: nn.Module, path: str | Path) -> BackboneInit:
    """Copy ImageNet HRNet weights into ``model``'s backbone; returns what was used.

    Raises :class:`InitError` when the file is unreadable, not an HRNet backbone, or of another
    width than the model (a W32 file cannot start a W48 network).
    """
    path = Path(path)
    source = read_imagenet_state_dict(path)
    target = model.state_dict()
    model_width = _backbone_width(target)
    file_width = _backbone_width(source)
    if file_width is None:
        raise InitError(
            f"ImageNet init {path}: not an HRNet backbone (no {_WIDTH_KEY}; "
            f"{len(source)} keys, e.g. {', '.join(list(source)[:3]) or 'none'})"
        )
    if file_width != model_width:
        raise InitError(
            f"ImageNet init {path}: the file is HRNet-W{file_width} but the model is "
            f"W{model_width}; use the hrnet_w{model_width} weights"
        )
    omnipose_only = _omnipose_only_prefixes(model)
    report = BackboneInit(path, _layout(source, file_width), omnipose_only=omnipose_only)
    copied: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        mapped = key if key.startswith(BACKBONE_PREFIXES) and key in target else None
        if mapped is None or key.startswith(omnipose_only):
            report.unused.append(key)
        elif tensor.shape != target[mapped].shape:
            raise InitError(
                f"ImageNet init {path}: {key} has shape {tuple(tensor.shape)}, the model "
                f"expects {tuple(target[mapped].shape)}"
            )
        else:
            copied[mapped] = tensor
            report.used.append(key)
    report.not_initialised = [
        key
        for key in target
        if key.startswith(BACKBONE_PREFIXES)
        and key not in copied
        and not key.endswith("num_batches_tracked")  # absent from files of old PyTorch
    ]
    model.load_state_dict(copied, strict=False)
    logger.debug("ImageNet init: used %s", report.used)
    logger.debug("ImageNet init: unused %s", report.unused)
    logger.debug("ImageNet init: backbone tensors not initialised %s", report.not_initialised)
    return report
