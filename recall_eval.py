#!/usr/bin/env python
"""recall@K, MRR and an optional HTML report from recall results (SPEC section 4).

    python recall_eval.py --results results/recall_top10.csv
    python recall_eval.py --results results/recall_full.csv --k 1 5 10 50
    python recall_eval.py --results results/recall_top10.csv --html results/recall.html \\
        --image-dir data/recall_images
    python recall_eval.py --compare results/taiyi_top10.csv results/recall_top10.csv   # A vs B
    python recall_eval.py --embeddings results/recall.npz   # recall_infer.py --save-embeddings

Input, either results format (detected from the first line; utils/data.py):
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
(resampling POIs, --bootstrap draws, default 10,000, --seed; utils/bootstrap.py; POIs
are taken in poi_id order, so the interval does not depend on the file's order).

--compare A.csv B.csv: the two models' recall@K (and MRR) side by side on the POIs both
files hold, with a PAIRED bootstrap (the same resampled POIs for both) giving an interval
for each figure and for the difference B - A, and for each K the POIs that one model
hits and the other misses (all of them in the JSON, default ``<B>.compare.json``; a
summary is printed).

Writes a JSON (--json, default ``<results>.eval.json``) with the figures and per-POI
hits, and with --html a self-contained page (thumbnails embedded; failures first).
Thumbnails are looked up as the listed path, else by file name in --image-dir (default:
the image directory recorded in ``<results>.meta.json`` by recall_infer.py).

Exit status: 0 on success, 2 for bad input (an unreadable results file, an impossible K,
an output location that cannot be written), reported as one line.
"""

from __future__ import annotations

from utils.cli import DataError

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from utils import cli
from utils.evaluation import (
    DEFAULT_DRAWS,
    DEFAULT_KS,
    DEFAULT_SEED,
    LEVEL,
    RecallResult,
    evaluate_groups,
    evaluate_matrix,
    fmt_interval,
    mean_intervals,
)
from utils.formats import load_embeddings
from utils.formats import read_results as read_results_file
from utils.io import write_json

log = logging.getLogger("recall_eval")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", help="recall_infer.py output (top-k or full format)")
    p.add_argument(
        "--embeddings", metavar="FILE.npz", help="recall_infer.py --save-embeddings output: score its vectors here"
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.csv", "B.csv"),
        help="compare two results files (two models) on the same POIs, paired bootstrap",
    )
    p.add_argument("--k", type=cli.positive_int, nargs="+", default=list(DEFAULT_KS), help="K values (default 1 5 10)")
    p.add_argument("--json", help="figures and per-POI hits (default <results>.eval.json)")
    p.add_argument("--html", help="write a self-contained HTML report here")
    p.add_argument("--html-k", type=cli.positive_int, help="images shown per POI in the report (default max --k)")
    p.add_argument("--image-dir", help="where the images are, for thumbnails")
    p.add_argument("--page-size", type=cli.positive_int, default=50, help="POIs per report page (default 50)")
    p.add_argument(
        "--bootstrap",
        type=cli.non_negative_int,
        default=DEFAULT_DRAWS,
        metavar="N",
        help=f"bootstrap draws for the 95%% intervals (default {DEFAULT_DRAWS}; 0: none)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed (default 0)")
    cli.add_common_args(p, device=False)
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.results, args.embeddings, args.compare)) != 1:
        p.error("give one of --results FILE, --embeddings FILE.npz or --compare A.csv B.csv")
    return args


def read_results(path: str | os.PathLike):
    """``(fmt, groups, names)`` of a results file (``utils.data.read_results``)."""
    r = read_results_file(path)
    return r.fmt, r.groups, r.names


