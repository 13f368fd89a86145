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

SPEC section 5, through ``models.engine.pairs.evaluate_pairs``: the ``$record$`` CSV
(label = ctr_a > ctr_b; a bad row stops the run unless --skip-bad-rows; a NaN/infinite
CTR is always an error naming the line; a repeated item_id is reported and counted
once); images found by stem, ``<item_id>_a.<ext>`` / ``<item_id>_b.<ext>``
(download_images.py); the three POI tables (safe ``.npz`` or the published pickled
``.npy`` through a restricted, bounded reader) checked before the ranker loads; each
distinct image file and ``pois_feature`` text encoded once (--cache-dir reuses image
vectors), a missing or unreadable image scored as the all-zero image as the authors'
loader did (--skip-missing leaves such pairs out); the head on both images of every pair
in large batches. Figures: pairwise accuracy (the published figure), ROC-AUC of
sigmoid(s_a - s_b), log loss, the constant-guess baseline, counts, and 95% percentile
bootstrap intervals over pairs for accuracy and AUC (--bootstrap draws, at most
1,000,000). --output (per-pair CSV ``item_id,label,s_a,s_b,prediction``) and --metrics
(JSON) are written together or not at all, their locations checked before any work.

Exit status: 0 on success, 2 for bad arguments or unusable input files, 130 on Ctrl-C.
"""

from __future__ import annotations

from utils.cli import (
    distinct_paths,
    entry_point,
    input_dir,
    input_file,
    non_negative_int,
    output_dir,
    output_file,
    positive_int,
    setup_logging,
)

import argparse
import sys
from dataclasses import fields

from utils.args import (
    Encoding,
    add_bad_rows,
    add_batches,
    add_cache,
    add_engine,
    add_poi_tables,
    add_recall_files,
    add_run,
)
from utils.evaluation import DEFAULT_DRAWS, DEFAULT_SEED, format_pair_summary

FILES = ("csv", "checkpoint", "poi_pic_num", "poi_image_vectors", "poi_name_vectors", "align_checkpoint", "arch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rank_eval.py",
        description="Pairwise evaluation of the siamese CTR ranker on a $record$ ranking CSV "
        "(SPEC section 5; the paper's 0.652 is the pairwise accuracy).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("inputs")
    g.add_argument("--csv", required=True, help="ranking CSV ($record$ format, e.g. the val set)")
    g.add_argument("--image-dir", required=True, help="directory with <item_id>_a.<ext> and <item_id>_b.<ext>")
    g.add_argument(
        "--align-checkpoint", help="recall checkpoint that replaces the ranker's own copy of the recall model"
    )
    add_recall_files(p, "ranker files")
    add_poi_tables(p, required=True)
    o = p.add_argument_group("outputs")
    o.add_argument("--output", help="per-pair CSV: item_id,label,s_a,s_b,prediction")
    o.add_argument("--metrics", help="JSON file of the figures and counts")
    r = p.add_argument_group("running")
    r.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave out pairs with a missing or unreadable image instead of scoring "
        "that image as the all-zero image (the authors' behaviour)",
    )
    r.add_argument("--limit", type=positive_int, help="use only the first N pairs")
    r.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=DEFAULT_DRAWS,
        metavar="N",
        help="bootstrap draws over pairs for the 95%% intervals of accuracy and AUC (0: none)",
    )
    r.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed")
    add_bad_rows(r)
    add_engine(p)
    add_batches(p, head=True)
    add_cache(p)
    add_run(p)
    return p


def check_paths(ns) -> None:
    """Every input readable, every output location writable and no output an input or
    the other output: before any work."""
    for name in FILES:
        if getattr(ns, name):
            input_file(getattr(ns, name), "--" + name.replace("_", "-"))
    input_dir(ns.image_dir, "--image-dir")
    input_dir(ns.bert_dir, "--bert-dir")
    for flag in ("--output", "--metrics"):
        if getattr(ns, flag[2:]):
            output_file(getattr(ns, flag[2:]), flag)
    distinct_paths(
        {"--" + n.replace("_", "-"): getattr(ns, n) for n in FILES}, {"--output": ns.output, "--metrics": ns.metrics}
    )
    if ns.cache_dir:
        output_dir(ns.cache_dir, "--cache-dir")


@entry_point
def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    setup_logging(ns.log_level)
    check_paths(ns)
    from models import PairRun, evaluate_pairs  # after the checks: torch takes seconds to load

    enc = Encoding.from_args(ns, progress=not ns.no_progress and sys.stderr.isatty())
    run = PairRun(
        **{f.name: getattr(ns, f.name) for f in fields(PairRun) if hasattr(ns, f.name)}, draws=ns.bootstrap, enc=enc
    )
    doc = evaluate_pairs(run)
    print(format_pair_summary(doc, ns.csv))
    print(f"  time: {doc['seconds']:.1f} s ({doc['pairs_scored'] / max(doc['seconds'], 1e-9):.2f} pairs/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
