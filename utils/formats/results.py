"""Result formats of the recall stage (written by recall_infer.py, read by recall_eval.py):
``TOPK_HEADER`` files (``write_topk``), the authors' full format (``write_full``), both
read by ``read_results``; the list of missing images (``write_missing_list``); the
vectors of a run (``save_embeddings`` / ``load_embeddings``, ``.npz``).
"""

from __future__ import annotations

from utils.cli import DataError

import csv
import json
import logging
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from utils.io import atomic_write, text_lines

from .npfiles import read_npz

TOPK_HEADER = ("poi_id", "poi_name", "rank", "image", "score")
FULL_FIELDS = ("poi_id", "poi_name", "image_path", "score")
MISSING_HEADER = ("status", "key", "line", "path_or_url")

log = logging.getLogger(__name__)


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


def write_full(
    path: str | os.PathLike, poi_ids: list[str], poi_names: list[str], image_paths: list[str], scores
) -> None:
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
            if not fields or all(not x.strip() for x in fields):
                continue
            if not res.fmt:
                res.fmt = "topk" if tuple(x.strip() for x in fields) == TOPK_HEADER else "full"
                if res.fmt == "topk":
                    continue
            poi, name, image, s = _result_row(fields, res.fmt, f"{path}:{reader.line_num}")
            images = seen.setdefault(poi, set())
            if image in images:
                res.duplicates += 1
                first_dup = first_dup or (reader.line_num, poi, image)
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
        log.warning(
            "%s: %d rows repeat an earlier (poi_id, image) pair (first: line %d, %s %s); each pair is counted once",
            *(path, res.duplicates, *first_dup),
        )
    return res


def _result_row(fields: list[str], fmt: str, where: str) -> tuple[str, str, str, float]:
    """``(poi_id, poi_name, image, score)`` of one row of a results file."""
    if fmt == "topk":
        if len(fields) != len(TOPK_HEADER):
            raise DataError(f"{where}: expected 5 fields ({','.join(TOPK_HEADER)}), found {len(fields)}")
        poi, name, _, image, score = fields
    else:
        if len(fields) < 4:
            raise DataError(
                f"{where}: expected 4 fields ({','.join(FULL_FIELDS)}) "
                f"or a header line {','.join(TOPK_HEADER)}, found {len(fields)}"
            )
        # an unquoted comma inside a name gives extra fields: the name is the middle
        poi, name, image, score = fields[0], ",".join(fields[1:-2]), fields[-2], fields[-1]
    poi, image = poi.strip(), image.strip()
    try:
        s = float(score)
    except ValueError:
        raise DataError(f"{where}: score {score!r} is not a number") from None
    if not math.isfinite(s):
        raise DataError(f"{where}: score {score.strip()!r} is not a finite number")
    if not poi or not image:
        raise DataError(f"{where}: empty poi_id or image")
    return poi, name, image, s


EMBEDDINGS_FORMAT = 1


def save_embeddings(path, *, image_emb, image_names, image_ok, text_emb, poi_ids, poi_names, meta: dict) -> None:
    """The vectors of a recall run as ``.npz`` (atomically): ``image_emb`` N x D float32
    (row i = gallery image ``image_names[i]``, a file name; ``image_ok`` False where it
    was unreadable and scored as the zero image), ``text_emb`` Q x D float32 (row j = POI
    ``poi_ids[j]`` named ``poi_names[j]``), ``meta`` a JSON string (model identity,
    preprocessing ...). Strings are stored as unicode arrays: no pickle is needed to
    read it back."""
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
    d = read_npz(path, "an embeddings file of recall_infer.py --save-embeddings")
    missing = [k for k in ("image_emb", "image_names", "text_emb", "poi_ids", "poi_names") if k not in d]
    if missing:
        raise DataError(f"{path}: not an embeddings file of recall_infer.py (no {', '.join(missing)})")
    ie, te = d["image_emb"], d["text_emb"]
    same = ie.ndim == te.ndim == 2 and ie.shape[1] == te.shape[1] and len(d["image_names"]) == len(ie)
    if not same or not len(d["poi_ids"]) == len(d["poi_names"]) == len(te):
        raise DataError(
            f"{path}: inconsistent shapes (image_emb {ie.shape}, {len(d['image_names'])} names; "
            f"text_emb {te.shape}, {len(d['poi_ids'])} poi ids)"
        )
    for k in ("image_emb", "text_emb"):
        if not np.isfinite(d[k]).all():
            raise DataError(f"{path}: {k} holds NaN or infinite values")
    for k in ("image_names", "poi_ids", "poi_names"):
        d[k] = [str(x) for x in d[k]]
    try:
        d["meta"] = json.loads(str(d["meta"])) if "meta" in d else {}
    except ValueError:
        d["meta"] = {}
    return d
