"""reproduce.py end to end against a local HTTP mirror on 127.0.0.1.

The test builds a complete small world and serves it with the manifest's layout:
the two CSVs in the published formats (6 POIs x 3 images, 8 ranking pairs) whose image
URLs point at the same server (one recall image and one durable ranking copy are gone:
404), generated images, a recall and a ranker checkpoint in the authors' formats
(randomly initialised tiny models, so ``--arch`` passes through; the ranker's
``.arch.json`` sidecar is not in the manifest and does not come through the mirror),
POI tables as pickled dicts (``np.save`` of a dict), and a bert config + vocab. A test
manifest lists the same assets with this world's sha256.

Runs: a first run goes through every step and prints the table; a second run skips
every step with no request to the server; a removed image reruns exactly the steps
that depend on it; a corrupted asset stops the run (checksum, kept aside).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import TINY_ARCH, make_bert_dir, solid_image, tiny_align, tiny_ranker, write_image
from local_server import LocalServer

import reproduce
from models.checkpoint import save_align_checkpoint, save_ranker_checkpoint
from utils.fetch.assets import DEFAULT_MANIFEST, load_manifest
from utils.reproduction import results_table

POIS = [
    ("101", "红色圆形", "红", "圆"),
    ("102", "绿色方形", "绿", "方"),
    ("103", "蓝色圆形", "蓝", "圆"),
    ("104", "黄色方形", "黄", "方"),
    ("105", "紫色圆形", "紫", "圆"),
    ("106", "橙色方形", "橙", None),
]
POI_TABLE_NAMES = ["西湖", "北京", "古镇", "山海"]
GONE_RECALL = "/img/recall/106_3.jpg"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_world(mirror: Path, srv: LocalServer, base: Path) -> tuple[Path, Path]:
    """Write the mirror tree; return (test manifest, arch file)."""
    paths = {a.name: a.path for a in load_manifest(DEFAULT_MANIFEST)}
    u = srv.url
    # recall set: 6 POIs x 3 images, one of them gone from the server
    lines = []
    for i, (pid, name, color, shape) in enumerate(POIS):
        for r in (1, 2, 3):
            rel = f"/img/recall/{pid}_{r}.jpg"
            if rel != GONE_RECALL:
                write_image(solid_image(color_of(color), shape=shape, seed=10 * i + r), mirror / rel[1:])
            lines.append(f"{pid},{name},{u(rel)},{r},96,64,")
    (mirror / paths["recall_csv"]).parent.mkdir(parents=True, exist_ok=True)
    (mirror / paths["recall_csv"]).write_text("\n".join(lines) + "\n", encoding="utf-8")
    # ranking val set: 8 pairs; even items have a durable copy that is gone (falls back)
    sep, recs = "$record$", []
    colors = ["红", "绿", "蓝", "黄", "紫", "橙", "黑", "白"]
    for k in range(8):
        item = f"9{k:02d}"
        a, b = f"/img/rank/{item}_a.jpg", f"/img/rank/{item}_b.jpg"
        write_image(solid_image(color_of(colors[k]), seed=100 + k), mirror / a[1:])
        write_image(solid_image(color_of(colors[(k + 3) % 8]), shape="圆", seed=200 + k), mirror / b[1:])
        oss_a = u(f"/gone/{item}_a.jpg") if k % 2 == 0 else ""
        pois = ",".join(POI_TABLE_NAMES[: k % 4]) if k % 4 else ""
        ctr_a, ctr_b = (2, 1) if k % 3 == 0 else (1, 2)
        recs.append(sep.join([item, u(a), u(b), str(ctr_a), str(ctr_b), f"{colors[k]}色古镇", "旅游", oss_a, "", pois]))
    (mirror / paths["rank_val_csv"]).write_text("\n".join(recs) + "\n", encoding="utf-8")
    # POI tables: pickled dicts through np.save
    rng = np.random.default_rng(0)
    dim = TINY_ARCH.embed_dim
    unit = lambda: (lambda v: v / np.linalg.norm(v))(rng.normal(size=dim).astype(np.float32))  # noqa: E731
    tables = {
        "poi_pic_num": {n: [i, 2 * i, 1] for i, n in enumerate(POI_TABLE_NAMES)},
        "poi_image_vectors": {n: unit() for n in POI_TABLE_NAMES},
        "poi_name_vectors": {n: unit() for n in POI_TABLE_NAMES[:3]},  # one name unknown
    }
    for name, table in tables.items():
        p = mirror / paths[name]
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            np.save(f, table, allow_pickle=True)
    # bert files and the two checkpoints in the authors' formats
    bert = make_bert_dir(mirror / Path(paths["bert_vocab"]).parent)
    (mirror / paths["align_weights"]).parent.mkdir(parents=True, exist_ok=True)
    save_align_checkpoint(tiny_align(bert, seed=1), mirror / paths["align_weights"])
    save_ranker_checkpoint(tiny_ranker(bert, seed=2), mirror / paths["ranker_weights"])
    assert (mirror / (paths["ranker_weights"] + ".arch.json")).exists()  # not in the manifest
    arch = base / "tiny_arch.json"
    arch.write_text(json.dumps(dataclasses.asdict(TINY_ARCH)), encoding="utf-8")
    # the test manifest: the project's, with this world's sha256 where the real one is known
    doc = json.loads(Path(DEFAULT_MANIFEST).read_text(encoding="utf-8"))
    for a in doc["assets"]:
        f = mirror / a["path"]
        a["sha256"] = sha(f) if a["sha256"] and f.exists() else None
    manifest = base / "test-assets.json"
    manifest.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return manifest, arch


def color_of(c):
    from fixtures import COLORS

    return COLORS[c]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("world")
    mirror = base / "mirror"
    srv = LocalServer(directory=mirror).start()
    manifest, arch = build_world(mirror, srv, base)
    yield {"srv": srv, "base": base, "manifest": manifest, "arch": arch, "mirror": mirror}
    srv.stop()


def argv(w, dest: Path, out: Path, *extra) -> list[str]:
    return [
        "--mirror",
        w["srv"].base_url,
        "--manifest",
        str(w["manifest"]),
        "--dest",
        str(dest),
        "--out-dir",
        str(out),
        "--device",
        "cpu",
        "--arch",
        str(w["arch"]),
        "--num-workers",
        "0",
        "--workers",
        "4",
        "--no-progress",
        "--no-html",
        *extra,
    ]


def table_value(text: str, metric: str) -> list[str]:
    m = re.search(rf"^\| {re.escape(metric)}\s*\|(.*)\|\s*$", text, re.M)
    assert m, f"no row {metric!r} in:\n{text}"
    return [c.strip() for c in m.group(1).split("|")]


def test_full_run_then_everything_skipped_then_partial_rerun(world, capsys):
    srv, base = world["srv"], world["base"]
    dest, out = base / "dest", base / "out"
    torch.set_num_threads(2)

    # 1. first run: every step runs, table printed
    assert reproduce.main(argv(world, dest, out)) == 0
    text = capsys.readouterr().out
    for step in reproduce.STEPS:
        assert f"step {step}: running" in text and f"step {step}: done" in text
    assert srv.count(GONE_RECALL) >= 1
    rec = json.loads((out / "recall" / "metrics.json").read_text())
    rank = json.loads((out / "rank" / "metrics.json").read_text())
    assert rec["n_pois"] == 6 and rank["pairs_scored"] == 8
    paper, ours, diff = table_value(text, "recall@5")
    ours_r5 = ours
    assert paper == "0.7880" and float(ours) == pytest.approx(rec["recall"]["5"], abs=1e-4)
    assert float(diff) == pytest.approx(rec["recall"]["5"] - 0.788, abs=1e-4)
    paper, ours, _ = table_value(text, "ranking accuracy")
    assert paper == "0.6520" and float(ours) == pytest.approx(rank["accuracy"], abs=1e-4)
    for metric in ("recall@1", "recall@10", "ranking ROC-AUC", "ranking log loss"):
        assert table_value(text, metric)[0] == "-"
    assert "recall images present / missing: 17 / 1" in text
    assert "rank images present / missing: 16 / 0" in text
    results = json.loads((out / "results.json").read_text())
    assert {r["metric"] for r in results["table"]} >= {"recall@5", "ranking accuracy", "ranking ROC-AUC"}
    assert table_value((out / "results.md").read_text(), "recall@5")[:2] == ["0.7880", ours_r5]
    assert (dest / "assets/weights/align_model.pth").is_file()
    assert not (dest / "assets/weights/shoucai_siamese_train_concat_poi_020_0.6520.ckpt.arch.json").exists()
    assert len(list((dest / "data/images/recall").glob("*.jpg"))) == 17

    # 2. second run: every step skipped, no request at all
    srv.reset_counts()
    assert reproduce.main(argv(world, dest, out)) == 0
    text = capsys.readouterr().out
    assert srv.total_requests == 0, srv.log
    for step in reproduce.STEPS:
        assert f"step {step}: skipped" in text
    assert "running" not in text
    assert table_value(text, "recall@5")[1] == f"{rec['recall']['5']:.4f}"
    assert "skipped" in (out / "reproduce.log").read_text()

    # 3. a ranking image removed by hand: a done step sees an image folder through the manifest
    # its download wrote, not file by file (that is --force's job); forced, rank-images fetches
    # just that image, rank-eval reruns, the rest skip
    (dest / "data/images/rank/903_b.jpg").unlink()
    srv.reset_counts()
    assert reproduce.main(argv(world, dest, out)) == 0
    assert srv.total_requests == 0 and "running" not in capsys.readouterr().out
    assert reproduce.main(argv(world, dest, out, "--force", "rank-images,rank-eval")) == 0
    text = capsys.readouterr().out
    assert [p for (_, p, _) in srv.log] == ["/img/rank/903_b.jpg"]
    for step in ("assets", "recall-images", "recall-infer", "recall-eval"):
        assert f"step {step}: skipped" in text
    assert "step rank-images: running (--force)" in text
    assert "step rank-eval: running (--force)" in text
    assert "rank images present / missing: 16 / 0" in text

    # 4. a weight file truncated by hand: the step that reads it reruns (and says why) instead of
    # reporting "done", and the truncated checkpoint is refused, naming the file; restored, the
    # step reruns and recall-eval, given the same top-10 again, stays done
    weights = dest / "assets/weights/align_model.pth"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    assert reproduce.main(argv(world, dest, out)) == 1
    cap = capsys.readouterr()
    assert "step recall-infer: running (input changed: checkpoint)" in cap.out
    assert "step recall-infer: FAILED (exit status 2)" in cap.err and str(weights) in cap.err
    assert "recall-eval" not in cap.out + cap.err
    weights.write_bytes(good)
    assert reproduce.main(argv(world, dest, out)) == 0
    text = capsys.readouterr().out
    assert "step recall-infer: running (not done)" in text and "step recall-eval: skipped" in text


def test_recall_backend_onnx_gives_the_same_figures(world, capsys):
    """--recall-backend onnx (the deprecated alias of --backend) reruns recall-infer (forced)
    with ONNX Runtime: same top-10."""
    pytest.importorskip("onnxruntime")
    base = world["base"]
    dest, out = base / "dest", base / "out"
    if not (out / "recall" / "top10.csv").is_file():
        pytest.skip("needs the first test's run")
    before = (out / "recall" / "top10.csv").read_text().splitlines()
    args = argv(world, dest, out, "--steps", "recall-infer", "--force", "recall-infer", "--recall-backend", "onnx")
    assert reproduce.main(args) == 0
    capsys.readouterr()
    meta = json.loads((out / "recall" / "top10.csv.meta.json").read_text())
    assert meta["image_backend"] == "onnx"
    after = (out / "recall" / "top10.csv").read_text().splitlines()
    assert len(after) == len(before)
    for a, b in zip(before[1:], after[1:]):
        *ka, sa = a.rsplit(",", 1)
        *kb, sb = b.rsplit(",", 1)
        assert ka == kb and float(sa) == pytest.approx(float(sb), abs=1e-5)


def test_corrupted_asset_stops_the_run(world, capsys):
    srv, base = world["srv"], world["base"]
    rel = "/" + next(a.path for a in load_manifest(DEFAULT_MANIFEST) if a.name == "rank_val_csv")
    srv.add(rel, b"1$record$not the file we published\n")
    try:
        srv.reset_counts()
        dest = base / "dest-bad"
        assert reproduce.main(argv(world, dest, base / "out-bad")) == 1
    finally:
        srv.remove(rel)
    cap = capsys.readouterr()
    assert "rank_val_csv: checksum mismatch" in cap.err
    assert "step assets: FAILED" in cap.err
    bad = dest / (rel[1:] + ".bad-sha256")
    assert bad.read_bytes() == b"1$record$not the file we published\n"
    assert not (dest / rel[1:]).exists()
    assert not [p for (_, p, _) in srv.log if p.startswith("/img/")]  # nothing ran after it
    assert "recall-images" not in cap.out


def test_step_without_its_inputs_and_cuda_without_gpu(world, capsys, tmp_path):
    assert reproduce.main(argv(world, tmp_path / "d", tmp_path / "o", "--steps", "recall-infer")) == 1
    err = capsys.readouterr().err
    assert "step recall-infer: cannot run, missing input: csv" in err
    assert "--steps assets,recall-images" in err
    if not torch.cuda.is_available():
        args = argv(world, tmp_path / "d", tmp_path / "o")
        args[args.index("--device") + 1] = "cuda"
        assert reproduce.main(args) == 2
        assert "no CUDA device is available" in capsys.readouterr().err


def test_max_failures_stops_when_too_many_images_are_gone(world, capsys, tmp_path):
    dest, out = tmp_path / "d", tmp_path / "o"
    shutil.copytree(world["base"] / "dest" / "data", dest / "data", ignore=shutil.ignore_patterns("images"))
    args = argv(world, dest, out, "--steps", "recall-images", "--max-failures", "0")
    # the recall CSV is in place but not the rest of the assets: recall-images needs only it
    assert reproduce.main(args) == 1
    err = capsys.readouterr().err
    assert "1 of 18 images could not be downloaded, more than --max-failures 0" in err
    assert not (out / "steps" / "recall-images.done.json").exists()


# ---------------------------------------------------------------------------
# the rerun rule and the arguments each step gets, with the library calls replaced
# ---------------------------------------------------------------------------
MODEL_CALLS = ("run_recall", "evaluate_pairs")


def progress_of(job) -> bool:
    """What a recorded call was told about progress bars."""
    if isinstance(job, dict):
        return job["progress"]
    return job.enc.progress if hasattr(job, "enc") else job.progress


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Every asset of the manifest present (small files, each its own bytes), image folders
    in place, and the library functions the steps call replaced by recorders that write the
    outputs they are given (a recall run's top-k from its checkpoint's bytes: a changed
    checkpoint changes it, an unchanged one does not)."""
    import models
    import utils.evaluation
    import utils.fetch

    dest, out = tmp_path / "dest", tmp_path / "out"
    paths = {a.name: dest / a.path for a in load_manifest(DEFAULT_MANIFEST)}
    for name, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"the bytes of {name}".encode())
    paths["recall_csv"].write_text("101,name,http://127.0.0.1:9/a.jpg,1,96,64,\n", encoding="utf-8")
    paths["rank_val_csv"].write_text(
        "$record$".join(["900", "u", "v", "1", "2", "t", "c", "", "", ""]) + "\n", encoding="utf-8"
    )
    for w in ("recall", "rank"):
        (dest / "data" / "images" / w).mkdir(parents=True)
    calls: list[tuple[str, object]] = []
    behaviour = {}  # function name -> exception to raise, or function to run instead

    def write(path, text="{}"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)

    def download_images(job):
        Path(job.out).mkdir(parents=True, exist_ok=True)
        write(Path(job.out) / "manifest.jsonl", '{"status": "ok"}\n')
        summary = {"ok": 1, "skipped": 0, "failed": 0, "bad_rows": 0, "errors": {}, "seconds": 0.1}
        return summary | {"manifest": str(Path(job.out) / "manifest.jsonl"), "over_budget": None}

    def run_recall(job):
        write(job.output, repr(Path(job.files.get("checkpoint") or job.files["taiyi_text_weights"]).read_bytes()))
        return {"n_pois": 1, "gallery_size": 1, "image_backend": job.enc.backend}

    def evaluate_recall(**kw):
        write(kw["json_path"])
        if kw["html"]:
            write(kw["html"])
        return {}

    def compare_recall(a, b, ks, json_path):
        write(json_path)
        return {}

    def evaluate_pairs(run):
        write(run.output)
        write(run.metrics)
        return {}

    def recorder(fn):
        def call(*args, **kw):
            calls.append((fn.__name__, args[0] if args else kw))
            what = behaviour.get(fn.__name__)
            if isinstance(what, BaseException):
                raise what
            return (what or fn)(*args, **kw)

        return call

    for mod, fns in (
        (utils.fetch, [download_images]),
        (models, [run_recall, evaluate_pairs]),
        (utils.evaluation, [evaluate_recall, compare_recall]),
    ):
        for fn in fns:
            monkeypatch.setattr(mod, fn.__name__, recorder(fn))
    for name in ("format_recall", "format_compare", "format_pair_summary"):
        monkeypatch.setattr(utils.evaluation, name, lambda *a: "figures")

    def run(*extra):
        calls.clear()
        return reproduce.main(
            [
                "--dest",
                str(dest),
                "--out-dir",
                str(out),
                "--device",
                "cpu",
                "--steps",
                "recall-images,recall-infer,recall-eval,rank-images,rank-eval",
                *extra,
            ]
        )

    return {"run": run, "calls": calls, "behaviour": behaviour, "dest": dest, "out": out, "paths": paths}


