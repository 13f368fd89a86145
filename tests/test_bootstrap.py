"""Bootstrap intervals (utils/bootstrap.py) on tables with a known answer, their coverage
by simulation, the vectorised AUC against explicit resampling, and the intervals printed
by recall_eval.py (single file and --compare) and rank_eval.py's summary."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy.stats import binom

import recall_eval
from utils.evaluation.bootstrap import auc_interval, mean_intervals, resample_counts, weighted_auc
from utils.evaluation.metrics import roc_auc


def test_resampling_is_seeded_and_with_replacement():
    a = np.concatenate(list(resample_counts(50, 2500, seed=7, block=1000)))
    b = np.concatenate(list(resample_counts(50, 2500, seed=7, block=1000)))
    assert a.shape == (2500, 50) and np.array_equal(a, b)
    assert (a.sum(axis=1) == 50).all()
    assert not np.array_equal(a, np.concatenate(list(resample_counts(50, 2500, seed=8))))
    # each item is drawn n * 1/n = 1 time on average
    assert a.mean() == pytest.approx(1.0, abs=0.01)


def test_known_answers():
    assert mean_intervals(np.ones(500))[0] == (1.0, 1.0)
    assert mean_intervals(np.zeros(80))[0] == (0.0, 0.0)
    # every POI differs by the same amount (e.g. reciprocal ranks): the difference
    # interval is that amount, however wide the intervals of the two figures are
    a = np.random.default_rng(1).random(100) * 0.5
    ci = mean_intervals(np.c_[a, a + 0.25, (a + 0.25) - a], draws=2000)
    assert ci[0][1] - ci[0][0] > 0.05
    assert ci[2][0] == pytest.approx(0.25) and ci[2][1] == pytest.approx(0.25)
    assert ci[1][0] == pytest.approx(ci[0][0] + 0.25) and ci[1][1] == pytest.approx(ci[0][1] + 0.25)
    # B hits exactly A's POIs plus k more: the per-POI difference is 1 on k POIs and 0
    # elsewhere, so a resampled difference is Binomial(n, k/n) / n exactly; its
    # percentile interval matches the binomial quantiles up to Monte Carlo noise
    n, k = 400, 24
    rng = np.random.default_rng(0)
    a = (rng.random(n) < 0.6).astype(float)
    b = a.copy()
    b[rng.choice(np.flatnonzero(a == 0), k, replace=False)] = 1
    lo, hi = mean_intervals(np.c_[a, b, b - a], draws=10_000, seed=3)[2]
    want_lo, want_hi = binom.ppf(0.025, n, k / n) / n, binom.ppf(0.975, n, k / n) / n
    assert abs(lo - want_lo) <= 1 / n + 1e-12 and abs(hi - want_hi) <= 1 / n + 1e-12
    assert lo > 0  # B never loses a POI: the whole interval is above zero
    # the means of the draws (what mean_intervals takes the quantiles of) are centred on the sample mean
    draws = np.concatenate([c @ np.c_[a, b - a] / n for c in resample_counts(n, 4000, seed=1)])
    assert draws.mean(axis=0) == pytest.approx([a.mean(), k / n], abs=0.005)


def test_coverage_by_simulation():
    """200 samples of 300 Bernoulli(p) draws, 1000 bootstrap draws each: the 95% interval
    holds the true p in about 95% of the samples."""
    rng = np.random.default_rng(12345)
    for p in (0.788, 0.3):
        covered = 0
        for rep in range(200):
            x = (rng.random(300) < p).astype(float)
            lo, hi = mean_intervals(x, draws=1000, seed=rep)[0]
            covered += lo <= p <= hi
        assert 0.90 <= covered / 200 <= 0.99, (p, covered)


def test_weighted_auc_equals_auc_of_the_explicit_resample():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + 0.7 * y, 1)  # coarse: many ties
    assert weighted_auc(y, s, np.ones(300))[0] == pytest.approx(roc_auc(y, s), abs=1e-12)
    counts = next(resample_counts(300, 20, seed=4))
    got = weighted_auc(y, s, counts)
    for row, g in zip(counts, got):
        idx = np.repeat(np.arange(300), row)
        assert g == pytest.approx(roc_auc(y[idx], s[idx]), abs=1e-12)
    # a draw with one class has no AUC
    assert np.isnan(weighted_auc([1, 0], [0.3, 0.1], np.array([[2, 0]]))[0])
    # perfect separation: [1, 1]; constant scores: [0.5, 0.5]
    yy = np.r_[np.ones(50), np.zeros(50)]
    assert auc_interval(yy, yy + 0.1, draws=500) == (1.0, 1.0)
    assert auc_interval(yy, np.zeros(100), draws=500) == (0.5, 0.5)
    assert auc_interval([1, 1, 1], [0.1, 0.2, 0.3], draws=100) is None
    a = np.concatenate([weighted_auc(y, s, c) for c in resample_counts(300, 3000, seed=0)])  # auc_interval's draws
    assert np.nanmean(a) == pytest.approx(roc_auc(y, s), abs=0.01)


# ---------------------------------------------------------------------------
# the evaluators
# ---------------------------------------------------------------------------
def _write_full(path, hits_at1: dict[str, bool]):
    """A full-format results file with 3 images per POI where each POI's own image is
    ranked first exactly when ``hits_at1[poi]``, else third."""
    pois = list(hits_at1)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        for i, p in enumerate(pois):
            other = pois[(i + 1) % len(pois)]
            own = 0.9 if hits_at1[p] else 0.1
            w.writerows(
                [
                    [p, f"名{p}", f"{p}_1.jpg", own],
                    [p, f"名{p}", f"{other}_1.jpg", 0.5],
                    [p, f"名{p}", f"{other}_2.jpg", 0.4],
                ]
            )


def test_recall_eval_intervals_and_compare(tmp_path, capsys):
    pois = [str(1000 + i) for i in range(60)]
    a_hits = {p: i % 3 == 0 for i, p in enumerate(pois)}  # 20 hits
    extra = [p for i, p in enumerate(pois) if i % 3 == 1][:9]  # B: A's hits + 9
    b_hits = {p: a_hits[p] or p in extra for p in pois}
    _write_full(tmp_path / "A.csv", a_hits)
    _write_full(tmp_path / "B.csv", b_hits)
    _write_full(tmp_path / "all.csv", {p: True for p in pois})

    assert recall_eval.main(["--results", str(tmp_path / "all.csv"), "--k", "1", "3"]) == 0
    out = capsys.readouterr().out
    assert "recall@1: 1.0000 (60/60) [95% CI 1.0000, 1.0000]" in out
    assert "MRR (first hit): 1.0000 [95% CI 1.0000, 1.0000]" in out
    js = json.loads((tmp_path / "all.csv.eval.json").read_text(encoding="utf-8"))
    assert js["recall_ci"]["1"] == [1.0, 1.0] and js["bootstrap"]["draws"] == 10_000

    # the interval printed for A equals mean_intervals' on its hits in poi_id order
    assert (
        recall_eval.main(["--results", str(tmp_path / "A.csv"), "--k", "1", "--seed", "5", "--bootstrap", "2000"]) == 0
    )
    out = capsys.readouterr().out
    hits = np.array([a_hits[p] for p in sorted(pois)], dtype=float)
    lo, hi = mean_intervals(np.c_[hits, np.where(hits == 1, 1.0, 1 / 3)], 2000, 5)[0]
    assert f"recall@1: 0.3333 (20/60) [95% CI {lo:.4f}, {hi:.4f}]" in out
    assert recall_eval.main(["--results", str(tmp_path / "A.csv"), "--k", "1", "--bootstrap", "0"]) == 0
    assert "CI" not in capsys.readouterr().out

    assert (
        recall_eval.main(
            [
                "--compare",
                str(tmp_path / "A.csv"),
                str(tmp_path / "B.csv"),
                "--k",
                "1",
                "3",
                "--json",
                str(tmp_path / "cmp.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    cmp = json.loads((tmp_path / "cmp.json").read_text(encoding="utf-8"))
    r1 = cmp["recall"]["1"]
    assert r1["A"]["value"] == pytest.approx(20 / 60) and r1["B"]["value"] == pytest.approx(29 / 60)
    assert r1["B-A"]["value"] == pytest.approx(9 / 60)
    lo, hi = r1["B-A"]["ci"]
    n = 60
    assert abs(lo - binom.ppf(0.025, n, 9 / n) / n) <= 1 / n + 1e-12
    assert abs(hi - binom.ppf(0.975, n, 9 / n) / n) <= 1 / n + 1e-12
    assert cmp["recall"]["3"]["B-A"]["ci"] == [0.0, 0.0]  # everyone hits within 3
    who = cmp["hit_by_one_only"]["1"]
    assert [x["poi_id"] for x in who["B_hits_A_misses"]] == sorted(extra)
    assert who["A_hits_B_misses"] == []
    assert who["B_hits_A_misses"][0]["poi_name"] == f"名{sorted(extra)[0]}"
    assert "@1: A hits / B misses 0; B hits / A misses 9" in out
    assert "B - A +0.1500 [95% CI" in out

    # different POI sets: only the common ones are compared
    _write_full(tmp_path / "C.csv", {p: True for p in pois[:30]})
    assert (
        recall_eval.main(
            ["--compare", str(tmp_path / "A.csv"), str(tmp_path / "C.csv"), "--k", "1", "--bootstrap", "100"]
        )
        == 0
    )
    assert "POIs compared: 30" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        recall_eval.main(["--results", str(tmp_path / "A.csv"), "--compare", "x", "y"])


def test_rank_eval_summary_has_intervals():
    from utils.evaluation import format_pair_summary, pair_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    d = rng.normal(size=1000) + 0.4 * (2 * y - 1)
    m = pair_metrics([int(v) for v in y], d, np.zeros(1000), 10_000, 0)
    m |= {
        "pairs_scored": 1000,
        "pairs_in_csv": 1000,
        "pairs_with_missing_image": 0,
        "pairs_skipped": 0,
        "images_missing": 0,
        "images_unreadable": 0,
        "pairs_without_pois": 0,
        "pairs_with_unknown_poi": 0,
    }
    assert m["accuracy_ci"][0] < m["accuracy"] < m["accuracy_ci"][1]
    assert m["auc_ci"][0] < m["auc"] < m["auc_ci"][1]
    assert m["accuracy_ci"] == list(mean_intervals(((d > 0) == (y == 1)).astype(float), 10_000, 0)[0])
    text = format_pair_summary(m, "val.csv")
    assert f"{m['accuracy']:.4f} [95% CI {m['accuracy_ci'][0]:.4f}, {m['accuracy_ci'][1]:.4f}]" in text
    assert f"{m['auc']:.4f} [95% CI {m['auc_ci'][0]:.4f}, {m['auc_ci'][1]:.4f}]" in text


def test_memory_does_not_grow_with_draws(monkeypatch):
    """Blocks of draws hold at most BLOCK_CELLS multiplicities, however many items; more
    than MAX_DRAWS draws are refused before any is made."""
    from utils.cli import UserError

    from utils.evaluation import bootstrap

    monkeypatch.setattr(bootstrap, "BLOCK_CELLS", 10_000, raising=False)
    blocks = list(resample_counts(300, 2500, seed=1))
    assert max(b.size for b in blocks) <= 10_000 and sum(len(b) for b in blocks) == 2500
    assert all((b.sum(axis=1) == 300).all() for b in blocks)
    with pytest.raises(UserError, match="1,000,000"):
        mean_intervals(np.ones(3), draws=bootstrap.MAX_DRAWS + 1)
    with pytest.raises(UserError, match="1,000,000"):
        auc_interval([0, 1], [0.1, 0.2], draws=10**12)
