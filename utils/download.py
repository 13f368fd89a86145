"""Download machinery shared by the image and asset downloaders.

* :func:`make_session` -- a keep-alive ``requests.Session`` whose retries
  (connect errors, read timeouts, 429 and 5xx with ``Retry-After``, exponential
  backoff with jitter) are done by urllib3's ``Retry``; other 4xx are final.
* :func:`fetch_image` -- try a list of URLs in order, stream the body to a
  temporary file in the output directory under a byte cap, verify that it
  decodes (Pillow), optionally downscale, fsync and rename it atomically to
  ``<stem><ext>`` with the extension sniffed from the bytes. A crash never
  leaves a partial or undecodable file under a final name.
* :func:`download_one` -- resume-aware wrapper: a valid existing
  ``<stem>.<ext>`` is kept (status ``skipped``), an invalid one is replaced.
* :func:`verify_existing`, :func:`sniff_image_ext`, :func:`apply_url_map`,
  :func:`parse_url_map`.

urllib3 cannot retry once a response's headers have arrived, so failures while
*reading the body* (connection cut short, read timeout mid-body) get a small
number of extra attempts here (``body_retries``), with the same backoff.
"""
from __future__ import annotations

import hashlib
import os
import random
import secrets
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from PIL import Image

from .hashing import sha256_file

RETRY_STATUSES = (429, 500, 502, 503, 504)
DEFAULT_MAX_BYTES = 80_000_000
TEMP_SUFFIX = ".part"
CHUNK = 1 << 16
# Candidate extensions of a final file, most common first (used for resume).
FINAL_EXTS = (".jpg", ".png", ".webp", ".gif", ".bmp", ".tif", ".jpeg", ".tiff")
USER_AGENT = "image-selection-downloader/1.0 (+python-requests)"

# Decoding a 61 MP image holds ~180 MB of pixels: let only a couple of large
# images decode at a time so peak memory stays bounded with many workers.
LARGE_PIXELS = 16_000_000
_large_decode = threading.BoundedSemaphore(2)


# ---------------------------------------------------------------------------
# session
# ---------------------------------------------------------------------------
class _Session(requests.Session):
    """A Session that reads proxy/CA settings from the environment once per host.

    A plain Session scans ``os.environ`` (and looks for ~/.netrc) on every
    request, ~2 ms of CPU each: a large share of the cost of a small image.
    Here ``HTTP(S)_PROXY``/``NO_PROXY`` are resolved on the first request to a
    host and cached; ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` are read once.
    (.netrc credentials are not used.)
    """

    def __init__(self):
        super().__init__()
        self.trust_env = False  # we merge the environment ourselves, cached
        self._env_proxies: dict = {}
        self._ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        parts = urllib.parse.urlsplit(url)
        no_proxy = proxies.get("no_proxy") if proxies else None
        key = (parts.scheme, parts.netloc, no_proxy)
        env = self._env_proxies.get(key)
        if env is None:
            env = requests.utils.get_environ_proxies(url, no_proxy=no_proxy)
            if len(self._env_proxies) < 10_000:
                self._env_proxies[key] = env
        if env:
            proxies = dict(proxies or {})
            for k, v in env.items():
                proxies.setdefault(k, v)
        if (verify is True or verify is None) and self._ca_bundle:
            verify = self._ca_bundle
        return super().merge_environment_settings(url, proxies, stream, verify, cert)


