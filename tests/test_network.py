"""OmniPose network: checkpoint-compatible layout, parameter count, shapes, fixed Gaussian."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from omnipose.model.complexity import count_macs, count_parameters, measure_size
from omnipose.model.configs import CONFIGS, UnknownConfigError, get_config
from omnipose.model.network import (
    HEAD_OUTPUT_KEYS,
    GaussianBlur2d,
    OmniPose,
    WASPv1,
    WASPv1Decoder,
    build_model,
    gaussian_kernel2d,
)
from omnipose.model.sizes import STORED_SIZES, table_config_names

# Copies of /work/shared/reference/*.tsv, kept in the repo so a clean clone can run the tests.
REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "reference"
SHARED_REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
# Published totals (facts file), not derived from our implementation.
PUBLISHED_PARAMETERS = {"coco": (17, 68_141_357), "mpii": (16, 68_141_308)}
RELEASED_WASPV1_PARAMETERS = 68_197_613  # COCO W48, the checkpoints the authors released
REFERENCE_FILES = (
    "omnipose_w48_coco_state_dict.tsv",
    "omnipose_w48_mpii_state_dict.tsv",
    "omnipose_w48_coco_waspv1_state_dict.tsv",
)


def read_reference(dataset: str, head: str = "") -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    suffix = f"_{head}" if head else ""
    path = REFERENCE_DIR / f"omnipose_w48_{dataset}{suffix}_state_dict.tsv"
    for line in path.read_text().splitlines():
        key, _, shape = line.partition("\t")
        rows.append((key, tuple(int(d) for d in shape.split("x")) if shape else ()))
    return rows


def calibrate_batchnorm(model: OmniPose, seed: int = 0) -> OmniPose:
    """Give BN running stats from one random batch so eval outputs are not ~0 (fresh init)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def w18() -> OmniPose:
    torch.manual_seed(0)
    return calibrate_batchnorm(OmniPose(num_joints=17, width=18))


@pytest.mark.parametrize("dataset", ["coco", "mpii"])
def test_w48_state_dict_and_parameters_match_published(dataset: str) -> None:
    num_joints, published_total = PUBLISHED_PARAMETERS[dataset]
    model = OmniPose(num_joints=num_joints, width=48)
    ours = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    reference = read_reference(dataset)
    assert len(ours) == len(reference) == 2203
    for index, (mine, theirs) in enumerate(zip(ours, reference, strict=True)):
        assert mine == theirs, f"entry {index}: ours {mine} vs published {theirs}"
    assert count_parameters(model) == published_total


def test_w48_waspv1_state_dict_and_parameters_match_released_checkpoint() -> None:
    model = build_model(get_config("coco-w48-384x288-waspv1"))
    ours = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    reference = read_reference("coco", "waspv1")
    assert len(ours) == len(reference) == 2200
    for index, (mine, theirs) in enumerate(zip(ours, reference, strict=True)):
        assert mine == theirs, f"entry {index}: ours {mine} vs released {theirs}"
    assert count_parameters(model) == RELEASED_WASPV1_PARAMETERS
    # MPII differs only in the heatmap count (the last conv's weight and bias).
    mpii = build_model(get_config("mpii-w48-256x256-waspv1"))
    assert count_parameters(mpii) == RELEASED_WASPV1_PARAMETERS - 48 - 1


def test_backbones_of_both_heads_are_identical() -> None:
    def backbone(model: OmniPose) -> list[tuple[str, tuple[int, ...]]]:
        head_prefixes = ("waspv2.", "wasp.", "decoder.")
        return [(k, tuple(v.shape)) for k, v in model.state_dict().items()
                if not k.startswith(head_prefixes)]  # fmt: skip

    assert backbone(OmniPose(17, 18, "waspv1")) == backbone(OmniPose(17, 18, "waspv2"))


@pytest.mark.parametrize("head", ["waspv1", "waspv2"])
def test_head_output_key_is_the_last_conv(head: str) -> None:
    model = OmniPose(num_joints=16, width=8, head=head)
    last_key = [key for key in model.state_dict() if key.endswith(".weight")][-1]
    assert last_key == HEAD_OUTPUT_KEYS[head]
    assert tuple(model.state_dict()[last_key].shape) == (16, 8, 1, 1)


def test_unknown_head_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown head 'waspv3'"):
        OmniPose(num_joints=17, width=8, head="waspv3")


