"""OmniPose: an HRNet backbone with Gaussian-smoothed upsampling fusions and a WASP head.

Written from the published description (arXiv 2103.10180 and /work/shared/reference facts), not
from the authors' code. Module names and registration order are chosen so that ``state_dict()``
keys, shapes and order equal those of the published checkpoints at width 48, which lets official
weights load with ``strict=True``.

Layout for width ``W`` (input ``H x W_in``, heatmaps at a quarter of the input):

- stem: two stride-2 3x3 convs (64 ch), then ``layer1`` (4 Bottlenecks, 256 ch). The layer1 output
  is also the head's low-level feature.
- stages 2/3/4: 1/4/3 ``HighResolutionModule``s with 2/3/4 branches of W, 2W, 4W, 8W channels,
  4 BasicBlocks per branch, SUM fusion. Lower-to-higher resolution fusion is 1x1 conv + BN, one
  transposed conv + BN + ReLU per factor 2, then a fixed depthwise Gaussian blur.
- a head on the highest-resolution branch (W channels in, ``num_joints`` heatmaps out), either
  WASPv2 (keys ``waspv2.*``: the published code) or WASPv1 (keys ``wasp.*`` then ``decoder.*``:
  the checkpoints the authors actually released). The head width is tied to W (48 published).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omnipose.model.configs import DEFAULT_HEAD, HEADS, ModelConfig

STEM_CHANNELS = 64
BLOCKS_PER_BRANCH = 4
MODULES_PER_STAGE = {2: 1, 3: 4, 4: 3}  # stage index -> number of HighResolutionModules
GAUSSIAN_SIGMA = 3.0
GAUSSIAN_KERNEL_SIZE = 3
WASP_KERNELS = (1, 3, 3, 3)  # the four waterfall units of both heads
WASPV2_DILATIONS = (1, 6, 12, 18)
WASPV1_DILATIONS = (6, 12, 18, 24)  # the first unit is 1x1: its dilation has no effect
WASPV1_DROPOUT = 0.5  # after the WASPv1 pooling module and the decoder's first conv
WASPV1_DECODER_DROPOUT = 0.1  # after the decoder's second conv
# The final 1x1 conv of each head: its key names the head, its shape (joints, W, 1, 1).
HEAD_OUTPUT_KEYS = {"waspv2": "waspv2.last_conv.6.weight", "waspv1": "decoder.last_conv.8.weight"}
CONV_INIT_STD = 0.001  # HRNet's init: tiny convs, BN carries the scale


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


def gaussian_kernel2d(size: int = GAUSSIAN_KERNEL_SIZE, sigma: float = GAUSSIAN_SIGMA) -> Tensor:
    """Normalised (sum 1) isotropic Gaussian; a wide sigma on 3x3 makes it a gentle low-pass."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    profile = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = torch.outer(profile, profile)
    return (kernel / kernel.sum()).to(torch.float32)


