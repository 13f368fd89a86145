#!/usr/bin/env python
"""Pick the image to show for each item of your own catalogue with the two-stage selector.

    python select_images.py --items catalogue.csv --out selection.csv \\
        --ranker-checkpoint data/shoucai_siamese_train_concat_poi_020_0.6520.ckpt \\
        --recall-checkpoint data/align_model.pth --bert-dir data/bert-base-chinese \\
        [--poi-pic-num T1 --poi-image-vectors T2 --poi-name-vectors T3] [--html report.html]
    ... --ray [HOST:6379]     # on Ray Data: a local Ray, or join a cluster (README: "Scaling out")

Input: a CSV (or Parquet file) ``item_id,title,poi_names,image``, one row per candidate;
``image`` is a local path (relative to the catalogue) or an http(s) URL, downloaded once
into ``--image-cache``. Stage 1 (recall) keeps the top ``--recall-k`` per item, stage 2
(the ranker with the item's POIs) picks one. Output: one row per candidate,
    item_id,line,image,status,recall_score,recall_rank,ranker_score,final_rank,selected,file,detail
status ok | missing | download_failed | unreadable | duplicate (only ok is scored);
``<out>.summary.json`` and ``--html`` are written with it. Exit status 2 for bad input.
"""

from __future__ import annotations

from utils.cli import UserError, check_files, distinct_paths, entry_point, positive_int, require, setup_logging

import argparse
import sys

from models import run_selection
from utils import args as shared
from utils.selection import ModelFiles, RayOptions, Scoring, Selection, is_parquet, is_uri


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="select_images.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("inputs")
    g.add_argument("--items", required=True, help="catalogue CSV or Parquet: item_id,title,poi_names,image")
    g.add_argument("--ranker-checkpoint", help="ranker checkpoint (required unless --recall-only)")
    g.add_argument("--recall-checkpoint", help="recall checkpoint for stage 1 (default: the ranker's own copy)")
    shared.add_recall_files(g, None, checkpoint=None)
    shared.add_poi_tables(p)
    shared.add_bad_rows(g)
    o = p.add_argument_group("outputs")
    text = "output CSV, one row per candidate (with --ray and no .csv suffix: a directory of Parquet shards)"
    o.add_argument("--out", required=True, help=text)
    o.add_argument("--html", help="also write a visual HTML report")
    o.add_argument("--summary", help="summary JSON (default <out>.summary.json)")
    r = p.add_argument_group("selection")
    text = "candidates per item passed to the ranker (default 5)"
    r.add_argument("--recall-k", type=positive_int, default=5, help=text)
    r.add_argument("--recall-only", action="store_true", help="stage 1 only: select by recall score")
    d = shared.add_downloads(p)  # of URL images: defaults --download-workers 8, --timeout 30
    d.add_argument("--image-cache", help="directory for downloaded images (default <out>.images)")
    shared.add_engine(p)
    shared.add_batches(p, head=True, workers_alias=True)
    shared.add_cache(p, "cache")
    shared.add_run(p, "run")
    shared.add_ray(p)
    return p


def selection_of(args) -> tuple[Selection, RayOptions | None]:
    """The run the flags describe (their combinations checked), and where it runs."""
    if not args.recall_only and not args.ranker_checkpoint:
        raise UserError("--ranker-checkpoint is required (or --recall-only with --recall-checkpoint)")
    if args.recall_only and not (args.recall_checkpoint or args.ranker_checkpoint):
        raise UserError("--recall-only needs --recall-checkpoint (or --ranker-checkpoint for its copy)")
    tables = (args.poi_pic_num, args.poi_image_vectors, args.poi_name_vectors)
    if any(tables) and not all(tables):
        raise UserError("--poi-pic-num, --poi-image-vectors and --poi-name-vectors go together: give all three or none")
    enc = shared.Encoding.from_args(args, progress=not args.no_progress and sys.stderr.isatty())
    files, net = shared.from_flags(ModelFiles, args), shared.Downloads.from_args(args)
    job = shared.from_flags(Selection, args, files=files, scoring=Scoring(args.recall_k, enc), net=net)
    return job, None if args.ray is None else shared.from_flags(RayOptions, args, address=args.ray or None)


def check_paths(job: Selection, shards_out: bool) -> None:
    """Readable inputs, writable outputs, no output that is an input or another output:
    a ``UserError`` before any model is loaded. A filesystem URI (``--out`` of shards,
    ``--image-cache``, a summary beside such an ``--out``) is the cluster's to reach."""
    f = job.files
    flags = (
        "--items --ranker-checkpoint --recall-checkpoint --arch --poi-pic-num --poi-image-vectors --poi-name-vectors"
    )
    paths = (job.items, f.ranker_checkpoint, f.recall_checkpoint, f.arch, *(f.poi_tables or ()))
    inputs = {flag: path for flag, path in zip(flags.split(), paths) if path}
    for flag, path in (("--out", job.out), ("--image-cache", job.image_dir)):
        if is_uri(path) and not shards_out:
            raise UserError(f"{flag} {path}: a filesystem URI takes --ray and an --out of shards (no .csv)")
    outputs = {"--out": job.out, "--summary": job.summary_path, "--html": job.html}
    dirs = {"--image-cache": job.image_dir, "--cache-dir": job.scoring.enc.cache_dir}
    if shards_out:
        dirs = {"--out": outputs.pop("--out"), **dirs}
    local = lambda paths: {flag: path for flag, path in paths.items() if path and not is_uri(path)}
    check_files(inputs, {"--bert-dir": f.bert_dir}, local(outputs), local(dirs))
    distinct_paths(inputs, outputs | dirs)  # check_files compared the files only


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    job, ray = selection_of(args)
    if ray is not None:
        require("ray", "ray", "--ray")
    if is_parquet(job.items):
        require("pyarrow", "parquet", "a Parquet --items")
    check_paths(job, shards_out=ray is not None and not job.out.lower().endswith(".csv"))
    run_selection(job, ray)
    return 0


if __name__ == "__main__":
    sys.exit(main())