def ran(fake) -> list[str]:
    return [name for name, _ in fake["calls"]]


def test_backend_reaches_every_model_step(fake, capsys):
    """--backend (and --no-progress) go to recall-infer, rank-eval and taiyi-infer; the old
    --recall-backend is an alias; the default is auto."""
    steps = "recall-infer,rank-eval,taiyi-infer"
    assert fake["run"]("--steps", steps, "--with-baselines", "--backend", "onnx", "--no-progress") == 0
    models = [job for name, job in fake["calls"] if name in MODEL_CALLS]
    assert len(models) == 3 and models[2].model == "taiyi"
    for job in models:
        assert job.enc.backend == "onnx" and job.enc.progress is False
        assert job.enc.device == "cpu"
    assert fake["run"]("--steps", steps, "--with-baselines", "--force", "all") == 0
    models = [job for name, job in fake["calls"] if name in MODEL_CALLS]
    assert len(models) == 3 and all(job.enc.backend == "auto" for job in models)
    assert fake["run"]("--steps", "recall-infer", "--recall-backend", "torch", "--force", "recall-infer") == 0
    ((name, job),) = fake["calls"]
    assert job.enc.backend == "torch"
    capsys.readouterr()


def test_no_progress_reaches_every_step(fake, capsys):
    assert fake["run"]("--no-progress") == 0
    assert len(fake["calls"]) == 5 and all(progress_of(job) is False for _, job in fake["calls"])
    assert "--quiet" not in str(fake["calls"])
    capsys.readouterr()


