#!/usr/bin/env python
"""recall@K, MRR and an optional HTML report from recall results (SPEC section 4).

    python recall_eval.py --results results/recall_top10.csv
    python recall_eval.py --results results/recall_full.csv --k 1 5 10 50
    python recall_eval.py --results results/recall_top10.csv --html results/recall.html \\
        --image-dir data/recall_images
    python recall_eval.py --compare results/taiyi_top10.csv results/recall_top10.csv   # A vs B
    python recall_eval.py --embeddings results/recall.npz   # recall_infer.py --save-embeddings

Input, either results format (detected from the first line):
  * recall_infer.py --output: header ``poi_id,poi_name,rank,image,score``, top-k rows;
  * the authors' full format (recall_infer.py --full-output): no header, one row per
    (POI, image) ``poi_id,poi_name,image_path,score``;
or the vectors of a run (--embeddings FILE.npz, recall_infer.py --save-embeddings): the
scores are computed here (cosines, stable top-k: the figures of the full format), so
feature extraction, top-k and scoring can run apart, as in Chinese-CLIP's evaluation.

A score that is not a finite number is an error naming the file and line; a row that
repeats an earlier (poi_id, image) pair is counted once, with a warning.

Semantics (the authors' evaluator): rows are grouped by poi_id (not by name: four
names of the published set belong to two ids each); each group is sorted by score,
descending, with a stable sort (ties keep file order); a POI is a hit at K when any of
its top K images is its own (file name before the first ``_`` == poi_id); recall@K =
hits / POIs. MRR is the mean of 1 / rank of the first own image, 0 when none is listed
(over a top-10 file that is MRR@10).

A top-k file cannot give recall@K for K above its k (unless it lists the whole
gallery): that is an error, not a silently wrong number.

Uncertainty: every recall@K and the MRR come with a 95% percentile bootstrap interval
(resampling POIs, --bootstrap draws, default 10,000, at most 1,000,000, --seed; POIs are
taken in poi_id order, so the interval does not depend on the file's order).

--compare A.csv B.csv: the two models' recall@K (and MRR) side by side on the POIs both
files hold, with a PAIRED bootstrap (the same resampled POIs for both) giving an interval
for each figure and for the difference B - A, and for each K the POIs that one model
hits and the other misses (all of them in the JSON, default ``<B>.compare.json``; a
summary is printed).

Writes a JSON (--json, default ``<results>.eval.json``) with the figures and per-POI
hits, and with --html a self-contained page (thumbnails embedded; failures first), the
two together. Thumbnails are looked up as the listed path, else by file name in
--image-dir (default: the image directory recorded in ``<results>.meta.json`` by
recall_infer.py).

Exit status: 0 on success, 2 for bad input (an unreadable results file, an impossible K,
an output location that cannot be written or that is an input), reported as one line.
"""

from __future__ import annotations

from utils.cli import (
    distinct_paths,
    entry_point,
    input_dir,
    input_file,
    non_negative_int,
    output_file,
    positive_int,
    setup_logging,
)

import argparse
import sys

from utils.args import add_run
from utils.evaluation import (
    DEFAULT_DRAWS,
    DEFAULT_KS,
    DEFAULT_SEED,
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
    p.add_argument("--k", type=positive_int, nargs="+", default=list(DEFAULT_KS), help="K values (default 1 5 10)")
    p.add_argument("--json", help="figures and per-POI hits (default <results>.eval.json)")
    p.add_argument("--html", help="write a self-contained HTML report here")
    p.add_argument("--html-k", type=positive_int, help="images shown per POI in the report (default max --k)")
    p.add_argument("--image-dir", help="where the images are, for thumbnails")
    p.add_argument("--page-size", type=positive_int, default=50, help="POIs per report page (default 50)")
    p.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=DEFAULT_DRAWS,
        metavar="N",
        help=f"bootstrap draws for the 95%% intervals (default {DEFAULT_DRAWS}; 0: none)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed (default 0)")
    add_run(p)
    return p


def check_paths(ns) -> str:
    """Inputs readable, outputs writable and distinct from the inputs and each other,
    before any work; returns the JSON path."""
    inputs = {f"--compare {'AB'[i]}": path for i, path in enumerate(ns.compare or ())}
    inputs |= {"--results": ns.results, "--embeddings": ns.embeddings}
    for flag, path in inputs.items():
        if path is not None:
            input_file(path, flag.split()[0])
    if ns.results:
        inputs["the sidecar of --results"] = f"{ns.results}.meta.json"
    if ns.image_dir:
        input_dir(ns.image_dir, "--image-dir")
    out_json = ns.json or default_json_path(ns.results, ns.embeddings, ns.compare)
    output_file(out_json, "--json")
    if ns.html:
        output_file(ns.html, "--html")
    distinct_paths(inputs, {"--json": out_json, "--html": ns.html})
    return out_json


@entry_point
def main(argv=None) -> int:
    p = build_parser()
    ns = p.parse_args(argv)
    if sum(x is not None for x in (ns.results, ns.embeddings, ns.compare)) != 1:
        p.error("give one of --results FILE, --embeddings FILE.npz or --compare A.csv B.csv")
    setup_logging(ns.log_level)
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
