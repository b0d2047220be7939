"""``capsule.files``: read/write, list, exists, make_dir, remove and the
streaming upload/download; sync and async."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import httpx
import pytest
from wrenn import AsyncCapsule, Capsule, FileEntry, WrennError, WrennNotFoundError, WrennValidationError
from wrennsdk_support import StreamedData

BIG = 100 * 1024 * 1024  # 100 MiB


def test_write_read_text(capsule: Capsule) -> None:
    text = "hello wörld ✓\nline 2\n"
    assert capsule.files.write("/tmp/t.txt", text) is None
    assert capsule.files.read("/tmp/t.txt") == text
    assert capsule.files.read_bytes("/tmp/t.txt") == text.encode()
    # the file is really there, byte for byte
    assert capsule.commands.run("sha256sum /tmp/t.txt").stdout.split()[0] == hashlib.sha256(
        text.encode()
    ).hexdigest()


def test_write_read_bytes(capsule: Capsule) -> None:
    data = bytes(range(256)) * 64
    capsule.files.write("/tmp/b.bin", data)
    assert capsule.files.read_bytes("/tmp/b.bin") == data
    # invalid UTF-8 reads as text with replacement characters
    assert capsule.files.read("/tmp/b.bin").count("\ufffd") > 0


def test_write_empty_overwrite_and_parents(capsule: Capsule) -> None:
    capsule.files.write("/tmp/deep/er/still/f.txt", "x")  # parents created
    assert capsule.files.read("/tmp/deep/er/still/f.txt") == "x"
    capsule.files.write("/tmp/deep/er/still/f.txt", "shorter")
    capsule.files.write("/tmp/deep/er/still/f.txt", "s")  # truncates
    assert capsule.files.read("/tmp/deep/er/still/f.txt") == "s"
    capsule.files.write("/tmp/empty", b"")
    assert capsule.files.read_bytes("/tmp/empty") == b""


def test_generated_files_read_whole(capsule: Capsule) -> None:
    """Files whose size says 0 but that have contents (/proc) come back as
    ``cat`` shows them, read or streamed, not as nothing."""
    want = capsule.commands.run("cat /proc/version").stdout.encode()
    assert want.startswith(b"Linux version"), want
    assert capsule.files.read_bytes("/proc/version") == want
    assert b"".join(capsule.files.download_stream("/proc/version")) == want


def test_written_file_is_usable_by_commands(capsule: Capsule) -> None:
    capsule.files.write("/tmp/script.sh", "echo from-script\n")
    assert capsule.commands.run("sh /tmp/script.sh").stdout == "from-script\n"
    capsule.commands.run("echo made-by-shell > /tmp/shell.txt")
    assert capsule.files.read("/tmp/shell.txt") == "made-by-shell\n"


def test_writing_mounted_files_devices_and_fifos(capsule: Capsule) -> None:
    """``/etc/hosts`` and ``/etc/resolv.conf`` are files the runtime bind
    mounts: written over in place (a staged copy cannot be renamed over a
    mount point: that was a 502 "rename"). A device is written through,
    never replaced by a plain file (``/dev/null`` became one). A FIFO is
    refused at once (opening it would wait for a reader)."""
    hosts = capsule.files.read("/etc/hosts")
    capsule.files.write("/etc/hosts", hosts + "10.9.9.9 wrenn-test-host\n")
    assert capsule.commands.run("getent hosts wrenn-test-host || grep wrenn-test-host /etc/hosts").exit_code == 0
    capsule.files.write("/etc/resolv.conf", "nameserver 10.9.9.8\n")
    assert capsule.files.read("/etc/resolv.conf") == "nameserver 10.9.9.8\n"
    assert not [e for e in capsule.files.list("/etc") if ".wrenn-upload-" in e.name]

    capsule.files.write("/dev/null", "gone")
    assert capsule.commands.run("stat -c %F /dev/null").stdout.strip() == "character special file"
    with pytest.raises(WrennError) as full:
        capsule.files.write("/dev/full", "x")
    assert 400 <= full.value.status_code < 600 and "/dev/full" in str(full.value), full.value
    assert capsule.commands.run("stat -c %F /dev/full").stdout.strip() == "character special file"

    assert capsule.commands.run("mkfifo /tmp/fifo-w").exit_code == 0
    with pytest.raises(WrennValidationError, match="FIFO"):
        capsule.files.write("/tmp/fifo-w", "x")


def test_a_pause_ends_a_download(make_capsule) -> None:
    """A download open when its capsule is paused ends at once with an
    error, as streams do (its envd is frozen: before, the client waited
    until its own read timeout). After the resume the file reads whole."""
    c = make_capsule(wait=True)
    size = 400_000_000
    assert c.commands.run(f"head -c {size} /dev/zero > /tmp/big").exit_code == 0
    got = 0
    started = time.monotonic()
    with pytest.raises(Exception) as ended:
        for chunk in c.files.download_stream("/tmp/big"):
            if got == 0:
                c.pause()
            got += len(chunk)
    assert not isinstance(ended.value, httpx.TimeoutException), ended.value
    assert got < size and time.monotonic() - started < 25, (got, ended.value)
    c.resume()
    assert sum(len(b) for b in c.files.download_stream("/tmp/big")) == size


def test_list(capsule: Capsule) -> None:
    capsule.files.write("/tmp/ls/a.txt", "aaa")
    capsule.files.write("/tmp/ls/sub/b.txt", "bb")
    capsule.commands.run("ln -s a.txt /tmp/ls/link")
    entries = capsule.files.list("/tmp/ls")
    assert all(isinstance(e, FileEntry) for e in entries)
    by = {e.name: e for e in entries}
    assert set(by) == {"a.txt", "sub", "link"}, by
    a = by["a.txt"]
    assert a.type == "file" and a.size == 3 and a.path == "/tmp/ls/a.txt"
    assert isinstance(a.permissions, str) and a.permissions.startswith("-")
    assert isinstance(a.mode, int)
    assert isinstance(a.modified_at, int) and abs(a.modified_at - time.time()) < 600
    assert by["sub"].type == "directory" and by["sub"].path == "/tmp/ls/sub"
    assert by["link"].type == "symlink"
    assert by["link"].symlink_target in ("a.txt", "/tmp/ls/a.txt")

    deep = {e.path for e in capsule.files.list("/tmp/ls", depth=2)}
    assert "/tmp/ls/sub/b.txt" in deep and "/tmp/ls/a.txt" in deep
    assert capsule.files.list("/tmp/ls/sub") and capsule.files.list("/tmp/ls/sub")[0].name == "b.txt"


def test_list_empty_and_special_files(capsule: Capsule) -> None:
    capsule.files.make_dir("/tmp/emptydir")
    assert capsule.files.list("/tmp/emptydir") == []
    # a FIFO and a socket must not break the listing (type is file/directory/symlink only)
    capsule.commands.run(
        "mkdir -p /tmp/special && mkfifo /tmp/special/fifo && "
        "python3 -c \"import socket; s=socket.socket(socket.AF_UNIX); s.bind('/tmp/special/sock')\""
    )
    names = {e.name for e in capsule.files.list("/tmp/special")}
    assert names <= {"fifo", "sock"}
    assert capsule.files.list("/dev")  # a directory full of devices lists fine


def test_exists(capsule: Capsule) -> None:
    capsule.files.write("/tmp/ex/here.txt", "1")
    assert capsule.files.exists("/tmp/ex/here.txt") is True
    assert capsule.files.exists("/tmp/ex") is True
    assert capsule.files.exists("/tmp/ex/nothere.txt") is False
    assert capsule.files.exists("/tmp/no-such-dir/x") is False


def test_make_dir_idempotent(capsule: Capsule) -> None:
    e = capsule.files.make_dir("/tmp/md/a/b")
    assert isinstance(e, FileEntry) and e.type == "directory" and e.name == "b"
    assert e.path in (None, "/tmp/md/a/b")
    again = capsule.files.make_dir("/tmp/md/a/b")
    assert again.type == "directory" and again.name == "b"
    assert capsule.commands.run("test -d /tmp/md/a/b && echo y").stdout == "y\n"


def test_remove(capsule: Capsule) -> None:
    capsule.files.write("/tmp/rm/f.txt", "x")
    capsule.files.write("/tmp/rm/d/g.txt", "y")
    assert capsule.files.remove("/tmp/rm/f.txt") is None
    assert not capsule.files.exists("/tmp/rm/f.txt")
    capsule.files.remove("/tmp/rm")  # recursive
    assert not capsule.files.exists("/tmp/rm")
    with pytest.raises(WrennNotFoundError):
        capsule.files.remove("/tmp/rm")


def test_missing_paths_are_not_found(capsule: Capsule) -> None:
    with pytest.raises(WrennNotFoundError) as ei:
        capsule.files.read("/tmp/definitely/missing.txt")
    assert ei.value.code == "not_found" and ei.value.status_code == 404
    with pytest.raises(WrennNotFoundError):
        capsule.files.read_bytes("/tmp/missing.bin")
    with pytest.raises(WrennNotFoundError):
        capsule.files.list("/tmp/no-such-dir")
    with pytest.raises(httpx.HTTPStatusError) as hi:
        b"".join(capsule.files.download_stream("/tmp/missing.bin"))
    assert hi.value.response.status_code == 404


def test_stream_round_trip_100mib(capsule: Capsule) -> None:
    up = StreamedData(BIG, chunk=1 << 20, seed=7)
    capsule.files.upload_stream("/var/tmp/big.bin", iter(up))
    assert up.produced == BIG
    want = up.sha.hexdigest()

    got, n = hashlib.sha256(), 0
    for chunk in capsule.files.download_stream("/var/tmp/big.bin"):
        got.update(chunk)
        n += len(chunk)
    assert n == BIG
    assert got.hexdigest() == want
    inside = capsule.commands.run("sha256sum /var/tmp/big.bin", timeout=60).stdout.split()[0]
    assert inside == want
    entry = next(e for e in capsule.files.list("/var/tmp") if e.name == "big.bin")
    assert entry.size == BIG


def test_stream_small_and_str_chunks(capsule: Capsule) -> None:
    capsule.files.upload_stream("/tmp/s/small.txt", iter(["ab", b"cd", "é"]))
    assert capsule.files.read("/tmp/s/small.txt") == "abcdé"
    assert b"".join(capsule.files.download_stream("/tmp/s/small.txt")) == "abcdé".encode()
    capsule.files.upload_stream("/tmp/s/empty", iter([]))
    assert b"".join(capsule.files.download_stream("/tmp/s/empty")) == b""


async def test_uploads_given_up_leave_no_partial_file(server) -> None:
    """``files.write`` and ``upload_stream`` tasks cancelled part way (the
    client hangs up): each file is whole or absent, as files/write
    promises. Before, the agent saw the stream to it end cleanly when the
    handler was dropped, and kept a truncated file (3 in 10 here)."""
    data = os.urandom(90 << 20)

    async def chunks():
        for i in range(0, len(data), 1 << 20):
            yield data[i:i + (1 << 20)]
            await asyncio.sleep(0)

    c = await AsyncCapsule.create(template="minimal", wait=True, api_key=server.api_key, base_url=server.base_url)
    async with c:
        tries = []
        for n in range(20):
            path = f"/tmp/given-up-{n}.bin"
            work = c.files.write(path, data) if n % 2 == 0 else c.files.upload_stream(path, chunks())
            t = asyncio.create_task(work)
            await asyncio.sleep(0.15 + 0.05 * (n % 10))
            t.cancel()
            try:
                await t
                tries.append((path, "completed"))
            except asyncio.CancelledError:
                tries.append((path, "cancelled"))
        await asyncio.sleep(2)
        for path, how in tries:
            size = (await c.commands.run(f"stat -c %s {path} 2>/dev/null || echo none")).stdout.strip()
            assert size in ("none", str(len(data))), f"{path} ({how}): {size} of {len(data)} bytes"
        assert any(how == "cancelled" for _, how in tries), tries


async def test_async_files(server) -> None:
    c = await AsyncCapsule.create(template="minimal", wait=True, api_key=server.api_key, base_url=server.base_url)
    async with c:
        await c.files.write("/tmp/a/x.txt", "async ✓")
        assert await c.files.read("/tmp/a/x.txt") == "async ✓"
        await c.files.write("/tmp/a/y.bin", b"\x00\xff")
        assert await c.files.read_bytes("/tmp/a/y.bin") == b"\x00\xff"
        names = {e.name for e in await c.files.list("/tmp/a")}
        assert names == {"x.txt", "y.bin"}
        assert await c.files.exists("/tmp/a/x.txt")
        assert not await c.files.exists("/tmp/a/z")
        d = await c.files.make_dir("/tmp/a/dir")
        assert d.type == "directory"
        assert (await c.files.make_dir("/tmp/a/dir")).type == "directory"
        await c.files.remove("/tmp/a/dir")
        assert not await c.files.exists("/tmp/a/dir")
        with pytest.raises(WrennNotFoundError):
            await c.files.read("/tmp/a/missing")
        with pytest.raises(WrennNotFoundError):
            await c.files.list("/tmp/missing-dir")
        with pytest.raises(WrennNotFoundError):
            await c.files.remove("/tmp/a/missing")

        up = StreamedData(8 * 1024 * 1024, chunk=1 << 20, seed=9)
        await c.files.upload_stream("/var/tmp/abig.bin", up.aiter())
        got = hashlib.sha256()
        async for chunk in c.files.download_stream("/var/tmp/abig.bin"):
            got.update(chunk)
        assert got.hexdigest() == up.sha.hexdigest()
        with pytest.raises(httpx.HTTPStatusError):
            async for _ in c.files.download_stream("/var/tmp/nope.bin"):
                pass
