"""HTTP GETs for the build side: one shared urllib3 pool, bounded parallelism, retries.

Every download the build makes by itself goes through here: keep-alive connections (at most
`MAX_PARALLEL` per host), retries that honour `Retry-After` (up to `MAX_RETRY_AFTER`), bodies
streamed per attempt so memory stays flat. See docs/design/bundle-format.md, "Downloads".
"""

from __future__ import annotations

import functools
import netrc
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urljoin

import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError, ProtocolError
from urllib3.util import Retry, Timeout, parse_url

from bundler import redact
from bundler.errors import BuildError
from bundler.fsutil import CHUNK

MAX_PARALLEL = 8
ATTEMPTS = 4  # tries in all, the first included
BACKOFF = 0.5  # seconds before the second try, doubling (when no Retry-After)
MAX_RETRY_AFTER = 120.0
TIMEOUT = Timeout(connect=15.0, read=60.0)
USER_AGENT = "bundler"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_REDIRECTS = 10

T = TypeVar("T")
OnRetry = Callable[[int, str, float], None]  # (attempt about to start, why, seconds waited)


class NotFound(Exception):
    """404 / 410: the resource is not there (callers may try another URL)."""


class HttpFailed(Exception):
    """The GET failed for good: a status no retry fixes, or retries exhausted."""

    def __init__(self, message: str, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.attempts = attempts


class _Cut(Exception):
    """The body stopped short (reset, timeout, truncated): worth another try."""


_lock = threading.Lock()
_managers: dict[str | None, urllib3.PoolManager] = {}


def _manager(url: str) -> urllib3.PoolManager:
    parsed = parse_url(url)
    proxy = None
    proxies = urllib.request.getproxies()
    if parsed.scheme in proxies and not urllib.request.proxy_bypass(parsed.host or ""):
        proxy = proxies[parsed.scheme]
    with _lock:
        manager = _managers.get(proxy)
        if manager is None:
            headers = {"User-Agent": USER_AGENT}
            manager = (urllib3.ProxyManager(proxy, num_pools=32, maxsize=MAX_PARALLEL,
                                            block=True, headers=headers)
                       if proxy else
                       urllib3.PoolManager(num_pools=32, maxsize=MAX_PARALLEL, block=True,
                                           headers=headers))
            _managers[proxy] = manager
        return manager


def _retry_policy() -> Retry:
    return Retry(total=ATTEMPTS - 1, connect=ATTEMPTS - 1, read=ATTEMPTS - 1,
                 status=ATTEMPTS - 1, other=0, backoff_factor=BACKOFF,
                 status_forcelist=RETRY_STATUS, allowed_methods=frozenset({"GET"}),
                 respect_retry_after_header=True, raise_on_status=False)


# per request: follow redirects (Authorization dropped to another host), retry nothing else
# (the loop in `stream` does, honouring Retry-After). `retries=False` or `total=False` would
# hand back the 3xx response itself.
_FOLLOW = Retry(total=MAX_REDIRECTS, connect=0, read=0, status=0, other=0,
                redirect=MAX_REDIRECTS, status_forcelist=(), respect_retry_after_header=False)


def _auth_headers(url: str) -> dict[str, str]:
    """Basic auth from the URL's user:password, else from the netrc file's entry for its
    host ($NETRC, default ~/.netrc), as pip reads it for a private index."""
    parsed = parse_url(url)
    auth = parsed.auth or _netrc_auth(parsed.host or "")
    return dict(urllib3.make_headers(basic_auth=auth)) if auth else {}


@functools.cache
def _netrc() -> netrc.netrc | None:
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path)
    except (OSError, netrc.NetrcParseError):
        # missing, unreadable or malformed: no credentials, as pip (requests) treats it; a
        # server that wants them answers 401, and that error names the way to give them
        return None


def _netrc_auth(host: str) -> str | None:
    entries = _netrc() if host else None
    found = entries.authenticators(host) if entries is not None else None
    if found is None:
        return None
    login, _account, password = found
    redact.remember(password)
    return f"{login}:{password or ''}"


