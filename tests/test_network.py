"""OmniPose network: checkpoint-compatible layout, parameter count, shapes, fixed Gaussian."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from model.complexity import count_macs, count_parameters
from model.configs import get_config
from model.network import GaussianBlur2d, OmniPose, build_model, gaussian_kernel2d

# Copies of /work/shared/reference/*.tsv, kept in the repo so a clean clone can run the tests.
REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "reference"
SHARED_REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
# Published totals (facts file), not derived from our implementation.
PUBLISHED_PARAMETERS = {"coco": (17, 68_141_357), "mpii": (16, 68_141_308)}


def read_reference(dataset: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    path = REFERENCE_DIR / f"omnipose_w48_{dataset}_state_dict.tsv"
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


def test_reference_copies_match_shared_reference() -> None:
    if not SHARED_REFERENCE_DIR.is_dir():
        pytest.skip("shared reference directory not present (clean clone)")
    for name in ("omnipose_w48_coco_state_dict.tsv", "omnipose_w48_mpii_state_dict.tsv"):
        assert (REFERENCE_DIR / name).read_bytes() == (SHARED_REFERENCE_DIR / name).read_bytes()


def test_build_model_follows_config() -> None:
    model = build_model(get_config("mpii-w18-256x256"))
    assert model.waspv2.last_conv[-1].out_channels == 16
    assert model.transition1[0][0].out_channels == 18
    # Head width tied to the backbone: low-level reduction to W // 8 channels.
    assert model.waspv2.conv2.out_channels == 18 // 8
    assert model.waspv2.conv1.in_channels == 5 * 18


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
