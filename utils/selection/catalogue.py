"""Helpers of ``select_images.py`` (local and Ray paths): the catalogue, locating
candidate images (local files and URLs), the per-item scores and orderings, the output
rows and the HTML report.

Catalogue: a CSV (UTF-8, comma-separated, with a header; extra columns are ignored) or a
Parquet file with the same columns (``.parquet``/``.pq``; row i counts as line i + 2, as
if it were a CSV with a header):

    item_id,title,poi_names,image
    1001,西湖一日游,"西湖,雷峰塔",photos/1001_a.jpg
    1001,西湖一日游,"西湖,雷峰塔",https://example.com/1001_b

one row per candidate image. ``image`` is a local path (a relative path is resolved
against the directory of the CSV file, not the working directory) or an http(s) URL.
Rows of one item need not be adjacent; the item's title and poi_names are taken from
its first row (a differing later row is reported).
"""

from __future__ import annotations

from utils.cli import DataError, RowError, check_finite

import csv
import hashlib
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from utils.formats import open_csv
from utils.io import atomic_write

log = logging.getLogger(__name__)

COLUMNS = ("item_id", "title", "poi_names", "image")
URL_PREFIXES = ("http://", "https://")

# candidate statuses
OK = "ok"  # readable; scored
MISSING = "missing"  # local file not found
DOWNLOAD_FAILED = "download_failed"
UNREADABLE = "unreadable"  # file exists but does not decode
DUPLICATE = "duplicate"  # same image listed earlier for the same item
NOT_SCORED = (MISSING, DOWNLOAD_FAILED, UNREADABLE)


@dataclass
class Candidate:
    line: int
    item_id: str
    title: str
    poi_names: str
    image: str  # as written in the CSV
    file: str | None = None  # local file read for it (resolved path or downloaded copy)
    status: str = OK
    detail: str = ""
    duplicate_of: int | None = None  # CSV line of the first listing, for duplicates
    recall_score: float | None = None
    recall_rank: int | None = None
    ranker_score: float | None = None
    final_rank: int | None = None
    selected: bool = False

    @property
    def is_url(self) -> bool:
        return self.image.lower().startswith(URL_PREFIXES)


@dataclass
class Item:
    item_id: str
    title: str
    poi_names: str
    line: int
    cands: list[Candidate] = field(default_factory=list)

    @property
    def scored(self) -> list[Candidate]:
        """Readable, non-duplicate candidates, in CSV order."""
        return [c for c in self.cands if c.status == OK]

    @property
    def selected(self) -> Candidate | None:
        return next((c for c in self.cands if c.selected), None)


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------
PARQUET_SUFFIXES = (".parquet", ".pq")


def is_parquet(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(PARQUET_SUFFIXES)


def _add_row(items: dict, errors: list, path: str, line: int, item_id: str, title: str, pois: str, image: str) -> None:
    item_id, image = item_id.strip(), image.strip()
    if not item_id or not image:
        errors.append(
            RowError(
                path, line, "empty " + " and ".join(n for n, v in (("item_id", item_id), ("image", image)) if not v)
            )
        )
        return
    it = items.get(item_id)
    if it is None:
        it = items[item_id] = Item(item_id, title, pois, line)
    elif (title, pois) != (it.title, it.poi_names):
        log.warning(
            "%s:%d: item %s has a different title/poi_names than on line %d; using line %d's",
            path,
            line,
            item_id,
            it.line,
            it.line,
        )
    it.cands.append(Candidate(line, item_id, it.title, it.poi_names, image))


def _read_parquet(path: str, errors: list[RowError]) -> list[Item]:
    import pyarrow.parquet as pq  # only for a Parquet catalogue

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # not a Parquet file, truncated ...
        raise DataError(f"{path}: unreadable Parquet file ({type(e).__name__}: {e})") from None
    names = pf.schema_arrow.names
    absent = [c for c in COLUMNS if c not in names]
    if absent:
        raise DataError(
            f"{path}: the table lacks column(s) {', '.join(absent)} "
            f"(expected {','.join(COLUMNS)}; found {','.join(names)})"
        )
    items: dict[str, Item] = {}
    line = 2
    for batch in pf.iter_batches(columns=list(COLUMNS)):
        cols = [batch.column(c).to_pylist() for c in COLUMNS]
        for item_id, title, pois, image in zip(*cols):
            _add_row(items, errors, path, line, *("" if v is None else str(v) for v in (item_id, title, pois, image)))
            line += 1
    return list(items.values())


def read_catalogue(path: str | os.PathLike, errors: list[RowError]) -> list[Item]:
    """Items of the catalogue in order of first appearance. Bad rows (missing columns,
    empty item_id or image, unreadable CSV) go to ``errors`` with their line number and
    are left out; a file without the required header raises ``DataError``."""
    path = str(path)
    if is_parquet(path):
        return _read_parquet(path, errors)
    items: dict[str, Item] = {}
    with open_csv(path) as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path}: unreadable CSV header ({e})") from None
        if header is None:
            raise DataError(f"{path}: empty file (expected the header {','.join(COLUMNS)})")
        header = [h.strip() for h in header]
        absent = [c for c in COLUMNS if c not in header]
        if absent:
            raise DataError(
                f"{path}:1: the header lacks column(s) {', '.join(absent)} "
                f"(expected {','.join(COLUMNS)}; found {','.join(header)})"
            )
        col = {c: header.index(c) for c in COLUMNS}
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as e:
                errors.append(RowError(path, reader.line_num, f"unreadable CSV ({e})"))
                continue
            if not fields or all(not x.strip() for x in fields):
                continue
            if len(fields) < len(header):
                lacking = [c for c in COLUMNS if col[c] >= len(fields)]
                errors.append(
                    RowError(
                        path,
                        start,
                        f"{len(fields)} fields, the header has "
                        f"{len(header)}" + (f": no {', '.join(lacking)}" if lacking else ""),
                    )
                )
                continue
            _add_row(items, errors, path, start, *(fields[col[c]] for c in COLUMNS))
    return list(items.values())


