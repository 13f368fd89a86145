"""Pairwise figures of the ranking stage (SPEC section 5).

For each pair, ``s_a`` and ``s_b`` are the scores of the two images and ``label`` is 1
when image a had the higher CTR:

- ``accuracy``: mean of ``(s_a > s_b) == label`` (ties predict 0) — the published
  0.652, which the paper calls "AUC";
- ``auc``: ROC-AUC of ``sigmoid(s_a - s_b)`` against the label (the honest AUC). It is
  computed on ``s_a - s_b`` directly: sigmoid is monotone, so the AUC is the same,
  without float saturation turning large margins into ties. ``None`` when the
  labels hold a single class;
- ``log_loss``: mean binary cross-entropy of ``sigmoid(s_a - s_b)``, computed stably;
- ``baseline``: accuracy of the best constant guess, ``max(mean label, 1 - mean label)``;
- ``n``: number of pairs (``ties``: pairs with ``s_a == s_b``).
"""
from __future__ import annotations

import math

import numpy as np


def roc_auc(labels, scores) -> float | None:
    """Mann-Whitney ROC-AUC with ties counted half; ``None`` for a single class."""
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average rank (1-based) of each group of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pairwise_metrics(labels, s_a, s_b) -> dict:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    a = np.asarray(s_a, dtype=np.float64).reshape(-1)
    b = np.asarray(s_b, dtype=np.float64).reshape(-1)
    if not (len(y) == len(a) == len(b)):
        raise ValueError(f"labels, s_a and s_b differ in length: {len(y)}, {len(a)}, {len(b)}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    n = len(y)
    if n == 0:
        return {"n": 0, "accuracy": None, "auc": None, "log_loss": None, "baseline": None,
                "ties": 0, "mean_label": None}
    d = a - b
    pred = (d > 0).astype(np.float64)
    # -log sigmoid(d) = logaddexp(0, -d); -log(1 - sigmoid(d)) = logaddexp(0, d)
    nll = np.where(y == 1.0, np.logaddexp(0.0, -d), np.logaddexp(0.0, d))
    mean_label = float(y.mean())
    out = {
        "n": n,
        "accuracy": float((pred == y).mean()),
        "auc": roc_auc(y, d),
        "log_loss": float(nll.mean()),
        "baseline": max(mean_label, 1.0 - mean_label),
        "ties": int((d == 0).sum()),
        "mean_label": mean_label,
    }
    if not all(v is None or math.isfinite(v) for v in out.values()):
        raise ValueError("scores contain NaN or infinite values")
    return out
