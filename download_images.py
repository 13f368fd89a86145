#!/usr/bin/env python
"""Download the images of a published CSV (recall or ranking format), resumably.

    python download_images.py --csv data/temp_recall_biztype0_fc5_imagern_500.csv --out data/images/recall

Recall rows -> OUT/<poi_id>_<rank_number>.<ext>; ranking rows -> OUT/<item_id>_a.<ext> and
OUT/<item_id>_b.<ext> (the durable oss URL first); <ext> comes from the bytes. A file takes its
name only once verified (under --max-bytes, decodes); a rerun keeps the valid ones.
OUT/manifest.jsonl: one line per image (and per bad row left out); the log: OUT/download_images.log.

Exit status: 0 when failures <= --max-failures, 1 otherwise, 2 for bad arguments, a bad CSV
or output, a full disk, or another run on the same output, 130 when interrupted.
"""

from __future__ import annotations

from utils.cli import count_or_percent, entry_point, positive_int, setup_logging

import argparse
import sys

from utils import args as shared
from utils.fetch import DEFAULT_MAX_BYTES, ImageJob, download_images, image_summary


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects I/N such as 0/4, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N (shards are numbered from 0)")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="download_images.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--csv", required=True, help="input CSV (recall or ranking format)")
    p.add_argument("--out", required=True, help="output directory for the images")
    p.add_argument("--format", choices=("auto", "recall", "rank"), default="auto", help="CSV format (default: sniffed)")
    p.add_argument("--max-bytes", type=positive_int, default=DEFAULT_MAX_BYTES, help="size cap of one image in bytes")
    text = "exit with status 1 when more images than this fail: N, or P%% of the images of this run (default 0)"
    p.add_argument("--max-failures", type=count_or_percent, default="0", help=text)
    p.add_argument("--limit", type=positive_int, help="only the first N CSV rows (after --shard)")
    p.add_argument("--shard", type=_shard, metavar="I/N", help="only rows whose line L has (L-1) %% N == I")
    text = "rewrite URLs starting with OLD to start with NEW (repeatable; first match wins)"
    p.add_argument("--url-prefix-map", action="append", default=[], metavar="OLD=NEW", help=text)
    text = "downscale images whose longer side exceeds N (off by default: evaluation needs the original bytes)"
    p.add_argument("--max-side", type=positive_int, help=text)
    text = "manifest path (default OUT/manifest.jsonl, with --shard OUT/manifest.shard-I-of-N.jsonl)"
    p.add_argument("--manifest", help=text)
    text = "keep files whose size and mtime match the previous manifest without decoding them again"
    p.add_argument("--trust-manifest", action="store_true", help=text)
    shared.add_downloads(p, shared.IMAGE_DOWNLOADS, worker_flags=("--download-workers", "--workers"))
    shared.add_bad_rows(p)
    shared.add_run(p)
    return p


@entry_point
def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    setup_logging(ns.log_level)
    override = dict(net=shared.Downloads.from_args(ns), url_prefix_map=tuple(ns.url_prefix_map))
    job = shared.from_flags(ImageJob, ns, **override, progress=not ns.no_progress)
    summary = download_images(job)  # checks everything first, then downloads
    print(image_summary(summary))
    if summary["over_budget"]:
        print(summary["over_budget"], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
