"""rank_eval.py's pipeline (:func:`evaluate_pairs`, SPEC 5): the pairs' images found by stem (a missing or
unreadable one is the all-zero image, as the authors' loader made it), POI tables checked before the
model loads, each distinct image and ``pois_feature`` text encoded once, the head in large batches."""

from __future__ import annotations

from utils.cli import resolve_device

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.args import Encoding
from utils.evaluation import DEFAULT_DRAWS, DEFAULT_SEED, check_draws, pair_metrics, read_pairs, write_pair_outputs
from utils.formats import ItemInputs, RankRow, index_images, load_poi_tables, stack_inputs

from .recall_model import load_ranker_model

log = logging.getLogger(__name__)
PAIR_CHUNK = 8192  # pairs whose head inputs are stacked at once (bounds memory)


@dataclass(frozen=True)
class PairRun:
    """What rank_eval.py is asked (a POI table left out is empty, an output None not written)."""

    csv: str
    image_dir: str
    checkpoint: str
    bert_dir: str
    poi_pic_num: str | None = None
    poi_image_vectors: str | None = None
    poi_name_vectors: str | None = None
    align_checkpoint: str | None = None  # replaces the ranker's own copy of the recall model
    arch: str | None = None
    trust_pickle: bool = False
    output: str | None = None  # per-pair CSV
    metrics: str | None = None  # JSON of the figures and counts
    skip_missing: bool = False
    skip_bad_rows: bool = False
    limit: int | None = None
    draws: int = DEFAULT_DRAWS
    seed: int = DEFAULT_SEED
    enc: Encoding = Encoding()


def evaluate_pairs(run: PairRun) -> dict:
    """Score every pair, write ``run.output`` and ``run.metrics`` together; returns the metrics document."""
    t0 = time.perf_counter()
    check_draws(run.draws)
    rows, counts = read_pairs(run.csv, run.limit, run.skip_bad_rows)
    images = index_images(run.image_dir)
    log.info("%s: %d image files", run.image_dir, len(images))
    device = resolve_device(run.enc.device)
    paths, row_of, missing = image_files(rows, images, run.image_dir)
    tables = load_poi_tables(
        run.poi_pic_num, run.poi_image_vectors, run.poi_name_vectors, dim=None, trust_pickle=run.trust_pickle
    )
    ranker, rm = load_ranker_model(
        run.checkpoint, run.bert_dir, run.arch, run.align_checkpoint, device=device, backend=run.enc.backend
    )
    log.info("ranker %s on %s", run.checkpoint, device)
    tables = tables.with_dim(rm.embed_dim)
    vec_a, vec_b, keep, img_counts = encode_pair_images(rm, rows, paths, row_of, missing, run)
    scored = [rows[i] for i in keep]
    inputs = [tables.inputs(r.title, r.poi_names) for r in scored]
    s_a, s_b, n_texts = score_pairs(ranker, rm, inputs, vec_a, vec_b, run.enc)
    counts.update(img_counts, pairs_in_csv=len(rows), pairs_skipped=len(rows) - len(keep), distinct_texts=n_texts)
    doc = pair_metrics([r.label for r in scored], s_a, s_b, run.draws, run.seed) | counts | poi_counts(inputs)
    doc |= {"seconds": round(time.perf_counter() - t0, 3), "csv": run.csv, "checkpoint": run.checkpoint}
    doc |= {"align_checkpoint": run.align_checkpoint, "preprocess": run.enc.preprocess}
    doc |= {"skip_missing": run.skip_missing, "image_backend": rm.image_backend(run.enc.precision)}
    write_pair_outputs(run.output, run.metrics, scored, s_a, s_b, doc)
    return doc


def image_files(rows: list[RankRow], images: dict, image_dir) -> tuple[list[str], dict[str, int], list[str]]:
    """``(paths, row_of, missing)``: the distinct files, sorted, then one absent path standing for every
    missing image (the zero image); each image key's row; the keys without a file."""
    keys = {k for r in rows for k in (r.key_a, r.key_b)}
    missing = sorted(k for k in keys if images.get(k) is None)
    files = sorted({str(images[k]) for k in keys if images.get(k) is not None})
    row = {f: i for i, f in enumerate(files)}
    row_of = {k: len(files) if images.get(k) is None else row[str(images[k])] for k in keys}
    return files + ([str(Path(image_dir) / f"{missing[0]}.jpg")] if missing else []), row_of, missing


