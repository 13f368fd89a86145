"""Published assets (CSVs, POI tables, weights, bert files): manifest, fetch, verify.

The manifest (``assets.json`` at the project root, or ``--manifest FILE``) lists each
asset with a ``name``, a source (``url``, or ``hf`` = Hugging Face repo/filename), a
relative ``path`` and a ``sha256`` (``null`` when not known in advance). ``path`` is
both where the file lands under the destination directory and where it sits under a
mirror's base URL (``--mirror BASE``: ``BASE/<path>``), so a populated destination
directory served over HTTP is a complete mirror.

A download streams into ``<path>.part`` (with ``<path>.part.json`` remembering the
URL and the server's validators), so an interrupted download resumes with
``Range: bytes=N-`` (206 appends; a 200 restarts from zero). The finished file is
hashed; a mismatch moves it aside to ``<path>.bad-sha256`` and fails. A verified file
is renamed into place atomically and recorded in ``DEST/.asset-hashes.json`` (name,
path, sha256, size, mtime): an asset whose sha256 the manifest does not know is
pinned there on first download and checked against that record afterwards, and a
later run skips every asset whose file still has the recorded size and mtime.

Before a sha256 is pinned, the file must look like what it is (:func:`content_problem`):
a torch checkpoint (zip or pickle), a safetensors file, a ``.npy`` array, a CSV of the
published format, a JSON object, UTF-8 text, with a plausible size (``min_bytes`` in the
manifest, or a default per kind). A file that does not (an HTML error page saved as
``align_model.pth``) is kept aside as ``<path>.bad-content`` and not pinned; a pinned
file that does not is set aside and fetched again.
"""

from __future__ import annotations

from utils.cli import DataError, UserError

import errno
import itertools
import json
import logging
import os
import shutil
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import requests
import urllib3

from utils.formats import iter_rank_csv, iter_recall_csv, sniff_format
from utils.hashing import sha256_file
from utils.io import write_json

from .download import classify_exception, root_cause

log = logging.getLogger("download_assets")

ROOT = Path(__file__).resolve().parent
DEFAULT_MANIFEST = ROOT / "assets.json"
HASHES_FILE = ".asset-hashes.json"
PART_SUFFIX = ".part"
BAD_SUFFIX = ".bad-sha256"
BAD_CONTENT_SUFFIX = ".bad-content"
CHUNK = 1 << 16
LFS_MAGIC = b"version https://git-lfs.github.com/spec"


class AssetError(RuntimeError):
    """A failure the user can act on; the message names the asset and what to do."""


class ManifestError(AssetError, UserError):
    """The asset manifest or the asset names asked for are unusable (exit status 2)."""


class ContentError(AssetError):
    """A downloaded file does not look like what the asset is."""


class NetworkError(AssetError):
    def __init__(self, host: str, msg: str):
        super().__init__(msg)
        self.host = host


class ChecksumError(AssetError):
    pass


class DiskFullError(AssetError):
    pass


# ---------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------
@dataclass
class Asset:
    name: str
    path: str  # relative, '/'-separated
    url: str | None = None
    hf: dict | None = None  # {"repo_id", "filename", "revision"}
    sha256: str | None = None
    default: bool = True
    description: str = ""
    group: str | None = None  # e.g. "baselines": fetched with download_assets --with-baselines
    kind: str | None = None  # what the file is (KINDS); None: from the extension
    min_bytes: int | None = None  # smallest plausible size; None: the kind's default

    def source(self, mirror: str | None) -> str:
        if mirror:
            return mirror_url(mirror, self.path)
        if self.url:
            return self.url
        return f"hf://{self.hf['repo_id']}/{self.hf['filename']}"


