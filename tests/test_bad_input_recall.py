"""Bad input to recall_infer.py and recall_eval.py (issue 14): each case gives exit status
2, ONE line naming the file / line / flag, no traceback, and leaves no file behind (no
``*.tmp<pid>``, no half-written output); output locations are checked before any model
is loaded."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import COLORS, solid_image, tiny_align, write_image

import recall_eval
import recall_infer
import utils.evaluation.recall as evaluation_recall
from models import recall as recall_pipeline
from models.checkpoint import save_align_checkpoint
from utils.formats.results import TOPK_HEADER, save_embeddings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(tmp_path_factory, bert_dir):
    d = tmp_path_factory.mktemp("bad_recall")
    rows = []
    for i, color in enumerate(list(COLORS)[:3]):
        poi = str(400 + i)
        for r in (1, 2):
            write_image(
                solid_image(COLORS[color], (60 + 9 * r, 48), None, seed=i * 3 + r), d / "images" / f"{poi}_{r}.jpg"
            )
            rows.append([poi, f"{color}色山", f"http://x.invalid/{poi}_{r}", r, 0, 0, 0])
    with open(d / "recall.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    save_align_checkpoint(tiny_align(bert_dir, seed=4), d / "align.pth")
    return {"dir": d, "csv": d / "recall.csv", "images": d / "images", "ckpt": d / "align.pth", "bert": bert_dir}


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def _no_leftovers(d: Path, before: set[str]) -> None:
    after = _files(d)
    assert after == before, f"files left behind: {sorted(after - before)}"
    assert not [p for p in after if ".tmp" in p]


def _one_line(err: str, prog: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def _infer_argv(env, out, *extra):
    return [
        "--csv",
        str(env["csv"]),
        "--image-dir",
        str(env["images"]),
        "--checkpoint",
        str(env["ckpt"]),
        "--bert-dir",
        str(env["bert"]),
        "--output",
        str(out),
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--no-progress",
        "--backend",
        "torch",
        *extra,
    ]


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model gets loaded: the checks must come first."""

    def refuse(*a, **kw):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(recall_pipeline, "build_recall_model", refuse)


