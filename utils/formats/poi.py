"""The ranker's POI inputs (SPEC section 5): the three POI tables, read safely and
checked, and the per-item inputs built from them.

Tables (``name -> value``):

- pic-num        ``name -> [n0, n1, n2]``       (2866 POIs in the published file)
- image vectors  ``name -> D-d mean image vector`` (``..._imgs_avg10_vector.npy``)
- name vectors   ``name -> D-d name vector``       (``..._poi_name_vector.npy``)

Two file formats:

- the published one: a Python dict pickled through ``np.save`` (a 0-d object array).
  Pickle runs code on load, so it is read by :class:`RestrictedUnpickler`, which
  resolves only the globals ``np.save`` of plain data needs (numpy's array and scalar
  reconstruction, basic containers). Tensors (``np.save`` of a dict of torch tensors)
  are accepted only through torch's own ``weights_only`` loader: the storage bytes are
  read by ``torch.load(weights_only=True)`` and the tensor is rebuilt by the function
  torch's weights-only unpickler itself allows; tensors become numpy arrays at once.
  Any other global is refused, naming the file and the global, before it is called.
  ``trust_pickle=True`` uses plain ``np.load(allow_pickle=True)`` instead.
- the safe one (``.npz``, read with ``allow_pickle=False``): ``names`` (unicode
  array), ``values`` (N x D matrix) and ``kind`` (``poi_tables.py convert`` writes it).

Whatever the reader, what was built is bounded before anything looks at it
(:data:`LIMITS`: entries, nesting depth, total element count, counted as the data would
expand, so a small pickle of shared references cannot make a later step spin), and
:func:`load_poi_tables` checks each table's shape (str -> vectors of the model's
length, all finite / str -> up to 3 finite counts) before any use.

Item inputs for one item (``title``, ``poi_names``):

- ``pois_text``: the text whose vector is ``pois_feature``: the whole ``poi_names``
  string when ``poi_names.strip()`` is non-empty (the ``< 1`` rule), else the title;
- the POI sequence: none when ``len(poi_names.strip()) <= 1``; otherwise
  ``poi_names.split(",")``, stable-sorted by descending pic-num weight
  ``n0 + 5*n1 + 3*n2`` (looked up by the stripped name, missing = [0, 0, 0]), the first
  5 kept; vectors looked up by the *unstripped* name, zeros when missing.
"""

from __future__ import annotations

from utils.cli import UserError

import collections
import io
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.lib.format as npformat

from utils.io import atomic_write

log = logging.getLogger(__name__)

SAFE_SUFFIX = ".npz"
KINDS = ("vectors", "pic_num")
MAX_POIS = 5


class PoiTableError(UserError, ValueError):
    """A POI table that cannot be read safely or has the wrong shape; names the file."""


class Limits(NamedTuple):
    entries: int = 5_000_000  # names in one table
    depth: int = 6  # containers inside containers (0-d array > dict > value > ...)
    elements: int = 50_000_000  # numbers, strings and containers, shared references counted each time


LIMITS = Limits()


