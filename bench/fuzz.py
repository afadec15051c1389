"""The long fuzzing run: tests/test_fuzz.py with many more generated cases per operation.

    .venv/bin/python bench/fuzz.py                 # 1000 cases per REST operation and gRPC test
    .venv/bin/python bench/fuzz.py --examples 5000

CI runs the same tests with 40 cases each (a few hundred in all). The exit status is pytest's:
non-zero if any request got a 5xx, INTERNAL or UNKNOWN answer.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000)
    args = parser.parse_args()
    env = {**os.environ, "FUZZ_EXAMPLES": str(args.examples), "YOLO_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--timeout",
        "0",
        "tests/test_fuzz.py",
    ]
    return subprocess.call(command, cwd=REPO_ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
