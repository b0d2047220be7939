"""Helpers shared by the E2B SDK compatibility tests.

Everything that waits here is bounded: callers pass a timeout and get an
``AssertionError`` that says what was being waited for when it runs out.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Awaitable, Callable, Optional, TypeVar

from e2b import CommandResult, PtySize, Sandbox
from e2b.sandbox_sync.commands.command_handle import CommandHandle

T = TypeVar("T")

POLL_INTERVAL = 0.05
DEFAULT_WAIT = 15.0

# A pid no Linux system hands out (pid_max is at most 2**22).
UNKNOWN_PID = 2**30


def unique(prefix: str = "e2bsdk") -> str:
    """A name no other test (or earlier run) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def wait_until(
    probe: Callable[[], Optional[T]],
    what: str,
    timeout: float = DEFAULT_WAIT,
) -> T:
    """Call ``probe`` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_INTERVAL)


async def async_wait_until(
    probe: Callable[[], Awaitable[Optional[T]]],
    what: str,
    timeout: float = DEFAULT_WAIT,
) -> T:
    """Async twin of :func:`wait_until`; ``probe`` is a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL)


def pgrep(sandbox: Sandbox, pattern: str) -> str:
    """pids matching ``pattern`` (``pgrep -f``) inside the sandbox, as text.

    Write the pattern so that it does not match its own text (escape a dot or
    bracket a letter), or pgrep finds the shell that runs it.
    """
    return sandbox.commands.run(f"pgrep -f '{pattern}' || true").stdout.strip()


def command_pids(sandbox: Sandbox, needle: str) -> list[int]:
    """pids of envd-managed processes whose command line contains ``needle``."""
    return [
        p.pid
        for p in sandbox.commands.list()
        if needle in " ".join([p.cmd, *p.args])
    ]


class PtyReader:
    """Collects a sync PTY handle's output on a background thread.

    The sync SDK hands out PTY output only while someone iterates the handle
    (``handle.wait(on_pty=...)``), which blocks; this runs that loop on a
    thread so the test can type, resize and read at the same time.
    """

    def __init__(self, handle: CommandHandle):
        self._handle = handle
        self._cond = threading.Condition()
        self._buf = bytearray()
        self._pos = 0
        self._done = False
        self.result: Optional[CommandResult] = None
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._handle.wait(on_pty=self._on_data)
        except BaseException as e:  # surfaced to the test through .error
            self.error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _on_data(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            self._cond.notify_all()

    @property
    def output(self) -> bytes:
        with self._cond:
            return bytes(self._buf)

    def expect(self, needle: bytes, timeout: float = DEFAULT_WAIT) -> None:
        """Wait until ``needle`` appears after the previous match; consume it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                at = self._buf.find(needle, self._pos)
                if at >= 0:
                    self._pos = at + len(needle)
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._done:
                    raise AssertionError(
                        f"PTY output never showed {needle!r} "
                        f"(ended={self._done}, error={self.error!r}); "
                        f"got {bytes(self._buf[-2000:])!r}"
                    )
                self._cond.wait(remaining)

    def join(self, timeout: float = DEFAULT_WAIT) -> None:
        """Wait for the PTY stream to end."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"PTY stream still open after {timeout}s")


def stty_size_line(size: PtySize) -> bytes:
    """What ``stty size`` prints for ``size``."""
    return f"{size.rows} {size.cols}".encode()
