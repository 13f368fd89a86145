"""Fetching the assets: ``fetch_assets(...)`` is what ``download_assets.py`` runs.

A download streams into ``<file>.part`` (``<file>.part.json`` remembers the URL and the
server's validators), so an interrupted one resumes with ``Range: bytes=N-`` (206 appends,
200 restarts from zero), also in a later run. The finished file is hashed: a mismatch is
kept aside as ``<file>.bad-sha256``, a file that does not look like its asset (before its
hash is pinned) as ``<file>.bad-content``; a good one is renamed into place and recorded.
The Hugging Face files come from the local Hugging Face cache when it holds them (HF_HOME;
the only source with HF_HUB_OFFLINE=1), else from ``HF_ENDPOINT`` over the same checked
session as every other URL.
"""

from __future__ import annotations

from utils.cli import UserError

import logging
import os
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import requests

from utils.args import Downloads
from utils.hashing import sha256_file
from utils.io import PartFile, exclusive_lock, read_json, write_json

from .assets import HASHES_FILE, LFS_MAGIC, LOOKS_WRONG, Asset, AssetError, HashRecords, check_present, content_problem
from .errors import classify_exception, root_cause
from .http import Deadline, open_session, url_host

log = logging.getLogger("download_assets")
CHUNK = 1 << 16
BODY_RETRIES = 3  # a body that breaks off resumes where it stopped, this many times
HF_ENDPOINT = "https://huggingface.co"


class NetworkError(AssetError):
    """The asset's host cannot be reached (the other assets of that host are not tried)."""

    def __init__(self, host: str, msg: str):
        super().__init__(msg)
        self.host = host


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _get(session, asset: Asset, url: str, start: int, meta: dict, timeout, mirror: bool):
    """The response to a GET of ``url`` from byte ``start`` (``If-Range``: the validator of
    the partial download, so a changed file comes whole)."""
    headers = {}
    if start:
        etag = meta.get("etag") if not str(meta.get("etag", "")).startswith("W/") else None
        headers = {"Range": f"bytes={start}-", **({"If-Range": v} if (v := etag or meta.get("last_modified")) else {})}
    try:
        return session.get(url, stream=True, timeout=timeout, headers=headers)
    except Exception as e:  # noqa: BLE001 - every transport error: one line for the user
        kind = classify_exception(e)
        if kind == "deadline":
            raise  # said by http_fetch
        if kind == "blocked_address":
            raise AssetError(f"{asset.name}: {root_cause(e)}") from None
        if kind == "connection" or isinstance(e, requests.exceptions.ConnectTimeout):
            hint = "check that the mirror is running and reachable" if mirror else "check the network or use --mirror"
            raise NetworkError(_host(url), f"cannot reach {_host(url)}: {hint} ({root_cause(e)})") from None
        raise AssetError(f"{asset.name}: request to {url} failed ({root_cause(e)})") from None


def _resume_from(resp, start: int, asset: Asset, url: str, mirror: bool) -> int | None:
    """Where the body of ``resp`` starts in the file (None: the part is already complete)."""
    code, crange = resp.status_code, resp.headers.get("Content-Range", "")
    if code == 416 and start and crange.rpartition("/")[2] == str(start):
        return None
    if code == 206 and crange.split(" ", 1)[-1].split("-", 1)[0] == str(start):
        return start
    if code == 200:
        if start:
            log.info("%s: the server sent the whole file instead of the range; restarting", asset.name)
        return 0
    if code in (206, 416) and start:
        log.info("%s: the server refused the resume range (%s); restarting", asset.name, crange)
        raise _Restart
    hint = " (is the mirror laid out like the manifest's 'path'?)" if mirror and code == 404 else ""
    raise AssetError(f"{asset.name}: HTTP {code} {resp.reason or ''} from {url}{hint}")


class _Restart(Exception):
    """The partial download cannot be continued: start again from byte 0."""


def _body(resp, part: PartFile, asset: Asset, progress: bool) -> int | None:
    """Append the body to ``part``; the size the file should have (None: not told)."""
    from tqdm import tqdm  # noqa: PLC0415 - tqdm only when a download starts

    length = resp.headers.get("Content-Length", "")
    total = part.size + int(length) if length.isdigit() else None
    with tqdm(total=total, initial=part.size, unit="B", unit_scale=True, desc=asset.name, disable=not progress) as bar:
        for chunk in resp.iter_content(CHUNK):
            part.write(chunk)
            bar.update(len(chunk))
    part.close()
    return total


def _read_meta(path: Path) -> dict:
    try:
        meta = read_json(path) if path.is_file() else {}
    except UserError:
        return {}
    return meta if isinstance(meta, dict) else {}


