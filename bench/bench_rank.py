#!/usr/bin/env python
"""rank_eval.py against the authors' per-pair loop, same pairs, same model, same machine.

    python bench/bench_rank.py                 # 100 pairs, full-size random ranker, ~2-4 min
    python bench/bench_rank.py --pairs 40 --tiny

The first line printed is the ratio (naive wall time / rank_eval wall time), so the
figure holds on any machine; the details follow.

Set-up (a temporary directory, removed afterwards unless --keep):
- a randomly initialised ranker saved as a checkpoint: full size (EfficientNet-B3 +
  4-layer BERT recall copy, the released layout) or, with --tiny, the tests' tiny one;
- the real bert-base-chinese config/vocab, the first N rows of the real val CSV (real
  titles and POI lists) and the real pic-num table from the seed data (AVAS_SEED_DATA
  or --seed-data);
- POI vector tables: random unit vectors for every name of the pic-num table (.npz);
- images: the 30 sample photos (236 to 1024 px) copied round-robin to
  ``<item_id>_a.jpg`` / ``<item_id>_b.jpg``, two distinct files per pair.

Runs, each in a child process, end to end (imports, model load, tables, images, scores,
output file):
- naive: the authors' loop: one pair at a time, both images decoded in the main process
  and encoded at batch 1 (NCHW, torch), the item text encoded for every pair, the whole
  ranker forward per image;
- rank_eval.py with its defaults (``--backend auto``), first with an empty ONNX cache
  (the export is part of the time) and then again with the export cached.
Also printed: peak RSS of each child (its DataLoader workers included), and the largest
score difference between the naive loop and rank_eval (engines agree to ~1e-5).
Scores are meaningless (random weights); only time, memory and agreement are measured.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VAL_CSV = "dwd_mml_train_dataset_1007_urls_val_with_poi_tuomin.csv"
PIC_NUM = "temp_dataset_item_pois_relation_1129_poi_2_pic_num.npy"


def default_seed_data() -> Path:
    return Path(os.environ.get("AVAS_SEED_DATA", ROOT.parent / "shared" / "seed-data"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--pairs", type=int, default=100, help="pairs to score (the val set has 1000)")
    p.add_argument(
        "--seed-data", type=Path, default=default_seed_data(), help="seed data directory (env AVAS_SEED_DATA)"
    )
    p.add_argument("--tiny", action="store_true", help="the tests' tiny ranker instead of full size")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--naive-child", nargs=2, metavar=("WORK", "OUT"), help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------
def make_inputs(work: Path, seed: Path, n_pairs: int, tiny: bool) -> dict:
    import numpy as np
    import torch

    from models.align import AlignArch, AlignModel
    from models.checkpoint import save_ranker_checkpoint
    from models.ranker import SiameseRanker
    from utils.formats.poi import load_poi_table, save_tables
    from utils.formats.rows import RECORD_SEP

    bert = seed / "bert-base-chinese"
    samples = sorted((seed / "sample-images").glob("*.jpg"))
    for need in (bert / "config.json", bert / "vocab.txt", seed / VAL_CSV, seed / PIC_NUM):
        if not need.is_file():
            raise SystemExit(f"bench_rank: {need} not found (set --seed-data or AVAS_SEED_DATA)")
    if not samples:
        raise SystemExit(f"bench_rank: no sample images in {seed / 'sample-images'}")

    lines = [ln.strip() for ln in (seed / VAL_CSV).read_text(encoding="utf-8").splitlines() if ln.strip()]
    img_dir = work / "images"
    img_dir.mkdir()
    out_lines = []
    for i in range(n_pairs):
        fields = lines[i % len(lines)].split(RECORD_SEP)
        fields[0] = f"{fields[0]}x{i // len(lines)}" if i >= len(lines) else fields[0]
        out_lines.append(RECORD_SEP.join(fields))
        for side, k in (("a", 2 * i), ("b", 2 * i + 1)):
            shutil.copyfile(samples[k % len(samples)], img_dir / f"{fields[0]}_{side}.jpg")
    csv_path = work / "val.csv"
    csv_path.write_text("\n".join(out_lines) + "\n", encoding="utf-8")

    torch.manual_seed(0)
    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from fixtures import TINY_ARCH, make_bert_dir

        bert = make_bert_dir(work / "bert")
        model = SiameseRanker(AlignModel.from_bert_dir(bert, TINY_ARCH)).eval()
    else:
        model = SiameseRanker(AlignModel.from_bert_dir(bert, AlignArch())).eval()
    dim = model.align_model.arch.embed_dim
    ckpt = work / "ranker_random.ckpt"
    save_ranker_checkpoint(model, ckpt)
    del model

    names = list(load_poi_table(seed / PIC_NUM))
    rng = np.random.default_rng(0)
    tables = {}
    for kind in ("img", "name"):
        v = rng.normal(size=(len(names), dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        tables[kind] = work / f"poi_{kind}.npz"
        save_tables({tables[kind]: dict(zip(names, v))})
    return dict(csv=csv_path, images=img_dir, ckpt=ckpt, bert=bert, pic=seed / PIC_NUM, **tables)


def calibrate_image_tower(inp: dict, n_images: int = 8) -> None:
    """Rewrite the random checkpoint with the image tower's BatchNorm statistics measured on
    a few sample photos (bench_recall.calibrate_bn), else both images of a pair tie and a
    score comparison says nothing about the image path."""
    from bench_recall import calibrate_bn

    from models.checkpoint import load_ranker, save_ranker_checkpoint

    model = load_ranker(inp["ckpt"], inp["bert"]).eval()
    calibrate_bn(model.align_model, sorted(inp["images"].iterdir())[:n_images], n=n_images)
    save_ranker_checkpoint(model.eval(), inp["ckpt"])


# ---------------------------------------------------------------------------
# the authors' way
# ---------------------------------------------------------------------------
def naive_child(work: Path, out: Path) -> int:
    """One pair at a time: decode both images here, batch 1, text encoded per pair,
    the whole ranker forward for each image; scores written as CSV."""
    import torch
    from naive import authors_image, authors_text_encoder

    from models.checkpoint import load_ranker
    from utils.formats.poi import PoiTables, load_poi_table
    from utils.formats.rows import index_images, iter_rank_csv

    bert = Path((work / "bert_dir").read_text())
    model = load_ranker(work / "ranker_random.ckpt", bert).eval()
    encode_text = authors_text_encoder(model.align_model, bert)
    dim = model.align_model.arch.embed_dim
    pic = load_poi_table((work / "pic_path").read_text())
    img_t, name_t = load_poi_table(work / "poi_img.npz"), load_poi_table(work / "poi_name.npz")
    images = index_images(work / "images")
    with torch.no_grad(), open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        for row in iter_rank_csv(work / "val.csv"):
            inp = PoiTables(pic, img_t, name_t, dim).inputs(row.title, row.poi_names)
            feat = encode_text([inp.pois_text])
            pimg = torch.from_numpy(inp.poi_img)[None]
            ptxt = torch.from_numpy(inp.poi_txt)[None]
            plen = torch.tensor([inp.poi_len])
            scores = []
            for key in (row.key_a, row.key_b):
                x = authors_image(images.get(key, ""))
                scores.append(float(model(x[None], feat, pimg, ptxt, plen)))
            w.writerow([row.item_id, *scores])
    return 0


# ---------------------------------------------------------------------------
# running and measuring
# ---------------------------------------------------------------------------
def run_child(cmd: list[str], env: dict, log_path: Path) -> tuple[float, float, int]:
    """``(wall seconds, peak RSS MiB of the child and its reaped workers, exit status)``."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, ru.ru_maxrss / 1024, proc.returncode


