#!/usr/bin/env python
"""Stage 1 inference: score every POI name against every gallery image (SPEC section 4).

    python recall_infer.py --csv data/temp_recall_biztype0_fc5_imagern_500.csv \\
        --image-dir data/recall_images --checkpoint align_model.pth \\
        --bert-dir data/bert-base-chinese --output results/recall_top10.csv

    # the paper's baseline, Taiyi-CLIP with the authors' fine-tuned text encoder
    python recall_infer.py --model taiyi --csv data/temp_recall_biztype0_fc5_imagern_500.csv \\
        --image-dir data/recall_images --taiyi-text-dir assets/taiyi-clip-roberta-102m-chinese \\
        --taiyi-text-weights assets/weights/taiyi_text_finetuned.bin \\
        --clip-dir assets/clip-vit-base-patch32 --output results/taiyi_top10.csv

Models (--model, models/factory.py): ``align`` (default, the paper's model: --checkpoint,
--bert-dir) or ``taiyi`` (the Taiyi-CLIP baseline: --taiyi-text-dir, --clip-dir, optional
--taiyi-text-weights). Each brings its own tokenizer and image preprocessing (align: the
reference squash to 224 with ImageNet mean/std; taiyi: CLIP's shortest side to 224,
bicubic, centre crop, CLIP mean/std); outputs, cache and evaluation are the same for all.

Gallery: one image per CSV row, found in --image-dir as ``<poi_id>_<rank>.<ext>``
(any image extension; ``utils.data.index_images``), kept in CSV order. Queries: every
distinct poi_id with its name (each distinct name is encoded once).

Missing and unreadable images (the count is logged and each one is listed in
--missing-list, default ``<output>.missing.tsv``):
  * missing on disk (no file for the row): NOT in the gallery, by default and always,
    since the authors' gallery held only the files they had downloaded;
  * present but unreadable: by default kept as the all-zero image, as the authors'
    scripts did (SPEC 3), so the figure stays comparable; --skip-missing drops them.

Outputs:
  --output       top --topk images per POI, CSV with a header:
                 ``poi_id,poi_name,rank,image,score`` (image = file name in --image-dir);
  --full-output  optional, the authors' format: one row per (POI, image), no header,
                 ``poi_id,poi_name,image_path,score`` (500 x 5000 rows for the real set);
  ``<output>.meta.json``  what was run: gallery size, top-k, counts, timings, hashes.
Scores are cosines of the normalised vectors (``logit_scale`` is not applied: it does not
change any ranking). Ranking uses a stable descending sort, so ties keep gallery order,
as in the authors' evaluator. Evaluate with recall_eval.py.

Speed: decoding runs in DataLoader workers, the image tower in channels_last under
inference_mode, texts in batches; --precision bf16/fp16 moves scores (~1e-2) and is
faster only with native support (GPU, AVX-512 BF16 / AMX CPUs). --cache-dir keeps image
vectors (keyed by file content, model identity = name + weights hash, preprocessing and
precision) so a rerun encodes only new images.

--backend onnx runs the image tower with ONNX Runtime (CPU, fp32; needs
``pip install onnxruntime onnx``): about 2x the images/s of torch on a CPU. The tower is
exported once per weights to ``<--cache-dir>/onnx`` (or ``$AVAS_ONNX_CACHE``, else
``~/.cache/avas/onnx``) and checked against torch on every run (max |diff| <= 1e-5, else a
warning and torch is used). Because the vectors agree to 1e-5, the two backends share the
embedding cache (the backend is not part of its key) and give the same rankings up to
ties closer than 1e-5.

Exit status: 0 on success, 2 for bad input (CSV, checkpoint, directories).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from models.checkpoint import CheckpointError
from models.factory import MODELS, build_recall_model, missing_options
from utils.cache import EmbeddingCache
from utils.data import DataError, index_images, iter_recall_csv, poi_of_image
from utils.cli import DEVICE_CHOICES, resolve_device
from utils.embed import PRECISIONS, default_batch_size, default_num_workers
from utils.onnx_backend import BACKENDS, OnnxBackendError, OnnxImageEncoder
from utils.images import PREPROCESS_MODES

log = logging.getLogger("recall_infer")
TOPK_HEADER = ("poi_id", "poi_name", "rank", "image", "score")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", required=True, help="recall-format CSV (poi_id,poi_name,image_url,rank,...)")
    p.add_argument("--image-dir", required=True, help="directory of <poi_id>_<rank>.<ext> images")
    p.add_argument("--output", required=True, help="top-k CSV to write (with header)")
    p.add_argument("--full-output", help="also write every (POI, image) score in the authors' format")
    p.add_argument("--topk", type=int, default=10, help="images kept per POI in --output (default 10)")
    p.add_argument("--skip-missing", action="store_true",
                   help="drop unreadable images from the gallery instead of scoring them as the "
                        "zero image (images missing on disk are always left out)")
    p.add_argument("--missing-list", help="where to list missing/unreadable images "
                                          "(default <output>.missing.tsv, written only when there are some)")
    p.add_argument("--preprocess", choices=PREPROCESS_MODES, default="reference",
                   help="reference = the authors' exact path (default); fast = JPEG draft decoding")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default, exact); bf16/fp16 autocast: faster on GPUs and CPUs with "
                        "AVX-512 BF16/AMX (emulated, far slower, on AVX2-only CPUs); scores move ~1e-2")
    p.add_argument("--backend", choices=BACKENDS[1:], default="torch",
                   help="image tower runtime: torch (default) or onnx (ONNX Runtime, CPU fp32, same "
                        "vectors within 1e-5, ~2x faster; pip install onnxruntime onnx)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("--batch-size", type=int, help="images per batch (default: 32 on CPU, 128 on CUDA)")
    p.add_argument("--text-batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, help="decoding worker processes (default: half the cores on CPU, "
                                                  "all with --backend onnx or on CUDA; max 8)")
    p.add_argument("--cache-dir", help="embedding cache directory (reruns encode only new images)")
    p.add_argument("--model-name", help="model kind recorded in cache keys (default: the --model name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    g = p.add_argument_group("model (--model NAME and its files)")
    g.add_argument("--model", choices=list(MODELS), default="align",
                   help="recall model: " + "; ".join(f"{k} = {e.help}" for k, e in MODELS.items())
                        + " (default align)")
    for entry in MODELS.values():
        for name, help_text in entry.options.items():
            g.add_argument("--" + name.replace("_", "-"), help=help_text)
    args = p.parse_args(argv)
    missing = missing_options(args.model, model_paths(args))
    if missing:
        p.error(f"--model {args.model} needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
    if args.topk < 1:
        p.error("--topk must be >= 1")
    return args


def model_paths(args) -> dict:
    """The path options of the chosen ``--model`` (models.factory.MODELS)."""
    return {k: getattr(args, k) for k in MODELS[args.model].options}


def _atomic_writer(path: str):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    return tmp, open(tmp, "w", encoding="utf-8", newline="")


def _fmt(x: float) -> str:
    return f"{x:.9g}"  # round-trips float32: no ties are created by writing


def build_gallery(rows, image_dir):
    """``(gallery, missing, duplicates)``: gallery = [(row, path)] in CSV order for the
    rows whose image file exists; missing = rows without a file."""
    index = index_images(image_dir)
    gallery, missing, seen, dups = [], [], set(), []
    for row in rows:
        if row.key in seen:
            dups.append(row)
            continue
        seen.add(row.key)
        path = index.get(row.key)
        if path is None:
            missing.append(row)
        else:
            gallery.append((row, path))
    return gallery, missing, dups


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    timings = {}
    try:
        device = resolve_device(args.device)
        errors = []
        rows = list(iter_recall_csv(args.csv, errors))
        if errors:
            for e in errors[:10]:
                log.error("%s", e)
            raise DataError(f"{args.csv}: {len(errors)} bad rows (first: {errors[0]})")
        if not rows:
            raise DataError(f"{args.csv}: no rows")
        gallery, missing, dups = build_gallery(rows, args.image_dir)
    except DataError as e:
        log.error("%s", e)
        return 2
    if dups:
        log.warning("%d CSV rows repeat an earlier <poi_id>_<rank> (first: line %d, %s); each image "
                    "is scored once", len(dups), dups[0].line, dups[0].key)
    queries: dict[str, str] = {}
    for row in rows:
        if row.poi_id in queries and queries[row.poi_id] != row.poi_name:
            log.warning("%s line %d: poi_id %s has a second name %r; using the first, %r",
                        args.csv, row.line, row.poi_id, row.poi_name, queries[row.poi_id])
        queries.setdefault(row.poi_id, row.poi_name)
    log.info("%s: %d rows, %d POIs, %d distinct names; %d images found in %s, %d missing on disk",
             args.csv, len(rows), len(queries), len(set(queries.values())), len(gallery),
             args.image_dir, len(missing))
    if not gallery:
        log.error("%s: none of the %d images of %s is there (expected files named <poi_id>_<rank>.<ext>, "
                  "e.g. %s.jpg)", args.image_dir, len(rows), args.csv, rows[0].key)
        return 2

    # -- model ---------------------------------------------------------------
    t = time.perf_counter()
    try:
        rm = build_recall_model(args.model, device=device, backend=args.backend,
                                onnx_cache_dir=os.path.join(args.cache_dir, "onnx") if args.cache_dir else None,
                                **model_paths(args))
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    # the weights' hash keys the cache (hashing 230 MB takes a moment: only when caching)
    weights = rm.weights_hash() if args.cache_dir else None
    model_name = args.model_name or rm.name
    timings["load_model"] = time.perf_counter() - t
    log.info("model %s (%s) loaded on %s, %.1f s", rm.name,
             ", ".join(f"{k}={v}" for k, v in rm.sources.items() if v), device, timings["load_model"])

    image_encoder, image_backend, onnx_diff = None, "torch", None
    if args.backend == "onnx":
        t = time.perf_counter()
        try:
            image_encoder = rm.image_encoder(args.precision)
        except OnnxBackendError as e:
            log.error("--backend onnx: %s", e)
            return 2
        if isinstance(image_encoder, OnnxImageEncoder):
            image_backend, onnx_diff = "onnx", image_encoder.max_abs_diff
        timings["onnx_setup"] = time.perf_counter() - t
        log.info("image backend %s (setup %.1f s)", image_backend, timings["onnx_setup"])

    # -- images --------------------------------------------------------------
    num_workers = default_num_workers(device, image_backend) if args.num_workers is None else args.num_workers
    cache = EmbeddingCache(args.cache_dir, f"{model_name}:{weights}") if args.cache_dir else None
    paths = [p for _, p in gallery]
    stats: dict = {}
    t = time.perf_counter()
    img_emb, ok = rm.encode_images(paths, args.batch_size, precision=args.precision,
                                   mode=args.preprocess, num_workers=num_workers,
                                   cache=cache, stats=stats, progress=not args.no_progress,
                                   desc="gallery")
    timings["images"] = time.perf_counter() - t
    if cache is not None:
        log.info("cache %s: %d hits, %d misses, %d stored, %d files hashed", cache.path, cache.hits,
                 cache.misses, cache.stored, cache.hashed)
        cache.close()
    unreadable = [(row, p) for (row, p), good in zip(gallery, ok.tolist()) if not good]
    if args.skip_missing and unreadable:
        keep = ok.nonzero().flatten()
        gallery = [gallery[i] for i in keep.tolist()]
        img_emb = img_emb[keep]
        log.info("--skip-missing: %d unreadable images dropped from the gallery", len(unreadable))
    elif unreadable:
        log.warning("%d unreadable images are scored as the zero image (reference behaviour; "
                    "--skip-missing drops them)", len(unreadable))
    if missing or unreadable:
        listing = args.missing_list or f"{args.output}.missing.tsv"
        tmp, f = _atomic_writer(listing)
        with f:
            f.write("status\tkey\tline\tpath_or_url\n")
            for row in missing:
                f.write(f"missing\t{row.key}\t{row.line}\t{row.url}\n")
            for row, p in unreadable:
                f.write(f"unreadable\t{row.key}\t{row.line}\t{p}\n")
        os.replace(tmp, listing)
        log.warning("%d images missing on disk (left out), %d unreadable (%s); listed in %s",
                    len(missing), len(unreadable), "dropped" if args.skip_missing else "zero image",
                    listing)
    if not gallery:
        log.error("no readable image left in the gallery")
        return 2

    # -- texts and scores ----------------------------------------------------
    t = time.perf_counter()
    qids = list(queries)
    txt_emb = rm.encode_texts([queries[q] for q in qids], args.text_batch_size,
                              precision=args.precision)
    timings["texts"] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.inference_mode():
        scores = (txt_emb.to(device) @ img_emb.to(device).t()).float()
        k = min(args.topk, scores.shape[1])
        top_vals, top_idx = torch.sort(scores, dim=1, descending=True, stable=True)
        top_vals, top_idx = top_vals[:, :k].cpu().tolist(), top_idx[:, :k].cpu().tolist()
    scores = scores.cpu()
    timings["scores"] = time.perf_counter() - t

    # -- outputs -------------------------------------------------------------
    t = time.perf_counter()
    names = [p.name for _, p in gallery]
    tmp, f = _atomic_writer(args.output)
    with f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(TOPK_HEADER)
        for q, vals, idx in zip(qids, top_vals, top_idx):
            for r, (s, j) in enumerate(zip(vals, idx), 1):
                w.writerow((q, queries[q], r, names[j], _fmt(s)))
    os.replace(tmp, args.output)
    log.info("wrote %s: top %d of %d images for %d POIs", args.output, k, len(gallery), len(qids))
    if args.full_output:
        full_paths = [str(p) for _, p in gallery]
        tmp, f = _atomic_writer(args.full_output)
        with f:
            w = csv.writer(f, lineterminator="\n")
            for q, row in zip(qids, scores.numpy()):
                name = queries[q]
                w.writerows(zip([q] * len(row), [name] * len(row), full_paths, map(_fmt, row.tolist())))
        os.replace(tmp, args.full_output)
        log.info("wrote %s: %d rows (authors' format)", args.full_output, len(qids) * len(gallery))
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    own = {poi_of_image(n) for n in names}
    meta = {
        "csv": args.csv, "image_dir": args.image_dir, "checkpoint": args.checkpoint,
        "model": rm.name, "model_sources": rm.sources,
        "weights_sha256": weights, "model_name": model_name, "preprocess": args.preprocess,
        "precision": args.precision, "device": str(device),
        "backend": args.backend, "image_backend": image_backend, "onnx_max_abs_diff": onnx_diff,
        "batch_size": args.batch_size or default_batch_size(device),
        "num_workers": num_workers,
        "topk": k, "gallery_size": len(gallery), "n_pois": len(qids),
        "n_pois_without_gallery_image": sum(q not in own for q in qids),
        "rows": len(rows), "missing_on_disk": len(missing), "unreadable": len(unreadable),
        "unreadable_policy": "dropped" if args.skip_missing else "zero image",
        "duplicate_rows": len(dups), "images_encoded": stats["encoded"], "images_cached": stats["cached"],
        "timings_s": {k_: round(v, 3) for k_, v in timings.items()},
        "images_per_s": round(stats["encoded"] / max(timings["images"], 1e-9), 2),
        "full_output": args.full_output,
    }
    with open(f"{args.output}.meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    log.info("done in %.1f s (images %.1f s, %d encoded / %d cached)", timings["total"],
             timings["images"], stats["encoded"], stats["cached"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