def hide_transformers(monkeypatch):
    """``importlib.util.find_spec`` answers as if transformers were not installed."""
    real = importlib.util.find_spec

    def find_spec(name, *a, **kw):
        return None if name.split(".")[0] == "transformers" else real(name, *a, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_taiyi_without_transformers_names_the_extra_before_any_work(env, tmp_path, capsys, monkeypatch, no_model):
    hide_transformers(monkeypatch)
    monkeypatch.setattr(recall_infer, "run_recall", lambda *a, **kw: pytest.fail("work started"))
    files = ["--taiyi-text-dir", str(tmp_path), "--clip-dir", str(tmp_path)]
    argv = ["--csv", str(env["csv"]), "--image-dir", str(env["images"]), "--output", str(tmp_path / "top.csv")]
    before = _files(tmp_path)
    assert recall_infer.main([*argv, "--model", "taiyi", *files]) == 2
    line = _one_line(capsys.readouterr().err, "recall_infer")
    assert "--model taiyi needs the optional package transformers, which is not installed" in line
    assert "[taiyi]" in line
    _no_leftovers(tmp_path, before)


# ---------------------------------------------------------------------------
# recall_infer.py: output locations, before any work
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--output", "--full-output", "--missing-list", "--save-embeddings"])
def test_output_that_is_a_directory(env, tmp_path, capsys, no_model, flag):
    target = tmp_path / "x" / "out.csv"
    target.mkdir(parents=True)
    out = target if flag == "--output" else tmp_path / "top.csv"
    extra = [] if flag == "--output" else [flag, str(target)]
    before = _files(tmp_path)
    assert recall_infer.main(_infer_argv(env, out, *extra)) == 2
    line = _one_line(capsys.readouterr().err, "recall_infer")
    assert f"{flag} {target}: is a directory" in line
    _no_leftovers(tmp_path, before)


def test_output_under_a_plain_file_and_cache_dir_that_is_a_file(env, tmp_path, capsys, no_model):
    plain = tmp_path / "plain"
    plain.write_text("x")
    before = _files(tmp_path)
    assert recall_infer.main(_infer_argv(env, plain / "top.csv")) == 2
    assert f"{plain} is not a directory" in _one_line(capsys.readouterr().err, "recall_infer")
    assert recall_infer.main(_infer_argv(env, tmp_path / "top.csv", "--cache-dir", str(plain))) == 2
    assert f"--cache-dir {plain}: exists and is not a directory" in _one_line(capsys.readouterr().err, "recall_infer")
    _no_leftovers(tmp_path, before)


def test_unwritable_output_directory(env, tmp_path, capsys, no_model, unwritable_dir):
    assert recall_infer.main(_infer_argv(env, unwritable_dir / "top.csv")) == 2
    assert "cannot write in" in _one_line(capsys.readouterr().err, "recall_infer")
    assert not unwritable_dir.exists()


def test_output_that_would_overwrite_the_csv(env, tmp_path, capsys, no_model):
    assert recall_infer.main(_infer_argv(env, tmp_path / "top.csv", "--full-output", str(env["csv"]))) == 2
    assert "the same file as input --csv" in _one_line(capsys.readouterr().err, "recall_infer")


def test_output_that_would_overwrite_a_model_file(env, tmp_path, capsys, no_model):
    ckpt = tmp_path / "align.pth"
    ckpt.write_bytes(env["ckpt"].read_bytes())
    argv = _infer_argv(env, tmp_path / "top.csv", "--checkpoint", str(ckpt), "--full-output", str(ckpt))
    assert recall_infer.main(argv) == 2
    assert "the same file as input --checkpoint" in _one_line(capsys.readouterr().err, "recall_infer")
    assert ckpt.read_bytes() == env["ckpt"].read_bytes()


def test_directory_output_in_a_real_process_leaves_nothing(env, tmp_path):
    """The whole script as a user runs it: one line on stderr, status 2, nothing written."""
    out = tmp_path / "x" / "top.csv"
    out.mkdir(parents=True)
    before = _files(tmp_path)
    p = subprocess.run(
        [sys.executable, str(ROOT / "recall_infer.py"), *_infer_argv(env, out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert p.returncode == 2
    assert f"--output {out}: is a directory" in _one_line(p.stderr, "recall_infer")
    _no_leftovers(tmp_path, before)


# ---------------------------------------------------------------------------
# recall_infer.py: inputs and flags
# ---------------------------------------------------------------------------
def test_missing_inputs_are_named(env, tmp_path, capsys, no_model):
    argv = _infer_argv(env, tmp_path / "top.csv")
    for flag, bad in (
        ("--csv", tmp_path / "nope.csv"),
        ("--image-dir", tmp_path / "nodir"),
        ("--checkpoint", tmp_path / "nope.pth"),
        ("--bert-dir", tmp_path / "nobert"),
    ):
        a = list(argv)
        a[a.index(flag) + 1] = str(bad)
        assert recall_infer.main(a) == 2
        assert f"{flag} {bad}: no such" in _one_line(capsys.readouterr().err, "recall_infer")
    assert not (tmp_path / "top.csv").exists()


def test_non_utf8_csv_is_reported_at_its_line(env, tmp_path, capsys, no_model):
    bad = tmp_path / "bad.csv"
    good = env["csv"].read_bytes().splitlines(keepends=True)
    bad.write_bytes(b"".join(good[:2]) + b"401,\xff\xfe\xe4,http://x.invalid/a,9,0,0,0\n" + b"".join(good[2:]))
    a = _infer_argv(env, tmp_path / "top.csv")
    a[a.index("--csv") + 1] = str(bad)
    before = _files(tmp_path)
    assert recall_infer.main(a) == 2
    line = _one_line(capsys.readouterr().err, "recall_infer")
    assert f"{bad}:3: not UTF-8 text" in line and ":0:" not in line
    _no_leftovers(tmp_path, before)


@pytest.mark.parametrize(
    "flag,value,expected",
    [
        ("--batch-size", "0", "expected a positive integer, got '0'"),
        ("--num-workers", "-1", "expected an integer >= 0, got '-1'"),
        ("--topk", "0", "expected a positive integer, got '0'"),
        ("--backend", "gpu", "invalid choice: 'gpu'"),
    ],
)
def test_bad_numbers_are_argparse_errors(env, tmp_path, capsys, flag, value, expected):
    with pytest.raises(SystemExit) as e:
        recall_infer.main(_infer_argv(env, tmp_path / "top.csv", flag, value))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and expected in err and "Traceback" not in err
    assert not (tmp_path / "top.csv").exists()


@pytest.mark.parametrize(
    "text,expected",
    [
        ('{"text_layers": 1,', "arch.json:1: not valid JSON"),
        ('{"text_layer": 1}', "arch.json: not a valid architecture: unknown architecture fields"),
        ('{"embed_dim": "big"}', "arch.json: not a valid architecture: architecture field 'embed_dim'"),
        ("[1, 2]", "arch.json: not a valid architecture: expected a JSON object"),
    ],
)
def test_malformed_arch_json_names_the_file(env, tmp_path, capsys, text, expected):
    arch = tmp_path / "arch.json"
    arch.write_text(text, encoding="utf-8")
    assert recall_infer.main(_infer_argv(env, tmp_path / "top.csv", "--arch", str(arch))) == 2
    line = _one_line(capsys.readouterr().err, "recall_infer")
    assert expected in line and "recorded architecture" not in line  # the file at fault, not the checkpoint
    assert not (tmp_path / "top.csv").exists()


def test_checkpoint_with_foreign_keys_lists_them(env, tmp_path, capsys):
    sd = torch.load(env["ckpt"], weights_only=True)["state_dict"]
    sd = {("encoder." + k if k.startswith("text_model.") else k): v for k, v in sd.items()}
    bad = tmp_path / "renamed.pth"
    torch.save({"state_dict": sd}, bad)
    a = _infer_argv(env, tmp_path / "top.csv")
    a[a.index("--checkpoint") + 1] = str(bad)
    before = _files(tmp_path)
    assert recall_infer.main(a) == 2
    line = _one_line(capsys.readouterr().err, "recall_infer")
    assert f"{bad} does not match AlignModel" in line and "missing keys" in line
    assert "unexpected keys" in line and "encoder.text_model." in line
    _no_leftovers(tmp_path, before)


def test_truncated_checkpoint_is_named(env, tmp_path, capsys):
    bad = tmp_path / "cut.pth"
    bad.write_bytes(env["ckpt"].read_bytes()[:5000])
    a = _infer_argv(env, tmp_path / "top.csv")
    a[a.index("--checkpoint") + 1] = str(bad)
    assert recall_infer.main(a) == 2
    assert f"{bad}: cannot be read as a weights-only torch checkpoint" in _one_line(
        capsys.readouterr().err, "recall_infer"
    )


# ---------------------------------------------------------------------------
# recall_infer.py: weights, sizes, the embedding cache, writing the outputs
# ---------------------------------------------------------------------------
def _with_ckpt(env, out, ckpt, *extra):
    a = _infer_argv(env, out, *extra)
    a[a.index("--checkpoint") + 1] = str(ckpt)
    return a


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(env, tmp_path, capsys, bad):
    obj = torch.load(env["ckpt"], weights_only=True)
    obj["state_dict"]["image_hidden_layer.weight"][3, 1] = bad
    ckpt = tmp_path / "bad.pth"
    torch.save(obj, ckpt)
    before = _files(tmp_path)
    assert recall_infer.main(_with_ckpt(env, tmp_path / "top.csv", ckpt)) == 2
    line = _one_line(capsys.readouterr().err, "recall_infer")
    assert f"{ckpt}: tensor image_hidden_layer.weight holds NaN or infinite values" in line
    _no_leftovers(tmp_path, before)


def test_finite_weights_whose_sum_overflows_are_taken(env, tmp_path):
    """The finiteness test sums each tensor first: a sum that overflows to inf is not a bad weight."""
    obj = torch.load(env["ckpt"], weights_only=True)
    obj["state_dict"]["image_hidden_layer.weight"][:2, 0] = 3e38  # finite; their sum is not
    ckpt = tmp_path / "big.pth"
    torch.save(obj, ckpt)
    assert recall_infer.main(_with_ckpt(env, tmp_path / "top.csv", ckpt)) == 0


def test_non_finite_weights_of_the_ranker_head_are_refused(env, tmp_path):
    from fixtures import tiny_ranker

    from models.checkpoint import CheckpointError, load_ranker, save_ranker_checkpoint

    ranker = tiny_ranker(env["bert"], seed=2)
    with torch.no_grad():
        ranker.linear2.weight[0, 0] = float("nan")
    save_ranker_checkpoint(ranker, tmp_path / "r.ckpt")
    with pytest.raises(CheckpointError, match=r"r\.ckpt: tensor linear2\.weight holds NaN"):
        load_ranker(tmp_path / "r.ckpt", env["bert"])


def test_recorded_architecture_out_of_bounds(env, tmp_path, capsys):
    obj = torch.load(env["ckpt"], weights_only=True)
    obj["arch"]["embed_dim"] = 10**9
    ckpt = tmp_path / "huge.pth"
    torch.save(obj, ckpt)
    assert recall_infer.main(_with_ckpt(env, tmp_path / "top.csv", ckpt)) == 2
    line = _one_line(capsys.readouterr().err, "recall_infer")
    assert f"{ckpt}: its recorded architecture is not valid" in line and "'embed_dim' must be 1 to" in line


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"hidden_size": 10**9}, "config.json: hidden_size = 1000000000 is out of bounds"),
        ({"max_position_embeddings": 8}, "config.json: max_position_embeddings = 8, fewer than 50 tokens"),
        ("vocab", "vocab.txt: 1002"),
    ],
)
def test_sizes_that_do_not_fit_are_refused_before_the_model(env, tmp_path, capsys, change, expected):
    import shutil

    bert = tmp_path / "bert"
    shutil.copytree(env["bert"], bert)
    if change == "vocab":  # a vocab.txt longer than the checkpoint's (and config's) embedding table
        tokens = (bert / "vocab.txt").read_text(encoding="utf-8").splitlines()
        extra = [f"extra{i}" for i in range(1002 - len(tokens))]
        (bert / "vocab.txt").write_text("\n".join(tokens + extra) + "\n", encoding="utf-8")
    else:
        cfg = json.loads((bert / "config.json").read_text(encoding="utf-8"))
        (bert / "config.json").write_text(json.dumps({**cfg, **change}), encoding="utf-8")
    a = _infer_argv(env, tmp_path / "out" / "top.csv")
    a[a.index("--bert-dir") + 1] = str(bert)
    assert recall_infer.main(a) == 2
    assert expected in _one_line(capsys.readouterr().err, "recall_infer")
    assert not (tmp_path / "out").exists()


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _cache_vectors(cache_dir):
    import sqlite3

    db = sqlite3.connect(str(cache_dir / "embeddings.sqlite"))
    return db, db.execute("SELECT rowid, vec FROM vectors ORDER BY rowid").fetchall()


