#!/usr/bin/env python
"""Pairwise evaluation of the siamese CTR ranker on a $record$ ranking CSV (SPEC section 5;
the paper's 0.652 is the pairwise accuracy).

    python rank_eval.py --csv data/val.csv --image-dir data/rank_val_images --checkpoint data/ranker.ckpt \\
        --bert-dir data/bert-base-chinese --poi-pic-num pic_num.npy --poi-image-vectors image_vectors.npy \\
        --poi-name-vectors name_vectors.npy --output rank_val_scores.csv --metrics rank_val_metrics.json

label = ctr_a > ctr_b; a missing or unreadable image is scored as the all-zero image, as the
authors did. Figures: pairwise accuracy, ROC-AUC and log loss of sigmoid(s_a - s_b), the
constant-guess baseline, 95% bootstrap intervals over pairs; a repeated item_id counts once.
"""

from __future__ import annotations

from utils.cli import entry_point

import argparse
import sys

from utils import args, cli
from utils.evaluation import format_pair_summary

FILES = ("csv", "checkpoint", "poi_pic_num", "poi_image_vectors", "poi_name_vectors", "align_checkpoint", "arch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rank_eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("inputs")
    g.add_argument("--csv", required=True, help="ranking CSV ($record$ format, e.g. the val set)")
    g.add_argument("--image-dir", required=True, help="directory with <item_id>_a.<ext> and <item_id>_b.<ext>")
    g.add_argument("--align-checkpoint", help="recall checkpoint that replaces the ranker's copy of the recall model")
    args.add_recall_files(p, "ranker files")
    args.add_poi_tables(p, required=True)
    o = p.add_argument_group("outputs")
    o.add_argument("--output", help="per-pair CSV: item_id,label,s_a,s_b,prediction")
    o.add_argument("--metrics", help="JSON file of the figures and counts")
    r = p.add_argument_group("running")
    skip = "leave out pairs with a missing or unreadable image (default: the all-zero image, as the authors did)"
    r.add_argument("--skip-missing", action="store_true", help=skip)
    r.add_argument("--limit", type=cli.positive_int, help="use only the first N pairs")
    args.add_bootstrap(r)
    args.add_bad_rows(r)
    args.add_engine(p)
    args.add_batches(p, head=True)
    args.add_cache(p)
    args.add_run(p)
    return p


@entry_point
def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    cli.setup_logging(ns.log_level)
    inputs = {"--" + name.replace("_", "-"): getattr(ns, name) for name in FILES}
    dirs = {"--image-dir": ns.image_dir, "--bert-dir": ns.bert_dir}
    outputs = {"--output": ns.output, "--metrics": ns.metrics}
    cli.check_files(inputs, dirs, outputs, {"--cache-dir": ns.cache_dir})
    from models import PairRun, evaluate_pairs  # after the checks: torch takes seconds to load

    enc = args.Encoding.from_args(ns, progress=not ns.no_progress and sys.stderr.isatty())
    doc = evaluate_pairs(args.from_flags(PairRun, ns, draws=ns.bootstrap, enc=enc))
    print(format_pair_summary(doc, ns.csv))
    print(f"  time: {doc['seconds']:.1f} s ({doc['pairs_scored'] / max(doc['seconds'], 1e-9):.2f} pairs/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
