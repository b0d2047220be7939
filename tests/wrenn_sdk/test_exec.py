"""``capsule.commands``: foreground run, background run, list, connect,
kill and the exec-stream WebSocket; sync and async."""

from __future__ import annotations

import asyncio
import time

import httpx_ws
import pytest
from wrenn import (
    AsyncCapsule,
    Capsule,
    CommandHandle,
    CommandResult,
    ProcessInfo,
    StreamErrorEvent,
    StreamExitEvent,
    StreamStartEvent,
    StreamStderrEvent,
    StreamStdoutEvent,
    WrennAgentError,
    WrennError,
    WrennNotFoundError,
    WrennValidationError,
)
from wrennsdk_support import Collector, drain, poll


def _out(events, kind: str) -> str:
    return "".join(e.data for e in events if e.type == kind)


# --------------------------------------------------------------------------- #
# foreground
# --------------------------------------------------------------------------- #


def test_stdout_stderr_exit(capsule: Capsule) -> None:
    r = capsule.commands.run("echo out; echo err >&2")
    assert isinstance(r, CommandResult)
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 0)
    assert isinstance(r.duration_ms, int) and r.duration_ms >= 0


@pytest.mark.parametrize("code", [1, 3, 127, 255])
def test_exit_codes(capsule: Capsule, code: int) -> None:
    r = capsule.commands.run(f"exit {code}")
    assert r.exit_code == code and r.stdout == "" and r.stderr == ""


def test_killed_by_signal_is_nonzero(capsule: Capsule) -> None:
    r = capsule.commands.run("kill -9 $$")
    assert r.exit_code != 0


def test_command_not_found(capsule: Capsule) -> None:
    r = capsule.commands.run("definitely-not-a-command-xyz")
    assert r.exit_code == 127 and "not found" in r.stderr


def test_a_command_that_cannot_start_says_why(capsule: Capsule) -> None:
    """One environment variable over the kernel's 128 KiB: the shell cannot
    be started, and the 400 says why, not only 'start /bin/sh'."""
    with pytest.raises(WrennValidationError) as ei:
        capsule.commands.run("true", envs={"BIG": "x" * 200_000})
    assert "start /bin/sh" in str(ei.value) and "too long" in str(ei.value), ei.value


def test_envs(capsule: Capsule) -> None:
    r = capsule.commands.run('printf "%s|%s" "$FOO" "$BAR"', envs={"FOO": "bar baz", "BAR": "é✓"})
    assert r.stdout == "bar baz|é✓"


def test_sane_environment(capsule: Capsule) -> None:
    """git and most tools need HOME and PATH."""
    r = capsule.commands.run('echo "$HOME"; echo "$PATH"; id -un')
    home, path, user = r.stdout.splitlines()
    assert home.startswith("/"), r.stdout
    assert "/usr/bin" in path.split(":"), r.stdout
    assert user, r.stdout
    assert capsule.commands.run('test -d "$HOME" && test -w "$HOME"').exit_code == 0


def test_cwd(capsule: Capsule) -> None:
    assert capsule.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    capsule.commands.run("mkdir -p /tmp/a/b")
    assert capsule.commands.run("pwd", cwd="/tmp/a/b").stdout == "/tmp/a/b\n"
    both = capsule.commands.run('echo "$X:$(pwd)"', cwd="/tmp/a", envs={"X": "y"})
    assert both.stdout == "y:/tmp/a\n"


def test_unicode_output(capsule: Capsule) -> None:
    r = capsule.commands.run("echo 'héllo ✓ 日本'; echo 'ünï' >&2")
    assert r.stdout == "héllo ✓ 日本\n" and r.stderr == "ünï\n"


def test_binary_output_is_decoded(capsule: Capsule) -> None:
    """Non-UTF-8 output travels as base64 (``encoding``); the SDK decodes it
    and replaces the invalid bytes."""
    r = capsule.commands.run(r"printf '\377\376abc'")
    assert r.exit_code == 0
    assert r.stdout == "\ufffd\ufffdabc"
    assert r.stderr == ""
    # invalid stderr switches both streams; valid stdout still reads right
    r = capsule.commands.run(r"printf 'ok'; printf '\377x' >&2")
    assert (r.stdout, r.stderr) == ("ok", "\ufffdx")


