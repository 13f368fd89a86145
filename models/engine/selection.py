"""The two-stage scoring of a block of catalogue items (run by utils.selection, locally or on Ray). Encode
paths: "single" (stage 1 runs the ranker's recall weights: image vectors serve both stages), "two" (stage 2
encodes its short list again with the ranker's copy), "recall-only". Each file and text encoded once."""

from __future__ import annotations

from utils.cli import DataError, check_finite

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from utils.formats import MAX_POIS, ItemInputs, load_poi_tables, pois_text, stack_inputs
from utils.selection import UNREADABLE, Clock, ModelFiles, RayOptions, Scoring, Selection, run_local

from ..align import load_tokenizer
from ..checkpoint import load_align_model
from .recall_model import RecallModel, load_ranker_model, wrap_align

log = logging.getLogger(__name__)


@dataclass
class SelectionModels:
    """``rank_rm``: the ranker's recall copy (pois_feature texts, stage 2 of "two"); ``hashes``: of both, sha256."""

    recall: RecallModel
    ranker: torch.nn.Module | None
    rank_rm: RecallModel | None
    path: str
    hashes: dict


def load_selection_models(files: ModelFiles, device="cpu", backend: str = "torch"):
    """``(SelectionModels, POI tables or None)``."""

    def recall_model(tokenizer):
        checkpoint = files.recall_checkpoint or files.ranker_checkpoint
        model = load_align_model(checkpoint, files.bert_dir, arch=files.arch, device=device)
        sources = {"checkpoint": checkpoint, "bert_dir": files.bert_dir, "arch": files.arch}
        return wrap_align(model, tokenizer, device=device, backend=backend, sources=sources)

    if files.recall_only:
        rm = recall_model(load_tokenizer(files.bert_dir))
        log.info("recall model loaded (%s...); recall only", rm.weights_hash()[:12])
        return SelectionModels(rm, None, None, "recall-only", {"recall": rm.weights_hash()}), None
    ranker, rank_rm = load_ranker_model(
        files.ranker_checkpoint, files.bert_dir, files.arch, device=device, backend=backend
    )
    rm = recall_model(rank_rm.tokenizer) if files.recall_checkpoint else rank_rm
    hashes = {"ranker_align": rank_rm.weights_hash(), "recall": rm.weights_hash()}
    if hashes["recall"] == hashes["ranker_align"]:
        log.info("stage 1 runs the ranker's own recall copy: image vectors computed once (single encode path)")
        models = SelectionModels(rank_rm, ranker, rank_rm, "single", hashes)
    else:
        log.info("%s differs from the ranker's recall copy: two encode path", files.recall_checkpoint)
        models = SelectionModels(rm, ranker, rank_rm, "two", hashes)
    if not files.poi_tables:
        log.info("no POI tables: every item's POI sequence is empty (poi_len 0)")
        return models, None
    return models, load_poi_tables(*files.poi_tables, dim=rank_rm.embed_dim, trust_pickle=files.trust_pickle)


def item_inputs(title: str, poi_names: str, tables, dim: int) -> ItemInputs:
    """The tables' inputs, as rank_eval (SPEC 5); without tables an empty POI sequence."""
    if tables is not None:
        return tables.inputs(title, poi_names)
    zeros = np.zeros((MAX_POIS, dim), dtype=np.float32)
    return ItemInputs(pois_text(title, poi_names), [], zeros, zeros.copy(), 0, [])


def _encode_files(rm: RecallModel, cands, enc, desc: str, stats: dict) -> tuple[dict, dict]:
    """``{file: vector}``, ``{file: decoded?}`` of the candidates' distinct files."""
    files = list(dict.fromkeys(c.file for c in cands))
    if not files:
        return {}, {}
    emb, ok = rm.encode_images(files, enc, stats=stats, desc=desc)
    return {f: emb[i] for i, f in enumerate(files)}, {f: bool(ok[i]) for i, f in enumerate(files)}


def _stage1(items, rm: RecallModel, enc, stats: dict) -> dict:
    """Stage-1 vectors of every distinct readable file; one that does not decode makes its candidates unreadable."""
    cands = [c for it in items for c in it.scored]
    vec, ok = _encode_files(rm, cands, enc, "stage 1", stats)
    for c in cands:
        if not ok[c.file]:
            c.status, c.detail = UNREADABLE, "does not decode as an image"
    return vec


def _texts(items, models: SelectionModels, inputs: dict, enc) -> tuple[dict, dict, int]:
    """``(title vectors, pois_feature vectors, texts encoded)``: titles by stage 1, pois_feature texts by the ranker."""
    enc = replace(enc, progress=False)
    titles = list(dict.fromkeys(it.title for it in items))
    feats = list(dict.fromkeys(inp.pois_text for inp in inputs.values()))
    texts = list(dict.fromkeys(titles + feats))
    encode = lambda rm, batch: dict(zip(batch, rm.encode_texts(batch, enc))) if batch else {}
    if models.path == "single":
        vec = encode(models.recall, texts)
        return vec, vec, len(texts)
    return encode(models.recall, titles), encode(models.rank_rm, feats), len(texts)


