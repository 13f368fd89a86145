#!/usr/bin/env python
"""Ranking stage evaluation: the pairwise score of the siamese ranker (published 0.652).

    python rank_eval.py --csv data/dwd_mml_train_dataset_1007_urls_val_with_poi_tuomin.csv \\
        --image-dir data/rank_val_images \\
        --checkpoint data/shoucai_siamese_train_concat_poi_020_0.6520.ckpt \\
        --bert-dir data/bert-base-chinese \\
        --poi-pic-num data/temp_dataset_item_pois_relation_1129_poi_2_pic_num.npy \\
        --poi-image-vectors data/temp_dataset_item_pois_relation_0110_imgs_avg10_vector.npy \\
        --poi-name-vectors data/temp_dataset_item_pois_relation_0110_poi_name_vector.npy \\
        --output rank_val_scores.csv --metrics rank_val_metrics.json

What it does, in order (SPEC section 5):
1. reads the ``$record$`` CSV (label = ctr_a > ctr_b); bad rows are reported by line
   and left out;
2. reads the three POI tables: ``.npz`` in the safe format (``poi_tables.py convert``),
   ``.npy`` (the published pickled dicts) through a restricted unpickler that refuses
   any code, or plainly with ``--trust-pickle``;
3. builds every item's inputs with ``utils.poi.build_item_inputs`` (POI order by the
   pic-num weight, at most 5, lookups by name, the ``<= 1`` / ``< 1`` blank rules);
4. loads the ranker (strict keys) with its own copy of the recall model
   (``--align-checkpoint`` replaces that copy);
5. encodes every distinct ``pois_feature`` text once (batched) and every image file
   once (batched, DataLoader workers decode); the recall model is frozen, so these
   vectors are exactly what the full forward pass would compute;
6. runs the small head (``score_embeddings``) on both images of every pair, batched;
7. prints pairwise accuracy (the published figure), ROC-AUC of sigmoid(s_a - s_b),
   log loss, the constant-guess baseline and counts; ``--output`` writes the per-pair
   CSV ``item_id,label,s_a,s_b,prediction``, ``--metrics`` a JSON of the figures.
   Accuracy and ROC-AUC come with 95% percentile bootstrap intervals over pairs
   (``--bootstrap`` draws, default 10,000, ``--seed``; the AUC is recomputed on every
   draw; utils/bootstrap.py).

Images are found by stem, as download_images.py names them: ``<item_id>_a.<ext>`` and
``<item_id>_b.<ext>``. A missing image is reported and, by default, scored as the
all-zero image (as the authors' scripts did: their loader turned unreadable files into
zeros); ``--skip-missing`` leaves such pairs out and says how many. An image file that
exists but cannot be decoded is treated the same way.

Exit status: 0 on success, 2 for bad arguments or unusable input files.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.align import load_tokenizer
from models.checkpoint import CheckpointError, load_ranker
from utils.cache import EmbeddingCache
from utils.cli import non_negative_int, positive_int, setup_logging
from utils.data import DataError, RankRow, index_images, iter_rank_csv
from utils.cli import DEVICE_CHOICES, resolve_device
from utils.bootstrap import (DEFAULT_DRAWS, DEFAULT_SEED, LEVEL, auc_interval, fmt_interval,
                             mean_interval)
from utils.embed import PRECISIONS, autocast, encode_images, encode_texts
from utils.images import PREPROCESS_MODES, ZERO_TENSOR
from utils.poi import ItemInputs, load_poi_tables, PoiTableError
from utils.metrics import pairwise_metrics

log = logging.getLogger("rank_eval")
OUTPUT_HEADER = ("item_id", "label", "s_a", "s_b", "prediction")


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rank_eval.py",
        description="Pairwise evaluation of the siamese CTR ranker on a $record$ ranking CSV "
                    "(SPEC section 5; the paper's 0.652 is the pairwise accuracy).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--csv", required=True, help="ranking CSV ($record$ format, e.g. the val set)")
    g.add_argument("--image-dir", required=True,
                   help="directory with <item_id>_a.<ext> and <item_id>_b.<ext> (download_images.py)")
    g.add_argument("--checkpoint", required=True,
                   help="ranker checkpoint (bare state dict holding its recall model under align_model.)")
    g.add_argument("--bert-dir", required=True, help="directory with bert-base-chinese config.json and vocab.txt")
    g.add_argument("--poi-pic-num", required=True,
                   help="pic-num table (name -> [n0, n1, n2]): published .npy or safe .npz")
    g.add_argument("--poi-image-vectors", required=True,
                   help="POI mean image vector table: published .npy or safe .npz")
    g.add_argument("--poi-name-vectors", required=True,
                   help="POI name vector table: published .npy or safe .npz")
    g.add_argument("--align-checkpoint", default=None,
                   help="recall checkpoint that replaces the ranker's own copy of the recall model")
    g.add_argument("--arch", default=None,
                   help="architecture JSON for a small variant (default: the checkpoint's sidecar, "
                        "else the released architecture)")
    g.add_argument("--trust-pickle", action="store_true",
                   help="load .npy tables with np.load(allow_pickle=True); code in them would run. "
                        "Without it a restricted unpickler that refuses code is used")
    o = p.add_argument_group("outputs")
    o.add_argument("--output", default=None, help="per-pair CSV: item_id,label,s_a,s_b,prediction")
    o.add_argument("--metrics", default=None, help="JSON file of the figures and counts")
    r = p.add_argument_group("running")
    r.add_argument("--skip-missing", action="store_true",
                   help="leave out pairs with a missing or unreadable image instead of scoring "
                        "that image as the all-zero image (the authors' behaviour)")
    r.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    r.add_argument("--preprocess", choices=PREPROCESS_MODES, default="reference",
                   help="image preprocessing; 'reference' reproduces the published numbers")
    r.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="recall-model precision for the image and text vectors (fp32 reproduces)")
    r.add_argument("--cache-dir", default=None,
                   help="embedding cache directory (utils/cache.py): a rerun encodes only new images")
    r.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per batch (default: 32 on CPU, 128 on CUDA)")
    r.add_argument("--text-batch-size", type=positive_int, default=64, help="texts per batch")
    r.add_argument("--head-batch-size", type=positive_int, default=256, help="pairs per head batch")
    r.add_argument("--num-workers", type=non_negative_int, default=None,
                   help="DataLoader workers decoding images (0: in the main process; "
                        "default: one per core on CPU)")
    r.add_argument("--limit", type=positive_int, default=None, help="use only the first N pairs")
    r.add_argument("--bootstrap", type=non_negative_int, default=DEFAULT_DRAWS, metavar="N",
                   help="bootstrap draws over pairs for the 95%% intervals of accuracy and AUC "
                        "(0: none)")
    r.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------
@dataclass
class Pair:
    row: RankRow
    inputs: ItemInputs
    path_a: Path | None
    path_b: Path | None


@dataclass
class Result:
    pairs: list[Pair]
    s_a: np.ndarray
    s_b: np.ndarray
    metrics: dict
    counts: dict = field(default_factory=dict)


def score_pairs(model, pairs: list[Pair], text_vecs: dict, vec_a: torch.Tensor, vec_b: torch.Tensor,
                batch_size: int, device, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Scores of image a and image b of every pair with the ranker head."""
    s_a, s_b = np.zeros(len(pairs)), np.zeros(len(pairs))
    with torch.inference_mode(), tqdm(total=len(pairs), desc="head", unit="pair",
                                      disable=not progress or not pairs) as bar:
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            n = len(chunk)
            feat = torch.stack([text_vecs[p.inputs.pois_text] for p in chunk])
            pimg = torch.from_numpy(np.stack([p.inputs.poi_img for p in chunk]))
            ptxt = torch.from_numpy(np.stack([p.inputs.poi_txt for p in chunk]))
            plen = torch.tensor([p.inputs.poi_len for p in chunk])
            img = torch.cat([vec_a[s:s + n], vec_b[s:s + n]])
            both = model.score_embeddings(img.to(device), feat.repeat(2, 1).to(device),
                                          pimg.repeat(2, 1, 1).to(device),
                                          ptxt.repeat(2, 1, 1).to(device),
                                          plen.repeat(2).to(device)).float().cpu().reshape(-1)
            s_a[s:s + n] = both[:n].double().numpy()
            s_b[s:s + n] = both[n:].double().numpy()
            bar.update(n)
    return s_a, s_b