def mark_duplicates(items: list[Item]) -> int:
    """Mark a candidate listing the same image (same URL, or same resolved local file)
    as an earlier candidate of the same item; returns how many were marked."""
    n = 0
    for it in items:
        first: dict[str, Candidate] = {}
        for c in it.cands:
            key = c.image if c.is_url else (os.path.realpath(c.file) if c.file else c.image)
            if key in first:
                c.status, c.duplicate_of = DUPLICATE, first[key].line
                c.detail = f"same image as line {first[key].line}"
                n += 1
            else:
                first[key] = c
    return n


def url_stem(url: str) -> str:
    """Cache file stem of a URL: stable across runs, so a rerun reuses the download."""
    return "u" + hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]


def resolve_images(
    items: list[Item],
    csv_dir: str | os.PathLike,
    image_cache: str | os.PathLike,
    workers: int = 8,
    timeout: float = 30.0,
    progress: bool = True,
) -> dict:
    """Set ``file`` (or a failure status) of every candidate. Local paths are resolved
    against ``csv_dir``; each distinct URL is downloaded once into ``image_cache`` as
    ``u<sha256(url)[:32]>.<ext>`` (an existing valid file is reused, not fetched).
    Returns counts ``{"local", "missing", "urls", "downloaded", "reused", "failed"}``."""
    from utils.fetch import download_one, make_session

    cands = [c for it in items for c in it.cands]
    counts = {"local": 0, "missing": 0, "urls": 0, "downloaded": 0, "reused": 0, "failed": 0}
    urls: dict[str, list[Candidate]] = {}
    for c in cands:
        if c.is_url:
            urls.setdefault(c.image, []).append(c)
            continue
        p = Path(os.path.expanduser(c.image))
        if not p.is_absolute():
            p = Path(csv_dir) / p
        c.file = str(p)
        counts["local"] += 1
        if not p.is_file():
            c.status, c.detail = MISSING, f"no such file: {p}"
            counts["missing"] += 1
    counts["urls"] = len(urls)
    if not urls:
        return counts
    Path(image_cache).mkdir(parents=True, exist_ok=True)
    session = make_session(pool_size=max(1, workers))

    def fetch(url):
        return url, download_one(session, [url], image_cache, url_stem(url), timeout=(min(10.0, timeout), timeout))

    with ThreadPoolExecutor(max(1, workers)) as ex:
        for url, res in tqdm(
            ex.map(fetch, list(urls)), total=len(urls), desc="download", unit="img", disable=not progress, leave=False
        ):
            for c in urls[url]:
                if res.status in ("ok", "skipped"):
                    c.file = str(Path(image_cache) / res.file)
                else:
                    c.status, c.detail = DOWNLOAD_FAILED, res.error or res.error_kind or "failed"
            key = {"ok": "downloaded", "skipped": "reused"}.get(res.status, "failed")
            counts[key] += 1
            if res.status == "failed":
                log.warning("download failed: %s (%s)", url, res.error)
    session.close()
    log.info(
        "images: %d local (%d missing); %d distinct URLs: %d downloaded, %d reused from %s, %d failed",
        counts["local"],
        counts["missing"],
        counts["urls"],
        counts["downloaded"],
        counts["reused"],
        image_cache,
        counts["failed"],
    )
    return counts


