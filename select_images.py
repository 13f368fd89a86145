#!/usr/bin/env python
"""Pick the image to show for each item of your own catalogue with the two-stage selector.

    python select_images.py --items catalogue.csv --out selection.csv \\
        --ranker-checkpoint data/shoucai_siamese_train_concat_poi_020_0.6520.ckpt \\
        --recall-checkpoint data/align_model.pth --bert-dir data/bert-base-chinese \\
        [--poi-pic-num T1 --poi-image-vectors T2 --poi-name-vectors T3] [--html report.html]

    ... --ray                 # the same run on Ray Data: a local Ray started in-process
    ... --ray HOST:6379       # or join a running cluster (also: RAY_ADDRESS); see select_ray.py

Input (``--items``): a CSV with the header ``item_id,title,poi_names,image``, one row per
candidate image, or a Parquet file with those columns. ``image`` is a local path -- a
relative path is resolved against the directory of the catalogue file, not the working
directory -- or an http(s) URL, downloaded once into ``--image-cache`` (default
``<out>.images/``) under a name made from a hash of the URL, so a rerun reuses it.
``poi_names`` is a comma-separated list and may be empty.

Stage 1 (recall): every readable candidate is scored against its item's title with the
recall model (cosine of the normalised vectors); the top ``--recall-k`` per item go on.
Stage 2 (ranking): those are scored by the ranker (SPEC section 5) with the item's POI
inputs built as in rank_eval.py (utils/poi.py): with the three POI tables the POI sequence
is sorted by pic-num weight and looked up; without tables it is empty (poi_len 0). In both
cases pois_feature is the text of poi_names when it is not blank, else the title.
Final order: the stage-2 candidates by ranker score, then the others by recall score; the
first is selected. ``--recall-only`` skips stage 2.

Models: the ranker checkpoint holds its own copy of the recall model. When
``--recall-checkpoint`` holds the same weights (compared by hash), or is omitted, image
vectors are computed once and used by both stages ("single" encode path); otherwise stage
2 encodes its short-listed images again with the ranker's copy ("two" encode path). Every
distinct image file and text is encoded once per model, batched across items. The image
engine is ``--backend`` (auto: ONNX Runtime on a CPU when it agrees with torch, else torch).

Output (``--out``): one row per candidate, in catalogue order:
    item_id,line,image,status,recall_score,recall_rank,ranker_score,final_rank,selected,file,detail
status: ok | missing (local file absent) | download_failed | unreadable (does not decode)
| duplicate (the same image listed earlier for the item: scored once, never selected).
Candidates that are not ok get no scores and are never selected; an item with no ok
candidate gets no selection and is reported. ``ranker_score`` is blank for candidates that
did not reach stage 2. ``<out>.summary.json`` records counts, the encode path, unknown POIs,
bad catalogue rows (by line; they are left out) and timings. ``--html`` writes a visual
report. With ``--ray``, an ``--out`` not ending in ``.csv`` is a directory of Parquet shards.

Exit status: 0 on success (also when some items have no readable image), 2 for bad input
(one line on stderr, checked before any model is loaded where possible).
"""

from __future__ import annotations

from utils.cli import (
    DECODE_WORKERS_HELP,
    DataError,
    add_common_args,
    entry_point,
    finite_float,
    input_dir,
    input_file,
    non_negative_float,
    non_negative_int,
    output_dir,
    output_file,
    positive_int,
    resolve_device,
    setup_logging,
)

import argparse
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from models import BACKENDS, PRECISIONS
from utils.args import Encoding
from utils.evaluation import write_selection_report
from utils.formats import PREPROCESS_MODES, PoiTableError
from utils.io import write_json
from utils.selection import (
    DOWNLOAD_FAILED,
    DUPLICATE,
    MISSING,
    OK,
    UNREADABLE,
    Item,
    assign_final_ranks,
    mark_duplicates,
    read_catalogue,
    resolve_images,
    score_recall,
    set_ranker_scores,
    shortlist,
    write_output,
)

