#!/usr/bin/env python
"""rank_eval.py against the authors' own evaluation script, side by side: same checkpoint,
same pairs, same images, same machine.

    git clone https://github.com/youyuge34/AutoImageSelection authors   # their code, not ours
    pip install efficientnet_pytorch                                    # their one extra dependency
    python bench/authors_rank.py --authors-dir authors --pairs 50       # development size
    python bench/authors_rank.py --authors-dir authors --pairs 1000     # the whole val set

The first line printed is the ratio (their wall time / rank_eval wall time); then wall
times, peak RSS (each child with its reaped workers) and how far the two sides' scores
are apart. Scores are meaningless (random weights); only time, memory and agreement count.

Shared set-up (bench_rank.make_inputs): a random full-size ranker saved in the released
layout, the first N rows of the published val CSV unchanged, the published pic-num table,
random unit POI vectors, the 30 sample photos as the pairs' images. Here in addition:
- the image tower's BatchNorm statistics measured on 8 of the photos
  (bench_rank.calibrate_image_tower): otherwise the random tower maps every photo to the
  same vector, the two images of a pair tie, and agreeing scores would prove nothing;
- the ranker's copy of the recall model saved as the recall checkpoint (``align_model.pth``,
  ``{"state_dict": ...}``), which their Config loads before the ranker replaces it;
- the POI vector tables also as pickled ``.npy`` dicts under the published names: both
  sides read these same files;
- a URL that the CSV repeats gets the same photo on both sides.

Their side: ``local_eval_test.py`` run as ``__main__`` (runpy, imports included) in a fresh
interpreter whose cwd is a scratch directory laid out as their Config expects (the
checkpoint, ``align_model.pth``, ``bert-base-chinese/``, the three ``.npy`` tables), with
``--index_files`` pointing train, val and test at the val CSV, their default
``--batch_size 16`` (``--batch-size`` here) and ``--aug 0``. Its scores are read from what
it prints (``val b_preds_1= [...]``). Its environment: PYTHONPATH is only
``--authors-pythonpath`` (ours is dropped), the Hugging Face hub offline. As published, their
loader decodes and tokenises in the main process (``num_workers=0``). Shims, all applied
in that child before runpy:
- ``requests.get(url)`` returns the bytes of the local photo the URL maps to (their
  dataset downloads each ``oss_url``); name lookups and connections to anything but the
  loopback address raise, so the child cannot send a packet elsewhere;
- stub modules ``oss2`` (imported by loss.py, never used by ``eval_()``) and
  ``torchvision`` with empty ``transforms`` / ``utils`` (imported by their dataset module,
  used only by the training loader's augmentation, hence ``--aug 0``), each only when the
  real package is not installed: they sit at the end of ``sys.path``;
- ``transformers.AdamW`` and ``transformers.ViTFeatureExtractor``, imported by name but
  unused and gone from current transformers, become placeholders that raise if called
  (transformers is imported before the stubs join ``sys.path``, so it does not take the
  torchvision stub for the real package).
Their ``eval_()`` itself, their model, their dataset and their checkpoint loading run as
published. A last batch of one pair crashes their loop (``list.extend`` of a scalar after
``squeeze``), so such pair counts are refused.

Our side: rank_eval.py with its defaults on the same files, first with an empty ONNX
cache (the export is part of the time) and then with the export cached.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
AUTHORS_MODULES = (
    "local_eval_test.py",
    "model_local.py",
    "datasets_attention_local.py",
    "align_model.py",
    "attention.py",
    "dice.py",
    "fc.py",
    "loss.py",
    "utils.py",
)
RANKER_CKPT = "shoucai_siamese_train_concat_poi_020_0.6520.ckpt"
IMG_VECTORS = "temp_dataset_item_pois_relation_0110_imgs_avg10_vector.npy"
NAME_VECTORS = "temp_dataset_item_pois_relation_0110_poi_name_vector.npy"
OLD_TRANSFORMERS_NAMES = ("AdamW", "ViTFeatureExtractor")
LOOPBACK = ("127.0.0.1", "::1", "localhost", None)  # None: a local passive address
SCORE_TOLERANCE = 1e-5  # ONNX Runtime vs torch; their printout keeps 8 digits
# stub modules for the authors' child: name -> source (empty: imported, never used)
STUBS = {"oss2.py": "", "torchvision/__init__.py": "", "torchvision/transforms.py": "", "torchvision/utils.py": ""}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--authors-dir", type=Path, help="a clone of github.com/youyuge34/AutoImageSelection")
    p.add_argument(
        "--authors-pythonpath", help="PYTHONPATH for their process only (where efficientnet_pytorch is installed)"
    )
    p.add_argument("--pairs", type=int, default=100, help="pairs of the val CSV to score (1 to 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="their --batch_size (their default: 16)")
    p.add_argument("--seed-data", type=Path, help="seed data directory (default: bench_rank's, env AVAS_SEED_DATA)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--authors-child", metavar="SPEC", help=argparse.SUPPRESS)
    return p


def check_args(args) -> str | None:
    """The one line to print when the arguments cannot work, else None."""
    if args.authors_dir is None:
        return "--authors-dir is required: a clone of github.com/youyuge34/AutoImageSelection"
    if not args.authors_dir.is_dir():
        return f"--authors-dir {args.authors_dir}: no such directory (clone github.com/youyuge34/AutoImageSelection)"
    missing = [m for m in AUTHORS_MODULES if not (args.authors_dir / m).is_file()]
    if missing:
        return f"{args.authors_dir}: not a clone of AutoImageSelection (no {', '.join(missing)})"
    if not 1 <= args.pairs <= 1000:
        return f"--pairs {args.pairs}: the val CSV has 1 to 1000 pairs"
    if args.batch_size < 1 or (args.pairs % args.batch_size == 1 and args.pairs > 1):
        return f"--pairs {args.pairs} with --batch-size {args.batch_size}: their loop cannot take a last batch of one"
    return None


# ---------------------------------------------------------------------------
# the authors' child process: shims, then their script as published
# ---------------------------------------------------------------------------
def loopback_only() -> None:
    """Name lookups and connections to anything but the loopback address raise."""
    import socket

    real_lookup, real_connect, real_connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

    def refuse(host) -> None:
        if host not in LOOPBACK:
            raise OSError(f"authors_rank: refused to reach {host!r} (nothing leaves 127.0.0.1 here)")

    def lookup(host, *a, **k):
        refuse(host)
        return real_lookup(host, *a, **k)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address[0])
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address[0])
        return real_connect_ex(self, address)

    socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = lookup, connect, connect_ex


def local_requests(url_map: dict) -> None:
    """``requests.get(url).content`` is the mapped local file's bytes."""
    import requests

    class Local:
        status_code = 200

        def __init__(self, content: bytes):
            self.content = content

    def get(url, *args, **kwargs):
        if url not in url_map:
            raise OSError(f"authors_rank: no local file for {url}")
        return Local(Path(url_map[url]).read_bytes())

    requests.get = get


