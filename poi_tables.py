#!/usr/bin/env python
"""Inspect and convert the ranker's POI tables.

    python poi_tables.py convert temp_dataset_item_pois_relation_1129_poi_2_pic_num.npy pic_num.npz
    python poi_tables.py convert temp_dataset_item_pois_relation_0110_imgs_avg10_vector.npy poi_img.npz
    python poi_tables.py info pic_num.npz

The published tables are Python dicts pickled through ``np.save``; pickle runs code
on load. ``convert`` reads such a ``.npy`` through the restricted, bounded reader of
utils/poi.py (numpy arrays and scalars, lists, numbers, strings, and torch tensors read
by torch's ``weights_only`` loader; anything else is refused, naming the file and the
global it asked for; ``--trust-pickle`` bypasses this for a file you trust) and writes
the safe format: a ``.npz`` of ``names`` (unicode array) and ``values`` (N x D matrix:
float32 vectors, or integer counts for the pic-num table), read back with
``allow_pickle=False``. rank_eval.py reads both and chooses by suffix. Converting to a
``.npy`` OUT writes the authors' pickled-dict format instead (values as float32
arrays), for tools that need it. Every value must be numeric, finite and of one length.

Exit status: 0 on success, 2 for a file that cannot be read or written, 130 on Ctrl-C.
"""

from __future__ import annotations

from utils.cli import add_common_args, entry_point, input_file, output_file, setup_logging

import argparse
import logging
import sys

import numpy as np

from utils.formats import (
    KINDS,
    SAFE_SUFFIX,
    PoiTableError,
    guess_kind,
    load_poi_table,
    save_pickled_table,
    save_safe_table,
    table_matrix,
)

log = logging.getLogger("poi_tables")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="poi_tables.py",
        description="Inspect POI tables and convert the published pickled .npy dicts into a safe .npz format.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="IN (.npy pickled dict or .npz) -> OUT (.npz safe, or .npy)")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument(
        "--kind",
        choices=KINDS,
        default=None,
        help="table kind stored in the .npz (default: pic_num for 3 values a row, else vectors)",
    )
    c.add_argument(
        "--trust-pickle", action="store_true", help="read IN with np.load(allow_pickle=True): code in it would run"
    )
    add_common_args(c, device=False)
    i = sub.add_parser("info", help="number of POIs, value shape and dtype, a few names, vector norms")
    i.add_argument("file")
    i.add_argument("--trust-pickle", action="store_true")
    i.add_argument("--show", type=int, default=5, help="names to show")
    add_common_args(i, device=False)
    return p


def describe(table: dict, path: str, show: int = 5) -> str:
    names, values = table_matrix(table, path)
    lines = [f"{path}: {len(names)} POIs"]
    if names:
        lines.append(f"  values: {values.shape[1]} per POI, dtype {values.dtype}, kind {guess_kind(values)}")
        if guess_kind(values) == "vectors":
            norms = np.linalg.norm(values.astype(np.float64), axis=1)
            lines.append(f"  L2 norms: min {norms.min():.4f}, mean {norms.mean():.4f}, max {norms.max():.4f}")
        else:
            w = values[:, 0] + 5.0 * values[:, 1] + 3.0 * values[:, 2]
            lines.append(f"  weight n0 + 5*n1 + 3*n2: min {w.min():g}, median {np.median(w):g}, max {w.max():g}")
        spaced = sum(n != n.strip() for n in names)
        lines.append(f"  names with leading/trailing spaces: {spaced}")
        for n, v in list(zip(names, values))[:show]:
            lines.append(f"  {n!r}: {np.array2string(v[:6], precision=4)}" + (" ..." if v.size > 6 else ""))
    return "\n".join(lines)


def info(args) -> int:
    input_file(args.file, "FILE")
    print(describe(load_poi_table(args.file, trust_pickle=args.trust_pickle), args.file, args.show))
    return 0


def convert(args) -> int:
    input_file(args.input, "IN")
    suffix = args.output.lower()
    if not (suffix.endswith(SAFE_SUFFIX) or suffix.endswith(".npy")):
        raise PoiTableError(f"{args.output}: OUT must end in {SAFE_SUFFIX} (safe) or .npy (pickled dict)")
    output_file(args.output, "OUT")
    table = load_poi_table(args.input, trust_pickle=args.trust_pickle)
    names, values = table_matrix(table, args.input)  # numeric, finite, one length: before writing
    if suffix.endswith(SAFE_SUFFIX):
        save_safe_table(table, args.output, kind=args.kind, source=args.input)
    else:
        save_pickled_table(table, args.output)
    check_round_trip(names, values, args.output)
    print(f"{args.input} -> {args.output}: {len(names)} POIs, verified by reading back")
    return 0


def check_round_trip(names: list[str], values: np.ndarray, path: str) -> None:
    """Read ``path`` back the way rank_eval.py will and compare."""
    back_names, back = table_matrix(load_poi_table(path), path)
    if back_names != names:
        raise PoiTableError(f"{path}: names changed in the round trip")
    if names and not np.allclose(back.astype(np.float64), values.astype(np.float64), atol=1e-6):
        bad = int(np.argmax(np.abs(back.astype(np.float64) - values.astype(np.float64)).max(axis=1)))
        raise PoiTableError(f"{path}: values of {names[bad]!r} changed in the round trip")


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return info(args) if args.command == "info" else convert(args)


if __name__ == "__main__":
    sys.exit(main())
