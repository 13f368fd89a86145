"""HTTP for both downloaders: sessions with retries, the address policy, the deadline.

- ``make_session`` / ``open_session``: a keep-alive ``requests.Session``; urllib3 retries
  connect errors, read timeouts, 429 and 5xx (honouring ``Retry-After``) with exponential
  backoff and jitter; other 4xx are final.
- ``AddressPolicy``: which addresses a download may contact. Every URL and redirect is
  checked before a request is sent, and the connection then goes to the addresses that
  were checked: a name is resolved once, so a second DNS answer cannot lead elsewhere.
- ``Deadline``: a download still running after its time is cut off.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
import urllib.parse

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.poolmanager import ProxyManager
from urllib3.util.retry import Retry

from utils.args import Downloads

RETRY_STATUSES = (429, 500, 502, 503, 504)
USER_AGENT = "image-selection-downloader/1.0 (+python-requests)"
ALLOW_OPTION = "--allow-private-addresses"
DNS_TTL = 60.0
MAX_REDIRECTS = 10


class BlockedAddressError(requests.exceptions.ConnectionError):
    """A URL or a redirect leads to an address the download must not contact; raised
    before any connection to it is made."""


class DeadlineExceeded(Exception):
    """The download's deadline passed (not an ``OSError``: urllib3 must not retry it)."""


def address_class(ip: str) -> str:
    """'public', 'private', 'loopback', 'link-local' or 'reserved' for an IP address."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    addr = getattr(addr, "ipv4_mapped", None) or addr
    if addr.is_link_local:
        return "link-local"
    if addr.is_loopback:
        return "loopback"
    if addr.is_unspecified or addr.is_multicast or addr.is_reserved:
        return "reserved"
    return "public" if addr.is_global else "private"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _host_port(url: str):
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return None, None
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def url_host(url: str) -> str | None:
    """The host name of ``url`` (lower case), or None."""
    try:
        return urllib.parse.urlsplit(url).hostname
    except ValueError:
        return None


class AddressPolicy:
    """Where a download may go. A public URL must not lead into the local network (cloud
    metadata at 169.254.169.254, an admin page on 10.x), neither by its host name
    resolving there nor by a redirect.

    - never, unless ``allow_private``: a link-local or reserved address (any URL, any hop);
      a host *name* resolving to a private or loopback address; a redirect from a public
      address to a private or loopback one.
    - allowed: a URL naming a local address literally (``http://127.0.0.1:8000/``,
      ``localhost``) or a host the user named (``trusted_hosts``: a ``--mirror``, the
      ``--url-prefix-map`` targets); its redirects may stay in the local network.

    A check resolves the host once (cached for a minute) and pins, for the calling thread,
    the addresses it allowed: the session's connections go to those and no others (a host
    that did not resolve gets no connection at all).
    """

    def __init__(self, allow_private: bool = False, trusted_hosts=()):
        self.allow_private = allow_private
        self.trusted_hosts = frozenset(h.lower() for h in trusted_hosts if h)
        self._cache: dict = {}
        self._pins = threading.local()

    def resolve(self, host: str, port: int) -> list[tuple[str, str]]:
        """[(ip, address class)] of ``host`` ([] when it does not resolve)."""
        if _is_ip(host):
            return [(host, address_class(host))]
        now, hit = time.monotonic(), self._cache.get((host, port))
        if hit is not None and now - hit[0] < DNS_TTL:
            return hit[1]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            infos = []
        out = [(ip, address_class(ip)) for ip in dict.fromkeys(info[4][0] for info in infos)]
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[(host, port)] = (now, out)
        return out

    def check(self, url: str, came_from: str | None = None) -> None:
        """Raise ``BlockedAddressError`` when ``url`` (reached by a redirect from
        ``came_from``, or given as it is) must not be contacted; else pin its addresses."""
        if self.allow_private:
            return
        host, port = _host_port(url)
        if not host:
            return  # not a URL requests can fetch: it fails on its own
        addrs = self.resolve(host, port)
        how = f"the redirect from {came_from} to {url}" if came_from else url
        hint = f"(pass {ALLOW_OPTION} to allow it)"
        for ip, cls in addrs:
            if cls in ("link-local", "reserved"):
                where = host if host == ip else f"{host} ({ip})"
                raise BlockedAddressError(f"refused {how}: {where} is a {cls} address {hint}")
        local = [(ip, cls) for ip, cls in addrs if cls != "public"]
        if local and came_from is None:
            named = _is_ip(host) or host == "localhost" or host.endswith(".localhost") or host in self.trusted_hosts
            if not named:
                ip, cls = local[0]
                raise BlockedAddressError(
                    f"refused {how}: the host name {host} resolves to {ip}, a {cls} address {hint}"
                )
        elif local and self._is_public(came_from):
            ip, cls = local[0]
            raise BlockedAddressError(
                f"refused {how}: a public address redirects to {host} ({ip}, a {cls} address) {hint}"
            )
        self._pins.__dict__[(host.rstrip(".").lower(), port)] = [ip for ip, _ in addrs]

    def _is_public(self, url: str) -> bool:
        host, port = _host_port(url)
        addrs = self.resolve(host, port) if host else []
        return bool(addrs) and all(c == "public" for _, c in addrs)

    def pinned(self, host: str, port: int) -> list[str] | None:
        """The addresses this thread's last check of ``host:port`` allowed (None: never checked)."""
        return self._pins.__dict__.get((host.rstrip(".").lower(), port))  # urllib3 drops a final dot


