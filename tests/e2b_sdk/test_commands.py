"""``sandbox.commands`` through the sync SDK: process.Process Start / Connect /
List / SendSignal / SendInput / StreamInput / CloseStdin."""

from __future__ import annotations

import base64
import hashlib
import random

import pytest

from e2b import CommandExitException, Sandbox, TimeoutException

from e2bsdk_support import UNKNOWN_PID, command_pids, pgrep, unique, wait_until


def test_foreground_stdout_and_stderr_are_separate(sandbox: Sandbox):
    result = sandbox.commands.run("echo out-line; echo err-line >&2")

    assert result.exit_code == 0
    assert result.stdout == "out-line\n"
    assert result.stderr == "err-line\n"
    assert result.error is None


def test_non_zero_exit_raises_command_exit_exception(sandbox: Sandbox):
    with pytest.raises(CommandExitException) as raised:
        sandbox.commands.run("echo partial; echo broken >&2; exit 3")

    e = raised.value
    assert e.exit_code == 3
    assert e.stdout == "partial\n"
    assert e.stderr == "broken\n"
    assert e.error == "exit status 3"


def test_envs_are_passed_to_the_command(sandbox: Sandbox):
    result = sandbox.commands.run(
        'printf "%s|%s" "$E2BSDK_A" "$E2BSDK_B"',
        envs={"E2BSDK_A": "hello world", "E2BSDK_B": "x=y"},
    )
    assert result.stdout == "hello world|x=y"


def test_cwd_is_used(sandbox: Sandbox, workdir: str):
    assert sandbox.commands.run("pwd", cwd=workdir).stdout == f"{workdir}\n"


def test_default_user_home_and_cwd(sandbox: Sandbox, default_user):
    result = sandbox.commands.run('whoami; echo "$HOME"; pwd')
    assert result.stdout.splitlines() == [
        default_user.name,
        default_user.home,
        default_user.home,
    ]


def test_timeout_raises_and_kills_the_process(sandbox: Sandbox):
    duration = f"10.{random.randrange(10**5, 10**6)}"  # unique: a marker to find it by
    with pytest.raises(TimeoutException):
        sandbox.commands.run(f"sleep {duration}", timeout=1)

    # envd bounds the process by the stream deadline (Connect-Timeout-Ms), so
    # the process must be gone shortly after, not 10 s later.
    wait_until(
        lambda: not command_pids(sandbox, f"sleep {duration}"),
        "the timed-out command to leave commands.list()",
        timeout=5,
    )
    escaped = duration.replace(".", r"\.")
    wait_until(
        lambda: pgrep(sandbox, f"sleep {escaped}") == "",
        "the timed-out sleep to disappear from the process table",
        timeout=5,
    )


def test_background_run_then_wait(sandbox: Sandbox):
    handle = sandbox.commands.run(
        "sleep 0.2; echo finished; echo warn >&2", background=True
    )
    assert handle.pid > 0

    result = handle.wait()

    assert result.exit_code == 0
    assert result.stdout == "finished\n"
    assert result.stderr == "warn\n"


def test_iterating_a_background_handle_yields_output(sandbox: Sandbox):
    handle = sandbox.commands.run("echo one; echo two >&2", background=True)

    stdout, stderr = [], []
    for out, err, pty in handle:
        assert pty is None
        if out is not None:
            stdout.append(out)
        if err is not None:
            stderr.append(err)

    assert "".join(stdout) == "one\n"
    assert "".join(stderr) == "two\n"


def test_connect_to_background_process_receives_later_output(
    sandbox: Sandbox, workdir: str
):
    trigger = f"{workdir}/go"
    handle = sandbox.commands.run(
        f"while [ ! -e {trigger} ]; do sleep 0.05; done; echo after-connect",
        background=True,
        timeout=30,
    )
    try:
        handle.disconnect()
        # Detaching must not kill the process.
        assert handle.pid in [p.pid for p in sandbox.commands.list()]

        connected = sandbox.commands.connect(handle.pid, timeout=30)
        assert connected.pid == handle.pid
        sandbox.files.write(trigger, "go")

        result = connected.wait()
        assert result.exit_code == 0
        assert result.stdout == "after-connect\n"
    finally:
        sandbox.commands.kill(handle.pid)