def test_rerun_rule(fake, capsys):
    """Done = outputs present + the same arguments. A changed argument reruns the step, how it
    runs (backend, device, batch size, workers, progress) does not; --force reruns; a missing
    output reruns."""
    run = fake["run"]
    assert run() == 0
    assert ran(fake) == ["download_images", "run_recall", "evaluate_recall", "download_images", "evaluate_pairs"]
    assert run() == 0 and ran(fake) == []
    # how a step runs: nothing reruns
    assert (
        run("--backend", "onnx", "--batch-size", "4", "--num-workers", "1", "--workers", "2", "--no-progress") == 0
        and ran(fake) == []
    )
    # an argument that shapes the outputs: that step reruns (recall-eval: --html gone)
    assert run("--no-html") == 0 and ran(fake) == ["evaluate_recall"]
    assert "step recall-eval: running (arguments changed)" in capsys.readouterr().out
    assert run("--no-html", "--force", "rank-eval") == 0 and ran(fake) == ["evaluate_pairs"]
    (fake["out"] / "recall" / "top10.csv").unlink()
    assert run("--no-html") == 0 and ran(fake) == ["run_recall"]  # the same top-k again: recall-eval is done
    assert "step recall-infer: running (output missing: " in capsys.readouterr().out
    stamp = json.loads((fake["out"] / "steps" / "recall-infer.done.json").read_text())
    assert stamp["args"]["model"] == "align" and "backend" not in json.dumps(stamp)
    assert stamp["inputs"]["checkpoint"]["sha256"] == sha(fake["paths"]["align_weights"])


