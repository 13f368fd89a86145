"""Verified image downloads: the body streams under a byte cap into a unique part file, must
decode fully, may be downscaled, and takes the name ``<stem><ext>`` (the extension read from the
bytes) in one rename. A body that breaks off is tried again; the whole download ends at its deadline."""

from __future__ import annotations

from utils.cli import DataError

import contextlib
import itertools
import random
import re
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import requests
import urllib3
from PIL import Image

from utils.args import Downloads
from utils.formats import IMAGE_EXTS
from utils.hashing import sha256_file
from utils.io import PartFile

from .http import CHUNK, Deadline, describe

DEFAULT_MAX_BYTES = 80_000_000
TEMP_SUFFIX = ".part"
BODY_RETRIES = 2
# decoding a 61 MP image holds ~180 MB of pixels: only two such decodes at a time
LARGE_PIXELS = 16_000_000
_large_decode = threading.BoundedSemaphore(2)
SIGNATURES = {  # how a file of each format starts (a regular expression) -> its extension
    rb"\xff\xd8\xff": ".jpg",
    rb"\x89PNG\r\n\x1a\n": ".png",
    rb"GIF8[79]a": ".gif",
    rb"II\*\x00|MM\x00\*": ".tif",
    rb"RIFF.{4}WEBP": ".webp",
    rb"BM.{12}": ".bmp",
}


def sniff_image_ext(head: bytes) -> str | None:
    """The file extension of the image format ``head`` starts with, else None."""
    return next((ext for sig, ext in SIGNATURES.items() if re.match(sig, bytes(head[:16]), re.DOTALL)), None)


def parse_url_map(items) -> list[tuple[str, str]]:
    """``["OLD=NEW", ...]`` -> ``[(OLD, NEW), ...]`` (split at the first ``=``)."""
    if bad := [item for item in items if "=" not in item or item.startswith("=")]:
        raise DataError(f"--url-prefix-map expects OLD=NEW, got {bad[0]!r}")
    return [tuple(item.split("=", 1)) for item in items]


def apply_url_map(url: str, url_map) -> str:
    """``url`` with the first matching prefix (in the order given) replaced."""
    return next((new + url[len(old) :] for old, new in url_map if url.startswith(old)), url)


def clean_stale_temps(out_dir: Path) -> int:
    """Remove part files left by a crash (older than an hour: younger ones may be in use)."""
    n, now = 0, time.time()
    for p in out_dir.glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if now - p.lstat().st_mtime > 3600:
                p.unlink()
                n += 1
    return n


@dataclass
class FetchResult:
    """One line of the manifest."""

    key: str
    status: str  # ok | skipped | failed
    url: str | None = None  # where the file came from
    http: int | None = None  # the last HTTP status seen
    error: str | None = None  # for the user (failed only)
    error_kind: str | None = None  # short: http_404, timeout, not_image, deadline, ...
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    file: str | None = None  # the name inside the output directory
    final_url: str | None = None  # after redirects, when different from url
    tried: list = field(default_factory=list)  # the failed attempts before the result
    resized_from: list | None = None  # [w, h] of the original when downscaled
    mtime_ns: int | None = None  # of the file, for --trust-manifest


class _Fail(Exception):
    """A failed attempt: ``kind`` short, ``detail`` a line for the user."""

    def __init__(self, kind: str, detail: str, http: int | None = None, body_phase: bool = False):
        super().__init__(detail)
        self.kind, self.detail, self.http, self.body_phase = kind, detail, http, body_phase


def _decode(path) -> Image.Image:
    """The image at ``path`` decoded fully (truncated data is an error); the caller closes it."""
    img = Image.open(path)
    try:
        with _large_decode if img.width * img.height >= LARGE_PIXELS else contextlib.nullcontext():
            img.load()
    except BaseException:
        img.close()
        raise
    return img


def _facts(p: Path, key: str, status: str, **known) -> FetchResult:
    """A result for the file ``p`` (size, mtime and sha256 read from it)."""
    st = p.stat()
    known |= dict(bytes=st.st_size, sha256=sha256_file(p), file=p.name, mtime_ns=st.st_mtime_ns)
    return FetchResult(key, status, **known)


