#!/usr/bin/env python
"""Speed of rank_eval.py end to end with full-size models: pairs/s and peak RSS.

    python bench/bench_rank.py --pairs 150
    AVAS_SEED_DATA=/path/to/seed-data python bench/bench_rank.py --pairs 200 --num-workers 2

Set-up (in a temporary directory, removed afterwards unless --keep):
- a randomly initialised full-size ranker (EfficientNet-B3 + 4-layer BERT recall copy,
  the released layout; ~230 MB) saved with models.checkpoint.save_ranker_checkpoint;
- the real bert-base-chinese config/vocab, the first N rows of the real val CSV (real
  titles and POI lists) and the real pic-num table from the seed data;
- POI vector tables: random unit vectors for every name of the pic-num table (.npz);
- images: the 30 sample photos (236 to 1024 px) copied round-robin to
  ``<item_id>_a.jpg`` / ``<item_id>_b.jpg``, so every pair has two distinct files to
  decode and encode, as in the real run.

rank_eval.py then runs in a child process (imports, model load, table load, encoding,
head, outputs: everything a user waits for); the bench prints its wall time, pairs/s,
the child's peak RSS, and extrapolates to the 1000 pairs of the val set. Scores are
meaningless (random weights); only the time is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.align import AlignArch, AlignModel  # noqa: E402
from models.checkpoint import save_ranker_checkpoint  # noqa: E402
from models.ranker import SiameseRanker  # noqa: E402
from utils.data import RECORD_SEP  # noqa: E402
from utils.poi import load_poi_table, save_safe_table  # noqa: E402

VAL_CSV = "dwd_mml_train_dataset_1007_urls_val_with_poi_tuomin.csv"
PIC_NUM = "temp_dataset_item_pois_relation_1129_poi_2_pic_num.npy"


def default_seed_data() -> Path:
    return Path(os.environ.get("AVAS_SEED_DATA", ROOT.parent / "shared" / "seed-data"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pairs", type=int, default=150, help="pairs to score (the val set has 1000)")
    p.add_argument("--seed-data", type=Path, default=default_seed_data(),
                   help="seed data directory (env AVAS_SEED_DATA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--preprocess", default="reference")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return p


def make_inputs(work: Path, seed: Path, n_pairs: int) -> dict:
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

    names = list(load_poi_table(seed / PIC_NUM))
    rng = np.random.default_rng(0)
    tables = {}
    for kind in ("img", "name"):
        v = rng.normal(size=(len(names), 512)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        tables[kind] = save_safe_table(dict(zip(names, v)), work / f"poi_{kind}.npz")

    torch.manual_seed(0)
    model = SiameseRanker(AlignModel.from_bert_dir(bert, AlignArch())).eval()
    ckpt = work / "ranker_random.ckpt"
    save_ranker_checkpoint(model, ckpt)
    del model
    return dict(csv=csv_path, images=img_dir, ckpt=ckpt, bert=bert, pic=seed / PIC_NUM, **tables)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_rank_"))
    try:
        t0 = time.perf_counter()
        inp = make_inputs(work, args.seed_data, args.pairs)
        print(f"set-up: {args.pairs} pairs, {2 * args.pairs} image files, random full-size ranker "
              f"({inp['ckpt'].stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        metrics = work / "metrics.json"
        cmd = [sys.executable, str(ROOT / "rank_eval.py"), "--csv", str(inp["csv"]),
               "--image-dir", str(inp["images"]), "--checkpoint", str(inp["ckpt"]),
               "--bert-dir", str(inp["bert"]), "--poi-pic-num", str(inp["pic"]),
               "--poi-image-vectors", str(inp["img"]), "--poi-name-vectors", str(inp["name"]),
               "--output", str(work / "scores.csv"), "--metrics", str(metrics),
               "--device", args.device, "--preprocess", args.preprocess,
               "--precision", args.precision, "--quiet"]
        if args.batch_size:
            cmd += ["--batch-size", str(args.batch_size)]
        if args.num_workers is not None:
            cmd += ["--num-workers", str(args.num_workers)]
        t1 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t1
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, sep="\n")
            return 1
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        rss_kb = ru.ru_maxrss  # KiB on Linux
        cpu = ru.ru_utime + ru.ru_stime  # rank_eval and its decoding workers
        m = json.loads(metrics.read_text(encoding="utf-8"))
        enc = [ln for ln in proc.stderr.splitlines() if "encoded" in ln and "rank_eval" in ln]
        print(f"rank_eval.py end to end: {wall:.1f} s for {m['pairs_scored']} pairs "
              f"= {m['pairs_scored'] / wall:.2f} pairs/s (inside main: {m['seconds']:.1f} s)")
        for ln in enc:
            print("  " + ln.split(": ", 1)[-1])
        print(f"peak RSS of the rank_eval process: {rss_kb / 1024:.0f} MiB")
        ncores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"CPU time (rank_eval + workers): {cpu:.1f} s = {cpu / m['pairs_scored']:.3f} s per pair; "
              f"on {ncores} otherwise idle cores that is about {cpu / ncores:.0f} s wall "
              f"(load average now {os.getloadavg()[0]:.1f}: other jobs inflate the wall time)")
        per_pair = m["seconds"] / m["pairs_scored"]
        print(f"extrapolated to 1000 pairs: {1000 * wall / m['pairs_scored'] / 60:.1f} min wall as "
              f"measured; {1000 * cpu / m['pairs_scored'] / ncores / 60:.1f} min from CPU time on "
              f"{ncores} idle cores (linear; the fixed start-up part makes both upper bounds; "
              f"{per_pair:.3f} s per pair inside main)")
        print(f"device {args.device}, torch threads {torch.get_num_threads()}, "
              f"cores {os.cpu_count()}, preprocess {args.preprocess}, precision {args.precision}")
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
