"""The recall stage end to end (recall_infer.py): ``run_recall(RecallJob(...))`` returns the run record.
Gallery: the CSV rows' images found in ``image_dir`` (``<poi_id>_<rank>.<ext>``), in CSV order, an
unreadable one the zero image (SPEC 3) unless ``skip_missing``; cosines ranked by a stable sort."""

from __future__ import annotations

from utils.cli import DataError, bad_rows, resolve_device

import logging
import os
import time
from dataclasses import dataclass, field, replace

import torch

from utils.args import Encoding
from utils.evaluation import stable_topk
from utils.formats import (
    RecallRow,
    index_images,
    iter_recall_csv,
    poi_of_image,
    save_embeddings,
    write_full,
    write_missing_list,
    write_topk,
)
from utils.io import commit_outputs, write_json

from .engine import RecallModel
from .factory import build_recall_model

log = logging.getLogger(__name__)
EMBEDDING_META = ("csv", "image_dir", "model", "model_identity", "preprocess", "precision", "unreadable_policy")


@dataclass
class RecallJob:
    """One recall run; ``model``: a ``MODELS`` name, ``files``: its path options."""

    csv: str
    image_dir: str
    output: str
    model: str = "align"
    files: dict = field(default_factory=dict)
    enc: Encoding = Encoding()
    topk: int = 10
    full_output: str | None = None
    save_embeddings: str | None = None
    missing_list: str | None = None
    skip_missing: bool = False
    skip_bad_rows: bool = False

    @property
    def outputs(self) -> dict:
        """``{flag: path}`` of everything the run may write."""
        return {
            "--output": self.output,
            "--full-output": self.full_output,
            "--missing-list": self.missing_list or f"{self.output}.missing.tsv",
            "--save-embeddings": self.save_embeddings,
            "meta": f"{self.output}.meta.json",
        }


@dataclass
class Gallery:
    """The CSV's rows, images found (``(row, path)``), rows without a file or repeated, queries (poi_id -> name)."""

    rows: list[RecallRow]
    images: list[tuple[RecallRow, object]] = field(default_factory=list)
    missing: list[RecallRow] = field(default_factory=list)
    duplicates: list[RecallRow] = field(default_factory=list)
    queries: dict[str, str] = field(default_factory=dict)
    unreadable: list[tuple[RecallRow, object]] = field(default_factory=list)


def read_gallery(csv_path: str, image_dir: str, skip_bad_rows: bool = False) -> Gallery:
    """The gallery; a row without a file is left out (the authors' gallery held what they had downloaded)."""
    errors: list = []
    rows = list(iter_recall_csv(csv_path, errors))
    for e in errors[:10] if not skip_bad_rows else ():
        log.error("%s", e)
    bad_rows(errors, csv_path, skip_bad_rows)
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    g, index, seen = Gallery(rows), index_images(image_dir), set()
    for row in rows:
        if row.key in seen:
            g.duplicates.append(row)
            continue
        seen.add(row.key)
        if (path := index.get(row.key)) is None:
            g.missing.append(row)
        else:
            g.images.append((row, path))
        if (first := g.queries.setdefault(row.poi_id, row.poi_name)) != row.poi_name:
            log.warning(f"{csv_path} line {row.line}: poi_id {row.poi_id} has a second name; using {first!r}")
    if g.duplicates:
        d = g.duplicates[0]
        log.warning(f"{len(g.duplicates)} rows repeat a <poi_id>_<rank> (first: line {d.line}, {d.key}): scored once")
    log.info(f"{csv_path}: {len(rows)} rows, {len(g.queries)} POIs; {len(g.images)} images found, {len(g.missing)} not")
    if not g.images:
        raise DataError(f"{image_dir}: no <poi_id>_<rank>.<ext> image of {csv_path} is there (e.g. {rows[0].key}.jpg)")
    return g


def drop_unreadable(g: Gallery, emb: torch.Tensor, ok: torch.Tensor, skip: bool):
    """Unreadable images stay as the zero image (reference) or leave the gallery (``skip``)."""
    g.unreadable = [(row, p) for (row, p), good in zip(g.images, ok.tolist()) if not good]
    if skip and g.unreadable:
        keep = ok.nonzero().flatten()
        g.images = [g.images[i] for i in keep.tolist()]
        emb, ok = emb[keep], ok[keep]
        log.info("--skip-missing: %d unreadable images dropped from the gallery", len(g.unreadable))
    elif g.unreadable:
        log.warning("%d unreadable images are scored as the zero image (--skip-missing drops them)", len(g.unreadable))
    if not g.images:
        raise DataError("no readable image left in the gallery")
    return emb, ok