def test_large_output(capsule: Capsule) -> None:
    r = capsule.commands.run("head -c 1000000 /dev/zero | tr '\\0' a; echo; seq 1 50000 >&2")
    assert r.exit_code == 0
    assert r.stdout == "a" * 1_000_000 + "\n"
    assert r.stderr.splitlines()[-1] == "50000" and len(r.stderr.splitlines()) == 50000


def test_output_past_the_limit_is_413_and_ends_the_command(capsule: Capsule) -> None:
    """A foreground command's output is answered whole, so it is bounded
    (12 MiB): one that never stops writing is refused with 413
    ``too_large`` and killed, instead of being collected without end.
    Just under the limit is answered whole."""
    under = 11 << 20
    r = capsule.commands.run(f"head -c {under} /dev/zero | tr '\\0' a", timeout=120)
    assert r.exit_code == 0 and len(r.stdout) == under and r.stdout.strip("a") == ""
    with pytest.raises(WrennError) as ei:
        capsule.commands.run("yes wrenn-flood", timeout=120)
    assert (ei.value.status_code, ei.value.code) == (413, "too_large"), ei.value
    assert "background" in ei.value.message
    flooding = "cat /proc/[0-9]*/comm 2>/dev/null | grep -cx yes || true"
    poll(lambda: capsule.commands.run(flooding).stdout.strip() == "0", 10,
         what="the flooding command to be killed")


def test_timeout(capsule: Capsule) -> None:
    """A foreground command past ``timeout`` is killed and the call fails
    promptly with the server's ``agent_error`` (WrennAgentError)."""
    started = time.monotonic()
    with pytest.raises(WrennAgentError) as ei:
        capsule.commands.run("sleep 10; echo finished > /tmp/finished", timeout=2)
    elapsed = time.monotonic() - started
    assert ei.value.code == "agent_error"
    assert ei.value.status_code in (502, 504)
    assert "did not finish within 2 s" in str(ei.value), ei.value
    assert 1.5 <= elapsed < 8, f"took {elapsed:.1f}s"
    # the process group is gone and never finished
    time.sleep(0.5)
    r = capsule.commands.run("pgrep -x sleep || true; cat /tmp/finished 2>/dev/null || true")
    assert r.stdout == "", r.stdout
    # the capsule is fine afterwards
    assert capsule.commands.run("echo ok", timeout=5).stdout == "ok\n"


def test_within_timeout_and_no_timeout(capsule: Capsule) -> None:
    r = capsule.commands.run("sleep 1; echo done", timeout=5)
    assert r.stdout == "done\n"
    r = capsule.commands.run("sleep 1; echo none", timeout=None)  # server default 30 s
    assert r.stdout == "none\n"


# --------------------------------------------------------------------------- #
# background, list, connect, kill
# --------------------------------------------------------------------------- #


def test_background_list_connect(capsule: Capsule) -> None:
    script = (
        "while [ ! -f /tmp/go ]; do sleep 0.05; done; "
        "echo line1; echo err1 >&2; sleep 0.2; echo line2; exit 7"
    )
    h = capsule.commands.run(script, background=True, tag="bg-test")
    assert isinstance(h, CommandHandle)
    assert h.pid > 0 and h.tag == "bg-test" and h.capsule_id == capsule.capsule_id

    procs = capsule.commands.list()
    assert all(isinstance(p, ProcessInfo) for p in procs)
    mine = [p for p in procs if p.pid == h.pid]
    assert mine, f"pid {h.pid} not in {procs}"
    assert mine[0].tag == "bg-test"
    assert mine[0].cmd == "/bin/sh" and mine[0].args == ["-c", script]

    col = Collector(lambda: capsule.commands.connect(h.pid), name="connect")
    start = col.wait_for(lambda items: items and items[0], 10, "the start event")
    assert isinstance(start, StreamStartEvent) and start.pid == h.pid
    capsule.files.write("/tmp/go", "")
    events = col.wait_done(15, "the exit event")
    assert col.error is None, col.error
    assert isinstance(events[-1], StreamExitEvent) and events[-1].exit_code == 7
    assert _out(events, "stdout") == "line1\nline2\n"
    assert _out(events, "stderr") == "err1\n"
    assert all(isinstance(e, (StreamStartEvent, StreamStdoutEvent, StreamStderrEvent, StreamExitEvent))
               for e in events)

    poll(lambda: h.pid not in [p.pid for p in capsule.commands.list()], 5, what="process to leave the list")


