#!/usr/bin/env python
"""Stage 1 inference: score every POI name against every gallery image (SPEC section 4).

    python recall_infer.py --csv data/temp_recall_biztype0_fc5_imagern_500.csv \\
        --image-dir data/recall_images --checkpoint align_model.pth \\
        --bert-dir data/bert-base-chinese --output results/recall_top10.csv

    # the paper's baseline, Taiyi-CLIP with the authors' fine-tuned text encoder
    python recall_infer.py --model taiyi --csv data/temp_recall_biztype0_fc5_imagern_500.csv \\
        --image-dir data/recall_images --taiyi-text-dir assets/taiyi-clip-roberta-102m-chinese \\
        --taiyi-text-weights assets/weights/taiyi_text_finetuned.bin \\
        --clip-dir assets/clip-vit-base-patch32 --output results/taiyi_top10.csv

The pipeline (``main``): check paths -> read the CSV and find the gallery
(``read_gallery``) -> start decoding the gallery (``start_decoding``) -> load the model
(``load_model``) -> encode the images (``encode_gallery``) and the POI names (``encode_queries``) -> cosine scores and the
stable top-k (``score``) -> write (``write_outputs``).

Models (--model, models/factory.py): ``align`` (default, the paper's model: --checkpoint,
--bert-dir) or ``taiyi`` (the Taiyi-CLIP baseline: --taiyi-text-dir, --clip-dir, optional
--taiyi-text-weights). Each brings its own tokenizer and image preprocessing (align: the
reference squash to 224 with ImageNet mean/std; taiyi: CLIP's shortest side to 224,
bicubic, centre crop, CLIP mean/std); outputs, cache and evaluation are the same for all.

Gallery: one image per CSV row, found in --image-dir as ``<poi_id>_<rank>.<ext>``
(any image extension; ``utils.data.index_images``), kept in CSV order. Queries: every
distinct poi_id with its name (each distinct name is encoded once).

Missing and unreadable images (the count is logged and each one is listed in
--missing-list, default ``<output>.missing.tsv``):
  * missing on disk (no file for the row): NOT in the gallery, by default and always,
    since the authors' gallery held only the files they had downloaded;
  * present but unreadable: by default kept as the all-zero image, as the authors'
    scripts did (SPEC 3), so the figure stays comparable; --skip-missing drops them.

Outputs (formats in utils/data.py; each written atomically):
  --output       top --topk images per POI, CSV with a header:
                 ``poi_id,poi_name,rank,image,score`` (image = file name in --image-dir);
  --full-output  optional, the authors' format: one row per (POI, image), no header,
                 ``poi_id,poi_name,image_path,score`` (500 x 5000 rows for the real set);
  --save-embeddings FILE.npz  optional, the image vectors (keyed by file name) and the
                 POI name vectors (keyed by poi_id, with the name): ``recall_eval.py
                 --embeddings FILE.npz`` computes recall@K/MRR from it, as from --full-output;
  ``<output>.meta.json``  what was run: gallery size, top-k, counts, the image engine
                 actually used, timings (``first_image``: seconds from start-up to the
                 first image batch encoded), hashes.
Scores are cosines of the normalised vectors (``logit_scale`` is not applied: it does not
change any ranking). Ranking uses a stable descending sort (``utils.metrics.stable_topk``),
so ties keep gallery order, as in the authors' evaluator. Evaluate with recall_eval.py.

Image engine (--backend, utils/onnx_backend.py): ``auto`` (default) runs the image tower
on ONNX Runtime on a CPU in fp32 when it is installed and agrees with torch on this model
(max |diff| of the vectors <= 1e-5, checked on every run; otherwise a warning and torch),
torch on a GPU or in bf16/fp16; ``torch`` and ``onnx`` force one. The export is made once
per weights into ``<--cache-dir>/onnx`` (or ``$AVAS_ONNX_CACHE``, else
``~/.cache/avas/onnx``) and reused. Because the vectors agree to 1e-5, the engines share
the embedding cache and give the same rankings up to ties closer than 1e-5.

Speed: the first images are decoded by worker processes while the model loads (without
--cache-dir, whose hits decide what to decode); then ONNX Runtime runs in one lane per
core, each lane decoding a batch and encoding it (utils.embed; torch keeps every core for
its threads beside decoding workers); texts in batches; --precision bf16/fp16 moves scores and
is faster only with native support (GPU, AVX-512 BF16 / AMX CPUs). --cache-dir keeps
image vectors (keyed by file content, ``RecallModel.identity()`` = model name + weights
hash, preprocessing and precision) so a rerun encodes only new images. Figures:
bench/bench_recall.py and the README.

Exit status: 0 on success, 2 for bad input (CSV, checkpoint, directories, output
locations), reported as one line before any encoding starts.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # start-up is measured from here (meta timings_s.first_image)

from utils.cli import DataError

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

from models import (  # noqa: E402  # noqa: E402
    BACKENDS,  # noqa: E402
    MODELS,
    PRECISIONS,
    ImagePrefetch,
    RecallModel,  # noqa: E402
    build_recall_model,
    missing_options,
    prefetch_images,
)
from utils import cli  # noqa: E402
from utils.args import Encoding  # noqa: E402
from utils.evaluation import stable_topk  # noqa: E402
from utils.formats import (
    PREPROCESS_MODES,  # noqa: E402
    TOPK_HEADER,
    RecallRow,
    index_images,
    iter_recall_csv,
    poi_of_image,
    save_embeddings,
    write_full,
    write_missing_list,
    write_topk,
)
from utils.io import write_json

log = logging.getLogger("recall_infer")
__all__ = ["main", "TOPK_HEADER"]  # TOPK_HEADER lives in utils.data (writer and reader share it)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", required=True, help="recall-format CSV (poi_id,poi_name,image_url,rank,...)")
    p.add_argument("--image-dir", required=True, help="directory of <poi_id>_<rank>.<ext> images")
    p.add_argument("--output", required=True, help="top-k CSV to write (with header)")
    p.add_argument("--full-output", help="also write every (POI, image) score in the authors' format")
    p.add_argument(
        "--save-embeddings",
        metavar="FILE.npz",
        help="also save the image and text vectors with their keys (image file names; "
        "poi ids and names): recall_eval.py --embeddings scores them",
    )
    p.add_argument("--topk", type=cli.positive_int, default=10, help="images kept per POI in --output (default 10)")
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="drop unreadable images from the gallery instead of scoring them as the "
        "zero image (images missing on disk are always left out)",
    )
    p.add_argument(
        "--missing-list",
        help="where to list missing/unreadable images (default <output>.missing.tsv, written only when there are some)",
    )
    p.add_argument(
        "--preprocess",
        choices=PREPROCESS_MODES,
        default="reference",
        help="reference = the authors' exact path (default); fast = JPEG draft decoding",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default, exact); bf16/fp16 autocast: faster on GPUs and CPUs with "
        "AVX-512 BF16/AMX (emulated, far slower, on AVX2-only CPUs); scores move ~1e-2",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="image engine: auto (default) = ONNX Runtime on a CPU when it is installed and "
        "agrees with torch on this model (checked on every run), else torch; torch; "
        "onnx (CPU, fp32)",
    )
    p.add_argument(
        "--batch-size",
        type=cli.positive_int,
        help="images per batch (default: 4 per lane with ONNX Runtime on a CPU, 32 with torch, 128 on CUDA)",
    )
    p.add_argument(
        "--text-batch-size", type=cli.positive_int, help="texts per batch (default: 16 on a CPU, 256 on CUDA)"
    )
    p.add_argument("--num-workers", type=cli.non_negative_int, help=cli.DECODE_WORKERS_HELP)
    p.add_argument(
        "--cache-dir",
        help="embedding cache directory (reruns encode only new images; the ONNX export is kept in its onnx/ folder)",
    )
    cli.add_common_args(p)
    g = p.add_argument_group("model (--model NAME and its files)")
    g.add_argument(
        "--model",
        choices=list(MODELS),
        default="align",
        help="recall model: " + "; ".join(f"{k} = {e.help}" for k, e in MODELS.items()) + " (default align)",
    )
    for entry in MODELS.values():
        for name, help_text in entry.options.items():
            g.add_argument("--" + name.replace("_", "-"), help=help_text)
    args = p.parse_args(argv)
    missing = missing_options(args.model, model_paths(args))
    if missing:
        p.error(f"--model {args.model} needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return args


def model_paths(args) -> dict:
    """The path options of the chosen ``--model`` (models.factory.MODELS)."""
    return {k: getattr(args, k) for k in MODELS[args.model].options}


def missing_list_path(args) -> str:
    return args.missing_list or f"{args.output}.missing.tsv"


# ---------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------
def check_paths(args) -> None:
    """Inputs readable and outputs writable, before anything expensive (issue 14)."""
    cli.input_file(args.csv, "--csv")
    cli.input_dir(args.image_dir, "--image-dir")
    for name, value in model_paths(args).items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        (cli.input_dir if name.endswith("_dir") else cli.input_file)(value, flag)
    outputs = {
        "--output": args.output,
        "--full-output": args.full_output,
        "--missing-list": missing_list_path(args),
        "--save-embeddings": args.save_embeddings,
        "meta": f"{args.output}.meta.json",
    }
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        cli.output_file(path, flag if flag != "meta" else None)
        real = os.path.realpath(path)
        if real in seen:
            raise cli.UserError(f"{flag} {path}: the same file as {seen[real]}")
        seen[real] = flag
    for flag, path in {"--csv": args.csv}.items():
        if os.path.realpath(path) in seen:
            raise cli.UserError(f"{seen[os.path.realpath(path)]} {path}: would overwrite {flag}")
    if args.cache_dir:
        cli.output_dir(args.cache_dir, "--cache-dir")


@dataclass
class Gallery:
    """What the CSV asks for: the gallery images found on disk (CSV order), the rows
    without a file, repeated rows, and the queries (poi_id -> first name)."""

    rows: list[RecallRow]
    images: list[tuple[RecallRow, object]] = field(default_factory=list)  # (row, path)
    missing: list[RecallRow] = field(default_factory=list)
    duplicates: list[RecallRow] = field(default_factory=list)
    queries: dict[str, str] = field(default_factory=dict)
    unreadable: list[tuple[RecallRow, object]] = field(default_factory=list)


def read_gallery(csv_path: str, image_dir: str) -> Gallery:
    """Rows of the CSV -> gallery images found in ``image_dir`` and queries."""
    errors: list = []
    rows = list(iter_recall_csv(csv_path, errors))
    if errors:
        for e in errors[:10]:
            log.error("%s", e)
        raise DataError(f"{csv_path}: {len(errors)} bad rows (first: {errors[0]})")
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    g = Gallery(rows)
    index = index_images(image_dir)
    seen = set()
    for row in rows:
        if row.key in seen:
            g.duplicates.append(row)
            continue
        seen.add(row.key)
        path = index.get(row.key)
        if path is None:
            g.missing.append(row)
        else:
            g.images.append((row, path))
        if row.poi_id in g.queries and g.queries[row.poi_id] != row.poi_name:
            log.warning(
                "%s line %d: poi_id %s has a second name %r; using the first, %r",
                csv_path,
                row.line,
                row.poi_id,
                row.poi_name,
                g.queries[row.poi_id],
            )
        g.queries.setdefault(row.poi_id, row.poi_name)
    if g.duplicates:
        log.warning(
            "%d CSV rows repeat an earlier <poi_id>_<rank> (first: line %d, %s); each image is scored once",
            len(g.duplicates),
            g.duplicates[0].line,
            g.duplicates[0].key,
        )
    log.info(
        "%s: %d rows, %d POIs, %d distinct names; %d images found in %s, %d missing on disk",
        csv_path,
        len(rows),
        len(g.queries),
        len(set(g.queries.values())),
        len(g.images),
        image_dir,
        len(g.missing),
    )
    if not g.images:
        raise DataError(
            f"{image_dir}: none of the {len(rows)} images of {csv_path} is there (expected "
            f"files named <poi_id>_<rank>.<ext>, e.g. {rows[0].key}.jpg)"
        )
    return g


def start_decoding(args, g: Gallery, device) -> ImagePrefetch | None:
    """Decoding workers started on the gallery now, with the model's own preprocessing,
    so decoding overlaps the model load (utils.embed.prefetch_images); None with
    --cache-dir (the cache decides what is decoded once the model's identity is known)."""
    if args.cache_dir:
        return None
    return prefetch_images(
        [p for _, p in g.images],
        args.batch_size,
        device,
        args.preprocess,
        args.num_workers,
        image_loader=MODELS[args.model].image_loader,
        backend=args.backend,
        precision=args.precision,
    )


def load_model(args, device) -> RecallModel:
    onnx_dir = os.path.join(args.cache_dir, "onnx") if args.cache_dir else None
    rm = build_recall_model(
        args.model, device=device, backend=args.backend, onnx_cache_dir=onnx_dir, **model_paths(args)
    )
    log.info("model %s (%s) loaded on %s", rm.name, ", ".join(f"{k}={v}" for k, v in rm.sources.items() if v), device)
    return rm


def encode_gallery(
    rm: RecallModel, g: Gallery, args, stats: dict, prefetch: ImagePrefetch | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image vectors of the gallery (N x D) and the ok flags; the embedding cache (keyed
    by ``rm.identity()``) serves what it holds; the engine (``--backend``: auto resolved,
    the ONNX export loaded and checked) is set up only if something is left to encode."""
    return rm.encode_images(
        [p for _, p in g.images], Encoding.from_args(args), stats=stats, desc="gallery", prefetch=prefetch
    )


def apply_unreadable_policy(g: Gallery, emb: torch.Tensor, ok: torch.Tensor, skip: bool) -> torch.Tensor:
    """Unreadable images stay as the zero image (reference) or are dropped (--skip-missing)."""
    g.unreadable = [(row, p) for (row, p), good in zip(g.images, ok.tolist()) if not good]
    if skip and g.unreadable:
        keep = ok.nonzero().flatten()
        g.images = [g.images[i] for i in keep.tolist()]
        emb = emb[keep]
        log.info("--skip-missing: %d unreadable images dropped from the gallery", len(g.unreadable))
    elif g.unreadable:
        log.warning(
            "%d unreadable images are scored as the zero image (reference behaviour; --skip-missing drops them)",
            len(g.unreadable),
        )
    if not g.images:
        raise DataError("no readable image left in the gallery")
    return emb


def encode_queries(rm: RecallModel, g: Gallery, args) -> torch.Tensor:
    return rm.encode_texts(list(g.queries.values()), Encoding.from_args(args, progress=False))


def score(txt_emb: torch.Tensor, img_emb: torch.Tensor, topk: int, device):
    """Cosines (Q x N, on the CPU) and each row's top ``topk`` by the stable sort."""
    with torch.inference_mode():
        scores = (txt_emb.to(device) @ img_emb.to(device).t()).float()
        top_vals, top_idx = stable_topk(scores, min(topk, scores.shape[1]))
    return scores.cpu(), top_vals.cpu(), top_idx.cpu()


def write_outputs(args, g: Gallery, img_emb, ok, txt_emb, scores, top_vals, top_idx, meta: dict) -> None:
    qids, qnames = list(g.queries), list(g.queries.values())
    names = [p.name for _, p in g.images]
    write_topk(
        args.output,
        (
            (q, n, r, names[j], s)
            for q, n, vals, idx in zip(qids, qnames, top_vals.tolist(), top_idx.tolist())
            for r, (s, j) in enumerate(zip(vals, idx), 1)
        ),
    )
    log.info("wrote %s: top %d of %d images for %d POIs", args.output, top_idx.shape[1], len(names), len(qids))
    if args.full_output:
        write_full(args.full_output, qids, qnames, [str(p) for _, p in g.images], scores.numpy())
        log.info("wrote %s: %d rows (authors' format)", args.full_output, len(qids) * len(names))
    if args.save_embeddings:
        save_embeddings(
            args.save_embeddings,
            image_emb=img_emb.numpy(),
            image_names=names,
            image_ok=ok.numpy(),
            text_emb=txt_emb.numpy(),
            poi_ids=qids,
            poi_names=qnames,
            meta={
                k: meta[k]
                for k in ("csv", "image_dir", "model", "model_identity", "preprocess", "precision", "unreadable_policy")
            },
        )
        log.info("wrote %s: %d image and %d text vectors", args.save_embeddings, len(names), len(qids))
    if g.missing or g.unreadable:
        listing = missing_list_path(args)
        write_missing_list(listing, g.missing, g.unreadable)
        log.warning(
            "%d images missing on disk (left out), %d unreadable (%s); listed in %s",
            len(g.missing),
            len(g.unreadable),
            "dropped" if args.skip_missing else "zero image",
            listing,
        )
    write_json(f"{args.output}.meta.json", meta, indent=1)


def run_record(args, rm: RecallModel, g: Gallery, stats: dict, timings: dict, k: int) -> dict:
    """What was run (``<output>.meta.json``): inputs, model, engine, counts, timings."""
    own = {poi_of_image(p.name) for _, p in g.images}
    engine = rm.engine_info(args.precision)
    return {
        "csv": args.csv,
        "image_dir": args.image_dir,
        "checkpoint": args.checkpoint,
        "model": rm.name,
        "model_sources": rm.sources,
        "model_identity": rm.identity(),
        "weights_sha256": rm.weights_hash(),
        "preprocess": args.preprocess,
        "precision": args.precision,
        "device": str(rm.device),
        **engine,
        "onnx_max_abs_diff": engine.get("onnx_max_abs_diff"),
        "batch_size": stats.get("batch_size"),
        "num_workers": stats.get("num_workers"),
        "lanes": stats.get("lanes"),
        "topk": k,
        "gallery_size": len(g.images),
        "n_pois": len(g.queries),
        "n_pois_without_gallery_image": sum(q not in own for q in g.queries),
        "rows": len(g.rows),
        "missing_on_disk": len(g.missing),
        "unreadable": len(g.unreadable),
        "unreadable_policy": "dropped" if args.skip_missing else "zero image",
        "duplicate_rows": len(g.duplicates),
        "images_encoded": stats["encoded"],
        "images_cached": stats["cached"],
        "timings_s": {
            **{k_: round(v, 3) for k_, v in timings.items()},
            **({"engine_setup": engine["onnx_setup_s"]} if "onnx_setup_s" in engine else {}),
        },
        "images_per_s": round(stats["encoded"] / max(timings["images"], 1e-9), 2),
        "full_output": args.full_output,
        "embeddings": args.save_embeddings,
    }


@cli.entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args.log_level)
    check_paths(args)
    device = cli.resolve_device(args.device)
    timings: dict[str, float] = {}

    def step(name, t):
        timings[name] = time.perf_counter() - t
        return time.perf_counter()

    t = time.perf_counter()
    g = read_gallery(args.csv, args.image_dir)
    t = step("read", t)
    prefetch = start_decoding(args, g, device)
    try:
        rm = load_model(args, device)
        t = step("load_model", t)
        stats: dict = {}
        img_emb, ok = encode_gallery(rm, g, args, stats, prefetch)
    finally:
        if prefetch is not None:
            prefetch.close()
    t = step("images", t)
    if stats.get("first_batch_at"):
        timings["first_image"] = stats["first_batch_at"] - _T0
    img_emb = apply_unreadable_policy(g, img_emb, ok, args.skip_missing)
    ok = ok[ok] if args.skip_missing else ok
    txt_emb = encode_queries(rm, g, args)
    t = step("texts", t)
    scores, top_vals, top_idx = score(txt_emb, img_emb, args.topk, device)
    t = step("scores", t)
    timings["total"] = time.perf_counter() - _T0
    meta = run_record(args, rm, g, stats, timings, top_idx.shape[1])
    write_outputs(args, g, img_emb, ok, txt_emb, scores, top_vals, top_idx, meta)
    log.info(
        "done in %.1f s since start-up (first image encoded at %.1f s; images %.1f s, %d encoded / "
        "%d cached; engine %s)",
        time.perf_counter() - _T0,
        timings.get("first_image", float("nan")),
        timings["images"],
        stats["encoded"],
        stats["cached"],
        meta["image_backend"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