def http_fetch(session, asset: Asset, url: str, final: Path, net: Downloads, mirror: bool = False, progress=True):
    """Download ``url`` into ``<final>.part``, resuming a partial one (across runs too);
    the completed part (not yet verified). ``net``: timeouts, backoff, deadline."""
    part_path, meta_path = final.with_name(final.name + ".part"), final.with_name(final.name + ".part.json")
    meta = _read_meta(meta_path)
    if meta.get("url") not in (None, url):
        log.info("%s: discarding a partial download from another URL", asset.name)
        part_path.unlink(missing_ok=True)
    attempt, err = 0, None
    with Deadline(net.deadline) as clock:
        while True:
            start = part_path.stat().st_size if part_path.exists() else 0
            if start and not attempt:
                log.info("%s: resuming at byte %d", asset.name, start)
            try:
                with _get(session, asset, url, start, meta, net.timeout, mirror) as resp:
                    offset = _resume_from(resp, start, asset, url, mirror)
                    if offset is None:
                        break
                    meta = {
                        "url": url,
                        "etag": resp.headers.get("ETag"),
                        "last_modified": resp.headers.get("Last-Modified"),
                    }
                    write_json(meta_path, meta)
                    part = PartFile(part_path, resume=offset > 0)
                    try:
                        total = _body(resp, part, asset, progress)
                    finally:
                        part.discard(keep=True)
                if total is None or part.size == total:
                    break
                err = f"got {part.size} of {total} bytes"
            except _Restart:
                part_path.unlink(missing_ok=True)
                continue
            except (AssetError, UserError):
                raise
            except Exception as e:  # noqa: BLE001 - the body broke off (connection cut, read timeout): resume
                err = root_cause(e)
            attempt += 1
            have = part_path.stat().st_size if part_path.exists() else 0
            if clock.expired:
                raise AssetError(
                    f"{asset.name}: not finished within the deadline of {net.deadline:g} s (--download-deadline); rerun to resume from byte {have}"
                )
            if attempt > BODY_RETRIES:
                raise AssetError(
                    f"{asset.name}: the download from {url} broke off {attempt} times (last: {err}); rerun to resume from byte {have}"
                )
            log.warning("%s: download interrupted at byte %d (%s); resuming", asset.name, have, err)
            time.sleep(net.backoff * 2 ** (attempt - 1))
    meta_path.unlink(missing_ok=True)
    return part_path


def _hf_cached(asset: Asset) -> str | None:
    """The asset's file in the local Hugging Face cache (HF_HOME), if it is there."""
    try:
        from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415
    except ImportError:
        return None
    found = try_to_load_from_cache(asset.hf["repo_id"], asset.hf["filename"], revision=asset.hf.get("revision"))
    return found if isinstance(found, str) else None


def _copy_part(src: str, final: Path) -> Path:
    part = PartFile(final.with_name(final.name + ".part"))
    with open(src, "rb") as f:
        while chunk := f.read(CHUNK):
            part.write(chunk)
    part.close()
    return part.path


def _download(asset: Asset, final: Path, session, net: Downloads, mirror: str | None, progress: bool):
    """(the completed part file, where it came from)."""
    if asset.url or mirror:
        url = asset.source(mirror)
        log.info("%s: downloading %s", asset.name, url)
        return http_fetch(session, asset, url, final, net, bool(mirror), progress), url
    repo, filename, rev = asset.hf["repo_id"], asset.hf["filename"], asset.hf.get("revision") or "main"
    cached = _hf_cached(asset)
    if cached:
        log.info("%s: from the Hugging Face cache: %s", asset.name, cached)
        return _copy_part(cached, final), f"hf://{repo}/{filename}@{rev}"
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise AssetError(
            f"{asset.name}: {repo}/{filename} is not in the Hugging Face cache and offline mode is on "
            f"(HF_HUB_OFFLINE): run once online, point HF_HOME at a filled cache, or use --mirror"
        )
    url = f"{hf_endpoint()}/{repo}/resolve/{urllib.parse.quote(rev, safe='')}/{urllib.parse.quote(filename)}"
    log.info("%s: downloading %s", asset.name, url)
    return http_fetch(session, asset, url, final, net, False, progress), url


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")


def _set_aside(part: Path, final: Path, suffix: str) -> Path:
    bad = final.with_name(final.name + suffix)
    os.replace(part, bad)
    return bad


