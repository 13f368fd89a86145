"""Readers of the two published CSV formats and the image naming scheme.

Recall set (SPEC section 4): comma CSV without header,
    poi_id, poi_name, image_url, rank_number, width, height, extend
Ranking sets (SPEC section 5): one record a line, fields joined by the literal
string ``$record$``,
    item_id, url_a, url_b, ctr_a, ctr_b, title, cate_name, oss_url, oss_url2, poi_names

Bad rows: pass ``errors=[]`` to collect them as ``RowError`` (file, line, message) and
keep going; without it the first bad row raises ``DataError`` naming the file and line.
"""

from __future__ import annotations

from utils.cli import DataError, RowError, bad_rows, check_finite, record_bad_row

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from utils.io import text_lines

RECORD_SEP = "$record$"
RECALL_FIELDS = ("poi_id", "poi_name", "image_url", "rank_number", "width", "height", "extend")
RANK_FIELDS = ("item_id", "url_a", "url_b", "ctr_a", "ctr_b", "title", "cate_name", "oss_url", "oss_url2", "poi_names")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class RecallRow:
    line: int
    poi_id: str
    poi_name: str
    url: str
    rank: str
    width: str = ""
    height: str = ""
    extend: str = ""

    @property
    def key(self) -> str:
        """File stem of this row's image: ``<poi_id>_<rank_number>``."""
        return f"{self.poi_id}_{self.rank}"


@dataclass(frozen=True)
class RankRow:
    line: int
    item_id: str
    url_a: str
    url_b: str
    ctr_a: float
    ctr_b: float
    title: str
    cate_name: str
    oss_url: str
    oss_url2: str
    poi_names: str

    @property
    def label(self) -> int:
        """1 when image a has the higher CTR, else 0 (SPEC section 5)."""
        return int(self.ctr_a > self.ctr_b)

    @property
    def key_a(self) -> str:
        return f"{self.item_id}_a"

    @property
    def key_b(self) -> str:
        return f"{self.item_id}_b"

    def urls_a(self) -> list[str]:
        """Durable copy first, then the original; empty URLs dropped."""
        return [u for u in (self.oss_url, self.url_a) if u]

    def urls_b(self) -> list[str]:
        return [u for u in (self.oss_url2, self.url_b) if u]


def poi_of_image(path_or_name: str) -> str:
    """Owning POI id of a gallery image: the file name before the first ``_``."""
    return os.path.basename(path_or_name).split("_", 1)[0]


def open_csv(path: str | os.PathLike):
    """A CSV file opened for ``csv.reader`` (UTF-8, BOM tolerated); an unreadable path
    is a ``DataError`` naming it. (``text_lines`` reports bad bytes at their line.)"""
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None


def iter_recall_csv(path: str | os.PathLike, errors: list | None = None) -> Iterator[RecallRow]:
    """Rows of a recall-format CSV. Blank lines are ignored."""
    path = str(path)
    reader = csv.reader(text_lines(path, errors))
    bad = lambda message: record_bad_row(errors, RowError(path, reader.line_num, message))
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            bad(f"unreadable CSV ({e})")
            continue
        if not fields or all(not x.strip() for x in fields):
            continue
        if len(fields) != len(RECALL_FIELDS):
            bad(f"expected {len(RECALL_FIELDS)} fields ({','.join(RECALL_FIELDS)}), found {len(fields)}")
            continue
        fields = [x.strip() for x in fields]
        poi_id, name, url, rank = fields[:4]
        if not poi_id or not rank:
            bad("empty poi_id or rank_number")
        elif "_" in poi_id or os.sep in poi_id or os.sep in rank:
            bad(f"poi_id {poi_id!r} / rank {rank!r} cannot name a file")
        elif not url:
            bad("empty image_url")
        else:
            yield RecallRow(reader.line_num, poi_id, name, url, rank, *fields[4:])


def read_recall_rows(path: str | os.PathLike, skip_bad_rows: bool = False) -> tuple[list[RecallRow], int]:
    """``(rows, bad)`` of a recall-format CSV under the one rule for bad rows
    (``utils.cli.bad_rows``): refused, or left out and counted with ``skip_bad_rows``."""
    errors: list = []
    rows = list(iter_recall_csv(path, errors))
    bad = bad_rows(errors, path, skip_bad_rows)
    if not rows:
        raise DataError(f"{path}: no usable recall-format rows")
    return rows, bad


def iter_rank_csv(path: str | os.PathLike, errors: list | None = None) -> Iterator[RankRow]:
    """Records of a ``$record$`` ranking CSV. Blank lines are ignored."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    bad = lambda line, message: record_bad_row(errors, RowError(path, line, message))
    for line, text in enumerate(text_lines(path, errors), 1):
        text = text.strip()  # the authors strip the whole record (so poi_names' tail)
        if not text:
            continue
        fields = text.split(RECORD_SEP)
        if len(fields) != len(RANK_FIELDS):
            bad(line, f"expected {len(RANK_FIELDS)} fields separated by '{RECORD_SEP}', found {len(fields)}")
            continue
        item_id, url_a, url_b, ctr_a, ctr_b, title, cate, oss_a, oss_b, pois = fields
        item_id = item_id.strip()
        if not item_id or os.sep in item_id:
            bad(line, f"bad item_id {item_id!r}")
            continue
        try:
            ca, cb = float(ctr_a), float(ctr_b)
        except ValueError:
            bad(line, f"ctr_a/ctr_b not numbers: {ctr_a!r}, {ctr_b!r}")
            continue
        # a label from NaN would silently be 0: never a row to skip, always an error
        check_finite(ca, f"{path}:{line}: ctr_a")
        check_finite(cb, f"{path}:{line}: ctr_b")
        row = RankRow(
            line, item_id, url_a.strip(), url_b.strip(), ca, cb, title, cate, oss_a.strip(), oss_b.strip(), pois
        )
        if not row.urls_a() or not row.urls_b():
            bad(line, "empty image URL for image a or b")
            continue
        yield row


def sniff_format(path: str | os.PathLike) -> str:
    """'rank' when the first non-blank line holds ``$record$``, else 'recall'."""
    for text in text_lines(path):
        if text.strip():
            return "rank" if RECORD_SEP in text else "recall"
    raise DataError(f"{path}: empty file")


def index_images(image_dir: str | os.PathLike) -> dict[str, Path]:
    """Map file stem -> path for every image file in ``image_dir`` (not recursive).

    Temporary download files (``.part``/``.tmp``) are not images and are skipped.
    When two files share a stem, the lexically first is kept.
    """
    out: dict[str, Path] = {}
    d = Path(image_dir)
    if not d.is_dir():
        raise DataError(f"{image_dir}: not a directory")
    for p in sorted(d.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            out.setdefault(p.stem, p)
    return out
