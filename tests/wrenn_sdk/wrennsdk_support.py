"""Helpers shared by the wrenn SDK suite (imported by the test modules).

Nothing here talks to the SDK's private API: these are deadlines around
blocking iterators, a raw-socket HTTP client for bodies that a server may
refuse half-way, a resolver shim for ``*.localhost`` proxy hosts, and small
value helpers.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import random
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

# --------------------------------------------------------------------------- #
# IDs and names
# --------------------------------------------------------------------------- #

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
SAFE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")


def base36_25(n: int) -> str:
    out = []
    while n:
        n, r = divmod(n, 36)
        out.append(_B36[r])
    return "".join(reversed(out)).rjust(25, "0")


def unknown_capsule_id() -> str:
    """A well-formed capsule ID (``cl-`` + 25 base36 of a v4 UUID) that no
    capsule has: the server must answer 404, not 400."""
    return "cl-" + base36_25(uuid.uuid4().int)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- #
# Error bodies
# --------------------------------------------------------------------------- #


def assert_error_body(
    resp: httpx.Response | "RawResponse",
    status: int | tuple[int, ...] | None = None,
    code: str | None = None,
) -> dict:
    """The response is a wrenn error: never a 500, JSON
    ``{"error":{"code":str,"message":str}}``; optionally a given status/code."""
    text = resp.text
    assert resp.status_code != 500, f"server answered 500: {text[:500]}"
    assert resp.status_code >= 400, f"expected an error, got {resp.status_code}: {text[:500]}"
    if status is not None:
        allowed = status if isinstance(status, tuple) else (status,)
        assert resp.status_code in allowed, (
            f"expected status {allowed}, got {resp.status_code}: {text[:500]}"
        )
    ctype = resp.headers.get("content-type", "")
    assert ctype.startswith("application/json"), (
        f"error body must be JSON, got content-type {ctype!r}: {text[:500]}"
    )
    body = resp.json()
    assert isinstance(body, dict), body
    err = body.get("error")
    assert isinstance(err, dict), f"no error object: {body}"
    assert isinstance(err.get("code"), str) and err["code"], f"bad error.code: {body}"
    assert isinstance(err.get("message"), str), f"bad error.message: {body}"
    if code is not None:
        assert err["code"] == code, f"expected code {code!r}, got {body}"
    return body


# --------------------------------------------------------------------------- #
# Deadlines around blocking iterators (SSE streams, WebSocket streams, PTYs)
# --------------------------------------------------------------------------- #

_END = object()


class Collector:
    """Iterate a blocking iterable in a daemon thread; read with deadlines.

    ``items`` grows as events arrive; ``done`` is set when the iterable ends
    (``error`` holds what it raised, if anything). The main thread never
    blocks without a timeout, so a server that stops talking fails the test
    with a message instead of hanging it.
    """

    def __init__(self, iterable_factory: Callable[[], Iterable[Any]], name: str = "collector"):
        self.items: list[Any] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._cond = threading.Condition()
        self._factory = iterable_factory
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._factory():
                with self._cond:
                    self.items.append(item)
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
        finally:
            self.done.set()
            with self._cond:
                self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[Any]], Any], timeout: float, what: str = "") -> Any:
        """Wait until ``pred(items)`` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = pred(self.items)
                if value:
                    return value
                if self.done.is_set():
                    raise AssertionError(
                        f"stream ended before {what or pred}: error={self.error!r}, "
                        f"items={self._summary()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout}s waiting for {what or pred}; "
                        f"items={self._summary()}"
                    )
                self._cond.wait(min(left, 0.5))

    def wait_done(self, timeout: float, what: str = "the stream to end") -> list[Any]:
        if not self.done.wait(timeout):
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; items={self._summary()}"
            )
        return list(self.items)

    def _summary(self) -> str:
        out = []
        for it in self.items[-20:]:
            d = getattr(it, "__dict__", None) or {
                s: getattr(it, s, None) for s in getattr(type(it), "__slots__", ())
            }
            out.append(f"{type(it).__name__}({d or it!r})")
        return "[" + ", ".join(out) + "]"


def drain(iterable_factory: Callable[[], Iterable[Any]], timeout: float, what: str = "") -> list[Any]:
    """Run an iterable to its end within ``timeout``; re-raise what it raised."""
    col = Collector(iterable_factory)
    items = col.wait_done(timeout, what or "the stream to end")
    if col.error is not None:
        raise col.error
    return items


class PtyReader:
    """Collects a sync ``PtySession``'s events in a daemon thread.

    ``output`` is every output byte so far; ``events`` every event.
    """

    def __init__(self, session: Any):
        self.session = session
        self.col = Collector(lambda: session, name="pty-reader")

    @property
    def events(self) -> list[Any]:
        return list(self.col.items)

    @property
    def output(self) -> bytes:
        return b"".join(
            e.data for e in self.col.items if e.type == "output" and isinstance(e.data, bytes)
        )

    def wait_output(self, needle: bytes, timeout: float = 20.0) -> bytes:
        self.col.wait_for(
            lambda items: needle
            in b"".join(e.data for e in items if e.type == "output" and isinstance(e.data, bytes)),
            timeout,
            what=f"PTY output {needle!r}",
        )
        return self.output

    def wait_event(self, type_: str, timeout: float = 20.0) -> Any:
        return self.col.wait_for(
            lambda items: next((e for e in items if e.type == type_), None),
            timeout,
            what=f"a PTY {type_!r} event",
        )


