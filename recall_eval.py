#!/usr/bin/env python
"""recall@K, MRR and an optional HTML report from recall results (SPEC section 4).

    python recall_eval.py --results results/recall_top10.csv [--k 1 5 10 50]
    python recall_eval.py --results results/recall_top10.csv --html results/recall.html --image-dir data/images
    python recall_eval.py --embeddings results/recall.npz   # recall_infer.py --save-embeddings
    python recall_eval.py --compare results/taiyi_top10.csv results/recall_top10.csv   # A vs B

--results: recall_infer.py's top-k file (header ``poi_id,poi_name,rank,image,score``) or
the authors' full format (``poi_id,poi_name,image_path,score``, no header); --embeddings:
the vectors of a run, scored here as recall_infer scores them. Rows are grouped by poi_id,
sorted by score with a stable sort (ties keep file order); a POI is a hit at K when one of
its top K images is its own (file name before the first ``_``); recall@K = hits / POIs;
MRR = mean 1 / rank of the first own image (0 when none is listed). A K above what a
top-k file lists is an error; a score that is not a finite number too; a repeated
(poi_id, image) row counts once. Intervals: 95% percentile bootstrap over POIs
(--bootstrap draws, at most 1,000,000; --seed). --compare: both models on the POIs both
files hold, paired bootstrap for A, B and B - A, and the POIs one hits and the other
misses. Writes --json (default ``<input>.eval.json``, ``<B>.compare.json``) and --html
(self-contained, misses first; thumbnails found by the listed path, else by name in
--image-dir or the image directory recorded in ``<results>.meta.json``) together.

Exit status: 0 on success, 2 for bad input (an unreadable results file, an impossible K,
an output that cannot be written or is an input), reported as one line.
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
    p.add_argument("--results", help="recall_infer.py output (top-k or full format)")
    p.add_argument("--embeddings", metavar="FILE.npz", help="recall_infer.py --save-embeddings output: score it here")
    p.add_argument("--compare", nargs=2, metavar=("A.csv", "B.csv"), help="two results files (two models), paired")
    p.add_argument("--k", type=cli.positive_int, nargs="+", default=list(DEFAULT_KS), help="K values (default 1 5 10)")
    p.add_argument("--json", help="figures and per-POI hits (default <results>.eval.json)")
    p.add_argument("--html", help="write a self-contained HTML report here")
    p.add_argument("--html-k", type=cli.positive_int, help="images shown per POI in the report (default max --k)")
    p.add_argument("--image-dir", help="where the images are, for thumbnails")
    p.add_argument("--page-size", type=cli.positive_int, default=50, help="POIs per report page (default 50)")
    args.add_bootstrap(p)
    args.add_run(p)
    return p


def check_paths(ns) -> str:
    """Inputs readable, outputs writable and distinct from the inputs and each other,
    before any work; returns the JSON path."""
    inputs = {f"--compare {'AB'[i]}": path for i, path in enumerate(ns.compare or ())}
    inputs |= {"--results": ns.results, "--embeddings": ns.embeddings}
    for flag, path in inputs.items():
        if path is not None:
            cli.input_file(path, flag.split()[0])
    if ns.results:
        inputs["--results (its .meta.json)"] = f"{ns.results}.meta.json"
    if ns.image_dir:
        cli.input_dir(ns.image_dir, "--image-dir")
    out_json = ns.json or default_json_path(ns.results, ns.embeddings, ns.compare)
    cli.output_file(out_json, "--json")
    if ns.html:
        cli.output_file(ns.html, "--html")
    cli.distinct_paths(inputs, {"--json": out_json, "--html": ns.html})
    return out_json


@entry_point
def main(argv=None) -> int:
    p = build_parser()
    ns = p.parse_args(argv)
    if sum(x is not None for x in (ns.results, ns.embeddings, ns.compare)) != 1:
        p.error("give one of --results FILE, --embeddings FILE.npz or --compare A.csv B.csv")
    cli.setup_logging(ns.log_level)
    out_json = check_paths(ns)
    if ns.compare:
        doc = compare_recall(*ns.compare, ks=ns.k, json_path=out_json, draws=ns.bootstrap, seed=ns.seed)
        print(f"{format_compare(doc)}\ncomparison: {out_json}")
        return 0
    doc = evaluate_recall(
        ns.results,
        ns.embeddings,
        ks=ns.k,
        json_path=out_json,
        html=ns.html,
        html_k=ns.html_k,
        image_dir=ns.image_dir,
        page_size=ns.page_size,
        draws=ns.bootstrap,
        seed=ns.seed,
        progress=not ns.no_progress,
    )
    print(format_recall(doc) + (f"\nreport: {ns.html}" if ns.html else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
