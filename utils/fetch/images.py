"""Verified image downloads: one image, from the first of its URLs that yields one.

The body streams into a unique part file beside its final name (``.<stem>.<random>.part``)
under a byte cap, must decode fully (Pillow), may be downscaled, and is renamed to
``<stem><ext>`` (the extension sniffed from the bytes) in one step: a crash never leaves a
partial or undecodable file under a final name. urllib3 retries before the headers; a body
that breaks off gets ``body_retries`` more attempts here; the whole download, every URL and
attempt included, ends at its ``deadline``.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests
import urllib3
from PIL import Image

from utils.args import IMAGE_DEADLINE
from utils.formats import IMAGE_EXTS
from utils.hashing import sha256_file
from utils.io import PartFile

from .errors import classify_exception, root_cause
from .http import Deadline

DEFAULT_MAX_BYTES = 80_000_000
TEMP_SUFFIX = ".part"
CHUNK = 1 << 16
# decoding a 61 MP image holds ~180 MB of pixels: only two such decodes at a time
LARGE_PIXELS = 16_000_000
_large_decode = threading.BoundedSemaphore(2)
SIGNATURES = (
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"GIF87a", ".gif"),
    (b"GIF89a", ".gif"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)


def sniff_image_ext(head: bytes) -> str | None:
    """The file extension of the image format ``head`` starts with, else None."""
    b = bytes(head[:16])
    if len(b) >= 12 and b[:4] == b"RIFF" and b[8:12] == b"WEBP":
        return ".webp"
    if b[:2] == b"BM" and len(b) >= 14:
        return ".bmp"
    return next((ext for sig, ext in SIGNATURES if b.startswith(sig)), None)


def parse_url_map(items) -> list[tuple[str, str]]:
    """``["OLD=NEW", ...]`` -> ``[(OLD, NEW), ...]`` (split at the first ``=``)."""
    pairs = []
    for item in items or ():
        old, sep, new = item.partition("=")
        if not sep or not old:
            raise ValueError(f"--url-prefix-map expects OLD=NEW, got {item!r}")
        pairs.append((old, new))
    return pairs


def apply_url_map(url: str, url_map) -> str:
    """``url`` with the first matching prefix (in the order given) replaced."""
    return next((new + url[len(old) :] for old, new in url_map or () if url.startswith(old)), url)


def clean_stale_temps(out_dir: str | os.PathLike, older_than: float = 3600.0) -> int:
    """Remove part files older than ``older_than`` seconds (crash leftovers); younger ones
    may belong to a process still writing them."""
    n, now = 0, time.time()
    for p in Path(out_dir).glob(f".*{TEMP_SUFFIX}") if Path(out_dir).is_dir() else ():
        try:
            if now - p.lstat().st_mtime > older_than:
                p.unlink()
                n += 1
        except OSError:
            pass
    return n


@dataclass
class FetchResult:
    key: str
    status: str  # ok | skipped | failed
    url: str | None = None  # URL the file came from (None for skipped)
    http: int | None = None  # last HTTP status seen
    error: str | None = None  # human-readable reason (failed only)
    error_kind: str | None = None  # short category, e.g. http_404, timeout, not_image, deadline
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    file: str | None = None  # final file name inside out_dir
    final_url: str | None = None  # after redirects, when different from url
    tried: list = field(default_factory=list)  # failed attempts before the result
    resized_from: list | None = None  # [w, h] of the original when downscaled
    mtime_ns: int | None = None  # of the final file, for --trust-manifest

    def to_dict(self) -> dict:
        return asdict(self)


class _Fail(Exception):
    """A failed attempt: ``kind`` a short category, ``detail`` a line for the user."""

    def __init__(self, kind: str, detail: str, http: int | None = None, body_phase: bool = False):
        super().__init__(detail)
        self.kind, self.detail, self.http, self.body_phase = kind, detail, http, body_phase


def _decode(path, keep: bool = False):
    """Decode fully (truncated data is an error); (image if ``keep`` else None, w, h, format)."""
    with Image.open(path) as probe:
        (w, h), fmt = probe.size, probe.format or ""
    with _large_decode if w * h >= LARGE_PIXELS else contextlib.nullcontext():
        img = Image.open(path)
        try:
            img.load()
        except BaseException:
            img.close()
            raise
    if not keep:
        img.close()
        img = None
    return img, w, h, fmt


def _facts(p: Path, key: str, status: str, **known) -> FetchResult:
    """A result for the file ``p`` (size, mtime and sha256 read from it)."""
    st = p.stat()
    return FetchResult(
        key, status, bytes=st.st_size, sha256=sha256_file(p), file=p.name, mtime_ns=st.st_mtime_ns, **known
    )


def verify_existing(path, max_bytes: int | None = None) -> FetchResult | None:
    """A ``skipped`` result when ``path`` is a non-empty image (at most ``max_bytes``) that
    decodes fully, else None."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size == 0 or (max_bytes is not None and size > max_bytes):
            return None
        with open(p, "rb") as f:
            if sniff_image_ext(f.read(16)) is None:
                return None
        _, w, h, _ = _decode(p)
        return _facts(p, p.stem, "skipped", width=w, height=h)
    except Exception:  # noqa: BLE001 - missing, unreadable, any decoder error: not a valid image
        return None