# --------------------------------------------------------------------------- #
# Deterministic large data, generated chunk by chunk
# --------------------------------------------------------------------------- #


@dataclass
class StreamedData:
    """``size`` pseudo-random bytes produced in ``chunk``-sized pieces; the
    SHA-256 of everything yielded so far accumulates in ``sha``."""

    size: int
    chunk: int = 1 << 20
    seed: int = 1234
    sha: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    produced: int = 0

    def __iter__(self) -> Iterator[bytes]:
        rng = random.Random(self.seed)
        left = self.size
        while left > 0:
            n = min(self.chunk, left)
            block = rng.randbytes(n)
            self.sha.update(block)
            self.produced += n
            left -= n
            yield block

    async def aiter(self):
        for block in self:
            yield block


# --------------------------------------------------------------------------- #
# A raw HTTP/1.1 client for bodies the server may refuse before reading them
# --------------------------------------------------------------------------- #


@dataclass
class RawResponse:
    status_code: int
    headers: dict[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        import json

        return json.loads(self.content)


def raw_request(
    base_url: str,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Iterable[bytes],
    content_length: int | None,
    timeout: float = 120.0,
    chunked_end: bytes = b"0\r\n\r\n",
) -> RawResponse:
    """Send a request over a plain socket, stopping the upload as soon as the
    server answers (a server may reply 413 and close without draining the
    body; httpx would then only see a broken pipe). A chunked body ends
    with ``chunked_end`` (something else than the last chunk breaks it)."""
    u = urlsplit(base_url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        for k, v in headers.items():
            head.append(f"{k}: {v}")
        chunked = content_length is None
        head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {content_length}")
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            for piece in body:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break  # the server has answered already
                if chunked:
                    sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                else:
                    sock.sendall(piece)
            else:
                if chunked:
                    sock.sendall(chunked_end)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed: read what it said
        resp = http.client.HTTPResponse(sock, method=method)
        try:
            resp.begin()
        except (ConnectionResetError, http.client.RemoteDisconnected) as exc:
            raise AssertionError(
                f"{method} {path}: the server dropped the connection without an HTTP answer: {exc!r}"
            ) from exc
        try:
            content = resp.read()
        except (ConnectionResetError, http.client.IncompleteRead) as exc:
            content = getattr(exc, "partial", b"") or b""
        return RawResponse(
            status_code=resp.status,
            headers={k.lower(): v for k, v in resp.getheaders()},
            content=content,
        )
    finally:
        sock.close()


def repeat_bytes(total: int, chunk: int = 256 * 1024, fill: bytes = b"a") -> Iterator[bytes]:
    block = fill * chunk
    left = total
    while left > 0:
        n = min(chunk, left)
        yield block[:n]
        left -= n


# --------------------------------------------------------------------------- #
# *.localhost resolution for the subdomain port proxy
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def wildcard_localhost() -> Iterator[None]:
    """Resolve ``*.localhost`` and ``*.127.0.0.1`` to 127.0.0.1 in this process.

    The SDK builds proxy URLs like ``http://8888-cl-….localhost:PORT``; glibc
    does not resolve subdomains of localhost, a browser or curl would. This
    patches ``socket.getaddrinfo`` (used by httpx's sync and anyio's async
    connect paths) for the duration; the SDK itself is untouched.
    """
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        h = host.decode() if isinstance(host, bytes) else host
        if isinstance(h, str) and (h.endswith(".localhost") or h.endswith(".127.0.0.1")):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    socket.getaddrinfo = fake
    try:
        yield
    finally:
        socket.getaddrinfo = real


# --------------------------------------------------------------------------- #
# Polling
# --------------------------------------------------------------------------- #


def poll(fn: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "") -> Any:
    """Call ``fn`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}: last={last!r}")
        time.sleep(interval)



# --------------------------------------------------------------------------- #
# Builds
# --------------------------------------------------------------------------- #


def start_build_raw(base_url: str, api_key: str, body: dict) -> socket.socket:
    """``POST /v1/admin/builds`` on a socket of its own whose answer is not
    read: closing the socket is a client hanging up mid-build."""
    import json

    u = urlsplit(base_url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(
        f"POST /v1/admin/builds HTTP/1.1\r\nHost: {host}:{port}\r\nX-API-Key: {api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    return sock


def sleep_marker() -> str:
    """A number of seconds unlikely to be slept by anything else here."""
    return str(86000 + random.randrange(400))


def sleepers(marker: str) -> list[int]:
    """PIDs of ``sleep <marker>`` processes on this machine (in capsules too)."""
    import subprocess

    r = subprocess.run(["pgrep", "-f", f"^sleep {marker}$"], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]