@pytest.mark.parametrize("damage", ["bit flip", "nan"])
def test_damaged_cache_vectors_are_encoded_again(env, tmp_path, caplog, damage):
    ref = tmp_path / "ref.csv"
    assert recall_infer.main(_infer_argv(env, ref, "--full-output", str(tmp_path / "ref.full.csv"))) == 0
    cache = tmp_path / "cache"
    assert recall_infer.main(_infer_argv(env, tmp_path / "a.csv", "--cache-dir", str(cache))) == 0
    db, rows = _cache_vectors(cache)
    for rowid, blob in rows[:2]:
        vec = np.frombuffer(blob, dtype=np.float32).copy()
        if damage == "nan":
            vec[5] = np.nan
        else:
            vec.view(np.uint32)[5] ^= 1 << 30  # an exponent bit: one huge value
        db.execute("UPDATE vectors SET vec = ? WHERE rowid = ?", (vec.tobytes(), rowid))
    db.commit()
    db.close()
    out = tmp_path / "b.csv"
    argv = _infer_argv(env, out, "--cache-dir", str(cache), "--full-output", str(tmp_path / "b.full.csv"))
    assert recall_infer.main(argv) == 0
    assert "2 vectors failed their checksum or are not finite" in caplog.text
    meta = json.loads(Path(f"{out}.meta.json").read_text(encoding="utf-8"))
    assert meta["images_encoded"] == 2 and meta["images_cached"] == 4
    # the same ranking and scores (the two re-encoded images went through a batch of their own)
    for got, want in ((out, ref), (tmp_path / "b.full.csv", tmp_path / "ref.full.csv")):
        g_rows, w_rows = _rows(got), _rows(want)
        assert [r[:-1] for r in g_rows] == [r[:-1] for r in w_rows]
        scores = [(float(a[-1]), float(b[-1])) for a, b in zip(g_rows, w_rows) if a[-1] != "score"]
        assert max(abs(x - y) for x, y in scores) < 1e-5
    _, repaired = _cache_vectors(cache)  # the damaged rows were replaced
    assert all(np.isfinite(np.frombuffer(b, dtype=np.float32)).all() for _, b in repaired)


