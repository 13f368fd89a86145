"""The ranker's POI inputs (SPEC section 5): the three POI tables (name -> pic-num counts or a
vector), read safely and checked, the item inputs built from them, vector tables built from a
recall model. Files: the published pickled ``.npy`` or the safe ``.npz`` (names, values, kind)."""

from __future__ import annotations

from utils.cli import DataError, output_file

import functools
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from utils.io import commit_outputs

from .npfiles import LIMITS, Limits, bounded, load_npy, read_npz

log = logging.getLogger(__name__)

SAFE_SUFFIX = ".npz"
KINDS = ("vectors", "pic_num")
MAX_POIS = 5
TABLE_OPTIONS = ("--poi-pic-num", "--poi-image-vectors", "--poi-name-vectors")


class PoiTableError(DataError):
    """A POI table that cannot be read safely or has the wrong shape; names the file."""


def _is_safe(path) -> bool:
    return str(path).lower().endswith(SAFE_SUFFIX)


def _read(path, safe: bool, trust_pickle: bool = False):
    if not safe:
        obj = load_npy(path, trust_pickle)
        return obj.item() if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype == object else obj
    arrays = read_npz(path, "a safe POI table")
    names, values = arrays.get("names"), arrays.get("values")
    if names is None or values is None:
        raise PoiTableError(f"{path}: not a POI table: it needs the arrays names and values (has {sorted(arrays)})")
    if names.ndim != 1 or values.ndim != 2 or len(names) != len(values) or names.dtype.kind != "U":
        problem = f"names {names.shape} {names.dtype} and values {values.shape}"
        raise PoiTableError(f"{path}: {problem} are not N unicode names and an N x D matrix")
    return dict(zip(names.tolist(), values))


def load_poi_table(path, trust_pickle: bool = False, limits: Limits = LIMITS) -> dict:
    """``name -> value`` of the table at ``path``, bounded by ``limits``; values not yet checked."""
    if not Path(path).is_file():
        raise PoiTableError(f"{path}: no such POI table file")
    try:
        obj = _read(path, _is_safe(path), trust_pickle)
        if not isinstance(obj, dict):
            raise PoiTableError(f"{path}: expected a dict saved with np.save, found {type(obj).__name__}")
        if len(obj) > limits.entries:
            raise PoiTableError(f"{path}: {len(obj):,} entries, more than the {limits.entries:,} a POI table may have")
        if (bad := next((k for k in obj if not isinstance(k, str)), None)) is not None:
            raise PoiTableError(f"{path}: keys must be POI names (str); found {type(bad).__name__} key {bad!r}")
        table = bounded(obj, str(path), limits)
    except DataError as e:
        raise PoiTableError(str(e)) from None
    log.info("%s: %d POIs", path, len(table))
    return table


def _numeric(value, name: str, source) -> np.ndarray:
    try:
        a = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise PoiTableError(f"{source}: value of {name!r} is not a vector ({e})") from None
    if a.dtype.kind not in "biuf":
        raise PoiTableError(f"{source}: value of {name!r} is not numeric ({a.dtype})")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise PoiTableError(f"{source}: value of {name!r} holds NaN or infinite numbers")
    return a.reshape(-1)


def table_matrix(table: dict, source) -> tuple[list[str], np.ndarray]:
    """``(names, N x D matrix)`` of a table; every value numeric, finite, of one length."""
    names, rows = list(table), [_numeric(v, n, source) for n, v in table.items()]
    for name, row in zip(names, rows):
        if row.size != rows[0].size:
            raise PoiTableError(f"{source}: {names[0]!r} has {rows[0].size} values but {name!r} has {row.size} numbers")
    return names, (np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32))


def check_vectors(table: dict, source) -> dict[str, np.ndarray]:
    names, values = table_matrix(table, source)
    with np.errstate(over="ignore"):
        values = values.astype(np.float32)
    for name, row in zip(names, values):
        if not np.isfinite(row).all():  # finite in float64, too large for float32
            raise PoiTableError(f"{source}: value of {name!r} overflows float32")
    return dict(zip(names, values))


def check_pic_num(table: dict, source) -> dict[str, list]:
    """``name -> [n0, n1, n2]``: up to 3 counts, finite and not negative."""
    out = {}
    for name, value in table.items():
        try:
            a = _numeric(value, name, source)
        except PoiTableError:
            raise PoiTableError(f"{source}: entry {name!r} = {value!r:.80} is not up to 3 finite counts") from None
        if a.size > 3:
            raise PoiTableError(f"{source}: pic-num entry {name!r} has {a.size} values, expected up to 3 counts")
        if (a < 0).any():
            raise PoiTableError(f"{source}: pic-num entry {name!r} = {a.tolist()} holds a negative count")
        out[name] = a.tolist()
    return out


