"""What went wrong with a request: a short kind (``classify_exception``) for counts and the
manifest, and one line (``root_cause``) for the user."""

from __future__ import annotations

import requests.exceptions as req
import urllib3.exceptions as u3

from .http import BlockedAddressError, DeadlineExceeded

# the first kind whose types (or words) appear in the exception's chain; "connection"
# comes before "timeout" because urllib3's NewConnectionError derives from ConnectTimeoutError
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


def exception_chain(exc: BaseException):
    """``exc`` and everything it wraps (causes, contexts, urllib3 ``reason``s and
    exceptions passed as arguments), each once."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([e.__cause__, e.__context__, getattr(e, "reason", None)])
        stack.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))


def classify_exception(exc: BaseException) -> str:
    """deadline, blocked_address, redirects, bad_url, truncated, ssl, connection (refused,
    reset, unresolvable), timeout or os_error (else the exception's type name)."""
    chain = list(exception_chain(exc))
    for kind, types, words in KINDS:
        if any(isinstance(e, types) or (words and words in str(e).lower()) for e in chain):
            return kind
    return type(exc).__name__


def root_cause(exc: BaseException, limit: int = 160) -> str:
    """One line for the most specific cause of ``exc``, e.g. 'connection refused',
    'ReadTimeoutError: Read timed out.'."""
    chain = list(exception_chain(exc))
    ours = [e for e in chain if isinstance(e, (BlockedAddressError, DeadlineExceeded))]
    if ours:
        return str(ours[0])
    if any(isinstance(e, ConnectionRefusedError) or "connection refused" in str(e).lower() for e in chain):
        return "connection refused"
    short = [e for e in chain if isinstance(e, u3.IncompleteRead)]
    inner = [e for e in chain if isinstance(e, u3.HTTPError) and not isinstance(e, u3.MaxRetryError)]
    oserr = [e for e in chain if isinstance(e, OSError) and not isinstance(e, req.RequestException)]
    inner = (short or inner or oserr[-1:] or [exc])[0]
    text = str(inner).splitlines()[0] if str(inner) else ""
    if "): " in text and "Pool(" in text:  # drop "HTTPConnectionPool(host=..., port=...): "
        text = text.split("): ", 1)[1]
    text = f"{type(inner).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
