"""A small client of a running server's operational HTTP endpoints (``GET /stats``, ``POST /api/publish``).

Standard library only (``urllib.request``), so the command line needs neither the native core nor a new
dependency. Every failure becomes an :class:`OpsError` whose message fits on one line: the command line prints it
after ``fastws: error:`` and exits 1.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

__all__ = ["DEFAULT_URL", "TIMEOUT", "OpsError", "normalize_url", "request_json"]

DEFAULT_URL = "http://127.0.0.1:9501"
TIMEOUT = 5.0  # seconds, for connecting and for each read

# Where the URL was chosen, for the hint after a failure.
_URL_HINT = "set --url or FASTWS_URL"
_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}


class OpsError(Exception):
    """A request to the server failed; the message is one line, without the ``fastws: error:`` prefix."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def normalize_url(url: str) -> str:
    """Return the server's base URL: ``http(s)://host:port`` without a trailing slash.

    ``ws://``/``wss://`` (the address clients use) become ``http://``/``https://``, and a bare ``host:port``
    gets ``http://``. Raises ValueError, with a one-line reason, for anything else.
    """
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"the URL {url!r} must start with http://, https://, ws:// or wss://")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    except ValueError:
        raise ValueError(f"the URL {url!r} has an invalid port") from None
    if not parts.hostname:
        raise ValueError(f"the URL {url!r} has no host")
    if parts.query or parts.fragment:
        raise ValueError(f"the URL {url!r} must not have a query or fragment: give only http://host:port")
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _opener(base_url: str) -> urllib.request.OpenerDirector:
    # The endpoints answer loopback clients only (without api_key), and a request relayed by a proxy is not
    # loopback: a local server is reached directly whatever http_proxy says. Remote ones follow the environment.
    host = urllib.parse.urlsplit(base_url).hostname or ""
    handlers = [urllib.request.ProxyHandler({})] if _is_loopback(host) else []
    return urllib.request.build_opener(*handlers)


def _reason(exc: BaseException) -> str:
    """Why a connection failed, in a few words."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"no answer within {TIMEOUT:g} s"
    if isinstance(exc, socket.gaierror):
        return f"unknown host: {exc.strerror or exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def _unreachable(base_url: str, reason: object) -> OpsError:
    words = _reason(reason) if isinstance(reason, BaseException) else str(reason)
    if isinstance(reason, ConnectionRefusedError):
        return OpsError(f"cannot reach {base_url} ({words}); is the server running? ({_URL_HINT})")
    return OpsError(f"cannot reach {base_url} ({words}); check the address ({_URL_HINT})")


def _error_message(body: bytes) -> str | None:
    """The ``error`` of a fastws JSON error answer, or None when the body is something else."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    error = document.get("error") if isinstance(document, dict) else None
    return " ".join(error.split()) if isinstance(error, str) and error else None


def request_json(base_url: str, path: str, *, api_key: str | None = None, body: bytes | None = None) -> Any:
    """Send a request (GET, or POST with a JSON ``body``) to ``base_url + path``; return the JSON answer.

    Raises OpsError when the server cannot be reached, answers an error, or answers something not JSON.
    """
    url = base_url + path
    headers = {"Accept": "application/json", "User-Agent": "fastws-cli"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with _opener(base_url).open(request, timeout=TIMEOUT) as response:
            status: int = response.status
            raw: bytes = response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            error = _error_message(exc.read())
        if error is None:
            raise OpsError(
                f"{url} answered HTTP {exc.code} {exc.reason}; is {base_url} a fastws server? ({_URL_HINT})", exc.code
            ) from None
        if exc.code == 404:  # a path after host:port, say a client's ws://host:port/ws
            raise OpsError(f"{url}: {error} (HTTP 404); give only http://host:port ({_URL_HINT})", 404) from None
        hint = "; set FASTWS_API_KEY or --api-key" if exc.code == 401 else ""
        raise OpsError(f"{error} (HTTP {exc.code}{hint})", exc.code) from None
    except urllib.error.URLError as exc:
        raise _unreachable(base_url, exc.reason) from None
    except (OSError, ValueError) as exc:  # a timeout or reset while reading, or a malformed answer
        raise _unreachable(base_url, exc) from None
    try:
        return json.loads(raw)
    except ValueError:
        raise OpsError(
            f"{url} answered HTTP {status} but not with JSON; is {base_url} a fastws server? ({_URL_HINT})", status
        ) from None
