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
* :class:`AddressPolicy` -- which addresses a download may contact (every URL
  and every redirect is checked before any connection is made).
* :func:`exception_chain`, :func:`classify_exception`, :func:`root_cause` -- the one
  walk over an exception's causes, used by both downloaders.
* :func:`verify_existing`, :func:`sniff_image_ext`, :func:`apply_url_map`,
  :func:`parse_url_map`.

urllib3 cannot retry once a response's headers have arrived, so failures while
*reading the body* (connection cut short, read timeout mid-body) get a small
number of extra attempts here (``body_retries``), with the same backoff.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import random
import secrets
import socket
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests
import urllib3
from PIL import Image
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from utils.formats import IMAGE_EXTS
from utils.hashing import sha256_file

RETRY_STATUSES = (429, 500, 502, 503, 504)
DEFAULT_MAX_BYTES = 80_000_000
TEMP_SUFFIX = ".part"
CHUNK = 1 << 16
USER_AGENT = "image-selection-downloader/1.0 (+python-requests)"

# Decoding a 61 MP image holds ~180 MB of pixels: let only a couple of large
# images decode at a time so peak memory stays bounded with many workers.
LARGE_PIXELS = 16_000_000
_large_decode = threading.BoundedSemaphore(2)


# ---------------------------------------------------------------------------
# which addresses a download may contact
# ---------------------------------------------------------------------------
class BlockedAddressError(requests.exceptions.ConnectionError):
    """A URL or a redirect leads to an address the download must not contact; raised
    before any connection to it is made."""


ALLOW_OPTION = "--allow-private-addresses"
_DNS_TTL = 60.0