def test_list_shows_running_command(sandbox: Sandbox, workdir: str):
    marker = unique("mark")
    cmd = f"sleep 30 # {marker}"
    handle = sandbox.commands.run(
        cmd, background=True, envs={"E2BSDK_MARK": marker}, cwd=workdir, timeout=60
    )
    try:
        listed = {p.pid: p for p in sandbox.commands.list()}
        assert handle.pid in listed
        info = listed[handle.pid]
        # The SDK always starts `/bin/bash -l -c <cmd>`; envd echoes the config.
        assert info.cmd == "/bin/bash"
        assert info.args == ["-l", "-c", cmd]
        assert info.envs.get("E2BSDK_MARK") == marker
        assert info.cwd == workdir
        assert info.tag is None  # the SDK never sets a tag
    finally:
        sandbox.commands.kill(handle.pid)


def test_kill_live_process_returns_true_and_ends_it(sandbox: Sandbox):
    handle = sandbox.commands.run("sleep 30", background=True, timeout=60)

    assert sandbox.commands.kill(handle.pid) is True

    with pytest.raises(CommandExitException) as raised:
        handle.wait()
    # Killed by a signal: envd reports exit code -1 (Go's ProcessState).
    assert raised.value.exit_code == -1
    wait_until(
        lambda: handle.pid not in [p.pid for p in sandbox.commands.list()],
        "the killed process to leave commands.list()",
        timeout=5,
    )


def test_kill_unknown_pid_returns_false(sandbox: Sandbox):
    assert sandbox.commands.kill(UNKNOWN_PID) is False


def test_send_stdin_then_close_stdin(sandbox: Sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True, timeout=30)
    try:
        sandbox.commands.send_stdin(handle.pid, "hello\n")
        handle.send_stdin(b"bytes too\n")
        sandbox.commands.close_stdin(handle.pid)

        result = handle.wait()
        assert result.exit_code == 0
        assert result.stdout == "hello\nbytes too\n"
    finally:
        sandbox.commands.kill(handle.pid)


def test_stdin_output_arrives_while_process_runs(sandbox: Sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True, timeout=30)
    try:
        sandbox.commands.send_stdin(handle.pid, "ping\n")
        first_stdout = next(out for out, _, _ in handle if out is not None)
        assert first_stdout == "ping\n"
    finally:
        sandbox.commands.kill(handle.pid)


def test_stream_input_sends_chunks_in_order(sandbox: Sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True, timeout=30)
    try:
        sandbox.commands.stream_input(handle.pid, [b"one\n", "two\n", b"three\n"])
        sandbox.commands.close_stdin(handle.pid)

        assert handle.wait().stdout == "one\ntwo\nthree\n"
    finally:
        sandbox.commands.kill(handle.pid)


def test_on_stdout_and_on_stderr_callbacks(sandbox: Sandbox):
    stdout, stderr = [], []
    result = sandbox.commands.run(
        "echo a; echo b >&2; echo c",
        on_stdout=stdout.append,
        on_stderr=stderr.append,
    )
    assert "".join(stdout) == "a\nc\n"
    assert "".join(stderr) == "b\n"
    assert result.stdout == "a\nc\n"
    assert result.stderr == "b\n"


def test_large_output_arrives_complete(sandbox: Sandbox, workdir: str):
    raw = f"{workdir}/raw"
    chunks: list[str] = []
    result = sandbox.commands.run(
        f"head -c 5000000 /dev/urandom > {raw} && base64 {raw}",
        on_stdout=chunks.append,
    )

    decoded = base64.b64decode(result.stdout)
    assert len(decoded) == 5_000_000
    with open(raw, "rb") as f:
        assert hashlib.sha256(decoded).digest() == hashlib.sha256(f.read()).digest()
    # Streamed in pieces, not buffered until exit; callbacks saw all of it.
    assert len(chunks) > 1
    assert "".join(chunks) == result.stdout


def test_utf8_split_across_chunks_is_decoded(sandbox: Sandbox):
    # 100k two-byte characters: chunk boundaries fall inside characters.
    result = sandbox.commands.run("yes é | head -n 100000 | tr -d '\\n'")
    assert result.stdout == "é" * 100_000


def test_commands_run_in_parallel(sandbox: Sandbox):
    first = sandbox.commands.run("sleep 0.3; echo first", background=True)
    second = sandbox.commands.run("echo second", background=True)

    assert second.wait().stdout == "second\n"
    assert first.wait().stdout == "first\n"
    assert first.pid != second.pid


def test_exit_code_of_signalled_shell(sandbox: Sandbox):
    with pytest.raises(CommandExitException) as raised:
        sandbox.commands.run("kill -TERM $$")
    assert raised.value.exit_code == -1


def test_process_environment_names_the_user(sandbox: Sandbox, default_user):
    result = sandbox.commands.run('echo "$USER:$LOGNAME"; command -v sh')
    user_line, sh_line = result.stdout.splitlines()
    assert user_line == f"{default_user.name}:{default_user.name}"
    assert sh_line.endswith("/sh")  # PATH is usable
