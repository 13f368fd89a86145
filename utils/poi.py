"""POI inputs of the ranker: the three POI tables (read safely) and the per-item inputs
built from them (SPEC section 5).

Reading and writing the three POI tables of the ranker (SPEC section 5) safely.

The published tables are Python dicts pickled through ``np.save`` (a 0-d object array
holding the dict):

- pic-num      ``name -> [n0, n1, n2]``           (2866 POIs)
- image vectors ``name -> 512-d mean image vector`` (``..._imgs_avg10_vector.npy``)
- name vectors  ``name -> 512-d name vector``       (``..._poi_name_vector.npy``)

Pickle runs code on load, so a ``.npy`` table is read by ``RestrictedUnpickler``: the
``.npy`` header is parsed with ``numpy.lib.format`` and the pickle payload may only
name the few globals that ``np.save`` of a dict of arrays / lists / strings / numbers
needs (numpy's array and scalar reconstruction, ``numpy.ndarray``, ``numpy.dtype``,
basic containers). Anything else raises ``PoiTableError`` naming the file and the
forbidden global, before that global is ever called. ``trust_pickle=True`` instead
uses plain ``np.load(allow_pickle=True)``, for files the user vouches for.

The safe format (``.npz``, read with ``allow_pickle=False``) holds
``names`` (unicode array), ``values`` (N x D matrix: float32 vectors, or the pic-num
counts) and ``kind``. ``load_poi_table`` picks the reader by suffix.

Item inputs, per ranking row:

Item inputs of the ranker, built from a ranking row exactly as SPEC section 5 says.

For one item (``title``, ``poi_names``):
- ``pois_text``: the text whose vector is ``pois_feature`` — the whole
  ``poi_names`` string when ``poi_names.strip()`` is non-empty (the ``< 1`` rule),
  else the title;
- the POI sequence: none when ``len(poi_names.strip()) <= 1``; otherwise
  ``poi_names.split(",")``, stable-sorted by descending pic-num weight
  ``n0 + 5*n1 + 3*n2`` (looked up by the stripped name, missing = [0, 0, 0]),
  first 5 kept; vectors looked up by the *unstripped* name, zeros when missing.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.lib.format as npformat

from .cli import UserError


log = logging.getLogger(__name__)

SAFE_SUFFIX = ".npz"
PICKLE_SUFFIX = ".npy"
KINDS = ("vectors", "pic_num")


class PoiTableError(UserError, ValueError):
    """A POI table that cannot be read safely or has the wrong shape; names the file."""


def _latin1_encode(obj, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``; only latin-1."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return obj.encode("latin1")


def _numpy_core():
    """numpy's private core module (``numpy._core`` in numpy 2, ``numpy.core`` before)."""
    try:
        import numpy._core.multiarray as ma  # noqa: PLC0415
        import numpy._core.numeric as nm  # noqa: PLC0415
    except ImportError:  # numpy 1.x
        import numpy.core.multiarray as ma  # noqa: PLC0415
        import numpy.core.numeric as nm  # noqa: PLC0415
    return ma, nm