def test_changed_input_reruns_the_steps_that_read_it(fake, capsys, monkeypatch):
    """A truncated weight file reruns the steps that read it, and the steps that read what
    they rewrote when it changed; a file touched but not changed reruns nothing, and is
    hashed once, not on every run."""
    import utils.reproduction.steps as steps_module

    run, paths = fake["run"], fake["paths"]
    assert run() == 0
    with open(paths["align_weights"], "r+b") as f:
        f.truncate(3)
    assert run() == 0 and ran(fake) == ["run_recall", "evaluate_recall"]
    text = capsys.readouterr().out
    assert "step recall-infer: running (input changed: checkpoint)" in text
    assert "step recall-eval: running (input changed: results)" in text
    assert "step rank-eval: skipped" in text
    with open(paths["poi_name_vectors"], "r+b") as f:
        f.truncate(3)
    assert run() == 0 and ran(fake) == ["evaluate_pairs"]
    assert "step rank-eval: running (input changed: poi-name-vectors)" in capsys.readouterr().out
    paths["bert_vocab"].write_text("another vocabulary")  # read by both model steps
    assert run() == 0 and ran(fake) == ["run_recall", "evaluate_pairs"]
    capsys.readouterr()
    # touched, same bytes: nothing reruns; hashed in that run only
    hashed = []
    real = steps_module.sha256_file
    monkeypatch.setattr(steps_module, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    os.utime(paths["ranker_weights"], (1, 1))
    assert run() == 0 and ran(fake) == [] and hashed == [paths["ranker_weights"].name]
    assert run() == 0 and ran(fake) == [] and hashed == [paths["ranker_weights"].name]
    capsys.readouterr()


def test_stamp_of_the_older_version_reruns_once(fake, capsys):
    """A stamp without input records (written before they existed) is not trusted: its step
    reruns once, then it is done."""
    run = fake["run"]
    assert run() == 0
    stamp = fake["out"] / "steps" / "rank-eval.done.json"
    stamp.write_text(json.dumps({"step": "rank-eval", "calls": [["rank_eval", "--csv", "x"]]}))
    assert run() == 0 and ran(fake) == ["evaluate_pairs"]
    assert "step rank-eval: running (its stamp has no input records (older version))" in capsys.readouterr().out
    assert run() == 0 and ran(fake) == []
    capsys.readouterr()


def test_steps_are_plain_data(fake):
    """The steps are records of plain values calling reproduce's own functions, which call
    the library: reproduce.py imports no other script."""
    tree = ast.parse(Path(reproduce.__file__).read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    scripts = {p.stem for p in Path(reproduce.__file__).parent.glob("*.py")} - {"reproduce"}
    assert scripts and {m.split(".")[0] for m in imported} & scripts == set()
    ns = reproduce.build_parser().parse_args(["--dest", str(fake["dest"]), "--with-baselines", "--device", "cpu"])
    steps = reproduce.plan(ns, *reproduce.check_args(ns))
    assert list(steps) == list(reproduce.ALL_STEPS)
    for step in steps.values():
        assert dataclasses.is_dataclass(step) and step.call.__module__ == "reproduce"
        assert json.loads(json.dumps([step.args, step.inputs, step.outputs])) == [step.args, step.inputs, step.outputs]
    assert steps["recall-infer"].inputs["checkpoint"] == str(fake["paths"]["align_weights"])
    assert steps["taiyi-eval"].inputs == {
        "results": steps["taiyi-infer"].args["output"],
        "versus": steps["recall-infer"].args["output"],
    }


@pytest.mark.parametrize("how", ["exception", "caught"])
def test_interrupted_step_reruns(fake, capsys, how):
    """Ctrl-C in a step (raised, or caught by the library, which cleans up and passes it on):
    one line from reproduce, exit 130, the step is not done (its stamp went when it
    started), the next run reruns it."""
    run = fake["run"]
    assert run() == 0

    def caught(job):  # the library's own handler: cleans up, then passes Ctrl-C on
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            Path(job.output).unlink(missing_ok=True)
            raise

    fake["behaviour"]["evaluate_pairs"] = KeyboardInterrupt() if how == "exception" else caught
    assert run("--force", "rank-eval") == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["reproduce: interrupted"]
    assert not (fake["out"] / "steps" / "rank-eval.done.json").exists()
    fake["behaviour"].clear()
    assert run() == 0 and ran(fake) == ["evaluate_pairs"]
    assert "step rank-eval: running (not done)" in capsys.readouterr().out


def test_table_with_baselines(tmp_path, capsys):
    """--with-baselines: Taiyi-CLIP columns on the recall rows, ours - Taiyi with its paired
    interval from recall_eval --compare; a NaN figure shows as "-"."""
    out = tmp_path / "out"
    for rel, doc in {
        "recall/metrics.json": {"recall": {"1": 0.5, "5": 0.8, "10": 0.9}, "mrr": 0.6, "n_pois": 6},
        "rank/metrics.json": {"accuracy": 0.7, "auc": float("nan"), "pairs_scored": 8},
        "baseline/taiyi_metrics.json": {"recall": {"5": 0.6}, "mrr": 0.4, "n_pois": 6},
        "baseline/compare.json": {"recall": {"5": {"B-A": {"value": 0.2, "ci": [0.05, 0.35]}}}},
    }.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(json.dumps(doc), encoding="utf-8")
    args = reproduce.build_parser().parse_args(
        ["--out-dir", str(out), "--with-baselines", "--images-dir", str(tmp_path / "none")]
    )
    print(results_table(args.out_dir, args.images_dir, args.with_baselines))
    text = capsys.readouterr().out
    assert table_value(text, "recall@5") == ["0.7880", "0.8000", "+0.0120", "-", "0.6000", "+0.2000 [+0.0500, +0.3500]"]
    assert table_value(text, "recall MRR@10") == ["-", "0.6000", "-", "-", "0.4000", "-"]
    assert table_value(text, "ranking accuracy") == ["0.6520", "0.7000", "+0.0480", "-", "-", "-"]
    assert "ranking ROC-AUC" not in text  # NaN: no figure
    doc = json.loads((out / "results.json").read_text())
    assert doc["notes"]["Taiyi-CLIP POIs"] == 6
    assert table_value((out / "results.md").read_text(), "recall@5")[-1] == "+0.2000 [+0.0500, +0.3500]"
