"""recall_eval.py's pipeline (:func:`evaluate_recall`): recall@K and MRR of a results
file (top-k or full format) or of saved vectors, with bootstrap intervals over POIs (in
poi_id order, so they do not depend on the file's order), the per-POI JSON and the HTML
report; or two results files side by side (:func:`compare_recall`, paired bootstrap)."""

from __future__ import annotations

from utils.cli import DataError

import json
import logging
from pathlib import Path

import numpy as np

from utils.formats import load_embeddings, read_results
from utils.io import commit_outputs, write_json

from .bootstrap import DEFAULT_DRAWS, DEFAULT_SEED, LEVEL, check_draws, fmt_interval, mean_intervals
from .metrics import DEFAULT_KS, RecallResult, check_ks, evaluate_groups, evaluate_matrix
from .report import recall_report

log = logging.getLogger(__name__)


def default_json_path(results=None, embeddings=None, compare=None) -> str:
    return f"{compare[1]}.compare.json" if compare else f"{results or embeddings}.eval.json"


def read_meta(results: str) -> dict:
    """``<results>.meta.json`` of recall_infer.py ({} when absent or unreadable)."""
    p = Path(f"{results}.meta.json")
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("%s: ignored (%s)", p, e)
        return {}


def load_results(path: str, ks: list[int]):
    """``(results, meta)``; a K above what a top-k file lists is an error unless the file
    holds the whole gallery (meta: gallery_size <= topk)."""
    res, meta = read_results(path), read_meta(path)
    listed = max(len(v) for v in res.groups.values())
    complete = bool(meta) and meta.get("gallery_size", 10**12) <= meta.get("topk", 0)
    too_big = [k for k in ks if k > listed]
    if res.fmt == "topk" and too_big and not complete:
        raise DataError(
            f"{path}: lists the top {listed} images per POI, so recall@{too_big} cannot be computed; rerun "
            f"recall_infer.py with --topk {max(too_big)} (or use its --full-output file)"
        )
    return res, meta


def evaluate_embeddings(path: str, ks: list[int], keep: int) -> tuple[RecallResult, dict]:
    """The figures of ``recall_infer.py --save-embeddings`` vectors: cosines of every POI
    name with every image, ranked as recall_infer ranks them (those of its full file)."""
    import torch

    d = load_embeddings(path)
    with torch.inference_mode():
        scores = torch.from_numpy(d["text_emb"]) @ torch.from_numpy(d["image_emb"]).t()
    too_big = [k for k in ks if k > scores.shape[1]]
    if too_big:
        log.warning("%s: the gallery holds %d images; recall@%s counts them all", path, scores.shape[1], too_big)
    names = dict(zip(d["poi_ids"], d["poi_names"]))
    if len(names) != len(d["poi_ids"]):
        raise DataError(f"{path}: a poi_id appears twice among the text vectors")
    return evaluate_matrix(scores, d["poi_ids"], d["image_names"], ks, names, keep=keep), d["meta"]


def per_poi_table(result: RecallResult, ks: list[int]) -> dict[str, list[float]]:
    """``{poi_id: [hit@K for each K..., reciprocal rank]}``."""
    return {
        p.poi_id: [float(p.hit_at(k)) for k in ks] + [1.0 / p.first_hit if p.first_hit else 0.0] for p in result.pois
    }


def result_json(result: RecallResult, fmt: str, path: str, draws: int, seed: int) -> dict:
    doc = {
        "results": path,
        "format": fmt,
        "n_pois": result.n_pois,
        "ks": result.ks,
        "recall": {str(k): v for k, v in result.recall.items()},
        "hits": {str(k): v for k, v in result.hits.items()},
        "mrr": result.mrr,
        "mrr_over": "all listed images" if fmt == "full" else "the listed top images per POI",
        "pois": [
            {"poi_id": p.poi_id, "poi_name": p.poi_name, "first_hit_rank": p.first_hit, "listed": p.n_candidates}
            | {f"hit@{k}": p.hit_at(k) for k in result.ks}
            | {"top": [[img, s] for img, s in p.top]}
            for p in result.pois
        ],
    }
    if draws:
        table = per_poi_table(result, result.ks)
        ci = mean_intervals(np.array([table[p] for p in sorted(table)]), draws, seed)
        doc["recall_ci"] = {str(k): list(v) for k, v in zip(result.ks, ci)}
        doc["mrr_ci"] = list(ci[-1])
        doc["bootstrap"] = {"draws": draws, "seed": seed, "level": LEVEL, "resampling": "POIs"}
    return doc


