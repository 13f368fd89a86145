"""rank_eval.py's pipeline (:func:`evaluate_pairs`, SPEC section 5): the pairs of a
ranking CSV, their images found by stem (``<item_id>_a.<ext>`` / ``<item_id>_b.<ext>``, as
download_images.py names them), the POI tables checked before the model loads, then each
distinct image file and ``pois_feature`` text encoded once (decoding starts while the
model loads, unless a cache decides what to decode), the ranker head on both images of
every pair in large batches, and the figures and files of ``utils.evaluation``.

A missing or unreadable image is scored as the all-zero image (the authors' loader turned
unreadable files into zeros); ``skip_missing`` leaves such pairs out.
"""

from __future__ import annotations

from utils.cli import resolve_device

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from utils.args import Encoding
from utils.evaluation import DEFAULT_DRAWS, DEFAULT_SEED, check_draws, pair_metrics, read_pairs, write_pair_outputs
from utils.formats import ItemInputs, RankRow, index_images, load_poi_tables, stack_inputs

from ..align import load_tokenizer
from ..checkpoint import load_ranker
from .encode import prefetch_images
from .recall_model import wrap_align

log = logging.getLogger(__name__)
PAIR_CHUNK = 8192  # pairs whose head inputs are stacked at once (bounds memory)


@dataclass(frozen=True)
class PairRun:
    """What rank_eval.py is asked: inputs (the three POI tables optional: empty tables
    without them), outputs (None: not written) and options."""

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


@dataclass
class Pair:
    row: RankRow
    inputs: ItemInputs
    path_a: Path | None
    path_b: Path | None


def evaluate_pairs(run: PairRun) -> dict:
    """rank_eval.py: scores every pair, writes ``run.output`` / ``run.metrics`` together
    and returns the metrics document (figures, counts, what ran)."""
    t0 = time.perf_counter()
    check_draws(run.draws)
    rows, counts = read_pairs(run.csv, run.limit, run.skip_bad_rows)
    images = index_images(run.image_dir)
    log.info("%s: %d image files", run.image_dir, len(images))
    device = resolve_device(run.enc.device)
    paths, missing = image_files(rows, images, run.image_dir)
    prefetch = start_decoding(run.enc, paths, device)
    try:
        tables = load_poi_tables(
            run.poi_pic_num, run.poi_image_vectors, run.poi_name_vectors, dim=None, trust_pickle=run.trust_pickle
        )
        ranker, rm, tables = build_model(run, device, tables)
        pairs = [Pair(r, tables.inputs(r.title, r.poi_names), images.get(r.key_a), images.get(r.key_b)) for r in rows]
        vec_a, vec_b, pair_ok, img_counts = encode_pair_images(rm, pairs, paths, missing, run.enc, prefetch)
    finally:
        if prefetch is not None:
            prefetch.close()
    pairs, vec_a, vec_b, skipped = drop_missing(pairs, vec_a, vec_b, pair_ok, run.skip_missing)
    feats, n_texts = encode_pair_texts(rm, pairs, run.enc)
    s_a, s_b = score_pairs(ranker, pairs, vec_a, vec_b, feats, run.enc.head_batch_size, rm.embed_dim)
    counts.update(img_counts, pairs_in_csv=len(rows), pairs_skipped=skipped, distinct_texts=n_texts)
    doc = pair_metrics([pr.row.label for pr in pairs], s_a, s_b, run.draws, run.seed) | counts | poi_counts(pairs)
    doc |= {
        "seconds": round(time.perf_counter() - t0, 3),
        "csv": run.csv,
        "checkpoint": run.checkpoint,
        "align_checkpoint": run.align_checkpoint,
        "preprocess": run.enc.preprocess,
        "skip_missing": run.skip_missing,
        "image_backend": rm.image_backend(run.enc.precision),
    }
    write_pair_outputs(run.output, run.metrics, [pr.row for pr in pairs], s_a, s_b, doc)
    return doc


def build_model(run: PairRun, device, tables):
    """``(ranker, rm, tables)``: the ranker (strict keys), a RecallModel around its recall
    copy, and the POI tables checked against its embedding size. (``models.factory``
    composes the same; it imports this package, so it cannot be imported here.)"""
    ranker = load_ranker(
        run.checkpoint, run.bert_dir, arch=run.arch, align_checkpoint=run.align_checkpoint, device=device
    )
    sources = {"checkpoint": run.checkpoint, "bert_dir": run.bert_dir, "arch": run.arch}
    sources["align_checkpoint"] = run.align_checkpoint
    tok = load_tokenizer(run.bert_dir)
    rm = wrap_align(ranker.align_model, tok, device=device, backend=run.enc.backend, sources=sources)
    log.info("ranker %s on %s", run.checkpoint, device)
    return ranker, rm, tables.with_dim(rm.embed_dim)


def image_files(rows: list[RankRow], images: dict, image_dir) -> tuple[list[str], list[str]]:
    """``(paths, missing)``: the distinct image files of the pairs, sorted, then one path
    that stands for every missing image (encoded as any file that cannot be read: the
    zero image); and the keys without a file."""
    keys = [k for r in rows for k in (r.key_a, r.key_b)]
    missing = sorted({k for k in keys if images.get(k) is None})
    files = sorted({str(images[k]) for k in keys if images.get(k) is not None})
    return files + ([str(Path(image_dir) / f"{missing[0]}.jpg")] if missing else []), missing