log = logging.getLogger("select_images")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="select_images.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("inputs")
    g.add_argument(
        "--items", required=True, help="catalogue CSV or Parquet: item_id,title,poi_names,image (one row per candidate)"
    )
    g.add_argument("--ranker-checkpoint", help="ranker checkpoint (required unless --recall-only)")
    g.add_argument("--recall-checkpoint", help="recall checkpoint for stage 1 (default: the ranker's own copy)")
    g.add_argument("--bert-dir", required=True, help="directory with bert-base-chinese config.json and vocab.txt")
    g.add_argument(
        "--arch",
        help="architecture JSON for a small variant, applied to both models "
        "(default: recorded in the checkpoints, else the released one)",
    )
    g.add_argument("--poi-pic-num", help="pic-num table (.npy published or .npz safe format)")
    g.add_argument("--poi-image-vectors", help="POI mean image vector table")
    g.add_argument("--poi-name-vectors", help="POI name vector table")
    g.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load .npy tables with plain np.load(allow_pickle=True) (code in them would run)",
    )
    o = p.add_argument_group("outputs")
    o.add_argument(
        "--out",
        required=True,
        help="output CSV, one row per candidate (with --ray and no .csv suffix: a directory of Parquet shards)",
    )
    o.add_argument("--html", help="also write a visual HTML report")
    o.add_argument("--summary", help="summary JSON (default <out>.summary.json)")
    r = p.add_argument_group("running")
    r.add_argument(
        "--recall-k", type=positive_int, default=5, help="candidates per item passed to the ranker (default 5)"
    )
    r.add_argument("--recall-only", action="store_true", help="stage 1 only: select by recall score")
    r.add_argument("--image-cache", help="directory for downloaded images (default <out>.images)")
    r.add_argument("--download-workers", type=positive_int, default=8, help="concurrent downloads")
    r.add_argument("--timeout", type=finite_float, default=30.0, help="per-download read timeout, seconds")
    r.add_argument("--cache-dir", help="embedding cache directory (utils/cache.py; local path only)")
    r.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="image engine: auto = ONNX Runtime on a CPU when it agrees with torch "
        "(checked on load), else torch (default auto)",
    )
    r.add_argument("--batch-size", type=positive_int, help="images per batch (default 32 CPU, 128 CUDA)")
    r.add_argument("--text-batch-size", type=positive_int, help="texts per batch (default: 16 on a CPU, 256 on CUDA)")
    r.add_argument("--head-batch-size", type=positive_int, default=512)
    r.add_argument("--num-workers", "--workers", dest="workers", type=non_negative_int, help=DECODE_WORKERS_HELP)
    r.add_argument(
        "--preprocess",
        choices=PREPROCESS_MODES,
        default="reference",
        help="reference = the authors' exact preprocessing; fast = JPEG draft decoding",
    )
    r.add_argument("--precision", choices=PRECISIONS, default="fp32")
    add_common_args(r)
    y = p.add_argument_group("Ray Data (select_ray.py)")
    y.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run on Ray Data: without ADDRESS a local Ray started in-process (or the "
        "cluster of RAY_ADDRESS); with one, join that cluster (e.g. HOST:6379, auto)",
    )
    y.add_argument("--actors", type=positive_int, default=1, help="encoding actors, one model each (default 1)")
    y.add_argument(
        "--gpus-per-actor", type=non_negative_float, default=0.0, help="GPUs per encoding actor (default 0: CPU actors)"
    )
    y.add_argument(
        "--cpus-per-actor", type=non_negative_float, default=1.0, help="CPUs reserved per encoding actor (default 1)"
    )
    y.add_argument(
        "--shard-items",
        type=positive_int,
        default=64,
        help="items per shard: the unit of work, of retries and of --out's Parquet files (default 64)",
    )
    return p


# ---------------------------------------------------------------------------
# step 0: every path checked before any work
# ---------------------------------------------------------------------------
def check_args(args) -> None:
    """Flag combinations, readable inputs, then writable outputs: a ``UserError`` before
    any model is loaded or image encoded."""
    if not args.recall_only and not args.ranker_checkpoint:
        raise DataError("--ranker-checkpoint is required (or --recall-only with --recall-checkpoint)")
    if args.recall_only and not (args.recall_checkpoint or args.ranker_checkpoint):
        raise DataError("--recall-only needs --recall-checkpoint (or --ranker-checkpoint for its copy)")
    tables = [args.poi_pic_num, args.poi_image_vectors, args.poi_name_vectors]
    if any(tables) and not all(tables):
        raise PoiTableError(
            "--poi-pic-num, --poi-image-vectors and --poi-name-vectors go together: give all three or none"
        )
    for opt in (
        "items",
        "ranker_checkpoint",
        "recall_checkpoint",
        "arch",
        "poi_pic_num",
        "poi_image_vectors",
        "poi_name_vectors",
    ):
        if getattr(args, opt):
            input_file(getattr(args, opt), "--" + opt.replace("_", "-"))
    input_dir(args.bert_dir, "--bert-dir")
    if args.ray is not None and not out_is_csv(args):
        output_dir(args.out, "--out")
    else:
        output_file(args.out, "--out")
    output_file(summary_path(args), "--summary")
    if args.html:
        output_file(args.html, "--html")
    if args.cache_dir:
        output_dir(args.cache_dir, "--cache-dir")
    output_dir(image_cache_of(args), "--image-cache")