def old_transformers_names() -> None:
    """Names their scripts import from transformers but never use, gone from today's
    transformers: placeholders that raise if anything does use them. Patched on the module's
    class, since transformers swaps its lazy module object while models load."""
    import transformers

    missing = {name for name in OLD_TRANSFORMERS_NAMES if not hasattr(transformers, name)}
    if not missing:
        return

    def placeholder(name: str):
        def unused(*args, **kwargs):
            raise NotImplementedError(
                f"authors_rank: transformers.{name} is a placeholder (gone from this transformers)"
            )

        return unused

    lazy = type(transformers)
    if lazy is types.ModuleType:
        for name in missing:
            setattr(transformers, name, placeholder(name))
        return
    real_getattr = lazy.__getattr__

    def getattr_or_placeholder(self, name):
        try:
            return real_getattr(self, name)
        except AttributeError:
            if self.__name__ == "transformers" and name in missing:
                return placeholder(name)
            raise

    lazy.__getattr__ = getattr_or_placeholder


def authors_child(spec_path: str) -> int:
    import runpy

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    os.chdir(spec["cwd"])
    # their modules first (their utils.py, not ours), stubs last (a real package wins)
    sys.path[:] = [spec["authors_dir"]] + [p for p in sys.path if p and Path(p).resolve() != HERE]
    loopback_only()
    local_requests(spec["urls"])
    old_transformers_names()  # before the stubs: transformers must not take the torchvision stub for real
    sys.path.append(spec["stubs"])
    script = str(Path(spec["authors_dir"]) / "local_eval_test.py")
    sys.argv = [script, "--index_files", ",".join([spec["csv"]] * 3), "--batch_size", str(spec["batch"])]
    sys.argv += ["--aug", "0"]
    runpy.run_path(script, run_name="__main__")
    return 0


