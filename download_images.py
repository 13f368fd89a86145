#!/usr/bin/env python
"""Download the images of a published CSV (recall or ranking format), resumably.

    python download_images.py --csv data/temp_recall_biztype0_fc5_imagern_500.csv --out data/recall_images
    python download_images.py --csv data/dwd_..._val_with_poi_tuomin.csv --out data/rank_val_images

File names (the extension comes from the bytes received, not from the URL):
  recall rows   -> <poi_id>_<rank_number>.<ext>
  ranking rows  -> <item_id>_a.<ext> and <item_id>_b.<ext>; the durable copy
                   (oss_url / oss_url2) is tried first, then the original URL.

Every file is verified (non-empty, under --max-bytes, decodes with Pillow)
before it is renamed atomically from a temporary ``.<stem>.<random>.part`` name,
so a crash never leaves a partial file under a final name.

Resume: a rerun keeps every file that is present and valid (status
``skipped``) and downloads only what is missing or invalid. Valid means it
decodes, which a rerun checks for every file; with --trust-manifest a file whose
size and mtime match its record in the previous manifest is kept unchecked.

Manifest (JSONL, default ``OUT/manifest.jsonl``; with --shard
``OUT/manifest.shard-I-of-N.jsonl``): one line per image (ranking: two per
row) and one per bad CSV row, written and flushed as each result arrives, so a
killed run loses nothing that finished (a log, deliberately not written
atomically). Each run REWRITES the manifest (the previous one is kept as
``<manifest>.prev``; a manifest path that is a directory is refused); because already-present files are
recorded as ``skipped`` with their size, dimensions and sha256, the manifest of
a completed run is the full record of the rows it covered. Fields: key, line,
status (ok|skipped|failed), url, http, error, error_kind, bytes, width, height,
sha256, file, final_url, tried, resized_from.

Before any download: the CSV must be readable UTF-8 (a bad byte is reported with
its line), ``--out``, the manifest and the log file must be writable places, and
no other run may be writing the same output (``OUT/.lock``, per shard).

Addresses: every URL and redirect is checked before connecting. A host name that
resolves to a private, loopback or link-local address, a redirect from a public
address into one, and any link-local address (cloud metadata) are refused; URLs
that name a local address literally (``http://127.0.0.1:8000/``) and the targets
of ``--url-prefix-map`` are taken as meant. ``--allow-private-addresses`` lifts
the check.

Exit status: 0 when failures <= --max-failures, 1 otherwise, 2 for bad
arguments, an unreadable CSV or output, or another run on the same output, 130
when interrupted.
"""

from __future__ import annotations

from utils.cli import DataError

import argparse
import concurrent.futures as cf
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from utils import cli
from utils.fetch import (
    ALLOW_OPTION,
    DEFAULT_MAX_BYTES,
    AddressPolicy,
    FetchResult,
    clean_stale_temps,
    download_one,
    make_session,
    parse_url_map,
    unchanged_since,
    url_host,
)
from utils.formats import RankRow, iter_rank_csv, iter_recall_csv, sniff_format
from utils.io import count_text_rows, exclusive_lock

log = logging.getLogger("download_images")
MAX_PRINTED_FAILURES = 20


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects I/N such as 0/4, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N (shards are numbered from 0)")
    return i, n


