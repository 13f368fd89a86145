"""The project as a declared package: pyproject.toml, the requirements files and the lock
agree; what the code reads beside itself is shipped; a missing optional package is one
line naming the extra that brings it."""

import ast
import fnmatch
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from utils import cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
NAME = canonicalize_name(PROJECT["name"])


def key(req: Requirement) -> tuple:
    return canonicalize_name(req.name), tuple(sorted(req.extras)), req.specifier, str(req.marker or "")


def read_requirements(name: str) -> list[Requirement]:
    """The requirements of a requirements file, following its ``-r`` includes."""
    reqs = []
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            reqs += read_requirements(line[3:].strip())
        elif line:
            reqs.append(Requirement(line))
    return reqs


def extra(name: str) -> list[Requirement]:
    """An extra's requirements, with the project's own extras it names (``avas-repro[x]``)
    replaced by what they hold, and the runtime dependencies under them."""
    out = []
    for text in PROJECT["optional-dependencies"][name]:
        req = Requirement(text)
        if canonicalize_name(req.name) == NAME:
            out += [Requirement(t) for t in PROJECT["dependencies"]]
            out += [r for x in sorted(req.extras) for r in extra(x)]
        else:
            out.append(req)
    return out


def keys(reqs: list[Requirement]) -> list[tuple]:
    return sorted(set(map(key, reqs)), key=str)


def test_requirements_txt_is_the_dependencies():
    assert keys(read_requirements("requirements.txt")) == keys([Requirement(t) for t in PROJECT["dependencies"]])


@pytest.mark.parametrize("extra_name,file", [("dev", "requirements-dev.txt"), ("ray", "requirements-ray.txt")])
def test_requirements_file_is_the_extra(extra_name, file):
    assert keys(read_requirements(file)) == keys(extra(extra_name))


def test_lock_pins_every_requirement_within_its_range():
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line!r}"
            assert canonicalize_name(name) not in pins, f"pinned twice: {name}"
            pins[canonicalize_name(name)] = Version(version)
    wanted = [Requirement(t) for t in PROJECT["dependencies"]]
    wanted += [r for x in PROJECT["optional-dependencies"] for r in extra(x)]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in requirements-lock.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"the lock's {name} {pins[name]} is not {req}"
    for name in ("pip", "setuptools"):  # .ci/run installs the lock's pip; the build takes its setuptools
        assert name in pins


def root_modules() -> list[str]:
    return sorted(p.stem for p in ROOT.glob("*.py"))


def defines_main(module: str) -> bool:
    tree = ast.parse((ROOT / f"{module}.py").read_text(encoding="utf-8"))
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)


def test_every_script_is_a_module_and_a_command():
    assert sorted(SETUPTOOLS["py-modules"]) == root_modules()
    scripts = PROJECT["scripts"]
    for command, target in scripts.items():
        module, _, func = target.partition(":")
        assert func == "main" and defines_main(module), f"{command} = {target}"
    expected = {"avas-" + m.replace("_", "-"): f"{m}:main" for m in root_modules() if defines_main(m)}
    assert scripts == expected


def data_files(package: str) -> list[Path]:
    """The files of a package directory that are neither Python nor its caches."""
    d = ROOT / package.replace(".", "/")
    return [p for p in d.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]


def test_package_data_is_declared_and_present():
    declared = SETUPTOOLS["package-data"]
    for package, patterns in declared.items():
        for pattern in patterns:
            if not any(c in pattern for c in "*?["):
                assert (ROOT / package.replace(".", "/") / pattern).is_file(), f"{package}: {pattern}"
    # every data file beside the code is shipped with it
    for package in ("utils", "models"):
        for f in data_files(package):
            owners = [p for p in declared if f.is_relative_to(ROOT / p.replace(".", "/"))]
            rel = [f.relative_to(ROOT / p.replace(".", "/")).as_posix() for p in owners]
            assert any(fnmatch.fnmatch(r, pat) for p, r in zip(owners, rel) for pat in declared[p]), (
                f"{f.relative_to(ROOT)} is not in pyproject.toml's package-data"
            )


def test_the_wheel_ships_the_code_its_data_and_commands(tmp_path):
    """Build the wheel from what pyproject.toml names (no network: the installed setuptools)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ["pyproject.toml", "README.md", "LICENSE", *(f"{m}.py" for m in root_modules())]:
        shutil.copy(ROOT / name, src / name)
    for package in ("utils", "models"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    build = "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])"
    subprocess.run([sys.executable, "-c", build, str(out)], cwd=src, check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{m}.py" for m in root_modules()}
    expected |= {p.relative_to(ROOT).as_posix() for pkg in ("utils", "models") for p in (ROOT / pkg).rglob("*.py")}
    expected |= {f.relative_to(ROOT).as_posix() for pkg in ("utils", "models") for f in data_files(pkg)}
    assert "utils/fetch/assets.json" in expected
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]
    info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    commands = zipfile.ZipFile(wheel).read(info).decode()
    assert all(f"{c} = {t}" in commands for c, t in PROJECT["scripts"].items())


def test_require_passes_an_installed_package():
    assert cli.require("json", "ray", "--ray") is None


@pytest.mark.parametrize("module", ["avas_no_such_package", "avas_no_such_package.sub"])
def test_require_names_the_extra_of_a_missing_package(module):
    with pytest.raises(cli.UserError) as e:
        cli.require(module, "ray", "--ray")
    msg = str(e.value)
    assert msg.startswith(f"--ray needs the optional package {module}, which is not installed: pip install")
    assert "[ray]" in msg and "requirements-ray.txt" in msg


def test_a_missing_optional_package_is_one_line_and_exit_2(capsys):
    @cli.entry_point
    def main(argv=None) -> int:
        cli.require("avas_no_such_package", "taiyi", "--model taiyi")
        return 0

    assert main([]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model taiyi needs the optional package avas_no_such_package" in err
    assert "[taiyi]" in err and "requirements-taiyi.txt" not in err