def make_session(retries: int = 4, backoff: float = 0.5, pool_size: int = 16,
                 jitter: float | None = None, backoff_max: float = 30.0,
                 retry_after_max: float = 120.0, max_redirects: int = 10,
                 user_agent: str = USER_AGENT) -> requests.Session:
    """A keep-alive session with urllib3 retries for GET.

    ``retries`` bounds the total and each of connect/read/status retries;
    waits grow as ``backoff * 2**(n-1)`` (urllib3: no wait before the first
    retry) plus up to ``jitter`` seconds of random jitter (default: ``backoff``),
    capped at ``backoff_max``; a ``Retry-After`` header on 429/503 is honoured
    (capped at ``retry_after_max`` where urllib3 supports it). After the
    retries the last response is returned as is (``raise_on_status=False``),
    so the caller sees the real status code.
    """
    kw = dict(total=retries, connect=retries, read=retries, status=retries, other=0,
              redirect=max_redirects, backoff_factor=backoff, backoff_max=backoff_max,
              status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET", "HEAD"}),
              respect_retry_after_header=True, raise_on_status=False,
              backoff_jitter=backoff if jitter is None else jitter,
              retry_after_max=int(retry_after_max))
    try:
        retry = Retry(**kw)
    except TypeError:  # urllib3 < 2.6 has no retry_after_max
        kw.pop("retry_after_max")
        retry = Retry(**kw)
    adapter = HTTPAdapter(max_retries=retry, pool_connections=max(1, pool_size),
                          pool_maxsize=max(1, pool_size), pool_block=False)
    s = _Session()
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.max_redirects = max_redirects
    s.headers["User-Agent"] = user_agent
    return s


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------
def sniff_image_ext(first_bytes: bytes) -> str | None:
    """File extension for the image format that ``first_bytes`` start with, else None."""
    b = bytes(first_bytes[:16])
    if b.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if b.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if b[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    if len(b) >= 12 and b[:4] == b"RIFF" and b[8:12] == b"WEBP":
        return ".webp"
    if b[:2] == b"BM" and len(b) >= 14:
        return ".bmp"
    if b[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    return None


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
    """Replace the first matching prefix (in the order given) of ``url``."""
    for old, new in url_map or ():
        if url.startswith(old):
            return new + url[len(old):]
    return url


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def clean_stale_temps(out_dir: str | os.PathLike, older_than: float = 3600.0) -> int:
    """Remove our temporary files older than ``older_than`` seconds (crash leftovers).

    Younger ones are left alone: another process may still be writing them.
    """
    n, now = 0, time.time()
    try:
        it = os.scandir(out_dir)
    except FileNotFoundError:
        return 0
    with it:
        for e in it:
            if is_temp_name(e.name):
                try:
                    if now - e.stat().st_mtime > older_than:
                        os.unlink(e.path)
                        n += 1
                except OSError:
                    pass
    return n


class _Fail(Exception):
    """A failed attempt: ``kind`` is a short category, ``detail`` human text."""

    def __init__(self, kind: str, detail: str, http: int | None = None, body_phase=False):
        super().__init__(detail)
        self.kind, self.detail, self.http, self.body_phase = kind, detail, http, body_phase


def _walk(exc: BaseException):
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([e.__cause__, e.__context__, getattr(e, "reason", None)])
        stack.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))


def classify_exception(exc: BaseException) -> str:
    """Short error kind for a requests/urllib3/OS exception."""
    chain = list(_walk(exc))
    types = tuple(type(e) for e in chain)

    def has(*cls):
        return any(issubclass(t, cls) for t in types)

    if has(requests.exceptions.TooManyRedirects):
        return "redirects"
    if has(requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
           requests.exceptions.InvalidSchema, urllib3.exceptions.LocationParseError):
        return "bad_url"
    if has(urllib3.exceptions.IncompleteRead) or any(
            "IncompleteRead" in str(e) or "incomplete" in str(e).lower() for e in chain):
        return "truncated"
    if has(requests.exceptions.SSLError, urllib3.exceptions.SSLError):
        return "ssl"
    if has(urllib3.exceptions.TimeoutError, requests.exceptions.Timeout, TimeoutError):
        return "timeout"
    if has(urllib3.exceptions.NewConnectionError, urllib3.exceptions.NameResolutionError,
           ConnectionRefusedError):
        return "connection"
    if has(urllib3.exceptions.ProtocolError, requests.exceptions.ChunkedEncodingError,
           ConnectionResetError, requests.exceptions.ConnectionError):
        return "connection"
    if has(OSError):
        return "os_error"
    return type(exc).__name__


def _short(exc: BaseException, limit: int = 160) -> str:
    """One-line description of the most specific cause of ``exc``."""
    chain = list(_walk(exc))
    u3 = [e for e in chain if isinstance(e, urllib3.exceptions.HTTPError)
          and not isinstance(e, urllib3.exceptions.MaxRetryError)]
    oserr = [e for e in chain if isinstance(e, OSError)
             and not isinstance(e, requests.exceptions.RequestException)]
    short = [e for e in chain if isinstance(e, urllib3.exceptions.IncompleteRead)]
    inner = short[0] if short else u3[0] if u3 else oserr[-1] if oserr else exc
    text = str(inner)
    if "): " in text and "Pool(" in text:   # drop "HTTPConnectionPool(host=..., port=...): "
        text = text.split("): ", 1)[1]
    text = f"{type(inner).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------
@dataclass
class FetchResult:
    key: str
    status: str                      # ok | skipped | failed
    url: str | None = None           # URL the file came from (None for skipped)
    http: int | None = None          # last HTTP status seen
    error: str | None = None         # human-readable reason (failed only)
    error_kind: str | None = None    # short category, e.g. http_404, timeout, not_image
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    file: str | None = None          # final file name inside out_dir
    final_url: str | None = None     # after redirects, when different from url
    tried: list = field(default_factory=list)  # failed attempts before the result
    resized_from: list | None = None  # [w, h] of the original when downscaled

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImageInfo:
    path: Path
    bytes: int
    width: int
    height: int
    sha256: str
    format: str


