"""The layout's rules, checked on the source: no import cycles, no private names across modules, model config names in one place.

Every import counts, wherever it is written: at the top, inside a function,
or under ``TYPE_CHECKING``. An import of ``a.b.c`` is an edge to module
``a.b.c`` (a package's ``__init__`` only when the package itself is named).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qgraph", "passes")


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every module of the first-party packages."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [a.name for a in node.names]
            # ``from pkg import sub`` names a submodule: that is the edge.
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            rest = [n for n in names if f"{base}.{n}" not in modules]
            out += [(s, [], node.lineno) for s in subs]
            if rest or not subs:
                out.append((base, rest, node.lineno))
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = _modules(root)
    return {m: {t for t, _, _ in _imports(m, f, modules) if t in modules and t != m} for m, f in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    # The check itself can fail: a cycle through a lazy import and a TYPE_CHECKING import is found.
    (tmp_path / "qgraph").mkdir()
    (tmp_path / "passes").mkdir()
    (tmp_path / "qgraph" / "__init__.py").write_text("")
    (tmp_path / "passes" / "__init__.py").write_text("")
    (tmp_path / "qgraph" / "a.py").write_text("def f():\n    from qgraph.b import g\n")
    (tmp_path / "qgraph" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from qgraph import a\n")
    assert find_cycle(import_graph(tmp_path)) == ["qgraph.a", "qgraph.b", "qgraph.a"]


def test_no_private_name_is_imported_across_modules() -> None:
    modules = _modules()
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {n} from {target}"
        for m, path in modules.items()
        for target, names, line in _imports(m, path, modules)
        for n in names
        if target in modules and n.startswith("_") and not n.startswith("__")
    ]
    assert not bad, "private names imported from other modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("pkg", PACKAGES)
def test_the_stages_are_packages(pkg: str) -> None:
    # The flat folder is gone: qgraph's top level holds the entry points only, each stage is a package.
    if pkg == "passes":
        return
    top = sorted(p.name for p in (ROOT / "qgraph").glob("*.py"))
    assert top == ["__init__.py", "api.py", "cli.py", "compile.py", "errors.py", "version.py"], top
    stages = {"frontend", "ir", "pipeline", "artifact", "targets", "runtime", "devtools"}
    assert stages <= {p.name for p in (ROOT / "qgraph").iterdir() if (p / "__init__.py").is_file()}


#: GPT-2's config names for its shape: only the family module reads them (the rest says ModelSpec's names).
GPT2_CONFIG_NAMES = re.compile(r"\b(n_layer|n_head|n_embd|n_positions)\b")


#: A module over this many lines holds two topics (house style, rule 16): split it.
MAX_LINES = 500


def test_no_module_is_over_the_line_budget() -> None:
    long = {str(f.relative_to(ROOT)): n for f in _modules().values() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by topic (over {MAX_LINES} lines): {long}"


def test_gpt2_config_names_appear_only_in_the_family_modules() -> None:
    families = ROOT / "qgraph" / "frontend" / "families"
    found = sorted(
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for path in _modules().values()
        if families not in path.parents
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if GPT2_CONFIG_NAMES.search(line)
    )
    assert not found, "GPT-2 config names outside qgraph/frontend/families (use ModelSpec's names):\n" + "\n".join(found)