def evaluate(model, tokenizer, rows: list[RankRow], images: dict, tables, device, *,
             skip_missing: bool = False, preprocess: str = "reference", precision: str = "fp32",
             batch_size: int | None = None, text_batch_size: int = 64, head_batch_size: int = 256,
             num_workers: int | None = None, cache=None, progress: bool = True) -> Result:
    """Score every pair of ``rows``; ``images`` maps file stem -> path."""
    align = model.align_model
    pairs = [Pair(r, tables.inputs(r.title, r.poi_names), images.get(r.key_a), images.get(r.key_b))
             for r in rows]
    missing_files = sorted({r.key_a for r in rows if r.key_a not in images}
                           | {r.key_b for r in rows if r.key_b not in images})
    if missing_files:
        shown = ", ".join(missing_files[:10]) + (" ..." if len(missing_files) > 10 else "")
        log.warning("%d images not found in the image directory: %s", len(missing_files), shown)

    # image vectors: each file once; a missing file is the zero image
    files = sorted({str(p) for pr in pairs for p in (pr.path_a, pr.path_b) if p is not None})
    t0 = time.perf_counter()
    file_vecs, file_ok = encode_images(align, files, batch_size, device, mode=preprocess,
                                       num_workers=num_workers, precision=precision, cache=cache,
                                       progress=progress)
    file_ok = file_ok.numpy().astype(bool)
    log.info("encoded %d image files in %.1f s (%d unreadable)", len(files),
             time.perf_counter() - t0, int((~file_ok).sum()))
    with torch.inference_mode(), autocast(device, precision):
        zero_vec = align.encode_image(ZERO_TENSOR[None].to(device), normalize=False)
    zero_vec = F.normalize(zero_vec.float(), p=2, dim=1).cpu()[0]
    vec_of = {f: file_vecs[i] for i, f in enumerate(files)}
    ok_of = {f: bool(file_ok[i]) for i, f in enumerate(files)}

    def usable(p: Path | None) -> bool:
        return p is not None and ok_of[str(p)]

    bad_pairs = [pr for pr in pairs if not (usable(pr.path_a) and usable(pr.path_b))]
    counts = {
        "pairs_in_csv": len(rows),
        "images_missing": len(missing_files),
        "images_unreadable": int((~file_ok).sum()),
        "pairs_with_missing_image": len(bad_pairs),
        "pairs_skipped": 0,
    }
    if skip_missing and bad_pairs:
        drop = {id(pr) for pr in bad_pairs}
        pairs = [pr for pr in pairs if id(pr) not in drop]
        counts["pairs_skipped"] = len(bad_pairs)
        log.warning("--skip-missing: left out %d pairs with a missing or unreadable image",
                    len(bad_pairs))
    elif bad_pairs:
        log.warning("%d pairs have a missing or unreadable image, scored as the all-zero image "
                    "(the authors' behaviour; --skip-missing leaves them out)", len(bad_pairs))

    def vec(p: Path | None) -> torch.Tensor:
        return vec_of[str(p)] if p is not None else zero_vec

    dim_v = zero_vec.numel()
    vec_a = torch.stack([vec(pr.path_a) for pr in pairs]) if pairs else torch.zeros(0, dim_v)
    vec_b = torch.stack([vec(pr.path_b) for pr in pairs]) if pairs else torch.zeros(0, dim_v)

    # pois_feature: each distinct text once
    texts = sorted({pr.inputs.pois_text for pr in pairs})
    t0 = time.perf_counter()
    tv = encode_texts(align, tokenizer, texts, text_batch_size, device, precision=precision,
                      progress=progress)
    text_vecs = {t: tv[i] for i, t in enumerate(texts)}
    log.info("encoded %d distinct pois_feature texts in %.1f s", len(texts), time.perf_counter() - t0)

    s_a, s_b = score_pairs(model, pairs, text_vecs, vec_a, vec_b, head_batch_size, device, progress)
    metrics = pairwise_metrics([pr.row.label for pr in pairs], s_a, s_b)
    unknown = sorted({n for pr in pairs for n in pr.inputs.unknown})
    counts.update({
        "pairs_scored": len(pairs),
        "pairs_without_pois": sum(pr.inputs.poi_len == 0 for pr in pairs),
        "pairs_with_unknown_poi": sum(bool(pr.inputs.unknown) for pr in pairs),
        "distinct_unknown_pois": len(unknown),
        "distinct_texts": len(texts),
        "distinct_image_files": len(files),
    })
    if unknown:
        log.info("%d distinct POI names of the sequences are missing from a vector table "
                 "(zero vectors), e.g. %s", len(unknown), ", ".join(repr(n) for n in unknown[:5]))
    return Result(pairs, s_a, s_b, metrics, counts)