def test_background_default_tag_envs_cwd(capsule: Capsule) -> None:
    h = capsule.commands.run(
        'pwd > /tmp/bg.out; echo "$V" >> /tmp/bg.out', background=True, cwd="/var", envs={"V": "vee"}
    )
    assert isinstance(h.tag, str) and h.tag, "the server generates a tag"
    poll(lambda: capsule.files.exists("/tmp/bg.out") and capsule.files.read("/tmp/bg.out").count("\n") == 2,
         10, what="the background output file")
    assert capsule.files.read("/tmp/bg.out") == "/var\nvee\n"


def test_background_timeout_is_ignored(capsule: Capsule) -> None:
    """``timeout`` only applies to foreground commands."""
    h = capsule.commands.run("sleep 3; touch /tmp/bg-slept", background=True, timeout=1)
    time.sleep(1.5)
    assert h.pid in [p.pid for p in capsule.commands.list()]
    poll(lambda: capsule.files.exists("/tmp/bg-slept"), 10, what="the background command to finish")


def test_kill(capsule: Capsule) -> None:
    h = capsule.commands.run("sleep 300", background=True)
    assert h.pid in [p.pid for p in capsule.commands.list()]
    assert capsule.commands.kill(h.pid) is None
    poll(lambda: h.pid not in [p.pid for p in capsule.commands.list()], 5, what="killed process to go")
    with pytest.raises(WrennNotFoundError):
        capsule.commands.kill(h.pid)
    with pytest.raises(WrennNotFoundError):
        capsule.commands.kill(999_999)


def test_kill_ends_a_connected_stream(capsule: Capsule) -> None:
    h = capsule.commands.run("sleep 300", background=True)
    col = Collector(lambda: capsule.commands.connect(h.pid), name="connect-kill")
    col.wait_for(lambda items: items, 10, "the start event")
    capsule.commands.kill(h.pid)
    events = col.wait_done(10, "the stream to end after kill")
    assert events[-1].type in ("exit", "error")
    if isinstance(events[-1], StreamExitEvent):
        assert events[-1].exit_code != 0


def test_connect_to_unknown_process(capsule: Capsule) -> None:
    """An unknown pid ends the stream promptly with an error event."""
    events = drain(lambda: capsule.commands.connect(999_999), 10)
    assert events and isinstance(events[-1], StreamErrorEvent), events
    assert not any(e.type in ("stdout", "stderr", "exit") for e in events)


def test_a_pause_ends_open_streams_with_an_error_event(make_capsule) -> None:
    """A stream open when its capsule is paused ends at once with an error
    event (its envd is frozen: before, the client waited for good); the
    command lives on and is there again after the resume."""
    c = make_capsule(wait=True)
    col = Collector(lambda: c.commands.stream("echo go; sleep 300"), name="paused-stream")
    col.wait_for(lambda items: any(e.type == "stdout" for e in items), 20, "the first output")
    c.pause()
    events = col.wait_done(15, "the stream to end after the pause")
    assert events[-1].type == "error" and "paused" in events[-1].data, events
    c.resume()
    assert any("sleep 300" in " ".join([p.cmd or "", *(p.args or [])]) for p in c.commands.list())