def check_paths(args) -> str:
    """Inputs readable, outputs writable, before the work; returns the JSON path."""
    inputs = args.compare or [args.results or args.embeddings]
    for path in inputs:
        cli.input_file(path, "--compare" if args.compare else "--results" if args.results else "--embeddings")
    if args.image_dir:
        cli.input_dir(args.image_dir, "--image-dir")
    out_json = args.json or (f"{args.compare[1]}.compare.json" if args.compare else f"{inputs[0]}.eval.json")
    cli.output_file(out_json, "--json")
    if args.html:
        cli.output_file(args.html, "--html")
        if os.path.realpath(args.html) == os.path.realpath(out_json):
            raise cli.UserError(f"--html {args.html}: the same file as the JSON output")
    for path in inputs:
        if os.path.realpath(path) in {os.path.realpath(out_json), os.path.realpath(args.html or out_json)}:
            raise cli.UserError(f"{path}: would be overwritten by an output of this run")
    return out_json


def read_meta(results: str) -> dict:
    p = Path(f"{results}.meta.json")
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("%s: ignored (%s)", p, e)
        return {}


def check_k(fmt: str, groups: dict, ks: list[int], meta: dict, path: str) -> None:
    """A top-k file lists at most k images per POI: K above that is unknowable unless the
    file holds the whole gallery (meta: gallery_size <= topk)."""
    if fmt != "topk":
        return
    listed = max(len(v) for v in groups.values())
    complete = bool(meta) and meta.get("gallery_size", 10**12) <= meta.get("topk", 0)
    too_big = [k for k in ks if k > listed]
    if too_big and not complete:
        raise DataError(
            f"{path}: lists the top {listed} images per POI, so recall@{too_big} cannot be "
            f"computed; rerun recall_infer.py with --topk {max(too_big)} (or use its "
            f"--full-output file)"
        )


def result_json(result: RecallResult, fmt: str, path: str) -> dict:
    return {
        "results": path,
        "format": fmt,
        "n_pois": result.n_pois,
        "ks": result.ks,
        "recall": {str(k): v for k, v in result.recall.items()},
        "hits": {str(k): v for k, v in result.hits.items()},
        "mrr": result.mrr,
        "mrr_over": "all listed images" if fmt == "full" else "the listed top images per POI",
        "pois": [
            {
                "poi_id": p.poi_id,
                "poi_name": p.poi_name,
                "first_hit_rank": p.first_hit,
                "listed": p.n_candidates,
                **{f"hit@{k}": p.hit_at(k) for k in result.ks},
                "top": [[img, s] for img, s in p.top],
            }
            for p in result.pois
        ],
    }


def per_poi_table(result: RecallResult, ks: list[int]) -> dict[str, list[float]]:
    """``{poi_id: [hit@K for each K..., reciprocal rank]}``."""
    return {
        p.poi_id: [float(p.hit_at(k)) for k in ks] + [1.0 / p.first_hit if p.first_hit else 0.0] for p in result.pois
    }


def intervals(result: RecallResult, ks: list[int], draws: int, seed: int) -> dict | None:
    """``{"recall": {K: (lo, hi)}, "mrr": (lo, hi)}`` over POIs in poi_id order."""
    if not draws:
        return None
    table = per_poi_table(result, ks)
    ci = mean_intervals(np.array([table[p] for p in sorted(table)]), draws, seed)
    return {"recall": dict(zip(ks, ci[:-1])), "mrr": ci[-1]}


def load(path: str, ks: list[int]):
    """``(fmt, groups, names, meta)`` of a results file, K checked."""
    fmt, groups, names = read_results(path)
    meta = read_meta(path)
    check_k(fmt, groups, ks, meta, path)
    return fmt, groups, names, meta


def evaluate_embeddings(path: str, ks: list[int], keep: int) -> tuple[RecallResult, dict]:
    """recall@K/MRR from the vectors of ``recall_infer.py --save-embeddings``: cosines of
    every POI name with every image, ranked by ``utils.metrics.stable_topk`` (the same
    computation as recall_infer's, so the same figures as its --full-output file)."""
    import torch

    d = load_embeddings(path)
    with torch.inference_mode():
        scores = torch.from_numpy(d["text_emb"]) @ torch.from_numpy(d["image_emb"]).t()
    too_big = [k for k in ks if k > scores.shape[1]]
    if too_big:
        log.warning("%s: the gallery holds %d images; recall@%s counts them all", path, scores.shape[1], too_big)
    names = dict(zip(d["poi_ids"], d["poi_names"]))
    if len(names) != len(d["poi_ids"]):
        raise DataError(f"{path}: a poi_id appears twice among the text vectors")
    return evaluate_matrix(scores, d["poi_ids"], d["image_names"], ks, names, keep=keep), d["meta"]


