"""The figures of both stages.

Recall stage: recall@K and MRR of the recall stage (SPEC section 4), from ranked lists or from a
query x gallery score matrix.

Semantics, exactly as the authors' evaluator:

* queries are POI ids (not names: the published set has four names shared by two ids);
* each query's candidates are sorted by score, descending, with a STABLE sort, so equal
  scores keep gallery / file order (the authors used Python's ``sorted(..., reverse=True)``,
  which is stable; every unreadable image shares one vector, so ties are real);
* a query is a hit at K when any of its top K images belongs to it; the owner of an
  image is its file name before the first ``_`` (``utils.data.poi_of_image``);
* recall@K = hits / number of queries; MRR = mean of 1 / rank of the first hit, 0 for a
  query without a hit among the candidates it has (so over a top-10 file it is MRR@10).

Three entry points share these rules:

* :func:`evaluate_groups` takes ``{poi_id: [(image, score), ...]}`` in file order (what
  ``recall_eval.py`` reads) and returns a :class:`RecallResult` with per-POI details;
* :func:`evaluate_matrix` does the same for a Q x N score matrix and the gallery's file
  names (``recall_eval.py --embeddings``);
* :func:`recall_at_k` / :func:`first_hit_ranks` take a Q x N score matrix (torch or
  numpy), the query POI ids and the gallery POI ids, for training/validation loops.

:func:`stable_topk` is THE ordering of a score matrix (recall_infer.py's top-k file
and every figure above).

Ranking stage: Pairwise figures of the ranking stage (SPEC section 5).

For each pair, ``s_a`` and ``s_b`` are the scores of the two images and ``label`` is 1
when image a had the higher CTR:

- ``accuracy``: mean of ``(s_a > s_b) == label`` (ties predict 0) — the published
  0.652, which the paper calls "AUC";
- ``auc``: ROC-AUC of ``sigmoid(s_a - s_b)`` against the label (the honest AUC), as
  ``sklearn.metrics.roc_auc_score`` gives it, on ``s_a - s_b`` directly: sigmoid is monotone, so
  the AUC is the same, without float saturation turning large margins into ties.
  ``None`` when the labels hold a single class;
- ``log_loss``: mean binary cross-entropy of ``sigmoid(s_a - s_b)``, computed from the
  margin with ``logaddexp`` (``sklearn.metrics.log_loss`` takes probabilities, in which a
  confident mistake saturates to 1.0 and its loss is clipped; from the margin it is exact);
- ``baseline``: accuracy of the best constant guess, ``max(mean label, 1 - mean label)``;
- ``n``: number of pairs (``ties``: pairs with ``s_a == s_b``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from utils.formats import poi_of_image

DEFAULT_KS = (1, 5, 10)


# ---------------------------------------------------------------------------
# ranked lists
# ---------------------------------------------------------------------------
def rank_candidates(candidates: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """``(image, score)`` pairs sorted by score descending; ties keep input order
    (Python's sort is stable, also with ``reverse=True``)."""
    return sorted(candidates, key=lambda c: c[1], reverse=True)


def first_hit(ranked_images: Iterable[str], poi_id: str) -> int | None:
    """1-based rank of the first image owned by ``poi_id``, or None."""
    for r, image in enumerate(ranked_images, 1):
        if poi_of_image(image) == poi_id:
            return r
    return None


def recall_from_first_hits(first_hits: Sequence[int | None], ks: Iterable[int]) -> dict[int, float]:
    """recall@K for each K: the share of queries whose first hit is at rank <= K."""
    n = len(first_hits)
    if n == 0:
        raise ValueError("no queries: recall is undefined")
    return {int(k): sum(1 for r in first_hits if r is not None and r <= k) / n for k in ks}


def mean_reciprocal_rank(first_hits: Sequence[int | None]) -> float:
    if not first_hits:
        raise ValueError("no queries: MRR is undefined")
    return sum(1.0 / r for r in first_hits if r is not None) / len(first_hits)


@dataclass
class PoiResult:
    poi_id: str
    poi_name: str
    first_hit: int | None  # 1-based, among the candidates listed for this POI
    n_candidates: int
    top: list[tuple[str, float]] = field(default_factory=list)  # first max(K) after sorting

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


def evaluate_groups(
    groups: dict[str, list[tuple[str, float]]],
    ks: Iterable[int] = DEFAULT_KS,
    names: dict[str, str] | None = None,
    keep: int | None = None,
) -> RecallResult:
    """Evaluate ``{poi_id: [(image, score), ...]}``; each list in file order.

    ``keep`` is how many ranked candidates to keep per POI for reports (default max K).
    K larger than a POI's candidate list simply takes them all, as slicing did in the
    authors' evaluator; callers that know the list was truncated must check K first.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"K must be >= 1, got {ks}")
    keep = max(ks) if keep is None else keep
    names = names or {}
    pois = []
    for poi_id, cands in groups.items():
        ranked = rank_candidates(cands)
        pois.append(
            PoiResult(
                poi_id, names.get(poi_id, ""), first_hit((c[0] for c in ranked), poi_id), len(cands), ranked[:keep]
            )
        )
    firsts = [p.first_hit for p in pois]
    recall = recall_from_first_hits(firsts, ks)
    hits = {k: sum(p.hit_at(k) for p in pois) for k in ks}
    return RecallResult(ks, recall, hits, mean_reciprocal_rank(firsts), pois)


# ---------------------------------------------------------------------------
# score matrices
# ---------------------------------------------------------------------------
def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the top ``k`` per row, descending, ties in column order
    (``torch.topk`` gives no such guarantee; a stable full sort does)."""
    vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return vals[..., :k], idx[..., :k]


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def first_hit_ranks(
    score_matrix, query_pois: Sequence[str], gallery_pois: Sequence[str], chunk: int = 1024
) -> list[int | None]:
    """1-based rank of each query's first own image in its stably sorted row.

    ``score_matrix``: Q x N (torch or numpy; higher is better). ``query_pois``: Q POI ids;
    ``gallery_pois``: N owner ids (use ``poi_of_image`` on file names to get them).
    """
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
        has = match.any(dim=1)
        first = match.to(torch.int8).argmax(dim=1) + 1  # argmax returns the first maximum
        out += [int(f) if h else None for f, h in zip(first.tolist(), has.tolist())]
    return out


def recall_at_k(
    score_matrix, query_pois: Sequence[str], gallery_pois: Sequence[str], ks: Iterable[int] = DEFAULT_KS
) -> dict[int, float]:
    """``{K: recall@K}`` of a Q x N score matrix (see :func:`first_hit_ranks`)."""
    return recall_from_first_hits(first_hit_ranks(score_matrix, query_pois, gallery_pois), ks)


def evaluate_matrix(
    score_matrix,
    poi_ids: Sequence[str],
    image_names: Sequence[str],
    ks: Iterable[int] = DEFAULT_KS,
    names: dict[str, str] | None = None,
    keep: int | None = None,
) -> RecallResult:
    """:func:`evaluate_groups` for a Q x N score matrix (row j = POI ``poi_ids[j]``,
    column i = gallery image ``image_names[i]``): the same figures as the full-format
    file of those scores, every image a candidate of every POI."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"K must be >= 1, got {ks}")
    keep = max(ks) if keep is None else keep
    names = names or {}
    s = _as_tensor(score_matrix)
    firsts = first_hit_ranks(s, poi_ids, [poi_of_image(n) for n in image_names])
    vals, idx = stable_topk(s, min(keep, s.shape[1]))
    pois = [
        PoiResult(p, names.get(p, ""), f, s.shape[1], [(image_names[i], v) for v, i in zip(vr, ir)])
        for p, f, vr, ir in zip(poi_ids, firsts, vals.tolist(), idx.tolist())
    ]
    recall = recall_from_first_hits(firsts, ks)
    hits = {k: sum(p.hit_at(k) for p in pois) for k in ks}
    return RecallResult(ks, recall, hits, mean_reciprocal_rank(firsts), pois)


def recall_and_mrr(score_matrix, query_pois, gallery_pois, ks=DEFAULT_KS) -> dict:
    """``{"recall@K": ..., "mrr": ...}`` in one pass, for training logs."""
    firsts = first_hit_ranks(score_matrix, query_pois, gallery_pois)
    out = {f"recall@{k}": v for k, v in recall_from_first_hits(firsts, ks).items()}
    out["mrr"] = mean_reciprocal_rank(firsts)
    return out


def roc_auc(labels, scores) -> float | None:
    """ROC-AUC, ties counting half (what ``sklearn.metrics.roc_auc_score`` gives; the
    tests compare them), as the Mann-Whitney statistic: the mean rank of the positives
    among all scores, equal scores sharing their average rank. ``None`` for a single
    class. (Not scikit-learn itself: importing it costs 0.9 s, a tenth of a 100-pair
    rank_eval run.)"""
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.all() or not y.any():
        return None
    _, group, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[group.reshape(-1)]  # 1-based, ties averaged
    n_pos, n_neg = int(y.sum()), int((~y).sum())
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