def out_is_csv(args) -> bool:
    return args.ray is None or str(args.out).lower().endswith(".csv")


def summary_path(args) -> str:
    return args.summary or f"{str(args.out).rstrip('/')}.summary.json"


def image_cache_of(args) -> str:
    return args.image_cache or f"{str(args.out).rstrip('/')}.images"


# ---------------------------------------------------------------------------
# step 1: the catalogue
# ---------------------------------------------------------------------------
@dataclass
class Catalogue:
    path: str
    items: list[Item]
    errors: list = field(default_factory=list)

    @property
    def cands(self):
        return [c for it in self.items for c in it.cands]


def read_items(args) -> Catalogue:
    errors: list = []
    items = read_catalogue(args.items, errors)
    for e in errors[:20]:
        log.warning("bad row left out: %s", e)
    if len(errors) > 20:
        log.warning("... and %d more bad rows", len(errors) - 20)
    n = sum(len(it.cands) for it in items)
    if not n:
        raise DataError(f"{args.items}: no usable rows ({len(errors)} bad)")
    log.info("%s: %d items, %d candidate rows, %d bad rows", args.items, len(items), n, len(errors))
    return Catalogue(args.items, items, errors)


# ---------------------------------------------------------------------------
# step 2: models (models.factory) and POI tables
# ---------------------------------------------------------------------------
@dataclass
class Models:
    """``recall`` encodes stage 1 (images and titles); ``rank_rm`` is the RecallModel
    around the ranker's own copy (stage-2 images on the "two" path, pois_feature texts).
    ``path``: "single" (one model for both stages), "two" or "recall-only"."""

    recall: object
    ranker: object | None
    rank_rm: object | None
    path: str
    hashes: dict


def load_models(args, device) -> Models:
    from models import build_ranker, build_recall_model

    kw = dict(device=device, backend=args.backend)
    if args.recall_only:
        src = args.recall_checkpoint or args.ranker_checkpoint
        rm = build_recall_model("align", checkpoint=src, bert_dir=args.bert_dir, arch=args.arch, **kw)
        log.info("recall model %s loaded (%s...); --recall-only", src, rm.weights_hash()[:12])
        return Models(rm, None, None, "recall-only", {"recall": rm.weights_hash()})
    ranker, rank_rm = build_ranker(args.ranker_checkpoint, args.bert_dir, arch=args.arch, **kw)
    hashes = {"ranker_align": rank_rm.weights_hash()}
    log.info("ranker %s loaded (recall copy %s...)", args.ranker_checkpoint, hashes["ranker_align"][:12])
    if not args.recall_checkpoint:
        hashes["recall"] = hashes["ranker_align"]
        log.info("no --recall-checkpoint: stage 1 uses the ranker's copy (single encode path)")
        return Models(rank_rm, ranker, rank_rm, "single", hashes)
    rm = build_recall_model("align", checkpoint=args.recall_checkpoint, bert_dir=args.bert_dir, arch=args.arch, **kw)
    hashes["recall"] = rm.weights_hash()
    if hashes["recall"] == hashes["ranker_align"]:
        log.info(
            "%s holds the same weights as the ranker's copy: image vectors are computed "
            "once for both stages (single encode path)",
            args.recall_checkpoint,
        )
        return Models(rank_rm, ranker, rank_rm, "single", hashes)
    log.info(
        "%s differs from the ranker's copy of the recall model (%s... vs %s...): stage 2 "
        "encodes its short-listed images again (two encode path)",
        args.recall_checkpoint,
        hashes["recall"][:12],
        hashes["ranker_align"][:12],
    )
    return Models(rm, ranker, rank_rm, "two", hashes)