def write_outputs(job: RecallJob, g: Gallery, img_emb, ok, txt_emb, scores, top, meta: dict) -> None:
    """Every output of the run, committed together or not at all."""
    qids, qnames, names = list(g.queries), list(g.queries.values()), [p.name for _, p in g.images]
    gallery, (top_vals, top_idx) = [str(p) for _, p in g.images], top
    topk_rows = (
        (q, n, r, names[j], s)
        for q, n, vals, idx in zip(qids, qnames, top_vals.tolist(), top_idx.tolist())
        for r, (s, j) in enumerate(zip(vals, idx), 1)
    )
    arrays = {"image_emb": img_emb.numpy(), "image_names": names, "image_ok": ok.numpy(), "text_emb": txt_emb.numpy()}
    arrays["meta"] = {k: meta[k] for k in EMBEDDING_META}
    outs = job.outputs
    missing_list = outs["--missing-list"] if g.missing or g.unreadable else None
    commit_outputs(
        {
            outs["--output"]: lambda p: write_topk(p, topk_rows),
            outs["--full-output"]: lambda p: write_full(p, qids, qnames, gallery, scores.numpy()),
            outs["--save-embeddings"]: lambda p: save_embeddings(p, **arrays, poi_ids=qids, poi_names=qnames),
            missing_list: lambda p: write_missing_list(p, g.missing, g.unreadable),
            outs["meta"]: lambda p: write_json(p, meta, indent=1),
        },
        {path: flag for flag, path in outs.items() if flag != "meta"},
    )
    log.info("wrote %s: top %d of %d images for %d POIs", job.output, top_idx.shape[1], len(names), len(qids))
    if missing_list:
        log.warning(f"{len(g.missing)} images missing, {len(g.unreadable)} unreadable: listed in {missing_list}")


def run_record(job: RecallJob, rm: RecallModel, g: Gallery, stats: dict, timings: dict, k: int) -> dict:
    """The run record (``<output>.meta.json``)."""
    own = {poi_of_image(p.name) for _, p in g.images}
    engine = rm.engine_info(job.enc.precision)
    setup = {"engine_setup": engine["onnx_setup_s"]} if "onnx_setup_s" in engine else {}
    return {
        "csv": job.csv,
        "image_dir": job.image_dir,
        "checkpoint": job.files.get("checkpoint"),
        "model": rm.name,
        "model_sources": rm.sources,
        "model_identity": rm.identity(),
        "weights_sha256": rm.weights_hash(),
        "preprocess": job.enc.preprocess,
        "precision": job.enc.precision,
        "device": str(rm.device),
        **engine,
        "onnx_max_abs_diff": engine.get("onnx_max_abs_diff"),
        **{key: stats.get(key) for key in ("batch_size", "num_workers", "lanes")},
        "topk": k,
        "gallery_size": len(g.images),
        "n_pois": len(g.queries),
        "n_pois_without_gallery_image": sum(q not in own for q in g.queries),
        "rows": len(g.rows),
        "missing_on_disk": len(g.missing),
        "unreadable": len(g.unreadable),
        "unreadable_policy": "dropped" if job.skip_missing else "zero image",
        "duplicate_rows": len(g.duplicates),
        "images_encoded": stats["encoded"],
        "images_cached": stats["cached"],
        "timings_s": {**{name: round(v, 3) for name, v in timings.items()}, **setup},
        "images_per_s": round(stats["encoded"] / max(timings["images"], 1e-9), 2),
        "full_output": job.full_output,
        "embeddings": job.save_embeddings,
    }


def run_recall(job: RecallJob, started: float | None = None) -> dict:
    """Run ``job``, return its record; ``timings_s.first_image`` counts from ``started`` (a perf_counter)."""
    t0 = started if started is not None else time.perf_counter()
    device, timings, stats, mark = resolve_device(job.enc.device), {}, {}, [time.perf_counter()]

    def step(name: str) -> None:
        timings[name], mark[0] = time.perf_counter() - mark[0], time.perf_counter()

    g = read_gallery(job.csv, job.image_dir, job.skip_bad_rows)
    step("read")
    onnx_dir = os.path.join(job.enc.cache_dir, "onnx") if job.enc.cache_dir else None
    rm = build_recall_model(job.model, device=device, backend=job.enc.backend, onnx_cache_dir=onnx_dir, **job.files)
    log.info("model %s (%s) on %s", rm.name, ", ".join(f"{k}={v}" for k, v in rm.sources.items() if v), device)
    step("load_model")
    img_emb, ok = rm.encode_images([p for _, p in g.images], job.enc, stats=stats, desc="gallery")
    step("images")
    if stats.get("first_batch_at"):
        timings["first_image"] = stats["first_batch_at"] - t0
    img_emb, ok = drop_unreadable(g, img_emb, ok, job.skip_missing)
    txt_emb = rm.encode_texts(list(g.queries.values()), replace(job.enc, progress=False))
    step("texts")
    with torch.inference_mode():  # cosines (logit_scale changes no ranking); ties keep gallery order
        scores = (txt_emb.to(device) @ img_emb.to(device).t()).float()
        top = stable_topk(scores, min(job.topk, scores.shape[1]))
    scores, top = scores.cpu(), (top[0].cpu(), top[1].cpu())
    step("scores")
    timings["total"] = time.perf_counter() - t0
    meta = run_record(job, rm, g, stats, timings, top[1].shape[1])
    write_outputs(job, g, img_emb, ok, txt_emb, scores, top, meta)
    return meta