def rank_eval_cmd(inp: dict, out: Path, work: Path) -> list[str]:
    """rank_eval.py with its defaults on the inputs of :func:`make_inputs` (the tables
    may be swapped for other files of the same content)."""
    return [
        sys.executable,
        str(ROOT / "rank_eval.py"),
        "--csv",
        str(inp["csv"]),
        "--image-dir",
        str(inp["images"]),
        "--checkpoint",
        str(inp["ckpt"]),
        "--bert-dir",
        str(inp["bert"]),
        "--poi-pic-num",
        str(inp["pic"]),
        "--poi-image-vectors",
        str(inp["img"]),
        "--poi-name-vectors",
        str(inp["name"]),
        "--output",
        str(out),
        "--metrics",
        str(work / "metrics.json"),
        "--no-progress",
        "--bootstrap",
        "0",
    ]


def read_scores(path: Path, cols: tuple[int, int]) -> dict:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if rows and rows[0][0] == "item_id":
        rows = rows[1:]
    return {r[0]: (float(r[cols[0]]), float(r[cols[1]])) for r in rows}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.naive_child:
        return naive_child(Path(args.naive_child[0]), Path(args.naive_child[1]))
    work = Path(tempfile.mkdtemp(prefix="bench_rank_"))
    try:
        t0 = time.perf_counter()
        inp = make_inputs(work, args.seed_data, args.pairs, args.tiny)
        calibrate_image_tower(inp)  # else both images of a pair tie and the score check misses the image path
        (work / "pic_path").write_text(str(inp["pic"]))
        (work / "bert_dir").write_text(str(inp["bert"]))
        print(
            f"set-up: {args.pairs} pairs, {2 * args.pairs} image files, random "
            f"{'tiny' if args.tiny else 'full-size'} ranker "
            f"({inp['ckpt'].stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        env = dict(os.environ, AVAS_ONNX_CACHE=str(work / "onnx_cache"))

        naive_out = work / "naive.csv"
        naive = run_child(
            [sys.executable, str(Path(__file__).resolve()), "--naive-child", str(work), str(naive_out)],
            env,
            work / "naive.log",
        )
        ours = []
        for label in ("first run, ONNX export included", "export cached"):
            out = work / f"scores_{len(ours)}.csv"
            cmd = rank_eval_cmd(inp, out, work)
            ours.append((label, out, *run_child(cmd, env, work / f"rank_eval_{len(ours)}.log")))
        for name, code, logf in [("naive loop", naive[2], work / "naive.log")] + [
            (f"rank_eval ({o[0]})", o[4], work / f"rank_eval_{i}.log") for i, o in enumerate(ours)
        ]:
            if code != 0:
                print(f"bench_rank: {name} failed (exit {code}):\n{logf.read_text()}")
                return 1

        ref = read_scores(naive_out, (1, 2))
        spread = sorted(abs(a - b) for a, b in ref.values())[len(ref) // 2]  # the agreement must be far below it
        lines = [
            f"ratio (naive per-pair loop / rank_eval.py defaults, end to end, {args.pairs} "
            f"pairs): {naive[0] / ours[0][2]:.2f}x first run, {naive[0] / ours[1][2]:.2f}x "
            f"with the ONNX export cached"
        ]
        lines.append(
            f"  naive loop:  {naive[0]:6.1f} s  ({args.pairs / naive[0]:.2f} pairs/s), peak RSS {naive[1]:.0f} MiB"
        )
        for label, out, wall, rss, _ in ours:
            got = read_scores(out, (2, 3))
            diff = max(abs(a - b) for k in ref for a, b in zip(ref[k], got[k]))
            lines.append(
                f"  rank_eval ({label}): {wall:6.1f} s  ({args.pairs / wall:.2f} pairs/s), "
                f"peak RSS {rss:.0f} MiB, max |score - naive| {diff:.1e} (median |s_a - s_b| {spread:.1e})"
            )
        engine = [
            ln for ln in (work / "rank_eval_1.log").read_text().splitlines() if "encoded" in ln and "image files" in ln
        ]
        lines += ["  " + ln.split(": ", 1)[-1] for ln in engine]
        ncores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        lines.append(
            f"  cores {ncores}, load average {os.getloadavg()[0]:.1f} (other jobs inflate "
            f"wall times; the ratio is the figure to compare)"
        )
        print("\n".join(lines))
        return 0
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
