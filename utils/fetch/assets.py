"""The asset manifest (``assets.json`` here: its comment says what an entry holds), what each
file must look like, and the sha256 pinned in ``DEST/.asset-hashes.json`` at the first
download of an asset whose manifest entry has none."""

from __future__ import annotations

from utils.cli import DataError, UserError

import itertools
import logging
import time
import urllib.parse
from dataclasses import dataclass, fields
from pathlib import Path
from string import hexdigits

from utils.formats import iter_rank_csv, iter_recall_csv, sniff_format
from utils.hashing import sha256_file
from utils.io import read_json, write_error, write_json

log = logging.getLogger("download_assets")

ROOT = Path(__file__).resolve().parents[2]  # the project: the default destination
DEFAULT_MANIFEST = Path(__file__).resolve().parent / "assets.json"
HASHES_FILE = ".asset-hashes.json"
LFS_MAGIC = b"version https://git-lfs.github.com/spec"
LOOKS_WRONG = "it does not look right: "
KINDS = {  # kind -> (what it is called, smallest plausible size: weights are never a few kB, an error page is)
    "torch": ("a torch checkpoint", 64 * 1024),
    "safetensors": ("a safetensors file", 64 * 1024),
    "npy": ("a .npy array", 128),
    "recall_csv": ("a recall-format CSV", 1),
    "rank_csv": ("a $record$ ranking CSV", 1),
    "csv": ("a CSV of the published formats", 1),
    "json": ("a JSON object", 1),
    "text": ("UTF-8 text", 1),
}
KIND_OF_EXT = {".pth": "torch", ".ckpt": "torch", ".bin": "torch", ".pt": "torch", ".safetensors": "safetensors"}
KIND_OF_EXT |= {".npy": "npy", ".csv": "csv", ".json": "json", ".txt": "text"}
MAGIC = {"torch": (b"PK\x03\x04", b"\x80"), "npy": (b"\x93NUMPY",)}  # how a file of the kind starts (zip, pickle)
CSV_ROWS_CHECKED = 50
LOOKS = {  # how a file starts -> what it is, for messages (the first match, in lower case)
    **dict.fromkeys((b"<!doctype html", b"<html", b"<head", b"<body"), "an HTML page"),
    LFS_MAGIC: "a Git LFS pointer",
    b"<": "an XML/HTML document",
    **dict.fromkeys((b"{", b"["), "JSON"),
    **{b"pk\x03\x04": "a zip archive", b"\x93numpy": "a .npy array", b"\x1f\x8b": "gzip data", b"\x80": "a pickle"},
}


class AssetError(RuntimeError):
    """A failure the user can act on; the message names the asset and what to do."""


@dataclass
class Asset:
    name: str
    path: str  # relative, '/'-separated
    url: str | None = None
    hf: dict | None = None  # {"repo_id", "filename", "revision"}
    sha256: str | None = None
    default: bool = True
    group: str | None = None  # e.g. "baselines": fetched with download_assets --with-baselines
    kind: str | None = None  # what the file is (KINDS); None: from the extension
    min_bytes: int | None = None  # smallest plausible size; None: the kind's

    def source(self, mirror: str | None) -> str:
        if mirror:
            return mirror.rstrip("/") + "/" + urllib.parse.quote(self.path)
        return self.url or f"hf://{self.hf['repo_id']}/{self.hf['filename']}"


def _asset_problem(a: dict) -> str | None:
    """Why manifest entry ``a`` (which has a name and a path) is unusable."""
    hf, sha, min_bytes = a.get("hf"), a.get("sha256"), a.get("min_bytes")
    if a["path"].startswith("/") or ".." in Path(a["path"]).parts:
        return "'path' must be relative and stay inside the destination"
    if not a.get("url") and not hf:
        return "needs a 'url' or an 'hf' source"
    if not isinstance(a.get("url") or "", str):
        return "'url' must be a string"
    if hf is not None and not (isinstance(hf, dict) and hf.get("repo_id") and hf.get("filename")):
        return "'hf' needs 'repo_id' and 'filename'"
    if a.get("kind") is not None and a["kind"] not in KINDS:
        return f"'kind' must be one of {', '.join(KINDS)}"
    if min_bytes is not None and (type(min_bytes) is not int or min_bytes < 0):
        return "'min_bytes' must be an integer >= 0"
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and set(sha.lower()) <= set(hexdigits)):
        return "'sha256' must be 64 hex digits or null"
    return None


def load_manifest(path: str | Path = DEFAULT_MANIFEST) -> list[Asset]:
    """The assets of a manifest; an unusable one is a ``DataError`` naming the file and line or asset."""
    data = read_json(path, "asset manifest")
    items = data.get("assets") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected an object with an 'assets' list")
    out: dict[str, Asset] = {}
    for i, a in enumerate(items):
        if not isinstance(a, dict) or not all(a.get(k) and isinstance(a[k], str) for k in ("name", "path")):
            raise DataError(f"{path}: assets[{i}]: every asset needs 'name' and 'path' (strings)")
        problem = "duplicate name" if a["name"] in out else _asset_problem(a)
        if problem:
            raise DataError(f"{path}: asset {a['name']!r}: {problem}")
        known = {f.name: a[f.name] for f in fields(Asset) if f.name in a}
        out[a["name"]] = Asset(**{**known, "sha256": a["sha256"].lower() if a.get("sha256") else None})
    return list(out.values())


def select_assets(assets: list[Asset], only=None, with_train: bool = False, groups=()) -> list[Asset]:
    """``only`` these, else the default set (+ the others ``with_train``, + those of the named ``groups``)."""
    if only:
        if unknown := [n for n in only if n not in {a.name for a in assets}]:
            known = ", ".join(a.name for a in assets)
            raise UserError(f"unknown asset name(s): {', '.join(unknown)}; known: {known}")
        return [a for a in assets if a.name in set(only)]
    return [a for a in assets if a.default or with_train or (a.group is not None and a.group in groups)]


