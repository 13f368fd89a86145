"""Seeded, vectorised percentile bootstrap for the evaluators (recall@K, MRR, pairwise
accuracy, ROC-AUC), and the paired version for comparing two models on the same items.

Resampling: each draw picks ``n`` items with replacement (``rng.integers``), turned
into per-item multiplicities with one ``bincount`` per block of draws; a statistic that
is a mean is then a matrix product ``counts @ values / n``. Draws are made in blocks
(``BLOCK``) so 10,000 draws over thousands of items stay within a few tens of MB.
The interval is the percentile interval: the 2.5 % and 97.5 % quantiles of the draws
(``level`` = 0.95). Paired: the same draws resample the items of both models, so the
interval of the difference accounts for their correlation.

    lo, hi = mean_interval(hits)                         # one column
    ci = mean_intervals(np.c_[a, b, b - a])              # several columns, same draws
    lo, hi = auc_interval(labels, scores)                # ROC-AUC recomputed per draw
"""

from __future__ import annotations

import numpy as np

DEFAULT_DRAWS = 10_000
DEFAULT_SEED = 0
LEVEL = 0.95
BLOCK = 1000


def _counts(rng: np.random.Generator, n: int, draws: int) -> np.ndarray:
    """draws x n multiplicities of a resample with replacement."""
    idx = rng.integers(0, n, size=(draws, n))
    flat = (idx + (np.arange(draws) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=draws * n).reshape(draws, n)


def resample_counts(n: int, draws: int = DEFAULT_DRAWS, seed: int = DEFAULT_SEED, block: int = BLOCK):
    """Yield blocks (b x n int arrays) of per-item multiplicities, ``draws`` rows in all."""
    if n < 1:
        raise ValueError("bootstrap of an empty sample")
    rng = np.random.default_rng(seed)
    done = 0
    while done < draws:
        b = min(block, draws - done)
        yield _counts(rng, n, b)
        done += b


def _quantiles(stats: np.ndarray, level: float) -> np.ndarray:
    a = (1.0 - level) / 2.0
    return np.quantile(stats, [a, 1.0 - a], axis=0)


def bootstrap_means(values, draws: int = DEFAULT_DRAWS, seed: int = DEFAULT_SEED) -> np.ndarray:
    """draws x m matrix of resampled means of each column of ``values`` (n x m or n)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[:, None] if v.ndim == 1 else v
    n = v.shape[0]
    return np.concatenate([c @ v / n for c in resample_counts(n, draws, seed)])


def mean_intervals(
    values, draws: int = DEFAULT_DRAWS, seed: int = DEFAULT_SEED, level: float = LEVEL
) -> list[tuple[float, float]]:
    """Percentile interval of the mean of each column of ``values`` (n x m), all columns
    from the same draws (paired)."""
    q = _quantiles(bootstrap_means(values, draws, seed), level)
    return [(float(lo), float(hi)) for lo, hi in q.T]


def mean_interval(
    values, draws: int = DEFAULT_DRAWS, seed: int = DEFAULT_SEED, level: float = LEVEL
) -> tuple[float, float]:
    return mean_intervals(np.asarray(values, dtype=np.float64).reshape(-1, 1), draws, seed, level)[0]


def weighted_auc(labels, scores, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC (Mann-Whitney, ties counted half) of ``scores`` against ``labels`` for each
    row of item multiplicities ``weights`` (b x n); NaN where a row has a single class.
    Vectorised over rows: one sort, then cumulative sums per tie group."""
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64)
    w = w[None] if w.ndim == 1 else w
    order = np.argsort(s, kind="mergesort")
    s_sorted, y_sorted, w_sorted = s[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # tie groups
    pos = np.add.reduceat(w_sorted * y_sorted, starts, axis=1)  # b x G
    neg = np.add.reduceat(w_sorted * ~y_sorted, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives strictly lower
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def auc_draws(labels, scores, draws: int = DEFAULT_DRAWS, seed: int = DEFAULT_SEED) -> np.ndarray:
    n = len(np.asarray(labels).reshape(-1))
    return np.concatenate([weighted_auc(labels, scores, c) for c in resample_counts(n, draws, seed)])


def auc_interval(
    labels, scores, draws: int = DEFAULT_DRAWS, seed: int = DEFAULT_SEED, level: float = LEVEL
) -> tuple[float, float] | None:
    """Percentile interval of the ROC-AUC over resampled pairs (draws with a single class
    are left out); None when fewer than half of the draws define an AUC."""
    a = auc_draws(labels, scores, draws, seed)
    a = a[~np.isnan(a)]
    if len(a) < max(1, draws // 2):
        return None
    lo, hi = _quantiles(a, level)
    return float(lo), float(hi)


def fmt_interval(ci, digits: int = 4) -> str:
    """``[95% CI 0.7520, 0.8240]`` (or an empty string for None)."""
    if ci is None:
        return ""
    return f"[{int(LEVEL * 100)}% CI {ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