def guess_kind(values: np.ndarray) -> str:
    return "pic_num" if values.ndim == 2 and values.shape[1] == 3 else "vectors"


def table_output(path, what: str, suffixes=(SAFE_SUFFIX, ".npy")) -> Path:
    """A place a table can be written (``.npz`` safe, ``.npy`` pickled), checked before any work."""
    if not str(path).lower().endswith(suffixes):
        raise PoiTableError(f"{what} {path}: must end in {' or '.join(suffixes)}")
    return output_file(path, what)


def save_tables(tables: dict, kind: str | None = None, source="<table>") -> None:
    """Write ``{path: table}`` together or not at all, each read back and compared before it lands."""
    commit_outputs({path: functools.partial(_write_table, path, table, kind, source) for path, table in tables.items()})


def _write_table(path, table: dict, kind: str | None, source, tmp) -> None:
    names, values = table_matrix(table, source)
    kind = kind or guess_kind(values)
    if kind == "pic_num":
        check_pic_num(table, source)
    with open(tmp, "wb") as f:
        if _is_safe(path):
            counts = np.int64 if values.dtype.kind in "biu" else np.float64
            stored = values.astype(np.float32 if kind == "vectors" else counts)
            name_array = np.array(names, dtype=str)
            if name_array.tolist() != names:  # numpy drops trailing NUL characters
                bad = next(n for n, m in zip(names, name_array.tolist()) if n != m)
                raise PoiTableError(f"{source}: POI name {bad!r} cannot be stored as a numpy string")
            np.savez(f, names=name_array, values=stored, kind=np.array(kind))
        else:
            np.save(f, {n: np.asarray(v, dtype=np.float32) for n, v in table.items()}, allow_pickle=True)
    back_names, back_values = table_matrix(_read(tmp, _is_safe(path)), path)
    if back_names != names or not np.allclose(back_values.astype(float), values.astype(float), atol=1e-6):
        raise PoiTableError(f"{path}: the table read back differs from the one written")


def describe_table(table: dict, path, show: int = 5) -> str:
    """Size, kind, norms (vectors) or weights (pic-num), names with spaces, a few entries."""
    names, values = table_matrix(table, path)
    if not names:
        return f"{path}: 0 POIs"
    kind = guess_kind(values)
    if kind == "vectors":
        n = np.linalg.norm(values.astype(np.float64), axis=1)
        spread = f"L2 norms: min {n.min():.4f}, mean {n.mean():.4f}, max {n.max():.4f}"
    else:
        w = values[:, 0] + 5.0 * values[:, 1] + 3.0 * values[:, 2]
        spread = f"weight n0 + 5*n1 + 3*n2: min {w.min():g}, median {np.median(w):g}, max {w.max():g}"
    lines = [
        f"{path}: {len(names)} POIs",
        f"  values: {values.shape[1]} per POI, dtype {values.dtype}, kind {kind}",
        f"  {spread}",
        f"  names with leading/trailing spaces: {sum(n != n.strip() for n in names)}",
    ]
    for n, v in list(zip(names, values))[:show]:
        lines.append(f"  {n!r}: {np.array2string(v[:6], precision=4)}" + (" ..." if v.size > 6 else ""))
    return "\n".join(lines)


class PoiTables(NamedTuple):
    """The ranker's three POI tables, checked (empty dicts for those not given)."""

    pic_num: dict
    image_vectors: dict
    name_vectors: dict
    dim: int | None
    sources: tuple = (None, None, None)  # the three paths, for messages

    def inputs(self, title: str, poi_names: str) -> ItemInputs:
        """One item's inputs; vectors are looked up by the unstripped name (zeros when missing)."""
        seq = poi_sequence(poi_names, self.pic_num)
        poi_img, poi_txt = (np.zeros((MAX_POIS, self.dim), dtype=np.float32) for _ in range(2))
        for i, name in enumerate(seq):
            for out, table in ((poi_img, self.image_vectors), (poi_txt, self.name_vectors)):
                if name in table:
                    out[i] = np.asarray(table[name], dtype=np.float32).reshape(-1)
        unknown = [n for n in seq if n not in self.image_vectors or n not in self.name_vectors]
        return ItemInputs(pois_text(title, poi_names), seq, poi_img, poi_txt, len(seq), unknown)

    def with_dim(self, dim: int) -> PoiTables:
        """These tables for a model whose embedding has ``dim`` values."""
        for opt, table, path in zip(TABLE_OPTIONS[1:], (self.image_vectors, self.name_vectors), self.sources[1:]):
            d = len(next(iter(table.values()))) if table else dim
            if d != dim:
                raise PoiTableError(f"{opt}: {path}: vectors have {d} values, the model's embedding has {dim}")
        return self._replace(dim=dim)


