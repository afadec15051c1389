"""Regenerate the checked-in gRPC stubs in ``proto/`` (package ``omnipose.proto``).

Run from anywhere: ``python -m omnipose.proto.generate [OUT_DIR]`` (needs grpcio-tools, a dev
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
PACKAGE_PATH = ("omnipose", "proto")  # the import path the generated modules use
GENERATED = ("omnipose_pb2.py", "omnipose_pb2.pyi", "omnipose_pb2_grpc.py")


def generate(out_dir: Path = REPO_ROOT / "proto") -> list[Path]:
    """Write the stubs into ``out_dir`` (by default ``proto/``, beside the source).

    protoc names the Python package after the directory of the ``.proto`` relative to its include
    path, so the source is staged as ``omnipose/proto/omnipose.proto`` in a temporary include
    directory: the generated modules then import ``from omnipose.proto import omnipose_pb2``.
    """
    import grpc_tools  # dev dependency: imported only when regenerating
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as include, tempfile.TemporaryDirectory() as generated:
        staged = Path(include).joinpath(*PACKAGE_PATH, PROTO.name)
        staged.parent.mkdir(parents=True)
        shutil.copyfile(PROTO, staged)
        args = [
            "protoc",
            f"-I{include}",
            f"-I{well_known}",
            f"--python_out={generated}",
            f"--pyi_out={generated}",
            f"--grpc_python_out={generated}",
            str(staged),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {PROTO}")
        for name in GENERATED:
            shutil.copyfile(Path(generated).joinpath(*PACKAGE_PATH, name), out_dir / name)
    return [out_dir / name for name in GENERATED]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT / "proto"):
        print(path)