def test_reference_copies_match_shared_reference() -> None:
    if not SHARED_REFERENCE_DIR.is_dir():
        pytest.skip("shared reference directory not present (clean clone)")
    for name in REFERENCE_FILES:
        assert (REFERENCE_DIR / name).read_bytes() == (SHARED_REFERENCE_DIR / name).read_bytes()


def test_build_model_follows_config() -> None:
    model = build_model(get_config("mpii-w18-256x256"))
    assert model.waspv2.last_conv[-1].out_channels == 16
    assert model.transition1[0][0].out_channels == 18
    # Head width tied to the backbone: low-level reduction to W // 8 channels.
    assert model.waspv2.conv2.out_channels == 18 // 8
    assert model.waspv2.conv1.in_channels == 5 * 18
    released = build_model(get_config("mpii-w18-256x256-waspv1"))
    assert released.head == "waspv1" and not hasattr(released, "waspv2")
    assert released.decoder.last_conv[-1].out_channels == 16
    assert released.wasp.conv1.in_channels == 5 * 18 and released.wasp.conv2.in_channels == 18
    assert released.decoder.conv1.out_channels == 18 // 8
    assert released.decoder.last_conv[0].in_channels == 18 + 18 // 8


def test_config_names_carry_the_head() -> None:
    assert get_config("coco-w48-384x288").head == "waspv2"  # the published code's head
    released = get_config("coco-w48-384x288-waspv1")
    assert (released.head, released.name, released.to_dict()["head"]) == (
        "waspv1", "coco-w48-384x288-waspv1", "waspv1"
    )  # fmt: skip
    assert get_config("mpii-w8-64x64-waspv1").head == "waspv1"  # any width, parsed
    assert sorted(name for name in CONFIGS if CONFIGS[name].head == "waspv1") == [
        "coco-w48-128x96-waspv1", "coco-w48-256x192-waspv1", "coco-w48-384x288-waspv1",
        "mpii-w48-256x256-waspv1",
    ]  # fmt: skip
    with pytest.raises(UnknownConfigError, match=r"DATASET-wWIDTH-HxW\[-waspv1\]"):
        get_config("coco-w48-384x288-waspv3")


@pytest.mark.parametrize(("head", "width"), [("waspv1", 8), ("waspv1", 18), ("waspv2", 8)])
def test_light_widths_run_forward_and_backward(head: str, width: int) -> None:
    torch.manual_seed(0)
    model = OmniPose(num_joints=17, width=width, head=head).train()
    heatmaps = model(torch.randn(2, 3, 64, 96))
    assert heatmaps.shape == (2, 17, 16, 24)
    heatmaps.square().mean().backward()
    # Every trainable tensor is reached (DDP needs no find_unused_parameters for either head).
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


# --- WASPv1, checked against a functional forward written from the reference description -------
def _bn(x: Tensor, state: dict[str, Tensor], prefix: str) -> Tensor:
    return F.batch_norm(
        x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
        state[f"{prefix}.weight"], state[f"{prefix}.bias"], training=False,
    )  # fmt: skip


def reference_waspv1_head(state: dict[str, Tensor], x: Tensor, low: Tensor) -> Tensor:
    """The released head as the facts file describes it, from raw tensors (no modules).

    Four plain atrous conv+BN+ReLU units in cascade (kernel 1, 3, 3, 3; dilation 6, 12, 18, 24;
    3x3 padded by the dilation); image pooling resized bilinearly with align_corners; ONE shared
    1x1 conv applied twice to each cascade output; concat (cascade..., pooled), 1x1, BN, ReLU.
    Decoder: low-level 1x1+BN+ReLU; head output resized (align_corners) to the low-level size;
    concat (head, low); 3x3+BN+ReLU, 3x3+BN+ReLU, 1x1 with bias. Dropout is off in eval.
    """
    outputs, current = [], x
    for index, dilation in zip((1, 2, 3, 4), (6, 12, 18, 24), strict=True):
        weight = state[f"wasp.aspp{index}.atrous_conv.weight"]
        padding = 0 if weight.shape[-1] == 1 else dilation
        current = F.conv2d(current, weight, padding=padding, dilation=dilation)
        current = F.relu(_bn(current, state, f"wasp.aspp{index}.bn"))
        outputs.append(current)
    shared = state["wasp.conv2.weight"]
    mixed = [F.conv2d(F.conv2d(out, shared), shared) for out in outputs]
    pooled = F.conv2d(x.mean(dim=(2, 3), keepdim=True), state["wasp.global_avg_pool.1.weight"])
    pooled = F.relu(_bn(pooled, state, "wasp.global_avg_pool.2"))
    pooled = F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=True)
    head = F.conv2d(torch.cat([*mixed, pooled], dim=1), state["wasp.conv1.weight"])
    head = F.relu(_bn(head, state, "wasp.bn1"))
    reduced = F.relu(_bn(F.conv2d(low, state["decoder.conv1.weight"]), state, "decoder.bn1"))
    head = F.interpolate(head, size=low.shape[-2:], mode="bilinear", align_corners=True)
    out = torch.cat([head, reduced], dim=1)
    for conv, bn in ((0, 1), (4, 5)):
        out = F.conv2d(out, state[f"decoder.last_conv.{conv}.weight"], padding=1)
        out = F.relu(_bn(out, state, f"decoder.last_conv.{bn}"))
    return F.conv2d(out, state["decoder.last_conv.8.weight"], state["decoder.last_conv.8.bias"])


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (BN statistics too) so a wrong wiring cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(noise + 0.5 if "running_var" in name else noise - 0.5)


