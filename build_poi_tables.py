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
(utils/poi_tables.py); ``--also-npy`` writes the authors' pickled-dict ``.npy`` beside
each (same name, ``.npy`` suffix).

Exit status: 0 on success, 2 for bad arguments or unusable input.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from models.align import load_tokenizer
from models.checkpoint import CheckpointError, load_align_model
from utils.cache import EmbeddingCache
from utils.cli import setup_logging
from utils.data import DataError, index_images, iter_recall_csv
from utils.cli import DEVICE_CHOICES, resolve_device
from utils.embed import PRECISIONS, encode_images, encode_texts
from utils.images import PREPROCESS_MODES
from utils.poi import PoiTableError, save_pickled_table, save_safe_table

log = logging.getLogger("build_poi_tables")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_poi_tables.py",
        description="Build the POI name-vector and mean-image-vector tables of the ranker "
                    "from a recall model, a recall-format CSV and its images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--csv", required=True, help="recall-format CSV: poi_id,poi_name,image_url,rank_number,...")
    p.add_argument("--image-dir", required=True, help="images named <poi_id>_<rank_number>.<ext>")
    p.add_argument("--checkpoint", required=True, help="recall checkpoint (or a ranker checkpoint)")
    p.add_argument("--bert-dir", required=True, help="directory with bert-base-chinese config.json and vocab.txt")
    p.add_argument("--arch", default=None, help="architecture JSON for a small variant")
    p.add_argument("--out-image-vectors", required=True, help="mean image vector table to write (.npz)")
    p.add_argument("--out-name-vectors", required=True, help="name vector table to write (.npz)")
    p.add_argument("--no-normalize-mean", action="store_true",
                   help="keep the plain mean of the normalised image vectors instead of "
                        "L2-normalising it (the default table is normalised)")
    p.add_argument("--also-npy", action="store_true",
                   help="also write the authors' pickled-dict .npy format beside each .npz")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("--preprocess", choices=PREPROCESS_MODES, default="reference")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: device's)")
    p.add_argument("--text-batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=None, help="image decoding workers (default: cores)")
    p.add_argument("--cache-dir", default=None, help="embedding cache directory (utils/cache.py)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def mean_vectors(groups: dict[str, list[int]], vectors: np.ndarray, ok: np.ndarray,
                 normalize: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
    """``name -> mean of its readable image vectors`` (re-normalised when asked) and the
    names left without any readable image."""
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


def _check_out(path: str, opt: str) -> None:
    if not path.lower().endswith(".npz"):
        raise PoiTableError(f"{opt} {path}: must end in .npz (the safe format)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    device = resolve_device(args.device)
    progress = not args.quiet and sys.stderr.isatty()
    t0 = time.perf_counter()
    try:
        _check_out(args.out_image_vectors, "--out-image-vectors")
        _check_out(args.out_name_vectors, "--out-name-vectors")
        errors: list = []
        rows = list(iter_recall_csv(args.csv, errors))
        for e in errors[:20]:
            log.warning("bad row left out: %s", e)
        if not rows:
            raise DataError(f"{args.csv}: no usable recall-format rows")
        images = index_images(args.image_dir)
        model = load_align_model(args.checkpoint, args.bert_dir, arch=args.arch, device=device)
        tokenizer = load_tokenizer(args.bert_dir)
    except (DataError, PoiTableError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"build_poi_tables: error: {e}", file=sys.stderr)
        return 2

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
    log.info("%s: %d rows, %d POI names (%d shared by several poi_ids, pooled), %d images found, "
             "%d missing", args.csv, len(rows), len(names), len(shared), len(files), missing)

    cache = EmbeddingCache.for_model(args.cache_dir, model) if args.cache_dir else None
    vecs, ok = encode_images(model, files, args.batch_size, device, mode=args.preprocess,
                             num_workers=args.num_workers, precision=args.precision, cache=cache,
                             progress=progress, desc="POI images")
    if cache is not None:
        cache.close()
    ok = ok.numpy().astype(bool)
    img_table, empty = mean_vectors(groups, vecs.numpy(), ok, normalize=not args.no_normalize_mean)
    empty += [n for n in names if n not in groups]
    if empty:
        log.warning("%d POI names have no readable image and get no image vector: %s", len(empty),
                    ", ".join(repr(n) for n in empty[:10]) + (" ..." if len(empty) > 10 else ""))

    txt = encode_texts(model, tokenizer, names, args.text_batch_size, device,
                       precision=args.precision, progress=progress).numpy()
    name_table = {n: txt[i].astype(np.float32) for i, n in enumerate(names)}

    for table, path in ((img_table, args.out_image_vectors), (name_table, args.out_name_vectors)):
        save_safe_table(table, path, kind="vectors", source=args.csv)
        log.info("wrote %s (%d POIs)", path, len(table))
        if args.also_npy:
            npy = Path(path).with_suffix(".npy")
            save_pickled_table(table, npy)
            log.info("wrote %s (pickled-dict format)", npy)
    print(f"build_poi_tables: {len(img_table)} image vectors "
          f"({'plain mean' if args.no_normalize_mean else 'normalised mean'}) -> {args.out_image_vectors}; "
          f"{len(name_table)} name vectors -> {args.out_name_vectors}; "
          f"{int((~ok).sum())} unreadable and {missing} missing images left out; "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
