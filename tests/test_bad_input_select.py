"""select_images.py on bad input: each case is refused with exit status 2 and ONE line on
stderr naming the flag or file, before any model is loaded where the input allows it,
and leaves no file behind (no output, no summary, no temporary file). Also: no output
may be an input or another output; a run's outputs are written together or not at all;
bad catalogue rows are refused unless --skip-bad-rows (then counted and listed)."""

from __future__ import annotations

import csv
import errno
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures import solid_image, tiny_ranker, write_image

import select_images
from models.checkpoint import save_ranker_checkpoint
from models.engine import selection as engine_selection
from utils.formats.poi import save_tables

ROOT = Path(__file__).resolve().parent.parent
DIM = 32


@pytest.fixture(scope="module")
def env(tmp_path_factory, bert_dir):
    d = tmp_path_factory.mktemp("bad_select")
    save_ranker_checkpoint(tiny_ranker(bert_dir, seed=2), d / "ranker.ckpt")
    with open(d / "items.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "poi_names", "image"])
        for i in range(2):
            for j in range(2):
                write_image(solid_image((40 * i, 90, 30 * j), seed=i + j), d / f"{i}_{j}.jpg")
                w.writerow([f"it{i}", "红色方形", "西湖,古镇", f"{i}_{j}.jpg"])
    save_tables({d / "pic.npz": {"西湖": [3, 1, 0], "古镇": [9, 2, 1]}}, kind="pic_num")
    rng = np.random.default_rng(0)
    save_tables({d / "name.npz": {n: rng.normal(size=DIM).astype(np.float32) for n in ("西湖", "古镇")}})
    # a vector table holding NaN, written in the safe format directly (a writer may refuse NaN)
    vals = rng.normal(size=(2, DIM)).astype(np.float32)
    vals[0, :] = np.nan
    np.savez(d / "nan_img.npz", names=np.array(["西湖", "古镇"]), values=vals, kind=np.array("vectors"))
    (d / "garbage.ckpt").write_bytes(b"this is not a checkpoint")
    (d / "plain").write_text("a file")
    return {"dir": d, "bert": bert_dir}


def _base(env, out):
    d = env["dir"]
    return [
        "--items",
        str(d / "items.csv"),
        "--out",
        str(out),
        "--ranker-checkpoint",
        str(d / "ranker.ckpt"),
        "--bert-dir",
        str(env["bert"]),
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--backend",
        "torch",
        "--no-progress",
    ]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _refused(env, argv, capsys, *needles, tmp_path):
    before = _files(env["dir"]) | {"@" + x for x in _files(tmp_path)}
    assert select_images.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("select_images: error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])
    after = _files(env["dir"]) | {"@" + x for x in _files(tmp_path)}
    assert after == before, f"left behind: {after - before}"
    return err[0]


@pytest.fixture
def no_models(monkeypatch):
    """Path and flag errors must come before any model is loaded."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(engine_selection, "load_selection_models", boom)


def test_out_is_a_directory(env, tmp_path, capsys, no_models):
    (tmp_path / "o.csv").mkdir()
    _refused(env, _base(env, tmp_path / "o.csv"), capsys, "--out", "is a directory", tmp_path=tmp_path)


def test_out_under_a_plain_file(env, tmp_path, capsys, no_models):
    _refused(env, _base(env, env["dir"] / "plain" / "o.csv"), capsys, "--out", "not a directory", tmp_path=tmp_path)


def test_out_in_unwritable_directory(env, tmp_path, capsys, no_models, unwritable_dir):
    _refused(env, _base(env, unwritable_dir / "o.csv"), capsys, "--out", "cannot write", tmp_path=tmp_path)
    assert not unwritable_dir.exists()


@pytest.mark.parametrize(
    "flag,make",
    [
        ("--html", lambda t: (t / "r.html").mkdir() or t / "r.html"),
        ("--summary", lambda t: (t / "s.json").mkdir() or t / "s.json"),
        ("--cache-dir", lambda t: (t / "c").write_text("x") and t / "c"),
        ("--image-cache", lambda t: (t / "f").write_text("x") and t / "f" / "images"),
    ],
)
def test_other_outputs_checked_first(env, tmp_path, capsys, no_models, flag, make):
    bad = make(tmp_path)
    _refused(env, _base(env, tmp_path / "o.csv") + [flag, str(bad)], capsys, flag, tmp_path=tmp_path)


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--items", "absent.csv", "no such file"),
        ("--ranker-checkpoint", "absent.ckpt", "no such file"),
        ("--recall-checkpoint", "absent.pth", "no such file"),
        ("--bert-dir", "absent_dir", "no such directory"),
        ("--arch", "absent.json", "no such file"),
    ],
)
def test_missing_inputs(env, tmp_path, capsys, no_models, flag, value, needle):
    argv = _base(env, tmp_path / "o.csv")
    if flag in argv:
        argv[argv.index(flag) + 1] = str(env["dir"] / value)
    else:
        argv += [flag, str(env["dir"] / value)]
    _refused(env, argv, capsys, flag, needle, tmp_path=tmp_path)


def test_tables_go_together(env, tmp_path, capsys, no_models):
    argv = _base(env, tmp_path / "o.csv") + ["--poi-pic-num", str(env["dir"] / "pic.npz")]
    _refused(env, argv, capsys, "all three", tmp_path=tmp_path)


def test_garbage_checkpoint(env, tmp_path, capsys):
    argv = _base(env, tmp_path / "o.csv")
    argv[argv.index("--ranker-checkpoint") + 1] = str(env["dir"] / "garbage.ckpt")
    _refused(env, argv, capsys, "garbage.ckpt", tmp_path=tmp_path)


def test_catalogue_without_usable_rows(env, tmp_path, capsys):
    cat = tmp_path / "empty.csv"
    cat.write_text("item_id,title,poi_names,image\n,t,,a.jpg\n", encoding="utf-8")
    argv = _base(env, tmp_path / "o.csv")
    argv[argv.index("--items") + 1] = str(cat)
    _refused(env, argv, capsys, "no usable rows", tmp_path=tmp_path)


def test_nan_poi_vectors_select_nothing(env, tmp_path, capsys):
    """A POI table with NaN vectors must not produce selections on NaN scores."""
    d = env["dir"]
    argv = _base(env, tmp_path / "o.csv") + [
        "--poi-pic-num",
        str(d / "pic.npz"),
        "--poi-image-vectors",
        str(d / "nan_img.npz"),
        "--poi-name-vectors",
        str(d / "name.npz"),
    ]
    line = _refused(env, argv, capsys, tmp_path=tmp_path)
    assert "nan" in line.lower() or "finite" in line.lower(), line


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--batch-size", "0", "positive integer"),
        ("--num-workers", "-1", "integer >= 0"),
        ("--recall-k", "0", "positive integer"),
        ("--actors", "0", "positive integer"),
        ("--gpus-per-actor", "-1", ">= 0"),
        ("--backend", "tensorrt", "invalid choice"),
    ],
)
def test_flag_values_are_argparse_errors(env, tmp_path, capsys, flag, value, needle):
    with pytest.raises(SystemExit) as e:
        select_images.main(_base(env, tmp_path / "o.csv") + [flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and needle in err
    assert not (tmp_path / "o.csv").exists()


def test_one_line_no_traceback_in_a_real_process(env, tmp_path):
    (tmp_path / "o.csv").mkdir()
    r = subprocess.run(
        [sys.executable, str(ROOT / "select_images.py"), *_base(env, tmp_path / "o.csv")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"select_images: error: --out {tmp_path / 'o.csv'}: is a directory, expected a file name"
    ]
    assert _files(tmp_path) == {"o.csv"}


def test_ray_out_directory_with_a_foreign_file(env, tmp_path, capsys):
    """A Parquet --out directory holding a file that is not one of our shards is refused
    before Ray starts, and the file is left alone."""
    pytest.importorskip("pyarrow", reason="pyarrow is not installed (requirements-ray.txt)")
    out = tmp_path / "sel"
    out.mkdir()
    (out / "part-000000.parquet").write_bytes(b"the user's own file")
    _refused(env, _base(env, out) + ["--ray"], capsys, "--out", "not a shard", tmp_path=tmp_path)
    assert (out / "part-000000.parquet").read_bytes() == b"the user's own file"


# --- an opt-in path without its package: one line naming the extra, before any work -----
@pytest.mark.parametrize(
    "module,extra,needed_by", [("ray", "ray", "--ray"), ("pyarrow", "parquet", "a Parquet --items")], ids=["ray", "pq"]
)
def test_missing_extra_is_one_line(env, tmp_path, capsys, monkeypatch, no_models, module, extra, needed_by):
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name.split(".")[0] == module else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    argv = _base(env, tmp_path / "o.csv")
    if module == "ray":
        argv.append("--ray")
    else:
        items = tmp_path / "items.parquet"
        items.write_bytes(b"PAR1")  # never read: the missing package is found first
        argv[argv.index("--items") + 1] = str(items)
    line = _refused(env, argv, capsys, f"{needed_by} needs the optional package {module}", tmp_path=tmp_path)
    assert f"[{extra}]" in line


# --- no output is an input or another output --------------------------------------------
@pytest.mark.parametrize(
    "flag,same_as",
    [("--out", "--items"), ("--summary", "--out"), ("--html", "--out"), ("--html", "--items"), ("--html", "--summary")],
)
def test_an_output_that_is_an_input_or_another_output(env, tmp_path, capsys, no_models, flag, same_as):
    argv = _base(env, tmp_path / "o.csv") + ["--summary", str(tmp_path / "s.json")]
    target = argv[argv.index(same_as) + 1]
    before = Path(target).read_bytes() if Path(target).exists() else None
    if flag in argv:
        argv[argv.index(flag) + 1] = target
    else:
        argv += [flag, target]
    line = _refused(env, argv, capsys, flag, "the same file as", same_as, tmp_path=tmp_path)
    assert "Traceback" not in line
    if before is not None:
        assert Path(target).read_bytes() == before


# --- a run's outputs are committed together, or not at all -------------------------------
def test_outputs_are_committed_together(env, tmp_path, capsys, monkeypatch):
    """The summary cannot be written (disk full): neither the CSV nor the page appears,
    and the previous outputs are kept as they were."""
    from utils.selection import run as run_module

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "o.csv").write_text("the previous run's rows\n")
    monkeypatch.setattr(run_module, "write_json", disk_full)
    argv = _base(env, tmp_path / "o.csv") + ["--html", str(tmp_path / "r.html")]
    _refused(env, argv, capsys, "--summary", "No space left on device", tmp_path=tmp_path)
    assert (tmp_path / "o.csv").read_text() == "the previous run's rows\n"


def test_file_size_limit_is_one_line_and_leaves_nothing(env, tmp_path):
    """A real process under a file-size limit the page exceeds: exit 2, one line naming
    --html, no output and no temporary file (the CSV, small enough, is not committed)."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    argv = _base(env, tmp_path / "o.csv") + ["--html", str(tmp_path / "r.html"), "--log-level", "ERROR"]
    r = subprocess.run(
        [sys.executable, str(ROOT / "select_images.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        preexec_fn=limit,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("select_images: error: --html "), err
    assert "File too large" in err[0]
    assert _files(tmp_path) == set()


# --- bad catalogue rows: one rule, refused unless --skip-bad-rows -------------------------
def _catalogue(env, path: Path, bad: bytes) -> Path:
    d = env["dir"]
    rows = [f"it0,红色方形,西湖,{d / '0_0.jpg'}\n".encode(), bad, f"it1,红色方形,,{d / '1_1.jpg'}\n".encode()]
    path.write_bytes(b"item_id,title,poi_names,image\n" + b"".join(rows))
    return path


@pytest.mark.parametrize(
    "bad,needle",
    [(b"it0,\xff\xfe\xfa,,x.jpg\n", "not UTF-8"), (b"it1,t,,\n", "empty image"), (b"it1,t\n", "2 fields")],
    ids=["bad-byte", "empty-image", "short"],
)
@pytest.mark.parametrize("ray", [False, True], ids=["local", "ray"])
def test_bad_rows_are_refused_by_default(env, tmp_path, capsys, no_models, bad, needle, ray):
    cat = _catalogue(env, tmp_path / "cat.csv", bad)
    argv = _base(env, tmp_path / "o.csv") + (["--ray"] if ray else [])
    argv[argv.index("--items") + 1] = str(cat)
    _refused(env, argv, capsys, f"{cat}:3: {needle}", "--skip-bad-rows", tmp_path=tmp_path)


def test_skip_bad_rows_counts_and_lists_them(env, tmp_path):
    cat = _catalogue(env, tmp_path / "cat.csv", b"it0,\xff\xfe\xfa,,x.jpg\n")
    argv = _base(env, tmp_path / "o.csv") + ["--skip-bad-rows"]
    argv[argv.index("--items") + 1] = str(cat)
    assert select_images.main(argv) == 0
    summary = json.loads((tmp_path / "o.csv.summary.json").read_text(encoding="utf-8"))
    assert summary["bad_rows"] == 1 and summary["candidates"] == 2
    assert summary["bad_row_list"] == [f"{cat}:3: not UTF-8 text (byte 0xff at column 5)"]
    with open(tmp_path / "o.csv", encoding="utf-8") as f:
        assert [r["line"] for r in csv.DictReader(f)] == ["2", "4"]
