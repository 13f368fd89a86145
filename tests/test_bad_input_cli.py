"""Conventions every script keeps, whatever its job: Ctrl-C while the imports still run is
one line and exit status 130 (not a traceback), and no output may be one of the inputs."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from utils import cli

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in ROOT.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_while_the_imports_run_is_one_line(script):
    """SIGINT as soon as utils.cli is imported (seen through -X importtime), while torch
    and the rest still load."""
    p = subprocess.Popen(
        [sys.executable, "-X", "importtime", script, "--help"], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    lines = []
    for line in p.stderr:
        lines.append(line)
        if line.rstrip().endswith("| utils.cli"):
            p.send_signal(signal.SIGINT)
            break
    rest = p.stderr.read()
    p.wait(timeout=60)
    said = [x for x in (lines + rest.splitlines(True)) if not x.startswith("import time:")]
    assert any(x.rstrip().endswith("| utils.cli") for x in lines), "utils.cli was never imported"
    assert p.returncode == 130, "".join(said)
    assert [x.strip() for x in said] == [f"{Path(script).stem}: interrupted"]


def test_an_output_may_not_be_an_input_or_another_output(tmp_path):
    (tmp_path / "in.csv").write_text("x")
    with pytest.raises(cli.UserError, match="--out .*the same file as input --items"):
        cli.distinct_paths({"--items": tmp_path / "in.csv"}, {"--out": tmp_path / "./in.csv"})
    with pytest.raises(cli.UserError, match="--summary .*the same file as --out"):
        cli.distinct_paths({}, {"--out": tmp_path / "o", "--summary": tmp_path / "o"})
    cli.distinct_paths({"--items": tmp_path / "in.csv"}, {"--out": tmp_path / "o", "--html": None})