def load_manifest(path: str | os.PathLike = DEFAULT_MANIFEST) -> list[Asset]:
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ManifestError(f"{path}: cannot read the asset manifest ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    items = data.get("assets") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ManifestError(f"{path}: expected an object with an 'assets' list")
    out, seen = [], set()
    for i, a in enumerate(items):
        where = f"{path}: assets[{i}]"
        if not isinstance(a, dict) or not a.get("name") or not a.get("path"):
            raise ManifestError(f"{where}: every asset needs 'name' and 'path'")
        name, rel = a["name"], a["path"]
        where = f"{path}: asset {name!r}"
        if name in seen:
            raise ManifestError(f"{where}: duplicate name")
        seen.add(name)
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise ManifestError(f"{where}: 'path' must be relative and stay inside the destination")
        if not a.get("url") and not a.get("hf"):
            raise ManifestError(f"{where}: needs a 'url' or an 'hf' source")
        hf = a.get("hf")
        if hf is not None and not (isinstance(hf, dict) and hf.get("repo_id") and hf.get("filename")):
            raise ManifestError(f"{where}: 'hf' needs 'repo_id' and 'filename'")
        kind = a.get("kind")
        if kind is not None and kind not in KINDS:
            raise ManifestError(f"{where}: 'kind' must be one of {', '.join(KINDS)}")
        min_bytes = a.get("min_bytes")
        if min_bytes is not None and (not isinstance(min_bytes, int) or isinstance(min_bytes, bool) or min_bytes < 0):
            raise ManifestError(f"{where}: 'min_bytes' must be an integer >= 0")
        sha = a.get("sha256")
        if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower())):
            raise ManifestError(f"{where}: 'sha256' must be 64 hex digits or null")
        out.append(
            Asset(
                name=name,
                path=rel,
                url=a.get("url"),
                hf=hf,
                sha256=sha.lower() if sha else None,
                default=a.get("default", True),
                description=a.get("description", ""),
                group=a.get("group"),
                kind=kind,
                min_bytes=min_bytes,
            )
        )
    return out


def select_assets(assets: list[Asset], only=None, with_train: bool = False, groups=()) -> list[Asset]:
    """``only`` names (any order) or the default set (+ non-default ones with ``with_train``,
    + the assets of the named ``groups``, e.g. ``("baselines",)``)."""
    by_name = {a.name: a for a in assets}
    if only:
        unknown = [n for n in only if n not in by_name]
        if unknown:
            raise ManifestError(f"unknown asset name(s): {', '.join(unknown)}; known: {', '.join(by_name)}")
        return [a for a in assets if a.name in set(only)]
    return [a for a in assets if a.default or with_train or (a.group is not None and a.group in groups)]


