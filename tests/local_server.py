"""A local HTTP server for tests and benchmarks (a helper, not a test file).

It listens on 127.0.0.1 only, on an ephemeral port, and serves

* in-memory routes (``path -> bytes``) added with :meth:`LocalServer.add`, and/or
* the files of a directory (``LocalServer(directory=...)``), mapped under ``/``.

Faults can be injected per path, either permanently (fields of :class:`Route`)
or for the first N requests only (a list of :class:`Fault` consumed one per
request, after which the route behaves normally)::

    with LocalServer() as srv:
        srv.add("/a.jpg", jpeg_bytes, content_type="image/jpeg")
        srv.add("/gone.jpg", b"", status=404)
        srv.add("/flaky.jpg", jpeg_bytes, faults=[Fault(status=500)] * 2)
        srv.add("/busy.jpg", jpeg_bytes, faults=[Fault(status=429, headers={"Retry-After": "1"})])
        srv.add("/cut.jpg", jpeg_bytes, truncate=100)      # Content-Length says more
        srv.add("/slow.jpg", jpeg_bytes, delay=5.0)        # before the headers
        srv.add("/moved", b"", redirect="/a.jpg")
        url = srv.url("/a.jpg"); ...; srv.count("/a.jpg")

Also: a global ``latency`` (seconds slept before every response, for
benchmarks), a slow body (``drip=(chunk_bytes, seconds_per_chunk)``), HTTP
``Range`` requests on 200 responses (206 / 416, with ``Accept-Ranges`` and an
``ETag``), ``HEAD``, HTTP/1.1 keep-alive, and per-path request counts and
times plus a log of (method, path, Range header) for assertions.

A pytest fixture ``local_server`` is provided; import it into a test module
(``from local_server import local_server``) to use it.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.1"

_CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".html": "text/html; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".json": "application/json",
}

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")  # to unset in tests


@dataclass
class Fault:
    """One injected behaviour; ``None`` fields fall back to the route's own."""

    status: int | None = None
    headers: dict | None = None
    body: bytes | None = None
    delay: float | None = None
    truncate: int | None = None
    redirect: str | None = None
    drop: bool = False  # close the connection without any response


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "application/octet-stream"
    headers: dict = field(default_factory=dict)
    delay: float = 0.0  # seconds before the response headers
    truncate: int | None = None  # send only this many body bytes, then close
    redirect: str | None = None  # answer 302 (or ``status`` if 3xx) to this location
    drip: tuple[int, float] | None = None  # (chunk bytes, seconds per chunk)
    faults: list = field(default_factory=list)  # consumed one per request


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address) -> None:
        """Clients that hang up (timeouts, kills) are normal here: stay quiet."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class LocalServer:
    """Threaded HTTP server on 127.0.0.1:<ephemeral>; use as a context manager."""

    def __init__(
        self, directory: str | os.PathLike | None = None, latency: float = 0.0, drip: tuple[int, float] | None = None
    ):
        self.directory = Path(directory) if directory is not None else None
        self.latency = latency
        self.drip = drip
        self.routes: dict[str, Route] = {}
        self.counts: Counter = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)  # time.monotonic() per request
        self.log: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- routes -----------------------------------------------------------
    def add(self, path: str, body: bytes = b"", **kw) -> Route:
        """Serve ``body`` at ``path`` (query string ignored when matching)."""
        if not path.startswith("/"):
            path = "/" + path
        if "content_type" not in kw:
            kw["content_type"] = _CONTENT_TYPES.get(os.path.splitext(path)[1].lower(), "application/octet-stream")
        kw["faults"] = list(kw.get("faults", []))
        route = Route(body=body, **kw)
        with self._lock:
            self.routes[path] = route
        return route

    def remove(self, path: str) -> None:
        with self._lock:
            self.routes.pop(path, None)

    # -- addresses and counters --------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def count(self, path: str) -> int:
        with self._lock:
            return self.counts[path]

    @property
    def total_requests(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.times.clear()
            self.log.clear()

    # -- lifecycle --------------------------------------------------------
    def start(self) -> LocalServer:
        self._stop.clear()
        self._httpd = _Server((HOST, 0), _make_handler(self))
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="local-http-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes handlers sleeping in a delay
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request handling (called from handler threads) --------------------
    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server stops; False when it stopped."""
        return not self._stop.wait(seconds) if seconds > 0 else True

    def _resolve(self, path: str) -> tuple[Route | None, Fault | None]:
        with self._lock:
            self.counts[path] += 1
            self.times[path].append(time.monotonic())
            route = self.routes.get(path)
            fault = route.faults.pop(0) if route is not None and route.faults else None
        if route is None and self.directory is not None:
            rel = urllib.parse.unquote(path).lstrip("/")
            target = (self.directory / rel).resolve()
            root = self.directory.resolve()
            if (target == root or root in target.parents) and target.is_file():
                route = Route(
                    body=target.read_bytes(),
                    content_type=_CONTENT_TYPES.get(target.suffix.lower(), "application/octet-stream"),
                )
        return route, fault


