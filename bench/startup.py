"""Start-up cost of ``backend=auto``: time from launch to ready, per start, for one model.

Per round, in turn: ``--backend torch`` (the reference), ``--backend auto`` with an empty cache
folder (first start: every candidate built and measured) and ``--backend auto`` again on that
folder (cached start: the winner is built, nothing measured). Warm-up on, as deployed. The
server's own report of the choice (source, table, what the measurement took) is printed too.

    .venv/bin/python bench/startup.py --rounds 2
    .venv/bin/python bench/startup.py --config coco-w48-128x96 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.local_server import ServerProcess, running, service_environment  # noqa: E402


def start(args: list[str], log: Path) -> tuple[float, dict]:
    """Seconds from launch to ready, and /v1/models."""
    server = ServerProcess(args, log, env=service_environment())
    started = time.perf_counter()
    with running(server) as ready:
        seconds = time.perf_counter() - started
        model = httpx.get(f"{ready.http_url}/v1/models", timeout=30).json()
    return seconds, model


def row_text(row: dict) -> str:
    rate = row["crops_per_s"]
    figures = f"{rate:.1f}/s ({row['cost_s']:.1f} s)" if rate else "-"
    return f"{row['backend']} {row['precision']} {figures}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="none: the embedded default model")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    common = ["--device", "cpu", "--detector", "none", "--log-level", "warning"]
    if args.config:
        common += ["--config", args.config]
    times: dict[str, list[float]] = {"torch": [], "auto, first": [], "auto, cached": []}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            cache = Path(folder) / f"cache-{round_}"
            log = Path(folder) / "server.log"
            times["torch"].append(start([*common, "--backend", "torch"], log)[0])
            for name in ("auto, first", "auto, cached"):
                seconds, model = start([*common, "--backend", "auto", "--cache-dir",
                                        str(cache)], log)  # fmt: skip
                times[name].append(seconds)
                choice = model["backend_choice"]
                rows = "; ".join(map(row_text, choice["candidates"]))
                print(f"round {round_ + 1} {name}: ready in {seconds:.1f} s ->"
                      f" {choice['backend']} {choice['precision']} ({choice['source']},"
                      f" measurement {choice['measure_s']} s): {rows}", flush=True)  # fmt: skip
    print(f"{args.config or 'embedded default'}: launch to ready, median (min-max) of"
          f" {args.rounds} round(s)")  # fmt: skip
    for name, values in times.items():
        print(f"  {name:<13} {statistics.median(values):6.1f} s"
              f" ({min(values):.1f}-{max(values):.1f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
