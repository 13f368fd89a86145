"""Bad input to recall_train.py and rank_train.py (issue 14): each case is refused
before any training with ONE line naming the file (exit 2, no traceback) and leaves no
file behind; a second run into a locked --out-dir, stale temporary files of a killed
save, NaN CTRs, a diverging loss and Ctrl-C.

Most cases call ``main`` in the test process: it returning 2 (rather than raising)
with a single stderr line is what a user sees. Ctrl-C and the lock held by another
process run as subprocesses, where the exit status and the absence of a traceback are
those of a real run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures import tiny_align
from test_train import make_rank_data, make_recall_data

import rank_train
import recall_train
from models.checkpoint import load_ranker, save_align_checkpoint
from utils.formats.rows import RECORD_SEP
from utils.hashing import model_hash
from utils.io import exclusive_lock
from utils.training import load_train_state, read_metrics

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--num-workers", "0", "--device", "cpu", "--no-progress", "--backend", "torch"]


@pytest.fixture(scope="module")
def recall_env(tmp_path_factory, bert_dir):
    root = tmp_path_factory.mktemp("recall_bad")
    csv, img, arch = make_recall_data(root, owners_per_combo=1, images_per_owner=2)
    return {
        "root": root,
        "csv": csv,
        "img": img,
        "arch": arch,
        "bert": bert_dir,
        "args": [
            "--csv",
            str(csv),
            "--image-dir",
            str(img),
            "--bert-dir",
            str(bert_dir),
            "--arch",
            str(arch),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--val-owners",
            "4",
            *COMMON,
        ],
    }


@pytest.fixture(scope="module")
def rank_env(tmp_path_factory, bert_dir):
    root = tmp_path_factory.mktemp("rank_bad")
    data = make_rank_data(root, n_train=8, n_val=4)
    init = root / "init.pth"
    save_align_checkpoint(tiny_align(bert_dir, seed=1), init)
    return {
        "root": root,
        "data": data,
        "bert": bert_dir,
        "init": init,
        "args": data
        + [
            "--bert-dir",
            str(bert_dir),
            "--init",
            str(init),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--no-augment",
            "--cache-embeddings",
            *COMMON,
        ],
    }


def replace_arg(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return args[: i + 1] + [value] + args[i + 2 :]


def one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: "), err
    return err[0]


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------
# inputs: refused before any work, one line naming the file, nothing written
# ---------------------------------------------------------------------------
def recall_cases(e, tmp):
    bad_utf8 = tmp / "latin1.csv"
    bad_utf8.write_bytes(
        e["csv"].read_bytes().split(b"\n", 2)[0]
        + b"\n"
        + e["csv"].read_bytes().split(b"\n", 2)[1]
        + b"\n"
        + b"p9,caf\xe9,u,0,1,1,\n"
    )
    (tmp / "empty.csv").write_text("\n\n", encoding="utf-8")
    (tmp / "junk.pth").write_bytes(b"this is not a checkpoint")
    (tmp / "bad_arch.json").write_text("{not json", encoding="utf-8")
    other = tmp / "other_arch.pth"  # a real checkpoint of another architecture
    save_align_checkpoint(tiny_align(e["bert"], seed=0), other)
    a = e["args"]
    return {
        "missing csv": (replace_arg(a, "--csv", str(tmp / "nope.csv")), "nope.csv: no such file"),
        "empty csv": (replace_arg(a, "--csv", str(tmp / "empty.csv")), "empty.csv: empty file"),
        "non-utf8 csv": (replace_arg(a, "--csv", str(bad_utf8)), "latin1.csv:3: not UTF-8"),
        "missing image dir": (
            replace_arg(a, "--image-dir", str(tmp / "noimg")),
            "--image-dir " + str(tmp / "noimg") + ": no such directory",
        ),
        "missing init": (a + ["--init", str(tmp / "none.pth")], "none.pth: no such file"),
        "junk init": (a + ["--init", str(tmp / "junk.pth")], "junk.pth: cannot be read"),
        "init of another architecture": (a + ["--init", str(other)], "other_arch.pth does not match"),
        "bad arch json": (replace_arg(a, "--arch", str(tmp / "bad_arch.json")), "bad_arch.json:1: not valid JSON"),
        "missing bert dir": (
            replace_arg(a, "--bert-dir", str(tmp / "nobert")),
            "--bert-dir " + str(tmp / "nobert") + ": no such directory",
        ),
        "out-dir under a file": (a, None),  # filled in below
    }


def test_recall_bad_inputs(recall_env, tmp_path, capsys):
    cases = recall_cases(recall_env, tmp_path)
    (tmp_path / "plain").write_text("x", encoding="utf-8")
    for name, (args, expected) in cases.items():
        out = tmp_path / "plain" / "run" if name == "out-dir under a file" else tmp_path / "run"
        expected = expected or "is not a directory"
        before = listing(tmp_path)
        rc = recall_train.main(args + ["--out-dir", str(out)])
        assert rc == 2, name
        line = one_line_error(capsys, "recall_train")
        assert expected in line, (name, line)
        assert listing(tmp_path) == before, name  # no out-dir, no temp file


def test_rank_bad_inputs(rank_env, tmp_path, capsys):
    a = rank_env["args"]
    val = Path(a[a.index("--val-csv") + 1])
    rows = val.read_text(encoding="utf-8").splitlines()
    fields = rows[1].split(RECORD_SEP)
    nan_csv, inf_csv = tmp_path / "nan.csv", tmp_path / "inf.csv"
    nan_csv.write_text(
        "\n".join([rows[0], RECORD_SEP.join(fields[:3] + ["nan"] + fields[4:])]) + "\n", encoding="utf-8"
    )
    inf_csv.write_text(
        "\n".join([rows[0], RECORD_SEP.join(fields[:4] + ["inf"] + fields[5:])]) + "\n", encoding="utf-8"
    )
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage\n")
    (tmp_path / "junk.pth").write_bytes(b"PK\x03\x04 truncated zip")
    cases = {
        "missing train csv": (replace_arg(a, "--train-csv", str(tmp_path / "no.csv")), "no.csv: no such file"),
        "empty val csv": (replace_arg(a, "--val-csv", str(tmp_path / "empty.csv")), "empty.csv: empty file"),
        "binary train csv": (replace_arg(a, "--train-csv", str(tmp_path / "bin.csv")), "bin.csv:1: not UTF-8"),
        "nan ctr": (replace_arg(a, "--val-csv", str(nan_csv)), "nan.csv:2: ctr_a: nan is not a finite"),
        "inf ctr": (replace_arg(a, "--val-csv", str(inf_csv)), "inf.csv:2: ctr_b: inf is not a finite"),
        "missing image dir": (replace_arg(a, "--image-dir", str(tmp_path / "noimg")), "no such directory"),
        "missing val image dir": (a + ["--val-image-dir", str(tmp_path / "noval")], "noval: no such directory"),
        "missing poi table": (
            replace_arg(a, "--poi-pic-num", str(tmp_path / "none.npy")),
            "--poi-pic-num " + str(tmp_path / "none.npy") + ": no such file",
        ),
        "junk init": (replace_arg(a, "--init", str(tmp_path / "junk.pth")), "junk.pth: cannot be read"),
    }
    for name, (args, expected) in cases.items():
        out = tmp_path / "run"
        before = listing(tmp_path)
        rc = rank_train.main(args + ["--out-dir", str(out)])
        assert rc == 2, name
        line = one_line_error(capsys, "rank_train")
        assert expected in line, (name, line)
        assert listing(tmp_path) == before, name


@pytest.mark.parametrize(
    "script, flag, value",
    [
        (recall_train, "--batch-size", "0"),
        (recall_train, "--num-workers", "-1"),
        (rank_train, "--batch-size", "0"),
        (rank_train, "--num-workers", "-1"),
        (rank_train, "--epochs", "0"),
        (recall_train, "--lr", "nan"),
    ],
)
def test_bad_numbers_are_argparse_errors(script, flag, value, recall_env, rank_env, tmp_path, capsys):
    args = (recall_env if script is recall_train else rank_env)["args"]
    with pytest.raises(SystemExit) as e:
        script.main(args + [flag, value, "--out-dir", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------
# resume: no state, a truncated state, stale temporary files of a killed save
# ---------------------------------------------------------------------------
def test_resume_without_or_with_truncated_state(rank_env, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    assert rank_train.main(rank_env["args"] + ["--out-dir", str(out), "--resume"]) == 2
    assert f"{out / 'train_state.pt'}: no training state" in one_line_error(capsys, "rank_train")
    assert listing(out) == []

    assert rank_train.main(rank_env["args"] + ["--out-dir", str(out), "--stop-after-step", "1"]) == 0
    state = out / "train_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert rank_train.main(rank_env["args"] + ["--out-dir", str(out), "--resume"]) == 2
    line = one_line_error(capsys, "rank_train")
    assert f"{state}: cannot be read as a training state" in line and "Errno" not in line
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_stale_temp_files_are_cleaned(rank_env, tmp_path):
    """A kill during a save leaves <file>.tmp<pid>: a fresh run and --resume remove those
    of dead processes (and keep a live process's)."""
    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    stale = [out / f"last.ckpt.tmp{pid}", out / f"train_state.pt.tmp{pid}", out / f"best.ckpt.tmp{pid}"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    live = out / f"notes.txt.tmp{os.getpid()}"
    live.write_text("a live process's", encoding="utf-8")
    assert rank_train.main(rank_env["args"] + ["--out-dir", str(out), "--stop-after-step", "1"]) == 0
    assert not any(p.exists() for p in stale) and live.exists()
    live.unlink()

    pid = dead_pid()
    for name in ("last.ckpt", "train_state.pt", "metrics.csv"):
        (out / f"{name}.tmp{pid}").write_bytes(b"torn")
    assert rank_train.main(rank_env["args"] + ["--out-dir", str(out), "--resume"]) == 0
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert load_train_state(out / "train_state.pt")["step"] == 4


# ---------------------------------------------------------------------------
# concurrency, divergence, Ctrl-C
# ---------------------------------------------------------------------------
def test_second_run_into_a_locked_out_dir(recall_env, rank_env, tmp_path, capsys):
    out = tmp_path / "run"
    with exclusive_lock(out):  # another run (a separate open file: flock conflicts)
        assert rank_train.main(rank_env["args"] + ["--out-dir", str(out)]) == 2
        line = one_line_error(capsys, "rank_train")
        assert f"another run holds {out / '.lock'} (pid {os.getpid()})" in line
        assert recall_train.main(recall_env["args"] + ["--out-dir", str(out)]) == 2
        assert "another run holds" in one_line_error(capsys, "recall_train")
        assert listing(out) == [".lock"]
    assert listing(out) == []


def test_locked_out_dir_in_a_subprocess(rank_env, tmp_path):
    out = tmp_path / "run"
    with exclusive_lock(out):
        p = run_script("rank_train.py", rank_env["args"] + ["--out-dir", str(out)])
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("rank_train: error: another run holds")


def test_nan_loss_stops_without_overwriting_the_checkpoint(rank_env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = rank_train.pair_loss
    calls = {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(rank_train, "pair_loss", poisoned)
    rc = rank_train.main(rank_env["args"] + ["--out-dir", str(out), "--save-every", "1"])
    assert rc == 2
    line = one_line_error(capsys, "rank_train")
    assert "step 3: the loss is nan" in line
    state = load_train_state(out / "train_state.pt")
    assert state["step"] == 2  # the last good save
    ranker = load_ranker(out / "last.ckpt", rank_env["bert"])
    assert model_hash(ranker) == state["model_hash"]
    assert all(torch.isfinite(v).all() for v in ranker.state_dict().values() if v.is_floating_point())
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == ["1", "2", "2"]  # 2 train + val
    assert not [p for p in out.iterdir() if ".tmp" in p.name or p.name == ".lock"]


def run_script(script: str, args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def test_ctrl_c_is_one_line_and_exit_130(rank_env, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = replace_arg(rank_env["args"], "--epochs", "100000")
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "rank_train.py"), *args, "--out-dir", str(out), "--log-level", "WARNING"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and p.poll() is None:
            m = out / "metrics.csv"
            if m.is_file() and len(m.read_text(encoding="utf-8").splitlines()) > 6:  # 2 epochs saved
                break
            time.sleep(0.2)
        assert p.poll() is None, p.stderr.read()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == "rank_train: interrupted"
    assert not [q for q in out.iterdir() if ".tmp" in q.name or q.name == ".lock"]
    # what was saved resumes (the state and its checkpoint belong together)
    state = load_train_state(out / "train_state.pt")
    assert state["step"] >= 2
    assert model_hash(load_ranker(out / "last.ckpt", rank_env["bert"])) == state["model_hash"]


def test_ctrl_c_during_a_save_waits_for_the_pair(tmp_path):
    """SIGINT inside deferred_sigint (the checkpoint + state save) is raised after it."""
    from utils.training import deferred_sigint

    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_sigint():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("saved")
    assert done == ["saved"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------------------
# bad rows: one rule (refused, or left out and counted with --skip-bad-rows)
# ---------------------------------------------------------------------------
def test_recall_bad_rows_refused_or_left_out(recall_env, tmp_path, capsys, caplog):
    import logging

    lines = recall_env["csv"].read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_bytes(("\n".join(lines[:2] + ["p9,three,fields"]) + "\n").encode() + b"p8,caf\xe9,u,0,1,1,\n")
    bad.write_bytes(bad.read_bytes() + ("\n".join(lines[2:]) + "\n").encode())
    args = replace_arg(recall_env["args"], "--csv", str(bad))
    assert recall_train.main(args + ["--out-dir", str(tmp_path / "refused")]) == 2
    line = one_line_error(capsys, "recall_train")
    assert f"{bad}:3: expected 7 fields" in line and "and 1 more" in line and "--skip-bad-rows" in line
    assert not (tmp_path / "refused").exists()
    with caplog.at_level(logging.INFO):
        assert recall_train.main(args + ["--out-dir", str(tmp_path / "run"), "--skip-bad-rows"]) == 0
    assert f"{bad}:3: expected 7 fields" in caplog.text and f"{bad}:4: not UTF-8" in caplog.text
    assert "2 bad rows of" in caplog.text
    assert (tmp_path / "run" / "best.pth").is_file()


def test_plain_pairs_csv_bad_row(recall_env, tmp_path, capsys):
    img = recall_env["img"]
    names = sorted(p.name for p in img.iterdir())
    rows = ["text,image"] + [f"色{i % 4},{n}" for i, n in enumerate(names)]
    (tmp_path / "pairs.csv").write_text("\n".join(rows[:3] + ["只有文字,"] + rows[3:]) + "\n", encoding="utf-8")
    args = replace_arg(recall_env["args"], "--csv", str(tmp_path / "pairs.csv"))
    args = replace_arg(args, "--image-dir", str(img))
    assert recall_train.main(args + ["--out-dir", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'pairs.csv'}:4: empty text or image" in one_line_error(capsys, "recall_train")
    assert not (tmp_path / "run").exists()


def test_rank_bad_rows_refused_or_left_out_and_nan_never(rank_env, tmp_path, capsys):
    a = rank_env["args"]
    train_csv = Path(a[a.index("--train-csv") + 1])
    rows = train_csv.read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "train.csv"
    bad.write_text("\n".join(rows + ["x$record$too few"]) + "\n", encoding="utf-8")
    args = replace_arg(a, "--train-csv", str(bad))
    assert rank_train.main(args + ["--out-dir", str(tmp_path / "refused")]) == 2
    line = one_line_error(capsys, "rank_train")
    assert f"{bad}:{len(rows) + 1}: expected 10 fields" in line and "--skip-bad-rows" in line
    out = tmp_path / "run"
    assert rank_train.main(args + ["--out-dir", str(out), "--skip-bad-rows", "--stop-after-step", "1"]) == 0
    assert load_train_state(out / "train_state.pt")["step"] == 1
    fields = rows[0].split(RECORD_SEP)
    nan = tmp_path / "nan.csv"
    nan.write_text("\n".join(rows + [RECORD_SEP.join(fields[:3] + ["nan"] + fields[4:])]) + "\n", encoding="utf-8")
    capsys.readouterr()
    nan_args = replace_arg(a, "--train-csv", str(nan)) + ["--skip-bad-rows", "--out-dir", str(tmp_path / "nan")]
    assert rank_train.main(nan_args) == 2
    assert f"{nan}:{len(rows) + 1}: ctr_a: nan is not a finite" in one_line_error(capsys, "rank_train")


def test_symlinked_lock_file_is_refused(rank_env, tmp_path, capsys):
    """The run lock is utils.io's one lock: a planted symbolic link is never followed."""
    out = tmp_path / "run"
    out.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me", encoding="utf-8")
    (out / ".lock").symlink_to(target)
    assert rank_train.main(rank_env["args"] + ["--out-dir", str(out)]) == 2
    assert "is a symbolic link" in one_line_error(capsys, "rank_train")
    assert target.read_text(encoding="utf-8") == "keep me"