def load_tables(args, models: Models):
    """The three POI tables, or ``None`` when none is given or there is no ranker."""
    from utils.formats import load_poi_tables

    if models.ranker is None or not args.poi_pic_num:
        if models.ranker is not None:
            log.info("no POI tables: every item's POI sequence is empty (poi_len 0)")
        return None
    return load_poi_tables(
        args.poi_pic_num,
        args.poi_image_vectors,
        args.poi_name_vectors,
        dim=models.rank_rm.embed_dim,
        trust_pickle=args.trust_pickle,
    )


def item_inputs(title: str, poi_names: str, tables, dim: int):
    """As rank_eval: utils.poi.build_item_inputs with the tables; without tables no POI
    sequence (poi_len 0) and pois_feature text per the SPEC rule."""
    import numpy as np

    from utils.formats import MAX_POIS, ItemInputs, pois_text

    if tables is not None:
        return tables.inputs(title, poi_names)
    zeros = np.zeros((MAX_POIS, dim), dtype=np.float32)
    return ItemInputs(pois_text(title, poi_names), [], zeros, zeros.copy(), 0, [])


# ---------------------------------------------------------------------------
# step 3: images (local paths and downloads)
# ---------------------------------------------------------------------------
def resolve(args, items: list[Item], progress: bool) -> dict:
    fetch = resolve_images(
        items,
        os.path.dirname(os.path.abspath(args.items)),
        image_cache_of(args),
        workers=args.download_workers,
        timeout=args.timeout,
        progress=progress,
    )
    n_dup = mark_duplicates(items)
    if n_dup:
        log.warning("%d rows repeat an image already listed for the same item; scored once, marked duplicate", n_dup)
    return fetch


# ---------------------------------------------------------------------------
# steps 4-6: encode, score, rank
# ---------------------------------------------------------------------------
def encoding(args, progress: bool) -> Encoding:
    return Encoding.from_args(args, num_workers=args.workers, progress=progress)


def encode_files(args, rm, files, desc, stats, progress) -> tuple[dict, dict]:
    """``{file: vector}``, ``{file: decoded?}`` with RecallModel ``rm`` (and the embedding
    cache of its weights when --cache-dir is given)."""
    if not files:
        return {}, {}
    emb, ok = rm.encode_images(files, encoding(args, progress), stats=stats, desc=desc)
    return {f: emb[i] for i, f in enumerate(files)}, {f: bool(ok[i]) for i, f in enumerate(files)}


def encode_stage1(args, items, models: Models, stats: dict, progress: bool) -> dict:
    """Stage-1 vectors of every distinct readable file; files that do not decode become
    ``unreadable``."""
    files = list(dict.fromkeys(c.file for it in items for c in it.cands if c.status == OK))
    vec, ok = encode_files(args, models.recall, files, "stage 1", stats, progress)
    for it in items:
        for c in it.cands:
            if c.status == OK and not ok[c.file]:
                c.status, c.detail = UNREADABLE, "does not decode as an image"
    stats["distinct"] = len(files)
    return vec


def encode_item_texts(args, items, models: Models, inputs: dict) -> tuple[dict, dict, int]:
    """``(title_vec, feat_vec, n_texts)``: the titles with the stage-1 model, the
    pois_feature texts with the ranker's copy; with one model every distinct text once."""
    titles = list(dict.fromkeys(it.title for it in items))
    feats = list(dict.fromkeys(inp.pois_text for inp in inputs.values()))
    if models.path == "single":
        texts = list(dict.fromkeys(titles + feats))
        tv = models.recall.encode_texts(texts, encoding(args, False))
        vec = {s: tv[i] for i, s in enumerate(texts)}
        return vec, vec, len(texts)
    tv = models.recall.encode_texts(titles, encoding(args, False))
    feat_vec = {}
    if feats:
        fv = models.rank_rm.encode_texts(feats, encoding(args, False))
        feat_vec = {s: fv[i] for i, s in enumerate(feats)}
    return {s: tv[i] for i, s in enumerate(titles)}, feat_vec, len(dict.fromkeys(titles + feats))


def encode_stage2(args, short, models: Models, vec1: dict, stats: dict, progress: bool):
    """``(vectors, short)``: on the "two" path the short-listed files again with the
    ranker's copy; otherwise the stage-1 vectors."""
    if models.path != "two" or not short:
        return vec1, short
    files = list(dict.fromkeys(c.file for c in short))
    vec2, ok2 = encode_files(args, models.rank_rm, files, "stage 2", stats, progress)
    bad = [f for f in files if not ok2[f]]
    if bad:  # read once already; a file that changed in between
        log.warning("%d short-listed images became unreadable during the run", len(bad))
        short = [c for c in short if ok2[c.file]]
    return vec2, short


