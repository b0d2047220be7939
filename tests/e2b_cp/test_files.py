"""``sandbox.files``: envd's ``/files`` (upload/download, multipart and
octet-stream, gzip) and ``filesystem.Filesystem`` RPCs through the data
plane, watchers (sync: CreateWatcher/GetWatcherEvents; async: the WatchDir
stream), and signed upload/download URLs (``v1_`` signatures over
``path:op:user:token[:exp]``, e2b/sandbox/signature.py)."""

from __future__ import annotations

import asyncio
import gzip
import os

import httpx
import pytest
from e2b import (
    EntryInfo,
    FileNotFoundException,
    FilesystemEventType,
    FileType,
    Sandbox,
    WriteInfo,
)

from e2bcp_support import poll

DATA = bytes(range(256)) * 1024  # 256 KiB of every byte value


def test_write_read(sandbox: Sandbox) -> None:
    info = sandbox.files.write("/tmp/f/hello.txt", "hello ü")
    assert isinstance(info, WriteInfo)
    assert (info.path, info.name, info.type) == ("/tmp/f/hello.txt", "hello.txt", FileType.FILE)
    assert sandbox.files.read("/tmp/f/hello.txt") == "hello ü"
    sandbox.files.write("/tmp/f/bin", DATA)
    assert bytes(sandbox.files.read("/tmp/f/bin", format="bytes")) == DATA
    assert b"".join(sandbox.files.read("/tmp/f/bin", format="stream")) == DATA
    assert bytes(sandbox.files.read("/tmp/f/bin", format="bytes", gzip=True)) == DATA
    # relative paths are under the default user's home
    assert sandbox.files.write("rel/x.txt", "r").path == "/home/user/rel/x.txt"
    assert sandbox.files.read("/home/user/rel/x.txt") == "r"


def test_write_variants(sandbox: Sandbox) -> None:
    infos = sandbox.files.write_files([
        {"path": "/tmp/m/a.txt", "data": "A"},
        {"path": "/tmp/m/b.bin", "data": b"B" * 10},
    ])
    assert sorted(i.path for i in infos) == ["/tmp/m/a.txt", "/tmp/m/b.bin"]
    # octet-stream (streamed iterable) and gzip uploads
    sandbox.files.write("/tmp/m/stream", (DATA[i:i + 65536] for i in range(0, len(DATA), 65536)))
    assert bytes(sandbox.files.read("/tmp/m/stream", format="bytes")) == DATA
    sandbox.files.write("/tmp/m/gz", DATA, gzip=True)
    assert bytes(sandbox.files.read("/tmp/m/gz", format="bytes")) == DATA
    meta = sandbox.files.write("/tmp/m/meta", "x", metadata={"Owner": "me"})
    assert meta.metadata == {"owner": "me"}
    assert sandbox.files.get_info("/tmp/m/meta").metadata == {"owner": "me"}


def test_big_file(sandbox: Sandbox) -> None:
    blob = os.urandom(32 * 1024 * 1024)
    sandbox.files.write("/tmp/big.bin", blob)
    r = sandbox.commands.run("stat -c %s /tmp/big.bin")
    assert r.stdout.strip() == str(len(blob))
    assert bytes(sandbox.files.read("/tmp/big.bin", format="bytes")) == blob


def test_list_info_dirs(sandbox: Sandbox) -> None:
    sandbox.files.write("/tmp/l/a.txt", "a")
    sandbox.files.write("/tmp/l/sub/b.txt", "bb")
    entries = sandbox.files.list("/tmp/l")
    assert sorted((e.name, e.type) for e in entries) == [("a.txt", FileType.FILE), ("sub", FileType.DIR)]
    deep = sandbox.files.list("/tmp/l", depth=2)
    assert sorted(e.path for e in deep) == ["/tmp/l/a.txt", "/tmp/l/sub", "/tmp/l/sub/b.txt"]

    info = sandbox.files.get_info("/tmp/l/sub/b.txt")
    assert isinstance(info, EntryInfo)
    assert (info.size, info.mode, info.permissions) == (2, 0o644, "-rw-r--r--")
    assert (info.owner, info.group) == ("user", "user")
    assert sandbox.files.exists("/tmp/l/a.txt") and not sandbox.files.exists("/tmp/l/nope")
    assert sandbox.files.make_dir("/tmp/l/new/deep") is True
    assert sandbox.files.make_dir("/tmp/l/new/deep") is False  # already_exists
    moved = sandbox.files.rename("/tmp/l/a.txt", "/tmp/l/new/a2.txt")
    assert moved.path == "/tmp/l/new/a2.txt"
    sandbox.files.remove("/tmp/l/new")
    sandbox.files.remove("/tmp/l/new")  # missing: no error
    assert not sandbox.files.exists("/tmp/l/new")
    with pytest.raises(FileNotFoundException):
        sandbox.files.read("/tmp/l/new/a2.txt")
    with pytest.raises(FileNotFoundException):
        sandbox.files.list("/tmp/l/new")