def looks_like(head: bytes) -> str:
    """What a file starting with ``head`` is, for messages."""
    low = head.lstrip()[:64].lower()
    what = next((what for magic, what in LOOKS.items() if low.startswith(magic)), None)
    if what or not head:
        return what or "an empty file"
    try:
        text = head[:48].decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data starting {head[:8]!r}"
    return f"text starting {text.splitlines()[0][:40]!r}" if text.strip() else "blank text"


def _csv_problem(path: Path, kind: str) -> str | None:
    try:
        fmt = sniff_format(path)
        want = {"recall_csv": "recall", "rank_csv": "rank"}.get(kind, fmt)
        if fmt != want:
            return f"a {fmt}-format CSV, not the {want} format"
        errors: list = []
        rows = iter_rank_csv(path, errors) if fmt == "rank" else iter_recall_csv(path, errors)
        good = sum(1 for _ in itertools.islice(rows, CSV_ROWS_CHECKED))
    except DataError as e:
        return str(e)
    bad = errors[:CSV_ROWS_CHECKED]
    if good == 0 or len(bad) > good:
        first = f" (line {bad[0].line}: {bad[0].message})" if bad else ""
        return f"{len(bad)} of its first {good + len(bad)} rows are not {fmt}-format rows{first}"
    return None


def _looks_ok(kind: str, path: Path, head: bytes, size: int) -> bool:
    if kind in MAGIC:
        return head.startswith(MAGIC[kind])
    if kind == "safetensors":
        n = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
        return 2 <= n <= size - 8 and head[8:9] == b"{"
    if kind == "json":
        try:
            return isinstance(read_json(path), dict)
        except (DataError, ValueError):
            return False
    try:  # text: a character may be cut at the end of the sample
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3
    return b"\x00" not in head


def content_problem(asset: Asset, path: Path) -> str | None:
    """Why ``path`` does not look like ``asset`` (None: it does): its head, size, and a bounded parse."""
    kind = asset.kind or KIND_OF_EXT.get(Path(asset.path).suffix.lower())
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
    what = looks_like(head)
    name, least = KINDS.get(kind, ("the expected file", 1))
    if head.startswith(LFS_MAGIC) or what == "an HTML page":
        return f"{what} ({size} bytes), not {name}"
    least = asset.min_bytes if asset.min_bytes is not None else least
    if size < least:
        return f"{size} bytes, too small for {name} (at least {least} expected; it looks like {what})"
    if kind in ("recall_csv", "rank_csv", "csv"):
        problem = _csv_problem(path, kind)
        return None if problem is None else f"not {name}: {problem}"
    if kind is None or _looks_ok(kind, path, head, size):
        return None
    return f"{what} ({size} bytes), not {name}"


class HashRecords:
    """``DEST/.asset-hashes.json``: per asset the sha256, size and mtime of its verified file."""

    def __init__(self, dest: Path):
        self.path = Path(dest) / HASHES_FILE
        self.data: dict = {}
        if self.path.is_file():
            try:
                self.data = dict(read_json(self.path)["assets"])
            except (DataError, KeyError, TypeError, ValueError):
                log.warning("%s is unreadable; it will be rebuilt", self.path)

    def get(self, name: str) -> dict:
        return self.data.get(name) or {}

    def put(self, asset: Asset, file: Path, sha: str, source: str) -> None:
        st = file.stat()
        rec = dict(path=asset.path, sha256=sha, size=st.st_size, mtime_ns=st.st_mtime_ns, source=source)
        self.data[asset.name] = rec | dict(manifest_sha256=asset.sha256, recorded=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.save()

    def drop(self, name: str) -> None:
        if self.data.pop(name, None) is not None:
            self.save()

    def save(self) -> None:
        try:
            write_json(self.path, {"assets": dict(sorted(self.data.items()))})
        except OSError as e:
            raise write_error(e, self.path) from None

    def expected(self, asset: Asset) -> tuple[str | None, str]:
        """(the sha256 ``asset`` must have, where it comes from: manifest | record | unknown)."""
        rec = self.get(asset.name)
        if asset.sha256:
            return asset.sha256, "manifest"
        if rec.get("sha256") and rec.get("path") == asset.path:
            return rec["sha256"], "record"
        return None, "unknown"


def check_present(asset: Asset, dest: Path, records: HashRecords, rehash: bool = False) -> str | None:
    """Why ``asset`` is not usable as it is under ``dest`` (None: present and verified; hashed only if
    changed). Without a sha256 in the manifest, the file must also look like what it is."""
    file = dest / asset.path
    if not file.is_file():
        return "missing"
    want, origin = records.expected(asset)
    if origin != "manifest":  # a pinned (or not yet pinned) hash proves nothing by itself
        if (problem := content_problem(asset, file)) is not None:
            return f"{LOOKS_WRONG}{problem}"
    rec, st = records.get(asset.name), file.stat()
    recorded = (rec.get("path"), rec.get("size"), rec.get("mtime_ns")) == (asset.path, st.st_size, st.st_mtime_ns)
    if not rehash and recorded and (want is None or rec.get("sha256") == want):
        return None
    got = sha256_file(file)
    if want is not None and got != want:
        return f"sha256 {got} differs from the expected {want} ({origin})"
    records.put(asset, file, got, rec.get("source", "existing file"))
    if want is None:
        log.info("%s: existing file %s, sha256 %s recorded", asset.name, file, got)
    return None