def _make_handler(server: LocalServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        server_version = "LocalTestServer/1"

        def setup(self) -> None:
            super().setup()
            # headers and body are separate writes: without this, Nagle + delayed
            # ACK add ~40 ms to every keep-alive response
            try:
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            path = urllib.parse.urlsplit(self.path).path
            rng = self.headers.get("Range")
            with server._lock:
                server.log.append((self.command, path, rng))
            route, fault = server._resolve(path)
            if not server._sleep(server.latency):
                return
            if route is None:
                self._send_simple(404, b"not found\n", "text/plain", head)
                return
            f = fault or Fault()
            pick = lambda name: getattr(f, name) if getattr(f, name) is not None else getattr(route, name)
            if f.drop:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if not server._sleep(pick("delay")):
                return
            status = pick("status")
            headers = dict(route.headers)
            headers.update(f.headers or {})
            redirect = pick("redirect")
            if redirect is not None:
                location = redirect if "://" in redirect else server.url(redirect)
                code = status if 300 <= status < 400 else 302
                headers["Location"] = location
                self._send_simple(code, b"", "text/plain", head, headers)
                return
            body = f.body if f.body is not None else route.body
            ctype = route.content_type if f.body is None else "text/html; charset=utf-8"
            if fault is not None and fault.status is not None and fault.body is None:
                body, ctype = f"error {status}\n".encode(), "text/plain"
            truncate = pick("truncate")
            if status == 200 and truncate is None:
                self._send_ranged(body, ctype, headers, head, route.drip or server.drip)
                return
            self._send_body(status, body, ctype, headers, head, truncate, route.drip or server.drip)

        # -- helpers ------------------------------------------------------
        def _send_simple(self, status, body, ctype, head, headers=None) -> None:
            self._send_body(status, body, ctype, headers or {}, head, None, None)

        def _send_ranged(self, body, ctype, headers, head, drip) -> None:
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            headers = {"Accept-Ranges": "bytes", "ETag": etag, **headers}
            rng = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if rng and (if_range is None or if_range == etag):
                span = _parse_range(rng, len(body))
                if span == "bad":
                    headers["Content-Range"] = f"bytes */{len(body)}"
                    self._send_body(416, b"", ctype, headers, head, None, None)
                    return
                if span is not None:
                    start, end = span
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
                    self._send_body(206, body[start : end + 1], ctype, headers, head, None, drip)
                    return
            self._send_body(200, body, ctype, headers, head, None, drip)

        def _send_body(self, status, body, ctype, headers, head, truncate, drip) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, str(v))
                if truncate is not None:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if head:
                    return
                payload = body if truncate is None else body[:truncate]
                if drip:
                    size, pause = drip
                    for i in range(0, len(payload), max(1, size)):
                        self.wfile.write(payload[i : i + size])
                        self.wfile.flush()
                        if not server._sleep(pause):
                            self.close_connection = True
                            return
                else:
                    self.wfile.write(payload)
                self.wfile.flush()
                if truncate is not None:
                    self.connection.shutdown(socket.SHUT_RDWR)
            except (BrokenPipeError, ConnectionResetError, OSError):
                self.close_connection = True

    return Handler


_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _parse_range(header: str, size: int):
    """(start, end) inclusive for a single byte range, None to ignore, 'bad' for 416."""
    m = _RANGE_RE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # multi-range or malformed: serve the whole body
    first, last = m.group(1), m.group(2)
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if start >= size or (last and int(last) < start):
            return "bad"
    else:
        n = int(last)
        if n == 0:
            return "bad"
        start, end = max(0, size - n), size - 1
    return start, end


try:  # the fixture is optional: the module is also used outside pytest (bench/)
    import pytest

    @pytest.fixture
    def local_server():
        with LocalServer() as srv:
            yield srv
except ImportError:  # pragma: no cover
    pass