def test_files_as_root(sandbox: Sandbox) -> None:
    sandbox.files.write("/root/secret.txt", "s", user="root")
    assert sandbox.files.read("/root/secret.txt", user="root") == "s"
    assert sandbox.files.get_info("/root/secret.txt", user="root").owner == "root"
    # Without `user=` the default user acts: what it writes is its own.
    # (Reads are not permission-checked per user: envd reads as root, as
    # E2B's envd does.)
    sandbox.files.write("/tmp/mine.txt", "m")
    assert sandbox.files.get_info("/tmp/mine.txt").owner == "user"


def test_watch_sync(sandbox: Sandbox) -> None:
    sandbox.files.make_dir("/tmp/w/nested")
    handle = sandbox.files.watch_dir("/tmp/w", recursive=True)
    try:
        sandbox.files.write("/tmp/w/new.txt", "x")
        sandbox.files.write("/tmp/w/nested/file", "y")
        sandbox.commands.run("rm /tmp/w/new.txt")
        seen: list = []

        def got_all():
            seen.extend(handle.get_new_events())
            names = {(e.name, e.type) for e in seen}
            return {("new.txt", FilesystemEventType.CREATE), ("new.txt", FilesystemEventType.WRITE),
                    ("nested/file", FilesystemEventType.CREATE),
                    ("new.txt", FilesystemEventType.REMOVE)} <= names

        poll(got_all, timeout=15, what="watch events")
    finally:
        handle.stop()


async def test_watch_async(async_sandbox) -> None:
    await async_sandbox.files.make_dir("/tmp/aw")
    events: list = []
    handle = await async_sandbox.files.watch_dir("/tmp/aw", events.append, timeout=0)
    try:
        await async_sandbox.files.write("/tmp/aw/f.txt", "x")
        for _ in range(150):
            if any(e.name == "f.txt" and e.type == FilesystemEventType.WRITE for e in events):
                break
            await asyncio.sleep(0.1)
        assert any(e.name == "f.txt" and e.type == FilesystemEventType.CREATE for e in events), events
    finally:
        await handle.stop()


# --------------------------------------------------------------------------- #
# Signed URLs
# --------------------------------------------------------------------------- #


def _routed(server, sandbox: Sandbox) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49983"}


def _host_form(server, sandbox: Sandbox, url: str) -> tuple[str, dict[str, str]]:
    """The same request to the server's address with Host ``49983-{id}.{domain}``
    (what the URL would be without E2B_SANDBOX_URL: sandbox/main.py:356-367)."""
    u = httpx.URL(url)
    return str(u.copy_with(scheme="http", host="127.0.0.1", port=server.port)), {
        "Host": f"49983-{sandbox.sandbox_id}.{sandbox.sandbox_domain}"
    }


def test_signed_download_upload(sandbox: Sandbox, server) -> None:
    sandbox.files.write("/tmp/s/dl file.bin", DATA)
    url = sandbox.download_url("/tmp/s/dl file.bin")
    assert url.startswith(server.sandbox_url + "/files?") and "signature=v1_" in url
    assert "signature_expiration" not in url
    with httpx.Client(trust_env=False, timeout=60) as h:
        # (a) routed by the SDK's headers, no access token: the signature suffices
        r = h.get(url, headers=_routed(server, sandbox))
        assert r.status_code == 200, r.text
        assert r.content == DATA
        # (b) routed by Host
        u, hdr = _host_form(server, sandbox, url)
        r = h.get(u, headers=hdr)
        assert r.status_code == 200 and r.content == DATA, r.text

        up = sandbox.upload_url("/tmp/s/up.txt")
        r = h.post(up, files={"file": ("up.txt", b"uploaded")}, headers=_routed(server, sandbox))
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body, list) and body[0]["path"] == "/tmp/s/up.txt", body
        assert sandbox.files.read("/tmp/s/up.txt") == "uploaded"
        u, hdr = _host_form(server, sandbox, sandbox.upload_url("/tmp/s/up2.txt"))
        r = h.post(u, files={"file": ("up2.txt", b"two")}, headers=hdr)
        assert r.status_code == 200, r.text
        assert sandbox.files.read("/tmp/s/up2.txt") == "two"

        # a user's file: the signature covers the username
        sandbox.files.write("/root/r.txt", "root only", user="root")
        r = h.get(sandbox.download_url("/root/r.txt", user="root"), headers=_routed(server, sandbox))
        assert r.status_code == 200 and r.text == "root only", r.text


