"""The images of a published CSV (recall or ranking format) into one directory:
``download_images(ImageJob(...))`` is what ``download_images.py`` runs. Everything is
checked before the first request; ``OUT/manifest.jsonl`` gets one line per image (and per
bad row left out) as each result arrives."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from utils import cli
from utils.args import IMAGE_DOWNLOADS, Downloads
from utils.formats import RankRow, iter_rank_csv, iter_recall_csv, sniff_format
from utils.io import exclusive_lock, write_error

from .http import open_session
from .images import DEFAULT_MAX_BYTES, FetchResult, clean_stale_temps, download_one, parse_url_map

log = logging.getLogger("download_images")
MAX_PRINTED_FAILURES = 20


@dataclass(frozen=True)
class ImageJob:
    """What ``download_images.py`` is asked (its flags, as library parameters)."""

    csv: str
    out: str
    net: Downloads = IMAGE_DOWNLOADS
    format: str = "auto"  # auto | recall | rank
    max_bytes: int = DEFAULT_MAX_BYTES
    max_failures: str = "0"  # N or P%
    limit: int | None = None  # the first N rows (after the shard)
    shard: tuple[int, int] | None = None  # (I, N): the rows whose line L has (L-1) % N == I
    url_prefix_map: tuple = ()  # "OLD=NEW" strings
    max_side: int | None = None
    manifest: str | None = None  # default OUT/manifest[.shard-I-of-N].jsonl
    trust_manifest: bool = False
    skip_bad_rows: bool = False
    progress: bool = True


def _select(job: ImageJob, fmt: str):
    """The rows and bad rows (``RowError``) of the job in file order: its ``shard``, then the first ``limit``."""
    found: list = []
    rows = iter_rank_csv(job.csv, found) if fmt == "rank" else iter_recall_csv(job.csv, found)

    def in_order():
        for row in itertools.chain(rows, [None]):  # a reader adds bad rows before its next good one
            batch, found[:] = [*found, *([row] if row else [])], []
            yield from batch

    index, count = job.shard or (0, 1)
    return itertools.islice((item for item in in_order() if (item.line - 1) % count == index), job.limit)


class _Run:
    """One run of a job: checked when made (nothing is created yet); while ``recording``, its
    manifest (JSONL, each line written whole as its result arrives; a write that fails is cut
    back to the last whole line), counts, progress bar and the first failures printed."""

    def __init__(self, job: ImageJob):
        self.job, self.csv = job, str(cli.input_file(job.csv, "--csv"))
        url_map = parse_url_map(job.url_prefix_map)
        self.out = cli.output_dir(job.out, "--out")
        self.suffix = f".shard-{job.shard[0]}-of-{job.shard[1]}" if job.shard else ""
        manifest = Path(job.manifest) if job.manifest else self.out / f"manifest{self.suffix}.jsonl"
        self.manifest = cli.output_file(manifest, "--manifest")
        if Path(f"{self.manifest}.prev").is_dir():
            raise cli.UserError(f"--manifest {self.manifest}: {self.manifest}.prev (its previous copy) is a directory")
        self.log_file = cli.output_file(self.out / f"download_images{self.suffix}.log", "log file")
        self.fmt = sniff_format(self.csv) if job.format == "auto" else job.format
        errors, self.images = [], 0
        for item in _select(job, self.fmt):
            if isinstance(item, cli.RowError):
                errors.append(item)
            else:
                self.images += 2 if isinstance(item, RankRow) else 1
        self.bad = cli.bad_rows(errors, self.csv, job.skip_bad_rows)
        self.fetch = dict(net=job.net, max_bytes=job.max_bytes, max_side=job.max_side, url_map=url_map)
        self.status, self.kinds = Counter(), Counter()

    @contextlib.contextmanager
    def recording(self):
        """The manifest (the previous one kept as ``.prev``) and the progress bar, for the block."""
        if self.manifest.is_file():
            os.replace(self.manifest, f"{self.manifest}.prev")
        try:
            self.fd = os.open(self.manifest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise write_error(e, self.manifest) from None
        self.bar = tqdm(total=self.images + self.bad, unit="img", dynamic_ncols=True, disable=not self.job.progress)
        try:
            yield
        finally:
            self.bar.close()
            with contextlib.suppress(OSError):
                os.fsync(self.fd)
            os.close(self.fd)

    def record(self, rec: dict) -> None:
        data = memoryview((json.dumps(rec, ensure_ascii=False) + "\n").encode())
        whole = os.lseek(self.fd, 0, os.SEEK_CUR)  # the manifest's whole lines so far
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError as e:
            os.ftruncate(self.fd, whole)
            raise write_error(e, self.manifest) from None
        self.status[rec["status"]] += 1
        self.bar.update(1)
        if rec["status"] != "failed":
            return
        self.kinds[rec.get("error_kind") or "error"] += 1
        msg = f"{self.job.csv}:{rec['line']}: {rec.get('key') or 'bad row'}: {rec.get('error')}"
        log.warning("failed %s", msg)
        if self.kinds.total() <= MAX_PRINTED_FAILURES + 1:
            more = "(further failures only in the manifest and log)"
            tqdm.write(f"FAILED {msg}" if self.kinds.total() <= MAX_PRINTED_FAILURES else more, file=sys.stderr)

    def summary(self, seconds: float) -> dict:
        done = {k: self.status[k] for k in ("ok", "skipped", "failed")}
        spec, total = self.job.max_failures, sum(done.values())
        allowed = cli.allowed_count(spec, total)
        over = f"{done['failed']} of {total} images could not be downloaded, more than --max-failures {spec}"
        over += f" (= {allowed})" if spec.endswith("%") else ""
        over += f"; see {self.manifest}. Rerun to retry them, or raise --max-failures."
        run = dict(bad_rows=self.bad, errors=dict(self.kinds.most_common()), seconds=seconds)
        over_budget = over if done["failed"] > allowed else None
        return {**done, **run, "manifest": str(self.manifest), "over_budget": over_budget}


def _unchanged(manifest: Path, out: Path) -> dict:
    """key -> a ``skipped`` result for each file of the manifest this run replaces that kept its
    recorded size and mtime (--trust-manifest: neither decoded nor hashed again)."""
    kept: dict = {}
    with contextlib.suppress(OSError, UnicodeDecodeError), open(manifest, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                name, key, size, mtime = rec["file"], rec["key"], rec["bytes"], rec["mtime_ns"]
                st = (out / name).stat() if rec["status"] in ("ok", "skipped") and Path(name).name == name else None
            except (ValueError, TypeError, KeyError, OSError):  # not a record of a file that is still there
                continue
            if st and Path(name).stem == key and (st.st_size, st.st_mtime_ns) == (size, mtime):
                known = {k: rec.get(k) for k in ("width", "height", "sha256")}
                kept[key] = FetchResult(key, "skipped", bytes=size, file=name, mtime_ns=mtime, **known)
    return kept


def _fetch(session, run: _Run, previous: dict, key: str, urls: list) -> FetchResult:
    if key in previous:
        return previous[key]
    try:
        return download_one(session, urls, run.out, key, **run.fetch)
    except cli.UserError:
        raise  # the disk is full: every other image would fail too
    except Exception as e:  # noqa: BLE001 - one bad image must not stop a million-row run
        log.exception("unexpected error for %s", key)
        err = f"internal error: {type(e).__name__}: {e}"
        return FetchResult(key, "failed", urls[0] if urls else None, error=err, error_kind="internal")


def _download_all(run: _Run, previous: dict) -> None:
    """A bounded window of downloads (memory stays flat at any size), each result recorded as it arrives."""
    workers = run.job.net.workers
    session = open_session(run.job.net, [new for _, new in run.fetch["url_map"]])
    pending: dict = {}
    pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="dl")

    def settle(block_until: int) -> None:
        while len(pending) > block_until:
            for fut in cf.wait(pending, return_when=cf.FIRST_COMPLETED)[0]:
                result = fut.result()
                run.record({"key": result.key, "line": pending.pop(fut), **asdict(result)})

    try:
        for item in _select(run.job, run.fmt):
            if isinstance(item, cli.RowError):
                bad = dict(key=None, line=item.line, status="failed", url=None, http=None)
                run.record({**bad, "error": item.message, "error_kind": "bad_row"})
                continue
            pairs = [(item.key_a, item.urls_a()), (item.key_b, item.urls_b())] if isinstance(item, RankRow) else None
            for key, urls in pairs or [(item.key, [item.url])]:
                settle(workers * 4 - 1)
                pending[pool.submit(_fetch, session, run, previous, key, urls)] = item.line
        settle(0)
    except KeyboardInterrupt:
        pending.clear()  # do not wait for the downloads under way: their part files go with them
        raise
    finally:  # after an error (a full disk), the downloads under way end and clean up first
        pool.shutdown(wait=bool(pending), cancel_futures=True)
        session.close()


def download_images(job: ImageJob) -> dict:
    """The whole of ``download_images.py``: the job checked, then run; the summary (``image_summary``)."""
    run = _Run(job)
    with (  # every line in the file alone: the run prints the first failures itself
        exclusive_lock(run.out, f".lock{run.suffix}"),
        cli.logging_to(run.log_file, "%(asctime)s %(levelname)s %(message)s", log, alone=True),
    ):
        start = time.monotonic()
        try:
            log.info("start: csv=%s format=%s out=%s %s", job.csv, run.fmt, run.out, job)
            if removed := clean_stale_temps(run.out):
                log.info("removed %d stale temporary files", removed)
            previous = _unchanged(run.manifest, run.out) if job.trust_manifest else {}
            with run.recording():  # replaces the manifest
                _download_all(run, previous)
            summary = run.summary(time.monotonic() - start)
            for line in image_summary(summary).splitlines():
                log.info("summary: %s", line)
            return summary
        except KeyboardInterrupt:
            log.info("interrupted; finished downloads are kept and recorded")
            raise


def image_summary(s: dict) -> str:
    """The summary of ``download_images`` as the lines ``download_images.py`` prints."""
    done = s["ok"] + s["skipped"] + s["failed"]
    rate = done / s["seconds"] if s["seconds"] > 0 else 0.0
    counts = ", ".join(f"{k} {s[k]}" for k in ("ok", "skipped", "failed"))
    lines = [f"{done} images/rows in {s['seconds']:.1f} s ({rate:.1f}/s): {counts}"]
    if s["errors"]:
        lines.append("failures by error: " + ", ".join(f"{k} {v}" for k, v in s["errors"].items()))
    return "\n".join([*lines, f"manifest: {s['manifest']}"])