def verify_existing(path, max_bytes: int | None = None) -> FetchResult | None:
    """A ``skipped`` result when ``path`` is a non-empty image under ``max_bytes`` that decodes, else None."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(16)  # an empty file sniffs as no image too
        if sniff_image_ext(head) is None or (max_bytes is not None and p.stat().st_size > max_bytes):
            return None
        with _decode(p) as img:
            return _facts(p, p.stem, "skipped", width=img.width, height=img.height)
    except Exception:  # noqa: BLE001 - missing, unreadable, any decoder error: not a valid image
        return None


def _files_of(out_dir: Path, stem: str, but: Path | None = None) -> list[Path]:
    return [p for p in (out_dir / (stem + ext) for ext in IMAGE_EXTS) if p != but and p.is_file()]


def _not_image(head: bytes, resp) -> _Fail:
    ctype = resp.headers.get("Content-Type", "?")
    return _Fail("not_image", f"not an image (Content-Type {ctype}, starts {head[:12]!r})", resp.status_code)


def _stream(session, url: str, part: PartFile, max_bytes: int, timeout) -> tuple[int, str, str | None]:
    """GET ``url`` into ``part``: (HTTP status, sniffed extension, final URL if redirected)."""
    try:
        resp = session.get(url, stream=True, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - every transport error becomes a _Fail
        raise _Fail(*describe(e)) from None
    with resp:
        code = resp.status_code
        if code != 200:
            with contextlib.suppress(Exception):  # a small error body read whole keeps the connection alive
                list(zip(range(8), resp.iter_content(8192)))
            raise _Fail(f"http_{code}", f"HTTP {code} {resp.reason or ''}".strip(), code)
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise _Fail("too_large", f"Content-Length {declared} > max bytes {max_bytes}", code)
        head = b""
        try:
            for chunk in resp.iter_content(CHUNK):
                if len(head) < 16:  # an HTML page is refused before it is read whole
                    head += chunk[:16]
                    if len(head) >= 16 and sniff_image_ext(head) is None:
                        raise _not_image(head, resp)
                if part.size + len(chunk) > max_bytes:
                    raise _Fail("too_large", f"body exceeds max bytes {max_bytes}", code)
                part.write(chunk)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:  # the body broke off
            raise _Fail(*describe(e), code, body_phase=True) from None
        part.close()
        if part.size == 0:
            raise _Fail("empty", "empty body", code)
        ext = sniff_image_ext(head)
        if ext is None:
            raise _not_image(head, resp)
        return code, ext, resp.url if resp.url != url else None


def _downscaled(img, part: PartFile, max_side: int) -> str:
    """``img`` shrunk to fit ``max_side`` into ``part`` (JPEG stays JPEG, else PNG); the extension."""
    fmt = img.format
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    extra = {k: img.info[k] for k in ("exif", "icc_profile") if img.info.get(k)}
    if fmt == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
        img.save(part.file, format="JPEG", quality=95, subsampling=0, **extra)
        return ".jpg"
    if img.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    img.save(part.file, format="PNG", **extra)
    return ".png"


def _fetch_once(session, url: str, out_dir: Path, stem: str, max_bytes: int, timeout, max_side) -> FetchResult:
    """One attempt at ``url``: streamed, verified, maybe downscaled, renamed into place."""
    parts = [PartFile(out_dir / f".{stem}.{secrets.token_hex(4)}{TEMP_SUFFIX}")]
    try:
        code, ext, final_url = _stream(session, url, parts[0], max_bytes, timeout)
        try:
            img = _decode(parts[0].path)
        except Exception as e:  # noqa: BLE001 - any decoder error
            raise _Fail("undecodable", f"does not decode: {describe(e)[1]}", code) from None
        with img:
            (w, h), resized = img.size, None
            if max_side and max(w, h) > max_side:
                parts.append(PartFile(out_dir / f".{stem}.{secrets.token_hex(4)}{TEMP_SUFFIX}"))
                ext, resized = _downscaled(img, parts[-1], max_side), [w, h]
                w, h = img.size
        final = parts[-1].commit(out_dir / (stem + ext))
    finally:
        for p in parts:
            p.discard()
    for other in _files_of(out_dir, stem, but=final):  # the stem names exactly one image
        other.unlink(missing_ok=True)
    return _facts(final, stem, "ok", url=url, http=code, final_url=final_url, resized_from=resized, width=w, height=h)


def download_one(
    session: requests.Session,
    urls: list[str],
    out_dir,
    stem: str,
    net: Downloads = Downloads(),
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_side: int | None = None,
    url_map=(),
) -> FetchResult:
    """A valid ``out_dir/<stem><ext>`` already there (``skipped``), else the first of ``urls`` that is
    a valid image, fetched into that name (``net``: timeouts, backoff, deadline); a full disk raises ``UserError``."""
    out_dir = Path(out_dir)
    for p in _files_of(out_dir, stem):
        if (kept := verify_existing(p, max_bytes)) is not None:
            for other in _files_of(out_dir, stem, but=p):
                other.unlink(missing_ok=True)
            return kept
    tried: list[dict] = []
    last, url = _Fail("no_url", "no URL to try"), None
    with Deadline(net.deadline) as clock:
        for url in (apply_url_map(u, url_map) for u in urls):
            for attempt in range(BODY_RETRIES + 1):
                try:
                    done = _fetch_once(session, url, out_dir, stem, max_bytes, net.timeout, max_side)
                    return replace(done, tried=tried)
                except _Fail as f:
                    last = f
                if clock.expired:
                    last = _Fail("deadline", str(clock), last.http)
                tried.append({"url": url, "http": last.http, "error": last.detail, "kind": last.kind})
                if clock.expired or not last.body_phase or attempt == BODY_RETRIES:
                    break
                time.sleep(net.backoff * (2**attempt) + random.random() * net.backoff)
            if clock.expired:
                break
    # 'url: error (N attempts); url2: error'
    per_url = [list(same) for _, same in itertools.groupby(tried, key=lambda t: t["url"])]
    error = "; ".join(
        f"{a[0]['url']}: {a[-1]['error']}" + (f" ({len(a)} attempts)" if len(a) > 1 else "") for a in per_url
    )
    return FetchResult(stem, "failed", url, last.http, error or last.detail, last.kind, tried=tried)