class Deadline:
    """Ends a download still running after ``seconds``: the sockets its requests use are
    shut down (a read blocked on a server that trickles a byte a second returns at once),
    and a request it starts afterwards fails. ``with Deadline(s) as d: ...``; ``d.expired``."""

    _current = threading.local()

    def __init__(self, seconds: float | None):
        self.seconds, self.expired = seconds, False
        self._socks: list = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire) if seconds else None

    def __enter__(self) -> Deadline:
        Deadline._current.value = self
        if self._timer:
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._timer:
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
                raise DeadlineExceeded(f"not finished within the deadline of {d.seconds:g} s")
            d._socks.append(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for s in self._socks:
                try:  # the plain socket's shutdown: an SSL socket's would drop its state under the reader
                    socket.socket.shutdown(s, socket.SHUT_RDWR)
                except OSError:
                    pass


class _Pinned:
    """Connects to the addresses its session's policy checked (the host name stays the
    request's: Host header, TLS server name and certificate check), and puts each request
    under the thread's ``Deadline``."""

    policy: AddressPolicy | None = None

    def _new_conn(self):
        ips = self.policy.pinned(self.host, self.port) if self.policy else None
        if ips is None:  # a proxy, or a session whose policy allows everything
            return super()._new_conn()
        err: OSError | None = None
        for ip in ips:
            try:
                return urllib3.util.connection.create_connection(
                    (ip, self.port),
                    self.timeout,
                    source_address=self.source_address,
                    socket_options=self.socket_options,
                )
            except OSError as e:
                err = e
        if err is None:
            raise NameResolutionError(self.host, self, socket.gaierror(f"{self.host} did not resolve"))
        if isinstance(err, TimeoutError):
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out") from err
        raise NewConnectionError(self, f"Failed to establish a new connection: {err}") from err

    def getresponse(self, *args, **kw):
        Deadline.watch(self.sock)
        return super().getresponse(*args, **kw)


def _pool_classes(policy: AddressPolicy) -> dict:
    def pool(base, conn):
        return type(
            f"Pinned{base.__name__}",
            (base,),
            {"ConnectionCls": type(conn.__name__, (_Pinned, conn), {"policy": policy})},
        )

    return {"http": pool(HTTPConnectionPool, HTTPConnection), "https": pool(HTTPSConnectionPool, HTTPSConnection)}


class _Adapter(HTTPAdapter):
    def __init__(self, policy: AddressPolicy, **kw):
        self._pools = _pool_classes(policy)
        super().__init__(**kw)

    def init_poolmanager(self, *args, **kw):
        super().init_poolmanager(*args, **kw)
        self.poolmanager.pool_classes_by_scheme = self._pools

    def proxy_manager_for(self, proxy, **kw):
        manager = super().proxy_manager_for(proxy, **kw)
        if type(manager) is ProxyManager:  # not SOCKS: its pools are its own
            manager.pool_classes_by_scheme = self._pools
        return manager


class _Session(requests.Session):
    """Every URL requested and every redirect target is checked by ``address_policy``
    before a connection is made. The proxies of the environment are read once per host
    (requests reads them on every request: 0.4 ms, a tenth of a small image's cost)."""

    def __init__(self, address_policy: AddressPolicy):
        super().__init__()
        self.address_policy = address_policy
        self.trust_env = False  # the environment is merged below, cached (and ~/.netrc is not used)
        self._proxies: dict = {}
        self._ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")

    def request(self, method, url, *args, **kwargs):
        self.address_policy.check(url)
        return super().request(method, url, *args, **kwargs)

    def get_redirect_target(self, resp):
        target = super().get_redirect_target(resp)
        if target:
            try:
                self.address_policy.check(urllib.parse.urljoin(resp.url, target), came_from=resp.url)
            except BlockedAddressError:
                resp.close()
                raise
        return target

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        key = urllib.parse.urlsplit(url)[:2]
        if key not in self._proxies:
            self._proxies = {} if len(self._proxies) > 10_000 else self._proxies
            self._proxies[key] = requests.utils.get_environ_proxies(url)
        proxies = {**self._proxies[key], **(proxies or {})}
        verify = self._ca_bundle if verify in (True, None) and self._ca_bundle else verify
        return super().merge_environment_settings(url, proxies, stream, verify, cert)


def make_session(
    retries: int = 4, backoff: float = 0.5, pool_size: int = 16, address_policy: AddressPolicy | None = None
) -> requests.Session:
    """A keep-alive session with urllib3 retries for GET: ``retries`` bounds the total and
    each of connect/read/status retries; waits grow as ``backoff * 2**(n-1)`` plus up to
    ``backoff`` of jitter (at most 30 s); ``Retry-After`` on 429/503 is honoured (at most
    2 minutes where urllib3 can cap it). After the retries the last response is returned
    as it is, so the caller sees the real status. ``address_policy`` (default
    ``AddressPolicy()``) checks every URL and redirect before connecting."""
    kw = dict.fromkeys(("total", "connect", "read", "status"), retries)
    kw |= dict(other=0, redirect=MAX_REDIRECTS, backoff_factor=backoff, backoff_max=30.0, backoff_jitter=backoff)
    kw |= dict(status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET", "HEAD"}), raise_on_status=False)
    try:
        retry = Retry(**kw, retry_after_max=120)
    except TypeError:  # urllib3 < 2.6 has no retry_after_max
        retry = Retry(**kw)
    policy = AddressPolicy() if address_policy is None else address_policy
    adapter = _Adapter(policy, max_retries=retry, pool_connections=max(1, pool_size), pool_maxsize=max(1, pool_size))
    s = _Session(policy)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.max_redirects = MAX_REDIRECTS
    s.headers["User-Agent"] = USER_AGENT
    return s


def open_session(net: Downloads, trusted_hosts=(), pool_size: int | None = None) -> requests.Session:
    """``make_session`` as the download flags say (``utils.args.Downloads``); ``trusted_hosts``:
    the hosts the user named (a mirror, the ``--url-prefix-map`` targets)."""
    policy = AddressPolicy(allow_private=net.allow_private, trusted_hosts=trusted_hosts)
    return make_session(net.retries, net.backoff, pool_size or net.workers, address_policy=policy)
