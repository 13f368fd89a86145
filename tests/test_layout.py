"""The layers run one way: scripts -> models -> utils, and nothing imports in a circle.

Imports are read with ``ast`` from every project file, function-level imports included
(a lazy ``import models`` inside a utils function is still an arrow that runs back up).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "utils")


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_files() -> list[Path]:
    files = sorted(ROOT.glob("*.py"))
    for pkg in PACKAGES:
        files += sorted((ROOT / pkg).glob("*.py"))
    return files


def imports_of(path: Path, known: set[str], mod: str | None = None) -> set[str]:
    """Project modules that ``path`` (module ``mod``) imports, anywhere in the file."""
    mod = mod or _module_of(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [stem] + [f"{stem}.{a.name}" for a in node.names]
        for name in names:
            # the longest project module the name starts with
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                cand = ".".join(parts[:i])
                if cand in known:
                    if cand != mod:
                        out.add(cand)
                    break
    return out


def graph() -> dict[str, set[str]]:
    files = project_files()
    known = {_module_of(f) for f in files}
    return {_module_of(f): imports_of(f, known) for f in files}


def layer(mod: str) -> int:
    """utils 0, models 1, scripts 2 (a package's __init__ belongs to the package). A
    script may run another (reproduce.py runs each step's ``main``): no cycle allowed."""
    top = mod.split(".")[0]
    return {"utils": 0, "models": 1}.get(top, 2)


def layer_violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in g.items():
        for d in deps:
            if layer(d) > layer(mod):
                bad.append(f"{mod} -> {d}")
    return sorted(bad)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_layers_run_one_way():
    assert layer_violations(graph()) == []


def test_no_import_cycle():
    assert find_cycle(graph()) is None


@pytest.mark.parametrize("src,expect", [
    ("def f():\n    from models.checkpoint import load_state\n", ["utils.x -> models.checkpoint"]),
    ("import models.align\n", ["utils.x -> models.align"]),
    ("from utils import y\n", []),
    ("from . import y\nfrom .y import z\n", []),
])
def test_checker_sees_upward_imports(src, expect, tmp_path):
    """The checker itself: a function-level ``utils -> models`` import is caught."""
    known = {"utils.x", "utils.y", "models.align", "models.checkpoint"}
    f = tmp_path / "x.py"
    f.write_text(src)
    assert layer_violations({"utils.x": imports_of(f, known, mod="utils.x")}) == expect


def test_checker_sees_cycles():
    assert find_cycle({"utils.a": {"utils.b"}, "utils.b": {"utils.a"}}) is not None
    assert find_cycle({"utils.a": {"utils.b"}, "utils.b": set()}) is None
