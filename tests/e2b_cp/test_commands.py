"""``sandbox.commands`` through the data plane (``E2B_SANDBOX_URL`` + the
``E2b-Sandbox-Id``/``E2b-Sandbox-Port: 49983`` headers + ``X-Access-Token``):
Connect-RPC ``process.Process`` (Start, Connect, List, SendInput,
StreamInput, CloseStdin, SendSignal) relayed to the capsule's envd."""

from __future__ import annotations

import threading
import time

import pytest
from e2b import (
    CommandExitException,
    CommandHandle,
    CommandResult,
    InvalidArgumentException,
    NotFoundException,
    Sandbox,
    TimeoutException,
)

from e2bcp_support import poll


def test_foreground(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("echo out; echo err >&2")
    assert isinstance(r, CommandResult)
    assert (r.stdout, r.stderr, r.exit_code, r.error) == ("out\n", "err\n", 0, None)


def test_streaming_callbacks(sandbox: Sandbox) -> None:
    out: list[str] = []
    err: list[str] = []
    r = sandbox.commands.run("for i in 1 2 3; do echo $i; echo e$i >&2; sleep 0.2; done",
                             on_stdout=out.append, on_stderr=err.append)
    assert "".join(out) == "1\n2\n3\n" == r.stdout
    assert "".join(err) == "e1\ne2\ne3\n" == r.stderr


def test_exit_code(sandbox: Sandbox) -> None:
    with pytest.raises(CommandExitException) as ei:
        sandbox.commands.run("echo partial; exit 3")
    assert ei.value.exit_code == 3 and ei.value.stdout == "partial\n"
    assert ei.value.error == "exit status 3"


def test_envs_cwd_user(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("echo $A:$B; pwd", envs={"A": "1", "B": "two words"}, cwd="/tmp")
    assert r.stdout == "1:two words\n/tmp\n"
    assert sandbox.commands.run("whoami", user="root").stdout == "root\n"
    assert sandbox.commands.run("whoami").stdout == "user\n"
    with pytest.raises(InvalidArgumentException):
        sandbox.commands.run("pwd", cwd="/does/not/exist")


def test_large_output(sandbox: Sandbox) -> None:
    r = sandbox.commands.run("head -c 3000000 /dev/zero | tr '\\0' a")
    assert len(r.stdout) == 3_000_000 and set(r.stdout) == {"a"}


def test_command_timeout(sandbox: Sandbox) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30", timeout=2)
    assert time.monotonic() - t0 < 20


def test_background_list_connect_kill(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("echo started; sleep 600", background=True, timeout=0)
    assert isinstance(h, CommandHandle) and h.pid > 0
    procs = poll(lambda: [p for p in sandbox.commands.list() if p.pid == h.pid], 10, what="the process listed")
    assert procs[0].cmd == "/bin/bash" and procs[0].args[-1] == "echo started; sleep 600"
    h.disconnect()

    again = sandbox.commands.connect(h.pid, timeout=0)
    assert again.pid == h.pid
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(_wait_quietly(again)), daemon=True)
    waiter.start()
    assert sandbox.commands.kill(h.pid) is True
    waiter.join(30)
    assert got and isinstance(got[0], CommandExitException), got
    assert got[0].exit_code == -1 and "signal: killed" in (got[0].error or "")
    assert sandbox.commands.kill(h.pid) is False  # not_found
    assert h.pid not in [p.pid for p in sandbox.commands.list()]
    # An ended process stays connectable for 30 s and its end comes at once
    # (specs/e2b-compat.md, "retained"); a pid that never was is not found.
    late = sandbox.commands.connect(h.pid)
    with pytest.raises(CommandExitException):
        late.wait()
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(999_999)


def _wait_quietly(handle: CommandHandle):
    try:
        return handle.wait()
    except Exception as exc:  # noqa: BLE001
        return exc


def test_background_output_after_connect(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("sleep 1; echo late; sleep 1; echo later", background=True)
    h.disconnect()
    again = sandbox.commands.connect(h.pid)
    r = again.wait()
    assert r.exit_code == 0 and "later\n" in r.stdout


def test_handle_kill(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("sleep 600", background=True, timeout=0)
    assert h.kill() is True
    with pytest.raises(CommandExitException):
        h.wait()


def test_stdin(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(h.pid, "hello ")
    h.send_stdin(b"world\n")
    h.close_stdin()
    r = h.wait()
    assert r.stdout == "hello world\n"


def test_large_stdin(sandbox: Sandbox) -> None:
    """E2B's envd takes a ``send_stdin`` of any size in one message; ours
    failed above connectrpc's default 4 MiB, each time differently (a
    reset, "port is not open", a rate limit). 8 MiB arrives whole."""
    h = sandbox.commands.run("wc -c", background=True, stdin=True, timeout=60)
    sandbox.commands.send_stdin(h.pid, b"x" * (8 << 20))
    sandbox.commands.close_stdin(h.pid)
    assert h.wait().stdout.strip() == str(8 << 20)


def test_stream_input(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("wc -c", background=True, stdin=True)
    sandbox.commands.stream_input(h.pid, (b"x" * 1000 for _ in range(100)))
    sandbox.commands.close_stdin(h.pid)
    assert h.wait().stdout.strip() == "100000"


def test_stdin_disabled(sandbox: Sandbox) -> None:
    h = sandbox.commands.run("sleep 30", background=True)  # stdin=False is sent explicitly
    with pytest.raises(Exception):
        sandbox.commands.send_stdin(h.pid, "x")
    h.kill()


def test_many_concurrent(sandbox: Sandbox) -> None:
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = sandbox.commands.run(f"echo {i}").stdout

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {i: f"{i}\n" for i in range(16)}


async def test_async_commands(async_sandbox) -> None:
    r = await async_sandbox.commands.run("echo async")
    assert r.stdout == "async\n"
    h = await async_sandbox.commands.run("cat", background=True, stdin=True)
    await async_sandbox.commands.send_stdin(h.pid, "abc")
    await async_sandbox.commands.close_stdin(h.pid)
    assert (await h.wait()).stdout == "abc"