def compare(args, ks: list[int], out_json: str) -> int:
    """--compare A B: side by side, paired bootstrap, who hits what."""
    a_path, b_path = args.compare
    la, lb = load(a_path, ks), load(b_path, ks)
    ra, rb = (evaluate_groups(x[1], ks, x[2], keep=max(ks)) for x in (la, lb))
    ta, tb = per_poi_table(ra, ks), per_poi_table(rb, ks)
    common = sorted(set(ta) & set(tb))
    only_a, only_b = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
    if not common:
        raise DataError(f"{a_path} and {b_path} have no POI in common")
    if only_a or only_b:
        log.warning(
            "comparing the %d POIs both files hold; %d only in %s, %d only in %s",
            len(common),
            len(only_a),
            a_path,
            len(only_b),
            b_path,
        )
    A = np.array([ta[p] for p in common])
    B = np.array([tb[p] for p in common])
    names = {**la[2], **lb[2]}
    m = A.shape[1]
    figures = {"A": A.mean(0), "B": B.mean(0), "B-A": (B - A).mean(0)}
    ci = None
    if args.bootstrap:
        flat = mean_intervals(np.hstack([A, B, B - A]), args.bootstrap, args.seed)
        ci = {"A": flat[:m], "B": flat[m : 2 * m], "B-A": flat[2 * m :]}
    labels = [f"recall@{k}" for k in ks] + ["MRR"]
    doc = {
        "A": a_path,
        "B": b_path,
        "n_pois": len(common),
        "pois_only_in_A": only_a,
        "pois_only_in_B": only_b,
        "ks": ks,
        "bootstrap": {"draws": args.bootstrap, "seed": args.seed, "level": LEVEL, "resampling": "POIs, paired"},
        "recall": {},
        "mrr": {},
        "hit_by_one_only": {},
    }
    print(f"A: {a_path}\nB: {b_path}\nPOIs compared: {len(common)}")
    w = max(len(x) for x in labels)
    for j, label in enumerate(labels):
        row = {key: {"value": float(figures[key][j]), "ci": list(ci[key][j]) if ci else None} for key in figures}
        if j < len(ks):
            doc["recall"][str(ks[j])] = row
        else:
            doc["mrr"] = row
        cell = lambda key: f"{figures[key][j]:.4f} {fmt_interval(ci[key][j]) if ci else ''}".rstrip()  # noqa: E731
        print(
            f"{label:<{w}}  A {cell('A')}   B {cell('B')}   B - A {figures['B-A'][j]:+.4f} "
            f"{fmt_interval(ci['B-A'][j]) if ci else ''}".rstrip()
        )
    for j, k in enumerate(ks):
        a_only = [p for i, p in enumerate(common) if A[i, j] and not B[i, j]]
        b_only = [p for i, p in enumerate(common) if B[i, j] and not A[i, j]]
        doc["hit_by_one_only"][str(k)] = {
            "A_hits_B_misses": [{"poi_id": p, "poi_name": names.get(p, "")} for p in a_only],
            "B_hits_A_misses": [{"poi_id": p, "poi_name": names.get(p, "")} for p in b_only],
        }
        show = lambda ps: (
            ", ".join(f"{p} {names.get(p, '')}".strip() for p in ps[:5])
            + (  # noqa: E731
                f" ... (+{len(ps) - 5})" if len(ps) > 5 else ""
            )
        )
        print(
            f"@{k}: A hits / B misses {len(a_only)}"
            + (f" ({show(a_only)})" if a_only else "")
            + f"; B hits / A misses {len(b_only)}"
            + (f" ({show(b_only)})" if b_only else "")
        )
    write_json(out_json, doc, indent=1)
    print(f"comparison: {out_json}")
    return 0


