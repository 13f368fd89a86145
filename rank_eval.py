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

The pipeline (``main``), SPEC section 5:

1. ``read_pairs``: the ``$record$`` CSV (label = ctr_a > ctr_b). Bad rows are reported by
   line and left out; a NaN/infinite CTR is an error naming the line; a repeated
   item_id is reported and counted once.
2. ``index_images``: images are found by stem, as download_images.py names them,
   ``<item_id>_a.<ext>`` / ``<item_id>_b.<ext>``.
3. ``load_tables``: the three POI tables (utils/poi.py: safe ``.npz`` or the published
   pickled ``.npy`` through a restricted, bounded reader; shapes and finiteness checked),
   then ``build_model``: the ranker (strict keys) with its own copy of the recall model
   (``--align-checkpoint`` replaces it) through ``models.factory.build_ranker``.
4. ``encode_images``: every distinct image file once, in batches, on the image engine
   of ``--backend`` (decoding in DataLoader workers, started by ``start_decoding`` right
   after step 2 so that it overlaps step 3, unless ``--cache-dir`` is given, whose hits
   decide what to decode; ``--cache-dir`` reuses vectors). A
   missing or unreadable image is scored as the all-zero image (the authors' loader
   turned unreadable files into zeros); ``--skip-missing`` leaves such pairs out.
5. ``encode_texts``: every distinct ``pois_feature`` text once. The recall model is
   frozen, so these vectors are what the full forward pass computes.
6. ``score_pairs``: the ranker head (``SiameseRanker.score_many``) on both images of
   every pair, in large batches.
7. ``summarise``: pairwise accuracy (the published figure), ROC-AUC of
   sigmoid(s_a - s_b), log loss, the constant-guess baseline, counts, and 95% percentile
   bootstrap intervals over pairs for accuracy and AUC (``--bootstrap`` draws).
8. ``write_outputs``: ``--output`` the per-pair CSV ``item_id,label,s_a,s_b,prediction``,
   ``--metrics`` a JSON of the figures; both written atomically, their locations
   checked before any work.

