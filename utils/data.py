"""Readers for the two published CSV formats and the image naming scheme.

Recall set (SPEC section 4): comma CSV without header,
    poi_id, poi_name, image_url, rank_number, width, height, extend
Ranking sets (SPEC section 5): one record a line, fields joined by the literal
string ``$record$``,
    item_id, url_a, url_b, ctr_a, ctr_b, title, cate_name, oss_url, oss_url2, poi_names

Bad rows never crash a reader halfway: pass ``errors=[]`` to collect them as
``RowError`` (file, line, message) and keep going; without it the first bad
row raises ``DataError`` naming the file and line. Text is decoded line by line, so
bytes that are not UTF-8 are reported at their real line.

Result formats of the recall stage (written by recall_infer.py, read by recall_eval.py):
``TOPK_HEADER`` files (``write_topk``), the authors' full format (``write_full``), both
read by ``read_results``; the list of missing images (``write_missing_list``); the
vectors of a run (``save_embeddings`` / ``load_embeddings``, ``.npz``).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .cli import UserError

RECORD_SEP = "$record$"
RECALL_FIELDS = ("poi_id", "poi_name", "image_url", "rank_number", "width", "height", "extend")
RANK_FIELDS = ("item_id", "url_a", "url_b", "ctr_a", "ctr_b", "title", "cate_name",
               "oss_url", "oss_url2", "poi_names")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
TOPK_HEADER = ("poi_id", "poi_name", "rank", "image", "score")
FULL_FIELDS = ("poi_id", "poi_name", "image_path", "score")
MISSING_HEADER = ("status", "key", "line", "path_or_url")

log = logging.getLogger(__name__)


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


def text_lines(path: str | os.PathLike, errors: list | None = None) -> Iterator[str]:
    """The lines of a UTF-8 text file (BOM tolerated, line ends kept), decoded one by one
    so that bytes that are not UTF-8 are reported at their line: a ``DataError``, or with
    ``errors=[]`` a ``RowError`` there and an empty line in its place (line numbers of
    ``csv.reader`` stay right)."""
    path = str(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _fail(errors, RowError(path, n, f"not UTF-8 text (byte 0x{raw[e.start]:02x} "
                                                f"at column {e.start + 1})"))
                yield "\n"
                continue
            if n == 1 and text.startswith("\ufeff"):
                text = text[1:]
            yield text


def count_text_rows(path: str | os.PathLike) -> int:
    """Non-blank lines of a UTF-8 text file; bytes that are not UTF-8 are a ``DataError``
    at their line (a check to run before any work)."""
    return sum(1 for line in text_lines(path) if line.strip())


def read_json(path: str | os.PathLike, what: str | None = None):
    """The JSON document in ``path``; a missing file, bytes that are not UTF-8 or a syntax
    error are a ``DataError`` naming the file (and the line)."""
    label = f"{what} {path}" if what else str(path)
    if not os.path.isfile(path):
        raise DataError(f"{label}: no such file")
    try:
        return json.loads("".join(text_lines(path)))
    except json.JSONDecodeError as e:
        raise DataError(f"{label}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


def _lines(path: str | os.PathLike, errors: list | None = None) -> Iterator[tuple[int, str]]:
    for n, line in enumerate(text_lines(path, errors), 1):
        yield n, line.rstrip("\r\n")


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
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
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
    for line, text in _lines(path, errors):
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
        # a label from NaN would silently be 0: never a row to skip, always an error
        check_finite(ca, f"{path}:{line}: ctr_a")
        check_finite(cb, f"{path}:{line}: ctr_b")
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


# ---------------------------------------------------------------------------
# recall result formats
# ---------------------------------------------------------------------------
def fmt_score(x: float) -> str:
    """9 significant digits: round-trips float32, so writing creates no ties."""
    return f"{x:.9g}"


def write_topk(path: str | os.PathLike, rows: Iterable[tuple]) -> None:
    """A top-k file: ``TOPK_HEADER`` then ``(poi_id, poi_name, rank, image, score)`` rows."""
    with atomic_write(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(TOPK_HEADER)
        for poi, name, rank, image, score in rows:
            w.writerow((poi, name, rank, image, fmt_score(score)))


def write_full(path: str | os.PathLike, poi_ids: list[str], poi_names: list[str],
               image_paths: list[str], scores) -> None:
    """The authors' full format: no header, one ``poi_id,poi_name,image_path,score`` row
    per (POI, image); ``scores`` is a len(poi_ids) x len(image_paths) array."""
    with atomic_write(path) as f:
        w = csv.writer(f, lineterminator="\n")
        n = len(image_paths)
        for poi, name, row in zip(poi_ids, poi_names, scores):
            w.writerows(zip([poi] * n, [name] * n, image_paths, map(fmt_score, row.tolist())))


def write_missing_list(path: str | os.PathLike, missing: Iterable, unreadable: Iterable) -> None:
    """TSV of the gallery's images missing on disk (``RecallRow``) and unreadable
    (``(RecallRow, path)``)."""
    with atomic_write(path) as f:
        f.write("\t".join(MISSING_HEADER) + "\n")
        for row in missing:
            f.write(f"missing\t{row.key}\t{row.line}\t{row.url}\n")
        for row, p in unreadable:
            f.write(f"unreadable\t{row.key}\t{row.line}\t{p}\n")


@dataclass
class Results:
    """A results file as read: ``fmt`` 'topk' or 'full'; ``groups`` = {poi_id: [(image,
    score)]} in file order; ``names`` = {poi_id: first name seen}; ``duplicates`` =
    rows repeating an earlier (poi_id, image) pair, left out."""
    path: str
    fmt: str
    groups: dict = field(default_factory=dict)
    names: dict = field(default_factory=dict)
    duplicates: int = 0


def read_results(path: str | os.PathLike) -> Results:
    """Read a top-k or full results file. Every error is a ``DataError`` naming the file
    and line: wrong field count, a score that is not a finite number, an empty id, bytes
    that are not UTF-8. A repeated (poi_id, image) row is counted once, with a warning."""
    path = str(path)
    res = Results(path, "")
    seen: dict[str, set] = {}
    first_dup = None
    reader = csv.reader(text_lines(path))
    try:
        for fields in reader:
            line = reader.line_num
            if not fields or all(not x.strip() for x in fields):
                continue
            if not res.fmt:
                if tuple(x.strip() for x in fields) == TOPK_HEADER:
                    res.fmt = "topk"
                    continue
                res.fmt = "full"
            if res.fmt == "topk":
                if len(fields) != len(TOPK_HEADER):
                    raise DataError(f"{path}:{line}: expected 5 fields ({','.join(TOPK_HEADER)}), "
                                    f"found {len(fields)}")
                poi, name, _, image, score = fields
            else:
                if len(fields) < 4:
                    raise DataError(f"{path}:{line}: expected 4 fields ({','.join(FULL_FIELDS)}) "
                                    f"or a header line {','.join(TOPK_HEADER)}, found {len(fields)}")
                # an unquoted comma inside a name gives extra fields: the name is the middle
                poi, name, image, score = fields[0], ",".join(fields[1:-2]), fields[-2], fields[-1]
            poi, image = poi.strip(), image.strip()
            try:
                s = float(score)
            except ValueError:
                raise DataError(f"{path}:{line}: score {score!r} is not a number") from None
            if not math.isfinite(s):
                raise DataError(f"{path}:{line}: score {score.strip()!r} is not a finite number")
            if not poi or not image:
                raise DataError(f"{path}:{line}: empty poi_id or image")
            images = seen.setdefault(poi, set())
            if image in images:
                res.duplicates += 1
                first_dup = first_dup or (line, poi, image)
                continue
            images.add(image)
            # 2.5 M rows of the full format repeat 5000 paths: share the strings
            res.groups.setdefault(poi, []).append((sys.intern(image), s))
            res.names.setdefault(poi, name)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: unreadable CSV ({e})") from None
    if not res.groups:
        raise DataError(f"{path}: no result rows")
    if res.duplicates:
        line, poi, image = first_dup
        log.warning("%s: %d rows repeat an earlier (poi_id, image) pair (first: line %d, %s %s); "
                    "each pair is counted once", path, res.duplicates, line, poi, image)
    return res


EMBEDDINGS_FORMAT = 1


def save_embeddings(path: str | os.PathLike, *, image_emb, image_names: list[str], image_ok,
                    text_emb, poi_ids: list[str], poi_names: list[str], meta: dict) -> None:
    """The vectors of a recall run as ``.npz`` (atomically): ``image_emb`` N x D float32
    (row i = gallery image ``image_names[i]``, a file name; ``image_ok`` False where it
    was unreadable and scored as the zero image), ``text_emb`` Q x D float32 (row j = POI
    ``poi_ids[j]`` named ``poi_names[j]``), ``meta`` a JSON string (model identity,
    preprocessing ...). Strings are stored as unicode arrays: no pickle is needed to
    read it back."""
    import numpy as np

    arrays = {
        "format": np.array(EMBEDDINGS_FORMAT),
        "image_emb": np.ascontiguousarray(image_emb, dtype=np.float32),
        "image_names": np.array(list(image_names), dtype=str),
        "image_ok": np.asarray(image_ok, dtype=bool),
        "text_emb": np.ascontiguousarray(text_emb, dtype=np.float32),
        "poi_ids": np.array(list(poi_ids), dtype=str),
        "poi_names": np.array(list(poi_names), dtype=str),
        "meta": np.array(json.dumps(meta, ensure_ascii=False, allow_nan=False)),
    }
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def load_embeddings(path: str | os.PathLike) -> dict:
    """What :func:`save_embeddings` wrote, checked (shapes agree, vectors finite); a
    ``DataError`` naming the file otherwise. ``meta`` comes back as a dict."""
    import zipfile

    import numpy as np

    path = str(path)
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with z:
            d = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not an embeddings file of recall_infer.py --save-embeddings ({e})") from None
    need = ("image_emb", "image_names", "text_emb", "poi_ids", "poi_names")
    missing = [k for k in need if k not in d]
    if missing:
        raise DataError(f"{path}: not an embeddings file of recall_infer.py (no {', '.join(missing)})")
    ie, te = d["image_emb"], d["text_emb"]
    if ie.ndim != 2 or te.ndim != 2 or ie.shape[1] != te.shape[1] or len(d["image_names"]) != len(ie) \
            or len(d["poi_ids"]) != len(te) or len(d["poi_names"]) != len(te):
        raise DataError(f"{path}: inconsistent shapes (image_emb {ie.shape}, {len(d['image_names'])} names; "
                        f"text_emb {te.shape}, {len(d['poi_ids'])} poi ids)")
    for k in ("image_emb", "text_emb"):
        if not np.isfinite(d[k]).all():
            raise DataError(f"{path}: {k} holds NaN or infinite values")
    d["image_names"] = [str(x) for x in d["image_names"]]
    d["poi_ids"] = [str(x) for x in d["poi_ids"]]
    d["poi_names"] = [str(x) for x in d["poi_names"]]
    try:
        d["meta"] = json.loads(str(d["meta"])) if "meta" in d else {}
    except ValueError:
        d["meta"] = {}
    return d