def _allowed_globals() -> dict[tuple[str, str], object]:
    ma, nm = _numpy_core()
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("__builtin__", "set"): set,           # Python-2 pickles
        ("__builtin__", "frozenset"): frozenset,
        ("_codecs", "encode"): _latin1_encode,   # bytes in protocol-2 pickles
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = ma._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = ma.scalar
        # protocol-5 array pickles: frombuffer(...).reshape(...), no code either
        allowed[(f"{mod}.numeric", "_frombuffer")] = nm._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals ``np.save`` of plain data needs."""

    def __init__(self, file, source: str = "<pickle>", **kwargs):
        super().__init__(file, **kwargs)
        self.source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise PoiTableError(
                f"{self.source}: refusing to load: the pickle asks for the global "
                f"'{module}.{name}', which a table of arrays, lists, strings and numbers never "
                f"needs (it could run code). If you trust this file, pass --trust-pickle; "
                f"better, convert it once with `poi_tables.py convert`.")
        return obj


def restricted_load_npy(path: str | os.PathLike):
    """The object stored in a pickled ``.npy`` file, through ``RestrictedUnpickler``."""
    path = str(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise PoiTableError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        try:
            version = npformat.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npformat.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = npformat.read_array_header_2_0(f)
            else:
                raise PoiTableError(f"{path}: .npy format version {version} is not supported "
                                    f"for pickled tables (expected 1.0 or 2.0)")
        except ValueError as e:
            raise PoiTableError(f"{path}: not a .npy file ({e})") from None
        if not dtype.hasobject:
            # a plain numeric array: numpy reads it without pickle
            f.seek(0)
            return np.load(f, allow_pickle=False)
        payload = f.read()
    try:
        obj = RestrictedUnpickler(io.BytesIO(payload), source=path, encoding="ASCII").load()
    except PoiTableError:
        raise
    except Exception as e:  # truncated payload, bad opcodes, a refused codec ...
        raise PoiTableError(f"{path}: the pickled payload cannot be read "
                            f"({type(e).__name__}: {e})") from None
    if not isinstance(obj, np.ndarray):
        raise PoiTableError(f"{path}: the pickle holds a {type(obj).__name__}, not a numpy array")
    if obj.shape != tuple(shape):
        raise PoiTableError(f"{path}: header says shape {shape}, payload has {obj.shape}")
    return obj


def _as_dict(obj, path: str) -> dict:
    if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype == object:
        obj = obj.item()
    if not isinstance(obj, dict):
        raise PoiTableError(f"{path}: expected a dict saved with np.save (name -> vector or "
                            f"counts), found {type(obj).__name__}")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise PoiTableError(f"{path}: keys must be POI names (str); found {type(bad[0]).__name__} "
                            f"key {bad[0]!r}")
    return obj


def load_safe_table(path: str | os.PathLike) -> dict:
    """Read the ``.npz`` safe format (no pickle): ``name -> row of values``."""
    path = str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("names", "values") if k not in z.files]
            if missing:
                raise PoiTableError(f"{path}: not a POI table: missing arrays {missing} "
                                    f"(has {z.files})")
            names, values = z["names"], z["values"]
    except PoiTableError:
        raise
    except (OSError, ValueError) as e:
        raise PoiTableError(f"{path}: cannot read as a safe POI table ({e})") from None
    if names.ndim != 1 or values.ndim != 2 or len(names) != len(values):
        raise PoiTableError(f"{path}: names {names.shape} and values {values.shape} do not "
                            f"form a table (need N names and an N x D matrix)")
    if names.dtype.kind != "U":
        raise PoiTableError(f"{path}: names must be a unicode array, found dtype {names.dtype}")
    return {str(n): v for n, v in zip(names.tolist(), values)}


def load_poi_table(path: str | os.PathLike, trust_pickle: bool = False) -> dict:
    """A POI table as a dict ``name -> vector / [n0, n1, n2]``.

    ``.npz``: the safe format. Anything else is taken as the published pickled-dict
    ``.npy`` and read through the restricted unpickler, or with plain
    ``np.load(allow_pickle=True)`` when ``trust_pickle`` is set.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise PoiTableError(f"{path}: no such POI table file")
    if path.lower().endswith(SAFE_SUFFIX):
        table = load_safe_table(path)
    elif trust_pickle:
        log.warning("%s: loading with allow_pickle=True (--trust-pickle): code in it would run", path)
        table = _as_dict(np.load(path, allow_pickle=True), path)
    else:
        table = _as_dict(restricted_load_npy(path), path)
    log.info("%s: %d POIs", path, len(table))
    return table


# ---------------------------------------------------------------------------
# the safe format
# ---------------------------------------------------------------------------
def table_matrix(table: dict, source: str = "<table>") -> tuple[list[str], np.ndarray]:
    """``(names, N x D matrix)`` of a dict table; every value must have the same length."""
    names = list(table)
    rows, width = [], None
    for name in names:
        v = np.asarray(table[name])
        if v.dtype == object or v.dtype.kind not in "biuf":
            raise PoiTableError(f"{source}: value of {name!r} is not numeric ({v.dtype})")
        v = v.reshape(-1)
        if width is None:
            width = v.size
        elif v.size != width:
            raise PoiTableError(f"{source}: value of {name!r} has {v.size} numbers, the first "
                                f"entry has {width}")
        rows.append(v)
    if not rows:
        return names, np.zeros((0, 0), dtype=np.float32)
    return names, np.stack(rows)


def guess_kind(values: np.ndarray) -> str:
    return "pic_num" if values.ndim == 2 and values.shape[1] == 3 else "vectors"


def save_safe_table(table: dict, path: str | os.PathLike, kind: str | None = None,
                    source: str = "<table>") -> Path:
    """Write ``table`` as ``.npz`` (names + matrix). Vectors become float32; pic-num
    counts keep an integer dtype when they are integers."""
    path = Path(path)
    if path.suffix.lower() != SAFE_SUFFIX:
        raise PoiTableError(f"{path}: the safe format needs the {SAFE_SUFFIX} suffix")
    names, values = table_matrix(table, source)
    kind = kind or guess_kind(values)
    if kind not in KINDS:
        raise PoiTableError(f"unknown table kind {kind!r}; choose from {KINDS}")
    if kind == "vectors":
        values = values.astype(np.float32)
    elif values.dtype.kind in "biu":
        values = values.astype(np.int64)
    else:
        values = values.astype(np.float64)
    name_arr = np.array(names, dtype=str) if names else np.zeros(0, dtype="<U1")
    if name_arr.tolist() != names:  # numpy drops trailing NUL characters
        bad = next(n for n, m in zip(names, name_arr.tolist()) if n != m)
        raise PoiTableError(f"{source}: POI name {bad!r} cannot be stored as a numpy string")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, names=name_arr, values=values, kind=np.array(kind))
    os.replace(tmp, path)
    return path


