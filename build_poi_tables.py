#!/usr/bin/env python
"""Rebuild the ranker's two POI vector tables from a recall model, for your own POIs.

    python build_poi_tables.py --csv my_pois.csv --image-dir my_poi_images \\
        --checkpoint data/align_model.pth --bert-dir data/bert-base-chinese \\
        --out-image-vectors my_poi_img.npz --out-name-vectors my_poi_name.npz

Input: a recall-format CSV (no header: ``poi_id, poi_name, image_url, rank_number,
width, height, extend``; download_images.py fetches its images as
``<poi_id>_<rank_number>.<ext>``) and the images directory.

Output (keyed by POI name, as rank_eval.py looks them up):

- name vectors: ``encode_text(poi_name)``, L2-normalised (512-d for the released model);
- mean image vectors: the mean of the POI's normalised image vectors, then
  L2-normalised again. This is the "normalised variant" SPEC section 5 names as the
  default table (``..._imgs_avg10_vector.npy``: about 10 images a POI).
  ``--no-normalize-mean`` keeps the plain mean of the normalised vectors (its norm is
  below 1 and shrinks as the POI's images disagree).

POIs that share a name (the recall set has four such names) are pooled: the name's
vector is the mean over all their images. Images that are missing or unreadable are
left out of the mean (not averaged in as the zero image); a POI without any readable
image gets no image vector and is listed. Names are the CSV field stripped of spaces;
rank_eval.py looks vectors up by the unstripped name of the item's POI list, as the
authors did, so ``"a, b"`` finds ``"a"`` but not ``"b"``.

The checkpoint may be the recall model (``align_model.pth``) or a ranker checkpoint
(its recall-model copy is used). The tables are written in the safe ``.npz`` format
(utils/poi.py); ``--also-npy`` writes the authors' pickled-dict ``.npy`` beside
each (same name, ``.npy`` suffix).

Exit status: 0 on success, 2 for bad arguments or unusable input, 130 on Ctrl-C.
"""

from __future__ import annotations

from utils.cli import (
    DECODE_WORKERS_HELP,
    DataError,
    add_common_args,
    entry_point,
    input_dir,
    input_file,
    non_negative_int,
    output_dir,
    output_file,
    positive_int,
    resolve_device,
    setup_logging,
)

import argparse
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

from utils.args import Encoding
from utils.formats import PoiTableError, index_images, iter_recall_csv, save_pickled_table, save_safe_table

log = logging.getLogger("build_poi_tables")