def test_signed_url_without_routing(sandbox: Sandbox, server) -> None:
    """With E2B_SANDBOX_URL the SDK's URL names no sandbox (sandbox/main.py:109,
    connection_config.py:361-362); a browser or curl sends no E2b-Sandbox-Id.
    The server finds the sandbox whose envd token verifies the signature."""
    sandbox.files.write("/tmp/bare.txt", "bare")
    with httpx.Client(trust_env=False, timeout=60) as h:
        r = h.get(sandbox.download_url("/tmp/bare.txt", use_signature_expiration=120))
        assert r.status_code == 200 and r.text == "bare", r.text
        r = h.post(sandbox.upload_url("/tmp/bare2.txt"), files={"file": ("x", b"up")})
        assert r.status_code == 200, r.text
    assert sandbox.files.read("/tmp/bare2.txt") == "up"


def test_signature_expiry_and_tampering(sandbox: Sandbox, server) -> None:
    sandbox.files.write("/tmp/e.txt", "e")
    with httpx.Client(trust_env=False, timeout=60) as h:
        ok = sandbox.download_url("/tmp/e.txt", use_signature_expiration=60)
        assert "signature_expiration=" in ok
        assert h.get(ok, headers=_routed(server, sandbox)).text == "e"

        expired = sandbox.download_url("/tmp/e.txt", use_signature_expiration=-10)
        r = h.get(expired, headers=_routed(server, sandbox))
        assert r.status_code == 401
        assert r.json() == {"code": 401, "message": "signature is already expired"}

        other_path = ok.replace("%2Fe.txt", "%2Fetc%2Fshadow").replace("/e.txt", "/etc/shadow")
        r = h.get(other_path, headers=_routed(server, sandbox))
        assert r.status_code == 401, r.text

        unsigned = f"{server.sandbox_url}/files?path=%2Ftmp%2Fe.txt"
        r = h.get(unsigned, headers=_routed(server, sandbox))
        assert r.status_code == 401, r.text
        assert r.json()["code"] == 401


def test_signature_of_another_sandbox(make_sandbox, server) -> None:
    a, b = make_sandbox(), make_sandbox()
    a.files.write("/tmp/x.txt", "a")
    b.files.write("/tmp/x.txt", "b")
    url_b = b.download_url("/tmp/x.txt")
    with httpx.Client(trust_env=False, timeout=60) as h:
        r = h.get(url_b, headers={"E2b-Sandbox-Id": a.sandbox_id, "E2b-Sandbox-Port": "49983"})
        assert r.status_code == 401, r.text
        r = h.get(url_b, headers={"E2b-Sandbox-Id": b.sandbox_id, "E2b-Sandbox-Port": "49983"})
        assert r.text == "b"


def test_access_token_header(sandbox: Sandbox, server) -> None:
    """``X-Access-Token`` (the create response's ``envdAccessToken``) opens
    /files without a signature; a wrong one is refused."""
    token = sandbox._envd_access_token  # the SDK's own copy (sandbox/main.py:58-61)
    assert isinstance(token, str) and token
    sandbox.files.write("/tmp/t.txt", "t")
    with server.data_plane(sandbox.sandbox_id) as h:
        r = h.get("/files", params={"path": "/tmp/t.txt"}, headers={"X-Access-Token": token})
        assert r.status_code == 200 and r.text == "t"
        r = h.get("/files", params={"path": "/tmp/t.txt"}, headers={"X-Access-Token": "wrong"})
        assert r.status_code == 401
        r = h.get("/files", params={"path": "/tmp/t.txt", "username": "root"},
                  headers={"X-Access-Token": token, "Accept-Encoding": "gzip"})
        assert r.status_code == 200 and r.text == "t"
        raw = gzip.compress(b"gz upload")
        r = h.post("/files", params={"path": "/tmp/gz.txt"}, content=raw,
                   headers={"X-Access-Token": token, "Content-Type": "application/octet-stream",
                            "Content-Encoding": "gzip"})
        assert r.status_code == 200, r.text
    assert sandbox.files.read("/tmp/gz.txt") == "gz upload"


def test_paths_that_are_not_utf8_are_refused(sandbox: Sandbox, server) -> None:
    """``%FF`` and ``%FE`` both decoded to U+FFFD, so two byte paths named
    one file: a path that is not UTF-8 once decoded is a 400, and nothing
    is written. A path ending in ``/`` names a directory: refused too."""
    token = sandbox._envd_access_token
    auth = {"X-Access-Token": token, "Content-Type": "application/octet-stream"}
    with server.data_plane(sandbox.sandbox_id) as h:
        r = h.post("/files?path=/tmp/%FF%FD", content=b"x", headers=auth)
        assert r.status_code == 400, r.text
        r = h.get("/files?path=/tmp/%FF%FE", headers={"X-Access-Token": token})
        assert r.status_code == 400, r.text
        r = h.post("/files?path=/tmp/newdir/", content=b"x", headers=auth)
        assert r.status_code == 400, r.text
    names = {e.name for e in sandbox.files.list("/tmp")}
    assert not names & {"\ufffd\ufffd", "newdir"}, names