def encode_pair_images(rm, rows: list[RankRow], paths, row_of: dict, missing: list[str], run: PairRun):
    """``(vec_a, vec_b, keep, counts)`` of the pairs to score: all, or with ``skip_missing`` those read."""
    n = len(paths) - bool(missing)  # real files; then the stand-in for the missing ones
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        log.warning("%d images not found in the image directory: %s", len(missing), shown)
    t0 = time.perf_counter()
    vecs, ok = rm.encode_images(paths, run.enc, desc="pair images")
    ok = ok.tolist()[:n] + [False]  # the stand-in is never read
    what = (n, time.perf_counter() - t0, n - sum(ok), rm.image_backend(run.enc.precision))
    log.info("encoded %d image files in %.1f s (%d unreadable) on %s", *what)
    ia, ib = [row_of[r.key_a] for r in rows], [row_of[r.key_b] for r in rows]
    pair_ok = [ok[a] and ok[b] for a, b in zip(ia, ib)]
    if bad := len(rows) - sum(pair_ok):
        what = "left out" if run.skip_missing else "scored as the all-zero image (--skip-missing leaves them out)"
        log.warning("%d pairs have a missing or unreadable image, %s", bad, what)
    keep = [i for i, good in enumerate(pair_ok) if good or not run.skip_missing]
    counts = {"images_missing": len(missing), "images_unreadable": n - sum(ok)}
    counts |= {"pairs_with_missing_image": bad, "distinct_image_files": n}
    return vecs[[ia[i] for i in keep]], vecs[[ib[i] for i in keep]], keep, counts


def score_pairs(ranker, rm, inputs: list[ItemInputs], vec_a, vec_b, enc: Encoding):
    """``(s_a, s_b, distinct texts)``: the head (float64) on both images of every pair."""
    texts = sorted({x.pois_text for x in inputs})
    t0 = time.perf_counter()
    tv = rm.encode_texts(texts, enc)
    log.info("encoded %d distinct pois_feature texts in %.1f s", len(texts), time.perf_counter() - t0)
    row_of = {t: i for i, t in enumerate(texts)}
    feats = tv[[row_of[x.pois_text] for x in inputs]] if texts else torch.zeros(0, rm.embed_dim)
    s_a, s_b = np.zeros(len(inputs)), np.zeros(len(inputs))
    for a in range(0, len(inputs), PAIR_CHUNK):
        chunk = slice(a, a + PAIR_CHUNK)
        pimg, ptxt, plen = (torch.from_numpy(x) for x in stack_inputs(inputs[chunk], rm.embed_dim))
        n = len(plen)
        images, feat = torch.cat([vec_a[chunk], vec_b[chunk]]), feats[chunk].repeat(2, 1)
        both = ranker.score_many(
            images, feat, pimg.repeat(2, 1, 1), ptxt.repeat(2, 1, 1), plen.repeat(2), batch_size=enc.head_batch_size
        ).double()
        s_a[a : a + n], s_b[a : a + n] = both[:n].numpy(), both[n:].numpy()
    return s_a, s_b, len(texts)


def poi_counts(inputs: list[ItemInputs]) -> dict:
    unknown = sorted({name for x in inputs for name in x.unknown})
    if unknown:
        e_g = ", ".join(repr(name) for name in unknown[:5])
        log.info("%d distinct POI names of the sequences are missing from a vector table, e.g. %s", len(unknown), e_g)
    return {
        "pairs_scored": len(inputs),
        "pairs_without_pois": sum(x.poi_len == 0 for x in inputs),
        "pairs_with_unknown_poi": sum(bool(x.unknown) for x in inputs),
        "distinct_unknown_pois": len(unknown),
    }
