"""Seeded percentile bootstrap intervals (recall@K, MRR, pairwise accuracy, ROC-AUC), and
the paired version for two models on the same items.

Each draw picks ``n`` items with replacement, turned into per-item multiplicities; a
mean is then ``counts @ values / n``. Draws are made in blocks of at most ``BLOCK`` rows
and ``BLOCK_CELLS`` multiplicities, so memory does not grow with the number of draws;
only the statistics of the draws (draws x columns) are kept for the quantiles. The
interval is the 2.5 % and 97.5 % quantile of the draws (``LEVEL`` = 0.95). Paired: the
same draws resample both models' items, so the interval of the difference accounts for
their correlation.
"""

from __future__ import annotations

from utils.cli import UserError

import numpy as np

from .metrics import weighted_auc

DEFAULT_DRAWS = 10_000
DEFAULT_SEED = 0
MAX_DRAWS = 1_000_000  # 100x the default; its intervals are already stable to 1e-3
LEVEL = 0.95
BLOCK = 1000
BLOCK_CELLS = 10_000_000  # up to 10,000 items a block is BLOCK draws (the figures of every run so far)


def check_draws(draws: int) -> int:
    if not 0 <= draws <= MAX_DRAWS:
        raise UserError(f"--bootstrap {draws}: expected 0 to {MAX_DRAWS:,} draws")
    return draws


def resample_counts(n: int, draws: int = DEFAULT_DRAWS, seed: int = DEFAULT_SEED, block: int = BLOCK):
    """Yield blocks (b x n int arrays) of per-item multiplicities, ``draws`` rows in all."""
    if n < 1:
        raise ValueError("bootstrap of an empty sample")
    check_draws(draws)
    block = max(1, min(block, BLOCK_CELLS // n))
    rng = np.random.default_rng(seed)
    for done in range(0, draws, block):
        b = min(block, draws - done)
        idx = rng.integers(0, n, size=(b, n))
        idx += (np.arange(b) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)


def _quantiles(stats: np.ndarray, level: float) -> np.ndarray:
    a = (1.0 - level) / 2.0
    return np.quantile(stats, [a, 1.0 - a], axis=0)


def bootstrap_means(values, draws: int = DEFAULT_DRAWS, seed: int = DEFAULT_SEED) -> np.ndarray:
    """draws x m matrix of resampled means of each column of ``values`` (n x m or n)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[:, None] if v.ndim == 1 else v
    return np.concatenate([c @ v / v.shape[0] for c in resample_counts(v.shape[0], draws, seed)])


def mean_intervals(values, draws=DEFAULT_DRAWS, seed=DEFAULT_SEED, level=LEVEL) -> list[tuple[float, float]]:
    """Percentile interval of the mean of each column of ``values`` (n x m), all columns
    from the same draws (paired)."""
    return [(float(lo), float(hi)) for lo, hi in _quantiles(bootstrap_means(values, draws, seed), level).T]


def mean_interval(values, draws=DEFAULT_DRAWS, seed=DEFAULT_SEED, level=LEVEL) -> tuple[float, float]:
    return mean_intervals(np.asarray(values, dtype=np.float64).reshape(-1, 1), draws, seed, level)[0]


def auc_draws(labels, scores, draws: int = DEFAULT_DRAWS, seed: int = DEFAULT_SEED) -> np.ndarray:
    n = len(np.asarray(labels).reshape(-1))
    return np.concatenate([weighted_auc(labels, scores, c) for c in resample_counts(n, draws, seed)])


def auc_interval(labels, scores, draws=DEFAULT_DRAWS, seed=DEFAULT_SEED, level=LEVEL) -> tuple[float, float] | None:
    """Percentile interval of the ROC-AUC over resampled pairs (draws with a single class
    left out); None when fewer than half of the draws define an AUC."""
    a = auc_draws(labels, scores, draws, seed)
    a = a[~np.isnan(a)]
    if len(a) < max(1, draws // 2):
        return None
    lo, hi = _quantiles(a, level)
    return float(lo), float(hi)


def fmt_interval(ci, digits: int = 4) -> str:
    """``[95% CI 0.7520, 0.8240]`` (an empty string for None)."""
    return "" if ci is None else f"[{int(LEVEL * 100)}% CI {ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