def save_pickled_table(table: dict, path: str | os.PathLike) -> Path:
    """The authors' format (``np.save`` of the dict), for tools that expect it; values
    are stored as float32 arrays, which the restricted loader reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
    with open(tmp, "wb") as f:
        np.save(f, {k: np.asarray(v, dtype=np.float32) for k, v in table.items()},
                allow_pickle=True)
    os.replace(tmp, path)
    return path


def table_dim(table: dict, source: str = "<table>") -> int:
    """Common vector length of a table (0 when empty); a ragged table is an error."""
    dims = {}
    for name, v in table.items():
        dims.setdefault(int(np.asarray(v).size), name)
        if len(dims) > 1:
            (d1, n1), (d2, n2) = list(dims.items())[:2]
            raise PoiTableError(f"{source}: {n1!r} has {d1} values but {n2!r} has {d2}")
    return next(iter(dims), 0)


class PoiTables(NamedTuple):
    """The ranker's three POI tables (empty dicts for those not given)."""
    pic_num: dict
    image_vectors: dict
    name_vectors: dict
    dim: int

    def inputs(self, title: str, poi_names: str):
        """Item inputs per SPEC section 5 (utils.poi.build_item_inputs)."""
        return build_item_inputs(title, poi_names, self.pic_num, self.image_vectors,
                                 self.name_vectors, self.dim)


def load_poi_tables(pic_num=None, image_vectors=None, name_vectors=None, *, dim: int,
                    trust_pickle: bool = False) -> PoiTables:
    """Load and check the three tables the scripts take as ``--poi-pic-num``,
    ``--poi-image-vectors`` and ``--poi-name-vectors``; a path left out gives an empty
    table. Vector tables must hold ``dim``-d vectors, pic-num values up to 3 counts;
    errors name the option and the file."""
    tables = []
    for opt, path in (("--poi-pic-num", pic_num), ("--poi-image-vectors", image_vectors),
                      ("--poi-name-vectors", name_vectors)):
        try:
            tables.append(load_poi_table(path, trust_pickle=trust_pickle) if path else {})
        except PoiTableError as e:
            raise PoiTableError(f"{opt}: {e}") from None
    for table, path in zip(tables[1:], (image_vectors, name_vectors)):
        d = table_dim(table, str(path))
        if table and d != dim:
            raise PoiTableError(f"{path}: vectors have {d} values, the model's embedding has {dim}")
    for name, v in tables[0].items():
        a = np.asarray(v)
        if a.dtype == object or a.dtype.kind not in "biuf" or a.size > 3:
            raise PoiTableError(f"{pic_num}: pic-num entry {name!r} = {v!r} is not up to 3 counts")
    return PoiTables(*tables, dim)


MAX_POIS = 5


def pic_num_weight(counts) -> float:
    n = list(counts) + [0, 0, 0]
    return float(n[0]) + 5 * float(n[1]) + 3 * float(n[2])


def poi_sequence(poi_names: str, pic_num: dict, max_pois: int = MAX_POIS) -> list[str]:
    """The ordered POI names (unstripped, as split) that enter the attention."""
    if len(poi_names.strip()) <= 1:
        return []
    names = poi_names.split(",")
    names.sort(key=lambda n: -pic_num_weight(pic_num.get(n.strip(), (0, 0, 0))))
    return names[:max_pois]


def pois_text(title: str, poi_names: str) -> str:
    return poi_names if len(poi_names.strip()) >= 1 else title


@dataclass
class ItemInputs:
    pois_text: str            # text encoded into pois_feature
    poi_names: list[str]      # the POI sequence (<= 5 names)
    poi_img: np.ndarray       # 5 x D float32, zero rows for unused/unknown
    poi_txt: np.ndarray       # 5 x D float32
    poi_len: int
    unknown: list[str]        # names of the sequence missing from a vector table


def build_item_inputs(title: str, poi_names: str, pic_num: dict, img_vectors: dict,
                      name_vectors: dict, dim: int = 512) -> ItemInputs:
    seq = poi_sequence(poi_names, pic_num)
    poi_img = np.zeros((MAX_POIS, dim), dtype=np.float32)
    poi_txt = np.zeros((MAX_POIS, dim), dtype=np.float32)
    unknown = []
    for i, name in enumerate(seq):
        iv, tv = img_vectors.get(name), name_vectors.get(name)
        if iv is None or tv is None:
            unknown.append(name)
        if iv is not None:
            poi_img[i] = np.asarray(iv, dtype=np.float32).reshape(-1)
        if tv is not None:
            poi_txt[i] = np.asarray(tv, dtype=np.float32).reshape(-1)
    return ItemInputs(pois_text(title, poi_names), seq, poi_img, poi_txt, len(seq), unknown)
