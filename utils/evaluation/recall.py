"""recall_eval.py's pipeline: recall@K and MRR of a results file or saved vectors with intervals
over POIs in poi_id order, the JSON and HTML report; or two results files side by side."""

from __future__ import annotations

from utils.cli import DataError

import json
import logging
from pathlib import Path

import numpy as np

from utils.formats import load_embeddings, poi_of_image, read_results
from utils.io import commit_outputs, write_json

from .bootstrap import DEFAULT_DRAWS, DEFAULT_SEED, LEVEL, check_draws, fmt_figure, fmt_interval, mean_intervals
from .metrics import DEFAULT_KS, PoiResult, RecallResult, check_ks, evaluate_groups, first_hit_ranks, stable_topk
from .report import recall_report

log = logging.getLogger(__name__)


def default_json_path(results=None, embeddings=None, compare=None) -> str:
    return f"{compare[1]}.compare.json" if compare else f"{results or embeddings}.eval.json"


def load_results(path: str, ks: list[int]):
    """``(results, meta)``; a K above what a top-k file lists is an error unless it lists the whole gallery."""
    res, meta_path, meta = read_results(path), Path(f"{path}.meta.json"), {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    except (OSError, ValueError) as e:
        log.warning("%s: ignored (%s)", meta_path, e)
    listed = max(len(v) for v in res.groups.values())
    complete = meta.get("gallery_size", 10**12) <= meta.get("topk", 0)
    if res.fmt == "topk" and (too_big := [k for k in ks if k > listed]) and not complete:
        rerun = f"rerun recall_infer.py with --topk {max(too_big)} (or use its --full-output file)"
        raise DataError(f"{path}: lists the top {listed} images per POI, so recall@{too_big} is undefined; {rerun}")
    return res, meta


def evaluate_embeddings(path: str, ks: list[int], keep: int) -> tuple[RecallResult, dict]:
    """Of saved vectors: each POI name's cosine with every image, as recall_infer's full file."""
    import torch

    d = load_embeddings(path)
    ids, images = d["poi_ids"], d["image_names"]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: a poi_id appears twice among the text vectors")
    scores = torch.from_numpy(d["text_emb"]) @ torch.from_numpy(d["image_emb"]).t()  # no tensor needs a gradient
    n = scores.shape[1]
    if too_big := [k for k in ks if k > n]:
        log.warning("%s: the gallery holds %d images; recall@%s counts them all", path, n, too_big)
    firsts = first_hit_ranks(scores, ids, [poi_of_image(x) for x in images])
    vals, idx = stable_topk(scores, min(keep, n))
    pois = [
        PoiResult(p, name, first, n, [(images[i], v) for v, i in zip(vr, ir)])
        for p, name, first, vr, ir in zip(ids, d["poi_names"], firsts, vals.tolist(), idx.tolist())
    ]
    return RecallResult(ks, pois), d["meta"]


def result_json(result: RecallResult, fmt: str, path: str, draws: int, seed: int) -> dict:
    doc = {
        "results": path,
        "format": fmt,
        "n_pois": len(result.pois),
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
        ci = mean_intervals(np.array([row for _, row in sorted(result.table().items())]), draws, seed)
        doc |= {"recall_ci": {str(k): list(v) for k, v in zip(result.ks, ci)}, "mrr_ci": list(ci[-1])}
        doc["bootstrap"] = {"draws": draws, "seed": seed, "level": LEVEL, "resampling": "POIs"}
    return doc


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
    """recall_eval.py: writes the JSON and the ``html`` report together; returns the JSON document."""
    ks, draws, source = check_ks(ks), check_draws(draws), results or embeddings
    html_k = html_k or max(ks)
    keep = max(ks + [html_k])
    if embeddings:
        (result, meta), fmt = evaluate_embeddings(embeddings, ks, keep), "full"
    else:
        res, meta = load_results(results, ks + ([html_k] if html else []))
        result, fmt = evaluate_groups(res.groups, ks, res.names, keep=keep), res.fmt
    sizes = "/".join(str(s) for s in sorted({p.n_candidates for p in result.pois})[:5])
    log.info("%s: %s format, %d POIs, %s images listed per POI", source, fmt, len(result.pois), sizes)
    doc = result_json(result, fmt, source, draws, seed)
    writers = {json_path or default_json_path(results, embeddings): lambda tmp: write_json(tmp, doc, indent=1)}
    if html:
        writers[html] = recall_report(doc, result, html_k, image_dir or meta.get("image_dir"), page_size, progress)
    commit_outputs(writers)
    return doc


def compare_recall(a_path, b_path, ks=DEFAULT_KS, json_path=None, draws=DEFAULT_DRAWS, seed=DEFAULT_SEED) -> dict:
    """recall_eval.py --compare: A, B and B - A on the POIs both hold (paired); writes the JSON."""
    ks, draws = check_ks(ks), check_draws(draws)
    (ra, _), (rb, _) = load_results(a_path, ks), load_results(b_path, ks)
    ta, tb = (evaluate_groups(r.groups, ks, r.names).table() for r in (ra, rb))
    common = sorted(set(ta) & set(tb))
    only_a, only_b = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
    if not common:
        raise DataError(f"{a_path} and {b_path} have no POI in common")
    if only_a or only_b:
        what = (len(common), len(only_a), a_path, len(only_b), b_path)
        log.warning("comparing the %d POIs both files hold; %d only in %s, %d only in %s", *what)
    a, b = np.array([ta[p] for p in common]), np.array([tb[p] for p in common])
    names = ra.names | rb.names

    def only(x, y):
        return [{"poi_id": p, "poi_name": names.get(p, "")} for p, hx, hy in zip(common, x, y) if hx and not hy]

    doc = {"A": a_path, "B": b_path, "n_pois": len(common), "pois_only_in_A": only_a, "pois_only_in_B": only_b}
    doc |= {"ks": ks, "bootstrap": {"draws": draws, "seed": seed, "level": LEVEL, "resampling": "POIs, paired"}}
    table = np.hstack([a, b, b - a])  # per POI: A's hit@K... and reciprocal rank, B's, then B - A's
    cis = mean_intervals(table, draws, seed) if draws else [None] * table.shape[1]
    cells = [{"value": float(v), "ci": list(ci) if ci else None} for v, ci in zip(table.mean(0), cis)]
    rows = [dict(zip(("A", "B", "B-A"), cells[j :: a.shape[1]])) for j in range(a.shape[1])]
    doc |= {"recall": dict(zip(map(str, ks), rows)), "mrr": rows[-1]}
    doc["hit_by_one_only"] = {
        str(k): {"A_hits_B_misses": only(a[:, j], b[:, j]), "B_hits_A_misses": only(b[:, j], a[:, j])}
        for j, k in enumerate(ks)
    }
    write_json(json_path or default_json_path(compare=(a_path, b_path)), doc, indent=1)
    return doc


def format_recall(doc: dict) -> str:
    """The printed summary of :func:`evaluate_recall`'s document."""
    n = doc["n_pois"]
    within = "" if doc["format"] == "full" else f", within top {max(p['listed'] for p in doc['pois'])}"
    lines = [f"results: {doc['results']} ({doc['format']} format)", f"POIs: {n}"]
    for k in doc["ks"]:
        ci = doc.get("recall_ci", {}).get(str(k))
        lines.append(f"recall@{k}: {doc['recall'][str(k)]:.4f} ({doc['hits'][str(k)]}/{n}) {fmt_interval(ci)}")
    lines.append(f"MRR (first hit{within}): {fmt_figure(doc['mrr'], doc.get('mrr_ci'))}")
    if b := doc.get("bootstrap"):
        lines.append(f"(intervals: percentile bootstrap over POIs, {b['draws']} draws, seed {b['seed']})")
    return "\n".join(line.rstrip() for line in lines)


def format_compare(doc: dict) -> str:
    """The printed summary of :func:`compare_recall`'s document."""
    labels = [(f"recall@{k}", doc["recall"][str(k)]) for k in doc["ks"]] + [("MRR", doc["mrr"])]
    w = max(len(label) for label, _ in labels)
    lines = [f"A: {doc['A']}", f"B: {doc['B']}", f"POIs compared: {doc['n_pois']}"]
    for label, row in labels:
        a, b, d = (row[key] for key in ("A", "B", "B-A"))
        figures = f"A {fmt_figure(a['value'], a['ci'])}   B {fmt_figure(b['value'], b['ci'])}"
        lines.append(f"{label:<{w}}  {figures}   B - A {d['value']:+.4f} {fmt_interval(d['ci'])}".rstrip())
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
