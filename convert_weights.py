#!/usr/bin/env python
"""Convert a checkpoint to ``.safetensors``, which every script takes wherever it takes a
checkpoint: the same keys and tensors (a recorded small architecture in the metadata), no pickle.

    python convert_weights.py assets/weights/align_model.pth assets/weights/align_model.safetensors

Exit status: 0 done, 2 a file that cannot be read or written, 130 interrupted."""

from __future__ import annotations

from utils.cli import check_files, entry_point, setup_logging

import argparse
import sys

from models import convert_to_safetensors
from utils import args as shared


@entry_point
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="a checkpoint: .pth / .ckpt / .bin (read with torch's weights-only loader)")
    p.add_argument("output", help="the .safetensors file to write")
    shared.add_run(p)
    ns = p.parse_args(argv)
    setup_logging(ns.log_level)
    check_files({"input": ns.input}, outputs={"output": ns.output})
    summary = convert_to_safetensors(ns.input, ns.output)
    arch = f"; architecture {summary['arch']}" if summary["arch"] else ""
    print(f"{ns.output}: {summary['tensors']} tensors, {summary['values']:,} values{arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