def make_resolver(image_dir: str | None, results: str):
    base = Path(results).parent

    def resolve(image: str) -> str | None:
        cands = [Path(image)]
        if not Path(image).is_absolute():
            cands.append(base / image)
        if image_dir:
            cands.append(Path(image_dir) / Path(image).name)
        for c in cands:
            if c.is_file():
                return str(c)
        return None

    return resolve


def evaluate(args, ks: list[int], html_k: int):
    """``(result, fmt, meta, sizes)`` of --results or --embeddings."""
    keep = max(ks + [html_k])
    if args.embeddings:
        result, meta = evaluate_embeddings(args.embeddings, ks, keep)
        return result, "full", meta, {result.pois[0].n_candidates}
    fmt, groups, names, meta = load(args.results, ks + ([html_k] if args.html else []))
    return evaluate_groups(groups, ks, names, keep=keep), fmt, meta, {len(v) for v in groups.values()}


def print_figures(source: str, fmt: str, result: RecallResult, ks: list[int], ci, sizes, args) -> None:
    print(f"results: {source} ({fmt} format)")
    print(f"POIs: {result.n_pois}")
    for k in ks:
        print(
            f"recall@{k}: {result.recall[k]:.4f} ({result.hits[k]}/{result.n_pois})"
            + (f" {fmt_interval(ci['recall'][k])}" if ci else "")
        )
    print(
        f"MRR (first hit{'' if fmt == 'full' else f', within top {max(sizes)}'}): {result.mrr:.4f}"
        + (f" {fmt_interval(ci['mrr'])}" if ci else "")
    )
    if ci:
        print(f"(intervals: percentile bootstrap over POIs, {args.bootstrap} draws, seed {args.seed})")


def write_report(args, source: str, result: RecallResult, ks: list[int], ci, html_k: int, meta: dict) -> None:
    image_dir = args.image_dir or meta.get("image_dir")
    summary = {
        "results": os.path.basename(source),
        "POIs": result.n_pois,
        **{f"recall@{k}": f"{result.recall[k]:.4f}" + (f" {fmt_interval(ci['recall'][k])}" if ci else "") for k in ks},
        "MRR": f"{result.mrr:.4f}",
    }
    from utils.evaluation import write_recall_report

    info = write_recall_report(
        args.html,
        result,
        html_k,
        make_resolver(image_dir, source),
        title=f"Recall top {html_k}",
        summary=summary,
        page_size=args.page_size,
        progress=not args.no_progress,
    )
    if info["missing"]:
        log.warning(
            "%d listed images had no readable file for a thumbnail%s",
            info["missing"],
            "" if image_dir else " (pass --image-dir)",
        )
    print(f"report: {args.html}")


@cli.entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args.log_level)
    out_json = check_paths(args)
    ks = sorted(set(args.k))
    if args.compare:
        return compare(args, ks, out_json)
    source = args.results or args.embeddings
    html_k = args.html_k or max(ks)
    result, fmt, meta, sizes = evaluate(args, ks, html_k)
    log.info(
        "%s: %s format, %d POIs, %s images listed per POI",
        source,
        fmt,
        result.n_pois,
        "/".join(str(s) for s in sorted(sizes)[:5]),
    )
    ci = intervals(result, ks, args.bootstrap, args.seed)
    print_figures(source, fmt, result, ks, ci, sizes, args)
    doc = result_json(result, fmt, source)
    if ci:
        doc["recall_ci"] = {str(k): list(v) for k, v in ci["recall"].items()}
        doc["mrr_ci"] = list(ci["mrr"])
        doc["bootstrap"] = {"draws": args.bootstrap, "seed": args.seed, "level": LEVEL, "resampling": "POIs"}
    write_json(out_json, doc, indent=1)
    log.info("wrote %s", out_json)
    if args.html:
        write_report(args, source, result, ks, ci, html_k, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
