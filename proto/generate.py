"""Regenerate the checked-in gRPC modules from ``proto/omnipose.proto``.

Run from anywhere: ``python -m proto.generate`` (needs grpcio-tools, a dev dependency). The
output is deterministic, and tests/test_service_grpc.py checks the checked-in files still match.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO = "proto/omnipose.proto"
GENERATED = ("omnipose_pb2.py", "omnipose_pb2.pyi", "omnipose_pb2_grpc.py")


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Run protoc with the repository root as include path, so imports read ``from proto ...``."""
    import grpc_tools  # dev dependency: imported only when regenerating
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir = Path(out_dir)
    (out_dir / "proto").mkdir(parents=True, exist_ok=True)
    args = [
        "protoc", f"-I{REPO_ROOT}", f"-I{well_known}", f"--python_out={out_dir}",
        f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(REPO_ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {PROTO}")
    return [out_dir / "proto" / name for name in GENERATED]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT):
        print(path)