def start_decoding(enc: Encoding, paths: list[str], device):
    """Decoding workers started on the image files now, so that decoding overlaps the
    tables and model load; None with a cache (its hits decide what is decoded once the
    model's identity is known)."""
    if enc.cache_dir:
        return None
    return prefetch_images(paths, replace(enc, device=str(device)))


def encode_pair_images(rm, pairs: list[Pair], paths: list[str], missing: list[str], enc: Encoding, prefetch=None):
    """``(vec_a, vec_b, pair_ok, counts)``: the vectors of image a and b of every pair
    (each of the ``paths`` of :func:`image_files` encoded once; ``prefetch`` from
    :func:`start_decoding`), whether both were read, and the image counts."""
    n = len(paths) - bool(missing)  # real files; then the stand-in for the missing ones
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        log.warning("%d images not found in the image directory: %s", len(missing), shown)
    t0 = time.perf_counter()
    vecs, ok = rm.encode_images(paths, enc, desc="pair images", prefetch=prefetch)
    ok = ok.tolist()
    unreadable = n - sum(ok[:n])
    what = (n, time.perf_counter() - t0, unreadable, rm.image_backend(enc.precision))
    log.info("encoded %d image files in %.1f s (%d unreadable) on %s", *what)
    row_of = {f: i for i, f in enumerate(paths[:n])}

    def index(p):  # the stand-in's row for a missing file
        return row_of[str(p)] if p is not None else n

    ia = torch.tensor([index(pr.path_a) for pr in pairs], dtype=torch.long)
    ib = torch.tensor([index(pr.path_b) for pr in pairs], dtype=torch.long)
    pair_ok = [all(p is not None and ok[row_of[str(p)]] for p in (pr.path_a, pr.path_b)) for pr in pairs]
    counts = {
        "images_missing": len(missing),
        "images_unreadable": unreadable,
        "pairs_with_missing_image": len(pairs) - sum(pair_ok),
        "distinct_image_files": n,
    }
    return vecs[ia], vecs[ib], pair_ok, counts


def drop_missing(pairs, vec_a, vec_b, pair_ok, skip: bool):
    """The pairs to score: all (missing images scored as the zero image) or, with
    ``skip``, those whose two images were read; and how many were left out."""
    bad = len(pairs) - sum(pair_ok)
    if bad and not skip:
        log.warning(
            "%d pairs have a missing or unreadable image, scored as the all-zero image "
            "(the authors' behaviour; --skip-missing leaves them out)",
            bad,
        )
    if not bad or not skip:
        return pairs, vec_a, vec_b, 0
    keep = [i for i, good in enumerate(pair_ok) if good]
    log.warning("--skip-missing: left out %d pairs with a missing or unreadable image", bad)
    return [pairs[i] for i in keep], vec_a[keep], vec_b[keep], bad


def encode_pair_texts(rm, pairs: list[Pair], enc: Encoding):
    """The ``pois_feature`` vector of every pair, each distinct text encoded once."""
    texts = sorted({pr.inputs.pois_text for pr in pairs})
    t0 = time.perf_counter()
    tv = rm.encode_texts(texts, enc)
    log.info("encoded %d distinct pois_feature texts in %.1f s", len(texts), time.perf_counter() - t0)
    row_of = {t: i for i, t in enumerate(texts)}
    idx = torch.tensor([row_of[pr.inputs.pois_text] for pr in pairs], dtype=torch.long)
    return (tv[idx] if texts else torch.zeros(0, rm.embed_dim)), len(texts)


def score_pairs(ranker, pairs: list[Pair], vec_a, vec_b, feats, batch_size: int, dim: int):
    """``(s_a, s_b)`` float64 arrays: the head (``SiameseRanker.score_many``) on both
    images of every pair with the pair's item inputs."""
    s_a, s_b = np.zeros(len(pairs)), np.zeros(len(pairs))
    for a in range(0, len(pairs), PAIR_CHUNK):
        chunk = slice(a, a + PAIR_CHUNK)
        pimg, ptxt, plen = (torch.from_numpy(x) for x in stack_inputs([pr.inputs for pr in pairs[chunk]], dim))
        n = len(plen)
        images, feat = torch.cat([vec_a[chunk], vec_b[chunk]]), feats[chunk].repeat(2, 1)
        both = ranker.score_many(
            images, feat, pimg.repeat(2, 1, 1), ptxt.repeat(2, 1, 1), plen.repeat(2), batch_size=batch_size
        )
        both = both.double().numpy()
        s_a[a : a + n], s_b[a : a + n] = both[:n], both[n:]
    return s_a, s_b


def poi_counts(pairs: list[Pair]) -> dict:
    """What the POI sequences of the scored pairs held (unknown names logged)."""
    unknown = sorted({n for pr in pairs for n in pr.inputs.unknown})
    if unknown:
        log.info(
            "%d distinct POI names of the sequences are missing from a vector table (zero vectors), e.g. %s",
            len(unknown),
            ", ".join(repr(n) for n in unknown[:5]),
        )
    return {
        "pairs_scored": len(pairs),
        "pairs_without_pois": sum(pr.inputs.poi_len == 0 for pr in pairs),
        "pairs_with_unknown_poi": sum(bool(pr.inputs.unknown) for pr in pairs),
        "distinct_unknown_pois": len(unknown),
    }
