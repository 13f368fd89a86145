"""Fetching the assets (``fetch_assets``: what ``download_assets.py`` runs). A download resumes from
``<file>.part`` (its URL and validators in ``<file>.part.json``), in a later run too; the file takes
its name only when its sha256 is right and, before a pin, when it looks like its asset."""

from __future__ import annotations

from utils.cli import UserError

import contextlib
import logging
import os
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import requests

from utils.args import ASSET_DOWNLOADS, Downloads
from utils.hashing import sha256_file
from utils.io import PartFile, exclusive_lock, read_json, write_error, write_json

from .assets import HASHES_FILE, LOOKS_WRONG, Asset, AssetError, HashRecords, check_present, content_problem
from .http import CHUNK, Deadline, describe, open_session

log = logging.getLogger("download_assets")
BODY_RETRIES = 3  # a body that breaks off resumes where it stopped, this many times


class _Restart(Exception):
    """The partial download cannot be continued: start again from byte 0."""


def hf_endpoint() -> str:
    """Where Hugging Face files come from (``HF_ENDPOINT``, as huggingface_hub reads it)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _read_meta(path: Path) -> dict:
    with contextlib.suppress(UserError):  # missing or unreadable: no partial download to go on
        meta = read_json(path)
        return meta if isinstance(meta, dict) else {}
    return {}


def _resume_at(resp, start: int, asset: Asset, url: str, mirror: bool) -> int | None:
    """Where the body of ``resp`` goes in the part file (None: the part is complete already)."""
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


@dataclass
class _Fetcher:
    """One run of ``fetch_assets``: where the assets go and how they are fetched."""

    dest: Path
    records: HashRecords
    session: requests.Session
    net: Downloads
    mirror: str | None
    progress: bool
    unreachable: set = field(default_factory=set)  # hosts

    def _attempt(self, asset: Asset, url: str, part_path: Path, meta_path: Path) -> str | None:
        """One request for what the part lacks (``If-Range`` with the validators ``meta_path`` keeps: a file
        changed since comes whole); None when the part is complete, else what went wrong."""
        from tqdm import tqdm  # noqa: PLC0415 - tqdm only when a download starts

        start = part_path.stat().st_size if part_path.exists() else 0
        meta = _read_meta(meta_path)
        headers = {"Range": f"bytes={start}-"} if start else {}
        validator = meta.get("etag") if not str(meta.get("etag")).startswith("W/") else None
        if start and (validator := validator or meta.get("last_modified")):
            headers["If-Range"] = validator
        try:
            resp = self.session.get(url, stream=True, timeout=self.net.timeout, headers=headers)
        except Exception as e:  # noqa: BLE001 - every transport error: one line for the user
            kind, why = describe(e)
            if kind == "deadline":
                raise  # _http says it
            if kind == "blocked_address":
                raise AssetError(f"{asset.name}: {why}") from None
            if kind == "connection" or isinstance(e, requests.exceptions.ConnectTimeout):
                self.unreachable.add(_host(url))  # its other assets are not tried
                hint = "that the mirror is running and reachable" if self.mirror else "the network or use --mirror"
                raise AssetError(f"cannot reach {_host(url)}: check {hint} ({why})") from None
            raise AssetError(f"{asset.name}: request to {url} failed ({why})") from None
        with resp:
            offset = _resume_at(resp, start, asset, url, bool(self.mirror))
            if offset is None:
                return None
            meta = {"url": url, "etag": resp.headers.get("ETag"), "last_modified": resp.headers.get("Last-Modified")}
            try:
                write_json(meta_path, meta)
            except OSError as e:
                raise write_error(e, meta_path) from None
            part = PartFile(part_path, resume=offset > 0)
            length = resp.headers.get("Content-Length", "")
            total = part.size + int(length) if length.isdigit() else None
            shown = dict(unit="B", unit_scale=True, desc=asset.name, disable=not self.progress)
            with tqdm(total=total, initial=part.size, **shown) as bar:
                try:
                    for chunk in resp.iter_content(CHUNK):
                        part.write(chunk)
                        bar.update(len(chunk))
                    part.close()
                finally:
                    part.discard(keep=True)
        return None if total in (None, part.size) else f"got {part.size} of {total} bytes"

    def _http(self, asset: Asset, url: str, final: Path) -> tuple[Path, str]:
        """Download ``url`` into ``<final>.part``, resuming a partial one: (the part, not yet verified; ``url``)."""
        log.info("%s: downloading %s", asset.name, url)
        part = final.with_name(final.name + ".part")
        meta = part.with_name(part.name + ".json")
        if _read_meta(meta).get("url") not in (None, url):
            log.info("%s: discarding a partial download from another URL", asset.name)
            part.unlink(missing_ok=True)
        elif part.exists():
            log.info("%s: resuming at byte %d", asset.name, part.stat().st_size)
        failures = 0
        with Deadline(self.net.deadline) as clock:
            while True:
                try:
                    err = self._attempt(asset, url, part, meta)
                except _Restart:
                    part.unlink(missing_ok=True)
                    continue
                except (AssetError, UserError):
                    raise
                except Exception as e:  # noqa: BLE001 - the body broke off (connection cut, read timeout)
                    err = describe(e)[1]
                if err is None:
                    break
                failures += 1
                have = part.stat().st_size if part.exists() else 0
                if clock.expired:
                    why = f"{clock} (--download-deadline)"
                elif failures > BODY_RETRIES:
                    why = f"the download from {url} broke off {failures} times (last: {err})"
                else:
                    log.warning("%s: download interrupted at byte %d (%s); resuming", asset.name, have, err)
                    time.sleep(self.net.backoff * 2 ** (failures - 1))
                    continue
                raise AssetError(f"{asset.name}: {why}; rerun to resume from byte {have}")
        meta.unlink(missing_ok=True)
        return part, url

    def _from_hf(self, asset: Asset, final: Path) -> tuple[Path, str]:
        """(the completed part file, where it came from): the local Hugging Face cache, else ``HF_ENDPOINT``."""
        repo, name, rev = asset.hf["repo_id"], asset.hf["filename"], asset.hf.get("revision") or "main"
        from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415 - only for a Hugging Face asset

        cached = try_to_load_from_cache(repo, name, revision=asset.hf.get("revision"))
        if isinstance(cached, str):
            log.info("%s: from the Hugging Face cache: %s", asset.name, cached)
            part = PartFile(final.with_name(final.name + ".part"))
            with open(cached, "rb") as f:
                while chunk := f.read(CHUNK):
                    part.write(chunk)
            part.close()
            return part.path, f"hf://{repo}/{name}@{rev}"
        if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
            raise AssetError(
                f"{asset.name}: {repo}/{name} is not in the Hugging Face cache and offline mode is on "
                f"(HF_HUB_OFFLINE): run once online, point HF_HOME at a filled cache, or use --mirror"
            )
        url = f"{hf_endpoint()}/{repo}/resolve/{urllib.parse.quote(rev, safe='')}/{urllib.parse.quote(name)}"
        return self._http(asset, url, final)

    def fetch(self, asset: Asset, force: bool, rehash: bool) -> str:
        """'skipped' (present and verified), else 'downloaded': fetched, verified, renamed into place, recorded."""
        final = self.dest / asset.path
        why = "forced" if force else check_present(asset, self.dest, self.records, rehash=rehash)
        if why is None:
            log.info("%s: skipped, present and verified: %s", asset.name, final)
            return "skipped"
        if why not in ("missing", "forced"):
            log.warning("%s: %s: %s; downloading again", asset.name, final, why)
        try:
            if why.startswith(LOOKS_WRONG):  # whatever was pinned for it is no proof
                log.warning("%s: kept aside as %s", asset.name, final.replace(f"{final}.bad-content"))
                self.records.drop(asset.name)
            want, origin = self.records.expected(asset)
            if asset.url or self.mirror:
                part, source = self._http(asset, asset.source(self.mirror), final)
            else:
                part, source = self._from_hf(asset, final)
            got = sha256_file(part)
            if want is not None and got != want:
                bad = part.replace(f"{final}.bad-sha256")
                where = f"{self.dest / HASHES_FILE} (delete its entry to accept a new file)"
                where = "the manifest" if origin == "manifest" else where
                msg = f"{asset.name}: checksum mismatch for {source}: sha256 {got}, expected {want} from {where}"
                raise AssetError(f"{msg}; kept aside as {bad}")
            if want is None and (problem := content_problem(asset, part)) is not None:  # about to be pinned
                bad = part.replace(f"{final}.bad-content")
                raise AssetError(f"{asset.name}: {final} from {source} is {problem}; not pinned, kept aside as {bad}")
            os.replace(part, final)
            self.records.put(asset, final, got, source)
        except UserError as e:  # a full disk, an unwritable destination
            raise AssetError(f"{asset.name}: {e}") from None
        log.info("%s: downloaded %s (sha256 from: %s)", asset.name, final, origin)
        if origin == "unknown":
            print(f"{asset.name}: sha256 {got} (new; recorded in {self.dest / HASHES_FILE})")
        return "downloaded"


def fetch_assets(
    chosen: list[Asset], dest, net: Downloads = ASSET_DOWNLOADS, mirror=None, progress=True, force=False, rehash=False
) -> dict:
    """Fetch ``chosen`` into ``dest`` (one run at a time: ``DEST/.lock``; a host found unreachable is
    not tried again): ``{"downloaded": n, "skipped": n, "failed": [message]}``."""
    dest = Path(dest)
    trusted = [mirror, hf_endpoint() if os.environ.get("HF_ENDPOINT") else None]
    summary: dict = {"downloaded": 0, "skipped": 0, "failed": []}
    with exclusive_lock(dest), open_session(net, trusted) as session:
        fetcher = _Fetcher(dest, HashRecords(dest), session, net, mirror, progress)
        for a in chosen:
            source = a.source(mirror)
            host = _host(hf_endpoint() if source.startswith("hf://") else source)  # where it is requested
            try:
                if host in fetcher.unreachable:
                    raise AssetError(f"{a.name}: not tried: {host} was unreachable")
                summary[fetcher.fetch(a, force, rehash)] += 1
            except AssetError as e:
                msg = str(e) if str(e).startswith(a.name + ":") else f"{a.name}: {e}"
                summary["failed"].append(msg)
                print(f"error: {msg}", file=sys.stderr)
    return summary