EPILOG = """\
files:     recall rows -> OUT/<poi_id>_<rank_number>.<ext>; ranking rows ->
           OUT/<item_id>_a.<ext>, OUT/<item_id>_b.<ext> (durable oss URL first, then
           the original); <ext> is sniffed from the bytes received.
resume:    present and valid files are kept (status skipped); only missing or
           invalid ones are downloaded.
manifest:  JSONL, one line per image and per bad CSV row, flushed as results
           arrive; rewritten by each run (the previous one kept as .prev).
exit:      0 ok, 1 more failures than --max-failures, 2 bad arguments, CSV or
           output (or another run on the same output), 130 interrupted.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="download_images.py",
        description="Resumable, concurrent, verified image download for the recall CSV "
        "and the $record$ ranking CSVs. A rerun downloads only what is missing.",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--csv", required=True, help="input CSV (recall or ranking format)")
    p.add_argument("--out", required=True, help="output directory for the images")
    p.add_argument(
        "--format",
        choices=("auto", "recall", "rank"),
        default="auto",
        help="CSV format; auto looks for '$record$' in the first line",
    )
    p.add_argument("--workers", type=cli.positive_int, default=16, help="concurrent downloads")
    p.add_argument("--timeout-connect", type=cli.finite_float, default=10.0, help="connect timeout, seconds")
    p.add_argument(
        "--timeout-read",
        type=cli.finite_float,
        default=30.0,
        help="read timeout (longest silence between bytes), seconds",
    )
    p.add_argument(
        "--retries",
        type=cli.non_negative_int,
        default=4,
        help="retries per URL on connection errors, timeouts, 429 and 5xx",
    )
    p.add_argument(
        "--backoff",
        type=cli.finite_float,
        default=0.5,
        help="backoff factor: waits grow as BACKOFF*2^n seconds plus jitter",
    )
    p.add_argument(
        "--max-bytes", type=cli.positive_int, default=DEFAULT_MAX_BYTES, help="size cap of one image in bytes"
    )
    p.add_argument(
        "--max-failures",
        type=cli.count_or_percent,
        default="0",
        help="exit with status 1 when more images than this fail: N, or P%% of the images of this run (default 0)",
    )
    p.add_argument("--limit", type=cli.positive_int, default=None, help="only the first N CSV rows (after --shard)")
    p.add_argument(
        "--shard",
        type=_shard,
        default=None,
        metavar="I/N",
        help="only rows whose line number L satisfies (L-1) %% N == I (I from 0)",
    )
    p.add_argument(
        "--url-prefix-map",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="rewrite URLs starting with OLD to start with NEW (repeatable; first match wins)",
    )
    p.add_argument(
        "--max-side",
        type=cli.positive_int,
        default=None,
        help="downscale images whose longer side exceeds N on save "
        "(off by default: evaluation needs the original bytes)",
    )
    p.add_argument(
        "--manifest",
        default=None,
        help="manifest path (default OUT/manifest.jsonl, or OUT/manifest.shard-I-of-N.jsonl with --shard)",
    )
    p.add_argument(
        "--trust-manifest",
        action="store_true",
        help="keep files whose size and mtime match their record in the previous "
        "manifest without decoding and hashing them again (fast reruns)",
    )
    p.add_argument(
        ALLOW_OPTION,
        action="store_true",
        help="allow URLs and redirects that lead to link-local, private or loopback "
        "addresses (by default only URLs naming such an address literally, and "
        "--url-prefix-map targets, may)",
    )
    cli.add_common_args(p, device=False)
    return p


# ---------------------------------------------------------------------------
# reading the CSV: jobs (key, urls, line) and bad rows, in file order
# ---------------------------------------------------------------------------
def iter_items(csv_path: str, fmt: str):
    """Yield ("row", line, [(key, urls), ...]) and ("bad", line, message) in file order."""
    errors: list = []
    reader = iter_rank_csv(csv_path, errors) if fmt == "rank" else iter_recall_csv(csv_path, errors)
    for row in reader:
        # the readers append bad rows to `errors` before yielding the next good one
        while errors:
            e = errors.pop(0)
            yield "bad", e.line, e.message
        if isinstance(row, RankRow):
            yield "row", row.line, [(row.key_a, row.urls_a()), (row.key_b, row.urls_b())]
        else:
            yield "row", row.line, [(row.key, [row.url])]
    while errors:
        e = errors.pop(0)
        yield "bad", e.line, e.message


def select(items, shard, limit):
    """Apply --shard (by CSV line number) and --limit (rows, good or bad)."""
    n = 0
    for kind, line, payload in items:
        if shard is not None and (line - 1) % shard[1] != shard[0]:
            continue
        if limit is not None and n >= limit:
            return
        n += 1
        yield kind, line, payload


def estimate_total(csv_path: str, fmt: str, shard, limit, rows: int | None = None) -> int | None:
    """Number of images to expect, from a fast count of non-blank lines."""
    if rows is None:
        try:
            rows = count_text_rows(csv_path)
        except (OSError, DataError):
            return None
    if shard is not None:
        rows = (rows + shard[1] - 1 - shard[0]) // shard[1]
    if limit is not None:
        rows = min(rows, limit)
    return rows * (2 if fmt == "rank" else 1)


# ---------------------------------------------------------------------------
# output: manifest and logging
# ---------------------------------------------------------------------------
class Manifest:
    """JSONL writer; each record is flushed when written (survives SIGKILL). The previous
    manifest is kept as ``<path>.prev``."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            os.replace(path, str(path) + ".prev")
        self.path = path
        self.f = open(path, "w", encoding="utf-8")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        try:
            os.fsync(self.f.fileno())
        except OSError:
            pass
        self.f.close()


