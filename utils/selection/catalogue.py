"""The catalogue of ``select_images.py``: a UTF-8 CSV (header ``item_id,title,poi_names,image``) or a Parquet
file with those columns (row i is line i + 2), one row per candidate image, grouped into items (title and
poi_names from the item's first row); images resolved (URLs downloaded once); the output rows."""

from __future__ import annotations

from utils.cli import DataError, RowError

import csv
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from utils.args import Downloads
from utils.formats import csv_records
from utils.io import atomic_write

log = logging.getLogger(__name__)

COLUMNS = ("item_id", "title", "poi_names", "image")

# candidate statuses
OK = "ok"  # readable; scored
MISSING = "missing"  # local file not found
DOWNLOAD_FAILED = "download_failed"
UNREADABLE = "unreadable"  # file exists but does not decode
DUPLICATE = "duplicate"  # same image listed earlier for the same item
STATUSES = (OK, MISSING, DOWNLOAD_FAILED, UNREADABLE, DUPLICATE)


@dataclass
class Candidate:
    line: int
    item_id: str
    title: str
    poi_names: str
    image: str  # as written in the catalogue
    file: str | None = None  # the local file read for it (resolved path or downloaded copy)
    status: str = OK
    detail: str = ""
    recall_score: float | None = None
    recall_rank: int | None = None
    ranker_score: float | None = None
    final_rank: int | None = None
    selected: bool = False

    @property
    def is_url(self) -> bool:
        return self.image.lower().startswith(("http://", "https://"))


@dataclass
class Item:
    item_id: str
    title: str
    poi_names: str
    line: int
    cands: list[Candidate] = field(default_factory=list)

    @property
    def scored(self) -> list[Candidate]:
        """Readable, non-duplicate candidates, in catalogue order."""
        return [c for c in self.cands if c.status == OK]

    @property
    def selected(self) -> Candidate | None:
        return next((c for c in self.cands if c.selected), None)


