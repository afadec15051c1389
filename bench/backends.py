"""Raw crops/s of the pose network per backend and precision, interleaved in one process.

torch fp32, torch bf16 (weights + channels_last, where the CPU has native bf16) and ONNX Runtime
fp32 run in turn, ``--rounds`` times, on the same batch, with the same thread count, so a shared
machine's drift hits all of them alike; the median and spread per backend are printed.

    .venv/bin/python bench/backends.py --config coco-w48-128x96 --batch 16 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from omnipose.service.openmp import configure_openmp  # noqa: E402

configure_openmp()  # the server's OpenMP wait policy, before torch loads


def main() -> int:
    import torch

    from omnipose.model.configs import get_config
    from omnipose.model.network import build_model
    from omnipose.model.precision import cpu_has_native_bf16
    from omnipose.model.runners import OnnxRuntimeRunner
    from omnipose.model.topdown import TopDownPoseEstimator

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="coco-w48-128x96")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = get_config(args.config)
    network = build_model(config).eval()
    backends = {"torch fp32": TopDownPoseEstimator(copy.deepcopy(network), config, flip_test=False)}
    if cpu_has_native_bf16():
        backends["torch bf16"] = TopDownPoseEstimator(
            copy.deepcopy(network), config, precision="bf16", flip_test=False
        )
    backends["onnxruntime fp32"] = TopDownPoseEstimator(
        OnnxRuntimeRunner.from_network(copy.deepcopy(network), config.input_size),
        config,
        flip_test=False,
    )
    crops = torch.randn(args.batch, 3, *config.input_size)
    for estimator in backends.values():
        estimator.forward(crops)
    rates: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(args.rounds):
        for name, estimator in backends.items():
            count, started = 0, time.perf_counter()
            while count == 0 or time.perf_counter() - started < args.seconds:
                estimator.forward(crops)
                count += len(crops)
            rates[name].append(count / (time.perf_counter() - started))
    print(f"{args.config}, batch {args.batch}, {args.threads} thread(s), {args.rounds} rounds")
    base = statistics.median(rates["torch fp32"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(
            f"  {name:<17} {median:7.2f} crops/s (min {min(values):.2f}, max {max(values):.2f})"
            f"  {median / base:.2f}x torch fp32"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