def _decode(path: str | os.PathLike, keep: bool = False):
    """Open and fully decode; returns (image or None, width, height, format).

    Raises on any decode problem (including truncated data: Pillow's
    ``LOAD_TRUNCATED_IMAGES`` is left at its default, False).
    """
    with Image.open(path) as probe:
        w, h = probe.size
        fmt = probe.format or ""
    big = w * h >= LARGE_PIXELS
    if big:
        _large_decode.acquire()
    try:
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
    finally:
        if big:
            _large_decode.release()


def verify_existing(path: str | os.PathLike, max_bytes: int | None = None) -> ImageInfo | None:
    """ImageInfo when ``path`` is a non-empty image that decodes fully (and is
    at most ``max_bytes``), else None."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size == 0 or (max_bytes is not None and size > max_bytes):
            return None
        with open(p, "rb") as f:
            if sniff_image_ext(f.read(16)) is None:
                return None
        _, w, h, fmt = _decode(p)
        return ImageInfo(p, size, w, h, sha256_file(p), fmt)
    except Exception:
        return None


def existing_files(out_dir: str | os.PathLike, stem: str) -> list[Path]:
    """Files named ``<stem><ext>`` for the known image extensions (a few stats)."""
    out = []
    for ext in FINAL_EXTS:
        p = Path(out_dir) / (stem + ext)
        if p.is_file():
            out.append(p)
    return out


# ---------------------------------------------------------------------------
# fetching
# ---------------------------------------------------------------------------
def _drain(resp, limit: int = 1 << 16) -> None:
    """Read a small error body so its keep-alive connection goes back to the pool."""
    try:
        n = 0
        for chunk in resp.iter_content(8192):
            n += len(chunk)
            if n > limit:
                break
    except Exception:  # noqa: BLE001 - the connection is simply dropped then
        pass


def _stream_to_temp(session, url, tmp_path, max_bytes, timeout):
    """GET ``url`` into ``tmp_path``; returns (http status, sniffed ext, size, sha256, final url)."""
    try:
        resp = session.get(url, stream=True, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - all transport errors become a _Fail
        raise _Fail(classify_exception(e), _short(e)) from None
    with resp:
        code = resp.status_code
        final_url = resp.url if resp.url != url else None
        if code != 200:
            _drain(resp)
            raise _Fail(f"http_{code}", f"HTTP {code} {resp.reason or ''}".strip(), code)
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise _Fail("too_large", f"Content-Length {declared} > max bytes {max_bytes}", code)
        ctype = resp.headers.get("Content-Type", "?")
        h = hashlib.sha256()
        size, ext, head = 0, None, b""
        try:
            with open(tmp_path, "wb") as f:
                for chunk in resp.iter_content(CHUNK):
                    if not chunk:
                        continue
                    if ext is None:
                        head += chunk
                        if len(head) >= 16:
                            ext = sniff_image_ext(head)
                            if ext is None:
                                raise _Fail("not_image", f"not an image (Content-Type {ctype}, "
                                            f"starts {head[:12]!r})", code)
                    size += len(chunk)
                    if size > max_bytes:
                        raise _Fail("too_large", f"body exceeds max bytes {max_bytes}", code)
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except _Fail:
            raise
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as e:
            # the body broke off: truncated, read timeout, connection reset
            raise _Fail(classify_exception(e), _short(e), code, body_phase=True) from None
        except OSError as e:  # writing the temporary file failed (disk full, ...)
            raise _Fail("os_error", _short(e), code) from None
        if size == 0:
            raise _Fail("empty", "empty body", code)
        if ext is None:
            ext = sniff_image_ext(head)
            if ext is None:
                raise _Fail("not_image", f"not an image (Content-Type {ctype}, "
                            f"starts {head[:12]!r})", code)
        return code, ext, size, h.hexdigest(), final_url


def _save_downscaled(img, src_fmt, tmp_out, max_side):
    """Save ``img`` shrunk to fit ``max_side`` into ``tmp_out``; returns the extension."""
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    extra = {}
    if img.info.get("exif"):
        extra["exif"] = img.info["exif"]
    if img.info.get("icc_profile"):
        extra["icc_profile"] = img.info["icc_profile"]
    if src_fmt == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
        fmt, ext = "JPEG", ".jpg"
        extra.update(quality=95, subsampling=0)
    else:
        fmt, ext = "PNG", ".png"
        if img.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    with open(tmp_out, "wb") as f:
        img.save(f, format=fmt, **extra)
        f.flush()
        os.fsync(f.fileno())
    return ext


def _tmp_name(out_dir: Path, stem: str) -> Path:
    return out_dir / f".{stem}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def _unlink(p) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def fetch_image(session: requests.Session, urls, out_dir, stem: str,
                max_bytes: int = DEFAULT_MAX_BYTES, timeout=(10.0, 30.0),
                max_side: int | None = None, url_map=None, body_retries: int = 2,
                backoff: float = 0.5) -> FetchResult:
    """Download the first URL of ``urls`` that yields a valid image to ``<stem><ext>``.

    Each URL gets urllib3's retries (through ``session``) and up to
    ``body_retries`` extra attempts when the body breaks off mid-way; then the
    next URL is tried. Other files ``<stem>.<other ext>`` are removed after a
    successful download so the stem names exactly one image.
    """
    out_dir = Path(out_dir)
    if isinstance(urls, str):
        urls = [urls]
    tried: list[dict] = []
    last: _Fail | None = None
    last_url = None
    for raw in urls:
        url = apply_url_map(raw, url_map)
        last_url = url
        for attempt in range(body_retries + 1):
            tmp = _tmp_name(out_dir, stem)
            tmp2 = None
            try:
                code, ext, size, digest, final_url = _stream_to_temp(
                    session, url, tmp, max_bytes, timeout)
                try:
                    img, w, h, fmt = _decode(tmp, keep=bool(max_side))
                except Exception as e:  # noqa: BLE001 - any decoder error
                    raise _Fail("undecodable", f"does not decode: {_short(e)}", code) from None
                resized = None
                if max_side and img is not None:
                    try:
                        if max(w, h) > max_side:
                            tmp2 = _tmp_name(out_dir, stem)
                            ext = _save_downscaled(img, fmt, tmp2, max_side)
                            resized = [w, h]
                            w, h = img.size
                            _unlink(tmp)
                            tmp, tmp2 = tmp2, None
                            size = os.path.getsize(tmp)
                            digest = sha256_file(tmp)
                    finally:
                        img.close()
                final = out_dir / (stem + ext)
                os.replace(tmp, final)
                for other in existing_files(out_dir, stem):
                    if other.name != final.name:
                        _unlink(other)
                return FetchResult(key=stem, status="ok", url=url, http=code, bytes=size,
                                   width=w, height=h, sha256=digest, file=final.name,
                                   final_url=final_url, tried=tried, resized_from=resized)
            except _Fail as f:
                last, retry_body = f, f.body_phase and attempt < body_retries
                tried.append({"url": url, "http": f.http, "error": f.detail, "kind": f.kind})
            except OSError as e:  # local file problems: not the URL's fault
                last, retry_body = _Fail("os_error", _short(e)), False
                tried.append({"url": url, "http": None, "error": last.detail, "kind": last.kind})
            finally:
                _unlink(tmp)
                if tmp2 is not None:
                    _unlink(tmp2)
            if not retry_body:
                break
            time.sleep(backoff * (2 ** attempt) + random.random() * backoff)
        if last is not None and last.kind == "os_error":
            break  # a local disk problem (full, read-only...): another URL will not help
    if last is None:
        last = _Fail("no_url", "no URL to try")
    detail = _join_attempts(tried) or last.detail
    return FetchResult(key=stem, status="failed", url=last_url, http=last.http, error=detail,
                       error_kind=last.kind, tried=tried)


def _join_attempts(tried: list[dict]) -> str:
    """"url: error (xN); url2: error" with repeated attempts on one URL folded."""
    parts: list[list] = []
    for t in tried:
        if parts and parts[-1][0] == t["url"]:
            parts[-1][1], parts[-1][2] = t["error"], parts[-1][2] + 1
        else:
            parts.append([t["url"], t["error"], 1])
    return "; ".join(f"{u}: {e}" + (f" ({n} attempts)" if n > 1 else "") for u, e, n in parts)


def download_one(session: requests.Session, urls, out_dir, stem: str,
                 max_bytes: int = DEFAULT_MAX_BYTES, timeout=(10.0, 30.0),
                 max_side: int | None = None, url_map=None, body_retries: int = 2,
                 backoff: float = 0.5) -> FetchResult:
    """Resume-aware :func:`fetch_image`: keep a valid existing file (``skipped``).

    Existing ``<stem>.<ext>`` files are checked in :data:`FINAL_EXTS` order; the
    first valid one is kept and any other file of that stem is removed.
    """
    found = existing_files(out_dir, stem)
    for p in found:
        info = verify_existing(p, max_bytes)
        if info is not None:
            for other in found:  # the stem names exactly one image: drop the others
                if other != p:
                    _unlink(other)
            return FetchResult(key=stem, status="skipped", bytes=info.bytes, width=info.width,
                               height=info.height, sha256=info.sha256, file=p.name)
    # Absent or invalid: fetch_image replaces it and removes other-extension leftovers.
    return fetch_image(session, urls, out_dir, stem, max_bytes=max_bytes, timeout=timeout,
                       max_side=max_side, url_map=url_map, body_retries=body_retries,
                       backoff=backoff)
