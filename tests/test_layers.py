"""The tree's layers point one way: ``shared`` imports neither side, ``coordinator`` and
``site_client`` never import each other, only the top floor (``fedatlas/`` and ``deploy/``)
imports both, and no module reaches one of ours by a string (importlib)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the fedatlas packages its modules must not import
FORBIDDEN = {
    "shared": ("fedatlas.coordinator", "fedatlas.site_client", "fedatlas.deploy",
               "fedatlas.benchmarks", "fedatlas.cli"),
    "coordinator": ("fedatlas.site_client", "fedatlas.deploy", "fedatlas.benchmarks",
                    "fedatlas.cli"),
    "site_client": ("fedatlas.coordinator", "fedatlas.deploy", "fedatlas.benchmarks",
                    "fedatlas.cli"),
}  # fmt: skip
PRODUCT = ("shared", "coordinator", "site_client", "deploy", "fedatlas")


def _modules(folder: str) -> list[Path]:
    """The Python files of ``folder`` (``fedatlas/``'s links to the other folders not followed)."""
    return sorted(
        Path(top) / name
        for top, _, names in os.walk(ROOT / folder, followlinks=False)
        for name in names
        if name.endswith(".py")
    )


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports (also inside functions), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_or_beside_it(folder: str) -> None:
    offences = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in _modules(folder)
        for line, name in _imports(path)
        if name.startswith(FORBIDDEN[folder])
    ]
    assert offences == []


def test_no_module_of_ours_is_imported_by_name() -> None:
    offences = [
        f"{path.relative_to(ROOT)}:{line}"
        for folder in PRODUCT
        for path in _modules(folder)
        for line, name in _imports(path)
        if name in {"importlib.import_module", "importlib"}
    ]
    assert offences == []
