"""Readers of the two published CSV formats (SPEC sections 4 and 5) and the image naming scheme.
Pass ``errors=[]`` to collect bad rows as ``RowError``; without it the first raises ``DataError``."""

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

    @property
    def key(self) -> str:  # the file stem of this row's image
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
    oss_url: str
    oss_url2: str
    poi_names: str

    @property
    def label(self) -> int:  # SPEC section 5
        return int(self.ctr_a > self.ctr_b)

    @property
    def key_a(self) -> str:
        return f"{self.item_id}_a"

    @property
    def key_b(self) -> str:
        return f"{self.item_id}_b"

    def urls_a(self) -> list[str]:  # the durable copy first; empty URLs dropped
        return [u for u in (self.oss_url, self.url_a) if u]

    def urls_b(self) -> list[str]:
        return [u for u in (self.oss_url2, self.url_b) if u]


def poi_of_image(path_or_name: str) -> str:
    """Owning POI id of a gallery image: the file name before the first ``_``."""
    return os.path.basename(path_or_name).split("_", 1)[0]


def csv_records(path: str, errors: list | None = None, starts: bool = False) -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` of the rows of a CSV file that are not blank; ``line``: where a row
    ends (a quoted field may span lines), with ``starts`` where it starts."""
    reader = csv.reader(text_lines(path, errors))
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            record_bad_row(errors, RowError(path, reader.line_num, f"unreadable CSV ({e})"))
            continue
        if any(x.strip() for x in fields):
            yield start if starts else reader.line_num, fields


def _recall_row(line: int, fields: list[str]) -> RecallRow | str:
    """The row, or what is wrong with it."""
    fields = [x.strip() for x in fields]
    if len(fields) != len(RECALL_FIELDS):
        return f"expected {len(RECALL_FIELDS)} fields ({','.join(RECALL_FIELDS)}), found {len(fields)}"
    poi_id, _, url, rank = fields[:4]
    if not poi_id or not rank:
        return "empty poi_id or rank_number"
    if "_" in poi_id or os.sep in poi_id or os.sep in rank:
        return f"poi_id {poi_id!r} / rank {rank!r} cannot name a file"
    return RecallRow(line, *fields[:4]) if url else "empty image_url"


def iter_recall_csv(path: str | os.PathLike, errors: list | None = None) -> Iterator[RecallRow]:
    path = str(path)
    for line, fields in csv_records(path, errors):
        row = _recall_row(line, fields)
        if isinstance(row, str):
            record_bad_row(errors, RowError(path, line, row))
        else:
            yield row


def read_recall_rows(path: str | os.PathLike, skip_bad_rows: bool = False) -> tuple[list[RecallRow], int]:
    """``(rows, bad)`` of a recall-format CSV under the one rule for bad rows (``utils.cli.bad_rows``)."""
    errors: list = []
    rows = list(iter_recall_csv(path, errors))
    bad = bad_rows(errors, path, skip_bad_rows)
    if not rows:
        raise DataError(f"{path}: no usable recall-format rows")
    return rows, bad


def _rank_row(path: str, line: int, fields: list[str]) -> RankRow | str:
    """The record, or what is wrong with it."""
    if len(fields) != len(RANK_FIELDS):
        return f"expected {len(RANK_FIELDS)} fields separated by '{RECORD_SEP}', found {len(fields)}"
    item_id, url_a, url_b, ctr_a, ctr_b, title, _, oss_a, oss_b, pois = fields  # _: cate_name, read by nothing
    item_id = item_id.strip()
    if not item_id or os.sep in item_id:
        return f"bad item_id {item_id!r}"
    try:
        ca, cb = float(ctr_a), float(ctr_b)
    except ValueError:
        return f"ctr_a/ctr_b not numbers: {ctr_a!r}, {ctr_b!r}"
    # a label from NaN would silently be 0: never a row to skip, always an error
    check_finite(ca, f"{path}:{line}: ctr_a")
    check_finite(cb, f"{path}:{line}: ctr_b")
    row = RankRow(line, item_id, url_a.strip(), url_b.strip(), ca, cb, title, oss_a.strip(), oss_b.strip(), pois)
    return row if row.urls_a() and row.urls_b() else "empty image URL for image a or b"


def iter_rank_csv(path: str | os.PathLike, errors: list | None = None) -> Iterator[RankRow]:
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    for line, text in enumerate(text_lines(path, errors), 1):
        text = text.strip()  # the authors strip the whole record (so poi_names' tail)
        row = _rank_row(path, line, text.split(RECORD_SEP)) if text else None
        if isinstance(row, str):
            record_bad_row(errors, RowError(path, line, row))
        elif row is not None:
            yield row


def sniff_format(path: str | os.PathLike) -> str:
    """'rank' when the first non-blank line holds ``$record$``, else 'recall'."""
    for text in text_lines(path):
        if text.strip():
            return "rank" if RECORD_SEP in text else "recall"
    raise DataError(f"{path}: empty file")


def index_images(image_dir: str | os.PathLike) -> dict[str, Path]:
    """File stem -> path of the images in ``image_dir`` (not recursive; the first of a shared stem)."""
    d = Path(image_dir)
    if not d.is_dir():
        raise DataError(f"{image_dir}: not a directory")
    out: dict[str, Path] = {}
    for p in sorted(d.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            out.setdefault(p.stem, p)
    return out