@pytest.mark.parametrize("head_size", [(16, 12), (8, 6)])  # same size as low-level, and half
def test_waspv1_head_matches_the_described_computation(head_size: tuple[int, int]) -> None:
    width, joints, low_channels = 16, 5, 32
    wasp, decoder = WASPv1(width, width), WASPv1Decoder(low_channels, width, joints)
    _randomise(wasp, 0)
    _randomise(decoder, 1)
    wasp.eval(), decoder.eval()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, width, *head_size, generator=generator)
    low = torch.randn(2, low_channels, 16, 12, generator=generator)
    state = {f"wasp.{k}": v for k, v in wasp.state_dict().items()}
    state |= {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    with torch.no_grad():
        ours = decoder(wasp(x), low)
        expected = reference_waspv1_head(state, x, low)
    assert ours.shape == (2, joints, 16, 12)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_waspv1_dropout_acts_only_in_training() -> None:
    torch.manual_seed(0)
    model = OmniPose(num_joints=17, width=8, head="waspv1")
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert sorted(m.p for m in dropouts) == [0.1, 0.5, 0.5]
    crops = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(crops), model(crops), rtol=0, atol=0)


def test_gaussian_kernel_is_normalised_sigma3() -> None:
    kernel = gaussian_kernel2d()
    edge, corner = math.exp(-1 / 18), math.exp(-2 / 18)  # exp(-d^2 / (2 * 3^2))
    unnormalised = torch.tensor([[corner, edge, corner], [edge, 1.0, edge], [corner, edge, corner]])
    expected = unnormalised / unnormalised.sum()
    torch.testing.assert_close(kernel, expected.float())
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_gaussian_fusion_convs_are_frozen_stored_and_fixed(w18: OmniPose) -> None:
    blurs = [m for m in w18.modules() if isinstance(m, GaussianBlur2d)]
    # stage2: 1, stage3: 4 x 3, stage4: 3 x 6 upsampling paths.
    assert len(blurs) == 1 + 4 * 3 + 3 * 6
    blur_keys = {f"{n}.weight" for n, m in w18.named_modules() if isinstance(m, GaussianBlur2d)}
    assert blur_keys <= set(w18.state_dict())  # stored in checkpoints...
    assert blur_keys <= {name for name, _ in w18.named_parameters()}  # ...and counted
    for blur in blurs:
        assert not blur.weight.requires_grad
        assert blur.groups == blur.in_channels == blur.out_channels
        sums = blur.weight.sum(dim=(1, 2, 3))
        torch.testing.assert_close(sums, torch.ones_like(sums))
    # Re-initialising for training must not touch the fixed kernels.
    fresh = OmniPose(num_joints=17, width=8)
    first_blur = next(m for m in fresh.modules() if isinstance(m, GaussianBlur2d))
    with torch.no_grad():
        first_blur.weight.zero_()
    fresh.init_weights()
    torch.testing.assert_close(first_blur.weight, blurs[0].weight[:8])


def test_init_is_hrnet_like() -> None:
    model = OmniPose(num_joints=17, width=18)
    conv = model.stage3[0].branches[2][0].conv1.weight  # 72x72x3x3: ~47k samples
    assert conv.std().item() == pytest.approx(0.001, rel=0.05)
    bn = model.stage3[0].branches[2][0].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert torch.all(model.waspv2.last_conv[-1].bias == 0)
    released = OmniPose(num_joints=17, width=18, head="waspv1")
    assert released.wasp.conv2.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert torch.all(released.decoder.last_conv[-1].bias == 0)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_forward_shape_and_finite(w18: OmniPose, batch_size: int) -> None:
    crops = torch.randn(batch_size, 3, 128, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        heatmaps = w18(crops)
    assert heatmaps.shape == (batch_size, 17, 32, 24)
    assert heatmaps.dtype == torch.float32
    assert torch.isfinite(heatmaps).all()
    assert heatmaps.abs().max() > 0


def test_batch_items_are_independent(w18: OmniPose) -> None:
    crops = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batched = w18(crops)
        single = torch.cat([w18(crop[None]) for crop in crops])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)


