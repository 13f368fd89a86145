"""The training data of both trainers: the input check run before any work, the pair
readers (bad rows under ``utils.cli.bad_rows``; a pair whose image file is absent is left
out and counted in the log), the owner split of the recall pairs, and images encoded once
by a frozen tower."""

from __future__ import annotations

from utils.cli import DataError, RowError, bad_rows, input_file, record_bad_row

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.formats import RankRow, index_images, iter_rank_csv, iter_recall_csv
from utils.io import text_lines

from .dist import DistEnv, barrier

log = logging.getLogger(__name__)


def check_text_file(path, what: str) -> None:
    """An existing file with a non-blank line (in a file of nothing but lines that are not
    UTF-8, the first of them is the error)."""
    errors: list[RowError] = []
    if not any(line.strip() for line in text_lines(input_file(path, what), errors)):
        raise DataError(f"{errors[0]}" if errors else f"{what} {path}: empty file")


def _warn_missing(path, missing: list[str]) -> None:
    if missing:
        log.warning("%s: %d pairs left out, image file absent (first: %s)", path, len(missing), "; ".join(missing[:3]))


@dataclass(frozen=True)
class Pair:
    text: str
    image: str
    owner: str
    line: int


def _csv_rows(path: str, errors: list):
    """``(line, stripped fields)`` of the non-blank rows of a UTF-8 CSV."""
    reader = csv.reader(text_lines(path, errors))
    while True:
        try:
            fields = [x.strip() for x in next(reader)]
        except StopIteration:
            return
        except csv.Error as e:
            record_bad_row(errors, RowError(path, reader.line_num, f"unreadable CSV ({e})"))
            continue
        if any(fields):
            yield reader.line_num, fields


def _plain_pairs(path: str, header: list[str], rows, image_dir, errors, missing: list) -> list[Pair]:
    """The pairs of the ``rows`` under a header naming ``text``, ``image`` (and maybe ``owner``)."""
    base = Path(image_dir) if image_dir else Path(path).resolve().parent
    pairs = []
    for line, fields in rows:
        cells = dict(zip(header, fields))  # as csv.DictReader: missing cells are empty
        text, image, owner = (cells.get(k, "") for k in ("text", "image", "owner"))
        if not text or not image:
            if text or image:
                record_bad_row(errors, RowError(path, line, "empty text or image"))
            continue
        image_path = Path(image) if os.path.isabs(image) else base / image
        if image_path.is_file():
            pairs.append(Pair(text, str(image_path), owner or text, line))
        else:
            missing.append(f"{path}:{line}: {image_path}")
    return pairs


def _recall_format_pairs(path: str, image_dir, errors, missing: list) -> list[Pair]:
    if not image_dir:
        raise DataError(
            f"{path}: recall-format CSV: --image-dir (the folder of <poi_id>_<rank>.<ext> files) is required"
        )
    images, pairs = index_images(image_dir), []
    for row in iter_recall_csv(path, errors):
        image = images.get(row.key)
        if not row.poi_name.strip():
            record_bad_row(errors, RowError(path, row.line, "empty poi_name"))
        elif image is None:
            missing.append(f"{path}:{row.line}: {row.key}.*")
        else:
            pairs.append(Pair(row.poi_name.strip(), str(image), row.poi_id, row.line))
    return pairs


def read_text_pairs(path, image_dir=None, skip_bad_rows: bool = False) -> tuple[list[Pair], int]:
    """The (text, image, owner) pairs of a recall-format CSV (owner: the poi_id) or of a
    CSV with a ``text,image[,owner]`` header (owner: the text; relative images under
    ``image_dir``, default the CSV's directory), and the number of bad rows left out."""
    path, errors, missing = str(path), [], []
    rows = _csv_rows(path, errors)
    header = [x.lower() for x in next(rows, (0, []))[1]]
    if "text" in header and "image" in header:
        pairs = _plain_pairs(path, header, rows, image_dir, errors, missing)
    else:
        rows.close()
        errors.clear()  # the recall-format reader reports them
        pairs = _recall_format_pairs(path, image_dir, errors, missing)
    n_bad = bad_rows(errors, path, skip_bad_rows)
    _warn_missing(path, missing)
    if not pairs:
        raise DataError(f"{path}: no row has an image file (image dir: {image_dir})")
    return pairs, n_bad


def split_owners(pairs: list[Pair], val_fraction: float, val_owners: int | None, seed: int):
    """(training, held-out) pairs: a seeded random share of the owners is held out whole."""
    owners = sorted({p.owner for p in pairs})
    n_val = val_owners if val_owners is not None else int(round(val_fraction * len(owners)))
    if not 0 <= n_val < len(owners):
        raise DataError(f"cannot hold out {n_val} of the {len(owners)} owners (--val-owners / --val-fraction)")
    held = {owners[i] for i in np.random.default_rng(seed).permutation(len(owners))[:n_val]}
    return [p for p in pairs if p.owner not in held], [p for p in pairs if p.owner in held]


@dataclass(frozen=True)
class RankPair:
    row: RankRow
    image_a: str
    image_b: str


def read_rank_pairs(path, image_dir, skip_bad_rows: bool = False) -> tuple[list[RankPair], int]:
    """The records of a ``$record$`` CSV whose two images ``<item_id>_a/_b.*`` are in
    ``image_dir``, and the number of bad rows left out (a NaN/inf CTR is always an error)."""
    path, errors, missing, pairs, n = str(path), [], [], [], 0
    images = index_images(image_dir)
    for row in iter_rank_csv(path, errors):
        n += 1
        a, b = images.get(row.key_a), images.get(row.key_b)
        if a is None or b is None:
            missing.append(f"{path}:{row.line}: {row.key_a if a is None else row.key_b}.*")
        else:
            pairs.append(RankPair(row, str(a), str(b)))
    n_bad = bad_rows(errors, path, skip_bad_rows)
    if not n:
        raise DataError(f"{path}: no records")
    _warn_missing(path, missing)
    if not pairs:
        raise DataError(f"{path}: no pair has both images in {image_dir}")
    return pairs, n_bad


def encode_images_once(rm, paths: list[str], enc, env: DistEnv):
    """``paths`` through the frozen image tower of ``rm`` (a ``RecallModel``) with ``enc``
    (an ``Encoding``); under torchrun rank 0 sets the engine up (an ONNX export) first."""
    if env.distributed and env.is_main:
        rm.image_encoder()
    barrier(env)
    vecs, ok = rm.encode_images(paths, enc, desc="frozen image tower")
    if not ok.all():
        log.warning("%d images unreadable (zero image used, as the authors did)", int((~ok).sum()))
    return vecs
