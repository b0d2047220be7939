"""A representative subset through ``AsyncSandbox``.

The async SDK differs on the wire where it matters: callbacks are driven by a
background task, watching uses the server-streaming ``WatchDir`` RPC (not the
polling CreateWatcher/GetWatcherEvents), and opening a stream is bounded by
``request_timeout`` until envd's first event arrives.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from pathlib import Path
from typing import List

import pytest

from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    FilesystemEvent,
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
    PtySize,
    TimeoutException,
)

from e2bsdk_support import UNKNOWN_PID, async_wait_until, stty_size_line

MIB = 1024 * 1024


async def test_run_stdout_stderr_exit_code(async_sandbox: AsyncSandbox):
    result = await async_sandbox.commands.run("echo out; echo err >&2")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 0)

    with pytest.raises(CommandExitException) as raised:
        await async_sandbox.commands.run("echo bad >&2; exit 7")
    assert raised.value.exit_code == 7
    assert raised.value.stderr == "bad\n"


async def test_run_with_envs_cwd_and_callbacks(async_sandbox: AsyncSandbox, workdir: str):
    stdout: List[str] = []
    stderr: List[str] = []

    async def on_stderr(chunk: str) -> None:  # async callbacks are awaited
        stderr.append(chunk)

    result = await async_sandbox.commands.run(
        'echo "$E2BSDK_X"; pwd; echo e >&2',
        envs={"E2BSDK_X": "async"},
        cwd=workdir,
        on_stdout=stdout.append,
        on_stderr=on_stderr,
    )

    assert result.stdout == f"async\n{workdir}\n"
    assert "".join(stdout) == result.stdout
    assert "".join(stderr) == "e\n"


async def test_timeout(async_sandbox: AsyncSandbox):
    with pytest.raises(TimeoutException):
        await async_sandbox.commands.run("sleep 10", timeout=1)


async def test_background_wait_and_list(async_sandbox: AsyncSandbox):
    handle = await async_sandbox.commands.run("sleep 30", background=True, timeout=60)
    try:
        assert handle.pid in [p.pid for p in await async_sandbox.commands.list()]
        assert handle.exit_code is None  # still running
    finally:
        assert await async_sandbox.commands.kill(handle.pid) is True

    with pytest.raises(CommandExitException) as raised:
        await handle.wait()
    assert raised.value.exit_code == -1
    assert await async_sandbox.commands.kill(UNKNOWN_PID) is False


async def test_connect_with_callbacks(async_sandbox: AsyncSandbox, workdir: str):
    trigger = f"{workdir}/go"
    handle = await async_sandbox.commands.run(
        f"while [ ! -e {trigger} ]; do sleep 0.05; done; echo later; echo warn >&2",
        background=True,
        timeout=30,
    )
    try:
        await handle.disconnect()
        seen: List[str] = []
        connected = await async_sandbox.commands.connect(
            handle.pid, timeout=30, on_stdout=seen.append
        )
        await async_sandbox.files.write(trigger, "go")

        result = await connected.wait()

        assert result.stdout == "later\n"
        assert result.stderr == "warn\n"
        assert "".join(seen) == "later\n"
    finally:
        await async_sandbox.commands.kill(handle.pid)


async def test_send_stdin_and_close(async_sandbox: AsyncSandbox):
    handle = await async_sandbox.commands.run("cat", background=True, stdin=True, timeout=30)
    try:
        await handle.send_stdin("async stdin\n")
        await async_sandbox.commands.send_stdin(handle.pid, b"\x00\xffraw\n")
        await handle.close_stdin()

        result = await handle.wait()
        # Invalid UTF-8 is decoded with replacement characters by the SDK.
        assert result.stdout == "async stdin\n\x00\ufffdraw\n"
    finally:
        await async_sandbox.commands.kill(handle.pid)


async def test_pty_on_data_and_resize(async_sandbox: AsyncSandbox):
    output = bytearray()
    size = PtySize(rows=24, cols=80)
    terminal = await async_sandbox.pty.create(size, on_data=output.extend, timeout=60)

    async def expect(needle: bytes, start: int = 0) -> int:
        """Wait for ``needle`` at or after ``start``; return the offset past it."""

        async def probe():
            at = output.find(needle, start)
            return at + len(needle) if at >= 0 else None

        return await async_wait_until(probe, f"PTY output {needle!r}")

    try:
        await async_sandbox.pty.send_stdin(terminal.pid, b"stty size\n")
        seen = await expect(stty_size_line(size))

        bigger = PtySize(rows=40, cols=120)
        await async_sandbox.pty.resize(terminal.pid, bigger)
        await async_sandbox.pty.send_stdin(terminal.pid, b"stty size\n")
        await expect(stty_size_line(bigger), start=seen)
    finally:
        assert await async_sandbox.pty.kill(terminal.pid) is True

    with pytest.raises(CommandExitException):
        await terminal.wait()


async def test_files_round_trip(async_sandbox: AsyncSandbox, workdir: str):
    data = bytes(range(256)) * 64
    info = await async_sandbox.files.write(f"{workdir}/a.bin", data)
    assert info.path == f"{workdir}/a.bin"
    assert await async_sandbox.files.read(f"{workdir}/a.bin", format="bytes") == data

    await async_sandbox.files.write(f"{workdir}/t.txt", "tëxt")
    assert await async_sandbox.files.read(f"{workdir}/t.txt") == "tëxt"

    infos = await async_sandbox.files.write_files(
        [
            {"path": f"{workdir}/m/1.txt", "data": "1"},
            {"path": f"{workdir}/m/2.txt", "data": "2"},
        ]
    )
    assert sorted(i.name for i in infos) == ["1.txt", "2.txt"]

    listing = await async_sandbox.files.list(workdir, depth=2)
    assert [e.path for e in listing] == [
        f"{workdir}/a.bin",
        f"{workdir}/m",
        f"{workdir}/m/1.txt",
        f"{workdir}/m/2.txt",
        f"{workdir}/t.txt",
    ]

    assert await async_sandbox.files.exists(f"{workdir}/m") is True
    assert await async_sandbox.files.make_dir(f"{workdir}/m") is False
    assert await async_sandbox.files.make_dir(f"{workdir}/n") is True

    moved = await async_sandbox.files.rename(f"{workdir}/t.txt", f"{workdir}/n/t.txt")
    assert moved.path == f"{workdir}/n/t.txt"

    info = await async_sandbox.files.get_info(f"{workdir}/n/t.txt")
    assert (info.type, info.size, info.mode) == (FileType.FILE, len("tëxt".encode()), 0o644)

    await async_sandbox.files.remove(f"{workdir}/m")
    assert await async_sandbox.files.exists(f"{workdir}/m") is False


async def test_octet_stream_uploads_run_concurrently(async_sandbox: AsyncSandbox, workdir: str):
    # With file objects the async SDK uploads each entry as its own
    # octet-stream request, all in flight at once (asyncio.gather).
    payloads = {f"{workdir}/c{i}.bin": os.urandom(MIB + i) for i in range(4)}

    infos = await async_sandbox.files.write_files(
        [{"path": p, "data": io.BytesIO(d)} for p, d in payloads.items()]
    )

    assert sorted(i.path for i in infos) == sorted(payloads)
    for path, data in payloads.items():
        assert Path(path).read_bytes() == data


async def test_read_stream(async_sandbox: AsyncSandbox, workdir: str):
    data = os.urandom(8 * MIB)
    Path(f"{workdir}/s.bin").write_bytes(data)

    digest = hashlib.sha256()
    async with await async_sandbox.files.read(f"{workdir}/s.bin", format="stream") as stream:
        async for chunk in stream:
            digest.update(chunk)

    assert digest.digest() == hashlib.sha256(data).digest()


async def test_watch_dir_recursive(async_sandbox: AsyncSandbox, workdir: str):
    events: List[FilesystemEvent] = []
    exits: List[object] = []
    os.mkdir(f"{workdir}/nested")
    handle = await async_sandbox.files.watch_dir(
        workdir, on_event=events.append, on_exit=exits.append, recursive=True, timeout=30
    )
    try:
        await async_sandbox.files.write(f"{workdir}/nested/file.txt", "watched")

        async def written():
            return any(
                e.type == FilesystemEventType.WRITE and e.name == "nested/file.txt"
                for e in events
            )

        await async_wait_until(written, "WRITE of nested/file.txt")
        assert events[0].type == FilesystemEventType.CREATE
        assert events[0].name == "nested/file.txt"
    finally:
        await handle.stop()
    assert exits == [None]  # stop() ends the watch cleanly


async def test_watch_dir_sees_directory_created_later(async_sandbox: AsyncSandbox, workdir: str):
    events: List[FilesystemEvent] = []
    handle = await async_sandbox.files.watch_dir(
        workdir, on_event=events.append, recursive=True, timeout=30
    )
    try:
        await async_sandbox.files.make_dir(f"{workdir}/later")

        async def dir_created():
            return any(e.name == "later" for e in events)

        await async_wait_until(dir_created, "CREATE of later/")
        await async_sandbox.files.write(f"{workdir}/later/f.txt", "x")

        async def file_created():
            return any(
                e.type == FilesystemEventType.CREATE and e.name == "later/f.txt"
                for e in events
            )

        await async_wait_until(file_created, "CREATE of later/f.txt")
    finally:
        await handle.stop()


async def test_watch_missing_directory(async_sandbox: AsyncSandbox, workdir: str):
    with pytest.raises(FileNotFoundException):
        await async_sandbox.files.watch_dir(f"{workdir}/missing", on_event=lambda e: None)


async def test_errors(async_sandbox: AsyncSandbox, workdir: str):
    with pytest.raises(FileNotFoundException):
        await async_sandbox.files.read(f"{workdir}/missing")
    with pytest.raises(FileNotFoundException):
        await async_sandbox.files.get_info(f"{workdir}/missing")
    with pytest.raises(InvalidArgumentException):
        await async_sandbox.commands.run("pwd", cwd=f"{workdir}/missing")
    with pytest.raises(AuthenticationException):
        await async_sandbox.commands.run("whoami", user="e2bsdk-no-such-user")
    with pytest.raises(AuthenticationException):
        await async_sandbox.files.read(f"{workdir}/x", user="e2bsdk-no-such-user")


async def test_concurrent_commands(async_sandbox: AsyncSandbox):
    results = await asyncio.gather(
        *(async_sandbox.commands.run(f"sleep 0.2; echo {i}") for i in range(8))
    )
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(8)]


async def test_user_param(async_sandbox: AsyncSandbox, test_user):
    result = await async_sandbox.commands.run("whoami", user=test_user.name)
    assert result.stdout == f"{test_user.name}\n"
