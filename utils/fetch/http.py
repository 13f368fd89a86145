"""HTTP for both downloaders: keep-alive sessions with retries; the address policy every URL and
redirect passes before a connection is made (which then goes to the checked addresses only); the
deadline of a whole download; ``describe``: what went wrong with a request, as a kind and one line."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import socket
import threading
import time
import urllib.parse

import requests
import requests.exceptions as req
import urllib3
import urllib3.exceptions as u3

from utils.args import Downloads

RETRY_STATUSES = (429, 500, 502, 503, 504)
USER_AGENT = "image-selection-downloader/1.0 (+python-requests)"
DNS_TTL = 60.0
MAX_REDIRECTS = 10
CHUNK = 1 << 16  # bytes read from a body at a time


class BlockedAddressError(req.ConnectionError):
    """A URL or redirect leads to an address the download must not contact (raised before connecting)."""


class DeadlineExceeded(Exception):
    """The download's deadline passed (not an ``OSError``: urllib3 must not retry it)."""


def address_class(ip: str) -> str:
    """'public', 'private', 'loopback', 'link-local' or 'reserved'."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    addr = getattr(addr, "ipv4_mapped", None) or addr
    if addr.is_link_local:
        return "link-local"
    if addr.is_loopback:
        return "loopback"
    if addr.is_unspecified or addr.is_multicast or addr.is_reserved:
        return "reserved"
    return "public" if addr.is_global else "private"


def _lookup(host: str, port: int, minute: float) -> list[tuple[str, str]]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        infos = []
    return [(ip, address_class(ip)) for ip in dict.fromkeys(info[4][0] for info in infos)]


def _host_port(url: str):
    """(host name in lower case, port) of ``url``; (None, None) when it has none."""
    try:
        parts = urllib.parse.urlsplit(url)
        return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None, None


class AddressPolicy:
    """Where a download may go: never to a link-local or reserved address (cloud metadata); to a
    private or loopback one only when the URL names it (a literal address, localhost, a ``trusted``
    host) or by a redirect from such a place. A check pins, for the calling thread, the addresses
    it allowed: the session connects to those only. ``allow_private`` allows everything."""

    def __init__(self, allow_private: bool = False, trusted=()):
        self.allow_private = allow_private
        self.trusted = frozenset(h for h in trusted if h)
        self._lookup = functools.lru_cache(10_000)(_lookup)
        self.pins = threading.local()  # (host, port) -> the addresses this thread's last check allowed

    def resolve(self, host: str, port: int) -> list[tuple[str, str]]:
        """[(ip, address class)] of ``host`` ([] when it does not resolve; cached for at most a minute)."""
        with contextlib.suppress(ValueError):  # an address literal
            return [(host, address_class(host))]
        return self._lookup(host, port, time.monotonic() // DNS_TTL)  # a new minute, a new key

    def check(self, url: str, came_from: str | None = None) -> None:
        """Raise ``BlockedAddressError`` when ``url`` must not be contacted; else pin its addresses."""
        host, port = _host_port(url)
        if self.allow_private or not host:  # not a URL requests can fetch: it fails on its own
            return
        addrs = self.resolve(host, port)
        local = [(ip, cls) for ip, cls in addrs if cls != "public"]
        literal = any(ip == host for ip, _ in addrs)
        named = literal or host == "localhost" or host.endswith(".localhost") or host in self.trusted
        refused = f"refused {f'the redirect from {came_from} to {url}' if came_from else url}"
        for ip, cls in local:
            if cls in ("link-local", "reserved"):
                self._refuse(f"{refused}: {host if host == ip else f'{host} ({ip})'} is a {cls} address")
        if local and came_from is None and not named:
            self._refuse(f"{refused}: the host name {host} resolves to {local[0][0]}, a {local[0][1]} address")
        if local and came_from is not None:
            source_host, source_port = _host_port(came_from)
            source = self.resolve(source_host, source_port) if source_host else []
            if source and all(c == "public" for _, c in source):
                ip, cls = local[0]
                self._refuse(f"{refused}: a public address redirects to {host} ({ip}, a {cls} address)")
        self.pins.__dict__[(host.rstrip("."), port)] = [ip for ip, _ in addrs]  # urllib3 drops a final dot

    @staticmethod
    def _refuse(msg: str):
        raise BlockedAddressError(f"{msg} (pass --allow-private-addresses to allow it)")


class Deadline:
    """``with Deadline(seconds) as d``: when the time is up, the sockets of the thread's
    requests are shut down (a read blocked on a server trickling its bytes returns at once),
    a request started afterwards fails, and ``d.expired`` is set."""

    _current = threading.local()

    def __init__(self, seconds: float):
        self.seconds, self.expired = seconds, False
        self._socks: list = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __str__(self) -> str:
        return f"not finished within the deadline of {self.seconds:g} s"

    def __enter__(self) -> Deadline:
        Deadline._current.value = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        Deadline._current.value = None

    @classmethod
    def watch(cls, sock) -> None:
        """Put ``sock`` under the calling thread's deadline (if any)."""
        d = getattr(cls._current, "value", None)
        if d is None or sock is None:
            return
        with d._lock:
            if d.expired:
                raise DeadlineExceeded(str(d))
            d._socks.append(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for s in self._socks:  # the plain socket's shutdown: an SSL one's would drop its state under the reader
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(s, socket.SHUT_RDWR)


class _Pinned:
    """Connects to the addresses its ``policy`` checked (the TLS name stays the host's), under the ``Deadline``."""

    policy: AddressPolicy

    def _new_conn(self):
        ips = self.policy.pins.__dict__.get((self.host.rstrip(".").lower(), self.port))
        if ips is None:  # a proxy, or a policy that allows everything
            return super()._new_conn()
        if not ips:
            raise u3.NameResolutionError(self.host, self, socket.gaierror(f"{self.host} did not resolve"))
        options = dict(source_address=self.source_address, socket_options=self.socket_options)
        for ip in ips:
            try:
                return urllib3.util.connection.create_connection((ip, self.port), self.timeout, **options)
            except OSError as e:
                err = e
        if isinstance(err, TimeoutError):
            raise u3.ConnectTimeoutError(self, f"Connection to {self.host} timed out") from err
        raise u3.NewConnectionError(self, f"Failed to establish a new connection: {err}") from err

    def getresponse(self, *args, **kw):
        Deadline.watch(self.sock)
        return super().getresponse(*args, **kw)


class _Adapter(requests.adapters.HTTPAdapter):
    """Pools of ``_Pinned`` connections, behind an HTTP proxy too."""

    def __init__(self, policy: AddressPolicy, **kw):
        def pool(base):
            pinned = type(base.ConnectionCls.__name__, (_Pinned, base.ConnectionCls), {"policy": policy})
            return type(f"Pinned{base.__name__}", (base,), {"ConnectionCls": pinned})

        self._pools = {scheme: pool(base) for scheme, base in urllib3.poolmanager.pool_classes_by_scheme.items()}
        super().__init__(**kw)

    def init_poolmanager(self, *args, **kw):
        super().init_poolmanager(*args, **kw)
        self.poolmanager.pool_classes_by_scheme = self._pools

    def proxy_manager_for(self, proxy, **kw):
        manager = super().proxy_manager_for(proxy, **kw)
        if type(manager) is urllib3.ProxyManager:  # not SOCKS: its pools are its own
            manager.pool_classes_by_scheme = self._pools
        return manager


class _Session(requests.Session):
    """Checks every URL and redirect before connecting; reads the environment's proxies once per host."""

    def __init__(self, policy: AddressPolicy):
        super().__init__()
        self.policy = policy
        self.trust_env = False
        environ_proxies = requests.utils.get_environ_proxies
        self._proxies = functools.lru_cache(10_000)(lambda scheme, host: environ_proxies(f"{scheme}://{host}"))
        self._ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")

    def request(self, method, url, *args, **kwargs):
        self.policy.check(url)
        return super().request(method, url, *args, **kwargs)

    def get_redirect_target(self, resp):
        target = super().get_redirect_target(resp)
        if target:
            try:
                self.policy.check(urllib.parse.urljoin(resp.url, target), came_from=resp.url)
            except BlockedAddressError:
                resp.close()
                raise
        return target

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        proxies = {**self._proxies(*urllib.parse.urlsplit(url)[:2]), **(proxies or {})}
        verify = self._ca_bundle if verify in (True, None) and self._ca_bundle else verify
        return super().merge_environment_settings(url, proxies, stream, verify, cert)


def open_session(net: Downloads, trusted_urls=()) -> requests.Session:
    """A keep-alive session as the download flags say: a GET is retried, after ``backoff * 2**(n-1)``
    s plus jitter (at most 30 s) or what Retry-After says, then its last response is returned as it is.
    The hosts of ``trusted_urls`` (a mirror, the ``--url-prefix-map`` targets) were named by the user."""
    kw = dict.fromkeys(("total", "connect", "read", "status"), net.retries) | dict(other=0, redirect=MAX_REDIRECTS)
    kw |= dict(backoff_factor=net.backoff, backoff_max=30.0, backoff_jitter=net.backoff, raise_on_status=False)
    kw |= dict(status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET", "HEAD"}))
    try:
        retry = urllib3.Retry(**kw, retry_after_max=120)
    except TypeError:  # urllib3 < 2.6 has no retry_after_max
        retry = urllib3.Retry(**kw)
    policy = AddressPolicy(net.allow_private, [_host_port(u)[0] for u in trusted_urls if u])
    adapter = _Adapter(policy, max_retries=retry, pool_connections=net.workers, pool_maxsize=net.workers)
    s = _Session(policy)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.max_redirects = MAX_REDIRECTS
    s.headers["User-Agent"] = USER_AGENT
    return s


# the first kind whose types (or words) appear in the exception's chain; "connection" comes
# before "timeout" because urllib3's NewConnectionError derives from ConnectTimeoutError
KINDS = (
    ("deadline", (DeadlineExceeded,), None),
    ("blocked_address", (BlockedAddressError,), None),
    ("redirects", (req.TooManyRedirects,), None),
    ("bad_url", (req.InvalidURL, req.MissingSchema, req.InvalidSchema, u3.LocationParseError), None),
    ("truncated", (u3.IncompleteRead,), "incomplete"),
    ("ssl", (req.SSLError, u3.SSLError), None),
    ("connection", (ConnectionRefusedError, u3.NewConnectionError, u3.NameResolutionError), "connection refused"),
    ("timeout", (u3.TimeoutError, req.Timeout, TimeoutError), None),
    ("connection", (u3.ProtocolError, req.ConnectionError, ConnectionResetError), None),
    ("os_error", (OSError,), None),
)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and all it wraps (causes, contexts, urllib3 ``reason``s, exception arguments), each once."""
    seen, stack = {}, [exc]
    while stack:
        e = stack.pop()
        if e is not None and id(e) not in seen:
            seen[id(e)] = e
            stack += [e.__cause__, e.__context__, getattr(e, "reason", None)]
            stack += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    return list(seen.values())


def describe(exc: BaseException) -> tuple[str, str]:
    """(a short kind, the first of ``KINDS`` in its chain; one line naming the most specific cause)."""
    chain = _chain(exc)

    def found(types, words: str | None = None) -> bool:
        return any(isinstance(e, types) or (words and words in str(e).lower()) for e in chain)

    kind = next((k for k, types, words in KINDS if found(types, words)), type(exc).__name__)
    ours = [e for e in chain if isinstance(e, (BlockedAddressError, DeadlineExceeded))]
    if ours or found(ConnectionRefusedError, "connection refused"):
        return kind, str(ours[0]) if ours else "connection refused"
    inner = [e for e in chain if isinstance(e, u3.IncompleteRead)]
    inner += [e for e in chain if isinstance(e, u3.HTTPError) and not isinstance(e, u3.MaxRetryError)]
    inner += [e for e in chain if isinstance(e, OSError) and not isinstance(e, req.RequestException)][-1:]
    cause = (inner or [exc])[0]
    text = str(cause).splitlines()[0] if str(cause) else ""
    if "): " in text and "Pool(" in text:  # drop "HTTPConnectionPool(host=..., port=...): "
        text = text.split("): ", 1)[1]
    text = f"{type(cause).__name__}: {text}"
    return kind, text if len(text) <= 160 else text[:157] + "..."
