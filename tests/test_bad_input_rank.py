"""Bad input to rank_eval.py, poi_tables.py and build_poi_tables.py (issue 14): for each
case the command, its exit status, the one-line message, and no leftover files."""

import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures import solid_image, tiny_align, tiny_ranker, write_image

import build_poi_tables
import models.engine.pairs as pairs
import poi_tables
import rank_eval
from models import RecallModel
from models.checkpoint import save_align_checkpoint, save_ranker_checkpoint
from utils.formats.poi import save_tables
from utils.formats.rows import RECORD_SEP

ROOT = Path(__file__).resolve().parent.parent
POIS = ["西湖", "灵隐寺", "古镇"]


def _record(item, ca, cb, pois="西湖,古镇", title="标题"):
    return RECORD_SEP.join(
        [
            item,
            f"http://x/{item}a",
            f"http://x/{item}b",
            ca,
            cb,
            title,
            "cate",
            f"http://o/{item}a",
            f"http://o/{item}b",
            pois,
        ]
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory, bert_dir):
    d = tmp_path_factory.mktemp("bad_rank")
    model = tiny_ranker(bert_dir, seed=2)
    save_ranker_checkpoint(model, d / "ranker.ckpt")
    save_align_checkpoint(tiny_align(bert_dir, seed=2), d / "align.pth")
    dim = model.align_model.arch.embed_dim
    rng = np.random.default_rng(0)
    np.save(d / "pic.npy", {n: [1, 2, 3] for n in POIS}, allow_pickle=True)
    save_tables({d / "img.npz": {n: rng.normal(size=dim) for n in POIS}})
    save_tables({d / "name.npz": {n: rng.normal(size=dim) for n in POIS}})
    imgs = d / "images"
    imgs.mkdir()
    for i, item in enumerate(("1", "2", "3")):
        for side in "ab":
            write_image(solid_image((40 * i, 200, 90 if side == "a" else 10), seed=i), imgs / f"{item}_{side}.png")
    (d / "val.csv").write_text(
        "\n".join([_record("1", "2", "1"), _record("2", "1", "2"), _record("3", "2", "1", pois="")]) + "\n",
        encoding="utf-8",
    )
    (d / "pois.csv").write_text("1,西湖,http://x/1,a,1,1,\n2,古镇,http://x/2,b,1,1,\n", encoding="utf-8")
    return dict(d=d, dim=dim, bert=bert_dir)


def rank_args(e, **over):
    d = e["d"]
    opts = {
        "--csv": d / "val.csv",
        "--image-dir": d / "images",
        "--checkpoint": d / "ranker.ckpt",
        "--bert-dir": e["bert"],
        "--poi-pic-num": d / "pic.npy",
        "--poi-image-vectors": d / "img.npz",
        "--poi-name-vectors": d / "name.npz",
        "--device": "cpu",
        "--num-workers": "0",
        "--no-progress": None,
        "--bootstrap": "0",
        "--backend": "torch",
    }
    opts.update(over)
    out = []
    for k, v in opts.items():
        if v is False:
            continue
        out += [k] if v is None else [k, str(v)]
    return out


def tree(d: Path) -> set:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def one_error_line(capsys, prog: str) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: ")
    return err[0]


def expect_error(capsys, main, argv, prog, *fragments, root: Path):
    before = tree(root)
    assert main(argv) == 2
    line = one_error_line(capsys, prog)
    for f in fragments:
        assert f in line, line
    assert tree(root) == before, "files left behind"
    return line


