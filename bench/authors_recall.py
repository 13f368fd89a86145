#!/usr/bin/env python
"""Speed of the recall stage against the AUTHORS' OWN recall script
(``align_recall_test_with_mmkg_model.py`` of github.com/youyuge34/AutoImageSelection), run
side by side on this machine with the same checkpoint and the same files. The ratio is
printed first. No code of theirs is in this file: it runs their clone, unmodified on disk.

    git clone https://github.com/youyuge34/AutoImageSelection ../AutoImageSelection
    pip install efficientnet_pytorch        # their one dependency the project does not need
    python bench/authors_recall.py --authors-dir ../AutoImageSelection --set recall --images 100
    python bench/authors_recall.py --authors-dir ../AutoImageSelection --set photos --images 300

Sets (``--images N`` picks the count):
  recall  the published recall CSV (seed data; 500 POIs, 5000 images; default all of it).
          Its photos cannot be downloaded here, so the stand-in is one file per CSV row,
          named as the CSV names it (<poi_id>_<rank>.jpg), cycling the 30 sample photos of
          the seed data (236 to 1024 px; hard links, else symbolic links);
  photos  bench_recall.py's gallery of ~2 MP JPEGs, 10 per POI, and its CSV (default 100).
Checkpoint: bench_recall.py's random full-size model in the released layout
(``{"state_dict": ...}``). Before timing, the bench checks in a child process that it really
loads into THEIR model (missing and unexpected keys of their ``load_state_dict(...,
strict=False)``, both must be empty) and that their vector of one image equals ours.

Their script reads every jpg/png of ``temp_recall_biztype0_fc5_imagern_500/`` in its working
directory, ``data/temp_recall_biztype0_fc5_imagern_500.csv``, ``align_model.pth`` and
``bert-base-chinese/`` (config.json, vocab.txt), and writes
``data/align_recall@k_with_MKG_20221021_poi_500.csv`` (every POI against every image). The
bench lays out a scratch working directory that way (links to the same files ours reads)
and runs their script there in a fresh process, imports included, with the clone (and
``--authors-pythonpath``) on that process's PYTHONPATH only. Run-time shims, the smallest
that let it run as published:
  - ``key_word`` is used but never defined (its definition is commented out; the text it
    encodes is never used): the child runs the script with
    ``runpy.run_path(script, init_globals={"key_word": <first POI name>}, run_name="__main__")``;
  - HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 in its environment: recent transformers
    take ``BertTokenizer.from_pretrained("bert-base-chinese/vocab.txt")`` for a Hub name
    and query the Hub before reading the local file;
  - PYTHONUNBUFFERED=1, so that its prints ("iterations=", then "batch= ... costs=" per
    batch) can be timed: start-up (imports, model load) and the first batch encoded.
``utils.Dict2Obj`` needs none: it has ``__getitem__`` and ``__setitem__``, which
``ALIGN.from_pretrained`` uses. Their pinned versions (torch 1.7.1, transformers 4.8.1) are
not installed: both sides run on the project's torch and transformers.

Ours: ``python recall_infer.py`` with its defaults in a fresh process (bench_recall.py's
run), ``--full-output`` too, since their script writes every score; an untimed first run on
16 images exports the ONNX graph. Theirs and ours alternate, best of ``--repeat`` each (the
machine may be shared). Printed: the ratio, wall times, start-up, peak RSS, scores of ours
vs theirs for the same (POI, image) pairs, and the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_recall import PeakRSS, prepare, read_full, run_cli  # noqa: E402

from utils.formats.images import load_image  # noqa: E402

SCRIPT = "align_recall_test_with_mmkg_model.py"
GALLERY = "temp_recall_biztype0_fc5_imagern_500"  # their image folder and CSV stem
THEIR_OUTPUT = "data/align_recall@k_with_MKG_20221021_poi_500.csv"
SHIM = "import runpy, sys; runpy.run_path(sys.argv[1], init_globals={'key_word': sys.argv[2]}, run_name='__main__')"
CHECK = """
import json, runpy, sys
import torch, utils
from align_model import build_model
ns = runpy.run_path(sys.argv[1], run_name="authors_check")  # their functions, main() not run
model = build_model(utils.Dict2Obj({"model_path": "align_model.pth", "bert_path": "bert-base-chinese"}))
sd = torch.load("align_model.pth", map_location="cpu")["state_dict"]
keys = model.load_state_dict(sd, strict=False)  # the same call as their loader: what it left out
model.eval()
with torch.no_grad():
    vec = model.encode_image(torch.from_numpy(ns["normalize_image"](sys.argv[2]))[None])[0]
