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

SPEC section 5 (models.engine.pairs.evaluate_pairs): label = ctr_a > ctr_b; a bad row
stops the run unless --skip-bad-rows, a NaN/inf CTR always does; a repeated item_id
counts once. Images are found by stem (``<item_id>_a.<ext>``, ``<item_id>_b.<ext>``); a
missing or unreadable one is scored as the all-zero image, as the authors' loader did
(--skip-missing leaves such pairs out). Figures: pairwise accuracy (the published one),
ROC-AUC and log loss of sigmoid(s_a - s_b), the constant-guess baseline, counts, and 95%
bootstrap intervals over pairs (--bootstrap draws, at most 1,000,000). --output
(``item_id,label,s_a,s_b,prediction``) and --metrics (JSON) are written together or not
at all.

Exit status: 0 on success, 2 for bad arguments or unusable input files, 130 on Ctrl-C.
"""

from __future__ import annotations

from utils.cli import entry_point

import argparse
import sys
from dataclasses import fields

from utils import args, cli
from utils.evaluation import format_pair_summary

FILES = ("csv", "checkpoint", "poi_pic_num", "poi_image_vectors", "poi_name_vectors", "align_checkpoint", "arch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rank_eval.py",
        description="Pairwise evaluation of the siamese CTR ranker on a $record$ ranking CSV "
        "(SPEC section 5; the paper's 0.652 is the pairwise accuracy).",
    )
    g = p.add_argument_group("inputs")
    g.add_argument("--csv", required=True, help="ranking CSV ($record$ format, e.g. the val set)")
    g.add_argument("--image-dir", required=True, help="directory with <item_id>_a.<ext> and <item_id>_b.<ext>")
    g.add_argument(
        "--align-checkpoint", help="recall checkpoint that replaces the ranker's own copy of the recall model"
    )
    args.add_recall_files(p, "ranker files")
    args.add_poi_tables(p, required=True)
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
    r.add_argument("--limit", type=cli.positive_int, help="use only the first N pairs")
    args.add_bootstrap(r)
    args.add_bad_rows(r)
    args.add_engine(p)
    args.add_batches(p, head=True)
    args.add_cache(p)
    args.add_run(p)
    return p


def check_paths(ns) -> None:
    """Every input readable, every output location writable and no output an input or
    the other output: before any work."""
    for name in FILES:
        if getattr(ns, name):
            cli.input_file(getattr(ns, name), "--" + name.replace("_", "-"))
    cli.input_dir(ns.image_dir, "--image-dir")
    cli.input_dir(ns.bert_dir, "--bert-dir")
    for flag in ("--output", "--metrics"):
        if getattr(ns, flag[2:]):
            cli.output_file(getattr(ns, flag[2:]), flag)
    cli.distinct_paths(
        {"--" + n.replace("_", "-"): getattr(ns, n) for n in FILES}, {"--output": ns.output, "--metrics": ns.metrics}
    )
    if ns.cache_dir:
        cli.output_dir(ns.cache_dir, "--cache-dir")


@entry_point
def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    cli.setup_logging(ns.log_level)
    check_paths(ns)
    from models import PairRun, evaluate_pairs  # after the checks: torch takes seconds to load

    enc = args.Encoding.from_args(ns, progress=not ns.no_progress and sys.stderr.isatty())
    run = PairRun(
        **{f.name: getattr(ns, f.name) for f in fields(PairRun) if hasattr(ns, f.name)}, draws=ns.bootstrap, enc=enc
    )
    doc = evaluate_pairs(run)
    print(format_pair_summary(doc, ns.csv))
    print(f"  time: {doc['seconds']:.1f} s ({doc['pairs_scored'] / max(doc['seconds'], 1e-9):.2f} pairs/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