def test_a_destroy_under_commands_and_streams_says_so(make_capsule) -> None:
    """A capsule destroyed while a foreground command runs, a stream and a
    reattached stream are open, and a terminal is attached: the command
    raises ``WrennNotFoundError`` and each stream ends with an error event,
    all saying the capsule was destroyed (before, a 502 and error frames
    with the HTTP client's "failed to read response body")."""
    c = make_capsule(wait=True)
    h = c.commands.run("while :; do echo bg; sleep 0.2; done", background=True)
    run_error: list[BaseException] = []

    def run() -> list:
        try:
            c.commands.run("sleep 300", timeout=120)
        except BaseException as e:  # noqa: BLE001 - what the test checks
            run_error.append(e)
        return []

    with c.pty() as term:
        term.write(b"echo pty-ready\n")
        streams = {
            "stream": Collector(lambda: c.commands.stream("echo go; sleep 300"), name="destroy-stream"),
            "connect": Collector(lambda: c.commands.connect(h.pid), name="destroy-connect"),
            "pty": Collector(lambda: term, name="destroy-pty"),
        }
        fg = Collector(run, name="destroy-run")
        streams["stream"].wait_for(lambda items: any(e.type == "stdout" for e in items), 20, "the stream")
        streams["connect"].wait_for(lambda items: any(e.type == "stdout" for e in items), 20, "the reattach")
        streams["pty"].wait_for(
            lambda items: b"pty-ready" in b"".join(e.data for e in items if isinstance(e.data, bytes)), 20, "the terminal")
        poll(lambda: any("sleep 300" in " ".join([p.cmd or "", *(p.args or [])]) for p in c.commands.list()),
             20, "the foreground command to start")
        c.destroy()
        for name, col in streams.items():
            events = col.wait_done(20, f"the {name} to end after the destroy")
            assert col.error is None, (name, col.error)
            last = events[-1]
            said = last.data.decode() if isinstance(last.data, bytes) else last.data
            assert last.type == "error" and f"capsule {c.capsule_id} was destroyed" in said, (name, events[-3:])
        fg.wait_done(20, "the foreground command to end after the destroy")
    assert len(run_error) == 1 and isinstance(run_error[0], WrennNotFoundError), run_error
    assert f"capsule {c.capsule_id} was destroyed" in str(run_error[0]), run_error


def test_streams_to_a_paused_capsule_end_with_an_error_event(make_capsule) -> None:
    """As on wrenn's server, a capsule that is not running is refused in
    band: the SDK's iterations end with the error event its docs promise,
    not with httpx_ws's WebSocketUpgradeError. The capsule is untouched."""
    c = make_capsule(wait=True)
    h = c.commands.run("sleep 300", background=True)
    c.pause()
    for name, stream in (("stream", lambda: c.commands.stream("echo hi")),
                         ("connect", lambda: c.commands.connect(h.pid))):
        events = drain(stream, 20)
        assert [e.type for e in events] == ["error"], (name, events)
        assert "not running (status: paused)" in events[0].data, (name, events[0].data)
    with c.pty() as term:
        events = list(term)
    assert [(e.type, e.fatal) for e in events] == [("error", True)], events
    said = events[0].data
    said = said.decode() if isinstance(said, bytes) else said
    assert "not running (status: paused)" in said, events
    c.resume()
    assert c.commands.run("echo back").stdout == "back\n"
    assert [p for p in c.commands.list() if p.pid == h.pid], "the background process survived"


# --------------------------------------------------------------------------- #
# exec stream (WebSocket)
# --------------------------------------------------------------------------- #


def test_stream_character_split_across_writes(capsule: Capsule) -> None:
    """A character whose bytes come in two writes arrives whole, and the
    first write (nothing whole to send yet) makes no empty event."""
    events = drain(lambda: capsule.commands.stream(r"printf '\303'; sleep 0.5; printf '\251\n'"), 20)
    outs = [e.data for e in events if e.type == "stdout"]
    assert outs == ["é\n"], events