print(json.dumps({"missing": keys.missing_keys, "unexpected": keys.unexpected_keys, "vector": vec.tolist()}))
"""


def link(src: Path, dst: Path) -> None:
    """``dst`` names the same file as ``src``: a hard link, else a symbolic one."""
    try:
        os.link(src, dst)
    except OSError:
        os.symlink(src.resolve(), dst)


def lay_out(cwd: Path, csv_lines: list[str], images: dict[str, Path], ckpt: Path, bert_dir: Path) -> Path:
    """Their working directory: the gallery folder, the CSV, the checkpoint, the bert files.
    Returns the CSV (ours reads the same one)."""
    shutil.rmtree(cwd, ignore_errors=True)
    (cwd / GALLERY).mkdir(parents=True)
    (cwd / "data").mkdir()
    for name, src in images.items():
        link(src, cwd / GALLERY / name)
    csv_path = cwd / "data" / f"{GALLERY}.csv"
    csv_path.write_text("".join(line + "\n" for line in csv_lines), encoding="utf-8")
    os.symlink(ckpt.resolve(), cwd / "align_model.pth")
    os.symlink(bert_dir.resolve(), cwd / "bert-base-chinese")
    return csv_path


def recall_set(seed: Path, n: int | None) -> tuple[list[str], dict[str, Path]]:
    """The published recall CSV's first ``n`` rows and a stand-in file for each."""
    samples = sorted((seed / "sample-images").glob("*.jpg"))
    lines = (seed / f"{GALLERY}.csv").read_text(encoding="utf-8").splitlines()[:n]
    if not samples or not lines:
        raise SystemExit(f"{seed}: no sample photos or recall CSV (set --seed-data or AVAS_SEED_DATA)")
    images = {}
    for i, line in enumerate(lines):
        poi, _, _, rank = line.split(",")[:4]
        images[f"{poi}_{rank}.jpg"] = samples[i % len(samples)]
    return lines, images


