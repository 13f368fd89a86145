"""Seeded 95 % percentile bootstrap intervals. A draw is per-item multiplicities made in blocks
of at most ``BLOCK_CELLS`` (memory flat in the draws); a table's columns share the draws (paired)."""

from __future__ import annotations

from utils.cli import UserError

import numpy as np

from .metrics import weighted_auc

DEFAULT_DRAWS = 10_000
DEFAULT_SEED = 0
MAX_DRAWS = 1_000_000  # 100x the default; its intervals are already stable to 1e-3
LEVEL = 0.95
TAILS = [(1.0 - LEVEL) / 2.0, 1.0 - (1.0 - LEVEL) / 2.0]  # the quantiles that bound the interval
BLOCK = 1000
BLOCK_CELLS = 10_000_000  # up to 10,000 items a block is BLOCK draws


def check_draws(draws: int) -> int:
    if not 0 <= draws <= MAX_DRAWS:
        raise UserError(f"--bootstrap {draws}: expected 0 to {MAX_DRAWS:,} draws")
    return draws


def resample_counts(n: int, draws: int = DEFAULT_DRAWS, seed: int = DEFAULT_SEED, block: int = BLOCK):
    """Blocks (b x n) of per-item multiplicities, ``draws`` rows in all."""
    check_draws(draws)
    block = max(1, min(block, BLOCK_CELLS // n))
    rng = np.random.default_rng(seed)
    for done in range(0, draws, block):
        b = min(block, draws - done)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)


def mean_intervals(values, draws=DEFAULT_DRAWS, seed=DEFAULT_SEED) -> list[tuple[float, float]]:
    """The interval of the mean of each column of ``values`` (n x m, or n: one column), paired."""
    v = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    means = np.concatenate([c @ v / v.shape[0] for c in resample_counts(v.shape[0], draws, seed)])  # draws x m
    return [(float(lo), float(hi)) for lo, hi in np.quantile(means, TAILS, axis=0).T]


def auc_interval(labels, scores, draws=DEFAULT_DRAWS, seed=DEFAULT_SEED) -> tuple[float, float] | None:
    """Over the draws that hold both classes; None when fewer than half of them do."""
    a = np.concatenate([weighted_auc(labels, scores, c) for c in resample_counts(np.size(labels), draws, seed)])
    a = a[~np.isnan(a)]
    if len(a) < max(1, draws // 2):
        return None
    lo, hi = np.quantile(a, TAILS)
    return float(lo), float(hi)


def fmt_interval(ci) -> str:
    """``[95% CI 0.7520, 0.8240]`` (an empty string for None)."""
    return "" if ci is None else f"[{int(LEVEL * 100)}% CI {ci[0]:.4f}, {ci[1]:.4f}]"


def fmt_figure(value: float | None, ci=None) -> str:
    """``0.7880 [95% CI 0.7520, 0.8240]`` (``n/a`` for None)."""
    return "n/a" if value is None else f"{value:.4f} {fmt_interval(ci)}".rstrip()