# ---------------------------------------------------------------------------
# rank_eval.py
# ---------------------------------------------------------------------------
def test_output_checked_before_any_work(env, tmp_path, capsys):
    (tmp_path / "out.csv").mkdir()
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    # output is a directory: reported before the (broken) checkpoint is ever read
    expect_error(
        capsys,
        rank_eval.main,
        rank_args(env, **{"--output": tmp_path / "out.csv", "--checkpoint": garbage}),
        "rank_eval",
        "--output",
        "is a directory",
        root=tmp_path,
    )
    (tmp_path / "plain").write_text("x")
    expect_error(
        capsys,
        rank_eval.main,
        rank_args(env, **{"--metrics": tmp_path / "plain" / "m.json"}),
        "rank_eval",
        "--metrics",
        "is not a directory",
        root=tmp_path,
    )
    expect_error(
        capsys,
        rank_eval.main,
        rank_args(env, **{"--output": tmp_path / "same", "--metrics": tmp_path / "same"}),
        "rank_eval",
        "same file",
        root=tmp_path,
    )
    expect_error(
        capsys,
        rank_eval.main,
        rank_args(env, **{"--cache-dir": tmp_path / "plain"}),
        "rank_eval",
        "--cache-dir",
        "not a directory",
        root=tmp_path,
    )


def test_unwritable_output_dir(env, tmp_path, capsys, unwritable_dir):
    expect_error(
        capsys,
        rank_eval.main,
        rank_args(env, **{"--output": unwritable_dir / "s.csv"}),
        "rank_eval",
        "--output",
        "cannot write",
        root=tmp_path,
    )
    assert not unwritable_dir.exists()


def test_missing_inputs(env, tmp_path, capsys):
    for opt in ("--csv", "--poi-pic-num", "--checkpoint", "--align-checkpoint"):
        expect_error(
            capsys,
            rank_eval.main,
            rank_args(env, **{opt: tmp_path / "absent"}),
            "rank_eval",
            opt,
            "absent",
            "no such file",
            root=tmp_path,
        )
    expect_error(
        capsys,
        rank_eval.main,
        rank_args(env, **{"--image-dir": tmp_path / "nodir"}),
        "rank_eval",
        "--image-dir",
        "no such directory",
        root=tmp_path,
    )
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    expect_error(
        capsys,
        rank_eval.main,
        rank_args(env, **{"--checkpoint": garbage, "--output": tmp_path / "s.csv"}),
        "rank_eval",
        "garbage.ckpt",
        root=tmp_path,
    )


@pytest.mark.parametrize(
    "ca,cb,field,value",
    [
        ("nan", "1", "ctr_a", "nan"),
        ("2", "inf", "ctr_b", "inf"),
        ("-inf", "1", "ctr_a", "-inf"),
        ("2", "NaN", "ctr_b", "nan"),
    ],
)
def test_non_finite_ctr_is_an_error_naming_the_line(env, tmp_path, capsys, ca, cb, field, value):
    csv_path = tmp_path / "val.csv"
    csv_path.write_text("\n".join([_record("1", "2", "1"), _record("2", ca, cb)]) + "\n", encoding="utf-8")
    expect_error(
        capsys,
        rank_eval.main,
        rank_args(env, **{"--csv": csv_path, "--output": tmp_path / "s.csv"}),
        "rank_eval",
        f"{csv_path}:2: {field}: {value} is not a finite number",
        root=tmp_path,
    )


def test_non_finite_ctr_subprocess_no_traceback(env, tmp_path):
    csv_path = tmp_path / "val.csv"
    csv_path.write_text(_record("1", "nan", "1") + "\n", encoding="utf-8")
    before = tree(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "rank_eval.py"),
            *rank_args(env, **{"--csv": csv_path, "--output": tmp_path / "s.csv"}),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert errors == [f"rank_eval: error: {csv_path}:1: ctr_a: nan is not a finite number"]
    assert tree(tmp_path) == before


def test_nan_poi_vectors_fail_before_any_scoring(env, tmp_path, capsys, monkeypatch):
    bad = {n: np.ones(env["dim"], dtype=np.float32) for n in POIS}
    bad["古镇"][3] = np.nan
    np.save(tmp_path / "img_nan.npy", bad, allow_pickle=True)

    def never(*a, **k):
        raise AssertionError("encoding started")

    monkeypatch.setattr(pairs, "encode_pair_images", never)
    monkeypatch.setattr(pairs, "load_ranker_model", never)  # the tables are checked first
    expect_error(
        capsys,
        rank_eval.main,
        rank_args(
            env,
            **{
                "--poi-image-vectors": tmp_path / "img_nan.npy",
                "--output": tmp_path / "s.csv",
                "--metrics": tmp_path / "m.json",
            },
        ),
        "rank_eval",
        "--poi-image-vectors",
        "img_nan.npy",
        "'古镇' holds NaN",
        root=tmp_path,
    )
    expect_error(
        capsys,
        rank_eval.main,
        rank_args(env, **{"--trust-pickle": None, "--poi-name-vectors": tmp_path / "img_nan.npy"}),
        "rank_eval",
        "--poi-name-vectors",
        "holds NaN",
        root=tmp_path,
    )


