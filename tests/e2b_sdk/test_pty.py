"""``sandbox.pty`` through the sync SDK: Start with a PTY, SendInput (pty),
Update (resize), SendSignal, Connect."""

from __future__ import annotations

import pytest

from e2b import CommandExitException, PtySize, Sandbox

from e2bsdk_support import UNKNOWN_PID, PtyReader, pgrep, stty_size_line, wait_until


def test_pty_size_input_and_resize(sandbox: Sandbox):
    size = PtySize(rows=24, cols=80)
    terminal = sandbox.pty.create(size, timeout=60)
    reader = PtyReader(terminal)
    try:
        sandbox.pty.send_stdin(terminal.pid, b"stty size\n")
        reader.expect(stty_size_line(size))

        bigger = PtySize(rows=30, cols=100)
        sandbox.pty.resize(terminal.pid, bigger)
        sandbox.pty.send_stdin(terminal.pid, b"stty size\n")
        reader.expect(stty_size_line(bigger))

        sandbox.pty.send_stdin(terminal.pid, b"exit\n")
        reader.join()
        assert reader.error is None
        assert reader.result is not None and reader.result.exit_code == 0
    finally:
        sandbox.pty.kill(terminal.pid)


def test_pty_output_is_a_terminal_with_envs_and_cwd(sandbox: Sandbox, workdir: str):
    terminal = sandbox.pty.create(
        PtySize(rows=24, cols=80),
        cwd=workdir,
        envs={"E2BSDK_PTY": "yes"},
        timeout=60,
    )
    reader = PtyReader(terminal)
    try:
        # `$((6*7))` is echoed as typed; only the shell's output shows 42.
        sandbox.pty.send_stdin(
            terminal.pid,
            b'[ -t 1 ] && echo "tty-$((6*7)):$PWD:$E2BSDK_PTY:$TERM"\n',
        )
        reader.expect(f"tty-42:{workdir}:yes:xterm-256color".encode())
    finally:
        sandbox.pty.kill(terminal.pid)


def test_pty_kill(sandbox: Sandbox):
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=60)
    reader = PtyReader(terminal)

    assert sandbox.pty.kill(terminal.pid) is True

    reader.join()
    assert isinstance(reader.error, CommandExitException)
    assert reader.error.exit_code == -1


def test_pty_kill_unknown_pid_returns_false(sandbox: Sandbox):
    assert sandbox.pty.kill(UNKNOWN_PID) is False


def test_pty_connect_receives_output(sandbox: Sandbox):
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=60)
    try:
        terminal.disconnect()
        connected = sandbox.pty.connect(terminal.pid, timeout=60)
        assert connected.pid == terminal.pid
        reader = PtyReader(connected)

        sandbox.pty.send_stdin(terminal.pid, b"echo conn-$((40+2))\n")
        reader.expect(b"conn-42")
    finally:
        sandbox.pty.kill(terminal.pid)


def test_pty_binary_input_ctrl_c_interrupts(sandbox: Sandbox):
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=60)
    reader = PtyReader(terminal)
    try:
        sandbox.pty.send_stdin(terminal.pid, b"sleep 31.5\n")
        # ^C must reach `sleep`, not the shell still starting up: wait for it.
        wait_until(lambda: pgrep(sandbox, "sleep 31[.]5"), "sleep to start")
        sandbox.pty.send_stdin(terminal.pid, b"\x03")  # ^C through the line discipline
        sandbox.pty.send_stdin(terminal.pid, b"echo after-$((1+1))\n")
        reader.expect(b"after-2", timeout=10)
    finally:
        sandbox.pty.kill(terminal.pid)


@pytest.mark.parametrize("rows,cols", [(10, 40), (50, 200)])
def test_pty_created_with_size(sandbox: Sandbox, rows: int, cols: int):
    size = PtySize(rows=rows, cols=cols)
    terminal = sandbox.pty.create(size, timeout=60)
    reader = PtyReader(terminal)
    try:
        sandbox.pty.send_stdin(terminal.pid, b"stty size; exit\n")
        reader.expect(stty_size_line(size))
        reader.join()
        assert reader.result is not None and reader.result.exit_code == 0
    finally:
        sandbox.pty.kill(terminal.pid)
