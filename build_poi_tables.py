#!/usr/bin/env python
"""Build the ranker's two POI vector tables from a recall model, for your own POIs.

    python build_poi_tables.py --csv my_pois.csv --image-dir my_poi_images \\
        --checkpoint assets/weights/align_model.pth --bert-dir assets/bert-base-chinese \\
        --out-image-vectors my_poi_img.npz --out-name-vectors my_poi_name.npz

Per POI name (POIs sharing one are pooled): its text vector, and the mean of its readable
images' vectors, L2-normalised again. Exit status: 0 done, 2 bad input, 130 on Ctrl-C.
"""

from __future__ import annotations

from utils.cli import check_files, entry_point, resolve_device, setup_logging

import argparse
import sys
import time
from pathlib import Path

from utils import args
from utils.formats import SAFE_SUFFIX, index_images, poi_vector_tables, read_recall_rows, save_tables, table_output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build_poi_tables.py", description=__doc__.splitlines()[0])
    p.add_argument("--csv", required=True, help="recall-format CSV: poi_id,poi_name,image_url,rank_number,...")
    p.add_argument("--image-dir", required=True, help="images named <poi_id>_<rank_number>.<ext>")
    p.add_argument("--out-image-vectors", required=True, help="mean image vector table to write (.npz)")
    p.add_argument("--out-name-vectors", required=True, help="name vector table to write (.npz)")
    p.add_argument("--no-normalize-mean", action="store_true", help="keep the plain mean, not L2-normalised again")
    p.add_argument("--also-npy", action="store_true", help="also write the authors' pickled-dict .npy beside each")
    for add in (args.add_recall_files, args.add_engine, args.add_batches, args.add_cache, args.add_bad_rows):
        add(p)
    args.add_run(p)
    return p


@entry_point
def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    setup_logging(ns.log_level)
    # paths checked before any work; the outputs in the order of their tables: image, name, their .npy copies
    outputs = {"--out-image-vectors": ns.out_image_vectors, "--out-name-vectors": ns.out_name_vectors}
    for flag, path in list(outputs.items()):
        table_output(path, flag, suffixes=(SAFE_SUFFIX,))
        if ns.also_npy:
            outputs[f"{flag} (.npy copy)"] = table_output(Path(path).with_suffix(".npy"), f"{flag} (.npy copy)")
    files = {"--csv": ns.csv, "--checkpoint": ns.checkpoint, "--arch": ns.arch}
    check_files(files, {"--image-dir": ns.image_dir, "--bert-dir": ns.bert_dir}, outputs, {"--cache-dir": ns.cache_dir})
    t0 = time.perf_counter()
    rows, bad = read_recall_rows(ns.csv, skip_bad_rows=ns.skip_bad_rows)
    images = index_images(ns.image_dir)
    from models import build_recall_model

    onnx = Path(ns.cache_dir, "onnx") if ns.cache_dir else None  # as --cache-dir's help says
    paths = {"checkpoint": ns.checkpoint, "bert_dir": ns.bert_dir, "arch": ns.arch}
    rm = build_recall_model("align", device=resolve_device(ns.device), backend=ns.backend, onnx_cache_dir=onnx, **paths)
    enc = args.Encoding.from_args(ns, progress=not ns.no_progress and sys.stderr.isatty())
    img_table, name_table, summary = poi_vector_tables(rm, enc, rows, images, normalize=not ns.no_normalize_mean)
    save_tables(dict(zip(outputs.values(), [img_table, name_table] * 2)), kind="vectors", source=ns.csv)

    mean = "plain mean" if ns.no_normalize_mean else "normalised mean"
    print(
        f"build_poi_tables: {len(img_table)} image vectors ({mean}) -> {ns.out_image_vectors}; "
        f"{len(name_table)} name vectors -> {ns.out_name_vectors}; "
        f"{summary['unreadable_images']} unreadable and {summary['missing_images']} missing images left out; "
        f"{bad} bad rows left out; {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