def build_parser() -> argparse.ArgumentParser:
    from models import BACKENDS, PRECISIONS
    from utils.formats import PREPROCESS_MODES

    p = argparse.ArgumentParser(
        prog="build_poi_tables.py",
        description="Build the POI name-vector and mean-image-vector tables of the ranker "
        "from a recall model, a recall-format CSV and its images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--csv", required=True, help="recall-format CSV: poi_id,poi_name,image_url,rank_number,...")
    p.add_argument("--image-dir", required=True, help="images named <poi_id>_<rank_number>.<ext>")
    p.add_argument("--checkpoint", required=True, help="recall checkpoint (or a ranker checkpoint)")
    p.add_argument("--bert-dir", required=True, help="directory with bert-base-chinese config.json and vocab.txt")
    p.add_argument("--arch", default=None, help="architecture JSON for a small variant")
    p.add_argument("--out-image-vectors", required=True, help="mean image vector table to write (.npz)")
    p.add_argument("--out-name-vectors", required=True, help="name vector table to write (.npz)")
    p.add_argument(
        "--no-normalize-mean",
        action="store_true",
        help="keep the plain mean of the normalised image vectors instead of "
        "L2-normalising it (the default table is normalised)",
    )
    p.add_argument(
        "--also-npy", action="store_true", help="also write the authors' pickled-dict .npy format beside each .npz"
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="image engine: auto = ONNX Runtime on a CPU when installed and it agrees "
        "with torch on this model (checked on load), else torch",
    )
    p.add_argument("--preprocess", choices=PREPROCESS_MODES, default="reference")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per batch (default: device's)")
    p.add_argument("--text-batch-size", type=positive_int, help="texts per batch (default: 16 on a CPU, 256 on CUDA)")
    p.add_argument("--num-workers", type=non_negative_int, default=None, help=DECODE_WORKERS_HELP)
    p.add_argument("--cache-dir", default=None, help="embedding cache directory (utils/cache.py)")
    add_common_args(p)
    return p


def output_paths(args) -> list[tuple[str, Path]]:
    """``(option, path)`` of every file the run writes; names and locations checked."""
    outs = []
    for opt, path in (("--out-image-vectors", args.out_image_vectors), ("--out-name-vectors", args.out_name_vectors)):
        if not path.lower().endswith(".npz"):
            raise PoiTableError(f"{opt} {path}: must end in .npz (the safe format)")
        outs.append((opt, Path(path)))
        if args.also_npy:
            outs.append((f"{opt} (.npy copy)", Path(path).with_suffix(".npy")))
    if len({p.resolve() for _, p in outs}) != len(outs):
        raise PoiTableError("--out-image-vectors and --out-name-vectors name the same file")
    return outs


def check_paths(args) -> None:
    """Inputs readable, outputs writable: before any work."""
    for opt, path in output_paths(args):
        output_file(path, opt)
    input_file(args.csv, "--csv")
    input_dir(args.image_dir, "--image-dir")
    input_file(args.checkpoint, "--checkpoint")
    input_dir(args.bert_dir, "--bert-dir")
    if args.arch:
        input_file(args.arch, "--arch")
    if args.cache_dir:
        output_dir(args.cache_dir, "--cache-dir")


def read_rows(path: str) -> list:
    errors: list = []
    rows = list(iter_recall_csv(path, errors))
    for e in errors[:20]:
        log.warning("bad row left out: %s", e)
    if len(errors) > 20:
        log.warning("... and %d more bad rows", len(errors) - 20)
    if not rows:
        raise DataError(f"{path}: no usable recall-format rows")
    return rows


def group_images(rows, images: dict, csv_path: str):
    """``(names, files, groups, missing)``: the distinct POI names, the image files found,
    ``name -> indices into files`` (POIs sharing a name pooled), missing-image count."""
    names = list(dict.fromkeys(r.poi_name for r in rows if r.poi_name))
    ids_of: dict[str, set] = defaultdict(set)
    files: list[str] = []
    groups: dict[str, list[int]] = defaultdict(list)
    missing = 0
    for r in rows:
        if not r.poi_name:
            continue
        ids_of[r.poi_name].add(r.poi_id)
        p = images.get(r.key)
        if p is None:
            missing += 1
            continue
        groups[r.poi_name].append(len(files))
        files.append(str(p))
    shared = [n for n, ids in ids_of.items() if len(ids) > 1]
    log.info(
        "%s: %d rows, %d POI names (%d shared by several poi_ids, pooled), %d images found, %d missing",
        csv_path,
        len(rows),
        len(names),
        len(shared),
        len(files),
        missing,
    )
    return names, files, groups, missing


def mean_vectors(groups: dict[str, list[int]], vectors, ok, normalize: bool = True):
    """``name -> mean of its readable image vectors`` (re-normalised when asked) and the
    names left without any readable image."""
    import numpy as np

    out, empty = {}, []
    for name, idx in groups.items():
        good = [i for i in idx if ok[i]]
        if not good:
            empty.append(name)
            continue
        m = vectors[good].astype(np.float64).mean(axis=0)
        if normalize:
            m = m / max(np.linalg.norm(m), 1e-12)
        out[name] = m.astype(np.float32)
    return out, empty


def encode_images(rm, files, enc):
    vecs, ok = rm.encode_images(files, enc, desc="POI images")
    return vecs.numpy(), ok.numpy().astype(bool)


def write_tables(tables, args) -> None:
    for table, path in tables:
        save_safe_table(table, path, kind="vectors", source=args.csv)
        log.info("wrote %s (%d POIs)", path, len(table))
        if args.also_npy:
            npy = Path(path).with_suffix(".npy")
            save_pickled_table(table, npy)
            log.info("wrote %s (pickled-dict format)", npy)


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    check_paths(args)
    progress = not args.no_progress and sys.stderr.isatty()
    t0 = time.perf_counter()

    rows = read_rows(args.csv)
    images = index_images(args.image_dir)
    from models import build_recall_model

    rm = build_recall_model(
        "align",
        checkpoint=args.checkpoint,
        bert_dir=args.bert_dir,
        arch=args.arch,
        device=resolve_device(args.device),
        backend=args.backend,
    )
    names, files, groups, missing = group_images(rows, images, args.csv)

    enc = Encoding.from_args(args, progress=progress)
    vecs, ok = encode_images(rm, files, enc)
    img_table, empty = mean_vectors(groups, vecs, ok, normalize=not args.no_normalize_mean)
    empty += [n for n in names if n not in groups]
    if empty:
        log.warning(
            "%d POI names have no readable image and get no image vector: %s",
            len(empty),
            ", ".join(repr(n) for n in empty[:10]) + (" ..." if len(empty) > 10 else ""),
        )
    txt = rm.encode_texts(names, enc).numpy()
    name_table = {n: txt[i] for i, n in enumerate(names)}

    write_tables(((img_table, args.out_image_vectors), (name_table, args.out_name_vectors)), args)
    print(
        f"build_poi_tables: {len(img_table)} image vectors "
        f"({'plain mean' if args.no_normalize_mean else 'normalised mean'}) -> {args.out_image_vectors}; "
        f"{len(name_table)} name vectors -> {args.out_name_vectors}; "
        f"{int((~ok).sum())} unreadable and {missing} missing images left out; "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
