"""The house keeps its shape: layers run one way (scripts -> models -> utils), nothing
imports in a circle, code enters a subsystem only through its front door (the names of
its ``__init__``'s ``__all__``), no module is passed around as a value, the shared flags
are defined once (utils/args.py), and files stay small enough to read.

Imports are read with ``ast`` from every project file, function-level imports included.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "utils")
# subsystems entered only through their __init__ (from outside them)
FRONT_DOORS = (
    "models",
    "models.engine",
    "utils.formats",
    "utils.fetch",
    "utils.evaluation",
    "utils.training",
    "utils.selection",
    "utils.reproduction",
)
MAX_SCRIPT_LINES, MAX_FILE_LINES, MAX_FUNCTION_LINES = 250, 400, 60


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> list[Path]:
    return sorted(ROOT.glob("*.py")) + [f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))]


def scripts() -> list[Path]:
    return sorted(ROOT.glob("*.py"))


def _resolve(node: ast.ImportFrom, mod: str, is_init: bool) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_init else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(tree: ast.AST, mod: str, is_init: bool = False) -> list[tuple[str, str | None]]:
    """``(module, name)`` pairs imported anywhere in ``tree`` (name None for ``import x``)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            stem = _resolve(node, mod, is_init)
            out += [(stem, a.name) for a in node.names]
    return out


def project_deps(pairs, known: set[str], mod: str) -> set[str]:
    """The project modules behind ``pairs`` (the longest known prefix of each)."""
    deps = set()
    for stem, name in pairs:
        full = f"{stem}.{name}" if name else stem
        for cand in (full, stem):
            parts = cand.split(".")
            hit = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known), None)
            if hit:
                if hit != mod:
                    deps.add(hit)
                break
    return deps


def parsed() -> dict[str, tuple[Path, ast.AST]]:
    return {module_of(f): (f, ast.parse(f.read_text(encoding="utf-8"), str(f))) for f in project_files()}


def graph(files=None) -> dict[str, set[str]]:
    files = files or parsed()
    known = set(files)
    return {m: project_deps(imports_of(t, m, f.name == "__init__.py"), known, m) for m, (f, t) in files.items()}


def layer(mod: str) -> int:
    """utils 0, models 1, scripts 2."""
    return {"utils": 0, "models": 1}.get(mod.split(".")[0], 2)


def layer_violations(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in g.items() for d in deps if layer(d) > layer(m))


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    return next((c for n in sorted(g) if n not in state and (c := visit(n))), None)


def inside(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def front_door_violations(files, exports: dict[str, set[str]]) -> list[str]:
    """Imports into a subsystem from outside it that pass its front door (the outermost
    one the importer is outside of), or take a name its ``__all__`` does not offer."""
    bad = []
    for mod, (f, tree) in files.items():
        for stem, name in imports_of(tree, mod, f.name == "__init__.py"):
            doors = [d for d in exports if inside(stem, d) and not inside(mod, d)]
            if not doors:
                continue
            door = min(doors, key=len)
            if stem != door:
                bad.append(f"{mod}: imports {stem} past the front door {door}")
            elif name and name not in exports[door]:
                bad.append(f"{mod}: {name} is not in {door}.__all__")
    return sorted(set(bad))


def module_values(tree: ast.AST) -> list[str]:
    """Places where a module is used as a value: an imported module's name passed to a
    call, ``sys.modules[...]`` or ``importlib.import_module`` anywhere."""
    modules = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") not in ("hasattr", "getattr"):
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                if isinstance(arg, ast.Name) and arg.id in modules:
                    bad.append(f"line {node.lineno}: module {arg.id} passed to a call")
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ("modules", "import_module")
            and isinstance(node.value, ast.Name)
            and node.value.id in ("sys", "importlib")
        ):
            bad.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return bad


def exports() -> dict[str, set[str]]:
    return {door: set(importlib.import_module(door).__all__) for door in FRONT_DOORS}


def test_layers_run_one_way():
    assert layer_violations(graph()) == []


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_subsystems_are_entered_through_their_front_door():
    assert front_door_violations(parsed(), exports()) == []