def load_poi_tables(pic_num=None, image_vectors=None, name_vectors=None, *, dim, trust_pickle=False) -> PoiTables:
    """The tables of the three ``--poi-*`` options, checked; errors name the option and the file."""
    paths = (pic_num, image_vectors, name_vectors)
    out = []
    for opt, path in zip(TABLE_OPTIONS, paths):
        try:
            table = load_poi_table(path, trust_pickle=trust_pickle) if path else {}
            out.append(check_pic_num(table, path) if opt == "--poi-pic-num" else check_vectors(table, path))
        except PoiTableError as e:
            raise PoiTableError(f"{opt}: {e}") from None
    tables = PoiTables(*out, None, paths)
    return tables.with_dim(dim) if dim is not None else tables


def poi_sequence(poi_names: str, pic_num: dict) -> list[str]:
    """The POI names (unstripped) entering the attention: none for a blank or 1-character list,
    else the first 5 stable-sorted by descending n0 + 5*n1 + 3*n2 of the stripped name."""
    if len(poi_names.strip()) <= 1:
        return []
    weight = lambda name: sum(w * float(n) for w, n in zip((1, 5, 3), pic_num.get(name.strip(), ())))
    return sorted(poi_names.split(","), key=weight, reverse=True)[:MAX_POIS]  # stable, reversed too


def pois_text(title: str, poi_names: str) -> str:
    """The text of ``pois_feature``: the POI names, or the title when they are blank."""
    return poi_names if len(poi_names.strip()) >= 1 else title


@dataclass
class ItemInputs:
    pois_text: str
    poi_names: list[str]  # the POI sequence
    poi_img: np.ndarray  # 5 x D float32, zero rows for unused or unknown names
    poi_txt: np.ndarray  # 5 x D float32
    poi_len: int
    unknown: list[str]  # names of the sequence missing from a vector table


def stack_inputs(items: list[ItemInputs], dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(poi_img N x 5 x D, poi_txt N x 5 x D, poi_len N)`` of ``items``, for the head."""
    img = np.stack([x.poi_img for x in items]) if items else np.zeros((0, MAX_POIS, dim), dtype=np.float32)
    txt = np.stack([x.poi_txt for x in items]) if items else img.copy()
    return img, txt, np.array([x.poi_len for x in items], dtype=np.int64)


def poi_vector_tables(rm, enc, rows, images: dict, normalize: bool = True) -> tuple[dict, dict, dict]:
    """``(image table, name table, summary)`` of recall-format ``rows``; POIs sharing a name are pooled."""
    ids, files, groups = defaultdict(set), [], defaultdict(list)
    for r in (r for r in rows if r.poi_name):
        ids[r.poi_name].add(r.poi_id)
        if r.key in images:
            groups[r.poi_name].append(len(files))
            files.append(str(images[r.key]))
    missing = sum(1 for r in rows if r.poi_name) - len(files)
    shared = sum(len(s) > 1 for s in ids.values())
    log.info("%d POI names (%d shared by several POIs), %d images, %d missing", len(ids), shared, len(files), missing)
    vecs, ok = rm.encode_images(files, enc, desc="POI images")
    vecs, ok = np.asarray(vecs, dtype=np.float64), np.asarray(ok).astype(bool)
    img_table = {}
    for name, idx in groups.items():  # the mean of the readable image vectors, re-normalised
        if good := [i for i in idx if ok[i]]:
            m = vecs[good].mean(axis=0)
            img_table[name] = (m / max(np.linalg.norm(m), 1e-12) if normalize else m).astype(np.float32)
    # those with only unreadable images, then those without any
    empty = [n for n in groups if n not in img_table] + [n for n in ids if n not in groups]
    if empty:
        shown = ", ".join(repr(n) for n in empty[:10]) + (" ..." if len(empty) > 10 else "")
        log.warning("%d POI names have no readable image and get no image vector: %s", len(empty), shown)
    name_table = dict(zip(ids, np.asarray(rm.encode_texts(list(ids), enc))))
    summary = {"unreadable_images": int((~ok).sum()), "missing_images": missing}
    return img_table, name_table, summary
