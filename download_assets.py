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

Before a sha256 is pinned the file must look like what the asset is (a torch checkpoint,
a .npy array, a CSV of the published format, JSON or UTF-8 text, of a plausible size);
one that does not (an HTML page saved as align_model.pth) is kept aside as
``<file>.bad-content``, not pinned, and the asset fails.

Every URL and redirect is checked before connecting: a public URL may not lead to a
link-local, private or loopback address (``--allow-private-addresses`` lifts this; a
``--mirror`` is trusted as named). One run at a time per destination (``DEST/.lock``).

Exit status: 0 all assets present and verified, 1 some failed, 2 bad arguments,
manifest or destination (or another run holds the destination), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils import cli
from utils.fetch import (
    ALLOW_OPTION,
    DEFAULT_MANIFEST,
    HASHES_FILE,
    ROOT,
    AddressPolicy,
    AssetError,
    HashRecords,
    NetworkError,
    check_present,
    fetch_asset,
    load_manifest,
    make_session,
    select_assets,
    url_host,
)
from utils.io import exclusive_lock

log = logging.getLogger("download_assets")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="download_assets.py",
        description="Download and verify the published CSVs, POI tables, weights and "
        "bert-base-chinese files. A rerun skips what is present and verified.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dest", default=str(ROOT), help="destination root; files land at DEST/<path of the manifest>")
    p.add_argument(
        "--only", nargs="+", metavar="NAME", default=None, help="only these assets (see --list), e.g. --only train_csv"
    )
    p.add_argument("--with-train", action="store_true", help="also the large ranking training CSV (train_csv)")
    p.add_argument(
        "--with-baselines",
        action="store_true",
        help="also the Taiyi-CLIP recall baseline: its text encoder files, the authors' "
        "fine-tuned text weights and the OpenAI CLIP ViT-B/32 image tower",
    )
    p.add_argument(
        "--mirror",
        default=None,
        metavar="BASE_URL",
        help="fetch every asset (bert files too) from BASE_URL/<path> instead of the published locations",
    )
    p.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="asset manifest (JSON)")
    p.add_argument("--list", action="store_true", help="list the assets and their state, then exit")
    p.add_argument("--force", action="store_true", help="download again even when present")
    p.add_argument(
        "--verify", action="store_true", help="re-hash present files instead of trusting the recorded size+mtime"
    )
    p.add_argument(
        "--retries", type=cli.non_negative_int, default=3, help="retries per request on connection errors, 429 and 5xx"
    )
    p.add_argument(
        "--timeout", type=cli.finite_float, default=60.0, help="read timeout (longest silence between bytes), seconds"
    )
    p.add_argument(
        ALLOW_OPTION,
        action="store_true",
        help="allow URLs and redirects that lead to link-local, private or loopback "
        "addresses (refused by default, except a --mirror as named)",
    )
    cli.add_common_args(p, device=False)
    return p


def list_assets(assets, dest: Path, records: HashRecords, mirror) -> None:
    for a in assets:
        file = dest / a.path
        state = "present" if file.is_file() else "missing"
        rec = records.get(a.name)
        sha = a.sha256 or (rec or {}).get("sha256")
        flag = "" if a.default else f" (with --with-{a.group})" if a.group else " (not in the default set)"
        print(
            f"{a.name:18s} {state:8s} {file}{flag}\n{'':27s}from {a.source(mirror)}\n"
            f"{'':27s}sha256 {sha or 'unknown (recorded on first download)'}"
        )


# ---------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------
def read_manifest(args):
    """(all assets, the ones asked for); a bad manifest or name is a UserError."""
    cli.input_file(args.manifest, "--manifest")
    assets = load_manifest(args.manifest)
    groups = ("baselines",) if args.with_baselines else ()
    return assets, select_assets(assets, args.only, args.with_train, groups=groups)


def fetch_all(chosen, dest: Path, args) -> tuple[dict, list[str]]:
    """Fetch each asset (skipping hosts found unreachable); (counts, failure messages)."""
    records = HashRecords(dest)
    policy = AddressPolicy(
        allow_private=args.allow_private_addresses, trusted_hosts=[url_host(args.mirror)] if args.mirror else ()
    )
    session = make_session(retries=args.retries, backoff=0.5, pool_size=2, address_policy=policy)
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
                out = fetch_asset(
                    a,
                    dest,
                    records,
                    session=session,
                    mirror=args.mirror,
                    timeout=(10.0, args.timeout),
                    progress=not args.no_progress,
                    force=args.force,
                    rehash=args.verify,
                )
            except AssetError as e:
                msg = str(e) if str(e).startswith(a.name + ":") else f"{a.name}: {e}"
                if isinstance(e, NetworkError):
                    unreachable.add(e.host)
                failed.append(msg)
                print(f"error: {msg}", file=sys.stderr)
                continue
            counts[out.status] += 1
            report_one(a, out, dest)
    finally:
        session.close()
    return counts, failed


def report_one(a, out, dest: Path) -> None:
    if out.status == "skipped":
        log.info("%s: skipped, present and verified: %s", a.name, out.path)
        return
    note = {
        "manifest": "verified against the manifest",
        "record": f"verified against {HASHES_FILE}",
        "unknown": f"sha256 not known in advance, recorded in {dest / HASHES_FILE}",
    }
    log.info("%s: downloaded %s (%s)", a.name, out.path, note[out.sha_origin])
    if out.sha_origin == "unknown":
        print(f"{a.name}: sha256 {out.sha256} (new; recorded in {dest / HASHES_FILE})")


def summarize(counts: dict, failed: list[str], dest: Path) -> int:
    print(
        f"assets: {counts['downloaded']} downloaded, {counts['skipped']} already present "
        f"and verified, {len(failed)} failed (destination {dest})"
    )
    if failed:
        print("failed assets:", file=sys.stderr)
        for msg in failed:
            print(f"  {msg}", file=sys.stderr)
        return 1
    return 0


@cli.entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.log_level)
    assets, chosen = read_manifest(args)
    if args.list:
        list_assets(assets, Path(args.dest), HashRecords(Path(args.dest)), args.mirror)
        return 0
    dest = cli.output_dir(args.dest, "--dest")
    with exclusive_lock(dest):
        counts, failed = fetch_all(chosen, dest, args)
    return summarize(counts, failed, dest)


def missing_assets(manifest, dest, names) -> list[str]:
    """Names among ``names`` that are not present and verified (no network); for reproduce.py."""
    records = HashRecords(Path(dest))
    assets = select_assets(load_manifest(manifest), names)
    return [a.name for a in assets if check_present(a, Path(dest), records) is not None]


if __name__ == "__main__":
    sys.exit(main())
