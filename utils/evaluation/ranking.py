"""rank_eval.py's figures and files (the model part is ``models.engine.pairs``): the pairs
of a ranking CSV, the pairwise figures with bootstrap intervals over pairs, the printed
summary, and the per-pair CSV and metrics JSON, committed together."""

from __future__ import annotations

from utils.cli import DataError, bad_rows

import csv
import logging

import numpy as np

from utils.formats import iter_rank_csv
from utils.io import commit_outputs, write_json

from .bootstrap import LEVEL, auc_interval, fmt_interval, mean_interval
from .metrics import pairwise_metrics

log = logging.getLogger(__name__)
OUTPUT_HEADER = ("item_id", "label", "s_a", "s_b", "prediction")
LEFT_OUT = (("bad_rows", "bad rows"), ("duplicate_rows", "repeated item_ids"))


def read_pairs(path: str, limit: int | None = None, skip_bad_rows: bool = False) -> tuple[list, dict]:
    """The rows of a ``$record$`` ranking CSV (the first ``limit``) and counts of what was
    left out. Bad rows follow the one rule (``utils.cli.bad_rows``: refused unless
    ``skip_bad_rows``). A repeated item_id is no bad row (each row reads well): it is
    reported and counted once, the first."""
    errors: list = []
    rows, first, repeats = [], {}, 0
    for row in iter_rank_csv(path, errors):
        if row.item_id not in first:
            first[row.item_id] = row
            rows.append(row)
            continue
        repeats += 1
        was = first[row.item_id]
        same = (was.ctr_a, was.ctr_b, was.title, was.poi_names) == (row.ctr_a, row.ctr_b, row.title, row.poi_names)
        where = (path, row.line, row.item_id, was.line, "" if same else " with other values")
        log.warning("%s:%d: item_id %s repeats line %d%s; counted once (the first)", *where)
    counts = {"bad_rows": bad_rows(errors, path, skip_bad_rows), "duplicate_rows": repeats}
    rows = rows[:limit] if limit else rows
    if not rows:
        raise DataError(f"{path}: no usable ranking rows")
    log.info("%s: %d pairs (%d with label 1)", path, len(rows), sum(r.label for r in rows))
    return rows, counts


def pair_metrics(labels, s_a, s_b, draws: int, seed: int) -> dict:
    """``pairwise_metrics`` with ``accuracy_ci`` / ``auc_ci``: percentile bootstrap
    intervals over pairs (None without draws or without an AUC)."""
    m = pairwise_metrics(labels, s_a, s_b)
    m["accuracy_ci"] = m["auc_ci"] = None
    if not draws or not m["n"]:
        return m
    y, d = np.asarray(labels, dtype=np.float64), np.asarray(s_a) - np.asarray(s_b)
    m["accuracy_ci"] = list(mean_interval(((d > 0) == (y == 1)).astype(np.float64), draws, seed))
    if m["auc"] is not None:
        ci = auc_interval(y, d, draws, seed)
        m["auc_ci"] = list(ci) if ci else None
    m["bootstrap"] = {"draws": draws, "seed": seed, "level": LEVEL, "resampling": "pairs"}
    return m


def write_pair_outputs(output, metrics, rows: list, s_a, s_b, doc: dict) -> None:
    """``output`` (per-pair CSV ``item_id,label,s_a,s_b,prediction``) and ``metrics``
    (``doc`` as JSON), committed together or not at all; None skips one."""

    def write_csv(tmp) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(OUTPUT_HEADER)
            for row, a, b in zip(rows, s_a, s_b):
                w.writerow([row.item_id, row.label, repr(float(a)), repr(float(b)), int(a > b)])

    commit_outputs({output: write_csv, metrics: lambda tmp: write_json(tmp, doc)})


def format_pair_summary(doc: dict, csv_path: str) -> str:
    """The printed summary of rank_eval's metrics document."""

    def f(key: str) -> str:
        v = doc[key]
        return "n/a" if v is None else f"{v:.4f} {fmt_interval(doc.get(f'{key}_ci'))}".rstrip()

    left_out = [f"{doc[k]} {what}" for k, what in LEFT_OUT if doc.get(k)]
    missing = doc["pairs_with_missing_image"]
    how = f" (left out: {doc['pairs_skipped']})" if doc["pairs_skipped"] else " (scored with the zero image)"
    return "\n".join(
        [
            f"rank_eval: {csv_path}",
            f"  pairwise accuracy (s_a > s_b vs label; published 0.652): {f('accuracy')}",
            f"  ROC-AUC of sigmoid(s_a - s_b):                           {f('auc')}",
            f"  log loss of sigmoid(s_a - s_b):                          {f('log_loss')}",
            f"  constant-guess baseline:                                 {f('baseline')}",
            f"  pairs scored: {doc['pairs_scored']} of {doc['pairs_in_csv']} in the CSV"
            + (f" ({', '.join(left_out)} left out)" if left_out else ""),
            f"  pairs with a missing or unreadable image: {missing}{how if missing or doc['pairs_skipped'] else ''}",
            f"  images missing: {doc['images_missing']}, unreadable: {doc['images_unreadable']}",
            f"  pairs without POIs: {doc['pairs_without_pois']}; with a POI missing from a vector table: "
            f"{doc['pairs_with_unknown_poi']}; score ties: {doc['ties']}",
        ]
    )
