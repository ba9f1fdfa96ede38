"""The passes package's layout: one pass per module, no pass importing another, shared helpers in their own modules."""

from __future__ import annotations

import ast
from pathlib import Path

from passes import ALL_PASSES

PASSES_DIR = Path(__file__).resolve().parents[1] / "passes"


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports from, wherever the import is written."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_each_pass_has_its_own_module() -> None:
    modules = [cls.__module__ for cls in ALL_PASSES.values()]
    assert len(set(modules)) == len(modules), modules


def test_no_pass_imports_another_pass_module() -> None:
    pass_modules = {cls.__module__ for cls in ALL_PASSES.values()}
    bad = [
        f"{m} imports {other}"
        for m in sorted(pass_modules)
        for other in sorted(_imported_modules(PASSES_DIR / f"{m.split('.')[-1]}.py") & pass_modules)
        if other != m
    ]
    assert not bad, "shared code belongs in a helper module, not in a pass:\n" + "\n".join(bad)
