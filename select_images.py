#!/usr/bin/env python
"""Pick the image to show for each item of your own catalogue with the two-stage selector.

    python select_images.py --items catalogue.csv --out selection.csv \\
        --ranker-checkpoint data/shoucai_siamese_train_concat_poi_020_0.6520.ckpt \\
        --recall-checkpoint data/align_model.pth --bert-dir data/bert-base-chinese \\
        [--poi-pic-num T1 --poi-image-vectors T2 --poi-name-vectors T3] [--html report.html]

Input (``--items``): a CSV with the header ``item_id,title,poi_names,image``, one row per
candidate image. ``image`` is a local path -- a relative path is resolved against the
directory of the CSV file, not the working directory -- or an http(s) URL, downloaded once
into ``--image-cache`` (default ``<out>.images/``) under a name made from a hash of the URL,
so a rerun reuses it. ``poi_names`` is a comma-separated list and may be empty.

Stage 1 (recall): every readable candidate is scored against its item's title with the
recall model (cosine of the normalised vectors); the top ``--recall-k`` per item go on.
Stage 2 (ranking): those are scored by the ranker (SPEC section 5) with the item's POI
inputs built as in rank_eval.py (utils/poi.py): with the three POI tables the POI sequence
is sorted by pic-num weight and looked up; without tables it is empty (poi_len 0). In both
cases pois_feature is the text of poi_names when it is not blank, else the title.
Final order: the stage-2 candidates by ranker score, then the others by recall score; the
first is selected. ``--recall-only`` skips stage 2.

Models: the ranker checkpoint holds its own copy of the recall model. When
``--recall-checkpoint`` holds the same weights (compared by hash), or is omitted, image
vectors are computed once and used by both stages ("single" encode path); otherwise stage
2 encodes its short-listed images again with the ranker's copy ("two" encode path). Every
distinct image file and text is encoded once per model, batched across items.

Output (``--out``): one row per candidate, in CSV order:
    item_id,line,image,status,recall_score,recall_rank,ranker_score,final_rank,selected,file,detail
status: ok | missing (local file absent) | download_failed | unreadable (does not decode)
| duplicate (the same image listed earlier for the item: scored once, never selected).
Candidates that are not ok get no scores and are never selected; an item with no ok
candidate gets no selection and is reported. ``ranker_score`` is blank for candidates that
did not reach stage 2. ``<out>.summary.json`` records counts, the encode path, unknown POIs,
bad CSV rows (by line; they are left out) and timings. ``--html`` writes a visual report.

Exit status: 0 on success (also when some items have no readable image), 2 for bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import torch

from models.align import load_tokenizer
from models.checkpoint import (BENIGN_EXTRAS, CheckpointError, load_align_model, load_ranker,
                               read_checkpoint)
from utils.hashing import model_hash, state_dict_hash
from utils.cache import EmbeddingCache
from utils.cli import non_negative_int, positive_int, setup_logging
from utils.data import DataError
from utils.cli import DEVICE_CHOICES, resolve_device
from utils.embed import PRECISIONS, encode_images, encode_texts
from utils.images import PREPROCESS_MODES
from utils.poi import MAX_POIS, ItemInputs, load_poi_tables, pois_text, PoiTableError
from utils.select import (DOWNLOAD_FAILED, DUPLICATE, MISSING, OK, UNREADABLE, assign_final_ranks,
                          assign_recall_ranks, mark_duplicates, read_catalogue, resolve_images,
                          write_output, write_report)

log = logging.getLogger("select_images")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="select_images.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--items", required=True,
                   help="catalogue CSV: item_id,title,poi_names,image (one row per candidate)")
    g.add_argument("--ranker-checkpoint", help="ranker checkpoint (required unless --recall-only)")
    g.add_argument("--recall-checkpoint",
                   help="recall checkpoint for stage 1 (default: the ranker's own copy)")
    g.add_argument("--bert-dir", required=True, help="directory with bert-base-chinese config.json and vocab.txt")
    g.add_argument("--arch", help="architecture JSON for a small variant, applied to both models "
                                  "(default: recorded in the checkpoints, else the released one)")
    g.add_argument("--poi-pic-num", help="pic-num table (.npy published or .npz safe format)")
    g.add_argument("--poi-image-vectors", help="POI mean image vector table")
    g.add_argument("--poi-name-vectors", help="POI name vector table")
    g.add_argument("--trust-pickle", action="store_true",
                   help="load .npy tables with plain np.load(allow_pickle=True) (code in them would run)")
    o = p.add_argument_group("outputs")
    o.add_argument("--out", required=True, help="output CSV, one row per candidate")
    o.add_argument("--html", help="also write a visual HTML report")
    o.add_argument("--summary", help="summary JSON (default <out>.summary.json)")
    r = p.add_argument_group("running")
    r.add_argument("--recall-k", type=positive_int, default=5,
                   help="candidates per item passed to the ranker (default 5)")
    r.add_argument("--recall-only", action="store_true", help="stage 1 only: select by recall score")
    r.add_argument("--image-cache", help="directory for downloaded images (default <out>.images)")
    r.add_argument("--download-workers", type=positive_int, default=8, help="concurrent downloads")
    r.add_argument("--timeout", type=float, default=30.0, help="per-download read timeout, seconds")
    r.add_argument("--cache-dir", help="embedding cache directory (utils/cache.py)")
    r.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    r.add_argument("--batch-size", type=positive_int, help="images per batch (default 32 CPU, 128 CUDA)")
    r.add_argument("--text-batch-size", type=positive_int, default=64)
    r.add_argument("--head-batch-size", type=positive_int, default=512)
    r.add_argument("--workers", type=non_negative_int,
                   help="image decoding worker processes (0: main process; default one per core)")
    r.add_argument("--preprocess", choices=PREPROCESS_MODES, default="reference",
                   help="reference = the authors' exact preprocessing; fast = JPEG draft decoding")
    r.add_argument("--precision", choices=PRECISIONS, default="fp32")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------
def _align_hash_of_file(path: str) -> str:
    """Hash of the recall weights in a checkpoint (wrapper, bare, or a ranker's copy),
    computed like ``model_hash`` of the loaded model (benign extras left out)."""
    sd, _ = read_checkpoint(path)
    if any(k.startswith("align_model.") for k in sd):
        sd = {k[len("align_model."):]: v for k, v in sd.items() if k.startswith("align_model.")}
    return state_dict_hash({k: v for k, v in sd.items() if k not in BENIGN_EXTRAS})


def load_models(args, device):
    """``(recall_model, ranker or None, path, hashes)``; ``path`` is "single" when stage 1
    uses the ranker's own copy of the recall model (same weights), "two" otherwise,
    "recall-only" with --recall-only."""
    ranker = None
    hashes = {}
    if not args.recall_only:
        ranker = load_ranker(args.ranker_checkpoint, args.bert_dir, arch=args.arch, device=device)
        hashes["ranker_align"] = model_hash(ranker.align_model)
        log.info("ranker %s loaded (recall copy %s...)", args.ranker_checkpoint, hashes["ranker_align"][:12])
        if not args.recall_checkpoint:
            hashes["recall"] = hashes["ranker_align"]
            log.info("no --recall-checkpoint: stage 1 uses the ranker's copy (single encode path)")
            return ranker.align_model, ranker, "single", hashes
        hashes["recall"] = _align_hash_of_file(args.recall_checkpoint)
        if hashes["recall"] == hashes["ranker_align"]:
            log.info("%s holds the same weights as the ranker's copy: image vectors are computed "
                     "once for both stages (single encode path)", args.recall_checkpoint)
            return ranker.align_model, ranker, "single", hashes
    src = args.recall_checkpoint or args.ranker_checkpoint
    recall = load_align_model(src, args.bert_dir, arch=args.arch, device=device)
    hashes["recall"] = model_hash(recall)
    if ranker is None:
        log.info("recall model %s loaded (%s...); --recall-only", src, hashes["recall"][:12])
        return recall, None, "recall-only", hashes
    log.info("%s differs from the ranker's copy of the recall model (%s... vs %s...): stage 2 "
             "encodes its short-listed images again (two encode path)", src, hashes["recall"][:12],
             hashes["ranker_align"][:12])
    return recall, ranker, "two", hashes


def load_tables(args, dim: int):
    """The three POI tables, or ``None`` when none is given (all three or none)."""
    given = [args.poi_pic_num, args.poi_image_vectors, args.poi_name_vectors]
    if not any(given):
        return None
    if not all(given):
        raise PoiTableError("--poi-pic-num, --poi-image-vectors and --poi-name-vectors go together: "
                            "give all three or none")
    return load_poi_tables(*given, dim=dim, trust_pickle=args.trust_pickle)


def item_inputs(title: str, poi_names: str, tables, dim: int) -> ItemInputs:
    """As rank_eval: utils.poi.build_item_inputs with the tables; without tables no POI
    sequence (poi_len 0) and pois_feature text per the SPEC rule."""
    if tables is not None:
        return tables.inputs(title, poi_names)
    zeros = np.zeros((MAX_POIS, dim), dtype=np.float32)
    return ItemInputs(pois_text(title, poi_names), [], zeros, zeros.copy(), 0, [])


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------
def run(args) -> dict:
    """Select images for ``args`` (parsed by build_parser); writes the outputs and returns
    the summary. Raises DataError / CheckpointError / PoiTableError / FileNotFoundError on
    unusable input."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    device = resolve_device(args.device)
    progress = not args.quiet and sys.stderr.isatty()
    if not args.recall_only and not args.ranker_checkpoint:
        raise DataError("--ranker-checkpoint is required (or --recall-only with --recall-checkpoint)")
    if args.recall_only and not (args.recall_checkpoint or args.ranker_checkpoint):
        raise DataError("--recall-only needs --recall-checkpoint (or --ranker-checkpoint for its copy)")

    # -- catalogue -----------------------------------------------------------
    t = time.perf_counter()
    errors: list = []
    items = read_catalogue(args.items, errors)
    for e in errors[:20]:
        log.warning("bad row left out: %s", e)
    if len(errors) > 20:
        log.warning("... and %d more bad rows", len(errors) - 20)
    cands = [c for it in items for c in it.cands]
    if not cands:
        raise DataError(f"{args.items}: no usable rows ({len(errors)} bad)")
    log.info("%s: %d items, %d candidate rows, %d bad rows", args.items, len(items), len(cands), len(errors))
    timings["read"] = time.perf_counter() - t

    # -- models and tables -----------------------------------------------------
    t = time.perf_counter()
    recall, ranker, path, hashes = load_models(args, device)
    tokenizer = load_tokenizer(args.bert_dir)
    dim = recall.arch.embed_dim
    tables = load_tables(args, ranker.align_model.arch.embed_dim) if ranker is not None else None
    if ranker is not None and tables is None:
        log.info("no POI tables: every item's POI sequence is empty (poi_len 0)")
    timings["load_models"] = time.perf_counter() - t

    # -- images: local paths and downloads ------------------------------------
    t = time.perf_counter()
    image_cache = args.image_cache or f"{args.out}.images"
    fetch = resolve_images(items, os.path.dirname(os.path.abspath(args.items)), image_cache,
                           workers=args.download_workers, timeout=args.timeout, progress=progress)
    n_dup = mark_duplicates(items)
    if n_dup:
        log.warning("%d rows repeat an image already listed for the same item; scored once, "
                    "marked duplicate", n_dup)
    timings["resolve"] = time.perf_counter() - t

    def caches(model_hash_: str):
        return EmbeddingCache(args.cache_dir, f"align:{model_hash_}") if args.cache_dir else None

    def encode_files(model, files, cache, desc, stats):
        if not files:
            return {}, {}
        emb, ok = encode_images(model, files, args.batch_size, device, mode=args.preprocess,
                                num_workers=args.workers, precision=args.precision, cache=cache,
                                stats=stats, progress=progress, desc=desc)
        return {f: emb[i] for i, f in enumerate(files)}, {f: bool(ok[i]) for i, f in enumerate(files)}

    # -- stage 1: recall -------------------------------------------------------
    t = time.perf_counter()
    cache1 = caches(hashes["recall"])
    files1 = list(dict.fromkeys(c.file for c in cands if c.status == OK))
    stats1: dict = {}
    vec1, ok1 = encode_files(recall, files1, cache1, "stage 1", stats1)
    for c in cands:
        if c.status == OK and not ok1[c.file]:
            c.status, c.detail = UNREADABLE, "does not decode as an image"
    timings["stage1_images"] = time.perf_counter() - t

    inputs = {it.item_id: item_inputs(it.title, it.poi_names, tables, dim) for it in items} \
        if ranker is not None else {}
    t = time.perf_counter()
    titles = list(dict.fromkeys(it.title for it in items))
    feat_texts = list(dict.fromkeys(inp.pois_text for inp in inputs.values()))
    if path == "single":  # one model: every distinct text once
        texts = list(dict.fromkeys(titles + feat_texts))
        tv = encode_texts(recall, tokenizer, texts, args.text_batch_size, device, args.precision)
        title_vec = feat_vec = {s: tv[i] for i, s in enumerate(texts)}
    else:
        tv = encode_texts(recall, tokenizer, titles, args.text_batch_size, device, args.precision)
        title_vec = {s: tv[i] for i, s in enumerate(titles)}
        feat_vec = {}
        if ranker is not None and feat_texts:
            fv = encode_texts(ranker.align_model, tokenizer, feat_texts, args.text_batch_size, device,
                              args.precision)
            feat_vec = {s: fv[i] for i, s in enumerate(feat_texts)}
        texts = titles + feat_texts
    timings["texts"] = time.perf_counter() - t

    for it in items:
        tvec = title_vec[it.title]
        for c in it.scored:
            c.recall_score = float(vec1[c.file] @ tvec)
        assign_recall_ranks(it)

    # -- stage 2: ranking ------------------------------------------------------
    short = [c for it in items for c in it.scored if c.recall_rank <= args.recall_k] \
        if ranker is not None else []
    stats2: dict = {}
    t = time.perf_counter()
    if path == "two" and short:
        cache2 = caches(hashes["ranker_align"])
        files2 = list(dict.fromkeys(c.file for c in short))
        vec2, ok2 = encode_files(ranker.align_model, files2, cache2, "stage 2", stats2)
        if cache2 is not None:
            cache2.close()
        bad2 = [f for f in files2 if not ok2[f]]
        if bad2:  # read once already; a file that changed in between
            log.warning("%d short-listed images became unreadable during the run", len(bad2))
            short = [c for c in short if ok2[c.file]]
    else:
        vec2 = vec1
    timings["stage2_images"] = time.perf_counter() - t

    t = time.perf_counter()
    if short:
        scores = []
        with torch.inference_mode():
            for a in range(0, len(short), args.head_batch_size):
                chunk = short[a:a + args.head_batch_size]
                inp = [inputs[c.item_id] for c in chunk]
                s = ranker.score_embeddings(
                    torch.stack([vec2[c.file] for c in chunk]).to(device),
                    torch.stack([feat_vec[x.pois_text] for x in inp]).to(device),
                    torch.from_numpy(np.stack([x.poi_img for x in inp])).to(device),
                    torch.from_numpy(np.stack([x.poi_txt for x in inp])).to(device),
                    torch.tensor([x.poi_len for x in inp], device=device))
                scores.extend(s.float().cpu().reshape(-1).tolist())
        for c, s in zip(short, scores):
            c.ranker_score = s
    for it in items:
        assign_final_ranks(it)
    timings["head"] = time.perf_counter() - t
    if cache1 is not None:
        cache1.close()

    # -- outputs ----------------------------------------------------------------
    t = time.perf_counter()
    write_output(args.out, items)
    timings["write"] = time.perf_counter() - t

    no_sel = [it.item_id for it in items if it.selected is None]
    unknown = sorted({n for x in inputs.values() for n in x.unknown})
    status_counts = {s: sum(c.status == s for c in cands)
                     for s in (OK, MISSING, DOWNLOAD_FAILED, UNREADABLE, DUPLICATE)}
    summary = {
        "items_csv": args.items, "out": args.out, "items": len(items), "candidates": len(cands),
        "bad_rows": len(errors), "bad_row_list": [str(e) for e in errors],
        "encode_path": path, "recall_k": args.recall_k,
        "recall_checkpoint": args.recall_checkpoint, "ranker_checkpoint": args.ranker_checkpoint,
        "recall_weights_sha256": hashes.get("recall"),
        "ranker_recall_copy_sha256": hashes.get("ranker_align"),
        "poi_tables": tables is not None,
        "items_selected": len(items) - len(no_sel), "items_without_readable_candidate": no_sel,
        "status_counts": status_counts, "downloads": fetch, "image_cache": image_cache,
        "stage2_candidates": len(short),
        "images_encoded": {"stage1": stats1.get("encoded", 0), "stage1_cached": stats1.get("cached", 0),
                           "stage2": stats2.get("encoded", 0), "stage2_cached": stats2.get("cached", 0)},
        "distinct_images": len(files1), "texts_encoded": len(dict.fromkeys(texts)),
        "items_with_unknown_poi": sum(bool(x.unknown) for x in inputs.values()),
        "unknown_pois": unknown,
        "device": str(device), "preprocess": args.preprocess, "precision": args.precision,
    }
    if no_sel:
        shown = ", ".join(no_sel[:10]) + (" ..." if len(no_sel) > 10 else "")
        log.warning("%d items have no readable candidate and get no selection: %s", len(no_sel), shown)
    if unknown:
        log.warning("%d distinct POI names are missing from a vector table (zero vectors), in %d items: %s",
                    len(unknown), summary["items_with_unknown_poi"],
                    ", ".join(repr(n) for n in unknown[:10]) + (" ..." if len(unknown) > 10 else ""))
    if args.html:
        t = time.perf_counter()
        head = {"items": len(items), "candidates": len(cands), "selected": summary["items_selected"],
                "without readable candidate": len(no_sel), "encode path": path,
                "recall k": args.recall_k if ranker is not None else "recall only",
                "unreadable/missing/failed": status_counts[UNREADABLE] + status_counts[MISSING]
                + status_counts[DOWNLOAD_FAILED], "duplicates": status_counts[DUPLICATE],
                "unknown POIs": len(unknown), "bad CSV rows": len(errors)}
        summary["html"] = write_report(args.html, items, head, title=f"Image selection: {args.items}",
                                       progress=progress)
        timings["html"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    summary["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    summary["items_per_s"] = round(len(items) / max(timings["total"], 1e-9), 3)
    summary_path = args.summary or f"{args.out}.summary.json"
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=1)
    log.info("wrote %s: %d candidates, %d of %d items selected (%s encode path, %d images encoded "
             "for stage 1, %d for stage 2); %.1f s, %.2f items/s", args.out, len(cands),
             summary["items_selected"], len(items), path, summary["images_encoded"]["stage1"],
             summary["images_encoded"]["stage2"], timings["total"], summary["items_per_s"])
    return summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        run(args)
    except (DataError, CheckpointError, PoiTableError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        print(f"select_images: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
