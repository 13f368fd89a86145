"""The figures of both stages.

Recall (SPEC section 4), as the authors' evaluator: queries are POI ids (four published
names belong to two ids); each query's candidates are sorted by score, descending, with a
STABLE sort (ties keep file / gallery order: every unreadable image shares one vector);
a hit at K when one of the top K images is the query's own (file name before the first
``_``); recall@K = hits / queries; MRR = mean 1 / rank of the first hit, 0 without one
among the listed candidates (MRR@10 over a top-10 file).

Ranking (SPEC section 5), per pair ``s_a``, ``s_b``, ``label`` (1: image a had the higher
CTR): ``accuracy`` of ``s_a > s_b`` (ties predict 0; the published 0.652), ``auc`` of
``sigmoid(s_a - s_b)`` taken on the margin (same order, no saturation), ``log_loss`` from
the margin with ``logaddexp`` (exact where probabilities saturate), ``baseline`` the best
constant guess, ``ties`` the pairs with ``s_a == s_b``.
"""

from __future__ import annotations

from utils.cli import check_finite

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from utils.formats import poi_of_image

DEFAULT_KS = (1, 5, 10)


def check_ks(ks: Iterable[int]) -> list[int]:
    """The K values, sorted and distinct; each must be >= 1."""
    out = sorted({int(k) for k in ks})
    if not out or out[0] < 1:
        raise ValueError(f"K must be >= 1, got {out}")
    return out


@dataclass
class PoiResult:
    poi_id: str
    poi_name: str
    first_hit: int | None  # 1-based, among the candidates listed for this POI
    n_candidates: int
    top: list[tuple[str, float]] = field(default_factory=list)  # the first ``keep`` after sorting

    def hit_at(self, k: int) -> bool:
        return self.first_hit is not None and self.first_hit <= k


@dataclass
class RecallResult:
    ks: list[int]
    recall: dict[int, float]
    hits: dict[int, int]
    mrr: float
    pois: list[PoiResult]

    @property
    def n_pois(self) -> int:
        return len(self.pois)


def recall_from_first_hits(first_hits: Sequence[int | None], ks: Iterable[int]) -> dict[int, float]:
    """recall@K for each K: the share of queries whose first hit is at rank <= K."""
    if not first_hits:
        raise ValueError("no queries: recall is undefined")
    return {int(k): sum(1 for r in first_hits if r is not None and r <= k) / len(first_hits) for k in ks}


def mean_reciprocal_rank(first_hits: Sequence[int | None]) -> float:
    if not first_hits:
        raise ValueError("no queries: MRR is undefined")
    return sum(1.0 / r for r in first_hits if r is not None) / len(first_hits)


def _result(ks: list[int], pois: list[PoiResult]) -> RecallResult:
    firsts = [p.first_hit for p in pois]
    hits = {k: sum(p.hit_at(k) for p in pois) for k in ks}
    return RecallResult(ks, recall_from_first_hits(firsts, ks), hits, mean_reciprocal_rank(firsts), pois)