def resolver(image_dir: str | None, results: str):
    """``resolve(image) -> file or None``: the listed path, else beside the results file,
    else by file name in ``image_dir``."""

    def resolve(image: str) -> str | None:
        cands = [
            Path(image),
            Path(results).parent / image,
            *([Path(image_dir) / Path(image).name] if image_dir else []),
        ]
        return next((str(c) for c in cands if c.is_file()), None)

    return resolve


def evaluate_recall(
    results=None,
    embeddings=None,
    ks=DEFAULT_KS,
    json_path=None,
    html=None,
    html_k=None,
    image_dir=None,
    page_size=50,
    draws=DEFAULT_DRAWS,
    seed=DEFAULT_SEED,
    progress=True,
) -> dict:
    """recall_eval.py on ``results`` (a results file) or ``embeddings`` (saved vectors):
    writes the JSON (default ``<input>.eval.json``) and, with ``html``, the report showing
    ``html_k`` (default max K) images per POI, together; returns the JSON document."""
    ks, draws, source = check_ks(ks), check_draws(draws), results or embeddings
    html_k = html_k or max(ks)
    keep = max(ks + [html_k])
    if embeddings:
        result, meta = evaluate_embeddings(embeddings, ks, keep)
        fmt = "full"
    else:
        res, meta = load_results(results, ks + ([html_k] if html else []))
        result, fmt = evaluate_groups(res.groups, ks, res.names, keep=keep), res.fmt
    sizes = "/".join(str(s) for s in sorted({p.n_candidates for p in result.pois})[:5])
    log.info("%s: %s format, %d POIs, %s images listed per POI", source, fmt, result.n_pois, sizes)
    doc = result_json(result, fmt, source, draws, seed)
    page = None
    if html:
        summary = {"results": Path(source).name, "POIs": result.n_pois}
        summary |= {f"recall@{k}": figure(doc["recall"][str(k)], doc.get("recall_ci", {}).get(str(k))) for k in ks}
        summary["MRR"] = f"{result.mrr:.4f}"
        image_dir = image_dir or meta.get("image_dir")
        resolve = resolver(image_dir, source)
        page, info = recall_report(
            result, html_k, resolve, f"Recall top {html_k}", summary, page_size, progress=progress
        )
        if info["missing"]:
            hint = "" if image_dir else " (pass --image-dir)"
            log.warning("%d listed images had no readable file for a thumbnail%s", info["missing"], hint)
    writers = {json_path or default_json_path(results, embeddings): lambda tmp: write_json(tmp, doc, indent=1)}
    if html:
        writers[html] = page
    commit_outputs(writers)
    return doc


def compare_recall(a_path, b_path, ks=DEFAULT_KS, json_path=None, draws=DEFAULT_DRAWS, seed=DEFAULT_SEED) -> dict:
    """recall_eval.py --compare: model A's and B's figures on the POIs both files hold,
    with intervals from the same resampled POIs for A, B and B - A, and for each K the
    POIs one model hits and the other misses. Writes the JSON (default
    ``<B>.compare.json``) and returns it."""
    ks, draws = check_ks(ks), check_draws(draws)
    (ra, _), (rb, _) = load_results(a_path, ks), load_results(b_path, ks)
    ta, tb = (per_poi_table(evaluate_groups(r.groups, ks, r.names), ks) for r in (ra, rb))
    common = sorted(set(ta) & set(tb))
    only_a, only_b = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
    if not common:
        raise DataError(f"{a_path} and {b_path} have no POI in common")
    if only_a or only_b:
        what = (len(common), len(only_a), a_path, len(only_b), b_path)
        log.warning("comparing the %d POIs both files hold; %d only in %s, %d only in %s", *what)
    a, b = np.array([ta[p] for p in common]), np.array([tb[p] for p in common])
    names = ra.names | rb.names
    doc = {"A": a_path, "B": b_path, "n_pois": len(common), "pois_only_in_A": only_a, "pois_only_in_B": only_b}
    doc["ks"] = ks
    doc["bootstrap"] = {"draws": draws, "seed": seed, "level": LEVEL, "resampling": "POIs, paired"}
    doc |= side_by_side(a, b, ks, draws, seed)
    doc["hit_by_one_only"] = {str(k): hit_by_one_only(common, a[:, j], b[:, j], names) for j, k in enumerate(ks)}
    write_json(json_path or default_json_path(compare=(a_path, b_path)), doc, indent=1)
    return doc


