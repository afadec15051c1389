"""Who may import whom (docs/architecture.md): the layers stay separable.

``model`` is the inference core anyone can embed (no web framework, no training loop);
``training`` builds on it; ``service`` serves it. Neither of those two imports the other, and
nothing imports the command line, whose subcommands import the layer they run. bench imports
the package, never the tests. Every ``import`` counts, also one inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDER_OF = {"model": "model", "service": "service", "training": "training", "cli": "cli",
             "proto": "proto", "omnipose": "omnipose", "bench": "bench"}  # fmt: skip
# For each folder: the project packages its modules may import.
ALLOWED = {
    "model": {"omnipose.model"},
    "proto": {"omnipose.proto"},
    "training": {"omnipose.model", "omnipose.training"},
    "service": {"omnipose.model", "omnipose.proto", "omnipose.service"},
    "cli": {"omnipose.cli", "omnipose.model", "omnipose.service", "omnipose.training"},
    "omnipose": set(),
    "bench": {"omnipose.model", "omnipose.service", "omnipose.training", "omnipose.proto",
              "bench"},
}
PROJECT_ROOTS = ("omnipose", "tests", "bench")


def imported_project_modules(path: Path) -> set[str]:
    """Project modules ``path`` imports, as ``omnipose.<part>`` (or ``tests``/``bench``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "omnipose":
                names.update(f"omnipose.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[0] not in PROJECT_ROOTS:
            continue
        found.add(".".join(parts[:2]) if parts[0] == "omnipose" and len(parts) > 1 else parts[0])
    return found


def violations(folder: str) -> list[str]:
    allowed = ALLOWED[folder]
    found = []
    for path in sorted((ROOT / FOLDER_OF[folder]).rglob("*.py")):
        if "_pb2" in path.name:
            continue
        for module in sorted(imported_project_modules(path) - allowed):
            found.append(f"{path.relative_to(ROOT)} imports {module}")
    return found


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_layers_import_only_what_they_may(folder: str) -> None:
    assert not violations(folder), "\n".join(violations(folder))


def test_the_rule_catches_a_forbidden_import(tmp_path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from omnipose.service.engine import PoseEngine\n")
    assert imported_project_modules(module) == {"omnipose.service"}
    assert "omnipose.service" not in ALLOWED["model"]


def test_no_module_imports_a_private_name_of_another() -> None:
    """``from x import _name`` couples a module to another's internals."""
    found = []
    for folder in FOLDER_OF.values():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                        "omnipose", "bench"):
                    found += [f"{path.relative_to(ROOT)}: {node.module}.{alias.name}"
                              for alias in node.names
                              if alias.name.startswith("_") and alias.name != "__version__"]
    assert not found, "\n".join(found)
