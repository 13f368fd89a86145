"""numpy files from elsewhere, read without trusting them: a pickled ``.npy`` resolves only
the globals plain data needs (tensors through torch's ``weights_only`` loader), :func:`bounded`
checks what it built against :class:`Limits`, and any fault is a ``DataError`` naming the file."""

from __future__ import annotations

from utils.cli import DataError

import collections
import functools
import io
import pickle
import zipfile
import zlib
from typing import NamedTuple

import numpy as np
import numpy.lib.format as npformat


class Limits(NamedTuple):
    entries: int = 5_000_000  # names in one table
    depth: int = 6  # containers inside containers (0-d array > dict > value > ...)
    elements: int = 50_000_000  # numbers, strings and containers, shared references counted each time


LIMITS = Limits()
# what numpy and zipfile raise on a damaged file (MemoryError: a header announcing a huge array)
_BROKEN = (OSError, ValueError, EOFError, KeyError, NotImplementedError, MemoryError, zipfile.BadZipFile, zlib.error)


def read_npz(path, what: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``; anything else is "``path``: not ``what`` (why)"."""
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with z:
            return {k: z[k] for k in z.files}
    except _BROKEN as e:
        raise DataError(f"{path}: not {what} ({e})") from None


def _latin1_encode(obj, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``; latin-1 only."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return obj.encode("latin1")


def _storage_from_bytes(data: bytes):
    """``torch.storage._load_from_bytes`` through torch's weights-only loader."""
    import torch

    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("torch storage payload is not bytes")
    return torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")


@functools.cache
def _torch_globals() -> dict[tuple[str, str], object]:
    """The tensor-rebuilding globals, as torch's weights-only unpickler resolves them."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
    except ImportError:
        return {}
    allowed = _get_allowed_globals()
    names = ("torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter")
    out = {tuple(n.rsplit(".", 1)): allowed[n] for n in (*names, "torch.Size", "torch.device") if n in allowed}
    out[("torch.storage", "_load_from_bytes")] = _storage_from_bytes
    return out


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], object]:
    try:
        import numpy._core.multiarray as ma
        import numpy._core.numeric as nm
    except ImportError:  # numpy 1.x
        import numpy.core.multiarray as ma
        import numpy.core.numeric as nm
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,  # bytes in protocol-2 pickles
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for mod in ("builtins", "__builtin__"):  # __builtin__: Python-2 pickles
        allowed.update({(mod, t.__name__): t for t in (set, frozenset, complex)})
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = ma._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = ma.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = nm._frombuffer  # protocol-5 arrays
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of :func:`_allowed_globals` and :func:`_torch_globals`."""

    def find_class(self, module: str, name: str):
        obj = _allowed_globals().get((module, name))
        if obj is None and module.split(".")[0] == "torch":
            obj = _torch_globals().get((module, name))
        if obj is None:
            why = "which plain data never needs (it could run code)"
            hint = "if you trust this file, pass --trust-pickle, or convert it once with `poi_tables.py convert`"
            raise DataError(f"refusing to load: the pickle asks for the global '{module}.{name}', {why}; {hint}")
        return obj


_HEADERS = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}


def load_npy(path, trust_pickle: bool = False):
    """A ``.npy``'s array; a pickled one through :class:`RestrictedUnpickler` unless ``trust_pickle``."""
    try:
        with open(path, "rb") as f:
            version = npformat.read_magic(f)
            if version not in _HEADERS:
                raise ValueError(f"format version {version}, expected 1.0 or 2.0")
            shape, _, dtype = _HEADERS[version](f)
            if not dtype.hasobject:
                f.seek(0)
                return np.load(f, allow_pickle=False)
            payload = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, EOFError, MemoryError) as e:
        raise DataError(f"{path}: not a .npy file ({e})") from None
    try:
        obj = (pickle.Unpickler if trust_pickle else RestrictedUnpickler)(io.BytesIO(payload)).load()
    except DataError as e:  # a refused global
        raise DataError(f"{path}: {e}") from None
    except Exception as e:  # whatever the pickle does (truncated, bad opcodes, a refused codec ...): one line
        raise DataError(f"{path}: the pickled payload cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(obj, np.ndarray) or obj.shape != tuple(shape):
        found = f"shape {obj.shape}" if isinstance(obj, np.ndarray) else f"a {type(obj).__name__}"
        raise DataError(f"{path}: the header announces an array of shape {shape}, the pickle holds {found}")
    return obj


_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None), np.generic, np.dtype)
_SEQUENCES = (list, tuple, frozenset, set)


def bounded(obj, source: str, limits: Limits = LIMITS):
    """``obj`` with tensors as numpy arrays, depth and expanded size checked (walked once, counted per reference)."""
    done: dict[int, tuple] = {}  # id -> (converted object, expanded element count)
    keep, active = [], set()  # keep: objects whose ids are in use; active: on the current path

    def fail(what: str):
        raise DataError(f"{source}: not a POI table: {what}")

    def walk(o, depth: int):
        if isinstance(o, _ATOMS):
            return o, 1
        key = id(o)
        if key in done:
            return done[key]
        if key in active:
            fail("a container holds itself (a reference cycle)")
        if depth > limits.depth:
            fail(f"nested more than {limits.depth} levels deep")
        active.add(key)
        keep.append(o)
        if type(o).__module__.split(".")[0] == "torch":  # tensors become numpy arrays
            import torch

            if not isinstance(o, torch.Tensor):
                fail(f"holds a {type(o).__name__}")
            if o.numel() > limits.elements:
                fail(f"a tensor of {o.numel():,} elements")
            o = o.detach().cpu()
            if o.is_floating_point() and o.dtype not in (torch.float32, torch.float64):
                o = o.float()
            o = o.contiguous().numpy().copy()
        if isinstance(o, np.ndarray) and not o.dtype.hasobject:
            out, n = o, 1 + o.size
        elif isinstance(o, dict):
            pairs = [(walk(k, depth + 1), walk(v, depth + 1)) for k, v in o.items()]
            out, n = {k: v for (k, _), (v, _) in pairs}, 1 + sum(a + b for (_, a), (_, b) in pairs)
        elif isinstance(o, (np.ndarray, *_SEQUENCES)):
            items = [walk(x, depth + 1) for x in (o.flat if isinstance(o, np.ndarray) else o)]
            n = 1 + sum(s for _, s in items)
            if isinstance(o, np.ndarray):
                out = np.fromiter((x for x, _ in items), dtype=object, count=len(items)).reshape(o.shape)
            else:
                out = next(t for t in _SEQUENCES if isinstance(o, t))(x for x, _ in items)
        else:
            fail(f"holds a {type(o).__name__}")
        if n > limits.elements:
            fail(f"it expands to more than {limits.elements:,} elements (shared references counted each time)")
        active.discard(key)
        done[key] = out, n
        return out, n

    return walk(obj, 0)[0]