def score_head(args, short, models: Models, vec2: dict, feat_vec: dict, inputs: dict) -> None:
    """Stage 2: SiameseRanker.score_many on the short list (batched)."""
    if not short:
        return
    import numpy as np
    import torch

    inp = [inputs[c.item_id] for c in short]
    scores = models.ranker.score_many(
        torch.stack([vec2[c.file] for c in short]),
        torch.stack([feat_vec[x.pois_text] for x in inp]),
        torch.from_numpy(np.stack([x.poi_img for x in inp])),
        torch.from_numpy(np.stack([x.poi_txt for x in inp])),
        torch.tensor([x.poi_len for x in inp]),
        batch_size=args.head_batch_size,
    )
    set_ranker_scores(short, scores.tolist())


def image_backend(args, models: Models, counts: dict) -> str:
    """The image engine that ran ("onnx"/"torch"), "none" when no image was encoded."""
    enc = counts["images_encoded"]
    if not (enc["stage1"] or enc["stage2"]):
        return "none"
    return models.recall.image_backend(args.precision)


def select_block(
    args, items: list[Item], models: Models, tables, progress: bool = False, clock: Clock | None = None
) -> dict:
    """Steps 4-6 on ``items`` (files resolved): encode, recall scores and ranks, the
    short list, stage-2 vectors, the head, final ranks. Used on the whole catalogue by
    the local path and on one shard at a time by each Ray actor. Returns the counts of
    the summary (images encoded, texts, stage-2 candidates, unknown POIs)."""
    clock = clock or Clock()
    stats1: dict = {}
    stats2: dict = {}
    with clock("stage1_images"):
        vec1 = encode_stage1(args, items, models, stats1, progress)
    with clock("texts"):
        inputs = (
            {it.item_id: item_inputs(it.title, it.poi_names, tables, models.rank_rm.embed_dim) for it in items}
            if models.ranker is not None
            else {}
        )
        title_vec, feat_vec, n_texts = encode_item_texts(args, items, models, inputs)
    with clock("head"):
        score_recall(items, vec1, title_vec)
        short = shortlist(items, args.recall_k) if models.ranker is not None else []
    with clock("stage2_images"):
        vec2, short = encode_stage2(args, short, models, vec1, stats2, progress)
    with clock("head"):
        score_head(args, short, models, vec2, feat_vec, inputs)
        for it in items:
            assign_final_ranks(it)
    return {
        "stage2_candidates": len(short),
        "distinct_images": stats1.get("distinct", 0),
        "images_encoded": {
            "stage1": stats1.get("encoded", 0),
            "stage1_cached": stats1.get("cached", 0),
            "stage2": stats2.get("encoded", 0),
            "stage2_cached": stats2.get("cached", 0),
        },
        "texts_encoded": n_texts,
        "items_with_unknown_poi": sum(bool(x.unknown) for x in inputs.values()),
        "unknown_pois": sorted({n for x in inputs.values() for n in x.unknown}),
    }


# ---------------------------------------------------------------------------
# step 7: outputs and the end-of-run summary (shared with the Ray path)
# ---------------------------------------------------------------------------
def summarize(
    args, cat: Catalogue, path: str, hashes: dict, fetch: dict, counts: dict, device: str, backend: str
) -> dict:
    items, cands = cat.items, cat.cands
    no_sel = [it.item_id for it in items if it.selected is None]
    status_counts = {
        s: sum(c.status == s for c in cands) for s in (OK, MISSING, DOWNLOAD_FAILED, UNREADABLE, DUPLICATE)
    }
    return {
        "items_csv": args.items,
        "out": args.out,
        "items": len(items),
        "candidates": len(cands),
        "bad_rows": len(cat.errors),
        "bad_row_list": [str(e) for e in cat.errors],
        "encode_path": path,
        "recall_k": args.recall_k,
        "recall_checkpoint": args.recall_checkpoint,
        "ranker_checkpoint": args.ranker_checkpoint,
        "recall_weights_sha256": hashes.get("recall"),
        "ranker_recall_copy_sha256": hashes.get("ranker_align"),
        "poi_tables": bool(args.poi_pic_num) and path != "recall-only",
        "items_selected": len(items) - len(no_sel),
        "items_without_readable_candidate": no_sel,
        "status_counts": status_counts,
        "downloads": fetch,
        "image_cache": image_cache_of(args),
        **counts,
        "device": str(device),
        "backend": backend,
        "preprocess": args.preprocess,
        "precision": args.precision,
    }