def test_stream_shell(capsule: Capsule) -> None:
    events = drain(lambda: capsule.commands.stream("echo a; sleep 0.2; echo b >&2; exit 4"), 20)
    assert isinstance(events[0], StreamStartEvent) and events[0].pid > 0
    assert isinstance(events[-1], StreamExitEvent) and events[-1].exit_code == 4
    assert _out(events, "stdout") == "a\n"
    assert _out(events, "stderr") == "b\n"


def test_stream_with_args(capsule: Capsule) -> None:
    events = drain(lambda: capsule.commands.stream("/bin/echo", args=["x", "y z"]), 20)
    assert _out(events, "stdout") == "x y z\n"
    assert events[-1].type == "exit" and events[-1].exit_code == 0


def test_stream_is_incremental_and_long(capsule: Capsule) -> None:
    """Output arrives while the command runs, and the socket outlives the
    SDK's 20 s keepalive ping (the server must answer pings)."""
    col = Collector(
        lambda: capsule.commands.stream("for i in $(seq 1 5); do echo tick$i; sleep 5; done"),
        name="stream-long",
    )
    col.wait_for(lambda items: "tick1" in _out(items, "stdout"), 10, "the first tick")
    assert not col.done.is_set()
    events = col.wait_done(60, "the long stream to end")
    assert col.error is None, col.error
    assert _out(events, "stdout") == "".join(f"tick{i}\n" for i in range(1, 6))
    assert events[-1].type == "exit" and events[-1].exit_code == 0


def test_stream_binary_and_large(capsule: Capsule) -> None:
    events = drain(lambda: capsule.commands.stream("seq 1 100000; printf '\\377'"), 30)
    out = _out(events, "stdout")
    assert out.startswith("1\n2\n3\n") and "100000\n" in out
    assert out.endswith("\ufffd")
    assert events[-1].type == "exit" and events[-1].exit_code == 0


# --------------------------------------------------------------------------- #
# async
# --------------------------------------------------------------------------- #


async def test_async_commands(server) -> None:
    c = await AsyncCapsule.create(template="minimal", wait=True, api_key=server.api_key, base_url=server.base_url)
    async with c:
        r = await c.commands.run("echo o; echo e >&2; exit 2", envs={"A": "1"}, cwd="/tmp")
        assert (r.stdout, r.stderr, r.exit_code) == ("o\n", "e\n", 2)
        r = await c.commands.run('echo "$A $(pwd)"', envs={"A": "1"}, cwd="/tmp")
        assert r.stdout == "1 /tmp\n"
        r = await c.commands.run(r"printf '\377'")
        assert r.stdout == "\ufffd"
        with pytest.raises(WrennAgentError):
            await c.commands.run("sleep 10", timeout=2)

        async with asyncio.timeout(20):
            events = [e async for e in c.commands.stream("echo s; exit 5")]
        assert events[0].type == "start" and events[-1].type == "exit" and events[-1].exit_code == 5
        assert _out(events, "stdout") == "s\n"

        h = await c.commands.run(
            "while [ ! -f /tmp/ago ]; do sleep 0.05; done; echo bg", background=True, tag="abg"
        )
        assert h.tag == "abg" and h.pid > 0
        assert h.pid in [p.pid for p in await c.commands.list()]

        got: list = []

        async def consume() -> None:
            async for ev in c.commands.connect(h.pid):
                got.append(ev)

        task = asyncio.create_task(consume())
        async with asyncio.timeout(10):
            while not got:
                await asyncio.sleep(0.05)
        await c.files.write("/tmp/ago", "")
        async with asyncio.timeout(15):
            await task
        assert got[0].type == "start" and got[-1].type == "exit" and got[-1].exit_code == 0
        assert _out(got, "stdout") == "bg\n"

        k = await c.commands.run("sleep 300", background=True)
        await c.commands.kill(k.pid)
        async with asyncio.timeout(5):
            while k.pid in [p.pid for p in await c.commands.list()]:
                await asyncio.sleep(0.1)
        with pytest.raises(WrennNotFoundError):
            await c.commands.kill(k.pid)
