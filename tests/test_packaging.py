"""What our distribution installs: its top-level import names must not collide with other
well-known distributions (``proto`` is proto-plus's, installed by most Google Cloud libraries)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

REPO_ROOT = Path(__file__).resolve().parent.parent
# Import names owned by other distributions that users commonly install next to ours.
FOREIGN_NAMES = {"proto", "google", "grpc", "tests", "bench", "docker", "helm", "docs"}
OURS = {"model", "service", "training", "omnipose_grpc", "omnipose_cli"}


def packaged_top_level_names() -> set[str]:
    """The top-level packages setuptools installs, found exactly as pyproject tells it to."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    find = config["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(
        str(REPO_ROOT), include=find["include"], exclude=find.get("exclude", ())
    )
    return {name.split(".")[0] for name in packages}


def test_distribution_installs_no_foreign_top_level_package() -> None:
    names = packaged_top_level_names()
    assert not names & FOREIGN_NAMES, f"our wheel would install {sorted(names & FOREIGN_NAMES)}"
    assert names == OURS


def test_grpc_stubs_import_next_to_a_foreign_proto_package(tmp_path) -> None:
    """A site-packages that already holds a ``proto`` package (proto-plus) must not shadow ours."""
    foreign = tmp_path / "proto"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("OWNER = 'proto-plus'\n")
    code = (
        "import proto; assert proto.OWNER == 'proto-plus'\n"
        "from omnipose_grpc import omnipose_pb2, omnipose_pb2_grpc\n"
        "assert omnipose_pb2.DESCRIPTOR.package == 'omnipose.v1'\n"
        "assert omnipose_pb2_grpc.PoseEstimationStub\n"
    )
    env_path = f"{tmp_path}:{REPO_ROOT}"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": env_path},
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_built_wheel_has_no_proto_package(tmp_path) -> None:
    """Build the real wheel (no network, no isolation) from a copy of the sources, so the build
    leaves nothing in the checkout, and read its top-level names."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    for path in REPO_ROOT.iterdir():
        if path.is_dir() and (path / "__init__.py").exists() and path.name != "tests":
            shutil.copytree(path, source / path.name, ignore=ignore)
    shutil.copytree(REPO_ROOT / "proto", source / "proto", ignore=ignore)
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"wheel build failed: {result.stderr[-2000:]}")
    (wheel,) = wheels.glob("omnipose_serve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = {
            name.split("/")[0]
            for name in archive.namelist()
            if not name.split("/")[0].endswith(".dist-info")
        }
    assert "proto" not in names
    assert names == OURS
    assert "omnipose_grpc/omnipose_pb2.py" in archive.namelist()