class GaussianBlur2d(nn.Conv2d):
    """Fixed depthwise Gaussian smoothing that removes the checkerboard of transposed convs.

    The kernel is a ``Parameter`` with ``requires_grad=False`` (not a buffer) because the
    published checkpoints store it as ``...weight`` and count it among the parameters.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(
            channels,
            channels,
            GAUSSIAN_KERNEL_SIZE,
            padding=GAUSSIAN_KERNEL_SIZE // 2,
            groups=channels,
            bias=False,
        )
        self.weight.requires_grad_(False)
        self.reset_kernel()

    def reset_kernel(self) -> None:
        """(Re)write the Gaussian; called at construction and after weight initialisation."""
        with torch.no_grad():
            kernel = gaussian_kernel2d().to(self.weight.device, self.weight.dtype)
            self.weight.copy_(kernel.expand_as(self.weight))


class BasicBlock(nn.Module):
    """ResNet basic residual block (two 3x3 convs); channels are constant inside HRNet branches."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 reduce, 3x3, 1x1 expand x4) used by the stem's ``layer1``."""

    expansion = 4

    def __init__(self, in_channels: int, mid_channels: int) -> None:
        super().__init__()
        out_channels = mid_channels * self.expansion
        self.conv1 = conv1x1(in_channels, mid_channels)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = conv3x3(mid_channels, mid_channels)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = conv1x1(mid_channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if in_channels != out_channels:
            self.downsample = nn.Sequential(
                conv1x1(in_channels, out_channels), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class UpsampleFusion(nn.Sequential):
    """Brings a lower-resolution branch up by ``2**steps``: OmniPose's improved HRNet fusion.

    Flat index layout (the checkpoint's): 0 conv1x1, 1 BN, then per factor-2 step a transposed
    conv, BN, ReLU, and last the fixed Gaussian blur.
    """

    def __init__(self, in_channels: int, out_channels: int, steps: int) -> None:
        layers: list[nn.Module] = [conv1x1(in_channels, out_channels), nn.BatchNorm2d(out_channels)]
        for _ in range(steps):
            layers += [
                nn.ConvTranspose2d(
                    out_channels,
                    out_channels,
                    3,
                    stride=2,
                    padding=1,
                    output_padding=1,
                    bias=False,
                ),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
        layers.append(GaussianBlur2d(out_channels))
        super().__init__(*layers)


class DownsampleFusion(nn.Sequential):
    """HRNet's strided-conv path to a lower resolution: ``steps`` (conv3x3 s2 + BN [+ ReLU])."""

    def __init__(self, in_channels: int, out_channels: int, steps: int) -> None:
        layers: list[nn.Module] = []
        for step in range(steps):
            last = step == steps - 1
            step_out = out_channels if last else in_channels
            parts: list[nn.Module] = [conv3x3(in_channels, step_out, 2), nn.BatchNorm2d(step_out)]
            if not last:
                parts.append(nn.ReLU(inplace=True))
            layers.append(nn.Sequential(*parts))
        super().__init__(*layers)


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks followed by all-to-all SUM fusion.

    ``fused_outputs`` limits how many output resolutions ``forward`` computes (highest first).
    The network's last module keeps only 1: the head reads only the highest-resolution output, but
    the fusion layers of the other outputs are still built because the published checkpoints store
    them. Setting ``fused_outputs`` back to ``len(channels)`` reproduces the original (wasted)
    computation, e.g. to count its MACs; the head output is the same either way.
    """

    def __init__(self, channels: tuple[int, ...], num_blocks: int = BLOCKS_PER_BRANCH) -> None:
        super().__init__()
        self.channels = channels
        self.fused_outputs = len(channels)
        self.branches = nn.ModuleList(
            nn.Sequential(*(BasicBlock(c) for _ in range(num_blocks))) for c in channels
        )
        self.fuse_layers = nn.ModuleList()
        for target, target_ch in enumerate(channels):
            row = nn.ModuleList()
            for source, source_ch in enumerate(channels):
                if source > target:
                    row.append(UpsampleFusion(source_ch, target_ch, source - target))
                elif source < target:
                    row.append(DownsampleFusion(source_ch, target_ch, target - source))
                else:
                    row.append(nn.Identity())
            self.fuse_layers.append(row)
        self.relu = nn.ReLU(inplace=True)

    def skip_unused_outputs(self, keep: int) -> None:
        """Compute only the ``keep`` highest-resolution outputs; freeze the other fusion layers.

        Frozen because they can never receive a gradient: optimisers and DDP (which otherwise
        needs ``find_unused_parameters=True``) then ignore them, while they stay in the state_dict.
        """
        self.fused_outputs = keep
        for row in list(self.fuse_layers)[keep:]:
            row.requires_grad_(False)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        fused = []
        for row in list(self.fuse_layers)[: self.fused_outputs]:
            total = row[0](xs[0])
            for layer, x in zip(list(row)[1:], xs[1:], strict=True):
                total = total + layer(x)
            fused.append(self.relu(total))
        return fused


class SeparableConv2d(nn.Module):
    """Depthwise (optionally dilated) conv, ReLU, then pointwise 1x1: WASPv2's atrous unit core.

    Attribute names (``spatialConv``/``pointConv``) follow the published checkpoint keys.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.spatialConv = nn.Conv2d(
            in_channels,
            in_channels,
            kernel_size,
            padding=_atrous_padding(kernel_size, dilation),
            dilation=dilation,
            groups=in_channels,
            bias=False,
        )
        self.pointConv = conv1x1(in_channels, out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointConv(self.relu(self.spatialConv(x)))


def _atrous_padding(kernel_size: int, dilation: int) -> int:
    """'Same' padding of a dilated conv: 0 for 1x1 (where dilation changes nothing), else d."""
    return 0 if kernel_size == 1 else dilation


class AtrousUnit(nn.Module):
    """One waterfall stage: atrous conv (separable for WASPv2, plain for WASPv1) + BN + ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int,
        separable: bool = True,
    ):
        super().__init__()
        self.atrous_conv: nn.Module
        if separable:
            self.atrous_conv = SeparableConv2d(in_channels, out_channels, kernel_size, dilation)
        else:
            self.atrous_conv = nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                padding=_atrous_padding(kernel_size, dilation),
                dilation=dilation,
                bias=False,
            )
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.atrous_conv(x)))


def waterfall_units(
    in_channels: int, width: int, dilations: tuple[int, ...], separable: bool
) -> list[AtrousUnit]:
    """The four cascaded atrous units (kernel 1 then 3, 3, 3): each feeds the next."""
    channels_in = (in_channels, width, width, width)
    return [
        AtrousUnit(c, width, k, d, separable)
        for c, k, d in zip(channels_in, WASP_KERNELS, dilations, strict=True)
    ]


def image_pooling(in_channels: int, width: int) -> nn.Sequential:
    """Global context branch: average pool, 1x1 conv, BN, ReLU (index layout of the keys)."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        conv1x1(in_channels, width),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    )


def broadcast_pooled(pooled: Tensor, like: Tensor) -> Tensor:
    """Resize the 1x1 pooled map to ``like``'s size.

    The authors resize bilinearly (align_corners); from a single pixel every interpolation is a
    copy, so a broadcast gives identical values without the interpolation kernel.
    """
    return pooled.expand(-1, -1, *like.shape[-2:])


def resize_like(x: Tensor, like: Tensor) -> Tensor:
    """Bilinear (align_corners) resize of ``x`` to ``like``'s size; a no-op when they agree."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)


class WASPv2(nn.Module):
    """Waterfall atrous spatial pooling head + low-level decoder, producing one heatmap per joint.

    The four atrous units run in cascade (each feeds the next, growing the field of view cheaply)
    and, with an image-pooling branch, are all concatenated. The decoder mixes in the stem's
    full-detail ``layer1`` feature to sharpen localisation.

    Note: in training mode BatchNorm after global pooling sees one value per channel and sample,
    so training needs a batch of at least 2 (inference works for any batch size).
    """

    def __init__(
        self, in_channels: int, low_level_channels: int, width: int, num_joints: int
    ) -> None:
        super().__init__()
        low_width = max(width // 8, 1)
        self.aspp1, self.aspp2, self.aspp3, self.aspp4 = waterfall_units(
            in_channels, width, WASPV2_DILATIONS, separable=True
        )
        self.global_avg_pool = image_pooling(in_channels, width)
        self.conv1 = conv1x1(5 * width, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv1x1(low_level_channels, low_width)
        self.bn2 = nn.BatchNorm2d(low_width)
        self.last_conv = nn.Sequential(
            conv3x3(width + low_width, width),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            conv3x3(width, width),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, num_joints, 1),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, low_level: Tensor) -> Tensor:
        x1 = self.aspp1(x)
        x2 = self.aspp2(x1)
        x3 = self.aspp3(x2)
        x4 = self.aspp4(x3)
        x5 = broadcast_pooled(self.global_avg_pool(x), x4)
        x = self.relu(self.bn1(self.conv1(torch.cat((x1, x2, x3, x4, x5), dim=1))))
        low = self.relu(self.bn2(self.conv2(low_level)))
        return self.last_conv(torch.cat((resize_like(x, low), low), dim=1))


class WASPv1(nn.Module):
    """The released checkpoints' waterfall module (keys ``wasp.*``): features, not heatmaps.

    Plain (not separable) atrous units in cascade, dilations 6/12/18/24. Each of the four
    cascade outputs passes twice through ONE shared 1x1 conv (``conv2``, no BN in between) before
    the concatenation with the image-pooling branch; then 1x1 conv + BN + ReLU and dropout.
    :class:`WASPv1Decoder` turns the result into heatmaps.
    """

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.aspp1, self.aspp2, self.aspp3, self.aspp4 = waterfall_units(
            in_channels, width, WASPV1_DILATIONS, separable=False
        )
        self.global_avg_pool = image_pooling(in_channels, width)
        self.conv1 = conv1x1(5 * width, width)
        self.conv2 = conv1x1(width, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(WASPV1_DROPOUT)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.aspp1(x)
        x2 = self.aspp2(x1)
        x3 = self.aspp3(x2)
        x4 = self.aspp4(x3)
        mixed = [self.conv2(self.conv2(branch)) for branch in (x1, x2, x3, x4)]
        pooled = broadcast_pooled(self.global_avg_pool(x), x4)
        out = self.relu(self.bn1(self.conv1(torch.cat((*mixed, pooled), dim=1))))
        return self.dropout(out)


class WASPv1Decoder(nn.Module):
    """Heatmaps from the WASPv1 features and the stem's ``layer1`` feature (keys ``decoder.*``).

    Sequential indices of ``last_conv`` (0 conv, 1 BN, 2 ReLU, 3 dropout, 4 conv, 5 BN, 6 ReLU,
    7 dropout, 8 conv) are the checkpoint's.
    """

    def __init__(self, low_level_channels: int, width: int, num_joints: int) -> None:
        super().__init__()
        low_width = max(width // 8, 1)
        self.conv1 = conv1x1(low_level_channels, low_width)
        self.bn1 = nn.BatchNorm2d(low_width)
        self.relu = nn.ReLU(inplace=True)
        self.last_conv = nn.Sequential(
            conv3x3(width + low_width, width),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Dropout(WASPV1_DROPOUT),
            conv3x3(width, width),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Dropout(WASPV1_DECODER_DROPOUT),
            nn.Conv2d(width, num_joints, 1),
        )

    def forward(self, x: Tensor, low_level: Tensor) -> Tensor:
        low = self.relu(self.bn1(self.conv1(low_level)))
        return self.last_conv(torch.cat((resize_like(x, low), low), dim=1))


class OmniPose(nn.Module):
    """OmniPose network: image crop ``[B, 3, H, W]`` -> heatmaps ``[B, J, H/4, W/4]``.

    H and W must be multiples of 32 (four resolution halvings after the stride-4 stem must stay
    integral so that the transposed-conv upsampling lands on the same grid). ``head`` is
    ``"waspv2"`` (the published code) or ``"waspv1"`` (the released checkpoints); the backbone
    is the same for both.
    """

    def __init__(self, num_joints: int, width: int = 48, head: str = DEFAULT_HEAD) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
        self.num_joints = num_joints
        self.width = width
        self.head = head
        branch_channels = tuple(width * 2**i for i in range(4))
        stem_out = STEM_CHANNELS * Bottleneck.expansion

        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.conv2 = conv3x3(STEM_CHANNELS, STEM_CHANNELS, 2)
        self.bn2 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(
            Bottleneck(STEM_CHANNELS, STEM_CHANNELS),
            *(Bottleneck(stem_out, STEM_CHANNELS) for _ in range(3)),
        )

        self.transition1 = self._transition((stem_out,), branch_channels[:2])
        self.stage2 = self._stage(branch_channels[:2], MODULES_PER_STAGE[2])
        self.transition2 = self._transition(branch_channels[:2], branch_channels[:3])
        self.stage3 = self._stage(branch_channels[:3], MODULES_PER_STAGE[3])
        self.transition3 = self._transition(branch_channels[:3], branch_channels)
        self.stage4 = self._stage(branch_channels, MODULES_PER_STAGE[4])
        # Only the highest-resolution output of the last module feeds the head.
        self.stage4[-1].skip_unused_outputs(keep=1)

        # Registered last, in this order, so state_dict keys end with the head's as published.
        if head == "waspv1":
            self.wasp = WASPv1(branch_channels[0], width)
            self.decoder = WASPv1Decoder(stem_out, width, num_joints)
        else:
            self.waspv2 = WASPv2(branch_channels[0], stem_out, width, num_joints)
        self.init_weights()

    @staticmethod
    def _transition(previous: tuple[int, ...], current: tuple[int, ...]) -> nn.ModuleList:
        """HRNet stage transition: adapt existing branches, spawn the new one by a strided conv.

        The new branch's layer is nested one level deeper (index ``.0.0``), as in the checkpoints.
        """
        layers = nn.ModuleList()
        for index, channels in enumerate(current):
            if index < len(previous):
                if previous[index] == channels:
                    layers.append(nn.Identity())
                else:
                    layers.append(
                        nn.Sequential(
                            conv3x3(previous[index], channels),
                            nn.BatchNorm2d(channels),
                            nn.ReLU(inplace=True),
                        )
                    )
            else:
                layers.append(
                    nn.Sequential(
                        nn.Sequential(
                            conv3x3(previous[-1], channels, 2),
                            nn.BatchNorm2d(channels),
                            nn.ReLU(inplace=True),
                        )
                    )
                )
        return layers

    @staticmethod
    def _stage(channels: tuple[int, ...], num_modules: int) -> nn.Sequential:
        return nn.Sequential(*(HighResolutionModule(channels) for _ in range(num_modules)))

    @staticmethod
    def _apply_transition(transition: nn.ModuleList, features: list[Tensor]) -> list[Tensor]:
        """New branches start from the lowest-resolution existing feature."""
        return [
            layer(features[index] if index < len(features) else features[-1])
            for index, layer in enumerate(transition)
        ]

    def init_weights(self) -> None:
        """Initialisation for training from scratch (HRNet's): N(0, 0.001) convs, unit BNs."""
        for module in self.modules():
            if isinstance(module, GaussianBlur2d):
                module.reset_kernel()
            elif isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.normal_(module.weight, std=CONV_INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(
                f"input height and width must be multiples of 32, got {tuple(x.shape)}"
            )
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        low_level = self.layer1(x)

        features = self.stage2(self._apply_transition(self.transition1, [low_level]))
        features = self.stage3(self._apply_transition(self.transition2, features))
        features = self.stage4(self._apply_transition(self.transition3, features))
        if self.head == "waspv1":
            return self.decoder(self.wasp(features[0]), low_level)
        return self.waspv2(features[0], low_level)


def build_model(config: ModelConfig) -> OmniPose:
    """Randomly initialised network for a named configuration (the input size does not matter)."""
    return OmniPose(num_joints=config.num_joints, width=config.width, head=config.head)
