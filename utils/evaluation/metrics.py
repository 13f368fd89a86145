"""The figures of both stages. Recall (SPEC section 4): a STABLE sort by score (ties keep file order),
a hit at K when one of the top K is the POI's own image. Ranking (SPEC section 5): accuracy of
``s_a > s_b`` (ties predict 0), AUC and log loss of ``sigmoid(s_a - s_b)``."""

from __future__ import annotations

from utils.cli import check_finite

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from utils.formats import poi_of_image

DEFAULT_KS = (1, 5, 10)
PAIR_KEYS = ("n", "accuracy", "auc", "log_loss", "baseline", "ties", "mean_label")


def check_ks(ks: Iterable[int]) -> list[int]:
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
    top: list[tuple[str, float]]  # the best candidates kept for reports

    def hit_at(self, k: int) -> bool:
        return self.first_hit is not None and self.first_hit <= k


class RecallResult:
    """recall@K, hits@K and MRR of the POIs' first hits."""

    def __init__(self, ks: list[int], pois: list[PoiResult]):
        self.ks, self.pois = ks, pois
        self.recall = recall_from_first_hits([p.first_hit for p in pois], ks)
        self.hits = {k: sum(p.hit_at(k) for p in pois) for k in ks}
        self.mrr = sum(1.0 / p.first_hit for p in pois if p.first_hit) / len(pois)

    def table(self) -> dict[str, list[float]]:
        """``{poi_id: [hit@K for each K..., reciprocal rank]}``: what the intervals resample."""
        return {
            p.poi_id: [float(p.hit_at(k)) for k in self.ks] + [1.0 / p.first_hit if p.first_hit else 0.0]
            for p in self.pois
        }


def recall_from_first_hits(first_hits: Sequence[int | None], ks: Iterable[int]) -> dict[int, float]:
    if not first_hits:
        raise ValueError("no queries: recall is undefined")
    return {int(k): sum(1 for r in first_hits if r is not None and r <= k) / len(first_hits) for k in ks}


def evaluate_groups(groups: dict, ks: Iterable[int] = DEFAULT_KS, names: dict | None = None, keep: int | None = None):
    """Of ``{poi_id: [(image, score), ...]}`` and checked ``ks``, the ``keep`` (default max K) best per POI kept."""
    keep = max(ks) if keep is None else keep
    pois = []
    for poi_id, cands in groups.items():
        ranked = sorted(cands, key=lambda c: c[1], reverse=True)  # stable, also reversed
        first = next((r for r, (img, _) in enumerate(ranked, 1) if poi_of_image(img) == poi_id), None)
        pois.append(PoiResult(poi_id, (names or {}).get(poi_id, ""), first, len(cands), ranked[:keep]))
    return RecallResult(ks, pois)


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` per row, ties in column order (which ``torch.topk`` does not promise)."""
    vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return vals[..., :k], idx[..., :k]


def first_hit_ranks(score_matrix, query_pois: Sequence[str], gallery_pois: Sequence[str], chunk: int = 1024):
    """1-based rank of each query's first own image in its sorted row of Q x N scores, or None."""
    s = score_matrix if isinstance(score_matrix, torch.Tensor) else torch.as_tensor(np.asarray(score_matrix))
    if s.dim() != 2 or s.shape[0] != len(query_pois) or s.shape[1] != len(gallery_pois):
        raise ValueError(f"scores {tuple(s.shape)} do not match {len(query_pois)} x {len(gallery_pois)} POIs")
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
    return recall_from_first_hits(first_hit_ranks(score_matrix, query_pois, gallery_pois), ks)


def weighted_auc(labels, scores, weights) -> np.ndarray:
    """ROC-AUC (ties half, as scikit-learn's) per row of item multiplicities; NaN for one class or none."""
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if not y.size:
        return np.full(len(w), np.nan)
    order = np.argsort(s, kind="mergesort")
    s_sorted, y_sorted, w_sorted = s[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # tie groups
    pos = np.add.reduceat(w_sorted * y_sorted, starts, axis=1)  # b x G
    neg = np.add.reduceat(w_sorted * ~y_sorted, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives strictly lower
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)  # never divides by 0


def roc_auc(labels, scores) -> float | None:
    """None for a single class (or none)."""
    auc = float(weighted_auc(labels, scores, np.ones(np.size(labels)))[0])
    return None if np.isnan(auc) else auc


def pairwise_metrics(labels, s_a, s_b) -> dict:
    """``baseline``: the best constant guess; ``ties``: the pairs with s_a == s_b."""
    y, a, b = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (labels, s_a, s_b))
    if not (len(y) == len(a) == len(b)):
        raise ValueError(f"labels, s_a and s_b differ in length: {len(y)}, {len(a)}, {len(b)}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if len(y) == 0:
        return dict.fromkeys(PAIR_KEYS) | {"n": 0, "ties": 0}
    d = a - b
    check_finite(float(np.abs(d).max()), "pair scores s_a - s_b")
    # -log sigmoid(d) = logaddexp(0, -d), exact where the probability saturates
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