def _stage2(short, models: SelectionModels, vec1: dict, enc, stats: dict):
    """``(vectors, short list)``: on the "two" path the short list encoded again by the ranker's copy."""
    if models.path != "two" or not short:
        return vec1, short
    vec2, ok2 = _encode_files(models.rank_rm, short, enc, "stage 2", stats)
    if not all(ok2.values()):  # it decoded in stage 1: the file changed during the run
        log.warning("%d short-listed images became unreadable during the run", sum(not v for v in ok2.values()))
        short = [c for c in short if ok2[c.file]]
    return vec2, short


def _recall_ranks(items, image_vec: dict, title_vec: dict) -> None:
    """Recall score (image . title vector) of every scored candidate, ranks by score (ties: catalogue order)."""
    for it in items:
        for c in it.scored:
            where = f"recall score of item {it.item_id} line {c.line}"
            c.recall_score = check_finite(float(image_vec[c.file] @ title_vec[it.title]), where)
        for r, c in enumerate(sorted(it.scored, key=lambda c: -c.recall_score), 1):
            c.recall_rank = r


def _head(short, ranker, vec2: dict, feat_vec: dict, inputs: dict, batch_size: int) -> None:
    """The ranker head on the short list; a non-finite score is a ``DataError``: nothing is selected on a NaN."""
    if not short:
        return
    inp = [inputs[c.item_id] for c in short]
    images, feats = torch.stack([vec2[c.file] for c in short]), torch.stack([feat_vec[x.pois_text] for x in inp])
    poi = (torch.from_numpy(x) for x in stack_inputs(inp, dim=images.shape[1]))
    scores = ranker.score_many(images, feats, *poi, batch_size=batch_size)
    for c, x in zip(short, scores.tolist()):
        if not math.isfinite(x):
            why = f"the POI vectors of its POIs ({c.poi_names!r}) or the ranker checkpoint hold NaN/inf values"
            raise DataError(f"ranker score of item {c.item_id} line {c.line} is {x}: {why}")
        c.ranker_score = x


def _final_ranks(item) -> None:
    """Ranker-scored candidates by score (ties: recall rank), then the rest by recall rank; rank 1 is selected."""
    by_recall = sorted(item.scored, key=lambda c: c.recall_rank)
    staged = sorted((c for c in by_recall if c.ranker_score is not None), key=lambda c: -c.ranker_score)
    for r, c in enumerate(staged + [c for c in by_recall if c.ranker_score is None], 1):
        c.final_rank, c.selected = r, r == 1


def score_block(items, models: SelectionModels, tables, settings: Scoring, clock=None, image_loader=None) -> dict:
    """Select on ``items`` (files resolved); returns the block's counts. ``image_loader``: replaces reading files."""
    clock, enc = clock or Clock(), settings.enc
    if image_loader is not None:
        for rm in filter(None, (models.recall, models.rank_rm)):
            rm.image_loader = image_loader
    stats1, stats2 = {}, {}
    with clock("stage1_images"):
        vec1 = _stage1(items, models.recall, enc, stats1)
    ranked = models.ranker is not None
    with clock("texts"):
        dim = models.rank_rm.embed_dim if ranked else 0
        inputs = {it.item_id: item_inputs(it.title, it.poi_names, tables, dim) for it in items if ranked}
        title_vec, feat_vec, n_texts = _texts(items, models, inputs, enc)
    with clock("head"):
        _recall_ranks(items, vec1, title_vec)
        short = [c for it in items for c in it.scored if ranked and c.recall_rank <= settings.recall_k]
    with clock("stage2_images"):
        vec2, short = _stage2(short, models, vec1, enc, stats2)
    with clock("head"):
        _head(short, models.ranker, vec2, feat_vec, inputs, enc.head_batch_size)
        for it in items:
            _final_ranks(it)
    encoded = {"stage1": stats1.get("encoded", 0), "stage1_cached": stats1.get("cached", 0)}
    encoded.update(stage2=stats2.get("encoded", 0), stage2_cached=stats2.get("cached", 0))
    return {
        "stage2_candidates": len(short),
        "distinct_images": len(vec1),
        "images_encoded": encoded,
        "texts_encoded": n_texts,
        "items_with_unknown_poi": sum(bool(x.unknown) for x in inputs.values()),
        "unknown_pois": sorted({n for x in inputs.values() for n in x.unknown}),
        "backend": models.recall.image_backend(enc.precision) if encoded["stage1"] + encoded["stage2"] else "none",
    }


def run_selection(job: Selection, ray: RayOptions | None = None) -> dict:
    """select_images.py: the whole selection, here or on Ray (``ray``); writes the outputs, returns the summary."""
    if ray is None:
        return run_local(job, load_selection_models, score_block)
    from utils.selection import run_on_ray  # Ray only on this path

    return run_on_ray(job, ray, load_selection_models, score_block)