def test_cache_of_the_first_format_is_still_read(env, tmp_path):
    """A cache written before vectors carried a checksum: its table has no crc column."""
    import sqlite3

    ref = tmp_path / "ref.csv"
    cache = tmp_path / "cache"
    assert recall_infer.main(_infer_argv(env, ref, "--cache-dir", str(cache))) == 0
    db = sqlite3.connect(str(cache / "embeddings.sqlite"))
    db.executescript(
        "CREATE TABLE old (ns TEXT, sha TEXT, ok INTEGER, vec BLOB, PRIMARY KEY (ns, sha));"
        "INSERT INTO old SELECT ns, sha, ok, vec FROM vectors; DROP TABLE vectors; ALTER TABLE old RENAME TO vectors;"
    )
    db.close()
    out = tmp_path / "again.csv"
    assert recall_infer.main(_infer_argv(env, out, "--cache-dir", str(cache))) == 0
    meta = json.loads(Path(f"{out}.meta.json").read_text(encoding="utf-8"))
    assert meta["images_encoded"] == 0 and meta["images_cached"] == 6
    assert out.read_bytes() == ref.read_bytes()


def test_a_failed_write_keeps_the_previous_outputs(env, tmp_path):
    """Disk full or a file-size limit while writing: one line, status 2, and every output
    of the previous run as it was (not a new top-k beside an old full file)."""
    import resource

    out, full = tmp_path / "top.csv", tmp_path / "full.csv"
    assert recall_infer.main(_infer_argv(env, out, "--full-output", str(full))) == 0
    files = [out, full, Path(f"{out}.meta.json")]
    before = {p: p.read_bytes() for p in files}
    limit = out.stat().st_size + 64  # the new top-k file fits, the full file does not
    assert full.stat().st_size > limit

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    argv = _infer_argv(env, out, "--full-output", str(full), "--topk", "1", "--log-level", "WARNING")
    p = subprocess.run(
        [sys.executable, str(ROOT / "recall_infer.py"), *argv],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=small_files,
    )
    assert p.returncode == 2
    line = _one_line(p.stderr, "recall_infer")
    assert f"--full-output {full}: cannot be written (File too large); the previous outputs are kept" in line
    assert {p_: p_.read_bytes() for p_ in files} == before
    assert not [q for q in tmp_path.iterdir() if ".tmp" in q.name or q.name.endswith(".new")]


