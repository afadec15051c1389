"""Size limits of the project's code: no file over 600 lines and no class over 300 lines.

Large files and classes are where several jobs end up tangled; the limits keep each module to one
job. Tests and generated code (the gRPC stubs, ``*_pb2*.py``) are not held to them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED_FOLDERS = ("model", "service", "training", "cli", "proto", "omnipose", "bench")
MAX_FILE_LINES = 600
MAX_CLASS_LINES = 300


def _source_files() -> list[Path]:
    files = [
        path
        for folder in CHECKED_FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "_pb2" not in path.name
    ]
    assert files, f"no Python files found under {ROOT}"
    return files


def _classes(tree: ast.Module) -> list[ast.ClassDef]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]


def test_no_file_is_over_600_lines() -> None:
    too_long = []
    for path in _source_files():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not too_long, f"files over {MAX_FILE_LINES} lines: " + "; ".join(too_long)


def test_no_class_is_over_300_lines() -> None:
    too_long = []
    for path in _source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _classes(tree):
            # decorators belong to the class: count from the first of them
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines = (node.end_lineno or node.lineno) - first + 1
            if lines > MAX_CLASS_LINES:
                too_long.append(f"{path.relative_to(ROOT)}: class {node.name}, {lines} lines")
    assert not too_long, f"classes over {MAX_CLASS_LINES} lines: " + "; ".join(too_long)
