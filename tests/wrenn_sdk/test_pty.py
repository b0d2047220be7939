"""Interactive terminals: ``capsule.pty()`` / ``pty_connect()`` and the
async twins. Output is matched on computed markers (``$((6*7))``) so that
the terminal's echo of the typed line never counts as the answer."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from wrenn import AsyncCapsule, Capsule, PtyEvent, PtyEventType
from wrennsdk_support import PtyReader, poll


def test_start_write_read(capsule: Capsule) -> None:
    with capsule.pty() as term:
        # written before ``started`` arrives: the server must not lose it
        term.write(b"echo $((6*7))-marker\n")
        reader = PtyReader(term)
        started = reader.wait_event("started", 15)
        assert isinstance(started, PtyEvent) and started.type == PtyEventType.started
        assert started.pid and started.pid > 0
        assert isinstance(started.tag, str) and started.tag
        assert term.tag == started.tag and term.pid == started.pid
        reader.wait_output(b"42-marker", 20)
        assert all(isinstance(e.data, bytes) for e in reader.events if e.type == "output")


def test_initial_size_envs_cwd(capsule: Capsule) -> None:
    with capsule.pty(cmd="/bin/bash", cols=123, rows=31, envs={"PTYVAR": "v1"}, cwd="/tmp") as term:
        reader = PtyReader(term)
        reader.wait_event("started", 15)
        term.write(b"stty size; echo \"$PTYVAR:$PWD:$((2+3))\"\n")
        out = reader.wait_output(b"v1:/tmp:5", 20)
        assert b"31 123" in out


def test_resize(capsule: Capsule) -> None:
    with capsule.pty(cols=80, rows=24) as term:
        reader = PtyReader(term)
        reader.wait_event("started", 15)
        term.resize(100, 40)
        term.write(b"stty size; echo $((7*7))-sized\n")
        out = reader.wait_output(b"49-sized", 20)
        assert b"40 100" in out
        with pytest.raises(ValueError):
            term.resize(0, 10)  # refused client-side


def test_exit_code(capsule: Capsule) -> None:
    with capsule.pty() as term:
        reader = PtyReader(term)
        reader.wait_event("started", 15)
        term.write(b"exit 5\n")
        ev = reader.wait_event("exit", 15)
        assert ev.exit_code == 5
        reader.col.wait_done(10, "the PTY iteration to stop after exit")


def test_typing_on_after_exit_still_ends_with_the_exit(capsule: Capsule) -> None:
    """Keys typed after ``exit`` reach a terminal that is gone: their
    failure must not take the place of the exit frame (a fatal error
    instead of the exit code)."""
    for _ in range(3):
        with capsule.pty() as term:
            reader = PtyReader(term)
            reader.wait_event("started", 15)
            term.write(b"exit 7\n")
            for _ in range(50):
                try:
                    term.write(b"typed on\n")
                except Exception:  # noqa: BLE001 - the socket may be closing
                    break
                time.sleep(0.01)
            ev = reader.wait_event("exit", 15)
            assert ev.exit_code == 7
            reader.col.wait_done(10, "the PTY iteration to stop after exit")
            errors = [e for e in reader.events if e.type == "error"]
            assert not errors, errors


def test_kill(capsule: Capsule) -> None:
    with capsule.pty(cmd="/bin/sleep", args=["600"]) as term:
        reader = PtyReader(term)
        started = reader.wait_event("started", 15)
        assert started.pid in [p.pid for p in capsule.commands.list()]
        term.kill()
        ev = reader.wait_event("exit", 15)
        assert ev.exit_code != 0
    poll(lambda: started.pid not in [p.pid for p in capsule.commands.list()], 5,
         what="the killed PTY to leave the process list")


def test_reattach_by_tag(capsule: Capsule) -> None:
    with capsule.pty() as term:
        reader = PtyReader(term)
        started = reader.wait_event("started", 15)
        term.write(b"export KEEP=kept; echo $((3*3))-first\n")
        reader.wait_output(b"9-first", 20)
        tag, pid = started.tag, started.pid
    # leaving ``pty()`` only closes the socket: the shell lives on
    assert pid in [p.pid for p in capsule.commands.list()]

    with capsule.pty_connect(tag) as again:
        reader2 = PtyReader(again)
        again.write(b"echo $KEEP-$((5*5))-again\n")
        out = reader2.wait_output(b"kept-25-again", 20)
        assert b"9-first" not in out, "a reattach streams only new output"
        assert not any(e.type == "error" for e in reader2.events), reader2.events
        again.kill()
        reader2.wait_event("exit", 15)


def test_connect_unknown_tag(capsule: Capsule) -> None:
    with capsule.pty_connect("pty-00000000") as term:
        reader = PtyReader(term)
        ev = reader.col.wait_for(
            lambda items: next((e for e in items if e.type in ("error", "exit")), None),
            15,
            "an error for the unknown tag",
        )
        assert ev.type == PtyEventType.error and ev.fatal is True, ev
        reader.col.wait_done(10, "the iteration to stop after a fatal error")


def test_two_terminals_are_independent(capsule: Capsule) -> None:
    with capsule.pty() as a, capsule.pty() as b:
        ra, rb = PtyReader(a), PtyReader(b)
        ta = ra.wait_event("started", 15).tag
        tb = rb.wait_event("started", 15).tag
        assert ta != tb
        a.write(b"echo $((100+1))-A\n")
        b.write(b"echo $((100+2))-B\n")
        assert b"102-B" not in ra.wait_output(b"101-A", 20)
        assert b"101-A" not in rb.wait_output(b"102-B", 20)


def test_a_paste_larger_than_an_agent_message_arrives_whole(capsule: Capsule) -> None:
    """6 MiB written at once (one WebSocket frame; an agent call takes at
    most 4 MiB): split on the way, none of it lost, the terminal still
    works. It used to end the terminal's input without a word."""
    size = 6 << 20
    with capsule.pty(cmd="/bin/bash") as term:
        reader = PtyReader(term)
        reader.wait_event("started", 15)
        # raw: no line editing to cap or drop a line that long
        term.write(b"stty raw -echo; echo $((3*3))-ready; head -c %d > /tmp/paste; echo $((4*4))-pasted\n"
                   % size)
        reader.wait_output(b"9-ready", 20)
        term.write(b"p" * size)
        reader.wait_output(b"16-pasted", 60)
    assert capsule.commands.run("stat -c %s /tmp/paste; tr -d p < /tmp/paste | wc -c").stdout.split() \
        == [str(size), "0"]