def test_hostile_table_fails_fast(env, tmp_path, capsys):
    x = [0.5] * 10
    for _ in range(9):
        x = [x] * 10
    np.save(tmp_path / "bomb.npy", {"西湖": x}, allow_pickle=True)
    t0 = time.perf_counter()
    expect_error(
        capsys,
        rank_eval.main,
        rank_args(env, **{"--poi-name-vectors": tmp_path / "bomb.npy"}),
        "rank_eval",
        "--poi-name-vectors",
        "bomb.npy",
        "nested more than",
        root=tmp_path,
    )
    assert time.perf_counter() - t0 < 5


def test_wrong_table_shapes(env, tmp_path, capsys):
    np.save(tmp_path / "pic4.npy", {"西湖": [1, 2, 3, 4]}, allow_pickle=True)
    expect_error(
        capsys,
        rank_eval.main,
        rank_args(env, **{"--poi-pic-num": tmp_path / "pic4.npy"}),
        "rank_eval",
        "--poi-pic-num",
        "'西湖' has 4 values",
        root=tmp_path,
    )
    save_tables({tmp_path / "wide.npz": {"西湖": np.ones(env["dim"] + 1)}})
    expect_error(
        capsys,
        rank_eval.main,
        rank_args(env, **{"--poi-image-vectors": tmp_path / "wide.npz"}),
        "rank_eval",
        "--poi-image-vectors",
        f"{env['dim'] + 1} values",
        root=tmp_path,
    )


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--batch-size", "0"),
        ("--num-workers", "-1"),
        ("--head-batch-size", "0"),
        ("--text-batch-size", "-3"),
        ("--limit", "0"),
        ("--bootstrap", "-1"),
        ("--backend", "tensorrt"),
    ],
)
def test_bad_numbers_are_argparse_errors(env, tmp_path, capsys, flag, value):
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as e:
        rank_eval.main(rank_args(env, **{flag: value, "--output": tmp_path / "s.csv"}))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err
    assert tree(tmp_path) == before


def test_ctrl_c_is_one_line_and_130(env, tmp_path, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pairs, "encode_pair_images", interrupt)
    before = tree(tmp_path)
    assert rank_eval.main(rank_args(env, **{"--output": tmp_path / "s.csv"})) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["rank_eval: interrupted"]
    assert tree(tmp_path) == before


def test_duplicate_rows_warn_and_count_once(env, tmp_path, capsys, caplog):
    csv_path = tmp_path / "val.csv"
    rows = [_record("1", "2", "1"), _record("2", "1", "2"), _record("1", "2", "1"), _record("2", "2", "1")]
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    met = tmp_path / "m.json"
    assert rank_eval.main(rank_args(env, **{"--csv": csv_path, "--metrics": met})) == 0
    m = json.loads(met.read_text(encoding="utf-8"))
    assert m["pairs_scored"] == m["pairs_in_csv"] == 2 and m["duplicate_rows"] == 2
    warned = [r.getMessage() for r in caplog.records if "repeats line" in r.getMessage()]
    assert len(warned) == 2 and f"{csv_path}:3: item_id 1 repeats line 1" in warned[0]
    assert "with other values" in warned[1]
    assert "2 repeated item_ids left out" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "val.csv"]


