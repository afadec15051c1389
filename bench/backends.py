"""Raw crops/s of the pose network per backend and precision, interleaved in one process.

torch fp32, torch bf16 (weights + channels_last), ONNX Runtime fp32, OpenVINO fp32 and OpenVINO
bf16 (the bf16 rows only where the CPU has native bf16 and no ISA cap hides it) run in turn,
``--rounds`` times, at each ``--batch`` size, with the same thread count (one caller), so a
shared machine's drift hits all of them alike; the median and spread per backend are printed,
with the ratio to torch fp32 at the same batch size.

``--isa avx2`` caps the CPU kernels at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``, set before torch and
OpenVINO load): torch's oneDNN honours it, and so does OpenVINO 2026.4's CPU plugin (its
convolutions become ``brgconv_avx2``/``jit_avx2`` instead of ``brgconv_avx512``/``jit_avx512``;
OpenVINO has no compile property for an ISA cap). It shows what an AVX2-only CPU would run.

    .venv/bin/python bench/backends.py --config coco-w48-128x96 --batch 1 16 --rounds 3
    .venv/bin/python bench/backends.py --config coco-w48-128x96 --isa avx2
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from omnipose.service.openmp import configure_openmp  # noqa: E402

ISA_CAPS = {"native": None, "avx2": "AVX2", "avx512": "AVX512_CORE"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="coco-w48-128x96")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's own count")
    parser.add_argument("--isa", choices=sorted(ISA_CAPS), default="native",
                        help="cap the CPU kernels (ONEDNN_MAX_CPU_ISA), e.g. avx2")
    return parser.parse_args()


def build_backends(config_name: str, threads: int, capped: bool) -> dict:
    """Name -> estimator, every backend from one network (ONNX Runtime and OpenVINO from one
    ONNX export)."""
    import torch

    from omnipose.model.configs import get_config
    from omnipose.model.network import build_model
    from omnipose.model.onnx_runtime import export_onnx
    from omnipose.model.precision import cpu_has_native_bf16
    from omnipose.model.runners import OnnxRuntimeRunner
    from omnipose.model.topdown import TopDownPoseEstimator

    config = get_config(config_name)
    network = build_model(config).eval()
    bf16 = cpu_has_native_bf16() and not capped

    def estimator(model: object, precision: str = "fp32") -> TopDownPoseEstimator:
        return TopDownPoseEstimator(model, config, precision=precision, flip_test=False)

    backends = {"torch fp32": estimator(copy.deepcopy(network))}
    if bf16:
        backends["torch bf16"] = estimator(copy.deepcopy(network), "bf16")
    onnx = export_onnx(copy.deepcopy(network), config.input_size)
    backends["onnxruntime fp32"] = estimator(OnnxRuntimeRunner(onnx))
    try:
        from omnipose.model.openvino_runtime import OpenVinoRunner, openvino_core
    except ImportError:
        print("openvino not installed (the openvino extra): no OpenVINO rows")
        return backends
    ov_model = openvino_core().read_model(io.BytesIO(onnx))
    for precision in ("fp32", "bf16") if bf16 else ("fp32",):
        runner = OpenVinoRunner(ov_model, precision, threads=threads, streams=1)  # type: ignore[arg-type]
        backends[f"openvino {precision}"] = estimator(runner)
    torch.set_num_threads(threads)
    return backends


def main() -> int:
    args = parse_args()
    if ISA_CAPS[args.isa]:
        os.environ["ONEDNN_MAX_CPU_ISA"] = ISA_CAPS[args.isa]  # before torch/OpenVINO load
    configure_openmp()  # the server's OpenMP wait policy, before torch loads
    import torch

    from omnipose.model.configs import get_config

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    backends = build_backends(args.config, threads, capped=args.isa != "native")
    input_size = get_config(args.config).input_size
    print(f"{args.config}, {threads} thread(s), {args.rounds} round(s) of {args.seconds:g} s,"
          f" kernels: {args.isa}")
    for batch in args.batch:
        crops = torch.randn(batch, 3, *input_size)
        for estimator in backends.values():
            estimator.forward(crops)  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in backends}
        for _ in range(args.rounds):
            for name, estimator in backends.items():
                count, started = 0, time.perf_counter()
                while count == 0 or time.perf_counter() - started < args.seconds:
                    estimator.forward(crops)
                    count += len(crops)
                rates[name].append(count / (time.perf_counter() - started))
        print(f"batch {batch}:")
        base = statistics.median(rates["torch fp32"])
        for name, values in rates.items():
            median = statistics.median(values)
            print(f"  {name:<17} {median:8.2f} crops/s (min {min(values):.2f},"
                  f" max {max(values):.2f}) {1e3 * batch / median:8.1f} ms/batch"
                  f"  {median / base:.2f}x torch fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