def test_fully_convolutional_same_weights_any_size(w18: OmniPose) -> None:
    with torch.no_grad():
        large = w18(torch.randn(1, 3, 256, 192))
        small = w18(torch.randn(1, 3, 128, 96))
        square = w18(torch.randn(1, 3, 64, 64))
    assert large.shape == (1, 17, 64, 48)
    assert small.shape == (1, 17, 32, 24)
    assert square.shape == (1, 17, 16, 16)


def test_rejects_input_not_multiple_of_32(w18: OmniPose) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        w18(torch.zeros(1, 3, 100, 96))


def test_skipping_unused_last_outputs_changes_nothing_but_cost(w18: OmniPose) -> None:
    last = w18.stage4[-1]
    assert last.fused_outputs == 1 and len(last.fuse_layers) == 4
    crops = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    macs_skipping = count_macs(w18, (64, 64))
    with torch.no_grad():
        skipping = w18(crops)
        last.fused_outputs = 4
        try:
            full = w18(crops)
            macs_full = count_macs(w18, (64, 64))
        finally:
            last.fused_outputs = 1
    torch.testing.assert_close(skipping, full, rtol=0, atol=0)
    assert macs_skipping < macs_full


def test_unused_fusions_are_frozen_everything_else_gets_gradients() -> None:
    torch.manual_seed(0)
    model = OmniPose(num_joints=17, width=18).train()
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    trainable_without_grad = [
        name for name, p in model.named_parameters() if p.requires_grad and p.grad is None
    ]
    assert trainable_without_grad == []
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    blurs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, GaussianBlur2d)}
    unused_prefixes = tuple(f"stage4.2.fuse_layers.{i}." for i in (1, 2, 3))
    unused = {n for n, _ in model.named_parameters() if n.startswith(unused_prefixes)}
    assert len(unused) > 0
    assert frozen == blurs | unused


def test_autocast_bfloat16_cpu(w18: OmniPose) -> None:
    crops = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = w18(crops)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_precision = w18(crops)
    assert low_precision.shape == reference.shape
    assert torch.isfinite(low_precision).all()
    # Random weights amplify bf16 rounding through ~100 layers: compare direction, not digits.
    similarity = torch.nn.functional.cosine_similarity(
        low_precision.float().flatten(), reference.flatten(), dim=0
    )
    assert similarity > 0.99


def test_count_macs_matches_per_layer_formula() -> None:
    """Independent count from hooks: every conv, transposed and depthwise ones included."""
    model = OmniPose(num_joints=17, width=18).eval()
    expected = 0

    def add_conv_macs(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal expected
        kernel = module.kernel_size[0] * module.kernel_size[1]
        if isinstance(module, torch.nn.ConvTranspose2d):  # each input pixel scatters a kernel
            pixels, per_pixel = inputs[0][0, 0].numel(), module.out_channels
        else:
            pixels, per_pixel = output[0, 0].numel(), module.out_channels
        expected += pixels * per_pixel * (module.in_channels // module.groups) * kernel

    handles = [
        m.register_forward_hook(add_conv_macs)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    for handle in handles:
        handle.remove()
    assert count_macs(model, (64, 64)) == expected


@pytest.mark.slow
def test_stored_sizes_are_the_counted_ones() -> None:
    """``omnipose info`` prints stored figures: each must be what counting the network gives.
    The network does not depend on the input size, so each one is built once (on the meta
    device) and its MACs counted at every input size stored for it."""
    assert set(STORED_SIZES) == set(table_config_names())
    by_network: dict[tuple, list[str]] = {}
    for name in STORED_SIZES:
        config = get_config(name)
        by_network.setdefault((config.dataset, config.width, config.head), []).append(name)
    for names in by_network.values():
        first = get_config(names[0])
        with torch.device("meta"):
            network = build_model(first)
        parameters = count_parameters(network)
        for name in names:
            counted = (parameters, count_macs(network, get_config(name).input_size))
            assert counted == STORED_SIZES[name], name
    assert measure_size(get_config("coco-w8-96x64")) == STORED_SIZES["coco-w8-96x64"]