def write_html_and_summary(args, cat: Catalogue, summary: dict, timings: dict, progress: bool) -> None:
    """The HTML report (when asked) and the summary JSON, both atomically; logs the
    end-of-run lines. The output rows are written by the caller (CSV or shards)."""
    items = cat.items
    no_sel = summary["items_without_readable_candidate"]
    unknown = summary["unknown_pois"]
    if no_sel:
        shown = ", ".join(no_sel[:10]) + (" ..." if len(no_sel) > 10 else "")
        log.warning("%d items have no readable candidate and get no selection: %s", len(no_sel), shown)
    if unknown:
        log.warning(
            "%d distinct POI names are missing from a vector table (zero vectors), in %d items: %s",
            len(unknown),
            summary["items_with_unknown_poi"],
            ", ".join(repr(n) for n in unknown[:10]) + (" ..." if len(unknown) > 10 else ""),
        )
    if args.html:
        t = time.perf_counter()
        st = summary["status_counts"]
        head = {
            "items": len(items),
            "candidates": summary["candidates"],
            "selected": summary["items_selected"],
            "without readable candidate": len(no_sel),
            "encode path": summary["encode_path"],
            "recall k": args.recall_k if summary["encode_path"] != "recall-only" else "recall only",
            "unreadable/missing/failed": st[UNREADABLE] + st[MISSING] + st[DOWNLOAD_FAILED],
            "duplicates": st[DUPLICATE],
            "unknown POIs": len(unknown),
            "bad CSV rows": summary["bad_rows"],
        }
        summary["html"] = write_selection_report(
            args.html, items, head, title=f"Image selection: {args.items}", progress=progress
        )
        timings["html"] = time.perf_counter() - t
    summary["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    summary["items_per_s"] = round(len(items) / max(timings["total"], 1e-9), 3)
    write_json(summary_path(args), summary, indent=1)
    enc = summary["images_encoded"]
    log.info(
        "wrote %s: %d candidates, %d of %d items selected (%s encode path, %d images encoded "
        "for stage 1, %d for stage 2); %.1f s, %.2f items/s",
        args.out,
        summary["candidates"],
        summary["items_selected"],
        len(items),
        summary["encode_path"],
        enc["stage1"],
        enc["stage2"],
        timings["total"],
        summary["items_per_s"],
    )


class Clock:
    """``with clock("step"):`` adds the step's wall time to ``clock.timings``."""

    def __init__(self):
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t

    def total(self) -> dict:
        self.timings["total"] = time.perf_counter() - self.start
        return self.timings


# ---------------------------------------------------------------------------
# the local run
# ---------------------------------------------------------------------------
def run(args) -> dict:
    """Select images for ``args`` in this process; writes the outputs and returns the
    summary."""
    clock = Clock()
    progress = not args.no_progress and sys.stderr.isatty()
    device = resolve_device(args.device)
    with clock("read"):
        cat = read_items(args)
    with clock("load_models"):
        models = load_models(args, device)
        tables = load_tables(args, models)
    with clock("resolve"):
        fetch = resolve(args, cat.items, progress)
    counts = select_block(args, cat.items, models, tables, progress, clock)
    with clock("write"):
        write_output(args.out, cat.items)
    summary = summarize(
        args, cat, models.path, models.hashes, fetch, counts, device, image_backend(args, models, counts)
    )
    write_html_and_summary(args, cat, summary, clock.total(), progress)
    return summary


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    check_args(args)
    if args.ray is not None:
        import select_ray  # Ray is imported only here: the local path never loads it

        select_ray.run(args, pipeline_steps())
    else:
        run(args)
    return 0


def pipeline_steps():
    """This module under its importable name: select_ray runs these steps, and Ray's
    workers find them by that name (not as ``__main__``)."""
    import importlib

    return importlib.import_module("select_images") if __name__ == "__main__" else sys.modules[__name__]


if __name__ == "__main__":
    sys.exit(main())
