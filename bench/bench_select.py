#!/usr/bin/env python
"""Speed of select_images.py on this machine: items/s with the full-size models (random
weights) and where the time goes.

    python bench/bench_select.py                     # 200 items x 10 candidates
    python bench/bench_select.py --items 50          # smaller; extrapolate
    python bench/bench_select.py --separate-recall   # a different recall checkpoint: two encode path
    python bench/bench_select.py --ray --items 24 --candidates 4
        # the driver's peak RSS at 10k / 100k / 1M catalogue rows, local vs Ray
        # (bench/select_rss.py, one process per run); then the local path and the Ray path
        # with 1 and 2 actors on the same catalogue (one Ray session): items/s of each and
        # the ratios Ray/local and 2 actors/1 actor

Catalogue: ``--items`` items with ``--candidates`` images each, every image a distinct
file: the 30 sample photos of the seed data (AVAS_SEED_DATA or --seed-data, default
../shared/seed-data beside the repo) at their own size (236-1024 px a side, as catalogue
photos are), each copy slightly different (crop, mirror, brightness), saved as JPEG.
Titles are real POI names of the published recall CSV plus a suffix; poi_names are 1-3
names of the published pic-num table, whose image / name vector tables are random (the
real ones are large downloads) so that the POI attention is really exercised. The ranker
is built from the real bert-base-chinese config, randomly initialised and saved; by
default the recall checkpoint is its own copy (single encode path).

select_images.py runs in-process (main()) once; the figures come from its summary:
items/s end to end and without model loading, and the share of the run in each stage:
decode+encode images (stage 1, and stage 2 in the two-path case), text encoding, the
stage-2 head, I/O (CSV read, image resolution, CSV write) and model loading. Setup time
(images, checkpoints) is not counted. Nothing is asserted.

``--ray``: the same catalogue through the local path and through ``--ray`` with 1 and with
2 actors (``--cpus-per-actor`` each, default half a core so that the fetch/decode tasks
keep a core on a 2-core machine). The Ray session is started once before the Ray runs and
its start-up is reported apart; each Ray figure is end to end otherwise (driver checks,
actors loading their models, the stages, the merge). Printed first: the ratios.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

import select_images  # noqa: E402
from models.align import AlignModel  # noqa: E402
from models.checkpoint import save_align_checkpoint, save_ranker_checkpoint  # noqa: E402
from models.ranker import SiameseRanker  # noqa: E402
from utils.formats.poi import load_poi_table, save_tables  # noqa: E402
from utils.formats.rows import iter_recall_csv  # noqa: E402

log = logging.getLogger("bench_select")
SEED_DEFAULT = Path(os.environ.get("AVAS_SEED_DATA", ROOT.parent / "shared" / "seed-data"))
RECALL_CSV = "temp_recall_biztype0_fc5_imagern_500.csv"
PIC_NUM = "temp_dataset_item_pois_relation_1129_poi_2_pic_num.npy"


def make_variant(src: Path, dst: Path, seed: int) -> None:
    """A slightly different copy: crop up to 6% a side, mirror half the time, +-15% brightness."""
    rng = random.Random(seed)
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        box = (
            int(w * rng.uniform(0, 0.06)),
            int(h * rng.uniform(0, 0.06)),
            w - int(w * rng.uniform(0, 0.06)),
            h - int(h * rng.uniform(0, 0.06)),
        )
        im = im.crop(box)
        if rng.random() < 0.5:
            im = ImageOps.mirror(im)
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.85, 1.15))
        im.save(dst, "JPEG", quality=88)


def build_catalogue(seed_data: Path, work: Path, n_items: int, n_cands: int, dim: int) -> dict:
    samples = sorted(p for p in (seed_data / "sample-images").iterdir() if p.suffix.lower() == ".jpg")
    if not samples:
        raise SystemExit(f"{seed_data}/sample-images: no sample photos")
    names = list(dict.fromkeys(r.poi_name for r in iter_recall_csv(seed_data / RECALL_CSV)))
    pic = load_poi_table(seed_data / PIC_NUM)
    poi_names = sorted(pic)
    rng = np.random.default_rng(0)
    # random vector tables for the POIs (a few left out: unknown POIs, as in real data)
    known = [n for i, n in enumerate(poi_names) if i % 10]
    tables = {}
    for key in ("img", "name"):
        v = rng.normal(size=(len(known), dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        tables[key] = work / f"poi_{key}.npz"
        save_tables({tables[key]: dict(zip(known, v))})
    tables["pic"] = seed_data / PIC_NUM

    img_dir = work / "catalogue" / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    jobs, rows = [], [["item_id", "title", "poi_names", "image"]]
    r = random.Random(0)
    for i in range(n_items):
        title = f"{names[i % len(names)]}门票一日游"
        pois = ",".join(r.sample(poi_names, r.randint(1, 3))) if i % 4 else ""
        for j in range(n_cands):
            k = i * n_cands + j
            rel = f"images/{i}_{j}.jpg"
            jobs.append((samples[k % len(samples)], img_dir / f"{i}_{j}.jpg", k))
            rows.append([f"item{i}", title, pois, rel])
    todo = [j for j in jobs if not j[1].exists()]
    t = time.perf_counter()
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda a: make_variant(*a), todo))
    log.info(
        "made %d catalogue images in %.1f s (%d reused)", len(todo), time.perf_counter() - t, len(jobs) - len(todo)
    )
    csv_path = work / "catalogue" / "items.csv"
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return {"csv": csv_path, **tables}


def _selected(out: Path) -> list[tuple[str, str, str]]:
    with open(out, encoding="utf-8", newline="") as f:
        return [(r["item_id"], r["line"], r["selected"]) for r in csv.DictReader(f)]


def bench_rss(rows: list[int], work: Path) -> None:
    """Driver peak RSS of both runners per catalogue size (each run its own process)."""
    import subprocess

    print(f"\nbench_select --ray: driver peak RSS (MB), 4 rows per item, {os.cpu_count()} CPUs")
    print(f"  {'rows':>9}  {'local':>7}  {'ray':>7}  {'local s':>8}  {'ray s':>7}")
    for n in rows:
        got = {}
        for runner in ("local", "ray"):
            cmd = [sys.executable, str(ROOT / "bench" / "select_rss.py"), runner, str(n), str(work / "rss")]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                raise SystemExit(f"select_rss.py {runner} {n}: {r.stderr[-2000:]}")
            got[runner] = json.loads(r.stdout.strip().splitlines()[-1])
        loc, ray = got["local"], got["ray"]
        print(f"  {n:>9}  {loc['peak_rss_mb']:>7}  {ray['peak_rss_mb']:>7}  {loc['s']:>8}  {ray['s']:>7}")


def bench_ray(args, argv_sel: list[str], work: Path) -> int:
    """Local path, then --ray with 1 and 2 actors, on the same catalogue; ratios first."""
    import ray

    from utils.selection import connect_ray

    argv_sel = [a for a in argv_sel]
    i = argv_sel.index("--out")
    runs = {}

    def one(name, extra):
        out = work / f"{name}.csv"
        argv = argv_sel[: i + 1] + [str(out)] + argv_sel[i + 2 :] + extra
        t = time.perf_counter()
        if select_images.main(argv) != 0:
            raise SystemExit(f"select_images.py ({name}) failed")
        wall = time.perf_counter() - t
        s = json.loads(Path(f"{out}.summary.json").read_text(encoding="utf-8"))
        runs[name] = {"wall_s": wall, "items": s["items"], "items_per_s": s["items"] / wall, "selected": _selected(out)}
        log.info("%s: %.1f s, %.3f items/s", name, wall, s["items"] / wall)

    bench_rss(args.rss_rows, work)
    one("local", [])
    t = time.perf_counter()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1
    connect_ray(None, num_cpus=os.cpu_count(), log_to_driver=False, _node_ip_address="127.0.0.1")
    ray_start = time.perf_counter() - t
    try:
        for n in (1, 2):
            one(
                f"ray_{n}",
                [
                    "--ray",
                    "--actors",
                    str(n),
                    "--cpus-per-actor",
                    str(args.cpus_per_actor),
                    "--shard-items",
                    str(args.shard_items),
                ],
            )
    finally:
        ray.shutdown()
    loc, r1, r2 = runs["local"], runs["ray_1"], runs["ray_2"]
    same = loc["selected"] == r1["selected"] == r2["selected"]
    print(
        f"\nbench_select --ray: {loc['items']} items x {args.candidates} candidates, backend "
        f"{args.backend}, {os.cpu_count()} CPUs, shards of {args.shard_items} items, "
        f"{args.cpus_per_actor:g} CPU per actor"
    )
    print(f"  Ray 1 actor / local:      {r1['items_per_s'] / loc['items_per_s']:.2f}x")
    print(f"  Ray 2 actors / 1 actor:   {r2['items_per_s'] / r1['items_per_s']:.2f}x")
    print(f"  local:        {loc['wall_s']:7.1f} s  {loc['items_per_s']:.3f} items/s")
    print(f"  Ray 1 actor:  {r1['wall_s']:7.1f} s  {r1['items_per_s']:.3f} items/s")
    print(f"  Ray 2 actors: {r2['wall_s']:7.1f} s  {r2['items_per_s']:.3f} items/s")
    print(
        f"  (Ray session start, not counted above: {ray_start:.1f} s; same selections in all "
        f"three runs: {'yes' if same else 'NO'})"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {k: {kk: vv for kk, vv in v.items() if kk != "selected"} for k, v in runs.items()}
                | {"ray_start_s": ray_start},
                indent=1,
            ),
            encoding="utf-8",
        )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--recall-k", type=int, default=5)
    p.add_argument("--seed-data", type=Path, default=SEED_DEFAULT)
    p.add_argument("--workdir", type=Path, help="keep the generated files here (default: a temp dir)")
    p.add_argument(
        "--separate-recall", action="store_true", help="a recall checkpoint with other weights: the two encode path"
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--preprocess", default="reference", choices=("reference", "fast"))
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"))
    p.add_argument("--ray", action="store_true", help="compare the local path with --ray at 1 and 2 actors (ratios)")
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--shard-items", type=int, default=4)
    p.add_argument(
        "--rss-rows", type=int, nargs="*", default=[10_000, 100_000, 1_000_000], help="catalogue sizes of the RSS runs"
    )
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bert = args.seed_data / "bert-base-chinese"
    if not (bert / "config.json").is_file():
        raise SystemExit(f"{bert}: no config.json (set AVAS_SEED_DATA or --seed-data)")

    tmp = None
    work = args.workdir
    if work is None:
        tmp = tempfile.mkdtemp(prefix="bench_select_")
        work = Path(tmp)
    work.mkdir(parents=True, exist_ok=True)
    try:
        torch.manual_seed(0)
        ranker = SiameseRanker(AlignModel.from_bert_dir(bert)).eval()
        save_ranker_checkpoint(ranker, work / "ranker.ckpt")
        recall_ckpt = work / "recall.pth"
        if args.separate_recall:
            torch.manual_seed(1)
            save_align_checkpoint(AlignModel.from_bert_dir(bert), recall_ckpt)
        else:
            save_align_checkpoint(ranker.align_model, recall_ckpt)
        dim = ranker.align_model.arch.embed_dim
        del ranker
        cat = build_catalogue(args.seed_data, work, args.items, args.candidates, dim)

        out = work / "selection.csv"
        argv_sel = [
            "--items",
            str(cat["csv"]),
            "--out",
            str(out),
            "--ranker-checkpoint",
            str(work / "ranker.ckpt"),
            "--recall-checkpoint",
            str(recall_ckpt),
            "--bert-dir",
            str(bert),
            "--poi-pic-num",
            str(cat["pic"]),
            "--poi-image-vectors",
            str(cat["img"]),
            "--poi-name-vectors",
            str(cat["name"]),
            "--recall-k",
            str(args.recall_k),
            "--device",
            "cpu",
            "--preprocess",
            args.preprocess,
            "--no-progress",
            "--backend",
            args.backend,
        ]
        if args.batch_size:
            argv_sel += ["--batch-size", str(args.batch_size)]
        if args.workers is not None:
            argv_sel += ["--workers", str(args.workers)]
        if args.ray:
            return bench_ray(args, argv_sel, work)
        t = time.perf_counter()
        rc = select_images.main(argv_sel)
        wall = time.perf_counter() - t
        if rc != 0:
            raise SystemExit(f"select_images.py failed with exit status {rc}")
        s = json.loads(Path(f"{out}.summary.json").read_text(encoding="utf-8"))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    tm = s["timings_s"]
    total = tm["total"]
    work_s = total - tm["load_models"]
    stages = {
        "decode+encode images (stage 1)": tm["stage1_images"],
        "decode+encode images (stage 2)": tm["stage2_images"],
        "text encode": tm["texts"],
        "stage-2 head (+ ordering)": tm["head"],
        "I/O (CSV read, resolve, CSV write)": tm["read"] + tm["resolve"] + tm["write"],
        "model + table loading": tm["load_models"],
    }
    other = total - sum(stages.values())
    n_img = s["images_encoded"]["stage1"] + s["images_encoded"]["stage2"]
    print(
        f"\nbench_select: {s['items']} items x {args.candidates} candidates, {s['encode_path']} "
        f"encode path, recall-k {args.recall_k}, {torch.get_num_threads()} torch threads, "
        f"preprocess {args.preprocess}"
    )
    print(f"  end to end (select_images.main): {total:.1f} s  -> {s['items'] / total:.3f} items/s (wall {wall:.1f} s)")
    print(
        f"  without model loading:           {work_s:.1f} s  -> {s['items'] / work_s:.3f} items/s, "
        f"{n_img / max(tm['stage1_images'] + tm['stage2_images'], 1e-9):.1f} images/s encoded"
    )
    print(
        f"  stage-2 candidates: {s['stage2_candidates']}; images encoded: {s['images_encoded']}; "
        f"texts encoded: {s['texts_encoded']}"
    )
    for name, sec in stages.items():
        print(f"  {name:38s} {sec:8.2f} s  {100 * sec / total:5.1f} %")
    print(f"  {'other (summary, bookkeeping)':38s} {other:8.2f} s  {100 * other / total:5.1f} %")
    if args.items != 200:
        per_item = work_s / s["items"]
        print(
            f"  extrapolated to 200 items: {tm['load_models'] + 200 * per_item:.0f} s "
            f"(model loading once + {per_item:.2f} s per item)"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"summary": s, "stages_s": stages, "wall_s": wall}, indent=1, ensure_ascii=False),
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