# ---------------------------------------------------------------------------
# the restricted unpickler
# ---------------------------------------------------------------------------
def _latin1_encode(obj, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``; latin-1 only."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return obj.encode("latin1")


def _storage_from_bytes(data: bytes):
    """A tensor storage pickled by ``pickle`` (``torch.storage._load_from_bytes``), read
    by torch's weights-only loader instead of the unrestricted one."""
    import torch

    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("torch storage payload is not bytes")
    return torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")


def _torch_globals() -> dict[tuple[str, str], object]:
    """The tensor-rebuilding globals, as torch's weights-only unpickler resolves them
    (empty when torch is not installed)."""
    try:
        import torch
        from torch._weights_only_unpickler import _get_allowed_globals
    except ImportError:
        return {}
    allowed = _get_allowed_globals()
    out: dict[tuple[str, str], object] = {("torch.storage", "_load_from_bytes"): _storage_from_bytes}
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter"):
        full = f"torch._utils.{name}"
        if full in allowed:
            out[("torch._utils", name)] = allowed[full]
    for full in ("torch.Size", "torch.device"):
        if full in allowed:
            mod, _, name = full.rpartition(".")
            out[(mod, name)] = allowed[full]
    del torch
    return out


def _numpy_core():
    """numpy's private core modules (``numpy._core`` in numpy 2, ``numpy.core`` before)."""
    try:
        import numpy._core.multiarray as ma
        import numpy._core.numeric as nm
    except ImportError:  # numpy 1.x
        import numpy.core.multiarray as ma
        import numpy.core.numeric as nm
    return ma, nm


def _allowed_globals() -> dict[tuple[str, str], object]:
    ma, nm = _numpy_core()
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("__builtin__", "set"): set,  # Python-2 pickles
        ("__builtin__", "frozenset"): frozenset,
        ("_codecs", "encode"): _latin1_encode,  # bytes in protocol-2 pickles
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = ma._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = ma.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = nm._frombuffer  # protocol-5 arrays
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals ``np.save`` of plain data (and of torch
    tensors, routed to torch's weights-only loader) needs."""

    def __init__(self, file, source: str = "<pickle>", **kwargs):
        super().__init__(file, **kwargs)
        self.source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None and module.split(".")[0] == "torch":
            obj = _torch_globals().get((module, name))
        if obj is None:
            raise PoiTableError(
                f"{self.source}: refusing to load: the pickle asks for the global "
                f"'{module}.{name}', which a table of arrays, lists, strings and numbers never "
                f"needs (it could run code). If you trust this file, pass --trust-pickle; "
                f"better, convert it once with `poi_tables.py convert`."
            )
        return obj


def restricted_load_npy(path: str | os.PathLike):
    """The object stored in a ``.npy`` file: a plain numeric array as numpy reads it, a
    pickled one through :class:`RestrictedUnpickler`."""
    path = str(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise PoiTableError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        try:
            version = npformat.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npformat.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = npformat.read_array_header_2_0(f)
            else:
                raise PoiTableError(
                    f"{path}: .npy format version {version} is not supported for pickled tables (expected 1.0 or 2.0)"
                )
        except ValueError as e:
            raise PoiTableError(f"{path}: not a .npy file ({e})") from None
        if not dtype.hasobject:
            f.seek(0)
            try:
                return np.load(f, allow_pickle=False)
            except ValueError as e:
                raise PoiTableError(f"{path}: cannot read the array ({e})") from None
        payload = f.read()
    try:
        obj = RestrictedUnpickler(io.BytesIO(payload), source=path, encoding="ASCII").load()
    except PoiTableError:
        raise
    except Exception as e:  # truncated payload, bad opcodes, a refused codec, torch refusing
        raise PoiTableError(f"{path}: the pickled payload cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(obj, np.ndarray):
        raise PoiTableError(f"{path}: the pickle holds a {type(obj).__name__}, not a numpy array")
    if obj.shape != tuple(shape):
        raise PoiTableError(f"{path}: header says shape {shape}, payload has {obj.shape}")
    return obj


# ---------------------------------------------------------------------------
# bounding what was built
# ---------------------------------------------------------------------------
_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None), np.generic, np.dtype)


def bounded(obj, source: str, limits: Limits = LIMITS):
    """``obj`` with torch tensors turned into numpy arrays, after checking it against
    ``limits``: nesting depth, and the number of elements it would expand to (numbers in
    arrays, items of containers; a container reached twice counts twice). Shared
    references are counted from a memo, so the check runs in the size of the pickle, not
    of its expansion; a cycle is an error."""
    sizes: dict[int, int] = {}  # id -> expanded element count (done)
    done: dict[int, object] = {}  # id -> converted object
    keep: list = []  # keeps ids stable while walking
    active: set[int] = set()

    def fail(what: str):
        raise PoiTableError(f"{source}: not a POI table: {what}")

    def walk(o, depth: int):
        if isinstance(o, _ATOMS):
            return o, 1
        key = id(o)
        if key in sizes:
            return done[key], sizes[key]
        if key in active:
            fail("a container holds itself (a reference cycle)")
        if depth > limits.depth:
            fail(f"nested more than {limits.depth} levels deep")
        active.add(key)
        keep.append(o)
        if type(o).__module__.split(".")[0] == "torch":
            o = _tensor_to_numpy(o, source, limits)
        if isinstance(o, np.ndarray):
            if o.dtype.hasobject:
                items = [walk(x, depth + 1) for x in o.flat]
                out = np.empty(o.shape, dtype=object)
                for i, (x, _) in enumerate(items):
                    out.flat[i] = x
                n = 1 + sum(s for _, s in items)
            else:
                out, n = o, 1 + o.size
        elif isinstance(o, dict):
            items = [(walk(k, depth + 1), walk(v, depth + 1)) for k, v in o.items()]
            out = dict((k, v) for (k, _), (v, _) in items)
            n = 1 + sum(a + b for (_, a), (_, b) in items)
        elif isinstance(o, (list, tuple, set, frozenset)):
            items = [walk(x, depth + 1) for x in o]
            base = next(t for t in (list, tuple, frozenset, set) if isinstance(o, t))
            out = base(x for x, _ in items)
            n = 1 + sum(s for _, s in items)
        else:
            fail(f"holds a {type(o).__name__}")
        if n > limits.elements:
            fail(
                f"it expands to more than {limits.elements:,} elements (shared references counted each time they occur)"
            )
        active.discard(key)
        sizes[key], done[key] = n, out
        return out, n

    out, _ = walk(obj, 0)
    return out


def _tensor_to_numpy(t, source: str, limits: Limits) -> np.ndarray:
    import torch

    if not isinstance(t, torch.Tensor):
        raise PoiTableError(f"{source}: not a POI table: holds a {type(t).__name__}")
    if t.numel() > limits.elements:
        raise PoiTableError(f"{source}: not a POI table: a tensor of {t.numel():,} elements")
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.contiguous().numpy().copy()


# ---------------------------------------------------------------------------
# reading one table
# ---------------------------------------------------------------------------
def _as_dict(obj, path: str, limits: Limits) -> dict:
    if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype == object:
        obj = obj.item()
    if not isinstance(obj, dict):
        raise PoiTableError(
            f"{path}: expected a dict saved with np.save (name -> vector or counts), found {type(obj).__name__}"
        )
    if len(obj) > limits.entries:
        raise PoiTableError(f"{path}: {len(obj):,} entries, more than the {limits.entries:,} a POI table may have")
    bad = next((k for k in obj if not isinstance(k, str)), None)
    if bad is not None:
        raise PoiTableError(f"{path}: keys must be POI names (str); found {type(bad).__name__} key {bad!r}")
    return bounded(obj, path, limits)


def load_safe_table(path: str | os.PathLike) -> dict:
    """Read the ``.npz`` safe format (no pickle): ``name -> row of values``."""
    path = str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("names", "values") if k not in z.files]
            if missing:
                raise PoiTableError(f"{path}: not a POI table: missing arrays {missing} (has {z.files})")
            names, values = z["names"], z["values"]
    except PoiTableError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise PoiTableError(f"{path}: cannot read as a safe POI table ({e})") from None
    if names.ndim != 1 or values.ndim != 2 or len(names) != len(values):
        raise PoiTableError(
            f"{path}: names {names.shape} and values {values.shape} do not "
            f"form a table (need N names and an N x D matrix)"
        )
    if names.dtype.kind != "U":
        raise PoiTableError(f"{path}: names must be a unicode array, found dtype {names.dtype}")
    return {str(n): v for n, v in zip(names.tolist(), values)}


def load_poi_table(path: str | os.PathLike, trust_pickle: bool = False, limits: Limits = LIMITS) -> dict:
    """A POI table as a dict ``name -> value``, bounded by ``limits`` (its values are
    not checked here: :func:`check_vectors` / :func:`check_pic_num` do that).

    ``.npz``: the safe format. Anything else is taken as the published pickled-dict
    ``.npy``, read through the restricted unpickler, or with plain
    ``np.load(allow_pickle=True)`` when ``trust_pickle`` is set."""
    path = str(path)
    if not os.path.isfile(path):
        raise PoiTableError(f"{path}: no such POI table file")
    if path.lower().endswith(SAFE_SUFFIX):
        table = load_safe_table(path)
        if len(table) > limits.entries:
            raise PoiTableError(
                f"{path}: {len(table):,} entries, more than the {limits.entries:,} a POI table may have"
            )
    elif trust_pickle:
        log.warning("%s: loading with allow_pickle=True (--trust-pickle): code in it would run", path)
        try:
            raw = np.load(path, allow_pickle=True)
        except (OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
            raise PoiTableError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
        table = _as_dict(raw, path, limits)
    else:
        table = _as_dict(restricted_load_npy(path), path, limits)
    log.info("%s: %d POIs", path, len(table))
    return table


# ---------------------------------------------------------------------------
# checking a table's shape
# ---------------------------------------------------------------------------
def _numeric(value, name: str, source: str) -> np.ndarray:
    """``value`` as a flat numeric array, or a ``PoiTableError`` naming the entry."""
    try:
        a = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise PoiTableError(f"{source}: value of {name!r} is not a vector ({e})") from None
    if a.dtype == object or a.dtype.kind not in "biuf":
        raise PoiTableError(f"{source}: value of {name!r} is not numeric ({a.dtype})")
    a = a.reshape(-1)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise PoiTableError(f"{source}: value of {name!r} holds NaN or infinite numbers")
    return a


def check_vectors(table: dict, source: str, dim: int | None = None) -> dict[str, np.ndarray]:
    """``name -> float32 vector`` of one length (``dim`` when given), all finite."""
    out: dict[str, np.ndarray] = {}
    first = None
    for name, value in table.items():
        with np.errstate(over="ignore"):
            v = _numeric(value, name, source).astype(np.float32)
        if not np.isfinite(v).all():  # finite in float64, too large for float32
            raise PoiTableError(f"{source}: value of {name!r} overflows float32")
        if first is None:
            first = (name, v.size)
            if dim is not None and v.size != dim:
                raise PoiTableError(f"{source}: vectors have {v.size} values, the model's embedding has {dim}")
        elif v.size != first[1]:
            raise PoiTableError(f"{source}: {first[0]!r} has {first[1]} values but {name!r} has {v.size}")
        out[name] = v
    return out


def check_pic_num(table: dict, source: str) -> dict[str, list]:
    """``name -> [n0, n1, n2]`` (up to 3 finite counts)."""
    out: dict[str, list] = {}
    for name, value in table.items():
        try:
            a = _numeric(value, name, source)
        except PoiTableError:
            raise PoiTableError(
                f"{source}: pic-num entry {name!r} = {value!r:.80} is not up to 3 finite counts"
            ) from None
        if a.size > 3:
            raise PoiTableError(f"{source}: pic-num entry {name!r} has {a.size} values, expected up to 3 counts")
        out[name] = a.tolist()
    return out


def table_matrix(table: dict, source: str = "<table>") -> tuple[list[str], np.ndarray]:
    """``(names, N x D matrix)`` of a dict table; every value numeric, finite, of one length."""
    names = list(table)
    rows, width = [], None
    for name in names:
        v = _numeric(table[name], name, source)
        if width is None:
            width = v.size
        elif v.size != width:
            raise PoiTableError(f"{source}: value of {name!r} has {v.size} numbers, the first entry has {width}")
        rows.append(v)
    if not rows:
        return names, np.zeros((0, 0), dtype=np.float32)
    return names, np.stack(rows)


def guess_kind(values: np.ndarray) -> str:
    return "pic_num" if values.ndim == 2 and values.shape[1] == 3 else "vectors"


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------
def save_safe_table(table: dict, path: str | os.PathLike, kind: str | None = None, source: str = "<table>") -> Path:
    """Write ``table`` as ``.npz`` (names + matrix), atomically. Vectors become float32;
    pic-num counts keep an integer dtype when they are integers."""
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
    with atomic_write(path, "wb") as f:
        np.savez(f, names=name_arr, values=values, kind=np.array(kind))
    return path


def save_pickled_table(table: dict, path: str | os.PathLike) -> Path:
    """The authors' format (``np.save`` of the dict), atomically, for tools that expect
    it; values are stored as float32 arrays, which the restricted loader reads back."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        np.save(f, {k: np.asarray(v, dtype=np.float32) for k, v in table.items()}, allow_pickle=True)
    return path


# ---------------------------------------------------------------------------
# the three tables of a run
# ---------------------------------------------------------------------------
class PoiTables(NamedTuple):
    """The ranker's three POI tables, checked (empty dicts for those not given)."""

    pic_num: dict
    image_vectors: dict
    name_vectors: dict
    dim: int | None
    sources: tuple = (None, None, None)  # the three paths, for messages

    def inputs(self, title: str, poi_names: str) -> ItemInputs:
        """Item inputs per SPEC section 5 (:func:`build_item_inputs`)."""
        return build_item_inputs(title, poi_names, self.pic_num, self.image_vectors, self.name_vectors, self.dim)

    def with_dim(self, dim: int) -> PoiTables:
        """These tables for a model whose embedding has ``dim`` values (an error naming
        the option and file when a vector table holds another length)."""
        for opt, table, path in (
            ("--poi-image-vectors", self.image_vectors, self.sources[1]),
            ("--poi-name-vectors", self.name_vectors, self.sources[2]),
        ):
            d = len(next(iter(table.values()))) if table else dim
            if d != dim:
                raise PoiTableError(f"{opt}: {path}: vectors have {d} values, the model's embedding has {dim}")
        return self._replace(dim=dim)


def load_poi_tables(
    pic_num=None, image_vectors=None, name_vectors=None, *, dim: int | None, trust_pickle: bool = False
) -> PoiTables:
    """Load and check the tables the scripts take as ``--poi-pic-num``,
    ``--poi-image-vectors`` and ``--poi-name-vectors`` (a path left out gives an empty
    table): vector tables must hold finite vectors of one length (``dim``; ``None``
    leaves that to :meth:`PoiTables.with_dim`, so the tables can be checked before the
    model is loaded), pic-num values up to 3 finite counts. Errors name the option and
    the file."""
    out = []
    for opt, path in (
        ("--poi-pic-num", pic_num),
        ("--poi-image-vectors", image_vectors),
        ("--poi-name-vectors", name_vectors),
    ):
        if not path:
            out.append({})
            continue
        try:
            table = load_poi_table(path, trust_pickle=trust_pickle)
            out.append(check_pic_num(table, str(path)) if opt == "--poi-pic-num" else check_vectors(table, str(path)))
        except PoiTableError as e:
            raise PoiTableError(f"{opt}: {e}") from None
    tables = PoiTables(*out, None, (pic_num, image_vectors, name_vectors))
    return tables.with_dim(dim) if dim is not None else tables


# ---------------------------------------------------------------------------
# item inputs
# ---------------------------------------------------------------------------
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
    pois_text: str  # text encoded into pois_feature
    poi_names: list[str]  # the POI sequence (<= 5 names)
    poi_img: np.ndarray  # 5 x D float32, zero rows for unused/unknown
    poi_txt: np.ndarray  # 5 x D float32
    poi_len: int
    unknown: list[str]  # names of the sequence missing from a vector table


def build_item_inputs(
    title: str, poi_names: str, pic_num: dict, img_vectors: dict, name_vectors: dict, dim: int = 512
) -> ItemInputs:
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


def stack_inputs(items: list[ItemInputs], dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(poi_img N x 5 x D, poi_txt N x 5 x D, poi_len N)`` of ``items``, for the head."""
    if not items:
        z = np.zeros((0, MAX_POIS, dim), dtype=np.float32)
        return z, z.copy(), np.zeros(0, dtype=np.int64)
    return (
        np.stack([x.poi_img for x in items]),
        np.stack([x.poi_txt for x in items]),
        np.array([x.poi_len for x in items], dtype=np.int64),
    )
