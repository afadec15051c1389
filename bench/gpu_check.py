"""What only a GPU can confirm, in one short run (called by bench/gpu.sh).

1. crops cut on the device (model.device_crops) equal cv2's CPU crops within one grey level on at
   least 99.9% of pixels, on the GPU;
2. CUDA-graph buckets give the heatmaps eager PyTorch gives;
3. fp16 (what precision=auto picks on CUDA) moves the default model's median keypoint by at most
   0.1 heatmap px on synthetic person crops;
4. JPEGs decoded on the GPU (torchvision/nvjpeg, jpeg_decode=auto) equal OpenCV's decode within
   one grey level on at least 99.9% of pixels (bus.jpg, EXIF orientations 1-8, other flavours;
   any the GPU decoder refuses are named: the service decodes those with OpenCV), and the ms per
   image of each decoder;
5. raw crops/s per batch size, fp32 and fp16, eager and with CUDA graphs.

    .venv/bin/python bench/gpu_check.py --config coco-w48-256x192
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from omnipose.service.openmp import configure_openmp  # noqa: E402

configure_openmp()  # the server's OpenMP wait policy, before torch loads


def check_device_crops(device) -> bool:
    import cv2

    from bench.samples import BUS_JPG
    from omnipose.model.device_crops import crop_on_device, image_to_device
    from omnipose.model.transforms import (
        BOX_PADDING,
        box_to_center_scale,
        get_affine_transforms,
        warp_crops,
    )

    image = cv2.cvtColor(cv2.imread(str(BUS_JPG)), cv2.COLOR_BGR2RGB)
    height, width = image.shape[:2]
    boxes = np.array(
        [
            [50, 400, 200, 500],
            [220, 380, 120, 470],
            [-60, 300, 180, 420],
            [width - 100, height - 200, 200, 300],
            [0, 0, width, height],
        ],
        float,
    )
    worst = 1.0
    for output_size in ((96, 128), (192, 256), (288, 384)):
        centers, scales = box_to_center_scale(
            boxes, output_size[0] / output_size[1], padding=BOX_PADDING
        )
        affines = get_affine_transforms(centers, scales, np.zeros(len(boxes)), output_size)
        expected = warp_crops(image, affines, output_size).astype(np.float64)
        got = (
            crop_on_device(image_to_device(image, device, pin_memory=True), affines, output_size)
            .permute(0, 2, 3, 1)
            .double()
            .cpu()
            .numpy()
        )
        worst = min(worst, float((np.abs(got - expected) <= 1.0).mean()))
    print(
        f"device crops vs cv2 on {device}: {worst:.5f} of pixels within 1 grey level"
        f" (need >= 0.999)"
    )
    return worst >= 0.999


def _jpeg_samples() -> dict[str, bytes]:
    """bus.jpg, a photo crop with each EXIF orientation, and other JPEG flavours."""
    import io

    import cv2
    from PIL import Image

    from bench.samples import BUS_JPG, jpeg_with_orientation

    bus = cv2.imread(str(BUS_JPG))
    samples = {"bus.jpg": BUS_JPG.read_bytes()}
    for orientation in range(1, 9):
        samples[f"exif {orientation}"] = jpeg_with_orientation(bus[100:337, 50:411], orientation)
    flavours = {
        "progressive": ("RGB", {"progressive": True}),
        "4:4:4": ("RGB", {"subsampling": 0}),
        "grey": ("L", {}),
        "cmyk": ("CMYK", {}),
    }
    for name, (mode, options) in flavours.items():
        buffer = io.BytesIO()
        rgb = Image.fromarray(np.ascontiguousarray(bus[:, :, ::-1])).convert(mode)
        rgb.save(buffer, format="JPEG", quality=90, **options)
        samples[name] = buffer.getvalue()
    return samples


def check_device_jpeg(device) -> bool:
    from omnipose.service.images import (
        DecodedImage,
        decode_jpeg_on_device,
        decode_pixels,
        read_header,
    )

    ok = True
    refused = []
    for name, data in _jpeg_samples().items():
        header = read_header(data)
        expected = decode_pixels(data, header)
        try:
            image = decode_jpeg_on_device(data, header, device)
        except Exception as exc:  # the service decodes these with OpenCV (a counted fallback)
            reason = (str(exc).splitlines() or [""])[0][:80]
            refused.append(f"{name} ({type(exc).__name__}: {reason})")
            continue
        got = DecodedImage(rgb=image).host_bgr()  # what the detector and rendering get
        if got.shape != expected.shape:
            print(f"JPEG on {device}, {name}: shape {got.shape}, OpenCV's {expected.shape}")
            ok = False
            continue
        difference = np.abs(got.astype(np.int16) - expected.astype(np.int16))
        within = float((difference <= 1).mean())
        print(
            f"JPEG on {device} vs OpenCV, {name}: {within:.5f} within 1 grey level,"
            f" {float((difference == 0).mean()):.5f} identical, largest {int(difference.max())}"
            f" (need >= 0.999)"
        )
        ok &= within >= 0.999
    if refused:
        print("JPEGs the GPU decoder refused (OpenCV decodes them):", "; ".join(refused))
    ok &= not any(name.startswith(("bus", "exif")) for name in refused)
    time_jpeg_decoders(device)
    return ok


def _ms_per_call(function, seconds: float = 1.0) -> float:
    for _ in range(3):
        function()
    repeats, started = 0, time.perf_counter()
    while repeats < 5 or time.perf_counter() - started < seconds:
        function()
        repeats += 1
    return (time.perf_counter() - started) / repeats * 1000


def time_jpeg_decoders(device) -> None:
    """ms per image: OpenCV on one CPU thread (the service's cpu_workers decode one image each)
    vs torchvision on the device, alone and with the download to host BGR that a frame pays when
    the detector or rendering needs it."""
    import cv2
    import torch

    from omnipose.service.images import (
        DecodedImage,
        decode_jpeg_on_device,
        decode_pixels,
        read_header,
    )

    bus = _jpeg_samples()["bus.jpg"]
    upscaled = cv2.resize(decode_pixels(bus, read_header(bus)), (3240, 4320))  # 14 Mpx
    encoded = cv2.imencode(".jpg", upscaled, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        for name, data in (("bus.jpg 810x1080", bus), ("3240x4320", encoded)):
            header = read_header(data, max_pixels=100_000_000)

            def on_device(download: bool, data=data, header=header) -> None:
                image = decode_jpeg_on_device(data, header, device)
                if download:
                    DecodedImage(rgb=image).host_bgr()
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize(device)

            opencv = _ms_per_call(lambda data=data, header=header: decode_pixels(data, header))
            alone = _ms_per_call(lambda on_device=on_device: on_device(False))
            downloaded = _ms_per_call(lambda on_device=on_device: on_device(True))
            print(
                f"JPEG decode, {name}: OpenCV (1 CPU thread) {opencv:.2f} ms, torchvision on"
                f" {device} {alone:.2f} ms, + download to host BGR {downloaded:.2f} ms"
            )
    finally:
        cv2.setNumThreads(threads)


def check_graphs_and_fp16(device) -> bool:
    import torch

    from omnipose.model.codec import decode_heatmaps
    from omnipose.model.topdown import TopDownPoseEstimator
    from omnipose.service.loading import load_pose_model

    loaded = load_pose_model(device="cpu", precision="fp32")
    network, config = loaded.estimator.model, loaded.config
    generator = torch.Generator().manual_seed(0)
    crops = torch.randn(24, 3, *config.input_size, generator=generator)
    ok = True
    results = {}
    for precision in ("fp32", "fp16"):
        import copy

        estimator = TopDownPoseEstimator(
            copy.deepcopy(network), config, device=device, precision=precision, flip_test=False
        )
        eager = estimator.forward(crops).cpu()
        estimator.use_buckets(16)
        graphed = estimator.forward(crops).cpu()
        difference = float((eager - graphed).abs().max())
        print(f"CUDA graphs vs eager, {precision}: largest heatmap difference {difference:.2e}")
        ok &= difference < 1e-3
        results[precision] = decode_heatmaps(eager)[0]
    shift = np.linalg.norm(results["fp16"] - results["fp32"], axis=-1)
    print(
        f"fp16 vs fp32 median keypoint shift (random crops, default model):"
        f" {np.median(shift):.4f} heatmap px (need <= 0.1; the AP guard: pytest"
        f" tests/test_precision.py with CUDA)"
    )
    return ok and float(np.median(shift)) <= 0.1


def raw_throughput(config_name: str, device, batch_sizes: list[int], seconds: float) -> None:
    import copy

    import torch

    from omnipose.model.configs import get_config
    from omnipose.model.network import build_model
    from omnipose.model.topdown import TopDownPoseEstimator

    config = get_config(config_name)
    network = build_model(config).eval()
    print(
        f"\nraw {config_name} crops/s on {torch.cuda.get_device_name(device)}"
        f" (flip off, host->device copy included)"
    )
    print(
        f"{'batch':>6} {'fp32 eager':>11} {'fp32 graphs':>12} {'fp16 eager':>11}"
        f" {'fp16 graphs':>12}"
    )
    rows = {b: [] for b in batch_sizes}
    for precision in ("fp32", "fp16"):
        estimator = TopDownPoseEstimator(
            copy.deepcopy(network), config, device=device, precision=precision, flip_test=False
        )
        for graphs in (False, True):
            if graphs:
                estimator.use_buckets(max(batch_sizes))
            for batch in batch_sizes:
                crops = torch.randn(batch, 3, *config.input_size)
                for _ in range(3):
                    estimator.forward(crops)
                torch.cuda.synchronize(device)
                count, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds:
                    estimator.forward(crops)
                    count += batch
                torch.cuda.synchronize(device)
                rows[batch].append(count / (time.perf_counter() - started))
    for batch, rates in rows.items():
        print(f"{batch:>6} " + " ".join(f"{r:>11.1f}" for r in rates))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="coco-w48-256x192")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda:0")
    ok = check_device_crops(device)
    ok &= check_device_jpeg(device)
    ok &= check_graphs_and_fp16(device)
    raw_throughput(args.config, device, args.batch_sizes, args.seconds)
    print("\nGPU checks:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