def child_env(script: Path, extra: str | None) -> dict:
    """Their process's environment: their clone and deps on PYTHONPATH, the shims."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(script.parent), extra, env.get("PYTHONPATH")) if p)
    return env


def check_theirs(cwd: Path, script: Path, env: dict, image: Path) -> dict:
    """Their model's load of the checkpoint (missing / unexpected keys) and their vector of ``image``."""
    r = subprocess.run(
        [sys.executable, "-c", CHECK, str(script), str(image)], cwd=cwd, env=env, capture_output=True, text=True
    )
    if r.returncode != 0:
        raise SystemExit(f"their model failed to load the checkpoint: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_theirs(cwd: Path, script: Path, env: dict, key_word: str) -> dict:
    """Their script in a fresh process: wall seconds, seconds to its first prints, peak RSS."""
    marks = {}
    log = open(cwd / "authors_stderr.log", "w", encoding="utf-8")  # noqa: SIM115  (closed below)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", SHIM, str(script), key_word],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )

    def watch():
        for line in proc.stdout:
            for mark in ("iterations=", "batch="):
                if line.startswith(mark) and mark not in marks:
                    marks[mark] = time.perf_counter() - t0
            if line.startswith("batch="):  # "batch= 16 costs= <seconds of encode_image>"
                marks["model"] = marks.get("model", 0.0) + float(line.split()[-1])

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    with PeakRSS(proc.pid) as rss:
        code = proc.wait()
    wall = time.perf_counter() - t0
    reader.join()
    log.close()
    if code != 0:
        tail = (cwd / "authors_stderr.log").read_text(encoding="utf-8").strip().splitlines()[-1:]
        raise SystemExit(f"their script failed ({code}): {tail} (all of it in {cwd / 'authors_stderr.log'})")
    return {
        "wall": wall,
        "startup": marks.get("iterations="),
        "first": marks.get("batch="),
        "model": marks.get("model"),
        "peak": rss.peak,
    }


def read_theirs(path: Path, pois: list[str], images: list[str]) -> np.ndarray:
    """Their scores as a POI x image matrix in the order of ours (NaN where they have none)."""
    row = {p: i for i, p in enumerate(pois)}
    col = {name: j for j, name in enumerate(images)}
    out = np.full((len(pois), len(images)), np.nan)
    with open(path, encoding="utf-8") as f:
        for line in f:
            poi, rest = line.rstrip("\n").split(",", 1)
            _, image, score = rest.rsplit(",", 2)
            out[row[poi], col[os.path.basename(image)]] = float(score)
    return out


def children_cpu() -> float:
    """user + system CPU seconds of the reaped child processes (and theirs): each side's CPU
    work, which a loaded machine slows less than its wall time."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def verify_load(model, cwd: Path, script: Path, env: dict, image: Path) -> float:
    """Stop unless the checkpoint loads whole into their model and gives our vector."""
    theirs = check_theirs(cwd, script, env, image)
    if theirs["missing"] or theirs["unexpected"]:
        raise SystemExit(
            f"the checkpoint does not load whole into their model: missing {theirs['missing'][:5]}, "
            f"unexpected {theirs['unexpected'][:5]}"
        )
    with torch.inference_mode():
        ours = model.encode_image(load_image(image)[0][None])[0]
    dev = float((ours - torch.tensor(theirs["vector"])).abs().max())
    if dev > 1e-4:
        raise SystemExit(f"their vector of {image.name} differs from ours by {dev:.1e}: not the same model")
    return dev


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors-dir", required=True, help="a clone of github.com/youyuge34/AutoImageSelection")
    p.add_argument("--authors-pythonpath", help="extra path(s) for their dependencies, their process only")
    p.add_argument("--set", choices=("recall", "photos"), default="recall", help="which gallery (default recall)")
    p.add_argument("--images", "--n", dest="n", type=int, help="images (default: recall 5000, photos 100)")
    p.add_argument("--seed-data", default=os.environ.get("AVAS_SEED_DATA", str(ROOT.parent / "shared" / "seed-data")))
    p.add_argument("--workdir", help="keep generated files here (default: a temporary directory)")
    p.add_argument("--repeat", type=int, default=2, help="rounds; the best time of each side is kept (default 2)")
    args = p.parse_args(argv)
    args.script = Path(args.authors_dir).resolve() / SCRIPT
    if not args.script.is_file():  # argparse's one line and exit status 2
        p.error(f"--authors-dir {args.authors_dir}: no {SCRIPT} (not a clone of AutoImageSelection?)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    script = args.script
    load0 = os.getloadavg()[0]
    photos = args.set == "photos"
    n = args.n or (100 if photos else 5000)
    tmp, out, bert_dir, gallery_csv, paths, model, ckpt = prepare(
        args.seed_data, args.workdir, n if photos else 0, "authors_recall_"
    )
    if photos:
        lines = gallery_csv.read_text(encoding="utf-8").splitlines()
        images = {p.name: p for p in paths}
    else:
        lines, images = recall_set(Path(args.seed_data), n)
    cwd = out / "authors_cwd"
    csv_path = lay_out(cwd, lines, images, ckpt, bert_dir)
    env = child_env(script, args.authors_pythonpath)
    print("checking that the checkpoint loads into their model ...", file=sys.stderr, flush=True)
    vec_dev = verify_load(model, cwd, script, env, cwd / GALLERY / next(iter(images)))
    del model
    (cwd / "warmup.csv").write_text("".join(x + "\n" for x in lines[:16]), encoding="utf-8")
    t_first, _, _ = run_cli(cwd / "warmup.csv", cwd / GALLERY, ckpt, bert_dir, out, "warmup")
    best_theirs, best_ours, meta, peak = None, float("inf"), {}, 0
    for i in range(args.repeat):
        print(f"round {i + 1}/{args.repeat}: their script, recall_infer.py ...", file=sys.stderr, flush=True)
        c = children_cpu()
        r = run_theirs(cwd, script, env, lines[0].split(",")[1])
        r["cpu"] = children_cpu() - c
        if best_theirs is None or r["wall"] < best_theirs["wall"]:
            best_theirs = r
        c = children_cpu()
        t, m, pk = run_cli(csv_path, cwd / GALLERY, ckpt, bert_dir, out, "ours")
        m["cpu_s"] = children_cpu() - c
        peak = max(peak, pk)
        if t < best_ours:
            best_ours, meta = t, m
    report(args, n, best_theirs, best_ours, meta, peak, t_first, vec_dev, out, cwd, load0)
    if tmp is not None:
        tmp.cleanup()
    return 0


def report(args, n, theirs, t_ours, meta, peak, t_first, vec_dev, out, cwd, load0) -> None:
    pois, imgs, s_ours = read_full(out / "ours_full.csv")
    s_theirs = read_theirs(cwd / THEIR_OUTPUT, pois, imgs)
    covered = int(np.isfinite(s_theirs).sum())
    dev = float(np.nanmax(np.abs(s_ours - s_theirs)))
    what = "the published recall CSV, stand-in photos 236-1024 px" if args.set == "recall" else "photos of ~2 MP"
    print(
        f"ratio: recall_infer.py defaults vs the authors' recall script = {theirs['wall'] / t_ours:.2f}x "
        f"({n} images of {what}, {len(pois)} POIs; best of {args.repeat})"
    )
    print(
        f"  their script: {theirs['wall']:.1f} s ({n / theirs['wall']:.1f} img/s, a fresh process, imports "
        f"included); start-up (imports, model load) {theirs['startup']:.1f} s, first batch of 16 encoded at "
        f"{theirs['first']:.1f} s; in encode_image {theirs['model']:.1f} s (its own prints); peak RSS "
        f"{theirs['peak'] / 1e9:.2f} GB"
    )
    print(
        f"  recall_infer.py: {t_ours:.1f} s ({n / t_ours:.1f} img/s, a fresh process, --full-output too); engine "
        f"{meta['image_backend']}, {meta.get('lanes')} lanes, batch {meta['batch_size']}; first image encoded at "
        f"{meta['timings_s'].get('first_image', float('nan')):.1f} s; peak RSS {peak / 1e9:.2f} GB (main + "
        f"workers); untimed first run (16 images; exports the ONNX graph unless --workdir holds it): {t_first:.1f} s"
    )
    print(
        f"  CPU seconds (user + system, every process of the run): theirs {theirs['cpu']:.0f}, ours "
        f"{meta['cpu_s']:.0f} ({theirs['cpu'] / meta['cpu_s']:.2f}x less)"
    )
    print(
        f"  scores, ours vs theirs: max |diff| {dev:.1e} over {covered} of {s_ours.size} (POI, image) pairs; "
        f"their model loaded the checkpoint whole (no missing or unexpected keys), their vector of one "
        f"image equals ours to {vec_dev:.1e}"
    )
    print(f"load average: {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    sys.exit(main())