def unchanged_since(out_dir, rec: dict) -> FetchResult | None:
    """A ``skipped`` result straight from an earlier manifest record when its file still
    has the recorded size and mtime (no decoding, no hashing), else None."""
    name, size, mtime = rec.get("file"), rec.get("bytes"), rec.get("mtime_ns")
    if rec.get("status") not in ("ok", "skipped") or not name or size is None or mtime is None:
        return None
    if os.path.basename(name) != name or Path(name).stem != rec.get("key"):
        return None
    try:
        st = (Path(out_dir) / name).stat()
    except OSError:
        return None
    if (st.st_size, st.st_mtime_ns) != (size, mtime):
        return None
    keep = ("width", "height", "sha256")
    return FetchResult(rec["key"], "skipped", bytes=size, file=name, mtime_ns=mtime, **{k: rec.get(k) for k in keep})


def _existing(out_dir: Path, stem: str) -> list[Path]:
    return [p for p in (out_dir / (stem + ext) for ext in IMAGE_EXTS) if p.is_file()]


def _drain(resp) -> None:
    """Read a small error body (64 kB at most) so that its keep-alive connection goes back
    to the pool; on any error the connection is simply dropped."""
    with contextlib.suppress(Exception):
        for _ in zip(range(8), resp.iter_content(8192)):
            pass


def _not_image(head: bytes, resp) -> _Fail:
    ctype = resp.headers.get("Content-Type", "?")
    return _Fail("not_image", f"not an image (Content-Type {ctype}, starts {head[:12]!r})", resp.status_code)


