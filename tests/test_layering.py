"""The layers import one way: streamer → retrieval → vlm → memory (docs/architecture.md).

Every import statement counts, including those inside functions and under TYPE_CHECKING: a lazy
import against the layering is still a dependency against it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = ("streamer", "retrieval", "vlm", "memory")
# What each package may import of ours (itself always allowed).
ALLOWED = {
    "memory": set(),
    "vlm": {"memory"},
    "retrieval": {"memory", "vlm"},
    "streamer": {"memory", "vlm", "retrieval"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package of ours) for every import in a module."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.extend((node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in OURS)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_layers_below(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no modules under {package}/"
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {target}"
        for path in files
        for line, target in imported_packages(path)
        if target != package and target not in ALLOWED[package]
    ]
    allowed = sorted(ALLOWED[package]) or "nothing of ours"
    assert not wrong, f"{package}/ may import only {allowed}:\n" + "\n".join(wrong)


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    """The parser finds lazy and TYPE_CHECKING imports, so the test above can fail."""
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from streamer.settings import Settings\n"
        "def f():\n    import retrieval.search\n"
    )
    assert imported_packages(module) == [(3, "streamer"), (5, "retrieval")]
