"""Readers for the two published CSV formats and the image naming scheme.

Recall set (SPEC section 4): comma CSV without header,
    poi_id, poi_name, image_url, rank_number, width, height, extend
Ranking sets (SPEC section 5): one record a line, fields joined by the literal
string ``$record$``,
    item_id, url_a, url_b, ctr_a, ctr_b, title, cate_name, oss_url, oss_url2, poi_names

Bad rows never crash a reader halfway: pass ``errors=[]`` to collect them as
``RowError`` (file, line, message) and keep going; without it the first bad
row raises ``DataError`` naming the file and line.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .cli import UserError

RECORD_SEP = "$record$"
RECALL_FIELDS = ("poi_id", "poi_name", "image_url", "rank_number", "width", "height", "extend")
RANK_FIELDS = ("item_id", "url_a", "url_b", "ctr_a", "ctr_b", "title", "cate_name",
               "oss_url", "oss_url2", "poi_names")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class DataError(UserError, ValueError):
    """A data file that cannot be used as it is; the message names file and line."""


# ---------------------------------------------------------------------------
# writing results: the one atomic writer
# ---------------------------------------------------------------------------
def temp_name(path: str | os.PathLike) -> Path:
    """Where ``atomic_path`` writes before the rename: ``<path>.tmp<pid>``."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; when the block ends without an error it
    replaces ``path`` in one step, otherwise it is removed. Readers never see a half
    written file, and an interrupted run leaves nothing behind. The parent directory is
    created."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8",
                 newline: str | None = ""):
    """``open(path, mode)`` through :func:`atomic_path` (text: UTF-8, no newline
    translation, so ``csv.writer`` works)."""
    binary = "b" in mode
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if binary else encoding,
                  newline=None if binary else newline) as f:
            yield f


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    """JSON (UTF-8, non-ASCII kept, NaN refused) written atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False, allow_nan=False)
        f.write("\n")


def check_finite(value: float, where: str) -> float:
    """``value`` unless it is NaN or infinite (then a ``DataError`` naming ``where``)."""
    if not math.isfinite(value):
        raise DataError(f"{where}: {value!r} is not a finite number")
    return value


@contextlib.contextmanager
def exclusive_lock(directory: str | os.PathLike, name: str = ".lock"):
    """Hold ``directory/.lock`` for the block so that two runs never write into one
    destination at once; the second gets a ``UserError`` naming the holder's pid. The
    lock is the kernel's (``flock``): it is released when the process ends, even when
    it is killed, so a stale file never blocks a later run."""
    import fcntl

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            pid = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        finally:
            os.close(fd)
        raise UserError(f"another run holds {path} (pid {pid}); wait for it to finish or "
                        f"use another destination") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass(frozen=True)
class RowError:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


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
        return recall_key(self.poi_id, self.rank)


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


def recall_key(poi_id: str, rank: str) -> str:
    return f"{poi_id}_{rank}"


def poi_of_image(path_or_name: str) -> str:
    """Owning POI id of a gallery image: the file name before the first ``_``."""
    return os.path.basename(path_or_name).split("_", 1)[0]


def _fail(errors: list | None, err: RowError) -> None:
    if errors is None:
        raise DataError(str(err))
    errors.append(err)


def _lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for n, line in enumerate(f, 1):
                yield n, line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def open_csv(path: str | os.PathLike):
    """A CSV file opened for ``csv.reader`` (UTF-8, BOM tolerated); an unreadable path
    is a ``DataError`` naming it."""
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None


def iter_recall_csv(path: str | os.PathLike, errors: list | None = None) -> Iterator[RecallRow]:
    """Rows of a recall-format CSV. Blank lines are ignored."""
    path = str(path)
    with open_csv(path) as f:
        reader = csv.reader(f)
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                _fail(errors, RowError(path, reader.line_num, f"unreadable CSV ({e})"))
                continue
            line = reader.line_num
            if not fields or all(not x.strip() for x in fields):
                continue
            if len(fields) != len(RECALL_FIELDS):
                _fail(errors, RowError(path, line, f"expected {len(RECALL_FIELDS)} fields "
                                       f"({','.join(RECALL_FIELDS)}), found {len(fields)}"))
                continue
            fields = [x.strip() for x in fields]
            poi_id, name, url, rank = fields[:4]
            if not poi_id or not rank:
                _fail(errors, RowError(path, line, "empty poi_id or rank_number"))
                continue
            if "_" in poi_id or os.sep in poi_id or os.sep in rank:
                _fail(errors, RowError(path, line, f"poi_id {poi_id!r} / rank {rank!r} cannot name a file"))
                continue
            if not url:
                _fail(errors, RowError(path, line, "empty image_url"))
                continue
            yield RecallRow(line, poi_id, name, url, rank, *fields[4:])


def iter_rank_csv(path: str | os.PathLike, errors: list | None = None) -> Iterator[RankRow]:
    """Records of a ``$record$`` ranking CSV. Blank lines are ignored."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    for line, text in _lines(path):
        text = text.strip()  # the authors strip the whole record (so poi_names' tail)
        if not text:
            continue
        fields = text.split(RECORD_SEP)
        if len(fields) != len(RANK_FIELDS):
            _fail(errors, RowError(path, line, f"expected {len(RANK_FIELDS)} fields separated by "
                                   f"'{RECORD_SEP}', found {len(fields)}"))
            continue
        item_id, url_a, url_b, ctr_a, ctr_b, title, cate, oss_a, oss_b, pois = fields
        item_id = item_id.strip()
        if not item_id or os.sep in item_id:
            _fail(errors, RowError(path, line, f"bad item_id {item_id!r}"))
            continue
        try:
            ca, cb = float(ctr_a), float(ctr_b)
        except ValueError:
            _fail(errors, RowError(path, line, f"ctr_a/ctr_b not numbers: {ctr_a!r}, {ctr_b!r}"))
            continue
        row = RankRow(line, item_id, url_a.strip(), url_b.strip(), ca, cb, title, cate,
                      oss_a.strip(), oss_b.strip(), pois)
        if not row.urls_a() or not row.urls_b():
            _fail(errors, RowError(path, line, "empty image URL for image a or b"))
            continue
        yield row


def sniff_format(path: str | os.PathLike) -> str:
    """'rank' when the first non-blank line holds ``$record$``, else 'recall'."""
    for _, text in _lines(path):
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