def is_parquet(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith((".parquet", ".pq"))


def _lacking(path: str, line: int, found: list[str]) -> None:
    if absent := [c for c in COLUMNS if c not in found]:
        raise DataError(f"{path}:{line}: the header lacks {', '.join(absent)} (expected {','.join(COLUMNS)})")


def _csv_rows(path: str, errors: list[RowError]):
    """``(line, fields)`` of a CSV catalogue, decoded line by line (a bad byte: a bad row at its line)."""
    seen = len(errors)
    rows = csv_records(path, errors, starts=True)  # the line a record starts on, as the summary and page say
    line, header = next(rows, (1, None))
    if len(errors) > seen:
        raise DataError(f"{errors[seen]} (the header)")
    if header is None:
        raise DataError(f"{path}: empty file (expected the header {','.join(COLUMNS)})")
    header = [h.strip() for h in header]
    _lacking(path, line, header)
    col = [header.index(c) for c in COLUMNS]
    for line, fields in rows:
        if len(fields) < len(header):
            lacking = [c for c, i in zip(COLUMNS, col) if i >= len(fields)]
            why = f"{len(fields)} fields, the header has {len(header)}"
            errors.append(RowError(path, line, why + (f": no {', '.join(lacking)}" if lacking else "")))
            continue
        yield line, [fields[i] for i in col]


def _parquet_rows(path: str, groups: list[int] | None, line: int):
    """``(line, fields)`` of the row ``groups`` (None: all) whose first row is ``line``."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # not a Parquet file, truncated ...
        raise DataError(f"{path}: unreadable Parquet file ({type(e).__name__}: {e})") from None
    _lacking(path, 1, pf.schema_arrow.names)
    for batch in pf.iter_batches(columns=list(COLUMNS), row_groups=groups):
        for values in zip(*(batch.column(c).to_pylist() for c in COLUMNS)):
            yield line, ["" if v is None else str(v) for v in values]
            line += 1


def catalogue_rows(path: str, errors: list[RowError], groups: list[int] | None = None, line: int = 2):
    """Usable rows ``(line, item_id, title, poi_names, image)`` (Parquet: ``groups`` from ``line``); bad: ``errors``."""
    rows = _parquet_rows(path, groups, line) if is_parquet(path) else _csv_rows(path, errors)
    for line, (item_id, title, pois, image) in rows:
        item_id, image = item_id.strip(), image.strip()
        if not item_id or not image:
            empty = " and ".join(n for n, v in (("item_id", item_id), ("image", image)) if not v)
            errors.append(RowError(path, line, "empty " + empty))
            continue
        yield line, item_id, title, pois, image


def group_items(rows, path: str) -> list[Item]:
    """Items of ``catalogue_rows`` (in line order), in order of first appearance."""
    items: dict[str, Item] = {}
    for line, item_id, title, pois, image in rows:
        it = items.get(item_id)
        if it is None:
            it = items[item_id] = Item(item_id, title, pois, line)
        elif (title, pois) != (it.title, it.poi_names):
            log.warning("%s:%d: item %s: title/poi_names differ from line %d's, kept", path, line, item_id, it.line)
        it.cands.append(Candidate(line, item_id, it.title, it.poi_names, image))
    return list(items.values())


def mark_duplicates(items: list[Item]) -> int:
    """Mark the candidates repeating an image (URL or resolved file) earlier in their item; returns how many."""
    n = 0
    for it in items:
        first: dict[str, Candidate] = {}
        for c in it.cands:
            key = c.image if c.is_url else (os.path.realpath(c.file) if c.file else c.image)
            if (earlier := first.setdefault(key, c)) is not c:
                c.status, c.detail = DUPLICATE, f"same image as line {earlier.line}"
                n += 1
    return n


def url_stem(url: str) -> str:
    """Cache file stem of a URL: stable across runs, so a rerun reuses the download."""
    return "u" + hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]


def resolve_images(items: list[Item], csv_dir, image_cache, net: Downloads, progress: bool) -> dict:
    """Each candidate's ``file`` or failure status: paths against ``csv_dir``, URLs fetched once; returns counts."""
    from utils.fetch import download_one, open_session

    counts = dict.fromkeys(("local", "missing", "urls", "downloaded", "reused", "failed"), 0)
    urls: dict[str, list[Candidate]] = {}
    for c in (c for it in items for c in it.cands):
        if c.is_url:
            urls.setdefault(c.image, []).append(c)
            continue
        c.file = str(Path(csv_dir, os.path.expanduser(c.image)))  # an absolute path stays as it is
        counts["local"] += 1
        if not os.path.isfile(c.file):
            c.status, c.detail = MISSING, f"no such file: {c.file}"
            counts["missing"] += 1
    counts["urls"] = len(urls)
    if not urls:
        return counts
    Path(image_cache).mkdir(parents=True, exist_ok=True)
    with open_session(net) as session, ThreadPoolExecutor(net.workers) as ex:
        done = zip(urls, ex.map(lambda url: download_one(session, [url], image_cache, url_stem(url), net), urls))
        for url, res in tqdm(done, total=len(urls), desc="download", unit="img", disable=not progress, leave=False):
            for c in urls[url]:
                if res.status in ("ok", "skipped"):
                    c.file = str(Path(image_cache) / res.file)
                else:
                    c.status, c.detail = DOWNLOAD_FAILED, res.error or res.error_kind or "failed"
            counts[{"ok": "downloaded", "skipped": "reused"}.get(res.status, "failed")] += 1
            if res.status == "failed":
                log.warning("download failed: %s (%s)", url, res.error)
    log.info("images: %s (cache %s)", ", ".join(f"{v} {k}" for k, v in counts.items()), image_cache)
    return counts


OUTPUT_HEADER = tuple(
    "item_id line image status recall_score recall_rank ranker_score final_rank selected file detail".split()
)


def output_rows(items: list[Item]):
    """One tuple of ``OUTPUT_HEADER`` fields per candidate (None where empty)."""
    for c in (c for it in items for c in it.cands):
        yield tuple(getattr(c, f) for f in OUTPUT_HEADER[:8]) + (int(c.selected), c.file or "", c.detail)


def write_output(path: str | os.PathLike, rows) -> None:
    """The output CSV of ``output_rows`` (atomically), floats to 9 digits."""
    with atomic_write(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(OUTPUT_HEADER)
        w.writerows([f"{x:.9g}" if isinstance(x, float) else x for x in row] for row in rows)  # csv: None empty