def side_by_side(a: np.ndarray, b: np.ndarray, ks: list[int], draws: int, seed: int) -> dict:
    """``{"recall": {K: row}, "mrr": row}``, each row ``{"A"|"B"|"B-A": {"value", "ci"}}``
    from the per-POI tables ``a`` and ``b`` (POIs x (hit@K..., reciprocal rank))."""
    figures = {"A": a.mean(0), "B": b.mean(0), "B-A": (b - a).mean(0)}
    ci = mean_intervals(np.hstack([a, b, b - a]), draws, seed) if draws else None
    m = a.shape[1]
    rows = [
        {
            key: {"value": float(v[j]), "ci": list(ci[i * m + j]) if ci else None}
            for i, (key, v) in enumerate(figures.items())
        }
        for j in range(m)
    ]
    return {"recall": dict(zip(map(str, ks), rows)), "mrr": rows[-1]}


def hit_by_one_only(pois: list[str], a_hits, b_hits, names: dict) -> dict:
    def only(x, y):
        return [{"poi_id": p, "poi_name": names.get(p, "")} for p, hx, hy in zip(pois, x, y) if hx and not hy]

    return {"A_hits_B_misses": only(a_hits, b_hits), "B_hits_A_misses": only(b_hits, a_hits)}


def figure(value: float, ci=None) -> str:
    return f"{value:.4f} {fmt_interval(ci)}".rstrip()


def format_recall(doc: dict) -> str:
    """The printed summary of :func:`evaluate_recall`'s document."""
    n = doc["n_pois"]
    within = "" if doc["format"] == "full" else f", within top {max(p['listed'] for p in doc['pois'])}"
    lines = [f"results: {doc['results']} ({doc['format']} format)", f"POIs: {n}"]
    for k in doc["ks"]:
        lines.append(f"recall@{k}: {doc['recall'][str(k)]:.4f} ({doc['hits'][str(k)]}/{n}) ")
        lines[-1] += fmt_interval(doc.get("recall_ci", {}).get(str(k)))
    lines.append(f"MRR (first hit{within}): {figure(doc['mrr'], doc.get('mrr_ci'))}")
    if "bootstrap" in doc:
        b = doc["bootstrap"]
        lines.append(f"(intervals: percentile bootstrap over POIs, {b['draws']} draws, seed {b['seed']})")
    return "\n".join(line.rstrip() for line in lines)


def format_compare(doc: dict) -> str:
    """The printed summary of :func:`compare_recall`'s document."""
    labels = [(f"recall@{k}", doc["recall"][str(k)]) for k in doc["ks"]] + [("MRR", doc["mrr"])]
    w = max(len(label) for label, _ in labels)
    lines = [f"A: {doc['A']}", f"B: {doc['B']}", f"POIs compared: {doc['n_pois']}"]
    for label, row in labels:
        a, b, d = (row[key] for key in ("A", "B", "B-A"))
        lines.append(
            f"{label:<{w}}  A {figure(a['value'], a['ci'])}   B {figure(b['value'], b['ci'])}   "
            f"B - A {d['value']:+.4f} {fmt_interval(d['ci'])}".rstrip()
        )
    for k in doc["ks"]:
        who = doc["hit_by_one_only"][str(k)]
        a, b = who["A_hits_B_misses"], who["B_hits_A_misses"]
        lines.append(f"@{k}: A hits / B misses {len(a)}{_some(a)}; B hits / A misses {len(b)}{_some(b)}")
    return "\n".join(lines)


def _some(pois: list[dict]) -> str:
    """`` (id name, ... (+n))``: the first five POIs of a list ('' for none)."""
    if not pois:
        return ""
    more = f" ... (+{len(pois) - 5})" if len(pois) > 5 else ""
    return " (" + ", ".join(f"{p['poi_id']} {p['poi_name']}".strip() for p in pois[:5]) + more + ")"