# ---------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------
def same_photo_per_url(inp: dict) -> dict:
    """``url -> photo`` for every image URL of the CSV; a repeated URL gets one photo on both
    sides (the repeat's file is overwritten with the first one's)."""
    from utils.formats.rows import RECORD_SEP

    urls = {}
    for line in inp["csv"].read_text(encoding="utf-8").splitlines():
        fields = line.strip().split(RECORD_SEP)
        for side, url in (("a", fields[7]), ("b", fields[8])):
            path = inp["images"] / f"{fields[0]}_{side}.jpg"
            if url in urls:
                shutil.copyfile(urls[url], path)
            else:
                urls[url] = str(path)
    return urls


def authors_layout(work: Path, inp: dict) -> Path:
    """Their cwd: the files their Config and ``eval_()`` open by relative name."""
    import numpy as np
    import torch

    from utils.formats.poi import load_poi_table

    cwd = work / "authors_cwd"
    cwd.mkdir()
    (cwd / RANKER_CKPT).symlink_to(inp["ckpt"])
    (cwd / inp["pic"].name).symlink_to(inp["pic"])
    (cwd / "bert-base-chinese").symlink_to(inp["bert"], target_is_directory=True)
    prefix = "align_model."
    sd = torch.load(inp["ckpt"], map_location="cpu", weights_only=True)
    torch.save(
        {"state_dict": {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}}, cwd / "align_model.pth"
    )
    for key, name in (("img", IMG_VECTORS), ("name", NAME_VECTORS)):
        table = {k: np.asarray(v, dtype=np.float32) for k, v in load_poi_table(inp[key]).items()}
        np.save(cwd / name, table, allow_pickle=True)
        inp[key] = cwd / name  # our side reads the very same files
    for rel, text in STUBS.items():
        (work / "stubs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / "stubs" / rel).write_text(text, encoding="utf-8")
    return cwd


# ---------------------------------------------------------------------------
# reading the two sides' scores
# ---------------------------------------------------------------------------
def authors_scores(log_text: str) -> tuple[list[tuple[float, float]], float]:
    """``[(s_a, s_b)]`` in CSV order from what their loop prints, and the seconds their
    loop reports for its model calls (``N costs S``)."""
    import numpy as np

    found = {"1": [], "2": []}
    for which, text in re.findall(r"val b_preds_([12])= (\[[^\]]*\]|\S+)", log_text):
        found[which].extend(np.array(text.strip("[]").split(), dtype=float).tolist())
    model_s = sum(float(s) for s in re.findall(r"^\d+ costs (\S+)$", log_text, flags=re.M))
    return list(zip(found["1"], found["2"])), model_s


def compare(item_ids: list[str], theirs: list, ours: dict) -> str:
    """How far our scores are from theirs, beside how far apart the two images of a pair
    are (the agreement means something only when it is much smaller than that spread)."""
    if len(theirs) != len(item_ids):
        return f"MISMATCH: their loop printed {len(theirs)} pairs for {len(item_ids)}"
    mine = [ours[k] for k in item_ids]
    diff = max(abs(a - b) for pair, other in zip(theirs, mine) for a, b in zip(pair, other))
    same = sum((a > b) == (c > d) for (a, b), (c, d) in zip(theirs, mine))
    spread = sorted(abs(a - b) for a, b in theirs)[len(theirs) // 2]
    flag = "" if diff <= SCORE_TOLERANCE and same == len(theirs) else f"  MISMATCH (tolerance {SCORE_TOLERANCE})"
    return (
        f"max |score - theirs| {diff:.1e} (median |s_a - s_b| {spread:.1e}), "
        f"same prediction on {same}/{len(theirs)} pairs{flag}"
    )


# ---------------------------------------------------------------------------
# running and reporting
# ---------------------------------------------------------------------------
def authors_env(pythonpath: str | None) -> dict:
    """Their child's environment: our PYTHONPATH out, theirs in, the hub offline."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def run_both(args, work: Path, bench_rank) -> tuple[list, list, dict]:
    """Set up, then their child and our two runs; ``(theirs, ours, inputs)``."""
    t0 = time.perf_counter()
    seed = args.seed_data or bench_rank.default_seed_data()
    inp = bench_rank.make_inputs(work, seed, args.pairs, tiny=False)
    bench_rank.calibrate_image_tower(inp)
    urls = same_photo_per_url(inp)
    cwd = authors_layout(work, inp)
    spec = dict(cwd=str(cwd), authors_dir=str(args.authors_dir.resolve()), stubs=str(work / "stubs"))
    spec.update(urls=urls, csv=str(inp["csv"]), batch=args.batch_size)
    (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    print(f"set-up: {args.pairs} pairs, random full-size ranker, in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    cmd = [sys.executable, str(Path(__file__).resolve()), "--authors-child", str(work / "spec.json")]
    theirs = [
        "their local_eval_test.py",
        work / "authors.log",
        *bench_rank.run_child(cmd, authors_env(args.authors_pythonpath), work / "authors.log"),
    ]
    env = dict(os.environ, AVAS_ONNX_CACHE=str(work / "onnx_cache"))
    ours = []
    for i, label in enumerate(("first run, ONNX export included", "export cached")):
        out, log = work / f"scores_{i}.csv", work / f"rank_eval_{i}.log"
        ours.append(
            [
                f"rank_eval.py ({label})",
                log,
                *bench_rank.run_child(bench_rank.rank_eval_cmd(inp, out, work), env, log),
                out,
            ]
        )
    return theirs, ours, inp


def report(args, theirs: list, ours: list, inp: dict, bench_rank) -> list[str]:
    item_ids = [ln.split("$record$", 1)[0] for ln in inp["csv"].read_text(encoding="utf-8").splitlines() if ln.strip()]
    their_scores, model_s = authors_scores(theirs[1].read_text(encoding="utf-8", errors="replace"))
    n = args.pairs
    lines = [
        f"ratio (their local_eval_test.py eval_() / rank_eval.py defaults, end to end, {n} pairs, "
        f"their batch {args.batch_size}): {theirs[2] / ours[0][2]:.2f}x first run, "
        f"{theirs[2] / ours[1][2]:.2f}x with the ONNX export cached",
        f"  theirs:  {theirs[2]:7.1f} s  ({n / theirs[2]:.2f} pairs/s), peak RSS {theirs[3]:.0f} MiB; "
        f"their own timer around the model calls: {model_s:.1f} s",
    ]
    for label, _, wall, rss, _, out in ours:
        agreement = compare(item_ids, their_scores, bench_rank.read_scores(out, (2, 3)))
        lines.append(f"  {label}: {wall:7.1f} s  ({n / wall:.2f} pairs/s), peak RSS {rss:.0f} MiB, {agreement}")
    ncores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines.append(f"  cores {ncores}, load average {os.getloadavg()[0]:.1f} (other jobs inflate wall times)")
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.authors_child:
        return authors_child(args.authors_child)
    problem = check_args(args)
    if problem:
        print(f"authors_rank: {problem}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    import bench_rank  # puts the project on sys.path; only the parent imports it

    work = Path(tempfile.mkdtemp(prefix="authors_rank_"))
    try:
        theirs, ours, inp = run_both(args, work, bench_rank)
        for label, log, _, _, code, *_ in [theirs, *ours]:
            if code != 0:
                print(f"authors_rank: {label} failed (exit {code}):\n{log.read_text(errors='replace')[-4000:]}")
                return 1
        print("\n".join(report(args, theirs, ours, inp, bench_rank)))
        return 0
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