def test_front_doors_say_their_job_and_offer_what_they_name():
    for door, names in exports().items():
        pkg = importlib.import_module(door)
        assert (pkg.__doc__ or "").strip(), f"{door}/__init__.py has no docstring"
        for name in names:
            assert getattr(pkg, name, None) is not None, f"{door}.__all__ names {name}, which it lacks"


def test_no_module_passed_as_a_value():
    bad = {m: v for m, (f, t) in parsed().items() if m != "utils" and (v := module_values(t))}
    assert bad == {}


def test_sizes():
    too_big = []
    for f in project_files():
        lines = f.read_text(encoding="utf-8").splitlines()
        limit = MAX_SCRIPT_LINES if f.parent == ROOT else MAX_FILE_LINES
        if len(lines) > limit:
            too_big.append(f"{f.relative_to(ROOT)}: {len(lines)} lines (max {limit})")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_big.append(
                        f"{f.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines (max {MAX_FUNCTION_LINES})"
                    )
    assert too_big == []


def _flags(tree: ast.AST) -> set[str]:
    return {
        a.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_argument"
        for a in n.args
        if isinstance(a, ast.Constant) and str(a.value).startswith("--")
    }


def test_shared_flags_are_defined_once():
    """A flag of the shared groups (utils/args.py) is never defined by a script itself,
    and every script takes --log-level and --no-progress from there."""
    shared = _flags(ast.parse((ROOT / "utils" / "args.py").read_text(encoding="utf-8")))
    assert {"--log-level", "--no-progress", "--backend", "--batch-size"} <= shared
    for f in scripts():
        tree = ast.parse(f.read_text(encoding="utf-8"))
        assert _flags(tree) & shared == set(), f"{f.name} redefines shared flags"
        calls = {getattr(n.func, "attr", getattr(n.func, "id", "")) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert "add_run" in calls, f"{f.name} does not use args.add_run"


# --- the checker itself -------------------------------------------------------------------
KNOWN = {"utils.x", "utils.y", "utils.formats", "utils.formats.rows", "models", "models.align"}


@pytest.mark.parametrize(
    "src,expect",
    [
        ("def f():\n    from models.align import AlignModel\n", ["utils.x -> models.align"]),
        ("import models\n", ["utils.x -> models"]),
        ("from utils import y\n", []),
        ("from . import y\nfrom .y import z\n", []),
    ],
)
def test_checker_sees_upward_imports(src, expect):
    tree = ast.parse(src)
    assert layer_violations({"utils.x": project_deps(imports_of(tree, "utils.x"), KNOWN, "utils.x")}) == expect


def test_checker_sees_cycles():
    assert find_cycle({"utils.a": {"utils.b"}, "utils.b": {"utils.a"}}) is not None
    assert find_cycle({"utils.a": {"utils.b"}, "utils.b": set()}) is None


@pytest.mark.parametrize(
    "src,n_bad",
    [
        ("from utils.formats import iter_recall_csv\n", 0),
        ("from utils.formats import secret\n", 1),
        ("from utils.formats.rows import iter_recall_csv\n", 1),
        ("import utils.formats.rows\n", 1),
        ("from utils.formats import rows\n", 1),
        ("def f():\n    from models.align import AlignModel\n", 1),
    ],
)
def test_checker_sees_imports_past_a_front_door(src, n_bad):
    files = {"script": (Path("script.py"), ast.parse(src))}
    doors = {"utils.formats": {"iter_recall_csv"}, "models": {"AlignModel"}}
    assert len(front_door_violations(files, doors)) == n_bad


@pytest.mark.parametrize(
    "src,n_bad",
    [
        ("import select_images\nrun(args, select_images)\n", 1),
        ("import sys\nrun(sys.modules[__name__])\n", 1),
        ("import importlib\nm = importlib.import_module('x')\n", 1),
        ("import os\nrun(os.path.join('a', 'b'))\n", 0),
    ],
)
def test_checker_sees_modules_passed_as_values(src, n_bad):
    assert len(module_values(ast.parse(src))) == n_bad
