"""``sandbox.pty``: Start with ``pty`` (``/bin/bash -i -l``), input through
SendInput/StreamInput ``pty`` bytes, Update (resize), SendSignal."""

from __future__ import annotations

import threading
import time

import pytest
from e2b import CommandExitException, PtySize, Sandbox


class Screen:
    """Collects a PTY's output on a thread (``handle.wait(on_pty=…)``)."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.buf = bytearray()
        self.lock = threading.Lock()
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.handle.wait(on_pty=self._on)
        except Exception as exc:  # noqa: BLE001
            self.result = exc

    def _on(self, data: bytes) -> None:
        with self.lock:
            self.buf += data

    def text(self) -> str:
        with self.lock:
            return self.buf.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return self.text()
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not seen on the PTY within {timeout}s:\n{self.text()[-2000:]}")


def test_pty_session(sandbox: Sandbox) -> None:
    h = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=0)
    screen = Screen(h)
    sandbox.pty.send_stdin(h.pid, b"echo $TERM $((6*7)); tty; whoami\n")
    text = screen.wait_for("xterm-256color 42")
    screen.wait_for("/dev/pts/")
    screen.wait_for("user")
    assert "xterm-256color 42" in text

    sandbox.pty.send_stdin(h.pid, b"stty size\n")
    screen.wait_for("24 80")
    sandbox.pty.resize(h.pid, PtySize(rows=40, cols=120))
    sandbox.pty.send_stdin(h.pid, b"stty size\n")
    screen.wait_for("40 120")

    sandbox.pty.send_stdin(h.pid, b"exit 0\n")
    screen.thread.join(20)
    assert not screen.thread.is_alive()
    assert getattr(screen.result, "exit_code", None) == 0, screen.result


def test_pty_stream_input_and_kill(sandbox: Sandbox) -> None:
    h = sandbox.pty.create(PtySize(rows=24, cols=80), user="root", cwd="/tmp", envs={"X": "y"}, timeout=0)
    screen = Screen(h)
    sandbox.pty.stream_input(h.pid, [b"echo $X-", b"$(pwd)-$(whoami)\n"])
    screen.wait_for("y-/tmp-root")
    assert sandbox.pty.kill(h.pid) is True
    screen.thread.join(20)
    assert isinstance(screen.result, CommandExitException), screen.result
    assert sandbox.pty.kill(h.pid) is False


def test_pty_reconnect(sandbox: Sandbox) -> None:
    h = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=0)
    h.disconnect()
    again = sandbox.pty.connect(h.pid, timeout=0)
    screen = Screen(again)
    sandbox.pty.send_stdin(h.pid, b"echo re$((1+1))connected\n")
    screen.wait_for("re2connected")
    sandbox.pty.send_stdin(h.pid, b"exit\n")
    screen.thread.join(20)


async def test_async_pty(async_sandbox) -> None:
    seen = bytearray()
    h = await async_sandbox.pty.create(PtySize(rows=24, cols=80), on_data=seen.extend, timeout=0)
    await async_sandbox.pty.send_stdin(h.pid, b"echo async-$((2+3))\nexit\n")
    r = await h.wait()
    assert r.exit_code == 0
    assert b"async-5" in bytes(seen)


@pytest.mark.parametrize("size", [PtySize(rows=1, cols=1), PtySize(rows=500, cols=500)])
def test_pty_sizes(sandbox: Sandbox, size: PtySize) -> None:
    h = sandbox.pty.create(size, timeout=30)
    screen = Screen(h)
    sandbox.pty.send_stdin(h.pid, b"stty size; exit\n")
    screen.thread.join(30)
    assert f"{size.rows} {size.cols}" in screen.text()
