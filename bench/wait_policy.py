"""OpenMP wait policies for the pose forward pass, idle and with a CPU-bound process beside it.

Each policy runs in its own process (OpenMP reads its environment once, when torch loads):
median latency of a forward pass over ``--crops`` crops with ``--threads`` intra-op threads, first
on an otherwise idle machine, then while another process keeps one core busy (the
oversubscribed case: the situation passive waiting is meant for).

    .venv/bin/python bench/wait_policy.py --config coco-w48-128x96 --repeats 7

Absolute figures depend on whatever else shares the machine; compare the policies within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

POLICIES: dict[str, dict[str, str]] = {
    "libgomp default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=3000": {"GOMP_SPINCOUNT": "3000"},
    "GOMP_SPINCOUNT=30000": {"GOMP_SPINCOUNT": "30000"},
}

CHILD = r"""
import json, statistics, sys, time, torch
from omnipose.model.configs import get_config
from omnipose.model.network import build_model
config, crops, threads, repeats, deadline = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), float(sys.argv[5])
torch.set_num_threads(threads)
cfg = get_config(config)
net = build_model(cfg).eval()
x = torch.randn(crops, 3, *cfg.input_size)
times = []
with torch.inference_mode():
    net(x)
    stop = time.monotonic() + deadline
    for _ in range(repeats):
        t = time.perf_counter(); net(x); times.append(time.perf_counter() - t)
        if time.monotonic() > stop:
            break
print(json.dumps({"median_s": statistics.median(times), "min_s": min(times),
                  "max_s": max(times), "n": len(times)}))
"""

BUSY = "while True: pass"


def run_policy(env_extra: dict[str, str], args: argparse.Namespace) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
    }
    env.update(env_extra)
    command = [
        sys.executable,
        "-c",
        CHILD,
        args.config,
        str(args.crops),
        str(args.threads),
        str(args.repeats),
        str(args.max_seconds),
    ]
    out = subprocess.run(
        command, env=env, capture_output=True, text=True, check=True, timeout=args.max_seconds + 120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="coco-w48-128x96")
    parser.add_argument("--crops", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="stop a policy's repeats after this long (collapsed policies)",
    )
    args = parser.parse_args()
    results = {}
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
        try:
            time.sleep(0.5 if busy else 0)
            for name, env in POLICIES.items():
                r = run_policy(env, args)
                results[(name, busy)] = r
                print(
                    f"{name:<26} {'busy core' if busy else 'idle':<9} median"
                    f" {r['median_s'] * 1000:8.1f} ms  (min {r['min_s'] * 1000:.1f},"
                    f" max {r['max_s'] * 1000:.1f}, n={r['n']})",
                    flush=True,
                )
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    print("\nratio busy/idle per policy:")
    for name in POLICIES:
        ratio = results[(name, True)]["median_s"] / results[(name, False)]["median_s"]
        print(f"  {name:<26} {ratio:5.2f}x")


if __name__ == "__main__":
    main()