# ---------------------------------------------------------------------------
# orderings
# ---------------------------------------------------------------------------
def order_desc(cands: list[Candidate], key) -> list[Candidate]:
    """Stable descending sort by ``key(c)``: ties keep the incoming order."""
    return sorted(cands, key=lambda c: -key(c))


def assign_recall_ranks(item: Item) -> list[Candidate]:
    """Recall rank 1.. by recall score (ties: CSV order); returns the ordered list."""
    ranked = order_desc(item.scored, lambda c: c.recall_score)
    for r, c in enumerate(ranked, 1):
        c.recall_rank = r
    return ranked


def score_recall(items: list[Item], image_vec, title_vec) -> None:
    """Stage 1: ``recall_score`` = image vector . title vector for every scored candidate
    (``image_vec[file]``, ``title_vec[title]``: normalised torch/numpy vectors), then the
    recall ranks. A non-finite score (NaN weights) is a ``DataError``."""
    for it in items:
        tvec = title_vec[it.title]
        for c in it.scored:
            c.recall_score = check_finite(
                float(image_vec[c.file] @ tvec), f"recall score of item {it.item_id} line {c.line}"
            )
        assign_recall_ranks(it)


def shortlist(items: list[Item], k: int) -> list[Candidate]:
    """The candidates stage 2 scores: the top ``k`` of every item by recall rank, in
    item order, CSV order within an item."""
    return [c for it in items for c in it.scored if c.recall_rank <= k]


def set_ranker_scores(cands: list[Candidate], scores, where: str = "") -> None:
    """Stage 2 scores, in the order of ``cands``. A non-finite score (a POI table or
    a checkpoint holding NaN/inf) is a ``DataError`` naming the candidate: nothing is
    selected on a NaN."""
    scores = [float(x) for x in scores]
    if len(scores) != len(cands):
        raise ValueError(f"{len(scores)} ranker scores for {len(cands)} candidates")
    for c, x in zip(cands, scores):
        if not math.isfinite(x):
            raise DataError(
                f"ranker score of item {c.item_id} line {c.line}{where} is {x}: the POI "
                f"vectors of its POIs ({c.poi_names!r}) or the ranker checkpoint hold "
                f"NaN/inf values; nothing is selected on such a score"
            )
        c.ranker_score = x


def assign_final_ranks(item: Item) -> list[Candidate]:
    """Final order: candidates scored by the ranker, by ranker score (ties: recall
    rank), then the rest by recall rank. Rank 1 is selected. Returns the ordered list."""
    by_recall = sorted(item.scored, key=lambda c: c.recall_rank)
    stage2 = order_desc([c for c in by_recall if c.ranker_score is not None], lambda c: c.ranker_score)
    final = stage2 + [c for c in by_recall if c.ranker_score is None]
    for r, c in enumerate(final, 1):
        c.final_rank = r
        c.selected = r == 1
    return final


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------
OUTPUT_HEADER = (
    "item_id",
    "line",
    "image",
    "status",
    "recall_score",
    "recall_rank",
    "ranker_score",
    "final_rank",
    "selected",
    "file",
    "detail",
)


def _num(x) -> str:
    if x is None:
        return ""
    return f"{x:.9g}" if isinstance(x, float) else str(x)


def output_rows(items: list[Item]):
    """One tuple per candidate (the fields of ``OUTPUT_HEADER``, None where empty), items
    in input order, candidates in CSV order."""
    for it in items:
        for c in it.cands:
            yield (
                c.item_id,
                c.line,
                c.image,
                c.status,
                c.recall_score,
                c.recall_rank,
                c.ranker_score,
                c.final_rank,
                int(c.selected),
                c.file or "",
                c.detail,
            )


def format_row(row) -> list[str]:
    """The CSV text of an output row (floats with 9 significant digits)."""
    return [_num(x) for x in row]


def write_output(path: str | os.PathLike, items: list[Item]) -> int:
    """The output CSV (written atomically): one row per candidate."""
    n = 0
    with atomic_write(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(OUTPUT_HEADER)
        for row in output_rows(items):
            w.writerow(format_row(row))
            n += 1
    return n