# ---------------------------------------------------------------------------
# recall_eval.py
# ---------------------------------------------------------------------------
def _topk(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(TOPK_HEADER)
        w.writerows(rows)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "NaN"])
def test_eval_refuses_non_finite_scores(tmp_path, capsys, bad):
    res = tmp_path / "top.csv"
    _topk(res, [["1", "a", 1, "1_1.jpg", "0.9"], ["1", "a", 2, "2_1.jpg", bad]])
    before = _files(tmp_path)
    assert recall_eval.main(["--results", str(res), "--k", "1"]) == 2
    line = _one_line(capsys.readouterr().err, "recall_eval")
    assert f"{res}:3: score '{bad}' is not a finite number" in line
    _no_leftovers(tmp_path, before)  # no eval JSON


def test_eval_counts_duplicate_rows_once_with_a_warning(tmp_path, capsys, caplog):
    res = tmp_path / "top.csv"
    rows = [
        ["1", "a", 1, "2_1.jpg", "0.9"],
        ["1", "a", 2, "1_1.jpg", "0.8"],
        ["2", "b", 1, "1_1.jpg", "0.7"],
        ["2", "b", 2, "2_1.jpg", "0.6"],
    ]
    _topk(res, rows + [rows[0], rows[0]])
    assert recall_eval.main(["--results", str(res), "--k", "1", "2", "--bootstrap", "0"]) == 0
    assert "2 rows repeat an earlier (poi_id, image) pair (first: line 6" in caplog.text
    out = capsys.readouterr().out
    assert "recall@1: 0.0000 (0/2)" in out and "recall@2: 1.0000 (2/2)" in out


def test_eval_non_utf8_results_at_the_real_line(tmp_path, capsys):
    res = tmp_path / "full.csv"
    res.write_bytes(b"1,a,1_1.jpg,0.5\n1,a,1_2.jpg,0.4\n1,\xe9t\xe9,1_3.jpg,0.3\n")
    assert recall_eval.main(["--results", str(res)]) == 2
    assert f"{res}:3: not UTF-8 text" in _one_line(capsys.readouterr().err, "recall_eval")


