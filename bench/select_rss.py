"""Driver memory of select_images' two runners on a large synthetic catalogue, one run
per process (``python bench/select_rss.py local|ray ROWS WORKDIR``): prints the driver's
peak RSS. The catalogue's rows (4 per item) point at a few hundred small real image files;
the models are stand-ins (no encoding: the scores are made up), so that what is measured
is what the driver holds: the local runner's items, or the Ray runner's counts."""

from __future__ import annotations

import csv
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FILES = 300


@dataclass
class StubModels:
    path: str = "recall-only"
    hashes: dict = field(default_factory=lambda: {"recall": "stub"})


def load(files, device, backend):
    return StubModels(), None


def score(items, models, tables, scoring, clock=None, image_loader=None):
    """Ranks by a made-up score (the line's hash): the bookkeeping of a real block."""
    for it in items:
        for r, c in enumerate(sorted(it.scored, key=lambda c: -(hash(c.image) % 997)), 1):
            c.recall_score, c.recall_rank, c.final_rank, c.selected = float(hash(c.image) % 997), r, r, r == 1
    return {"images_encoded": {"stage1": 0, "stage2": 0}, "stage2_candidates": 0, "backend": "none"}


def catalogue(work: Path, rows: int) -> Path:
    import numpy as np
    from PIL import Image

    imgs = work / "imgs"
    if not imgs.is_dir():
        imgs.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(FILES):
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(imgs / f"{i}.jpg", quality=80)
    path = work / f"cat{rows}.csv"
    if not path.exists():
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["item_id", "title", "poi_names", "image"])
            for r in range(rows):
                w.writerow([f"item{r // 4}", f"title {r // 4}", "", f"imgs/{(r * 7 + r // 4) % FILES}.jpg"])
    return path


def main(runner: str, rows: int, work: Path) -> None:
    from utils.args import Encoding
    from utils.selection import ModelFiles, RayOptions, Scoring, Selection, run_local, run_on_ray

    items = catalogue(work, rows)
    out = work / f"{runner}{rows}" / ("sel.csv" if runner == "local" else "shards")
    enc = Encoding(device="cpu", progress=False)
    job = Selection(str(items), str(out), ModelFiles(bert_dir=str(work), recall_only=True), Scoring(1, enc))
    t = time.perf_counter()
    if runner == "local":
        s = run_local(job, load, score)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        s = run_on_ray(job, RayOptions(actors=1, cpus_per_actor=0.5, shard_items=2500), load, score)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"runner": runner, "rows": rows, "peak_rss_mb": round(rss), "s": round(time.perf_counter() - t, 1),
                      "candidates": s["candidates"]}))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