def test_bad_rows_are_refused_unless_skipped(env, tmp_path, capsys):
    """The one bad-row rule: a row that cannot be read stops the run (exit 2, one line
    naming file and line, nothing written); --skip-bad-rows leaves it out and counts it."""
    csv_path = tmp_path / "val.csv"
    rows = [_record("1", "2", "1"), "only$record$three$record$fields", _record("2", "1", "2")]
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out, met = tmp_path / "s.csv", tmp_path / "m.json"
    argv = rank_args(env, **{"--csv": csv_path, "--output": out, "--metrics": met})
    expect_error(capsys, rank_eval.main, argv, "rank_eval", f"{csv_path}:2: expected 10 fields", "--skip-bad-rows",
                 root=tmp_path)  # fmt: skip
    assert rank_eval.main([*argv, "--skip-bad-rows"]) == 0
    m = json.loads(met.read_text(encoding="utf-8"))
    assert m["bad_rows"] == 1 and m["pairs_scored"] == m["pairs_in_csv"] == 2
    assert "1 bad rows left out" in capsys.readouterr().out


@pytest.mark.parametrize(
    "over,clash",
    [
        ({"--output": "val.csv"}, "--output"),
        ({"--metrics": "ranker.ckpt"}, "--metrics"),
        ({"--output": "img.npz", "--metrics": "m.json"}, "--output"),
        ({"--metrics": "pic.npy"}, "--metrics"),
    ],
)
def test_outputs_never_overwrite_an_input(env, tmp_path, capsys, over, clash):
    """Every input file (CSV, checkpoint, POI tables) is refused as --output / --metrics,
    compared resolved (here through a symbolic link to the inputs' folder)."""
    link = tmp_path / "inputs"
    link.symlink_to(env["d"], target_is_directory=True)
    files = {p.name: p.read_bytes() for p in env["d"].iterdir() if p.is_file()}
    argv = rank_args(env, **{k: link / v for k, v in over.items()})
    expect_error(capsys, rank_eval.main, argv, "rank_eval", f"{clash} {link}", "the same file as input", root=tmp_path)
    assert {p.name: p.read_bytes() for p in env["d"].iterdir() if p.is_file()} == files


def test_absurd_bootstrap_is_refused_before_any_work(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pairs, "read_pairs", lambda *a: pytest.fail("the CSV was read"))
    argv = rank_args(env, **{"--bootstrap": "1000000000000", "--metrics": tmp_path / "m.json"})
    expect_error(capsys, rank_eval.main, argv, "rank_eval", "--bootstrap 1000000000000", "1,000,000", root=tmp_path)