def add_intervals(res: Result, draws: int, seed: int) -> None:
    """``accuracy_ci`` / ``auc_ci`` (percentile bootstrap over pairs) into ``res.metrics``."""
    m = res.metrics
    m["accuracy_ci"] = m["auc_ci"] = None
    if not draws or not m["n"]:
        return
    y = np.array([pr.row.label for pr in res.pairs], dtype=np.float64)
    d = res.s_a - res.s_b
    m["accuracy_ci"] = list(mean_interval(((d > 0) == (y == 1)).astype(np.float64), draws, seed))
    if m["auc"] is not None:
        ci = auc_interval(y, d, draws, seed)
        m["auc_ci"] = list(ci) if ci else None
    m["bootstrap"] = {"draws": draws, "seed": seed, "level": LEVEL, "resampling": "pairs"}


def format_summary(res: Result, csv_path: str) -> str:
    m, c = res.metrics, res.counts

    def f(v, ci=None):
        return "n/a" if v is None else f"{v:.4f}" + (f" {fmt_interval(ci)}" if ci else "")

    lines = [
        f"rank_eval: {csv_path}",
        f"  pairwise accuracy (s_a > s_b vs label; published 0.652): "
        f"{f(m['accuracy'], m.get('accuracy_ci'))}",
        f"  ROC-AUC of sigmoid(s_a - s_b):                           {f(m['auc'], m.get('auc_ci'))}",
        f"  log loss of sigmoid(s_a - s_b):                          {f(m['log_loss'])}",
        f"  constant-guess baseline:                                 {f(m['baseline'])}",
        f"  pairs scored: {c['pairs_scored']} of {c['pairs_in_csv']} in the CSV"
        + (f" ({c['bad_rows']} bad rows left out)" if c.get("bad_rows") else ""),
        f"  pairs with a missing or unreadable image: {c['pairs_with_missing_image']}"
        + (f" (left out: {c['pairs_skipped']})" if c["pairs_skipped"] else
           (" (scored with the zero image)" if c["pairs_with_missing_image"] else "")),
        f"  images missing: {c['images_missing']}, unreadable: {c['images_unreadable']}",
        f"  pairs without POIs: {c['pairs_without_pois']}; with a POI missing from a vector "
        f"table: {c['pairs_with_unknown_poi']}; score ties: {m['ties']}",
    ]
    return "\n".join(lines)


