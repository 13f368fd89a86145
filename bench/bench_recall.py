#!/usr/bin/env python
"""Speed of the recall stage on this machine, with the full-size model (random weights)
and real-sized photos.

    python bench/bench_recall.py            # --n 300 images, about 5-10 minutes on 2 cores
    python bench/bench_recall.py --n 100 --skip-fast --bf16-images 0

Gallery: the 30 sample photos of the seed data (AVAS_SEED_DATA or --seed-data, default
../shared/seed-data beside the repo) scaled to ~2.15 MP (the recall set's average), each
copy slightly different (size, mirror, brightness), saved as JPEG ``<poi>_<rank>.jpg``,
10 per POI, with real POI names from the published recall CSV. The model is built from
the real bert-base-chinese config, randomly initialised (BN running statistics set
from a batch of the sample photos, else every image gets the same vector), saved as a
checkpoint.

Figures (images/s unless said otherwise):
  (a) model alone on ready tensors: torch fp32 NCHW and channels_last, ONNX Runtime
      (--backend onnx; its max |vector diff| from torch), bf16 autocast on a few images;
  (b) recall_infer.py end to end (in-process main(): model load, decoding in workers,
      encoding, texts, scores, top-k + full CSV), reference and fast preprocessing;
      the image stage alone is shown too; --backend onnx (its max |score diff| from torch);
  (c) sequential baseline, same work: model load, decode + resize one image at a time in
      the main process, batches of 16, NCHW fp32, each POI name encoded on its own, all
      scores written as full CSV rows.
Checks: (b) >= 0.8 x (a) reference / 0.9 x (a) fast; (b) >= 2 x (c) (torch and onnx);
scores of (b) and (c) within 1e-4, of onnx and torch within 1e-5; peak RSS (main + workers) < 3 GB; a cached rerun of 5000 images < 15 s
(timed as encode_images over 5000 cached files); deviations of fast preprocessing and
bf16 from the exact path, in scores and recall@K.
"""
from __future__ import annotations

import argparse
import csv
import json
import importlib.util
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from tqdm import tqdm  # noqa: E402

import recall_infer  # noqa: E402
from models.align import AlignModel, load_tokenizer  # noqa: E402
from utils.embed import tokenize  # noqa: E402
from models.checkpoint import load_align_model, save_align_checkpoint  # noqa: E402
from utils.cache import EmbeddingCache  # noqa: E402
from utils.data import iter_recall_csv, poi_of_image  # noqa: E402
from utils.embed import encode_images  # noqa: E402
from utils.images import load_image  # noqa: E402
from utils.onnx_backend import OnnxImageEncoder  # noqa: E402
from utils.metrics import recall_at_k  # noqa: E402

log = logging.getLogger("bench_recall")
TARGET_PIXELS = 2.15e6


class PeakRSS:
    """Samples the memory of this process (RSS) plus its children (DataLoader workers;
    their USS, since forked workers share most pages with the parent)."""

    def __init__(self, every: float = 0.1):
        self.every, self.peak, self.stop = every, 0, threading.Event()
        self.proc = psutil.Process()

    def _run(self):
        while not self.stop.is_set():
            try:
                total = self.proc.memory_info().rss
                for c in self.proc.children(recursive=True):
                    try:
                        total += c.memory_full_info().uss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self.stop.wait(self.every)

    def __enter__(self):
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()