def test_outputs_are_committed_together(env, tmp_path):
    """A file-size limit hit while writing --metrics (after --output was written) is one
    line and exit 2, and both previous outputs stay as they were, no temporary file left."""
    out, met = tmp_path / "s.csv", tmp_path / "m.json"
    assert rank_eval.main(rank_args(env, **{"--output": out, "--metrics": met})) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert len(before[out.name]) < 400 < len(before[met.name])

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (400, 400))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing

    argv = rank_args(env, **{"--output": out, "--metrics": met, "--limit": "2"})
    proc = subprocess.run([sys.executable, str(ROOT / "rank_eval.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, preexec_fn=limit_file_size)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert errors == [f"rank_eval: error: {met}: cannot be written (File too large); the previous outputs are kept"]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ---------------------------------------------------------------------------
# poi_tables.py
# ---------------------------------------------------------------------------
def test_poi_tables_bad_input(env, tmp_path, capsys):
    src = env["d"] / "pic.npy"
    (tmp_path / "out.npz").mkdir()
    expect_error(
        capsys,
        poi_tables.main,
        ["convert", str(src), str(tmp_path / "out.npz")],
        "poi_tables",
        "OUT",
        "is a directory",
        root=tmp_path,
    )
    expect_error(
        capsys,
        poi_tables.main,
        ["convert", str(src), str(tmp_path / "out.txt")],
        "poi_tables",
        "must end in .npz",
        root=tmp_path,
    )
    expect_error(
        capsys,
        poi_tables.main,
        ["convert", str(tmp_path / "absent.npy"), str(tmp_path / "o.npz")],
        "poi_tables",
        "absent.npy",
        "no such file",
        root=tmp_path,
    )
    expect_error(
        capsys,
        poi_tables.main,
        ["info", str(tmp_path / "absent.npy")],
        "poi_tables",
        "absent.npy",
        "no such file",
        root=tmp_path,
    )
    np.save(tmp_path / "ragged.npy", {"a": [1.0, 2.0], "b": [1.0]}, allow_pickle=True)
    expect_error(
        capsys,
        poi_tables.main,
        ["convert", str(tmp_path / "ragged.npy"), str(tmp_path / "r.npz")],
        "poi_tables",
        "'b' has 1 numbers",
        root=tmp_path,
    )
    x = [0.5] * 10
    for _ in range(9):
        x = [x] * 10
    np.save(tmp_path / "bomb.npy", {"x": x}, allow_pickle=True)
    expect_error(
        capsys,
        poi_tables.main,
        ["info", str(tmp_path / "bomb.npy")],
        "poi_tables",
        "bomb.npy",
        "nested more than",
        root=tmp_path,
    )


def test_poi_tables_ctrl_c(env, tmp_path, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(poi_tables, "load_poi_table", interrupt)
    assert poi_tables.main(["convert", str(env["d"] / "pic.npy"), str(tmp_path / "o.npz")]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["poi_tables: interrupted"]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# build_poi_tables.py
# ---------------------------------------------------------------------------
def build_args(env, tmp_path, **over):
    d = env["d"]
    opts = {
        "--csv": d / "pois.csv",
        "--image-dir": d / "images",
        "--checkpoint": d / "align.pth",
        "--bert-dir": env["bert"],
        "--out-image-vectors": tmp_path / "img.npz",
        "--out-name-vectors": tmp_path / "name.npz",
        "--device": "cpu",
        "--num-workers": "0",
        "--no-progress": None,
        "--backend": "torch",
    }
    opts.update(over)
    return [x for k, v in opts.items() for x in ([k] if v is None else [k, str(v)])]


def test_build_poi_tables_bad_input(env, tmp_path, capsys):
    (tmp_path / "plain").write_text("x")
    expect_error(
        capsys,
        build_poi_tables.main,
        build_args(env, tmp_path, **{"--out-name-vectors": tmp_path / "plain" / "n.npz"}),
        "build_poi_tables",
        "--out-name-vectors",
        "is not a directory",
        root=tmp_path,
    )
    (tmp_path / "dir.npz").mkdir()
    expect_error(
        capsys,
        build_poi_tables.main,
        build_args(env, tmp_path, **{"--out-image-vectors": tmp_path / "dir.npz"}),
        "build_poi_tables",
        "--out-image-vectors",
        "is a directory",
        root=tmp_path,
    )
    expect_error(
        capsys,
        build_poi_tables.main,
        build_args(
            env, tmp_path, **{"--out-image-vectors": tmp_path / "same.npz", "--out-name-vectors": tmp_path / "same.npz"}
        ),
        "build_poi_tables",
        "same file",
        root=tmp_path,
    )
    expect_error(
        capsys,
        build_poi_tables.main,
        build_args(env, tmp_path, **{"--csv": tmp_path / "absent.csv"}),
        "build_poi_tables",
        "--csv",
        "no such file",
        root=tmp_path,
    )
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"junk")
    expect_error(
        capsys,
        build_poi_tables.main,
        build_args(env, tmp_path, **{"--checkpoint": garbage}),
        "build_poi_tables",
        "garbage.pth",
        root=tmp_path,
    )


@pytest.mark.parametrize(
    "flag,value", [("--batch-size", "0"), ("--num-workers", "-1"), ("--text-batch-size", "0"), ("--backend", "x")]
)
def test_build_poi_tables_bad_numbers(env, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        build_poi_tables.main(build_args(env, tmp_path, **{flag: value}))
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_build_poi_tables_ctrl_c(env, tmp_path, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(RecallModel, "encode_images", interrupt)
    assert build_poi_tables.main(build_args(env, tmp_path)) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["build_poi_tables: interrupted"]
    assert list(tmp_path.iterdir()) == []