def open_log_file(log_path: Path) -> logging.Handler:
    """This run's log, ``OUT/download_images[.shard-I-of-N].log`` (the level is --log-level's)."""
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False  # failures are printed (capped) by report(); the rest is in the file
    return handler


def read_previous(manifest: Path) -> dict:
    """key -> record of the present manifest (before this run replaces it); bad lines skipped."""
    out: dict = {}
    try:
        with open(manifest, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("key"):
                    out[rec["key"]] = rec
    except (OSError, UnicodeDecodeError):
        pass
    return out


def record(result: FetchResult, line: int) -> dict:
    rec = {"key": result.key, "line": line}
    rec.update(result.to_dict())
    return rec


def format_summary(status: Counter, errors: Counter, elapsed: float, manifest: Path) -> str:
    done = sum(status.values())
    rate = done / elapsed if elapsed > 0 else 0.0
    lines = [
        f"{done} images/rows in {elapsed:.1f} s ({rate:.1f}/s): "
        + ", ".join(f"{k} {status.get(k, 0)}" for k in ("ok", "skipped", "failed"))
    ]
    if errors:
        lines.append("failures by error: " + ", ".join(f"{k} {v}" for k, v in errors.most_common()))
    lines.append(f"manifest: {manifest}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------
@dataclass
class Plan:
    """What a run reads and writes, all checked before the first request."""

    csv: str
    fmt: str
    rows: int
    out: Path
    manifest: Path
    log_file: Path
    lock_name: str
    url_map: list


def check_paths(args) -> Plan:
    """The CSV is readable UTF-8 of a known format; the output directory, the manifest
    and the log file are writable places. Creates nothing."""
    csv_path = str(cli.input_file(args.csv, "--csv"))
    try:
        url_map = parse_url_map(args.url_prefix_map)
    except ValueError as e:
        raise cli.UserError(str(e)) from None
    out = cli.output_dir(args.out, "--out")
    suffix = f".shard-{args.shard[0]}-of-{args.shard[1]}" if args.shard else ""
    manifest = Path(args.manifest) if args.manifest else out / f"manifest{suffix}.jsonl"
    cli.output_file(manifest, "--manifest")
    prev = Path(str(manifest) + ".prev")
    if prev.is_dir():
        raise cli.UserError(f"--manifest {manifest}: {prev} (where the previous manifest is kept) is a directory")
    log_file = cli.output_file(out / f"download_images{suffix}.log", "log file")
    rows = count_text_rows(csv_path)  # reads the whole CSV: after the cheap checks
    fmt = sniff_format(csv_path) if args.format == "auto" else args.format
    return Plan(csv_path, fmt, rows, out, manifest, log_file, f".lock{suffix}", url_map)


def download_all(args, plan: Plan) -> int:
    """Download every image of the CSV into ``plan.out``; the exit status."""
    handler = open_log_file(plan.log_file)
    try:
        log.info(
            "start: csv=%s format=%s out=%s workers=%d shard=%s limit=%s max_side=%s",
            plan.csv,
            plan.fmt,
            plan.out,
            args.workers,
            args.shard,
            args.limit,
            args.max_side,
        )
        removed = clean_stale_temps(plan.out)
        if removed:
            log.info("removed %d stale temporary files", removed)
        status, errors, elapsed = _run_pool(args, plan)
        summary = format_summary(status, errors, elapsed, plan.manifest)
        print(summary)
        for ln in summary.splitlines():
            log.info("summary: %s", ln)
        rc = 0
        failed, total = status["failed"], status["ok"] + status["skipped"] + status["failed"]
        allowed = cli.allowed_count(args.max_failures, total)
        if failed > allowed:
            eq = f" (= {allowed})" if args.max_failures.endswith("%") else ""
            print(
                f"{failed} of {total} images could not be downloaded, more than --max-failures "
                f"{args.max_failures}{eq}; see {plan.manifest}. Rerun to retry them, or raise "
                f"--max-failures.",
                file=sys.stderr,
            )
            rc = 1
        log.info("exit status %d", rc)
        return rc
    except KeyboardInterrupt:
        log.info("interrupted; finished downloads are kept and recorded")
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


def _run_pool(args, plan: Plan) -> tuple[Counter, Counter, float]:
    """The download loop: a bounded window of futures over the CSV rows, each result
    written to the manifest as it arrives. (status counts, error kinds, seconds)."""
    policy = AddressPolicy(
        allow_private=args.allow_private_addresses, trusted_hosts=[url_host(new) for _, new in plan.url_map]
    )
    session = make_session(retries=args.retries, backoff=args.backoff, pool_size=args.workers, address_policy=policy)
    timeout = (args.timeout_connect, args.timeout_read)
    out, csv_path = plan.out, plan.csv
    previous = read_previous(plan.manifest) if args.trust_manifest else {}

    def job(key, urls):
        if key in previous:
            kept = unchanged_since(out, previous[key])
            if kept is not None:
                return kept
        try:
            return download_one(
                session,
                urls,
                out,
                key,
                max_bytes=args.max_bytes,
                timeout=timeout,
                max_side=args.max_side,
                url_map=plan.url_map,
                backoff=args.backoff,
            )
        except Exception as e:  # noqa: BLE001 - one bad image must not stop a million-row run
            log.exception("unexpected error for %s", key)
            return FetchResult(
                key=key,
                status="failed",
                url=urls[0] if urls else None,
                error=f"internal error: {type(e).__name__}: {e}",
                error_kind="internal",
            )

    status: Counter = Counter()
    errors: Counter = Counter()
    printed = 0
    manifest = Manifest(plan.manifest)
    bar = tqdm(
        total=estimate_total(csv_path, plan.fmt, args.shard, args.limit, rows=plan.rows),
        unit="img",
        dynamic_ncols=True,
        disable=args.no_progress,
        smoothing=0.1,
    )

    def report(rec: dict) -> None:
        nonlocal printed
        manifest.write(rec)
        status[rec["status"]] += 1
        if rec["status"] == "failed":
            errors[rec.get("error_kind") or "error"] += 1
            msg = f"{csv_path}:{rec['line']}: {rec.get('key') or 'bad row'}: {rec.get('error')}"
            log.warning("failed %s", msg)
            if printed < MAX_PRINTED_FAILURES:
                tqdm.write(f"FAILED {msg}", file=sys.stderr)
            elif printed == MAX_PRINTED_FAILURES:
                tqdm.write("(further failures only in the manifest and log)", file=sys.stderr)
            printed += 1
        bar.update(1)

    start = time.monotonic()
    window = args.workers * 4  # futures in flight: memory stays flat at any CSV size
    pending: dict = {}
    pool = cf.ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="dl")
    finished = False
    try:
        for kind, line, payload in select(iter_items(csv_path, plan.fmt), args.shard, args.limit):
            if kind == "bad":
                report(
                    {
                        "key": None,
                        "line": line,
                        "status": "failed",
                        "url": None,
                        "http": None,
                        "error": payload,
                        "error_kind": "bad_row",
                    }
                )
                continue
            for key, urls in payload:
                while len(pending) >= window:
                    done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        report(record(fut.result(), pending.pop(fut)))
                pending[pool.submit(job, key, urls)] = line
        for fut in cf.as_completed(list(pending)):
            report(record(fut.result(), pending.pop(fut)))
        finished = True
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=finished, cancel_futures=True)
        bar.close()
        manifest.close()
        session.close()
    return status, errors, time.monotonic() - start


@cli.entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.log_level)
    plan = check_paths(args)
    with exclusive_lock(plan.out, plan.lock_name):
        return download_all(args, plan)


if __name__ == "__main__":
    sys.exit(main())