def write_output(path: str, res: Result) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(OUTPUT_HEADER)
        for pr, a, b in zip(res.pairs, res.s_a, res.s_b):
            w.writerow([pr.row.item_id, pr.row.label, repr(float(a)), repr(float(b)), int(a > b)])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    device = resolve_device(args.device)
    progress = not args.quiet and sys.stderr.isatty()
    t_start = time.perf_counter()

    try:
        errors: list = []
        rows = list(iter_rank_csv(args.csv, errors))
        for e in errors[:20]:
            log.warning("bad row left out: %s", e)
        if len(errors) > 20:
            log.warning("... and %d more bad rows", len(errors) - 20)
        if args.limit:
            rows = rows[:args.limit]
        if not rows:
            raise DataError(f"{args.csv}: no usable ranking rows")
        log.info("%s: %d pairs (%d with label 1)", args.csv, len(rows), sum(r.label for r in rows))
        images = index_images(args.image_dir)
        log.info("%s: %d image files", args.image_dir, len(images))
        model = load_ranker(args.checkpoint, args.bert_dir, arch=args.arch,
                            align_checkpoint=args.align_checkpoint, device=device)
        tables = load_poi_tables(args.poi_pic_num, args.poi_image_vectors, args.poi_name_vectors,
                                 dim=model.align_model.arch.embed_dim, trust_pickle=args.trust_pickle)
        tokenizer = load_tokenizer(args.bert_dir)
        cache = EmbeddingCache.for_model(args.cache_dir, model.align_model) if args.cache_dir else None
    except (DataError, PoiTableError, CheckpointError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        print(f"rank_eval: error: {e}", file=sys.stderr)
        return 2
    log.info("ranker %s on %s", args.checkpoint, device)

    res = evaluate(model, tokenizer, rows, images, tables, device,
                   skip_missing=args.skip_missing, preprocess=args.preprocess,
                   precision=args.precision, cache=cache,
                   batch_size=args.batch_size, text_batch_size=args.text_batch_size,
                   head_batch_size=args.head_batch_size, num_workers=args.num_workers,
                   progress=progress)
    if cache is not None:
        cache.close()
    res.counts["bad_rows"] = len(errors)
    add_intervals(res, args.bootstrap, args.seed)
    elapsed = time.perf_counter() - t_start
    print(format_summary(res, args.csv))
    print(f"  time: {elapsed:.1f} s ({res.counts['pairs_scored'] / max(elapsed, 1e-9):.2f} pairs/s)")

    if args.output:
        write_output(args.output, res)
        log.info("wrote per-pair scores to %s", args.output)
    if args.metrics:
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        doc = {**res.metrics, **res.counts, "seconds": round(elapsed, 3),
               "csv": args.csv, "checkpoint": args.checkpoint,
               "align_checkpoint": args.align_checkpoint, "preprocess": args.preprocess,
               "skip_missing": args.skip_missing}
        with open(args.metrics, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, ensure_ascii=False)
        log.info("wrote metrics to %s", args.metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