def cpu_seconds() -> float:
    """user + system CPU time of this process and its reaped children (DataLoader workers)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def make_gallery(seed_data: Path, out: Path, n: int) -> tuple[Path, list[Path]]:
    """n ~2 MP JPEGs, 10 per POI, and a recall CSV naming them."""
    samples = sorted((seed_data / "sample-images").glob("*.jpg"))
    if not samples:
        raise SystemExit(f"{seed_data}/sample-images: no sample photos (set --seed-data / AVAS_SEED_DATA)")
    names = list(dict.fromkeys(r.poi_name for r in iter_recall_csv(seed_data / "temp_recall_biztype0_fc5_imagern_500.csv")))
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows, paths = [], []
    for i in tqdm(range(n), desc="writing 2 MP JPEGs", unit="img"):
        poi, rank = 10000 + i // 10, i % 10 + 1
        path = img_dir / f"{poi}_{rank}.jpg"
        if not path.is_file():
            im = Image.open(samples[i % len(samples)]).convert("RGB")
            w, h = im.size
            s = (TARGET_PIXELS * rng.uniform(0.85, 1.15) / (w * h)) ** 0.5
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
            if (i // len(samples)) % 2:
                im = ImageOps.mirror(im)
            im = Image.eval(im, lambda v, d=int(rng.integers(-12, 13)): max(0, min(255, v + d)))
            im.save(path, format="JPEG", quality=90)
        paths.append(path)
        rows.append([poi, names[(i // 10) % len(names)], f"https://example.invalid/{poi}_{rank}", rank,
                     0, 0, 0])
    csv_path = out / "recall.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return csv_path, paths


def read_full(path) -> tuple[list[str], list[str], np.ndarray]:
    """(poi ids, image names, Q x N scores) of a full-format file in file order."""
    pois, images, scores = [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        for p, _, img, s in csv.reader(f):
            if not pois or pois[-1] != p:
                pois.append(p)
                scores.append([])
            if len(pois) == 1:
                images.append(os.path.basename(img))
            scores[-1].append(float(s))
    return pois, images, np.array(scores)


def calibrate_bn(model, paths, n: int = 16) -> None:
    """Random EfficientNet weights with BN's default running stats (0, 1) make the
    activations vanish (features ~1e-12: every image gets the same vector, every score
    ties). Set the running stats from one batch of photos so vectors depend on the
    image, as with trained weights; nothing else changes."""
    x = torch.stack([load_image(p)[0] for p in paths[:n]])
    for m in model.image_model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.image_model.train()
        model.image_model(x)
    model.eval()


def bench_model_alone(model, paths, batch_size: int, batches: int, bf16_images: int,
                      onnx_dir: Path | None = None) -> dict:
    x = torch.stack([load_image(p)[0] for p in paths[:batch_size]])
    out = {}
    with torch.inference_mode():
        model.image_model.to(memory_format=torch.contiguous_format)
        ref = model.encode_image(x)  # warm-up
        t = time.perf_counter()
        for _ in range(batches):
            model.encode_image(x)
        out["nchw"] = batch_size * batches / (time.perf_counter() - t)
    if onnx_dir is not None:
        t = time.perf_counter()
        enc = OnnxImageEncoder(model, cache_dir=onnx_dir)
        out["onnx_setup"] = time.perf_counter() - t
        out["onnx_diff"] = (enc(x) - ref).abs().max().item()  # also the warm-up
        t, c = time.perf_counter(), cpu_seconds()
        for _ in range(batches):
            enc(x)
        out["onnx"] = batch_size * batches / (time.perf_counter() - t)
        out["onnx_cpu_ms"] = 1000 * (cpu_seconds() - c) / (batch_size * batches)
        del enc
    x = x.contiguous(memory_format=torch.channels_last)
    model.image_model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        model.encode_image(x)  # warm-up
        t, c = time.perf_counter(), cpu_seconds()
        for _ in range(batches):
            e = model.encode_image(x)
        out["fp32"] = batch_size * batches / (time.perf_counter() - t)
        out["cpu_ms"] = 1000 * (cpu_seconds() - c) / (batch_size * batches)
        if bf16_images:
            xb = x[:bf16_images]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                t = time.perf_counter()
                eb = model.encode_image(xb, normalize=False)
                out["bf16"] = len(xb) / (time.perf_counter() - t)
            out["emb_fp32"] = e[:bf16_images]
            out["emb_bf16"] = torch.nn.functional.normalize(eb.float(), dim=1)
    return out


def sequential_baseline(ckpt, bert_dir, csv_path, img_dir, out_csv, batch: int = 16) -> float:
    """The naive path: everything in the main process, one image / one name at a time."""
    t0 = time.perf_counter()
    model = load_align_model(ckpt, bert_dir)
    model.image_model.to(memory_format=torch.contiguous_format)
    tok = load_tokenizer(bert_dir)
    rows = list(iter_recall_csv(csv_path))
    paths = [Path(img_dir) / f"{r.key}.jpg" for r in rows]
    queries = dict.fromkeys((r.poi_id, r.poi_name) for r in rows)
    with torch.inference_mode():
        embs = []
        for a in tqdm(range(0, len(paths), batch), desc="(c) sequential", unit="batch"):
            x = torch.stack([load_image(p)[0] for p in paths[a:a + batch]])
            embs.append(model.encode_image(x))
        img = torch.cat(embs)
        txt = torch.cat([model.encode_text(**tokenize(tok, [name])) for _, name in queries])
        scores = (txt @ img.t()).tolist()
    with open(out_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        for (poi, name), row in zip(queries, scores):
            for p, s in zip(paths, row):
                w.writerow([poi, name, str(p), f"{s:.9g}"])
    return time.perf_counter() - t0


def run_infer(tag, csv_path, img_dir, ckpt, bert_dir, out: Path, *extra) -> tuple[float, dict]:
    argv = ["--csv", str(csv_path), "--image-dir", str(img_dir), "--checkpoint", str(ckpt),
            "--bert-dir", str(bert_dir), "--output", str(out / f"{tag}_top10.csv"),
            "--full-output", str(out / f"{tag}_full.csv"), "--device", "cpu", "--log-level", "WARNING",
            *extra]
    t, c = time.perf_counter(), cpu_seconds()
    if recall_infer.main(argv) != 0:
        raise SystemExit(f"recall_infer failed for {tag}")
    dt = time.perf_counter() - t
    meta = json.loads((out / f"{tag}_top10.csv.meta.json").read_text(encoding="utf-8"))
    meta["cpu_s"] = cpu_seconds() - c
    return dt, meta


def bench_cache_lookup(model, out: Path, n: int) -> tuple[float, float]:
    """(seconds for the first fingerprinting of n files, seconds for an all-hit
    encode_images over them)."""
    d = out / "cache_files"
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    files = []
    for i in range(n):
        p = d / f"{i // 10}_{i % 10}.jpg"
        if not p.exists():
            p.write_bytes(rng.bytes(2048))
        files.append(p)
    cache = EmbeddingCache(out / "cache_lookup", "align:bench")
    ns = cache.namespace("reference", "fp32")
    t = time.perf_counter()
    keys = cache.content_keys(files)
    first = time.perf_counter() - t
    cache.put_many([(k, rng.standard_normal(512).astype(np.float32), True) for k in keys], ns)
    cache.close()
    cache = EmbeddingCache(out / "cache_lookup", "align:bench")
    stats = {}
    t = time.perf_counter()
    emb, _ = encode_images(model, files, cache=cache, stats=stats, progress=False)
    dt = time.perf_counter() - t
    assert stats["encoded"] == 0 and emb.shape == (n, 512), stats
    cache.close()
    return first, dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="gallery images (default 300)")
    p.add_argument("--seed-data", default=os.environ.get("AVAS_SEED_DATA", str(ROOT.parent / "shared" / "seed-data")))
    p.add_argument("--workdir", help="keep generated files here (default: a temporary directory)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, help="recall_infer --num-workers (default: its own)")
    p.add_argument("--model-batches", type=int, default=4, help="batches timed for (a)")
    p.add_argument("--cache-n", type=int, default=5000)
    p.add_argument("--skip-fast", action="store_true")
    p.add_argument("--bf16-images", type=int, default=2,
                   help="images timed in bf16 for (a) and its deviation (0 = skip; emulated, so very "
                        "slow, on AVX2-only CPUs)")
    p.add_argument("--bf16-e2e", action="store_true", help="also run recall_infer --precision bf16")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--skip-onnx", action="store_true", help="no ONNX Runtime figures")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    seed = Path(args.seed_data)
    bert_dir = seed / "bert-base-chinese"
    if not (bert_dir / "config.json").is_file():
        raise SystemExit(f"{bert_dir}: bert config not found (set --seed-data or AVAS_SEED_DATA)")
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench_recall_")
    out = Path(args.workdir or tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    onnx_dir = None
    if not args.skip_onnx:
        if importlib.util.find_spec("onnxruntime") is None:
            print("onnxruntime not installed: no ONNX figures (pip install onnxruntime onnx)")
        else:
            onnx_dir = out / "onnx"
            os.environ["AVAS_ONNX_CACHE"] = str(onnx_dir)  # recall_infer's export goes there too
    extra = ["--batch-size", str(args.batch_size), "--no-progress"]
    if args.num_workers is not None:
        extra += ["--num-workers", str(args.num_workers)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"n={args.n}, batch {args.batch_size}; load average {os.getloadavg()[0]:.1f} "
          f"(other work on the machine slows every figure)")

    csv_path, paths = make_gallery(seed, out, args.n)
    mp = np.mean([np.prod(Image.open(q).size) for q in paths[:30]]) / 1e6
    print(f"gallery: {len(paths)} JPEGs, {mp:.2f} MP average, {len(paths) // 10} POIs")
    torch.manual_seed(0)
    model = AlignModel.from_bert_dir(bert_dir).eval()
    calibrate_bn(model, [str(q) for q in sorted((seed / "sample-images").glob("*.jpg"))])
    ckpt = out / "align_random.pth"
    save_align_checkpoint(model, ckpt)
    res = {}

    with PeakRSS() as rss:
        # (a)
        a = bench_model_alone(model, paths, args.batch_size, args.model_batches, args.bf16_images, onnx_dir)
        res["a"], res["a_nchw"] = a["fp32"], a["nchw"]
        print(f"(a) model alone, ready tensors, batch {args.batch_size}, fp32: torch NCHW {a['nchw']:.1f} img/s, "
              f"torch channels_last {a['fp32']:.1f} img/s ({a['cpu_ms']:.0f} CPU ms/img)")
        if "onnx" in a:
            res["a_onnx"] = a["onnx"]
            print(f"(a) model alone, ONNX Runtime: {a['onnx']:.1f} img/s ({a['onnx_cpu_ms']:.0f} CPU ms/img; "
                  f"x{a['onnx'] / a['fp32']:.2f} channels_last, x{a['onnx'] / a['nchw']:.2f} NCHW); max |emb diff| "
                  f"vs torch {a['onnx_diff']:.1e}; export + check {a['onnx_setup']:.1f} s (once per weights)")
        if "bf16" in a:
            tok = load_tokenizer(bert_dir)
            names = list(dict.fromkeys(r.poi_name for r in iter_recall_csv(csv_path)))
            with torch.inference_mode():
                txt = model.encode_text(**tokenize(tok, names))
            ds = (txt @ a["emb_bf16"].t() - txt @ a["emb_fp32"].t()).abs()
            print(f"(a) bf16 autocast on {args.bf16_images} images: {a['bf16']:.2f} img/s "
                  f"(CPU capability {torch.backends.cpu.get_cpu_capability()}); vs fp32: max |emb diff| "
                  f"{(a['emb_fp32'] - a['emb_bf16']).abs().max().item():.4f}, max |score diff| "
                  f"{ds.max().item():.4f}, mean {ds.mean().item():.4f}")
        del a
        # (b)
        dt, meta = run_infer("ref", csv_path, out / "images", ckpt, bert_dir, out, *extra)
        res["b_ref"] = args.n / dt
        res["b_ref_stage"] = meta["images_per_s"]
        print(f"(b) recall_infer end to end, reference: {res['b_ref']:.1f} img/s ({dt:.1f} s total; image "
              f"stage {meta['images_per_s']:.1f} img/s; {1000 * meta['cpu_s'] / args.n:.0f} CPU ms/img; "
              f"timings {meta['timings_s']})")
        if onnx_dir is not None:
            dt, meta = run_infer("onnx", csv_path, out / "images", ckpt, bert_dir, out, "--backend", "onnx",
                                 *extra)
            res["b_onnx"] = args.n / dt
            res["b_onnx_stage"] = meta["images_per_s"]
            print(f"(b) recall_infer end to end, reference, --backend onnx: {res['b_onnx']:.1f} img/s ({dt:.1f} s "
                  f"total; image stage {meta['images_per_s']:.1f} img/s; {1000 * meta['cpu_s'] / args.n:.0f} CPU "
                  f"ms/img; image backend {meta['image_backend']}; timings {meta['timings_s']})")
        if not args.skip_fast:
            dt, meta = run_infer("fast", csv_path, out / "images", ckpt, bert_dir, out,
                                 "--preprocess", "fast", *extra)
            res["b_fast"] = args.n / dt
            res["b_fast_stage"] = meta["images_per_s"]
            print(f"(b) recall_infer end to end, fast:      {res['b_fast']:.1f} img/s ({dt:.1f} s total; image "
                  f"stage {meta['images_per_s']:.1f} img/s; {1000 * meta['cpu_s'] / args.n:.0f} CPU ms/img)")
        if args.bf16_e2e:
            dt, meta = run_infer("bf16", csv_path, out / "images", ckpt, bert_dir, out,
                                 "--precision", "bf16", *extra)
            res["b_bf16"] = args.n / dt
            print(f"(b) recall_infer end to end, bf16:      {res['b_bf16']:.1f} img/s ({dt:.1f} s total; image "
                  f"stage {meta['images_per_s']:.1f} img/s)")
        # cached rerun of the real gallery (a fresh cache, also with a reused --workdir)
        shutil.rmtree(out / "cache", ignore_errors=True)
        dt1, m1 = run_infer("cached", csv_path, out / "images", ckpt, bert_dir, out,
                            "--cache-dir", str(out / "cache"), *extra)
        dt2, m2 = run_infer("cached", csv_path, out / "images", ckpt, bert_dir, out,
                            "--cache-dir", str(out / "cache"), *extra)
        print(f"cache: first run {dt1:.1f} s ({m1['images_encoded']} encoded), rerun {dt2:.1f} s "
              f"({m2['images_encoded']} encoded, {m2['images_cached']} cached; image stage "
              f"{m2['timings_s']['images']:.2f} s)")
    peak_b = rss.peak
    # (c)
    if not args.skip_baseline:
        c = cpu_seconds()
        dt = sequential_baseline(ckpt, bert_dir, csv_path, out / "images", out / "seq_full.csv")
        c = cpu_seconds() - c
        res["c"] = args.n / dt
        print(f"(c) sequential baseline (NCHW fp32, batch 16, one name at a time): {res['c']:.1f} img/s "
              f"({dt:.1f} s; {1000 * c / args.n:.0f} CPU ms/img)")
    first, dt = bench_cache_lookup(model, out, args.cache_n)
    print(f"cache lookup of {args.cache_n} files: {dt:.2f} s all hits (first fingerprinting {first:.2f} s "
          f"for {args.cache_n} x 2 KB files)")

    # deviations
    qp, imgs, ref = read_full(out / "ref_full.csv")
    gp = [poi_of_image(i) for i in imgs]
    ks = (1, 5, 10)
    r_ref = recall_at_k(ref, qp, gp, ks)
    print(f"recall@K with random weights, reference: {r_ref} (chance-level; shown to compare)")
    dev_onnx = None
    if (out / "onnx_full.csv").is_file():
        _, imgs2, s = read_full(out / "onnx_full.csv")
        assert imgs2 == imgs
        dev_onnx = np.abs(s - ref).max()
        print(f"onnx vs torch: max |score diff| {dev_onnx:.2e}; recall@K {recall_at_k(s, qp, gp, ks)}")
    for tag in ("fast", "bf16"):
        f = out / f"{tag}_full.csv"
        if f.is_file():
            _, imgs2, s = read_full(f)
            assert imgs2 == imgs
            d = np.abs(s - ref)
            print(f"{tag} vs exact: max |score diff| {d.max():.5f}, mean {d.mean():.5f}; recall@K "
                  f"{recall_at_k(s, qp, gp, ks)}")
    if not args.skip_baseline:
        _, imgs3, s = read_full(out / "seq_full.csv")
        dev_c = np.abs(s - ref).max()
        print(f"(b) vs (c) scores: max |diff| {dev_c:.2e}")

    # verdicts
    def check(name, ok):
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    print("targets:")
    check(f"(b) reference >= 0.8 x (a): {res['b_ref'] / res['a']:.2f} end to end, "
          f"{res['b_ref_stage'] / res['a']:.2f} image stage", res["b_ref"] >= 0.8 * res["a"])
    if "b_fast" in res:
        check(f"(b) fast >= 0.9 x (a): {res['b_fast'] / res['a']:.2f} end to end, "
              f"{res['b_fast_stage'] / res['a']:.2f} image stage", res["b_fast"] >= 0.9 * res["a"])
    if "c" in res:
        check(f"(b) >= 2 x (c) in fp32: {res['b_ref'] / res['c']:.2f}", res["b_ref"] >= 2 * res["c"])
        check(f"(b) and (c) scores within 1e-4: {dev_c:.2e}", dev_c <= 1e-4)
        if "b_onnx" in res:
            check(f"(b) --backend onnx >= 2 x (c) in fp32: {res['b_onnx'] / res['c']:.2f}",
                  res["b_onnx"] >= 2 * res["c"])
    if dev_onnx is not None:
        check(f"onnx and torch scores within 1e-5: {dev_onnx:.2e}", dev_onnx <= 1e-5)
    check(f"peak RSS (main + workers) < 3 GB: {peak_b / 1e9:.2f} GB", peak_b < 3e9)
    check(f"cached rerun of {args.cache_n} images < 15 s: {dt:.2f} s", dt < 15)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