def mirror_url(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + urllib.parse.quote(rel)


# ---------------------------------------------------------------------------
# does a file look like what the asset is?
# ---------------------------------------------------------------------------
KINDS = ("torch", "safetensors", "npy", "recall_csv", "rank_csv", "csv", "json", "text")
KIND_OF_EXT = {
    ".pth": "torch",
    ".ckpt": "torch",
    ".bin": "torch",
    ".pt": "torch",
    ".safetensors": "safetensors",
    ".npy": "npy",
    ".csv": "csv",
    ".json": "json",
    ".txt": "text",
}
# the smallest plausible size of each kind, when the manifest gives no min_bytes: a
# model's weights are never a few kilobytes (an error page is); an .npy header is 128 bytes
MIN_BYTES = {"torch": 64 * 1024, "safetensors": 64 * 1024, "npy": 128}
KIND_NAMES = {
    "torch": "a torch checkpoint",
    "safetensors": "a safetensors file",
    "npy": "a .npy array",
    "recall_csv": "a recall-format CSV",
    "rank_csv": "a $record$ ranking CSV",
    "csv": "a CSV of the published formats",
    "json": "a JSON object",
    "text": "UTF-8 text",
}
CSV_ROWS_CHECKED = 50
LOOKS_WRONG = "it does not look right: "


def asset_kind(asset: Asset) -> str | None:
    return asset.kind or KIND_OF_EXT.get(Path(asset.path).suffix.lower())


def looks_like(head: bytes) -> str:
    """A short description of what a file starting with ``head`` is, for messages."""
    h = head.lstrip()
    low = h[:64].lower()
    if not head:
        return "an empty file"
    if low.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page"
    if head.startswith(LFS_MAGIC):
        return "a Git LFS pointer"
    if low.startswith(b"<?xml") or low.startswith(b"<"):
        return "an XML/HTML document"
    if h[:1] in (b"{", b"["):
        return "JSON"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive"
    if head.startswith(b"\x93NUMPY"):
        return "a .npy array"
    if head.startswith(b"\x1f\x8b"):
        return "gzip data"
    if head[:1] == b"\x80":
        return "a pickle"
    try:
        text = head[:48].decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data starting {head[:8]!r}"
    return f"text starting {text.splitlines()[0][:40]!r}" if text.strip() else "blank text"


def _safetensors_ok(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def _csv_problem(path: Path, kind: str) -> str | None:
    try:
        fmt = sniff_format(path)
    except DataError as e:
        return str(e)
    want = {"recall_csv": "recall", "rank_csv": "rank"}.get(kind, fmt)
    if fmt != want:
        return f"a {fmt}-format CSV, not the {want} format"
    errors: list = []
    rows = iter_rank_csv(path, errors) if fmt == "rank" else iter_recall_csv(path, errors)
    try:
        good = sum(1 for _ in itertools.islice(rows, CSV_ROWS_CHECKED))
    except DataError as e:
        return str(e)
    finally:
        rows.close()
    bad = errors[:CSV_ROWS_CHECKED]
    if good == 0 or len(bad) > good:
        first = f" (line {bad[0].line}: {bad[0].message})" if bad else ""
        return f"{len(bad)} of its first {good + len(bad)} rows are not {fmt}-format rows{first}"
    return None


def content_problem(asset: Asset, path: Path) -> str | None:
    """Why ``path`` does not look like ``asset`` (None: it does). Cheap: the head of the
    file, and for CSV/JSON/text a bounded parse."""
    kind = asset_kind(asset)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
    what = looks_like(head)
    name = KIND_NAMES.get(kind, "the expected file")
    if head.startswith(LFS_MAGIC) or what == "an HTML page":
        return f"{what} ({size} bytes), not {name}"
    min_bytes = asset.min_bytes if asset.min_bytes is not None else MIN_BYTES.get(kind, 1)
    if size < min_bytes:
        return f"{size} bytes, too small for {name} (at least {min_bytes} expected; it looks like {what})"
    if kind is None:
        return None
    if kind == "torch":
        ok = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"
    elif kind == "safetensors":
        ok = _safetensors_ok(head, size)
    elif kind == "npy":
        ok = head.startswith(b"\x93NUMPY")
    elif kind in ("recall_csv", "rank_csv", "csv"):
        problem = _csv_problem(path, kind)
        return None if problem is None else f"not {name}: {problem}"
    elif kind == "json":
        try:
            with open(path, encoding="utf-8") as f:
                ok = isinstance(json.load(f), dict)
        except (UnicodeDecodeError, ValueError):
            ok = False
    else:  # text
        try:
            head.decode("utf-8")
            ok = b"\x00" not in head
        except UnicodeDecodeError as e:
            ok = e.start >= len(head) - 3  # a character cut at the end of the sample
    return None if ok else f"{what} ({size} bytes), not {name}"


def set_aside(path: Path, suffix: str) -> Path:
    """Move ``path`` to ``<path><suffix>`` (replacing an older one); returns the new path."""
    bad = path.with_name(path.name + suffix)
    os.replace(path, bad)
    return bad


# ---------------------------------------------------------------------------
# hash records (DEST/.asset-hashes.json)
# ---------------------------------------------------------------------------
class HashRecords:
    def __init__(self, dest: Path):
        self.path = dest / HASHES_FILE
        self.data: dict = {}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8")).get("assets", {})
            except (OSError, ValueError, AttributeError):
                log.warning("%s is unreadable; it will be rebuilt", self.path)
                self.data = {}

    def get(self, name: str) -> dict | None:
        return self.data.get(name)

    def put(self, asset: Asset, file: Path, sha: str, source: str) -> None:
        st = file.stat()
        self.data[asset.name] = {
            "path": asset.path,
            "sha256": sha,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "source": source,
            "manifest_sha256": asset.sha256,
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self.save()

    def drop(self, name: str) -> None:
        if self.data.pop(name, None) is not None:
            self.save()

    def save(self) -> None:
        write_json(self.path, {"assets": dict(sorted(self.data.items()))})


def expected_sha(asset: Asset, records: HashRecords) -> tuple[str | None, str]:
    """(expected sha256, where it comes from: 'manifest' | 'record' | 'unknown')."""
    if asset.sha256:
        return asset.sha256, "manifest"
    rec = records.get(asset.name)
    if rec and rec.get("sha256") and rec.get("path") == asset.path:
        return rec["sha256"], "record"
    return None, "unknown"


def check_present(asset: Asset, dest: Path, records: HashRecords, rehash: bool = False) -> str | None:
    """Why ``asset`` is not usable as it is (None: present and verified).

    Fast path: the file has the size and mtime recorded when it was verified and the
    recorded sha256 is the expected one. Otherwise the file is hashed (and the record
    updated when it matches). Without a sha256 in the manifest the file must also look
    like what it is (:func:`content_problem`)."""
    file = dest / asset.path
    if not file.is_file():
        return "missing"
    want, origin = expected_sha(asset, records)
    if origin != "manifest":  # a pinned (or not yet pinned) hash proves nothing by itself
        problem = content_problem(asset, file)
        if problem is not None:
            return f"{LOOKS_WRONG}{problem}"
    rec = records.get(asset.name)
    st = file.stat()
    if (
        not rehash
        and rec
        and rec.get("path") == asset.path
        and rec.get("size") == st.st_size
        and rec.get("mtime_ns") == st.st_mtime_ns
        and (want is None or rec.get("sha256") == want)
    ):
        return None
    got = sha256_file(file)
    if want is not None and got != want:
        return f"sha256 {got} differs from the expected {want} ({origin})"
    records.put(asset, file, got, (rec or {}).get("source", "existing file"))
    if want is None:
        log.info("%s: existing file %s, sha256 %s recorded", asset.name, file, got)
    return None


# ---------------------------------------------------------------------------
# fetching over HTTP, resumable
# ---------------------------------------------------------------------------
def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _network_error(url: str, exc: BaseException, mirror: bool) -> NetworkError:
    host = _host(url)
    hint = "check that the mirror is running and reachable" if mirror else "check the network or use --mirror"
    return NetworkError(host, f"cannot reach {host}: {hint} ({root_cause(exc)})")


def _free_space(path: Path) -> str:
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown"
    return f"{free / 1e6:.1f} MB"


def _disk_full(asset: Asset, file: Path, exc: OSError) -> DiskFullError:
    return DiskFullError(
        f"{asset.name}: disk full while writing {file} ({exc.strerror}); "
        f"{_free_space(file.parent)} free on that disk. Free some space and rerun: "
        f"the partial download is kept and resumes."
    )


def _open_part(path: Path, mode: str):
    """Opened for writing the partial download (a seam for the disk-full test)."""
    return open(path, mode)


def _read_meta(meta: Path) -> dict:
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


@dataclass
class FetchStats:
    resumed_from: int = 0
    restarts: int = 0
    requests: int = 0
    ranges: list = field(default_factory=list)


def http_fetch(
    session: requests.Session,
    asset: Asset,
    url: str,
    final: Path,
    timeout=(10.0, 60.0),
    body_retries: int = 3,
    mirror: bool = False,
    progress: bool = True,
    backoff: float = 0.5,
) -> tuple[Path, FetchStats]:
    """Download ``url`` into ``<final>.part``, resuming a partial one; returns the
    completed temporary file (not yet verified or renamed)."""
    from tqdm import tqdm  # noqa: PLC0415

    part = final.with_name(final.name + PART_SUFFIX)
    meta_path = final.with_name(final.name + PART_SUFFIX + ".json")
    final.parent.mkdir(parents=True, exist_ok=True)
    stats = FetchStats()
    meta = _read_meta(meta_path)
    if part.exists() and meta.get("url") not in (None, url):
        log.info("%s: discarding a partial download from another URL", asset.name)
        _unlink(part)
        meta = {}
    attempt = 0
    while True:
        start = part.stat().st_size if part.exists() else 0
        headers = {}
        if start > 0:
            headers["Range"] = f"bytes={start}-"
            validator = meta.get("etag") if not str(meta.get("etag", "")).startswith("W/") else None
            validator = validator or meta.get("last_modified")
            if validator:
                headers["If-Range"] = validator
            if attempt == 0:
                stats.resumed_from = start
                log.info("%s: resuming at byte %d", asset.name, start)
        stats.requests += 1
        stats.ranges.append(headers.get("Range"))
        try:
            resp = session.get(url, stream=True, timeout=timeout, headers=headers)
        except requests.exceptions.RequestException as e:
            kind = classify_exception(e)
            if kind == "blocked_address":
                raise AssetError(f"{asset.name}: {root_cause(e)}") from None
            if kind == "connection" or isinstance(e, requests.exceptions.ConnectTimeout):
                raise _network_error(url, e, mirror) from None
            raise AssetError(f"{asset.name}: request to {url} failed ({root_cause(e)})") from None
        with resp:
            code = resp.status_code
            if code == 416 and start > 0:
                total = resp.headers.get("Content-Range", "").rpartition("/")[2]
                if total.isdigit() and int(total) == start:
                    log.info("%s: the partial download was already complete", asset.name)
                    break
                log.info("%s: server refused the resume range; restarting", asset.name)
                _unlink(part)
                stats.restarts += 1
                continue
            if code not in (200, 206):
                hint = " (is the mirror laid out like the manifest's 'path'?)" if mirror and code == 404 else ""
                raise AssetError(f"{asset.name}: HTTP {code} {resp.reason or ''} from {url}{hint}")
            if code == 206:
                cr = resp.headers.get("Content-Range", "")
                first = cr.split(" ", 1)[-1].split("-", 1)[0]
                if not first.isdigit() or int(first) != start:
                    log.info("%s: unexpected Content-Range %r; restarting", asset.name, cr)
                    _unlink(part)
                    stats.restarts += 1
                    continue
                mode = "ab"
            else:
                if start > 0:
                    log.info("%s: server sent the whole file instead of the range; restarting", asset.name)
                    stats.restarts += 1
                start, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = start + int(length) if length and length.isdigit() else None
            meta = {
                "url": url,
                "etag": resp.headers.get("ETag"),
                "last_modified": resp.headers.get("Last-Modified"),
                "total": total,
            }
            write_json(meta_path, meta)
            bar = tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=asset.name,
                disable=not progress,
                leave=False,
                dynamic_ncols=True,
            )
            try:
                try:
                    f = _open_part(part, mode)
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        raise _disk_full(asset, part, e) from None
                    raise AssetError(f"{asset.name}: cannot write {part} ({e.strerror})") from None
                with f:
                    for chunk in resp.iter_content(CHUNK):
                        if chunk:
                            f.write(chunk)
                            bar.update(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as e:
                err = e  # the body broke off (connection cut, read timeout): resume below
            except OSError as e:  # writing the partial file failed
                if e.errno == errno.ENOSPC:
                    raise _disk_full(asset, part, e) from None
                raise AssetError(f"{asset.name}: cannot write {part} ({e.strerror})") from None
            else:
                err = None
            finally:
                bar.close()
        if err is None:
            got = part.stat().st_size
            if total is not None and got != total:
                err = AssetError(f"got {got} of {total} bytes")
            else:
                break
        attempt += 1
        have = part.stat().st_size if part.exists() else 0
        if attempt > body_retries:
            raise AssetError(
                f"{asset.name}: the download from {url} broke off {attempt} times "
                f"(last: {type(err).__name__}: {err}); rerun to resume from byte {have}"
            )
        log.warning("%s: download interrupted at byte %d (%s); resuming", asset.name, have, type(err).__name__)
        time.sleep(backoff * (2 ** (attempt - 1)))
    _unlink(meta_path)
    return part, stats


def hf_fetch(asset: Asset, final: Path) -> tuple[Path, str]:
    """Fetch through ``huggingface_hub.hf_hub_download`` (HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE
    apply) and copy the cached file to ``<final>.part``; returns (part, source)."""
    try:
        from huggingface_hub import constants, hf_hub_download  # noqa: PLC0415
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,  # noqa: PLC0415
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:
        raise AssetError(
            f"{asset.name}: huggingface_hub is not installed ({e}); pip install -r requirements.txt, or use --mirror"
        ) from None
    repo, filename = asset.hf["repo_id"], asset.hf["filename"]
    revision = asset.hf.get("revision") or "main"
    endpoint = constants.ENDPOINT
    try:
        cached = hf_hub_download(repo_id=repo, filename=filename, revision=revision)
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise AssetError(
                f"{asset.name}: {repo}/{filename} is not in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}) and offline mode is on (HF_HUB_OFFLINE): "
                f"run once online, point HF_HOME at a filled cache, or use --mirror"
            ) from None
        host = _host(endpoint)
        raise NetworkError(
            host,
            f"cannot reach {host}: check the network or use --mirror (or set HF_ENDPOINT to a Hugging Face mirror)",
        ) from None
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise AssetError(
            f"{asset.name}: {repo}/{filename}@{revision} not found on {endpoint} ({type(e).__name__})"
        ) from None
    except Exception as e:  # noqa: BLE001 - httpx / hub errors of any kind
        if "connect" in type(e).__name__.lower() or "connect" in str(e).lower():
            host = _host(endpoint)
            raise NetworkError(
                host, f"cannot reach {host}: check the network or use --mirror ({type(e).__name__})"
            ) from None
        raise AssetError(
            f"{asset.name}: Hugging Face download of {repo}/{filename} failed ({type(e).__name__}: {e})"
        ) from None
    part = final.with_name(final.name + PART_SUFFIX)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(cached, part)
    except OSError as e:
        _unlink(part)
        if e.errno == errno.ENOSPC:
            raise _disk_full(asset, part, e) from None
        raise AssetError(f"{asset.name}: cannot copy {cached} to {part} ({e.strerror})") from None
    return part, f"hf://{repo}/{filename}@{revision}"


# ---------------------------------------------------------------------------
# one asset, end to end
# ---------------------------------------------------------------------------
@dataclass
class Outcome:
    name: str
    status: str  # skipped | downloaded | failed
    path: Path
    sha256: str | None = None
    sha_origin: str = ""  # manifest | record | unknown (newly recorded)
    source: str | None = None
    error: str | None = None
    stats: FetchStats | None = None


def fetch_asset(
    asset: Asset,
    dest: Path,
    records: HashRecords,
    session=None,
    mirror: str | None = None,
    timeout=(10.0, 60.0),
    body_retries: int = 3,
    progress: bool = True,
    force: bool = False,
    rehash: bool = False,
) -> Outcome:
    """Skip when present and verified; else fetch, verify, rename atomically, record.

    Raises AssetError (and subclasses) with a message for the user."""
    final = dest / asset.path
    if not force:
        why = check_present(asset, dest, records, rehash=rehash)
        if why is None:
            rec = records.get(asset.name) or {}
            return Outcome(
                asset.name, "skipped", final, rec.get("sha256"), expected_sha(asset, records)[1], rec.get("source")
            )
        if why != "missing":
            log.warning("%s: %s: %s; downloading again", asset.name, final, why)
        if why.startswith(LOOKS_WRONG):  # whatever was pinned for it is no proof
            bad = set_aside(final, BAD_CONTENT_SUFFIX)
            records.drop(asset.name)
            log.warning("%s: kept aside as %s and its recorded sha256 dropped", asset.name, bad)
    want, origin = expected_sha(asset, records)
    stats = None
    if mirror or asset.url:
        url = asset.source(mirror)
        log.info("%s: downloading %s", asset.name, url)
        part, stats = http_fetch(
            session,
            asset,
            url,
            final,
            timeout=timeout,
            body_retries=body_retries,
            mirror=bool(mirror),
            progress=progress,
        )
        source = url
    else:
        log.info("%s: fetching %s/%s through huggingface_hub", asset.name, asset.hf["repo_id"], asset.hf["filename"])
        part, source = hf_fetch(asset, final)
    got = sha256_file(part)
    with open(part, "rb") as f:
        head = f.read(len(LFS_MAGIC))
    if head == LFS_MAGIC and not (want and got == want):
        bad = final.with_name(final.name + BAD_SUFFIX)
        os.replace(part, bad)
        raise ChecksumError(f"{asset.name}: {source} served a Git LFS pointer, not the file; kept aside as {bad}")
    if want is not None and got != want:
        bad = final.with_name(final.name + BAD_SUFFIX)
        os.replace(part, bad)
        where = (
            "the manifest"
            if origin == "manifest"
            else f"{dest / HASHES_FILE} (recorded at the first download; delete that entry to accept a new version)"
        )
        raise ChecksumError(
            f"{asset.name}: checksum mismatch for {source}: sha256 {got}, "
            f"expected {want} from {where}. The file was NOT used; it is kept "
            f"aside as {bad}"
        )
    if want is None:  # about to be pinned: it must at least look like what it is
        problem = content_problem(asset, part)
        if problem is not None:
            bad = final.with_name(final.name + BAD_CONTENT_SUFFIX)
            os.replace(part, bad)
            raise ContentError(f"{asset.name}: {final} from {source} is {problem}; not pinned, kept aside as {bad}")
    os.replace(part, final)
    records.put(asset, final, got, source)
    if want is None:
        log.info("%s: sha256 not known in advance; recorded %s in %s", asset.name, got, dest / HASHES_FILE)
    return Outcome(asset.name, "downloaded", final, got, origin, source, stats=stats)