def address_class(ip: str) -> str:
    """'public', 'private', 'loopback', 'link-local' or 'reserved' for an IP address."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    if mapped is not None:
        addr = mapped
    if addr.is_link_local:
        return "link-local"
    if addr.is_loopback:
        return "loopback"
    if addr.is_unspecified or addr.is_multicast or addr.is_reserved:
        return "reserved"
    return "public" if addr.is_global else "private"


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


class AddressPolicy:
    """Where a download may go. The published files name public hosts; a public URL
    must not lead into the local network (cloud metadata at 169.254.169.254, an admin
    page on 10.x), neither by its host name resolving there nor by a redirect.

    - never, unless ``allow_private``: a link-local or reserved address (any URL, any hop);
      a host *name* that resolves to a private or loopback address; a redirect from a
      public address to a private or loopback one.
    - allowed: a URL that names a loopback or private address literally
      (``http://127.0.0.1:8000/...``, ``http://10.0.0.5/...``, ``localhost``), or a host
      the user named on the command line (``trusted_hosts``: a ``--mirror``, the targets
      of ``--url-prefix-map``): the user's own mirror, meant as written; its redirects
      may stay in the local network.

    Every check resolves the host (``socket.getaddrinfo``, cached for a minute) before
    the request is sent, so a refused address is never contacted. A host that does not
    resolve is left to the request, which then fails as usual.
    """

    def __init__(self, allow_private: bool = False, trusted_hosts=()):
        self.allow_private = allow_private
        self.trusted_hosts = frozenset(h.lower() for h in trusted_hosts if h)
        self._cache: dict = {}

    def _addresses(self, host: str, port: int) -> list[tuple[str, str]]:
        if _is_ip_literal(host):
            return [(host, address_class(host))]
        now = time.monotonic()
        hit = self._cache.get((host, port))
        if hit is not None and now - hit[0] < _DNS_TTL:
            return hit[1]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, OSError):
            return []
        ips = sorted({info[4][0] for info in infos})
        out = [(ip, address_class(ip)) for ip in ips]
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[(host, port)] = (now, out)
        return out

    @staticmethod
    def _host_port(url: str):
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            return None, None
        return parts.hostname, port or (443 if parts.scheme == "https" else 80)

    def _is_public(self, url: str) -> bool:
        host, port = self._host_port(url)
        if not host:
            return False
        addrs = self._addresses(host, port)
        return bool(addrs) and all(c == "public" for _, c in addrs)

    def check(self, url: str, came_from: str | None = None) -> None:
        """Raise :class:`BlockedAddressError` when ``url`` (reached by a redirect from
        ``came_from``, or given as it is) must not be contacted."""
        if self.allow_private:
            return
        host, port = self._host_port(url)
        if not host:
            return  # not a URL requests can fetch: it fails on its own
        addrs = self._addresses(host, port)
        how = f"the redirect from {came_from} to {url}" if came_from else url
        hint = f"(pass {ALLOW_OPTION} to allow it)"
        for ip, cls in addrs:
            if cls in ("link-local", "reserved"):
                where = host if host == ip else f"{host} ({ip})"
                raise BlockedAddressError(f"refused {how}: {where} is a {cls} address {hint}")
        local = [(ip, cls) for ip, cls in addrs if cls != "public"]
        if not local:
            return
        ip, cls = local[0]
        if came_from is None:
            named = (
                _is_ip_literal(host) or host == "localhost" or host.endswith(".localhost") or host in self.trusted_hosts
            )
            if not named:
                raise BlockedAddressError(
                    f"refused {how}: the host name {host} resolves to {ip}, a {cls} address {hint}"
                )
        elif self._is_public(came_from):
            raise BlockedAddressError(
                f"refused {how}: a public address redirects to {host} ({ip}, a {cls} address) {hint}"
            )


# ---------------------------------------------------------------------------
# session
# ---------------------------------------------------------------------------
class _Session(requests.Session):
    """A Session that reads proxy/CA settings from the environment once per host.

    A plain Session scans ``os.environ`` (and looks for ~/.netrc) on every
    request, a noticeable share of the cost of a small image. Here ``HTTP(S)_PROXY``/``NO_PROXY`` are resolved on the first request to a
    host and cached; ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` are read once.
    (.netrc credentials are not used.)

    With an ``address_policy`` every URL requested and every redirect target is
    checked (:class:`AddressPolicy`) before a connection is made.
    """

    def __init__(self, address_policy: AddressPolicy | None = None):
        super().__init__()
        self.trust_env = False  # we merge the environment ourselves, cached
        self._env_proxies: dict = {}
        self._ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        self.address_policy = address_policy

    def request(self, method, url, *args, **kwargs):
        if self.address_policy is not None:
            self.address_policy.check(url)
        return super().request(method, url, *args, **kwargs)

    def get_redirect_target(self, resp):
        target = super().get_redirect_target(resp)
        if target and self.address_policy is not None:
            absolute = target
            if absolute.startswith("//"):
                absolute = f"{urllib.parse.urlsplit(resp.url).scheme}:{absolute}"
            absolute = urllib.parse.urljoin(resp.url, absolute)
            try:
                self.address_policy.check(absolute, came_from=resp.url)
            except BlockedAddressError:
                resp.close()
                raise
        return target

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


def make_session(
    retries: int = 4,
    backoff: float = 0.5,
    pool_size: int = 16,
    jitter: float | None = None,
    backoff_max: float = 30.0,
    retry_after_max: float = 120.0,
    max_redirects: int = 10,
    user_agent: str = USER_AGENT,
    address_policy: AddressPolicy | None = None,
) -> requests.Session:
    """A keep-alive session with urllib3 retries for GET.

    ``retries`` bounds the total and each of connect/read/status retries;
    waits grow as ``backoff * 2**(n-1)`` (urllib3: no wait before the first
    retry) plus up to ``jitter`` seconds of random jitter (default: ``backoff``),
    capped at ``backoff_max``; a ``Retry-After`` header on 429/503 is honoured
    (capped at ``retry_after_max`` where urllib3 supports it). After the
    retries the last response is returned as is (``raise_on_status=False``),
    so the caller sees the real status code. ``address_policy`` (default: an
    :class:`AddressPolicy` that refuses private addresses reached from public ones)
    checks every URL and redirect before connecting.
    """
    kw = dict(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        other=0,
        redirect=max_redirects,
        backoff_factor=backoff,
        backoff_max=backoff_max,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET", "HEAD"}),
        respect_retry_after_header=True,
        raise_on_status=False,
        backoff_jitter=backoff if jitter is None else jitter,
        retry_after_max=int(retry_after_max),
    )
    try:
        retry = Retry(**kw)
    except TypeError:  # urllib3 < 2.6 has no retry_after_max
        kw.pop("retry_after_max")
        retry = Retry(**kw)
    adapter = HTTPAdapter(
        max_retries=retry, pool_connections=max(1, pool_size), pool_maxsize=max(1, pool_size), pool_block=False
    )
    s = _Session(AddressPolicy() if address_policy is None else address_policy)
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
            return new + url[len(old) :]
    return url


def url_host(url: str) -> str | None:
    """The host name of ``url`` (lower case), or None."""
    try:
        return urllib.parse.urlsplit(url).hostname
    except ValueError:
        return None


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


def exception_chain(exc: BaseException):
    """``exc`` and everything it wraps (causes, contexts, urllib3 ``reason``s and
    exceptions passed as arguments), each once: the one walk both downloaders use."""
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


def _refused(chain) -> bool:
    return any(isinstance(e, ConnectionRefusedError) or "Connection refused" in str(e) for e in chain)


def classify_exception(exc: BaseException) -> str:
    """Short error kind for a requests/urllib3/OS exception: blocked_address, redirects,
    bad_url, truncated, ssl, connection (refused, reset, unresolvable), timeout, os_error."""
    chain = list(exception_chain(exc))
    types = tuple(type(e) for e in chain)

    def has(*cls):
        return any(issubclass(t, cls) for t in types)

    if has(BlockedAddressError):
        return "blocked_address"
    if has(requests.exceptions.TooManyRedirects):
        return "redirects"
    if has(
        requests.exceptions.InvalidURL,
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidSchema,
        urllib3.exceptions.LocationParseError,
    ):
        return "bad_url"
    if has(urllib3.exceptions.IncompleteRead) or any(
        "IncompleteRead" in str(e) or "incomplete" in str(e).lower() for e in chain
    ):
        return "truncated"
    if has(requests.exceptions.SSLError, urllib3.exceptions.SSLError):
        return "ssl"
    # before the timeouts: urllib3's NewConnectionError derives from ConnectTimeoutError
    if _refused(chain) or has(urllib3.exceptions.NewConnectionError, urllib3.exceptions.NameResolutionError):
        return "connection"
    if has(urllib3.exceptions.TimeoutError, requests.exceptions.Timeout, TimeoutError):
        return "timeout"
    if has(
        urllib3.exceptions.ProtocolError,
        requests.exceptions.ChunkedEncodingError,
        ConnectionResetError,
        requests.exceptions.ConnectionError,
    ):
        return "connection"
    if has(OSError):
        return "os_error"
    return type(exc).__name__


def root_cause(exc: BaseException, limit: int = 160) -> str:
    """One-line description of the most specific cause of ``exc``, e.g.
    'connection refused', 'ReadTimeoutError: Read timed out.'."""
    chain = list(exception_chain(exc))
    blocked = [e for e in chain if isinstance(e, BlockedAddressError)]
    if blocked:
        return str(blocked[0])
    if _refused(chain):
        return "connection refused"
    u3 = [
        e
        for e in chain
        if isinstance(e, urllib3.exceptions.HTTPError) and not isinstance(e, urllib3.exceptions.MaxRetryError)
    ]
    oserr = [e for e in chain if isinstance(e, OSError) and not isinstance(e, requests.exceptions.RequestException)]
    short = [e for e in chain if isinstance(e, urllib3.exceptions.IncompleteRead)]
    inner = short[0] if short else u3[0] if u3 else oserr[-1] if oserr else exc
    text = str(inner).splitlines()[0] if str(inner) else ""
    if "): " in text and "Pool(" in text:  # drop "HTTPConnectionPool(host=..., port=...): "
        text = text.split("): ", 1)[1]
    text = f"{type(inner).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------
@dataclass
class FetchResult:
    key: str
    status: str  # ok | skipped | failed
    url: str | None = None  # URL the file came from (None for skipped)
    http: int | None = None  # last HTTP status seen
    error: str | None = None  # human-readable reason (failed only)
    error_kind: str | None = None  # short category, e.g. http_404, timeout, not_image
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    file: str | None = None  # final file name inside out_dir
    final_url: str | None = None  # after redirects, when different from url
    tried: list = field(default_factory=list)  # failed attempts before the result
    resized_from: list | None = None  # [w, h] of the original when downscaled
    mtime_ns: int | None = None  # of the final file, for download_images --trust-manifest

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
    for ext in IMAGE_EXTS:
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
        raise _Fail(classify_exception(e), root_cause(e)) from None
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
                                raise _Fail(
                                    "not_image", f"not an image (Content-Type {ctype}, starts {head[:12]!r})", code
                                )
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
            raise _Fail(classify_exception(e), root_cause(e), code, body_phase=True) from None
        except OSError as e:  # writing the temporary file failed (disk full, ...)
            raise _Fail("os_error", root_cause(e), code) from None
        if size == 0:
            raise _Fail("empty", "empty body", code)
        if ext is None:
            ext = sniff_image_ext(head)
            if ext is None:
                raise _Fail("not_image", f"not an image (Content-Type {ctype}, starts {head[:12]!r})", code)
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
) -> FetchResult:
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
                code, ext, size, digest, final_url = _stream_to_temp(session, url, tmp, max_bytes, timeout)
                try:
                    img, w, h, fmt = _decode(tmp, keep=bool(max_side))
                except Exception as e:  # noqa: BLE001 - any decoder error
                    raise _Fail("undecodable", f"does not decode: {root_cause(e)}", code) from None
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
                return FetchResult(
                    key=stem,
                    status="ok",
                    url=url,
                    http=code,
                    bytes=size,
                    width=w,
                    height=h,
                    sha256=digest,
                    file=final.name,
                    final_url=final_url,
                    tried=tried,
                    resized_from=resized,
                    mtime_ns=_mtime_ns(final),
                )
            except _Fail as f:
                last, retry_body = f, f.body_phase and attempt < body_retries
                tried.append({"url": url, "http": f.http, "error": f.detail, "kind": f.kind})
            except OSError as e:  # local file problems: not the URL's fault
                last, retry_body = _Fail("os_error", root_cause(e)), False
                tried.append({"url": url, "http": None, "error": last.detail, "kind": last.kind})
            finally:
                _unlink(tmp)
                if tmp2 is not None:
                    _unlink(tmp2)
            if not retry_body:
                break
            time.sleep(backoff * (2**attempt) + random.random() * backoff)
        if last is not None and last.kind == "os_error":
            break  # a local disk problem (full, read-only...): another URL will not help
    if last is None:
        last = _Fail("no_url", "no URL to try")
    detail = _join_attempts(tried) or last.detail
    return FetchResult(
        key=stem, status="failed", url=last_url, http=last.http, error=detail, error_kind=last.kind, tried=tried
    )


def _join_attempts(tried: list[dict]) -> str:
    """ "url: error (xN); url2: error" with repeated attempts on one URL folded."""
    parts: list[list] = []
    for t in tried:
        if parts and parts[-1][0] == t["url"]:
            parts[-1][1], parts[-1][2] = t["error"], parts[-1][2] + 1
        else:
            parts.append([t["url"], t["error"], 1])
    return "; ".join(f"{u}: {e}" + (f" ({n} attempts)" if n > 1 else "") for u, e, n in parts)


def _mtime_ns(p: Path) -> int | None:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return None


def unchanged_since(out_dir, rec: dict) -> FetchResult | None:
    """A ``skipped`` result straight from an earlier manifest record ``rec`` when its file
    still has the recorded size and mtime (no decoding, no hashing), else None."""
    name, size, mtime = rec.get("file"), rec.get("bytes"), rec.get("mtime_ns")
    if rec.get("status") not in ("ok", "skipped") or not name or size is None or mtime is None:
        return None
    if os.path.basename(name) != name or Path(name).stem != rec.get("key"):
        return None
    try:
        st = (Path(out_dir) / name).stat()
    except OSError:
        return None
    if st.st_size != size or st.st_mtime_ns != mtime:
        return None
    return FetchResult(
        key=rec["key"],
        status="skipped",
        bytes=size,
        width=rec.get("width"),
        height=rec.get("height"),
        sha256=rec.get("sha256"),
        file=name,
        mtime_ns=mtime,
    )


def download_one(
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
) -> FetchResult:
    """Resume-aware :func:`fetch_image`: keep a valid existing file (``skipped``).

    Existing ``<stem>.<ext>`` files are checked in :data:`IMAGE_EXTS` order; the
    first valid one is kept and any other file of that stem is removed.
    """
    found = existing_files(out_dir, stem)
    for p in found:
        info = verify_existing(p, max_bytes)
        if info is not None:
            for other in found:  # the stem names exactly one image: drop the others
                if other != p:
                    _unlink(other)
            return FetchResult(
                key=stem,
                status="skipped",
                bytes=info.bytes,
                width=info.width,
                height=info.height,
                sha256=info.sha256,
                file=p.name,
                mtime_ns=_mtime_ns(p),
            )
    # Absent or invalid: fetch_image replaces it and removes other-extension leftovers.
    return fetch_image(
        session,
        urls,
        out_dir,
        stem,
        max_bytes=max_bytes,
        timeout=timeout,
        max_side=max_side,
        url_map=url_map,
        body_retries=body_retries,
        backoff=backoff,
    )
