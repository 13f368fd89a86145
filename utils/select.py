"""Helpers of ``select_images.py``: the catalogue CSV, locating candidate images (local
files and URLs), the per-item orderings and the HTML report.

Catalogue CSV (UTF-8, comma-separated, with a header; extra columns are ignored):

    item_id,title,poi_names,image
    1001,西湖一日游,"西湖,雷峰塔",photos/1001_a.jpg
    1001,西湖一日游,"西湖,雷峰塔",https://example.com/1001_b

one row per candidate image. ``image`` is a local path (a relative path is resolved
against the directory of the CSV file, not the working directory) or an http(s) URL.
Rows of one item need not be adjacent; the item's title and poi_names are taken from
its first row (a differing later row is reported).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .data import DataError, RowError, open_csv
from .report import _CSS, _JS, _esc, thumbnail_data_uri

log = logging.getLogger(__name__)

COLUMNS = ("item_id", "title", "poi_names", "image")
URL_PREFIXES = ("http://", "https://")

# candidate statuses
OK = "ok"                      # readable; scored
MISSING = "missing"            # local file not found
DOWNLOAD_FAILED = "download_failed"
UNREADABLE = "unreadable"      # file exists but does not decode
DUPLICATE = "duplicate"        # same image listed earlier for the same item
NOT_SCORED = (MISSING, DOWNLOAD_FAILED, UNREADABLE)


@dataclass
class Candidate:
    line: int
    item_id: str
    title: str
    poi_names: str
    image: str                      # as written in the CSV
    file: str | None = None         # local file read for it (resolved path or downloaded copy)
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
def read_catalogue(path: str | os.PathLike, errors: list[RowError]) -> list[Item]:
    """Items of the catalogue in order of first appearance. Bad rows (missing columns,
    empty item_id or image, unreadable CSV) go to ``errors`` with their line number and
    are left out; a file without the required header raises ``DataError``."""
    path = str(path)
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
            raise DataError(f"{path}:1: the header lacks column(s) {', '.join(absent)} "
                            f"(expected {','.join(COLUMNS)}; found {','.join(header)})")
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
                errors.append(RowError(path, start, f"{len(fields)} fields, the header has "
                                       f"{len(header)}" + (f": no {', '.join(lacking)}" if lacking else "")))
                continue
            item_id, title, pois, image = (fields[col[c]] for c in COLUMNS)
            item_id, image = item_id.strip(), image.strip()
            if not item_id or not image:
                errors.append(RowError(path, start, "empty " + " and ".join(
                    n for n, v in (("item_id", item_id), ("image", image)) if not v)))
                continue
            it = items.get(item_id)
            if it is None:
                it = items[item_id] = Item(item_id, title, pois, start)
            elif (title, pois) != (it.title, it.poi_names):
                log.warning("%s:%d: item %s has a different title/poi_names than on line %d; "
                            "using line %d's", path, start, item_id, it.line, it.line)
            it.cands.append(Candidate(start, item_id, it.title, it.poi_names, image))
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


def resolve_images(items: list[Item], csv_dir: str | os.PathLike, image_cache: str | os.PathLike,
                   workers: int = 8, timeout: float = 30.0, progress: bool = True) -> dict:
    """Set ``file`` (or a failure status) of every candidate. Local paths are resolved
    against ``csv_dir``; each distinct URL is downloaded once into ``image_cache`` as
    ``u<sha256(url)[:32]>.<ext>`` (an existing valid file is reused, not fetched).
    Returns counts ``{"local", "missing", "urls", "downloaded", "reused", "failed"}``."""
    from .download import download_one, make_session

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
        return url, download_one(session, [url], image_cache, url_stem(url),
                                 timeout=(min(10.0, timeout), timeout))

    with ThreadPoolExecutor(max(1, workers)) as ex:
        for url, res in tqdm(ex.map(fetch, list(urls)), total=len(urls), desc="download",
                             unit="img", disable=not progress, leave=False):
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
    log.info("images: %d local (%d missing); %d distinct URLs: %d downloaded, %d reused from %s, "
             "%d failed", counts["local"], counts["missing"], counts["urls"], counts["downloaded"],
             counts["reused"], image_cache, counts["failed"])
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
OUTPUT_HEADER = ("item_id", "line", "image", "status", "recall_score", "recall_rank",
                 "ranker_score", "final_rank", "selected", "file", "detail")


def _num(x) -> str:
    if x is None:
        return ""
    return f"{x:.9g}" if isinstance(x, float) else str(x)


def write_output(path: str | os.PathLike, items: list[Item]) -> int:
    """One row per candidate, items in input order, candidates in CSV order."""
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    n = 0
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(OUTPUT_HEADER)
        for it in items:
            for c in it.cands:
                w.writerow((c.item_id, c.line, c.image, c.status, _num(c.recall_score),
                            _num(c.recall_rank), _num(c.ranker_score), _num(c.final_rank),
                            int(c.selected), c.file or "", c.detail))
                n += 1
    os.replace(tmp, path)
    return n


_SELECT_CSS = """
figure.sel img,figure.sel .none{border-color:#2a2;border-width:3px}
figure.sel figcaption{color:#070;font-weight:bold}
figure.short img{outline:1px dashed #88c}
figure.bad img,figure.bad .none,figure.dup img{opacity:.45}
figure.bad figcaption,figure.dup figcaption{color:#a33}
.legend{color:#555;margin:0 0 8px}
"""


def _display_order(it: Item) -> list[Candidate]:
    ranked = sorted((c for c in it.cands if c.final_rank is not None), key=lambda c: c.final_rank)
    return ranked + [c for c in it.cands if c.final_rank is None]


def write_report(path: str | os.PathLike, items: list[Item], summary: dict | None = None,
                 title: str = "Image selection", page_size: int = 50, workers: int = 4,
                 progress: bool = True) -> dict:
    """A self-contained HTML page (same machinery as the recall report: thumbnails
    embedded once each, 50 items a page): every item, its candidates in final order,
    the selected one framed green, candidates that reached the ranker outlined, the
    ones not scored (missing, unreadable, duplicate) faded at the end. Items without a
    selection come first. Returns ``{"thumbnails", "missing", "bytes"}``."""
    shown = sorted(items, key=lambda it: it.selected is not None)  # stable: no selection first
    files = list(dict.fromkeys(c.file for it in shown for c in it.cands
                               if c.file and c.status in (OK, DUPLICATE, UNREADABLE)))

    with ThreadPoolExecutor(max(1, workers)) as ex:
        uris = list(tqdm(ex.map(thumbnail_data_uri, files), total=len(files), desc="thumbnails",
                         unit="img", disable=not progress, leave=False))
    tid, thumbs = {}, {}
    for f, uri in zip(files, uris):
        if uri is not None:
            tid[f] = f"t{len(thumbs)}"
            thumbs[tid[f]] = uri

    out = ['<!doctype html>\n<html lang="zh"><head><meta charset="utf-8">',
           f"<title>{_esc(title)}</title><style>{_CSS}{_SELECT_CSS}</style></head><body>",
           f"<h1>{_esc(title)}</h1>", '<p class="summary">']
    for key, val in (summary or {}).items():
        out.append(f"<span><b>{_esc(key)}</b>: {_esc(val)}</span>")
    out.append("</p>")
    out.append('<p class="legend">green frame: selected; dashed outline: scored by the ranker; '
               'caption: #final rank, ranker score, recall score (recall rank); faded: not '
               'scored. Items without a selection come first.</p>')
    out.append('<div id="thumb-check" data-loaded="" data-total=""></div>')
    out.append('<nav id="pager"></nav>')
    for a in range(0, len(shown), page_size):
        chunk = shown[a:a + page_size]
        out.append(f'<section class="page" data-label="{a + 1}-{a + len(chunk)}">')
        for it in chunk:
            sel = it.selected
            res = (f"selected line {sel.line}" if sel else "no readable candidate: nothing selected")
            out.append(f'<div class="poi{"" if sel else " miss"}"><div class="head">'
                       f'<span class="id">{_esc(it.item_id)}</span><b>{_esc(it.title)}</b>'
                       + (f' <span class="id">POIs: {_esc(it.poi_names)}</span>' if it.poi_names.strip() else "")
                       + f'<span class="res">{_esc(res)}</span></div><div class="row">')
            for c in _display_order(it):
                cls = ("sel" if c.selected else "short" if c.ranker_score is not None else
                       "dup" if c.status == DUPLICATE else "bad" if c.status != OK else "")
                name = os.path.basename(c.image.split("?", 1)[0]) or c.image
                pic = (f'<img data-t="{tid[c.file]}" alt="{_esc(name)}" width="96" height="96">'
                       if c.file in tid and c.status != UNREADABLE else '<div class="none">no image</div>')
                if c.final_rank is not None:
                    cap = f"#{c.final_rank}"
                    if c.ranker_score is not None:
                        cap += f" r {c.ranker_score:.3f}"
                    cap += f"<br>recall {c.recall_score:.3f} ({c.recall_rank})"
                else:
                    cap = _esc(c.status)
                out.append(f'<figure class="{cls}" title="{_esc(c.image)} (line {c.line}) '
                           f'{_esc(c.detail)}">{pic}<figcaption>{cap}<br>{_esc(name)}</figcaption></figure>')
            out.append("</div></div>")
        out.append("</section>")
    blob = json.dumps(thumbs, separators=(",", ":")).replace("</", "<\\/")
    out.append(f'<script id="thumbs" type="application/json">{blob}</script>')
    out.append(f"<noscript>Thumbnails need JavaScript.</noscript><script>{_JS}</script></body></html>\n")
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(out))
    os.replace(tmp, path)
    size = os.path.getsize(path)
    log.info("wrote %s: %d items, %d thumbnails (%d files without one), %.1f MB", path, len(shown),
             len(thumbs), len(files) - len(thumbs), size / 1e6)
    return {"thumbnails": len(thumbs), "missing": len(files) - len(thumbs), "bytes": size}