def _verify(asset: Asset, part: Path, final: Path, want: str | None, origin: str, source: str, dest: Path) -> str:
    """The sha256 of a finished download that may take its place; else it is kept aside."""
    got = sha256_file(part)
    with open(part, "rb") as f:
        lfs = f.read(len(LFS_MAGIC)) == LFS_MAGIC
    if lfs and not (want and got == want):
        bad = _set_aside(part, final, ".bad-sha256")
        raise AssetError(f"{asset.name}: {source} served a Git LFS pointer, not the file; kept aside as {bad}")
    if want is not None and got != want:
        bad = _set_aside(part, final, ".bad-sha256")
        where = (
            "the manifest"
            if origin == "manifest"
            else (f"{dest / HASHES_FILE} (recorded at the first download; delete that entry to accept a new version)")
        )
        raise AssetError(
            f"{asset.name}: checksum mismatch for {source}: sha256 {got}, expected {want} from {where}. "
            f"The file was NOT used; it is kept aside as {bad}"
        )
    problem = content_problem(asset, part) if want is None else None  # about to be pinned: must look right
    if problem is not None:
        bad = _set_aside(part, final, ".bad-content")
        raise AssetError(f"{asset.name}: {final} from {source} is {problem}; not pinned, kept aside as {bad}")
    return got


@dataclass
class Outcome:
    name: str
    status: str  # skipped | downloaded
    path: Path
    sha256: str | None = None
    sha_origin: str = ""  # manifest | record | unknown (newly recorded)
    source: str | None = None


def fetch_asset(
    asset: Asset,
    dest: Path,
    records: HashRecords,
    session,
    net: Downloads,
    mirror=None,
    progress=True,
    force=False,
    rehash=False,
) -> Outcome:
    """Skip the asset when present and verified; else fetch, verify, rename into place and
    record it. Raises ``AssetError`` with a message for the user."""
    final = dest / asset.path
    why = "forced" if force else check_present(asset, dest, records, rehash=rehash)
    if why is None:
        rec = records.get(asset.name) or {}
        return Outcome(asset.name, "skipped", final, rec.get("sha256"), records.expected(asset)[1], rec.get("source"))
    if why not in ("missing", "forced"):
        log.warning("%s: %s: %s; downloading again", asset.name, final, why)
    try:
        if why.startswith(LOOKS_WRONG):  # whatever was pinned for it is no proof
            bad = _set_aside(final, final, ".bad-content")
            records.drop(asset.name)
            log.warning("%s: kept aside as %s and its recorded sha256 dropped", asset.name, bad)
        want, origin = records.expected(asset)
        part, source = _download(asset, final, session, net, mirror, progress)
        got = _verify(asset, part, final, want, origin, source, dest)
        os.replace(part, final)
        records.put(asset, final, got, source)
    except UserError as e:  # a full disk, an unwritable destination
        raise AssetError(f"{asset.name}: {e}") from None
    return Outcome(asset.name, "downloaded", final, got, origin, source)


def fetch_assets(
    chosen: list[Asset],
    dest,
    net: Downloads,
    mirror: str | None = None,
    progress: bool = True,
    force: bool = False,
    rehash: bool = False,
) -> dict:
    """Fetch ``chosen`` into ``dest`` (one run per destination: ``DEST/.lock``); a host
    found unreachable is not tried again. {"downloaded", "skipped", "failed": [messages]}."""
    dest = Path(dest)
    trusted = [url_host(mirror) if mirror else None, url_host(hf_endpoint()) if os.environ.get("HF_ENDPOINT") else None]
    summary: dict = {"downloaded": 0, "skipped": 0, "failed": []}
    unreachable: set[str] = set()
    with exclusive_lock(dest), open_session(net, trusted_hosts=trusted, pool_size=2) as session:
        records = HashRecords(dest)
        for a in chosen:
            host = _host(a.source(mirror))
            try:
                if host in unreachable:
                    raise AssetError(f"{a.name}: not tried: {host} was unreachable")
                out = fetch_asset(a, dest, records, session, net, mirror, progress, force, rehash)
            except AssetError as e:
                unreachable |= {e.host} if isinstance(e, NetworkError) else set()
                msg = str(e) if str(e).startswith(a.name + ":") else f"{a.name}: {e}"
                summary["failed"].append(msg)
                print(f"error: {msg}", file=sys.stderr)
                continue
            summary[out.status] += 1
            _report(out, dest)
    return summary


def _report(out: Outcome, dest: Path) -> None:
    if out.status == "skipped":
        log.info("%s: skipped, present and verified: %s", out.name, out.path)
        return
    note = {"manifest": "verified against the manifest", "record": f"verified against {HASHES_FILE}"}
    log.info("%s: downloaded %s (%s)", out.name, out.path, note.get(out.sha_origin, "sha256 not known in advance"))
    if out.sha_origin == "unknown":
        print(f"{out.name}: sha256 {out.sha256} (new; recorded in {dest / HASHES_FILE})")