def evaluate_groups(groups: dict, ks: Iterable[int] = DEFAULT_KS, names: dict | None = None, keep: int | None = None):
    """:class:`RecallResult` of ``{poi_id: [(image, score), ...]}`` (lists in file order),
    keeping the ``keep`` (default max K) best candidates per POI for reports. A K above a
    POI's list takes it all, as the authors' slicing did: callers that know the list was
    cut must check K first."""
    ks = check_ks(ks)
    keep = max(ks) if keep is None else keep
    pois = []
    for poi_id, cands in groups.items():
        ranked = sorted(cands, key=lambda c: c[1], reverse=True)  # stable, also reversed
        first = next((r for r, (img, _) in enumerate(ranked, 1) if poi_of_image(img) == poi_id), None)
        pois.append(PoiResult(poi_id, (names or {}).get(poi_id, ""), first, len(cands), ranked[:keep]))
    return _result(ks, pois)


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the top ``k`` per row, descending, ties in column order
    (``torch.topk`` gives no such guarantee; a stable full sort does)."""
    vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return vals[..., :k], idx[..., :k]


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def first_hit_ranks(score_matrix, query_pois: Sequence[str], gallery_pois: Sequence[str], chunk: int = 1024):
    """1-based rank of each query's first own image in its stably sorted row, or None.
    ``score_matrix``: Q x N (torch or numpy); ``gallery_pois``: the N owners
    (``poi_of_image`` of the file names)."""
    s = _as_tensor(score_matrix)
    if s.dim() != 2 or s.shape[0] != len(query_pois) or s.shape[1] != len(gallery_pois):
        raise ValueError(
            f"score matrix of shape {tuple(s.shape)} does not match "
            f"{len(query_pois)} queries x {len(gallery_pois)} gallery images"
        )
    ids = {p: i for i, p in enumerate(dict.fromkeys([*gallery_pois, *query_pois]))}
    owner = torch.tensor([ids[p] for p in gallery_pois], dtype=torch.long, device=s.device)
    query = torch.tensor([ids[p] for p in query_pois], dtype=torch.long, device=s.device)
    out: list[int | None] = []
    for a in range(0, s.shape[0], chunk):
        _, order = stable_topk(s[a : a + chunk], s.shape[1])
        match = owner[order] == query[a : a + chunk, None]
        first = match.to(torch.int8).argmax(dim=1) + 1  # argmax returns the first maximum
        out += [int(f) if h else None for f, h in zip(first.tolist(), match.any(dim=1).tolist())]
    return out


def recall_at_k(score_matrix, query_pois, gallery_pois, ks: Iterable[int] = DEFAULT_KS) -> dict[int, float]:
    """``{K: recall@K}`` of a Q x N score matrix (see :func:`first_hit_ranks`)."""
    return recall_from_first_hits(first_hit_ranks(score_matrix, query_pois, gallery_pois), ks)


def recall_and_mrr(score_matrix, query_pois, gallery_pois, ks=DEFAULT_KS) -> dict:
    """``{"recall@K": ..., "mrr": ...}`` in one pass, for training logs."""
    firsts = first_hit_ranks(score_matrix, query_pois, gallery_pois)
    return {
        **{f"recall@{k}": v for k, v in recall_from_first_hits(firsts, ks).items()},
        "mrr": mean_reciprocal_rank(firsts),
    }


def evaluate_matrix(score_matrix, poi_ids, image_names, ks=DEFAULT_KS, names: dict | None = None, keep=None):
    """:func:`evaluate_groups` for a Q x N score matrix (row j = POI ``poi_ids[j]``,
    column i = gallery image ``image_names[i]``): the figures of the full-format file of
    those scores."""
    ks = check_ks(ks)
    s = _as_tensor(score_matrix)
    firsts = first_hit_ranks(s, poi_ids, [poi_of_image(n) for n in image_names])
    vals, idx = stable_topk(s, min(max(ks) if keep is None else keep, s.shape[1]))
    pois = [
        PoiResult(p, (names or {}).get(p, ""), f, s.shape[1], [(image_names[i], v) for v, i in zip(vr, ir)])
        for p, f, vr, ir in zip(poi_ids, firsts, vals.tolist(), idx.tolist())
    ]
    return _result(ks, pois)


def weighted_auc(labels, scores, weights) -> np.ndarray:
    """THE ROC-AUC: the Mann-Whitney statistic, ties counted half (what
    ``sklearn.metrics.roc_auc_score`` gives; importing scikit-learn costs 0.9 s), for each
    row of item multiplicities ``weights`` (b x n, a bootstrap block); NaN where a row
    holds a single class. One sort, then sums per tie group."""
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


def roc_auc(labels, scores) -> float | None:
    """ROC-AUC of ``scores`` against ``labels`` (:func:`weighted_auc` with every item
    once); None for a single class."""
    y = np.asarray(labels).astype(bool).reshape(-1)
    if y.all() or not y.any():
        return None
    return float(weighted_auc(y, scores, np.ones(len(y)))[0])


def pairwise_metrics(labels, s_a, s_b) -> dict:
    y, a, b = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (labels, s_a, s_b))
    if not (len(y) == len(a) == len(b)):
        raise ValueError(f"labels, s_a and s_b differ in length: {len(y)}, {len(a)}, {len(b)}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if len(y) == 0:
        return {
            "n": 0,
            "accuracy": None,
            "auc": None,
            "log_loss": None,
            "baseline": None,
            "ties": 0,
            "mean_label": None,
        }
    d = a - b
    check_finite(float(np.abs(d).max()), "pair scores s_a - s_b")
    # -log sigmoid(d) = logaddexp(0, -d); -log(1 - sigmoid(d)) = logaddexp(0, d)
    nll = np.where(y == 1.0, np.logaddexp(0.0, -d), np.logaddexp(0.0, d))
    mean_label = float(y.mean())
    return {
        "n": len(y),
        "accuracy": float(((d > 0).astype(np.float64) == y).mean()),
        "auc": roc_auc(y, d),
        "log_loss": float(nll.mean()),
        "baseline": max(mean_label, 1.0 - mean_label),
        "ties": int((d == 0).sum()),
        "mean_label": mean_label,
    }
