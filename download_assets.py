#!/usr/bin/env python
"""Fetch the published files of the reproduction: CSVs, POI tables, weights, bert files.

    python download_assets.py                      # the default set into the project
    python download_assets.py --only recall_csv align_weights
    python download_assets.py --with-train         # also the (large) training CSV
    python download_assets.py --with-baselines     # also the Taiyi-CLIP recall baseline
    python download_assets.py --mirror http://host/avas --dest /data/avas   # air-gapped site

The manifest (utils/fetch/assets.json) names each asset, its source, its path (under --dest
and under a --mirror alike) and its sha256 where known; an unknown one is pinned in
DEST/.asset-hashes.json at the first download of a file that looks like its asset. A
download resumes after an interruption; a bad file is kept aside (<file>.bad-sha256,
<file>.bad-content). The Hugging Face files come from the local Hugging Face cache, else
from HF_ENDPOINT. To build a mirror, serve a populated destination over HTTP.

Exit status: 0 all assets present and verified, 1 some failed, 2 bad arguments, manifest
or destination (or another run holds it), 130 interrupted.
"""

from __future__ import annotations

from utils.cli import entry_point, input_file, output_dir, setup_logging

import argparse
import sys
from pathlib import Path

from utils import args as shared
from utils.fetch import DEFAULT_MANIFEST, ROOT, HashRecords, fetch_assets, load_manifest, select_assets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="download_assets.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    text = "destination root: files land at DEST/<path> (default: the project)"
    p.add_argument("--dest", default=str(ROOT), help=text)
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these assets (see --list), e.g. --only train_csv")
    p.add_argument("--with-train", action="store_true", help="also the large ranking training CSV (train_csv)")
    text = "also the Taiyi-CLIP recall baseline: its text encoder, the authors' text weights, the CLIP image tower"
    p.add_argument("--with-baselines", action="store_true", help=text)
    text = "fetch every asset (bert files too) from BASE_URL/<path> instead of the published locations"
    p.add_argument("--mirror", metavar="BASE_URL", help=text)
    p.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="asset manifest (JSON; default: the project's)")
    p.add_argument("--list", action="store_true", help="list the assets and their state, then exit")
    p.add_argument("--force", action="store_true", help="download again even when present")
    p.add_argument("--verify", action="store_true", help="re-hash present files instead of trusting size and mtime")
    shared.add_downloads(p, shared.ASSET_DOWNLOADS, ())
    shared.add_run(p)
    return p


def list_assets(assets, dest: Path, mirror: str | None) -> None:
    records = HashRecords(dest)
    for a in assets:
        file = dest / a.path
        sha = a.sha256 or records.get(a.name).get("sha256") or "unknown (recorded on first download)"
        flag = "" if a.default else f" (with --with-{a.group})" if a.group else " (not in the default set)"
        state = "present" if file.is_file() else "missing"
        print(f"{a.name:18s} {state:8s} {file}{flag}\n{'':27s}from {a.source(mirror)}\n{'':27s}sha256 {sha}")


@entry_point
def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    setup_logging(ns.log_level)
    assets = load_manifest(input_file(ns.manifest, "--manifest"))
    chosen = select_assets(assets, ns.only, ns.with_train, groups=("baselines",) if ns.with_baselines else ())
    if ns.list:
        list_assets(assets, Path(ns.dest), ns.mirror)
        return 0
    dest = output_dir(ns.dest, "--dest")
    net = shared.Downloads.from_args(ns)
    summary = fetch_assets(chosen, dest, net, ns.mirror, not ns.no_progress, ns.force, ns.verify)
    failed = summary["failed"]
    counts = f"{summary['downloaded']} downloaded, {summary['skipped']} already present and verified"
    print(f"assets: {counts}, {len(failed)} failed (destination {dest})")
    if failed:
        print("failed assets:\n" + "\n".join(f"  {msg}" for msg in failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
