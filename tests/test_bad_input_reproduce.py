"""Bad input to reproduce.py (issue 14): for each case, the command, its exit status, the
one-line message and the absence of leftover files.

Reproduce's own output locations (--out-dir, --dest, the image folders) are checked before
any step starts; bad arguments are one line and exit 2; Ctrl-C is one line and exit 130; a
failing step keeps exit status 1 with a message naming the step. The library function the
recall-eval step calls is replaced by a recorder here, so nothing is downloaded or encoded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import reproduce
from utils.fetch.assets import DEFAULT_MANIFEST, load_manifest
from utils.io import exclusive_lock

ROOT = Path(__file__).resolve().parent.parent


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("reproduce: error: "), err
    assert "Traceback" not in err
    return lines[0]


def leftovers(root: Path) -> list[Path]:
    return [
        p for p in root.rglob("*") if ".tmp" in p.name or p.name.startswith(".write-probe-") or p.name.endswith(".lock")
    ]


def make_dest(dest: Path) -> None:
    """Every asset of the project's manifest present (empty files)."""
    for a in load_manifest(DEFAULT_MANIFEST):
        (dest / a.path).parent.mkdir(parents=True, exist_ok=True)
        (dest / a.path).write_bytes(b"")


def args(dest: Path, out: Path, *extra) -> list[str]:
    return ["--dest", str(dest), "--out-dir", str(out), "--device", "cpu", "--no-progress", *extra]


@pytest.fixture
def recorded(monkeypatch):
    """utils.evaluation.evaluate_recall (what the recall-eval step calls) replaced: records its
    arguments, writes its JSON, or raises ``error`` when one is set."""
    import utils.evaluation

    state = {"error": None, "calls": []}

    def evaluate_recall(**kw):
        state["calls"].append(kw)
        if state["error"] is not None:
            raise state["error"]
        Path(kw["json_path"]).parent.mkdir(parents=True, exist_ok=True)
        Path(kw["json_path"]).write_text("{}", encoding="utf-8")
        return {}

    monkeypatch.setattr(utils.evaluation, "evaluate_recall", evaluate_recall)
    monkeypatch.setattr(utils.evaluation, "format_recall", lambda doc: "figures")
    return state


def recall_eval_ready(tmp_path: Path) -> tuple[Path, Path]:
    """A dest and an out dir in which the recall-eval step can run (its input exists)."""
    dest, out = tmp_path / "dest", tmp_path / "out"
    make_dest(dest)
    (dest / "data" / "images" / "recall").mkdir(parents=True)  # thumbnails of the HTML report
    (out / "recall").mkdir(parents=True)
    (out / "recall" / "top10.csv").write_text("poi_id,poi_name,rank,image,score\n", encoding="utf-8")
    return dest, out