def _stream(session, url: str, part: PartFile, max_bytes: int, timeout) -> tuple[int, str, str | None]:
    """GET ``url`` into ``part``; (HTTP status, sniffed extension, final URL if redirected)."""
    try:
        resp = session.get(url, stream=True, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - every transport error becomes a _Fail
        raise _Fail(classify_exception(e), root_cause(e)) from None
    with resp:
        code = resp.status_code
        if code != 200:
            _drain(resp)
            raise _Fail(f"http_{code}", f"HTTP {code} {resp.reason or ''}".strip(), code)
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise _Fail("too_large", f"Content-Length {declared} > max bytes {max_bytes}", code)
        head = b""
        try:
            for chunk in resp.iter_content(CHUNK):
                if len(head) < 16:
                    head += chunk[:16]
                    if len(head) >= 16 and sniff_image_ext(head) is None:
                        raise _not_image(head, resp)
                if part.size + len(chunk) > max_bytes:
                    raise _Fail("too_large", f"body exceeds max bytes {max_bytes}", code)
                part.write(chunk)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:  # the body broke off
            raise _Fail(classify_exception(e), root_cause(e), code, body_phase=True) from None
        part.close()
        if part.size == 0:
            raise _Fail("empty", "empty body", code)
        ext = sniff_image_ext(head)
        if ext is None:
            raise _not_image(head, resp)
        return code, ext, resp.url if resp.url != url else None


def _downscaled(img, fmt: str, part: PartFile, max_side: int) -> str:
    """``img`` shrunk to fit ``max_side`` into ``part`` (JPEG stays JPEG, else PNG); the extension."""
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
            img, w, h, fmt = _decode(parts[0].path, keep=bool(max_side))
        except Exception as e:  # noqa: BLE001 - any decoder error
            raise _Fail("undecodable", f"does not decode: {root_cause(e)}", code) from None
        resized = None
        if img is not None:
            with img:
                if max(w, h) > max_side:
                    parts.append(PartFile(out_dir / f".{stem}.{secrets.token_hex(4)}{TEMP_SUFFIX}"))
                    ext, resized = _downscaled(img, fmt, parts[-1], max_side), [w, h]
                    w, h = img.size
        final = parts[-1].commit(out_dir / (stem + ext))
    finally:
        for p in parts:
            p.discard()
    for other in _existing(out_dir, stem):  # the stem names exactly one image
        if other != final:
            other.unlink(missing_ok=True)
    return _facts(final, stem, "ok", url=url, http=code, final_url=final_url, resized_from=resized, width=w, height=h)


def _join_attempts(tried: list[dict]) -> str:
    """'url: error (N attempts); url2: error', repeated attempts on one URL folded."""
    parts: list[list] = []
    for t in tried:
        if parts and parts[-1][0] == t["url"]:
            parts[-1][1:] = [t["error"], parts[-1][2] + 1]
        else:
            parts.append([t["url"], t["error"], 1])
    return "; ".join(f"{u}: {e}" + (f" ({n} attempts)" if n > 1 else "") for u, e, n in parts)


def fetch_image(
    session: requests.Session,
    urls,
    out_dir,
    stem: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout=(10.0, 30.0),
    max_side: int | None = None,
    url_map=None,
    body_retries: int = 2,
    backoff: float = 0.5,
    deadline: float | None = IMAGE_DEADLINE,
) -> FetchResult:
    """Download the first of ``urls`` that yields a valid image to ``out_dir/<stem><ext>``
    (other files of that stem are then removed). A full disk is a ``UserError``, raised."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    tried: list[dict] = []
    last, url = _Fail("no_url", "no URL to try"), None
    with Deadline(deadline) as clock:
        for url in (apply_url_map(u, url_map) for u in urls):
            for attempt in range(body_retries + 1):
                try:
                    done = _fetch_once(session, url, Path(out_dir), stem, max_bytes, timeout, max_side)
                    done.tried = tried
                    return done
                except _Fail as f:
                    last = f
                if clock.expired:
                    last = _Fail("deadline", f"not finished within the deadline of {deadline:g} s", last.http)
                tried.append({"url": url, "http": last.http, "error": last.detail, "kind": last.kind})
                if clock.expired or not last.body_phase or attempt == body_retries:
                    break
                time.sleep(backoff * (2**attempt) + random.random() * backoff)
            if clock.expired:
                break
    return FetchResult(stem, "failed", url, last.http, _join_attempts(tried) or last.detail, last.kind, tried=tried)


def download_one(session: requests.Session, urls, out_dir, stem: str, **kw) -> FetchResult:
    """:func:`fetch_image` unless a valid ``<stem>.<ext>`` is there already (``skipped``;
    any other file of that stem is removed). Keywords as ``fetch_image``: ``max_bytes``,
    ``timeout`` (connect, read), ``max_side``, ``url_map``, ``body_retries``, ``backoff``,
    ``deadline`` (seconds for the whole download; default ``IMAGE_DEADLINE``)."""
    found = _existing(Path(out_dir), stem)
    for p in found:
        kept = verify_existing(p, kw.get("max_bytes", DEFAULT_MAX_BYTES))
        if kept is not None:
            for other in found:
                if other != p:
                    other.unlink(missing_ok=True)
            return kept
    return fetch_image(session, urls, out_dir, stem, **kw)
