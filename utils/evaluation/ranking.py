"""rank_eval.py's pairs, figures with intervals over pairs, output files and summary."""

from __future__ import annotations

from utils.cli import DataError, bad_rows

import csv
import logging

import numpy as np

from utils.formats import iter_rank_csv
from utils.io import commit_outputs, write_json

from .bootstrap import LEVEL, auc_interval, fmt_figure, mean_intervals
from .metrics import pairwise_metrics

log = logging.getLogger(__name__)
LEFT_OUT = (("bad_rows", "bad rows"), ("duplicate_rows", "repeated item_ids"))


def read_pairs(path: str, limit: int | None = None, skip_bad_rows: bool = False) -> tuple[list, dict]:
    """The first ``limit`` rows of a ranking CSV; counts of bad and repeated rows left out."""
    errors, first, repeats = [], {}, 0
    for row in iter_rank_csv(path, errors):
        if (was := first.setdefault(row.item_id, row)) is row:
            continue
        repeats += 1
        same = (was.ctr_a, was.ctr_b, was.title, was.poi_names) == (row.ctr_a, row.ctr_b, row.title, row.poi_names)
        where = (path, row.line, row.item_id, was.line, "" if same else " with other values")
        log.warning("%s:%d: item_id %s repeats line %d%s; counted once (the first)", *where)
    counts = {"bad_rows": bad_rows(errors, path, skip_bad_rows), "duplicate_rows": repeats}
    rows = list(first.values())[:limit]
    if not rows:
        raise DataError(f"{path}: no usable ranking rows")
    log.info("%s: %d pairs (%d with label 1)", path, len(rows), sum(r.label for r in rows))
    return rows, counts


def pair_metrics(labels, s_a, s_b, draws: int, seed: int) -> dict:
    """``pairwise_metrics`` with ``accuracy_ci`` / ``auc_ci`` over resampled pairs, or None."""
    m = pairwise_metrics(labels, s_a, s_b)
    m["accuracy_ci"] = m["auc_ci"] = None
    if not draws or not m["n"]:
        return m
    y, d = np.asarray(labels, dtype=np.float64), np.asarray(s_a) - np.asarray(s_b)
    m["accuracy_ci"] = list(mean_intervals(((d > 0) == (y == 1)).astype(np.float64), draws, seed)[0])
    ci = auc_interval(y, d, draws, seed) if m["auc"] is not None else None
    m["auc_ci"] = list(ci) if ci else None
    m["bootstrap"] = {"draws": draws, "seed": seed, "level": LEVEL, "resampling": "pairs"}
    return m


def write_pair_outputs(output, metrics, rows: list, s_a, s_b, doc: dict) -> None:
    """The per-pair CSV and the metrics JSON (``doc``), together or not at all; None skips one."""

    def write_csv(tmp) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["item_id", "label", "s_a", "s_b", "prediction"])
            for row, a, b in zip(rows, s_a, s_b):
                w.writerow([row.item_id, row.label, repr(float(a)), repr(float(b)), int(a > b)])

    commit_outputs({output: write_csv, metrics: lambda tmp: write_json(tmp, doc)})


def format_pair_summary(doc: dict, csv_path: str) -> str:
    """The printed summary of rank_eval's metrics document."""

    def figure(key: str) -> str:
        return fmt_figure(doc[key], doc.get(f"{key}_ci"))

    left_out = [f"{doc[k]} {what}" for k, what in LEFT_OUT if doc.get(k)]
    missing, skipped = doc["pairs_with_missing_image"], doc["pairs_skipped"]
    how = f" (left out: {skipped})" if skipped else " (scored with the zero image)" if missing else ""
    return "\n".join(
        [
            f"rank_eval: {csv_path}",
            f"  pairwise accuracy (s_a > s_b vs label; published 0.652): {figure('accuracy')}",
            f"  ROC-AUC of sigmoid(s_a - s_b):                           {figure('auc')}",
            f"  log loss of sigmoid(s_a - s_b):                          {figure('log_loss')}",
            f"  constant-guess baseline:                                 {figure('baseline')}",
            f"  pairs scored: {doc['pairs_scored']} of {doc['pairs_in_csv']} in the CSV"
            + (f" ({', '.join(left_out)} left out)" if left_out else ""),
            f"  pairs with a missing or unreadable image: {missing}{how}",
            f"  images missing: {doc['images_missing']}, unreadable: {doc['images_unreadable']}",
            f"  pairs without POIs: {doc['pairs_without_pois']}; with a POI missing from a vector table: "
            f"{doc['pairs_with_unknown_poi']}; score ties: {doc['ties']}",
        ]
    )