def stream(url: str, consume: Callable[[Iterator[bytes]], T], *, accept: str = "*/*",
           on_retry: OnRetry | None = None,
           on_length: Callable[[int | None], None] | None = None,
           on_response: Callable[[str, str], None] | None = None,
           compressed: bool = False) -> T:
    """GET `url` and return `consume(chunks)`; `consume` runs once per attempt and must not
    keep anything from a failed one (a retry starts the body from the beginning).
    `on_response(final_url, content_type)` runs before it (the URL after redirects: what a
    page's relative links are relative to). `compressed`: accept a gzip'ed body (decoded
    here), for text documents: PyPI's JSON page of a big project shrinks about tenfold.

    Raises NotFound (404/410) or HttpFailed (anything else, after the retries)."""
    retry = _retry_policy()
    attempt = 1
    headers = {"Accept": accept, **_auth_headers(url)}
    if compressed:
        headers["Accept-Encoding"] = "gzip"
    while True:
        why: str
        response: urllib3.BaseHTTPResponse | None = None
        reusable = False  # the body was read to its end: the connection can serve again
        try:
            response = _manager(url).request("GET", url, headers=headers, retries=_FOLLOW,
                                             timeout=TIMEOUT, preload_content=False)
            status = response.status
            if status in (404, 410):
                reusable = True
                raise NotFound(url)
            if status in RETRY_STATUS:
                why = f"HTTP {status}"
                reusable = True
            elif status >= 400:
                reusable = True
                wants = (" (the server wants credentials: give them in the URL as "
                         "user:token@host, or in ~/.netrc)"
                         if status in (401, 403) and "Authorization" not in headers else "")
                raise HttpFailed(f"GET {url} failed: HTTP {status} {response.reason or ''}"
                                 .rstrip() + wants, status, attempt)
            else:
                if on_length is not None:
                    length = response.headers.get("Content-Length")
                    on_length(int(length) if length and length.isdigit() else None)
                if on_response is not None:
                    # urllib3 gives the path requested, or the last redirect's Location
                    on_response(urljoin(url, response.url or ""),
                                response.headers.get("Content-Type", ""))
                try:
                    result = consume(_chunks(response))
                except _Cut as cut:
                    why = str(cut)
                else:
                    reusable = True
                    return result
        except HTTPError as exc:  # could not connect, or the connection broke
            cause: BaseException = exc.reason if isinstance(exc, MaxRetryError) and \
                exc.reason is not None else exc  # _FOLLOW wraps it
            why = f"{type(cause).__name__}: {cause}"
        except OSError as exc:
            why = f"{type(exc).__name__}: {exc}"
        finally:
            if response is not None:
                _done_with(response, reusable)
        # one more try, if the policy allows it, after the wait it (or Retry-After) asks for
        if response is not None and response.status not in RETRY_STATUS:
            response = None  # the body broke off: a read error, not a status to retry
        try:
            retry = retry.increment("GET", url, response=response,
                                    error=None if response is not None else _Transient(why))
        except MaxRetryError:
            raise HttpFailed(f"GET {url} failed after {attempt} attempt(s): {why}",
                             response.status if response is not None else None,
                             attempt) from None
        wait = retry.get_retry_after(response) if response is not None else None
        if wait is not None and wait > MAX_RETRY_AFTER:
            raise HttpFailed(f"GET {url}: the server asks to retry after {wait:.0f}s "
                             f"({why}); not waiting that long", response.status
                             if response is not None else None, attempt)
        started = time.monotonic()
        retry.sleep(response)  # Retry-After when given, else backoff
        attempt += 1
        if on_retry is not None:
            on_retry(attempt, why, time.monotonic() - started)


class _Transient(ProtocolError):
    """What a failed attempt is handed to Retry.increment as (a read error: retried)."""


def _done_with(response: urllib3.BaseHTTPResponse, reusable: bool) -> None:
    """Back to the pool when the body was read (or is small), else close the connection.
    Either way its slot goes back: the pool blocks at MAX_PARALLEL, so a connection closed
    but not released would be lost for good, and enough of them stall every download."""
    try:
        if reusable:
            response.drain_conn()  # nothing left after a full read; an error page is small
        else:
            response.close()
    except (HTTPError, OSError):
        response.close()
    finally:
        response.release_conn()  # a closed one is replaced when next taken


def _chunks(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    try:
        yield from response.stream(CHUNK, decode_content=True)
    except (HTTPError, OSError) as exc:  # reset, IncompleteRead, read timeout
        raise _Cut(f"{type(exc).__name__}: {exc}") from None


def get_bytes(url: str, *, accept: str = "*/*", limit: int = 64 * 1024 * 1024,
              on_retry: OnRetry | None = None) -> bytes:
    """A small document (a packument, an index page), whole; at most `limit` bytes."""
    return stream(url, _whole(url, limit), accept=accept, on_retry=on_retry)


def _whole(url: str, limit: int) -> Callable[[Iterator[bytes]], bytes]:
    def read(chunks: Iterator[bytes]) -> bytes:
        out = bytearray()
        for chunk in chunks:
            out += chunk
            if len(out) > limit:
                raise HttpFailed(f"GET {url}: more than {limit} bytes")
        return bytes(out)
    return read


@dataclass(frozen=True)
class Page:
    """A small document with what is needed to read it: its type and its URL after
    redirects."""

    body: bytes
    content_type: str
    url: str


def get_page(url: str, *, accept: str, limit: int = 64 * 1024 * 1024,
             on_retry: OnRetry | None = None) -> Page:
    """Like get_bytes, with the Content-Type and the final URL."""
    seen: list[tuple[str, str]] = []
    body = stream(url, _whole(url, limit), accept=accept, on_retry=on_retry, compressed=True,
                  on_response=lambda final, ctype: seen.append((final, ctype)))
    final, ctype = seen[-1]
    return Page(body, ctype, final)


def wait_in_order(futures: Mapping[Future[Any], int]) -> None:
    """Wait for parallel downloads. At the first failure, cancel those not begun, wait for
    those running, and raise the failure of the lowest index (input order, so the same error
    whichever finished first), a BuildError noting how many more failed."""
    _done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    if not any(f.done() and not f.cancelled() and f.exception() is not None for f in futures):
        return
    for f in pending:
        f.cancel()
    wait(pending)
    failed = [f for f in futures if not f.cancelled() and f.exception() is not None]
    exc = min(failed, key=futures.__getitem__).exception()
    assert exc is not None
    if isinstance(exc, BuildError) and len(failed) > 1:
        raise BuildError(f"{exc.message} (and {len(failed) - 1} more failed)",
                         exc.hint) from None
    raise exc
