#!/usr/bin/env python
"""Inspect and convert the ranker's POI tables: ``convert`` reads a pickled table without
running its code and writes the safe ``.npz`` (or the authors' ``.npy``), read back first.

    python poi_tables.py convert temp_dataset_item_pois_relation_1129_poi_2_pic_num.npy pic_num.npz
    python poi_tables.py info pic_num.npz

Exit status: 0 done, 2 a file that cannot be read or written, 130 on Ctrl-C.
"""

from __future__ import annotations

from utils.cli import distinct_paths, entry_point, input_file, non_negative_int, setup_logging

import argparse
import sys

from utils import args
from utils.formats import KINDS, describe_table, load_poi_table, save_tables, table_output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poi_tables.py", description="Inspect and convert the ranker's POI tables.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="IN (.npy pickled dict or .npz) -> OUT (.npz safe, or .npy)")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--kind", choices=KINDS, help="table kind stored in the .npz (default: pic_num for 3 values a row)")
    i = sub.add_parser("info", help="number of POIs, value shape and dtype, a few names, vector norms")
    i.add_argument("file")
    i.add_argument("--show", type=non_negative_int, default=5, help="entries to show (default 5)")
    for s in (c, i):
        args.add_trust_pickle(s)
        args.add_run(s)
    return p


@entry_point
def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    setup_logging(ns.log_level)
    if ns.command == "info":
        input_file(ns.file, "FILE")
        print(describe_table(load_poi_table(ns.file, trust_pickle=ns.trust_pickle), ns.file, ns.show))
        return 0
    input_file(ns.input, "IN")
    table_output(ns.output, "OUT")
    distinct_paths({"IN": ns.input}, {"OUT": ns.output})
    table = load_poi_table(ns.input, trust_pickle=ns.trust_pickle)
    save_tables({ns.output: table}, kind=ns.kind, source=ns.input)
    print(f"{ns.input} -> {ns.output}: {len(table)} POIs, verified by reading back")
    return 0


if __name__ == "__main__":
    sys.exit(main())
