"""Result files of the recall stage: top-k and the authors' full format, missing images, vectors."""

from __future__ import annotations

from utils.cli import DataError

import csv
import io
import json
import logging
import math
import os
import sys
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from utils.io import atomic_write

from .npfiles import read_npz
from .rows import csv_records

TOPK_HEADER = ("poi_id", "poi_name", "rank", "image", "score")
FULL_FIELDS = ("poi_id", "poi_name", "image_path", "score")

log = logging.getLogger(__name__)


def write_topk(path: str | os.PathLike, rows: Iterable[tuple]) -> None:
    with atomic_write(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(TOPK_HEADER)
        for poi, name, rank, image, score in rows:
            w.writerow((poi, name, rank, image, f"{score:.9g}"))  # round-trips float32: writing creates no ties


def write_full(path, poi_ids: list[str], poi_names: list[str], image_paths: list[str], scores) -> None:
    """The authors' full format: no header, a row per (POI, image); ``scores`` is POIs x images."""
    images = [_csv_line((p, "")) for p in image_paths]  # each field quoted once, not once per row: 2.5x faster
    with atomic_write(path) as f:
        for poi, name, row in zip(poi_ids, poi_names, scores):
            head = _csv_line((poi, name, ""))
            f.write("".join(f"{head}{image}{s:.9g}\n" for image, s in zip(images, row.tolist())))  # as write_topk


def _csv_line(fields: tuple) -> str:
    """``fields`` as csv.writer writes them, without the line end."""
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(fields)
    return out.getvalue()


def write_missing_list(path: str | os.PathLike, missing: Iterable, unreadable: Iterable) -> None:
    """TSV of the gallery's missing (``RecallRow``) and unreadable (``(RecallRow, path)``) images."""
    with atomic_write(path) as f:
        f.write("status\tkey\tline\tpath_or_url\n")
        f.writelines(f"missing\t{row.key}\t{row.line}\t{row.url}\n" for row in missing)
        f.writelines(f"unreadable\t{row.key}\t{row.line}\t{p}\n" for row, p in unreadable)


class Results(NamedTuple):
    fmt: str  # 'topk' or 'full'
    groups: dict  # {poi_id: [(image, score)]} in file order
    names: dict  # {poi_id: first name seen}


def read_results(path: str | os.PathLike) -> Results:
    """A top-k or full results file; a repeated (poi_id, image) pair is left out, with a warning."""
    path = str(path)
    fmt, groups, names = "", {}, {}  # groups: {poi_id: {image: score}} until the end
    duplicates, first_dup = 0, None
    for line, fields in csv_records(path):
        if not fmt:
            fmt = "topk" if tuple(x.strip() for x in fields) == TOPK_HEADER else "full"
            if fmt == "topk":
                continue
        poi, name, image, s = _result_row(fields, fmt, f"{path}:{line}")
        images = groups.setdefault(poi, {})
        if image in images:
            duplicates += 1
            first_dup = first_dup or (line, poi, image)
            continue
        images[sys.intern(image)] = s  # 2.5 M rows of the full format repeat 5000 paths: share the strings
        names.setdefault(poi, name)
    if not groups:
        raise DataError(f"{path}: no result rows")
    if duplicates:
        what = "rows repeat an earlier (poi_id, image) pair"
        log.warning("%s: %d %s (first: line %d, %s %s); each pair is counted once", path, duplicates, what, *first_dup)
    return Results(fmt, {poi: list(images.items()) for poi, images in groups.items()}, names)


def _result_row(fields: list[str], fmt: str, where: str) -> tuple[str, str, str, float]:
    if fmt == "topk":
        if len(fields) != len(TOPK_HEADER):
            raise DataError(f"{where}: expected 5 fields ({','.join(TOPK_HEADER)}), found {len(fields)}")
        fields = fields[:2] + fields[3:]  # without the rank: the scores give the order
    elif len(fields) < 4:
        raise DataError(f"{where}: expected 4 fields ({','.join(FULL_FIELDS)}) or a header, found {len(fields)}")
    # an unquoted comma inside a name (full format) gives extra fields: the name is the middle
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


def save_embeddings(path, *, image_emb, image_names, image_ok, text_emb, poi_ids, poi_names, meta: dict) -> None:
    """A recall run's vectors as an ``.npz`` needing no pickle (``image_ok`` False: the zero image);
    ``meta`` (model identity, preprocessing) as JSON."""
    with atomic_write(path, "wb") as f:
        np.savez(
            f,
            format=np.array(1),  # this layout's version
            image_emb=np.ascontiguousarray(image_emb, dtype=np.float32),
            image_names=np.array(list(image_names), dtype=str),
            image_ok=np.asarray(image_ok, dtype=bool),
            text_emb=np.ascontiguousarray(text_emb, dtype=np.float32),
            poi_ids=np.array(list(poi_ids), dtype=str),
            poi_names=np.array(list(poi_names), dtype=str),
            meta=np.array(json.dumps(meta, ensure_ascii=False, allow_nan=False)),
        )


def load_embeddings(path: str | os.PathLike) -> dict:
    """What :func:`save_embeddings` wrote, checked (shapes agree, vectors finite); ``meta`` a dict."""
    d = read_npz(path, "an embeddings file of recall_infer.py --save-embeddings")
    if missing := [k for k in ("image_emb", "image_names", "text_emb", "poi_ids", "poi_names") if k not in d]:
        raise DataError(f"{path}: not an embeddings file of recall_infer.py (no {', '.join(missing)})")
    ie, te = d["image_emb"], d["text_emb"]
    same = ie.ndim == te.ndim == 2 and ie.shape[1] == te.shape[1] and len(d["image_names"]) == len(ie)
    if not same or not len(d["poi_ids"]) == len(d["poi_names"]) == len(te):
        shapes = f"image_emb {ie.shape} ({len(d['image_names'])} names), text_emb {te.shape} ({len(d['poi_ids'])} ids)"
        raise DataError(f"{path}: inconsistent shapes ({shapes})")
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
