#!/usr/bin/env python
"""recall@K, MRR and an optional HTML report from recall results (SPEC section 4).

    python recall_eval.py --results results/recall_top10.csv [--k 1 5 10 50]
    python recall_eval.py --results results/recall_top10.csv --html results/recall.html --image-dir data/images
    python recall_eval.py --embeddings results/recall.npz   # recall_infer.py --save-embeddings
    python recall_eval.py --compare results/taiyi_top10.csv results/recall_top10.csv   # A vs B

A POI is a hit at K when one of its top K images (ties in file order) is its own (file name
before the first ``_``); MRR = mean 1 / rank of the first own image. Intervals: 95% bootstrap
over POIs, paired with --compare. Exit status 2 for bad input, one line.
"""

from __future__ import annotations

from utils.cli import entry_point

import argparse
import sys

from utils import args, cli
from utils.evaluation import (
    DEFAULT_KS,
    compare_recall,
    default_json_path,
    evaluate_recall,
    format_compare,
    format_recall,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    one = p.add_mutually_exclusive_group(required=True)
    one.add_argument("--results", help="recall_infer.py output (top-k or full format)")
    one.add_argument("--embeddings", metavar="FILE.npz", help="recall_infer.py --save-embeddings output: score it here")
    one.add_argument("--compare", nargs=2, metavar=("A.csv", "B.csv"), help="two results files (two models), paired")
    p.add_argument("--k", type=cli.positive_int, nargs="+", default=list(DEFAULT_KS), help="K values (default 1 5 10)")
    p.add_argument("--json", help="figures and per-POI hits (default <results>.eval.json)")
    p.add_argument("--html", help="write a self-contained HTML report here")
    p.add_argument("--html-k", type=cli.positive_int, help="images shown per POI in the report (default max --k)")
    p.add_argument("--image-dir", help="where the images are, for thumbnails (default: as in <results>.meta.json)")
    p.add_argument("--page-size", type=cli.positive_int, default=50, help="POIs per report page (default 50)")
    args.add_bootstrap(p)
    args.add_run(p)
    return p


@entry_point
def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    cli.setup_logging(ns.log_level)
    inputs = {f"--compare {'AB'[i]}": path for i, path in enumerate(ns.compare or ())}
    inputs |= {"--results": ns.results, "--embeddings": ns.embeddings}
    out_json = ns.json or default_json_path(ns.results, ns.embeddings, ns.compare)
    outputs = {"--json": out_json, "--html": ns.html}
    cli.check_files(inputs, {"--image-dir": ns.image_dir}, outputs)
    if ns.results:  # read too: no output may be it
        cli.distinct_paths({"--results (its .meta.json)": f"{ns.results}.meta.json"}, outputs)
    if ns.compare:
        doc = compare_recall(*ns.compare, ks=ns.k, json_path=out_json, draws=ns.bootstrap, seed=ns.seed)
        print(f"{format_compare(doc)}\ncomparison: {out_json}")
        return 0
    report = dict(html=ns.html, html_k=ns.html_k, image_dir=ns.image_dir, page_size=ns.page_size)
    run = dict(ks=ns.k, json_path=out_json, draws=ns.bootstrap, seed=ns.seed, progress=not ns.no_progress)
    doc = evaluate_recall(ns.results, ns.embeddings, **run, **report)
    print(format_recall(doc) + (f"\nreport: {ns.html}" if ns.html else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
