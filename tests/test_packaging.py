"""What our distribution installs: one top-level import package, ``omnipose``, so nothing collides
with a user's own modules (``model``, ``service``) or other distributions (``proto`` is
proto-plus's, installed by most Google Cloud libraries)."""

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
FOREIGN_NAMES = {"proto", "google", "grpc", "tests", "bench", "docker", "helm", "docs",
                 "model", "service", "training", "cli"}
OURS = {"omnipose"}


def packaging_config() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_distribution_installs_one_top_level_package() -> None:
    config = packaging_config()
    names = {name.split(".")[0] for name in config["packages"]}
    assert not names & FOREIGN_NAMES, f"our wheel would install {sorted(names & FOREIGN_NAMES)}"
    assert names == OURS


def test_every_source_package_is_packaged() -> None:
    """Each repository folder with Python code is installed, and each subpackage maps to a folder
    that is a package: a new folder or subpackage cannot be left out of the wheel unnoticed."""
    config = packaging_config()
    mapped = config["package-dir"]
    assert set(mapped) == set(config["packages"])
    for package, folder in mapped.items():
        assert (REPO_ROOT / folder / "__init__.py").is_file(), f"{package} -> {folder}"
    source_folders = {
        path.name for path in REPO_ROOT.iterdir()
        if (path / "__init__.py").is_file() and path.name not in ("tests", "bench")
    }
    assert source_folders == {folder for folder in mapped.values() if "/" not in folder}
    nested = set(find_packages(str(REPO_ROOT), exclude=["tests*", "bench*"]))
    nested_subpackages = {name for name in nested if "." in name}
    missed = {name for name in nested_subpackages
              if mapped.get(f"omnipose.{name}") != name.replace(".", "/")}  # fmt: skip
    assert not missed, f"subpackages the package list misses: {missed}"


def test_grpc_stubs_import_next_to_a_foreign_proto_package(tmp_path) -> None:
    """A site-packages that already holds a ``proto`` package (proto-plus) must not shadow ours."""
    foreign = tmp_path / "proto"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("OWNER = 'proto-plus'\n")
    code = (
        "import proto; assert proto.OWNER == 'proto-plus'\n"
        "from omnipose.proto import omnipose_pb2, omnipose_pb2_grpc\n"
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
    for folder in packaging_config()["package-dir"].values():
        if "/" not in folder:  # a subpackage's folder comes with its parent's
            shutil.copytree(REPO_ROOT / folder, source / folder, ignore=ignore)
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
        files = set(archive.namelist())
    assert names == OURS
    assert "omnipose/proto/omnipose_pb2.py" in files
    assert "omnipose/model/weights/default.pt" in files
    assert "omnipose/proto/omnipose.proto" in files
    assert "omnipose/training/synth/__main__.py" in files
