"""OpenVINO int8 vs fp32 crops/s for a model config (issue #20's guarded int8).

    python bench/int8_speed.py coco-w8-96x64 coco-w48-128x96 --rounds 5

Random weights unless ``--weights``; calibrated on synthetic person crops cut by the service's
pipeline (:func:`omnipose.training.quantize.calibration_crops`), quantised with the settings the
shipped default uses and with every layer int8 (``default``). Speed only: a random network's int8
is not guarded here. Variants run round-robin in one process (2 threads each) so that a shared,
noisy machine slows them alike; the median and range over rounds are printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from omnipose.model.checkpoint import load_model
from omnipose.model.openvino_runtime import OpenVinoRunner, convert_network
from omnipose.training.quantize import (
    LADDER,
    SHIPPED_SETTINGS,
    CropSource,
    calibration_crops,
    quantize_openvino,
)


def crops_per_second(runner: OpenVinoRunner, batch: torch.Tensor, seconds: float) -> float:
    runner.run(batch)  # warm
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runner.run(batch)
        done += len(batch)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--weights", help="checkpoint (default: random weights)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        images, annotations = CropSource(count=64).materialise(Path(folder), "calibration")
        for name in args.configs:
            network, config, _ = load_model(args.weights, name, device="cpu")
            network.eval()
            crops = calibration_crops(network, config, images, annotations, 64)
            fp32 = convert_network(network, config.input_size)
            variants = {"fp32": OpenVinoRunner(fp32, "fp32", threads=args.threads)}
            for settings in (LADDER[1], SHIPPED_SETTINGS):
                variants[f"int8 {settings.name}"] = OpenVinoRunner(
                    quantize_openvino(fp32, crops, settings), "int8", threads=args.threads)
            for size in (1, 16):
                batch = crops[:size] if len(crops) >= size else crops.repeat(size, 1, 1, 1)[:size]
                rates: dict[str, list[float]] = {key: [] for key in variants}
                for _ in range(args.rounds):
                    for key, runner in variants.items():
                        rates[key].append(crops_per_second(runner, batch, args.seconds))
                base = statistics.median(rates["fp32"])
                for key, values in rates.items():
                    median = statistics.median(values)
                    print(f"{name} batch {size:2d} {key:32s} {median:8.1f} crops/s"
                          f" (range {min(values):.1f}-{max(values):.1f}) x{median / base:.2f}")


if __name__ == "__main__":
    main()
