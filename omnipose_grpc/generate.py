"""Regenerate the checked-in gRPC modules of ``omnipose_grpc`` from ``proto/omnipose.proto``.

Run from anywhere: ``python -m omnipose_grpc.generate [OUT_DIR]`` (needs grpcio-tools, a dev
dependency). The output is deterministic, and tests/test_service_grpc.py checks the checked-in
files still match.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO = REPO_ROOT / "proto" / "omnipose.proto"
PACKAGE = "omnipose_grpc"
GENERATED = ("omnipose_pb2.py", "omnipose_pb2.pyi", "omnipose_pb2_grpc.py")


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Write the stubs to ``OUT_DIR/omnipose_grpc``.

    protoc names the Python package after the directory of the ``.proto`` relative to its include
    path, so the source is staged as ``omnipose_grpc/omnipose.proto`` in a temporary include
    directory: the generated modules then import ``from omnipose_grpc import omnipose_pb2``.
    """
    import grpc_tools  # dev dependency: imported only when regenerating
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir = Path(out_dir)
    (out_dir / PACKAGE).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as include:
        staged = Path(include) / PACKAGE / PROTO.name
        staged.parent.mkdir()
        shutil.copyfile(PROTO, staged)
        args = [
            "protoc",
            f"-I{include}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(staged),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {PROTO}")
    return [out_dir / PACKAGE / name for name in GENERATED]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT):
        print(path)