def test_large_output_burst(capsule: Capsule) -> None:
    with capsule.pty() as term:
        reader = PtyReader(term)
        reader.wait_event("started", 15)
        term.write(b"seq 1 20000; echo $((9*9))-end\n")
        out = reader.wait_output(b"81-end", 30)
        assert b"\r\n19999\r\n20000\r\n" in out


async def test_async_pty(server) -> None:
    c = await AsyncCapsule.create(template="minimal", wait=True, api_key=server.api_key, base_url=server.base_url)
    async with c:
        out = b""
        async with c.pty(cols=90, rows=20) as term:
            async with asyncio.timeout(20):
                async for ev in term:
                    if ev.type == "started":
                        assert ev.tag and ev.pid
                        await term.resize(101, 33)
                        await term.write(b"stty size; echo $((6*7))-amark\n")
                    elif ev.type == "output":
                        out += ev.data
                        if b"42-amark" in out:
                            break
            assert b"33 101" in out
            tag = term.tag
            assert tag

        async with c.pty_connect(tag) as again:
            await again.write(b"echo $((8*8))-back\n")
            more = b""
            async with asyncio.timeout(20):
                async for ev in again:
                    if ev.type == "output":
                        more += ev.data
                        if b"64-back" in more:
                            break
            await again.kill()
            async with asyncio.timeout(15):
                async for ev in again:
                    if ev.type == "exit":
                        break


def _raw_ws(server, path: str):
    """A WebSocket opened by hand (the test needs frames the SDK never
    sends); the socket, after the 101."""
    import base64
    import os
    import socket
    u = httpx.URL(server.base_url)
    s = socket.create_connection((u.host, u.port), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: {u.host}:{u.port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               f"X-API-Key: {server.api_key}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.split(b"\r\n")[0].split()[1] == b"101", head
    return s


def _frame(opcode: int, payload: bytes) -> bytes:
    """A client frame, masked with a zero key (so the payload goes as is)."""
    n = len(payload)
    if n < 126:
        size = bytes([0x80 | n])
    elif n < 1 << 16:
        size = bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        size = bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return bytes([0x80 | opcode]) + size + b"\0\0\0\0" + payload


def test_input_nobody_reads_is_bounded_in_bytes(server, make_capsule) -> None:
    """Input to a terminal whose program never reads it queues up to a byte
    budget, then the socket waits: 24 frames of 16 MiB do not all land in
    the server's memory (the queue took 64 frames of any size, about
    600 MiB from one socket in the review that found it)."""
    if server.process is None:
        pytest.skip("needs the pid of a local wrenn up")
    c = make_capsule(wait=True)

    def rss_mib() -> int:
        status = open(f"/proc/{server.process.pid}/status").read()
        return int(status.split("VmRSS:")[1].split()[0]) // 1024

    s = _raw_ws(server, f"/v1/capsules/{c.capsule_id}/pty")
    try:
        # (raw: a canonical terminal throws away what its line cannot hold)
        start = b'{"type":"start","cmd":"/bin/sh","args":["-c","stty raw -echo; sleep 600"]}'
        s.sendall(_frame(1, start))
        time.sleep(1)
        before = rss_mib()
        frame = _frame(2, b"a" * (16 << 20))
        s.settimeout(10)
        sent = 0
        try:
            for _ in range(24):
                s.sendall(frame)
                sent += 1
        except (TimeoutError, OSError):
            pass  # the server stopped reading: the point
        time.sleep(2)
        grown = rss_mib() - before
    finally:
        s.close()
    assert sent < 24 and grown < 160, f"{sent} frames of 16 MiB taken, the server grew {grown} MiB"