# ---------------------------------------------------------------------------
# 1. output locations, checked before any step
# ---------------------------------------------------------------------------
def test_out_dir_is_a_file(tmp_path, capsys, recorded):
    dest, _ = recall_eval_ready(tmp_path)
    out = tmp_path / "plain"
    out.write_text("mine", encoding="utf-8")
    assert reproduce.main(args(dest, out, "--steps", "recall-eval")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--out-dir {out}: exists and is not a directory" in line
    assert out.read_text(encoding="utf-8") == "mine" and recorded["calls"] == []
    assert leftovers(tmp_path) == []


def test_out_dir_under_a_plain_file(tmp_path, capsys, recorded):
    dest, _ = recall_eval_ready(tmp_path)
    (tmp_path / "plain").write_text("mine", encoding="utf-8")
    out = tmp_path / "plain" / "runs"
    assert reproduce.main(args(dest, out, "--steps", "recall-eval")) == 2
    assert "is not a directory" in one_error_line(capsys.readouterr().err)
    assert recorded["calls"] == [] and leftovers(tmp_path) == []


def test_out_dir_unwritable(tmp_path, capsys, recorded, unwritable_dir):
    dest, _ = recall_eval_ready(tmp_path)
    assert reproduce.main(args(dest, unwritable_dir / "runs", "--steps", "recall-eval")) == 2
    assert "cannot write in" in one_error_line(capsys.readouterr().err)
    assert not unwritable_dir.exists()


def test_dest_and_images_dir_checked_only_when_their_steps_run(tmp_path, capsys, recorded):
    dest, out = recall_eval_ready(tmp_path)
    (tmp_path / "plain").write_text("mine", encoding="utf-8")
    bad = tmp_path / "plain" / "x"
    # --dest under a plain file: refused when the assets step would write there
    assert reproduce.main(args(bad, out, "--steps", "assets")) == 2
    assert f"--dest {bad}: " in one_error_line(capsys.readouterr().err)
    # an image folder under a plain file: refused when an images step would write there
    assert reproduce.main(args(dest, out, "--steps", "rank-images", "--images-dir", str(bad))) == 2
    assert f"--images-dir {bad / 'rank'}: " in one_error_line(capsys.readouterr().err)
    assert recorded["calls"] == [] and leftovers(tmp_path) == []
    # not checked when no images step runs (recall-eval without its HTML report does not read it)
    assert reproduce.main(args(dest, out, "--steps", "recall-eval", "--no-html", "--images-dir", str(bad))) == 0
    assert len(recorded["calls"]) == 1
    capsys.readouterr()


# ---------------------------------------------------------------------------
# 2. bad arguments: one line, exit 2, nothing started
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--steps", "recall-infer,bogus"], "argument --steps: unknown step(s)"),
        (["--force", "nope"], "argument --force: unknown step(s)"),
        (["--max-failures", "1x"], "argument --max-failures: expected N or P% (>= 0), got '1x'"),
        (["--max-failures", "-3"], "argument --max-failures: expected N or P%"),
        (["--backend", "gpu"], "argument --backend: invalid choice: 'gpu'"),
        (["--recall-backend", "gpu"], "argument --recall-backend: invalid choice: 'gpu'"),
        (["--workers", "0"], "argument --workers: expected a positive integer, got '0'"),
        (["--num-workers", "-1"], "argument --num-workers: expected an integer >= 0, got '-1'"),
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_arguments(tmp_path, capsys, recorded, extra, expect):
    dest, out = recall_eval_ready(tmp_path)
    assert reproduce.main(args(dest, out, *extra)) == 2
    assert expect in one_error_line(capsys.readouterr().err)
    assert recorded["calls"] == [] and not (out / "reproduce.log").exists()


def test_missing_manifest_arch_and_lacking_asset(tmp_path, capsys, recorded):
    dest, out = recall_eval_ready(tmp_path)
    assert reproduce.main(args(dest, out, "--manifest", str(tmp_path / "none.json"))) == 2
    assert "--manifest" in one_error_line(capsys.readouterr().err)
    assert reproduce.main(args(dest, out, "--arch", str(tmp_path / "none.json"))) == 2
    assert f"--arch {tmp_path / 'none.json'}: no such file" in one_error_line(capsys.readouterr().err)
    doc = json.loads(Path(DEFAULT_MANIFEST).read_text(encoding="utf-8"))
    doc["assets"] = [a for a in doc["assets"] if a["name"] != "ranker_weights"]
    manifest = tmp_path / "assets.json"
    manifest.write_text(json.dumps(doc), encoding="utf-8")
    assert reproduce.main(args(dest, out, "--manifest", str(manifest))) == 2
    assert "lacks the asset(s) ranker_weights" in one_error_line(capsys.readouterr().err)
    assert recorded["calls"] == [] and not (out / "reproduce.log").exists()


def test_cuda_without_a_gpu(tmp_path, capsys, recorded):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    dest, out = recall_eval_ready(tmp_path)
    argv = args(dest, out, "--steps", "recall-infer,recall-eval")
    argv[argv.index("--device") + 1] = "cuda"
    assert reproduce.main(argv) == 2
    assert "no CUDA device is available" in one_error_line(capsys.readouterr().err)
    assert recorded["calls"] == []


def test_another_run_holds_the_out_dir(tmp_path, capsys, recorded):
    dest, out = recall_eval_ready(tmp_path)
    with exclusive_lock(out, ".reproduce.lock"):
        assert reproduce.main(args(dest, out, "--steps", "recall-eval")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"another run holds {out / '.reproduce.lock'} (pid {os.getpid()})" in line
    assert recorded["calls"] == []


# ---------------------------------------------------------------------------
# 3. a failing step: exit 1, the message names the step, the step is not done
# ---------------------------------------------------------------------------
def test_failing_step_names_the_step(tmp_path, capsys, recorded):
    dest, out = recall_eval_ready(tmp_path)
    from utils.cli import DataError, UserError

    recorded["error"] = DataError("results.csv: no rows")
    assert reproduce.main(args(dest, out, "--steps", "recall-eval")) == 1
    err = capsys.readouterr().err
    assert "step recall-eval: FAILED (exit status 2)" in err and "Traceback" not in err
    assert not (out / "steps" / "recall-eval.done.json").exists()
    assert "FAILED" in (out / "reproduce.log").read_text(encoding="utf-8")
    # bad input met inside a step, the message of the library's UserError
    recorded["error"] = UserError("results.csv line 3: not a number")
    assert reproduce.main(args(dest, out, "--steps", "recall-eval")) == 1
    err = capsys.readouterr().err
    assert "step recall-eval: error: results.csv line 3: not a number" in err
    assert "step recall-eval: FAILED (exit status 2)" in err and "Traceback" not in err
    assert leftovers(tmp_path) == []


def test_step_without_its_inputs(tmp_path, capsys, recorded):
    dest, out = recall_eval_ready(tmp_path)
    (out / "recall" / "top10.csv").unlink()
    assert reproduce.main(args(dest, out, "--steps", "recall-eval")) == 1
    err = capsys.readouterr().err
    assert "step recall-eval: cannot run, missing input: results" in err
    assert "--steps assets,recall-images,recall-infer" in err and recorded["calls"] == []


# ---------------------------------------------------------------------------
# 4. Ctrl-C: one line, exit 130, the step reruns next time
# ---------------------------------------------------------------------------
DRIVER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import reproduce, utils.evaluation

    def evaluate_recall(**kw):
        print("ready", flush=True)
        time.sleep(60)

    def caught(**kw):  # the library catches Ctrl-C itself, cleans up, and passes it on
        try:
            evaluate_recall(**kw)
        except KeyboardInterrupt:
            raise

    utils.evaluation.evaluate_recall = caught if sys.argv[2] == "caught" else evaluate_recall
    sys.exit(reproduce.main(sys.argv[3:]))
""")


@pytest.mark.parametrize("step", ["plain", "caught"])
def test_ctrl_c_one_line_and_130(tmp_path, step):
    dest, out = recall_eval_ready(tmp_path)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, str(driver), str(ROOT), step, *args(dest, out, "--steps", "recall-eval")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        while "ready" not in lines:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line.strip())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert len(err.strip().splitlines()) == 1 and err.strip().endswith(": interrupted"), err
    assert not (out / "steps" / "recall-eval.done.json").exists()
    assert not (out / ".reproduce.lock").exists() and leftovers(tmp_path) == []


def test_baselines_without_transformers_name_the_extra_before_any_download(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec

    def find_spec(name, *a, **kw):  # as if transformers were not installed
        return None if name.split(".")[0] == "transformers" else real(name, *a, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(reproduce, "run_step", lambda *a, **kw: pytest.fail("a step started"))
    dest, out = tmp_path / "dest", tmp_path / "out"
    assert reproduce.main(args(dest, out, "--with-baselines")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--with-baselines needs the optional package transformers" in line and "[taiyi]" in line
    assert not dest.exists() and not out.exists()