Exit status: 0 on success, 2 for bad arguments or unusable input files, 130 on Ctrl-C.
"""

from __future__ import annotations

from utils.cli import (
    DECODE_WORKERS_HELP,
    DataError,
    add_common_args,
    check_finite,
    entry_point,
    input_dir,
    input_file,
    non_negative_int,
    output_dir,
    output_file,
    positive_int,
    resolve_device,
    setup_logging,
)

import argparse
import csv
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from utils.args import Encoding
from utils.formats import RankRow, index_images, iter_rank_csv
from utils.io import atomic_write, write_json

if TYPE_CHECKING:
    import numpy as np

    from utils.formats import ItemInputs

log = logging.getLogger("rank_eval")
OUTPUT_HEADER = ("item_id", "label", "s_a", "s_b", "prediction")
PAIR_CHUNK = 8192  # pairs whose head inputs are stacked at once (bounds memory)


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from models import BACKENDS, PRECISIONS
    from utils.evaluation import DEFAULT_DRAWS, DEFAULT_SEED
    from utils.formats import PREPROCESS_MODES

    p = argparse.ArgumentParser(
        prog="rank_eval.py",
        description="Pairwise evaluation of the siamese CTR ranker on a $record$ ranking CSV "
        "(SPEC section 5; the paper's 0.652 is the pairwise accuracy).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("inputs")
    g.add_argument("--csv", required=True, help="ranking CSV ($record$ format, e.g. the val set)")
    g.add_argument(
        "--image-dir", required=True, help="directory with <item_id>_a.<ext> and <item_id>_b.<ext> (download_images.py)"
    )
    g.add_argument(
        "--checkpoint",
        required=True,
        help="ranker checkpoint (bare state dict holding its recall model under align_model.)",
    )
    g.add_argument("--bert-dir", required=True, help="directory with bert-base-chinese config.json and vocab.txt")
    g.add_argument(
        "--poi-pic-num", required=True, help="pic-num table (name -> [n0, n1, n2]): published .npy or safe .npz"
    )
    g.add_argument(
        "--poi-image-vectors", required=True, help="POI mean image vector table: published .npy or safe .npz"
    )
    g.add_argument("--poi-name-vectors", required=True, help="POI name vector table: published .npy or safe .npz")
    g.add_argument(
        "--align-checkpoint",
        default=None,
        help="recall checkpoint that replaces the ranker's own copy of the recall model",
    )
    g.add_argument(
        "--arch",
        default=None,
        help="architecture JSON for a small variant (default: the checkpoint's sidecar, "
        "else the released architecture)",
    )
    g.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load .npy tables with np.load(allow_pickle=True); code in them would run. "
        "Without it a restricted unpickler that refuses code is used",
    )
    o = p.add_argument_group("outputs")
    o.add_argument("--output", default=None, help="per-pair CSV: item_id,label,s_a,s_b,prediction")
    o.add_argument("--metrics", default=None, help="JSON file of the figures and counts")
    r = p.add_argument_group("running")
    r.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave out pairs with a missing or unreadable image instead of scoring "
        "that image as the all-zero image (the authors' behaviour)",
    )
    r.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="image engine: auto = ONNX Runtime on a CPU when installed and it agrees "
        "with torch on this model (checked on load), else torch",
    )
    r.add_argument(
        "--preprocess",
        choices=PREPROCESS_MODES,
        default="reference",
        help="image preprocessing; 'reference' reproduces the published numbers",
    )
    r.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="recall-model precision for the image and text vectors (fp32 reproduces)",
    )
    r.add_argument(
        "--cache-dir", default=None, help="embedding cache directory (utils/cache.py): a rerun encodes only new images"
    )
    r.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per batch (default: 4 per lane with ONNX Runtime on a CPU, 32 with torch, 128 on CUDA)",
    )
    r.add_argument("--text-batch-size", type=positive_int, help="texts per batch (default: 16 on a CPU, 256 on CUDA)")
    r.add_argument("--head-batch-size", type=positive_int, default=1024, help="rows per ranker-head batch")
    r.add_argument("--num-workers", type=non_negative_int, default=None, help=DECODE_WORKERS_HELP)
    r.add_argument("--limit", type=positive_int, default=None, help="use only the first N pairs")
    r.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=DEFAULT_DRAWS,
        metavar="N",
        help="bootstrap draws over pairs for the 95%% intervals of accuracy and AUC (0: none)",
    )
    r.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed")
    add_common_args(r)
    return p


def check_paths(args) -> None:
    """Every input readable, every output location writable: before any work."""
    input_file(args.csv, "--csv")
    input_dir(args.image_dir, "--image-dir")
    input_file(args.checkpoint, "--checkpoint")
    input_dir(args.bert_dir, "--bert-dir")
    for opt in ("poi_pic_num", "poi_image_vectors", "poi_name_vectors", "align_checkpoint", "arch"):
        if getattr(args, opt):
            input_file(getattr(args, opt), "--" + opt.replace("_", "-"))
    for opt in ("output", "metrics"):
        if getattr(args, opt):
            output_file(getattr(args, opt), "--" + opt)
    if args.output and args.metrics and Path(args.output).resolve() == Path(args.metrics).resolve():
        raise DataError(f"--output and --metrics name the same file {args.output}")
    if args.cache_dir:
        output_dir(args.cache_dir, "--cache-dir")


# ---------------------------------------------------------------------------
# the steps
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


def read_pairs(path: str, limit: int | None = None) -> tuple[list[RankRow], dict]:
    """The usable rows of the ranking CSV (first ``limit``) and counts of what was left out."""
    errors: list = []
    rows, seen, dupes = [], {}, 0
    for row in iter_rank_csv(path, errors):
        for name in ("ctr_a", "ctr_b"):
            check_finite(getattr(row, name), f"{path}:{row.line}: {name}")
        first = seen.get(row.item_id)
        if first is not None:
            dupes += 1
            same = first[1:] == (row.ctr_a, row.ctr_b, row.title, row.poi_names)
            log.warning(
                "%s:%d: item_id %s repeats line %d%s; counted once (the first)",
                path,
                row.line,
                row.item_id,
                first[0],
                "" if same else " with other values",
            )
            continue
        seen[row.item_id] = (row.line, row.ctr_a, row.ctr_b, row.title, row.poi_names)
        rows.append(row)
    for e in errors[:20]:
        log.warning("bad row left out: %s", e)
    if len(errors) > 20:
        log.warning("... and %d more bad rows", len(errors) - 20)
    if limit:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"{path}: no usable ranking rows")
    log.info("%s: %d pairs (%d with label 1)", path, len(rows), sum(r.label for r in rows))
    return rows, {"bad_rows": len(errors), "duplicate_rows": dupes}


def load_tables(args):
    """The three POI tables, read and checked (before the model: a bad table fails fast)."""
    from utils.formats import load_poi_tables

    return load_poi_tables(
        args.poi_pic_num, args.poi_image_vectors, args.poi_name_vectors, dim=None, trust_pickle=args.trust_pickle
    )


def build_model(args, device, tables):
    """``(ranker, rm, tables)``: the ranker, the RecallModel around its recall copy, and
    the POI tables checked against its embedding size."""
    from models import build_ranker

    ranker, rm = build_ranker(
        args.checkpoint,
        args.bert_dir,
        arch=args.arch,
        align_checkpoint=args.align_checkpoint,
        device=device,
        backend=args.backend,
    )
    log.info("ranker %s on %s", args.checkpoint, device)
    return ranker, rm, tables.with_dim(rm.embed_dim)


def make_pairs(rows: list[RankRow], images: dict, tables) -> list[Pair]:
    return [Pair(r, tables.inputs(r.title, r.poi_names), images.get(r.key_a), images.get(r.key_b)) for r in rows]


def image_files(rows: list[RankRow], images: dict, image_dir) -> tuple[list[str], list[str], list[str]]:
    """``(files, missing, stand_in)``: the distinct image files of the pairs (sorted), the
    keys without a file, and the one path that stands for every missing image (it is
    encoded as what ``encode_images`` gives any file it cannot read: the zero image)."""
    keys = [k for r in rows for k in (r.key_a, r.key_b)]
    missing = sorted({k for k in keys if images.get(k) is None})
    files = sorted({str(images[k]) for k in keys if images.get(k) is not None})
    stand_in = [str(Path(image_dir) / f"{missing[0]}.jpg")] if missing else []
    return files, missing, stand_in


def start_decoding(args, rows: list[RankRow], images: dict, device):
    """Decoding workers started on the pairs' image files now, so decoding overlaps the
    tables and model load (utils.embed.prefetch_images); None with --cache-dir (its hits
    decide what is decoded once the model's identity is known)."""
    if args.cache_dir:
        return None
    from models import prefetch_images

    files, _, stand_in = image_files(rows, images, args.image_dir)
    return prefetch_images(files + stand_in, Encoding.from_args(args, device=str(device)))


def encode_pair_images(rm, pairs: list[Pair], args, progress=True, prefetch=None):
    """Vectors of image a and image b of every pair (each distinct file encoded once,
    ``--cache-dir`` consulted; ``prefetch``: the decoding started by ``start_decoding``),
    per-pair usability, and counts. A missing file is encoded as what ``encode_images``
    gives any file it cannot read (the zero image); one such file stands for all."""
    import torch

    files, missing, stand_in = image_files(
        [pr.row for pr in pairs],
        {k: p for pr in pairs for k, p in ((pr.row.key_a, pr.path_a), (pr.row.key_b, pr.path_b))},
        args.image_dir,
    )
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        log.warning("%d images not found in the image directory: %s", len(missing), shown)
    t0 = time.perf_counter()
    vecs, ok = rm.encode_images(
        files + stand_in, Encoding.from_args(args, progress=progress), desc="pair images", prefetch=prefetch
    )
    ok = ok.tolist()
    log.info(
        "encoded %d image files in %.1f s (%d unreadable) on %s",
        len(files),
        time.perf_counter() - t0,
        len(files) - sum(ok[: len(files)]),
        rm.image_backend(args.precision),
    )
    row_of = {f: i for i, f in enumerate(files)}
    missing_row = len(files)

    def index(p):
        return row_of[str(p)] if p is not None else missing_row

    ia = torch.tensor([index(pr.path_a) for pr in pairs], dtype=torch.long)
    ib = torch.tensor([index(pr.path_b) for pr in pairs], dtype=torch.long)
    usable = [p is not None and ok[row_of[str(p)]] for pr in pairs for p in (pr.path_a, pr.path_b)]
    pair_ok = [usable[2 * i] and usable[2 * i + 1] for i in range(len(pairs))]
    counts = {
        "images_missing": len(missing),
        "images_unreadable": len(files) - sum(ok[: len(files)]),
        "pairs_with_missing_image": len(pairs) - sum(pair_ok),
        "distinct_image_files": len(files),
    }
    return vecs[ia], vecs[ib], pair_ok, counts


def drop_missing(pairs, vec_a, vec_b, pair_ok, skip: bool):
    """Pairs kept for scoring: all (missing images scored as the zero image) or, with
    ``skip``, those whose two images were read."""
    bad = len(pairs) - sum(pair_ok)
    if not bad:
        return pairs, vec_a, vec_b, 0
    if not skip:
        log.warning(
            "%d pairs have a missing or unreadable image, scored as the all-zero image "
            "(the authors' behaviour; --skip-missing leaves them out)",
            bad,
        )
        return pairs, vec_a, vec_b, 0
    keep = [i for i, good in enumerate(pair_ok) if good]
    log.warning("--skip-missing: left out %d pairs with a missing or unreadable image", bad)
    return [pairs[i] for i in keep], vec_a[keep], vec_b[keep], bad


def encode_pair_texts(rm, pairs: list[Pair], args, progress=True):
    """The ``pois_feature`` vector of every pair; each distinct text encoded once."""
    import torch

    texts = sorted({pr.inputs.pois_text for pr in pairs})
    t0 = time.perf_counter()
    tv = rm.encode_texts(texts, Encoding.from_args(args, progress=progress))
    log.info("encoded %d distinct pois_feature texts in %.1f s", len(texts), time.perf_counter() - t0)
    row_of = {t: i for i, t in enumerate(texts)}
    idx = torch.tensor([row_of[pr.inputs.pois_text] for pr in pairs], dtype=torch.long)
    return (tv[idx] if texts else torch.zeros(0, rm.embed_dim)), len(texts)


def score_pairs(ranker, pairs: list[Pair], vec_a, vec_b, feats, batch_size: int, dim: int):
    """``(s_a, s_b)`` float64 arrays: the head on both images of every pair, with the
    pair's item inputs (``SiameseRanker.score_many``)."""
    import numpy as np
    import torch

    from utils.formats import stack_inputs

    s_a, s_b = np.zeros(len(pairs)), np.zeros(len(pairs))
    for a in range(0, len(pairs), PAIR_CHUNK):
        chunk = slice(a, a + PAIR_CHUNK)
        pimg, ptxt, plen = (torch.from_numpy(x) for x in stack_inputs([pr.inputs for pr in pairs[chunk]], dim))
        n = len(plen)
        both = (
            ranker.score_many(
                torch.cat([vec_a[chunk], vec_b[chunk]]),
                feats[chunk].repeat(2, 1),
                pimg.repeat(2, 1, 1),
                ptxt.repeat(2, 1, 1),
                plen.repeat(2),
                batch_size=batch_size,
            )
            .double()
            .numpy()
        )
        s_a[a : a + n], s_b[a : a + n] = both[:n], both[n:]
    return s_a, s_b


def summarise(pairs: list[Pair], s_a, s_b, counts: dict, draws: int, seed: int) -> Result:
    from utils.evaluation import pairwise_metrics

    res = Result(pairs, s_a, s_b, pairwise_metrics([pr.row.label for pr in pairs], s_a, s_b), counts)
    unknown = sorted({n for pr in pairs for n in pr.inputs.unknown})
    counts.update(
        {
            "pairs_scored": len(pairs),
            "pairs_without_pois": sum(pr.inputs.poi_len == 0 for pr in pairs),
            "pairs_with_unknown_poi": sum(bool(pr.inputs.unknown) for pr in pairs),
            "distinct_unknown_pois": len(unknown),
        }
    )
    if unknown:
        log.info(
            "%d distinct POI names of the sequences are missing from a vector table (zero vectors), e.g. %s",
            len(unknown),
            ", ".join(repr(n) for n in unknown[:5]),
        )
    add_intervals(res, draws, seed)
    return res


def add_intervals(res: Result, draws: int, seed: int) -> None:
    """``accuracy_ci`` / ``auc_ci`` (percentile bootstrap over pairs) into ``res.metrics``."""
    import numpy as np

    from utils.evaluation import LEVEL, auc_interval, mean_interval

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
    from utils.evaluation import fmt_interval

    m, c = res.metrics, res.counts

    def f(v, ci=None):
        return "n/a" if v is None else f"{v:.4f}" + (f" {fmt_interval(ci)}" if ci else "")

    left_out = [
        f"{c[k]} {what}" for k, what in (("bad_rows", "bad rows"), ("duplicate_rows", "repeated item_ids")) if c.get(k)
    ]
    lines = [
        f"rank_eval: {csv_path}",
        f"  pairwise accuracy (s_a > s_b vs label; published 0.652): {f(m['accuracy'], m.get('accuracy_ci'))}",
        f"  ROC-AUC of sigmoid(s_a - s_b):                           {f(m['auc'], m.get('auc_ci'))}",
        f"  log loss of sigmoid(s_a - s_b):                          {f(m['log_loss'])}",
        f"  constant-guess baseline:                                 {f(m['baseline'])}",
        f"  pairs scored: {c['pairs_scored']} of {c['pairs_in_csv']} in the CSV"
        + (f" ({', '.join(left_out)} left out)" if left_out else ""),
        f"  pairs with a missing or unreadable image: {c['pairs_with_missing_image']}"
        + (
            f" (left out: {c['pairs_skipped']})"
            if c["pairs_skipped"]
            else (" (scored with the zero image)" if c["pairs_with_missing_image"] else "")
        ),
        f"  images missing: {c['images_missing']}, unreadable: {c['images_unreadable']}",
        f"  pairs without POIs: {c['pairs_without_pois']}; with a POI missing from a vector "
        f"table: {c['pairs_with_unknown_poi']}; score ties: {m['ties']}",
    ]
    return "\n".join(lines)


def write_outputs(args, res: Result, extra: dict) -> None:
    """``--output`` (per-pair CSV) and ``--metrics`` (JSON), each written atomically."""
    if args.output:
        with atomic_write(args.output) as f:
            w = csv.writer(f)
            w.writerow(OUTPUT_HEADER)
            for pr, a, b in zip(res.pairs, res.s_a, res.s_b):
                w.writerow([pr.row.item_id, pr.row.label, repr(float(a)), repr(float(b)), int(a > b)])
        log.info("wrote per-pair scores to %s", args.output)
    if args.metrics:
        write_json(args.metrics, {**res.metrics, **res.counts, **extra})
        log.info("wrote metrics to %s", args.metrics)


# ---------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------
@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    check_paths(args)
    t_start = time.perf_counter()
    progress = not args.no_progress and sys.stderr.isatty()

    rows, counts = read_pairs(args.csv, args.limit)
    images = index_images(args.image_dir)
    log.info("%s: %d image files", args.image_dir, len(images))
    device = resolve_device(args.device)
    prefetch = start_decoding(args, rows, images, device)
    try:
        tables = load_tables(args)
        ranker, rm, tables = build_model(args, device, tables)
        pairs = make_pairs(rows, images, tables)
        vec_a, vec_b, pair_ok, img_counts = encode_pair_images(rm, pairs, args, progress, prefetch)
    finally:
        if prefetch is not None:
            prefetch.close()
    pairs, vec_a, vec_b, skipped = drop_missing(pairs, vec_a, vec_b, pair_ok, args.skip_missing)
    feats, n_texts = encode_pair_texts(rm, pairs, args, progress)
    s_a, s_b = score_pairs(ranker, pairs, vec_a, vec_b, feats, args.head_batch_size, rm.embed_dim)

    counts.update(img_counts, pairs_in_csv=len(rows), pairs_skipped=skipped, distinct_texts=n_texts)
    res = summarise(pairs, s_a, s_b, counts, args.bootstrap, args.seed)
    elapsed = time.perf_counter() - t_start
    print(format_summary(res, args.csv))
    print(f"  time: {elapsed:.1f} s ({res.counts['pairs_scored'] / max(elapsed, 1e-9):.2f} pairs/s)")
    write_outputs(
        args,
        res,
        {
            "seconds": round(elapsed, 3),
            "csv": args.csv,
            "checkpoint": args.checkpoint,
            "align_checkpoint": args.align_checkpoint,
            "preprocess": args.preprocess,
            "skip_missing": args.skip_missing,
            "image_backend": rm.image_backend(args.precision),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