def test_eval_outputs_checked_before_reading(tmp_path, capsys, monkeypatch):
    res = tmp_path / "top.csv"
    _topk(res, [["1", "a", 1, "1_1.jpg", "0.9"]])
    monkeypatch.setattr(
        evaluation_recall, "read_results", lambda p: pytest.fail("results read before the outputs were checked")
    )
    d = tmp_path / "j.json"
    d.mkdir()
    before = _files(tmp_path)
    assert recall_eval.main(["--results", str(res), "--k", "1", "--json", str(d)]) == 2
    assert f"--json {d}: is a directory" in _one_line(capsys.readouterr().err, "recall_eval")
    assert (
        recall_eval.main(
            ["--results", str(res), "--k", "1", "--html", str(tmp_path / "f" / "x.html"), "--json", str(res)]
        )
        == 2
    )
    assert "refusing to overwrite" in _one_line(capsys.readouterr().err, "recall_eval")
    assert recall_eval.main(["--results", str(tmp_path / "none.csv")]) == 2
    assert "--results" in _one_line(capsys.readouterr().err, "recall_eval")
    _no_leftovers(tmp_path, before)


def test_eval_bad_embeddings_file(tmp_path, capsys):
    bad = tmp_path / "e.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert recall_eval.main(["--embeddings", str(bad)]) == 2
    assert f"{bad}: not an embeddings file" in _one_line(capsys.readouterr().err, "recall_eval")
    nanf = tmp_path / "nan.npz"
    emb = np.ones((2, 4), dtype=np.float32)
    emb[1, 2] = np.nan
    save_embeddings(
        nanf,
        image_emb=emb,
        image_names=["1_1.jpg", "2_1.jpg"],
        image_ok=[True, True],
        text_emb=np.ones((1, 4), dtype=np.float32),
        poi_ids=["1"],
        poi_names=["a"],
        meta={},
    )
    assert recall_eval.main(["--embeddings", str(nanf)]) == 2
    assert f"{nanf}: image_emb holds NaN" in _one_line(capsys.readouterr().err, "recall_eval")


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--k", "0"], "argument --k: expected a positive integer"),
        (["--bootstrap", "-1"], "argument --bootstrap: expected an integer >= 0"),
    ],
)
def test_eval_bad_numbers(tmp_path, capsys, argv, expected):
    res = tmp_path / "top.csv"
    _topk(res, [["1", "a", 1, "1_1.jpg", "0.9"]])
    with pytest.raises(SystemExit) as e:
        recall_eval.main(["--results", str(res), *argv])
    assert e.value.code == 2 and expected in capsys.readouterr().err


def test_eval_outputs_never_overwrite_an_input(tmp_path, capsys):
    """--json / --html are refused when they name an input (compared resolved), the
    recall_infer.py sidecar read beside --results included, or each other."""
    res, other = tmp_path / "top.csv", tmp_path / "b.csv"
    _topk(res, [["1", "a", 1, "1_1.jpg", "0.9"]])
    _topk(other, [["1", "a", 1, "1_1.jpg", "0.9"]])
    meta = tmp_path / "top.csv.meta.json"
    meta.write_text('{"topk": 1}', encoding="utf-8")
    link = tmp_path / "same.csv"
    link.symlink_to(res)
    cases = [
        (["--results", str(res), "--json", str(meta)], "--json", "input --results (its .meta.json)"),
        (["--results", str(res), "--html", str(link)], "--html", "input --results"),
        (["--compare", str(other), str(res), "--json", str(other)], "--json", "input --compare A"),
        (["--results", str(res), "--json", str(tmp_path / "x"), "--html", str(tmp_path / "x")], "--html", "--json"),
    ]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for argv, flag, clash in cases:
        assert recall_eval.main(argv) == 2
        assert f"{flag} " in (line := _one_line(capsys.readouterr().err, "recall_eval")) and clash in line, line
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_eval_absurd_bootstrap_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    res = tmp_path / "top.csv"
    _topk(res, [["1", "a", 1, "1_1.jpg", "0.9"]])
    monkeypatch.setattr(evaluation_recall, "read_results", lambda p: pytest.fail("results read"))
    for argv in (["--results", str(res)], ["--compare", str(res), str(res)]):
        assert recall_eval.main([*argv, "--bootstrap", "1000000000000"]) == 2
        assert "--bootstrap 1000000000000: expected 0 to 1,000,000 draws" in _one_line(
            capsys.readouterr().err, "recall_eval"
        )
    assert [p.name for p in tmp_path.iterdir()] == ["top.csv"]
