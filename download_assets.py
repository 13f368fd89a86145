#!/usr/bin/env python
"""Fetch the published files of the reproduction: CSVs, POI tables, weights, bert files.

    python download_assets.py                      # default set into the project
    python download_assets.py --only recall_csv align_weights
    python download_assets.py --with-train         # also the (large) training CSV
    python download_assets.py --with-baselines     # also the Taiyi-CLIP recall baseline
    python download_assets.py --mirror http://host/avas --dest /data/avas   # air-gapped site
    python download_assets.py --list

The manifest ``assets.json`` (``--manifest FILE`` for another) names each asset, its
source, its relative ``path`` and its sha256 where known. Layout under ``--dest``
(default: the project root), identical under a ``--mirror`` base URL:

    data/temp_recall_biztype0_fc5_imagern_500.csv           recall_csv
    data/dwd_..._val_with_poi_tuomin.csv                     rank_val_csv
    data/dwd_..._train_with_poi_tuomin.csv                   train_csv (not by default)
    assets/poi/temp_dataset_item_pois_relation_*.npy         poi_pic_num, poi_image_vectors, poi_name_vectors
    assets/weights/align_model.pth                           align_weights (recall, renamed)
    assets/weights/shoucai_siamese_..._0.6520.ckpt           ranker_weights
    assets/bert-base-chinese/{vocab.txt,config.json}         bert_vocab, bert_config

With --with-baselines (group "baselines", the paper's recall baseline Taiyi-CLIP):

    assets/taiyi-clip-roberta-102m-chinese/{config.json,vocab.txt,tokenizer_config.json,
        special_tokens_map.json}                             taiyi_text_* (Hugging Face)
    assets/weights/taiyi_text_finetuned.bin                  taiyi_text_finetuned (the authors' release)
    assets/clip-vit-base-patch32/{config.json,preprocessor_config.json,model.safetensors}
                                                             clip_* (Hugging Face)

The original Taiyi text weights (``taiyi_text_weights``, 411 MB) are not needed when the
fine-tuned ones are used: only with ``--only taiyi_text_weights``.

The Hugging Face files (bert, Taiyi, CLIP) come through ``huggingface_hub.hf_hub_download`` from
``google-bert/bert-base-chinese`` (so HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE=1 work
as usual) and are copied into ``assets/bert-base-chinese/``; with ``--mirror`` they
come from the mirror like everything else. To build a mirror, serve a populated
destination directory (e.g. ``python -m http.server`` in it).

Each download streams to ``<file>.part`` and resumes with an HTTP Range request
after an interruption (also across runs); the result is checked against its sha256
(mismatch: kept aside as ``<file>.bad-sha256``, exit 1) and renamed into place. A
sha256 the manifest does not know is printed and pinned in ``DEST/.asset-hashes.json``
on the first download; later runs check against it and skip every file that is
present and verified (no request is made).

Exit status: 0 all assets present and verified, 1 some failed, 2 bad arguments or
manifest, 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.assets import (DEFAULT_MANIFEST, HASHES_FILE, ROOT, AssetError, HashRecords, NetworkError,
                          check_present, fetch_asset, load_manifest, select_assets)
from utils import cli
from utils.download import make_session

log = logging.getLogger("download_assets")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="download_assets.py",
        description="Download and verify the published CSVs, POI tables, weights and "
                    "bert-base-chinese files. A rerun skips what is present and verified.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dest", default=str(ROOT),
                   help="destination root; files land at DEST/<path of the manifest>")
    p.add_argument("--only", nargs="+", metavar="NAME", default=None,
                   help="only these assets (see --list), e.g. --only train_csv")
    p.add_argument("--with-train", action="store_true",
                   help="also the large ranking training CSV (train_csv)")
    p.add_argument("--with-baselines", action="store_true",
                   help="also the Taiyi-CLIP recall baseline: its text encoder files, the authors' "
                        "fine-tuned text weights and the OpenAI CLIP ViT-B/32 image tower")
    p.add_argument("--mirror", default=None, metavar="BASE_URL",
                   help="fetch every asset (bert files too) from BASE_URL/<path> instead "
                        "of the published locations")
    p.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="asset manifest (JSON)")
    p.add_argument("--list", action="store_true", help="list the assets and their state, then exit")
    p.add_argument("--force", action="store_true", help="download again even when present")
    p.add_argument("--verify", action="store_true",
                   help="re-hash present files instead of trusting the recorded size+mtime")
    p.add_argument("--retries", type=int, default=3,
                   help="retries per request on connection errors, 429 and 5xx")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="read timeout (longest silence between bytes), seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p


def setup_logging(quiet: bool) -> None:
    cli.setup_logging(level=None, fmt="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def list_assets(assets, dest: Path, records: HashRecords, mirror) -> None:
    for a in assets:
        file = dest / a.path
        state = "present" if file.is_file() else "missing"
        rec = records.get(a.name)
        sha = a.sha256 or (rec or {}).get("sha256")
        flag = ("" if a.default else f" (with --with-{a.group})" if a.group
                else " (not in the default set)")
        print(f"{a.name:18s} {state:8s} {file}{flag}\n{'':27s}from {a.source(mirror)}\n"
              f"{'':27s}sha256 {sha or 'unknown (recorded on first download)'}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    dest = Path(args.dest)
    try:
        assets = load_manifest(args.manifest)
        chosen = select_assets(assets, args.only, args.with_train,
                               groups=("baselines",) if args.with_baselines else ())
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records = HashRecords(dest)
    if args.list:
        list_assets(assets, dest, records, args.mirror)
        return 0

    session = make_session(retries=args.retries, backoff=0.5, pool_size=2)
    failed: list[str] = []
    unreachable: set[str] = set()
    counts = {"skipped": 0, "downloaded": 0}
    try:
        for a in chosen:
            source = a.source(args.mirror)
            host = source.split("/")[2] if "://" in source else source
            if host in unreachable:
                failed.append(f"{a.name}: not tried: {host} was unreachable")
                continue
            try:
                out = fetch_asset(a, dest, records, session=session, mirror=args.mirror,
                                  timeout=(10.0, args.timeout), progress=not args.no_progress,
                                  force=args.force, rehash=args.verify)
            except AssetError as e:
                msg = str(e) if str(e).startswith(a.name + ":") else f"{a.name}: {e}"
                if isinstance(e, NetworkError):
                    unreachable.add(e.host)
                failed.append(msg)
                print(f"error: {msg}", file=sys.stderr)
                continue
            counts[out.status] += 1
            if out.status == "skipped":
                log.info("%s: skipped, present and verified: %s", a.name, out.path)
            else:
                note = {"manifest": "verified against the manifest",
                        "record": f"verified against {HASHES_FILE}",
                        "unknown": f"sha256 not known in advance, recorded in {dest / HASHES_FILE}"}
                log.info("%s: downloaded %s (%s)", a.name, out.path, note[out.sha_origin])
                if out.sha_origin == "unknown":
                    print(f"{a.name}: sha256 {out.sha256} (new; recorded in {dest / HASHES_FILE})")
    except KeyboardInterrupt:
        print("\ninterrupted; partial downloads are kept as *.part and resume on the next run",
              file=sys.stderr)
        return 130
    finally:
        session.close()

    print(f"assets: {counts['downloaded']} downloaded, {counts['skipped']} already present "
          f"and verified, {len(failed)} failed (destination {dest})")
    if failed:
        print("failed assets:", file=sys.stderr)
        for msg in failed:
            print(f"  {msg}", file=sys.stderr)
        return 1
    return 0


def missing_assets(manifest, dest, names) -> list[str]:
    """Names among ``names`` that are not present and verified (no network); for reproduce.py."""
    records = HashRecords(Path(dest))
    assets = select_assets(load_manifest(manifest), names)
    return [a.name for a in assets if check_present(a, Path(dest), records) is not None]


if __name__ == "__main__":
    sys.exit(main())
