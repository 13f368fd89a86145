#!/usr/bin/env python
"""Training speed of recall_train.py and rank_train.py on this machine.

Full-size models (EfficientNet-B3 + 4-layer BERT from the real bert-base-chinese config),
randomly initialised (the released weights are not used), on the seed-data sample photos
(real JPEGs, 236 to 1024 px). Each script runs in-process for a few optimizer steps; the
figures are the median of the per-step times in its metrics.csv (first step excluded):

- recall_train.py: contrastive step over --batch-size (text, image) pairs, both towers
  training;
- rank_train.py with augmentation (every step encodes 2 x batch images with the frozen
  tower) and with --no-augment --cache-embeddings (images encoded once up front, on the
  --backend engine; that one-off cost is part of the whole-run figure).

The ratio of the two rank_train variants is printed first.

    python bench/bench_train.py [--seed-data ../shared/seed-data] [--steps 4] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rank_train  # noqa: E402
import recall_train  # noqa: E402
from utils.formats.rows import RECORD_SEP  # noqa: E402
from utils.training import read_metrics  # noqa: E402


def step_times(out: Path) -> list[float]:
    return [float(r["seconds"]) for r in read_metrics(out / "metrics.csv") if r["split"] == "train"]


def summary(name: str, times: list[float], batch: int, extra: str = "") -> None:
    t = statistics.median(times[1:] if len(times) > 1 else times)
    print(
        f"{name:44s} {1 / t:7.3f} steps/s  {batch / t:7.2f} samples/s  ({t:.2f} s/step, {len(times)} steps){extra}",
        flush=True,
    )


def run(script, argv: list[str]) -> None:
    rc = script.main(argv)
    if rc:
        raise SystemExit(f"{script.__name__} exited with status {rc}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed-data", default=os.environ.get("AVAS_SEED_DATA", str(ROOT.parent / "shared" / "seed-data")))
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per measurement")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", help="image engine of the one-off encodings")
    args = p.parse_args(argv)
    seed = Path(args.seed_data)
    photos = sorted((seed / "sample-images").glob("*.jpg"))
    bert = seed / "bert-base-chinese"
    if not photos or not (bert / "config.json").is_file():
        raise SystemExit(f"{seed}: needs sample-images/*.jpg and bert-base-chinese/ (set --seed-data)")
    b, n = args.batch_size, args.batch_size * args.steps
    common = [
        "--num-workers",
        "2",
        "--device",
        args.device,
        "--bert-dir",
        str(bert),
        "--backend",
        args.backend,
        "--no-progress",
        "--log-level",
        "WARNING",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # recall: n pairs (photos reused), texts from a few Chinese place names
        img = tmp / "recall_img"
        img.mkdir()
        names = ["西湖", "故宫", "长城", "黄山", "外滩", "鼓浪屿", "丽江古城", "九寨沟"]
        lines = []
        for i in range(n + 8):
            src = photos[i % len(photos)]
            os.symlink(src, img / f"{i}_0{src.suffix}")
            lines.append(f"{i},{names[i % len(names)]}{i},http://127.0.0.1/{i},0,0,0,")
        (tmp / "recall.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        out = tmp / "recall_run"
        t0 = time.perf_counter()
        run(
            recall_train,
            [
                "--csv",
                str(tmp / "recall.csv"),
                "--image-dir",
                str(img),
                "--out-dir",
                str(out),
                "--epochs",
                "1",
                "--batch-size",
                str(b),
                "--val-owners",
                "8",
                "--logit-scale",
                "10",
                *common,
            ],
        )
        recall = (step_times(out), time.perf_counter() - t0)

        # ranking: n pairs of photos, no POI tables
        rimg = tmp / "rank_img"
        rimg.mkdir()
        rows = []
        for i in range(n + 4):
            a, bb = photos[(2 * i) % len(photos)], photos[(2 * i + 1) % len(photos)]
            os.symlink(a, rimg / f"it{i}_a{a.suffix}")
            os.symlink(bb, rimg / f"it{i}_b{bb.suffix}")
            rows.append(
                RECORD_SEP.join(
                    [
                        f"it{i}",
                        "u",
                        "u",
                        str(1 + i % 2),
                        str(2 - i % 2),
                        f"标题{i}",
                        "cate",
                        "",
                        "",
                        "西湖,故宫" if i % 3 else "",
                    ]
                )
            )
        (tmp / "train.csv").write_text("\n".join(rows[:n]) + "\n", encoding="utf-8")
        (tmp / "val.csv").write_text("\n".join(rows[n:]) + "\n", encoding="utf-8")
        rargs = [
            "--train-csv",
            str(tmp / "train.csv"),
            "--val-csv",
            str(tmp / "val.csv"),
            "--image-dir",
            str(rimg),
            "--epochs",
            "1",
            "--batch-size",
            str(b),
            *common,
        ]
        res = {}
        for label, extra in (("augmented", []), ("cached", ["--no-augment", "--cache-embeddings"])):
            out = tmp / f"rank_{label}"
            t0 = time.perf_counter()
            run(rank_train, rargs + ["--out-dir", str(out), *extra])
            res[label] = (step_times(out), time.perf_counter() - t0)
            shutil.rmtree(out)
        ta, wa = res["augmented"]
        tc, wc = res["cached"]
        sa, sc = statistics.median(ta[1:]), statistics.median(tc[1:])
        print(
            f"--cache-embeddings: {sa / sc:.0f}x faster per step; whole runs of {args.steps} steps "
            f"(incl. the one-off encoding of {2 * n} train + 8 val images): {wa:.0f} s vs {wc:.0f} s. "
            f"Over many epochs the cached run costs ~one augmented epoch plus "
            f"{sc:.3f} s/step."
        )
        summary(f"recall_train (B3+BERT-4, batch {b})", recall[0], b, f"; whole run {recall[1]:.0f} s")
        summary(f"rank_train augmented (batch {b} pairs)", ta, b, f"; whole run {wa:.0f} s")
        summary(f"rank_train --cache-embeddings (batch {b})", tc, b, f"; whole run {wc:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
