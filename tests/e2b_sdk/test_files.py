"""``sandbox.files`` through the sync SDK: ``GET/POST /files`` and the
filesystem.Filesystem unary RPCs (Stat, ListDir, MakeDir, Move, Remove)."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import httpx
import pytest

from e2b import FileType, Sandbox
from e2b.sandbox.filesystem.filesystem import WriteEntry

ALL_BYTES = bytes(range(256)) * 16
MIB = 1024 * 1024


# --------------------------------------------------------------------------- #
# write / read
# --------------------------------------------------------------------------- #


def test_write_and_read_text(sandbox: Sandbox, workdir: str):
    path = f"{workdir}/hello.txt"
    content = "héllo wörld\nsecond line ✓\n"

    info = sandbox.files.write(path, content)

    assert info.path == path
    assert info.name == "hello.txt"
    assert info.type == FileType.FILE
    assert sandbox.files.read(path) == content
    assert Path(path).read_text() == content


def test_write_and_read_binary_with_every_byte_value(sandbox: Sandbox, workdir: str):
    path = f"{workdir}/all-bytes.bin"

    sandbox.files.write(path, ALL_BYTES)

    assert Path(path).read_bytes() == ALL_BYTES
    assert sandbox.files.read(path, format="bytes") == bytearray(ALL_BYTES)


def test_write_overwrites_and_truncates(sandbox: Sandbox, workdir: str):
    path = f"{workdir}/over.txt"
    sandbox.files.write(path, "a much longer first version")
    sandbox.files.write(path, "short")
    assert sandbox.files.read(path) == "short"


def test_write_creates_missing_parent_directories(sandbox: Sandbox, workdir: str):
    path = f"{workdir}/a/b/c/deep.txt"

    sandbox.files.write(path, "deep")

    assert sandbox.files.read(path) == "deep"
    parent = sandbox.files.get_info(f"{workdir}/a/b")
    assert parent.type == FileType.DIR
    assert parent.mode == 0o755


def test_write_empty_file(sandbox: Sandbox, workdir: str):
    path = f"{workdir}/empty"
    sandbox.files.write(path, b"")
    assert sandbox.files.read(path, format="bytes") == bytearray()
    assert sandbox.files.get_info(path).size == 0


def test_relative_path_resolves_under_home(sandbox: Sandbox, default_user, home_scratch):
    info = sandbox.files.write(home_scratch, "relative")

    assert info.path == f"{default_user.home}/{home_scratch}"
    assert Path(info.path).read_text() == "relative"
    assert sandbox.files.read(home_scratch) == "relative"
    assert sandbox.files.get_info(home_scratch).path == info.path


def test_write_files_multiple_at_once(sandbox: Sandbox, workdir: str, default_user, home_scratch):
    entries: list[WriteEntry] = [
        {"path": f"{workdir}/one.txt", "data": "first"},
        {"path": f"{workdir}/nested/two.bin", "data": ALL_BYTES},
        {"path": home_scratch, "data": "relative entry"},
    ]

    infos = sandbox.files.write_files(entries)

    assert sorted(i.path for i in infos) == sorted(
        [
            f"{workdir}/one.txt",
            f"{workdir}/nested/two.bin",
            f"{default_user.home}/{home_scratch}",
        ]
    )
    assert all(i.type == FileType.FILE for i in infos)
    assert sandbox.files.read(f"{workdir}/one.txt") == "first"
    assert sandbox.files.read(f"{workdir}/nested/two.bin", format="bytes") == ALL_BYTES
    assert sandbox.files.read(home_scratch) == "relative entry"


def test_write_files_with_a_single_entry(sandbox: Sandbox, workdir: str):
    # One entry: the SDK puts the destination in ?path= as well.
    infos = sandbox.files.write_files([{"path": f"{workdir}/solo.txt", "data": "solo"}])
    assert [i.path for i in infos] == [f"{workdir}/solo.txt"]
    assert sandbox.files.read(f"{workdir}/solo.txt") == "solo"


def test_write_from_file_object_uses_octet_stream(sandbox: Sandbox, workdir: str):
    path = f"{workdir}/from-io.bin"
    data = os.urandom(3 * MIB + 7)

    info = sandbox.files.write(path, io.BytesIO(data))

    assert info.path == path
    assert sandbox.files.read(path, format="bytes") == data


def test_write_from_iterable_of_chunks(sandbox: Sandbox, workdir: str):
    path = f"{workdir}/from-iter.bin"
    chunks = [os.urandom(100_000) for _ in range(20)] + [b"tail"]

    sandbox.files.write(path, iter(chunks))

    assert Path(path).read_bytes() == b"".join(chunks)


def test_write_with_octet_stream_for_bytes(sandbox: Sandbox, workdir: str):
    path = f"{workdir}/octet.bin"
    sandbox.files.write(path, ALL_BYTES, use_octet_stream=True)
    assert Path(path).read_bytes() == ALL_BYTES


def test_gzip_upload_and_download(sandbox: Sandbox, workdir: str):
    path = f"{workdir}/gz.txt"
    content = ("compressible line\n" * 20_000).encode() + ALL_BYTES

    sandbox.files.write(path, content, gzip=True)

    # Stored decompressed...
    assert Path(path).read_bytes() == content
    # ...and served (gzip-encoded on the wire, decoded by the client) intact.
    assert sandbox.files.read(path, format="bytes", gzip=True) == content


def test_read_stream(sandbox: Sandbox, workdir: str):
    path = f"{workdir}/stream.bin"
    data = os.urandom(5 * MIB)
    Path(path).write_bytes(data)

    with sandbox.files.read(path, format="stream") as stream:
        received = b"".join(stream)

    assert received == data


def test_100_mib_round_trip(sandbox: Sandbox, workdir: str):
    size = 100 * MIB
    remote = f"{workdir}/big.bin"
    local_digest = hashlib.sha256()
    with tempfile.TemporaryFile() as local:
        for _ in range(size // MIB):
            block = os.urandom(MIB)
            local_digest.update(block)
            local.write(block)
        local.seek(0)

        info = sandbox.files.write(remote, local)

    assert info.path == remote
    assert sandbox.files.get_info(remote).size == size

    remote_digest = hashlib.sha256()
    received = 0
    with sandbox.files.read(remote, format="stream") as stream:
        for chunk in stream:
            remote_digest.update(chunk)
            received += len(chunk)
    assert received == size
    assert remote_digest.hexdigest() == local_digest.hexdigest()

    in_sandbox = sandbox.commands.run(f"sha256sum {remote}").stdout.split()[0]
    assert in_sandbox == local_digest.hexdigest()


def test_upload_metadata_is_stored_and_reported(sandbox: Sandbox, workdir: str):
    probe = Path(workdir) / "xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.e2b.probe", b"1")
    except OSError as e:
        pytest.skip(f"the filesystem under {workdir} has no user xattrs: {e}")

    path = f"{workdir}/meta.txt"
    info = sandbox.files.write(path, "with metadata", metadata={"Owner": "alice"})

    # Keys are lowercased by envd.
    assert info.metadata == {"owner": "alice"}
    assert sandbox.files.get_info(path).metadata == {"owner": "alice"}
    assert os.getxattr(path, "user.e2b.owner") == b"alice"


# --------------------------------------------------------------------------- #
# list / exists / make_dir / rename / remove
# --------------------------------------------------------------------------- #


def test_list_with_depth(sandbox: Sandbox, workdir: str):
    root = f"{workdir}/tree"
    for rel in ["subdir1/a", "subdir1/b", "subdir2/c"]:
        os.makedirs(f"{root}/{rel}")
    Path(f"{root}/file1.txt").write_text("hello")

    depth1 = sandbox.files.list(root)
    assert [e.path for e in depth1] == [
        f"{root}/file1.txt",
        f"{root}/subdir1",
        f"{root}/subdir2",
    ]
    assert [e.name for e in depth1] == ["file1.txt", "subdir1", "subdir2"]
    assert [e.type for e in depth1] == [FileType.FILE, FileType.DIR, FileType.DIR]
    assert depth1[0].size == 5

    depth2 = sandbox.files.list(root, depth=2)
    assert [e.path for e in depth2] == [
        f"{root}/file1.txt",
        f"{root}/subdir1",
        f"{root}/subdir1/a",
        f"{root}/subdir1/b",
        f"{root}/subdir2",
        f"{root}/subdir2/c",
    ]

    assert [e.path for e in sandbox.files.list(root, depth=5)] == [
        e.path for e in depth2
    ]


def test_list_empty_directory(sandbox: Sandbox, workdir: str):
    assert sandbox.files.list(workdir) == []


def test_exists(sandbox: Sandbox, workdir: str):
    Path(f"{workdir}/present").write_text("x")

    assert sandbox.files.exists(f"{workdir}/present") is True
    assert sandbox.files.exists(workdir) is True
    assert sandbox.files.exists(f"{workdir}/absent") is False


def test_make_dir(sandbox: Sandbox, workdir: str):
    path = f"{workdir}/made/with/parents"

    assert sandbox.files.make_dir(path) is True
    assert os.path.isdir(path)
    assert sandbox.files.make_dir(path) is False  # already there

    info = sandbox.files.get_info(path)
    assert info.type == FileType.DIR
    assert info.mode == 0o755
    assert info.permissions == "drwxr-xr-x"


def test_rename(sandbox: Sandbox, workdir: str):
    old, new = f"{workdir}/old.txt", f"{workdir}/moved/new.txt"
    Path(old).write_text("payload")

    info = sandbox.files.rename(old, new)

    assert info.path == new
    assert info.name == "new.txt"
    assert info.type == FileType.FILE
    assert not os.path.exists(old)
    assert sandbox.files.read(new) == "payload"


def test_remove_file_and_directory(sandbox: Sandbox, workdir: str):
    Path(f"{workdir}/f.txt").write_text("x")
    os.makedirs(f"{workdir}/d/inner")
    Path(f"{workdir}/d/inner/g.txt").write_text("y")

    sandbox.files.remove(f"{workdir}/f.txt")
    sandbox.files.remove(f"{workdir}/d")

    assert not os.path.exists(f"{workdir}/f.txt")
    assert not os.path.exists(f"{workdir}/d")
    assert sandbox.files.exists(f"{workdir}/d") is False


def test_remove_missing_path_is_not_an_error(sandbox: Sandbox, workdir: str):
    sandbox.files.remove(f"{workdir}/never-existed")
    assert os.path.isdir(workdir)


# --------------------------------------------------------------------------- #
# get_info
# --------------------------------------------------------------------------- #


def test_get_info_of_file(sandbox: Sandbox, workdir: str, default_user):
    path = f"{workdir}/info.txt"
    sandbox.files.write(path, "four")

    info = sandbox.files.get_info(path)

    assert info.name == "info.txt"
    assert info.path == path
    assert info.type == FileType.FILE
    assert info.size == 4
    assert info.mode == 0o644
    assert info.permissions == "-rw-r--r--"
    assert info.owner == default_user.name
    assert info.group == default_user.group
    assert info.symlink_target is None
    assert info.metadata is None
    assert abs(info.modified_time.timestamp() - os.stat(path).st_mtime) < 1


def test_get_info_of_directory(sandbox: Sandbox, workdir: str, default_user):
    info = sandbox.files.get_info(workdir)

    assert info.name == os.path.basename(workdir)
    assert info.path == workdir
    assert info.type == FileType.DIR
    assert info.mode == 0o755
    assert info.permissions == "drwxr-xr-x"
    assert info.owner == default_user.name


def test_get_info_of_symlink_to_file(sandbox: Sandbox, workdir: str):
    target = f"{workdir}/target.txt"
    link = f"{workdir}/link"
    Path(target).write_text("pointed at")
    os.chmod(target, 0o644)
    # A relative link: symlink_target must still come back resolved and absolute.
    os.symlink("target.txt", link)

    info = sandbox.files.get_info(link)

    assert info.path == link
    assert info.symlink_target == target
    # envd reports the link with is_symlink=true (EntryInfo field 12) and the
    # target's type on the wire; SDK 2.63 maps is_symlink to FileType.SYMLINK.
    assert info.type == FileType.SYMLINK
    assert info.mode == 0o644  # the target's permission bits
    assert info.permissions == "Lrwxrwxrwx"  # Go's FileMode.String() of the link


def test_stat_symlink_wire_format(envd, workdir: str):
    """The raw Connect answer behind get_info(<symlink>): type is the target's."""
    target = f"{workdir}/target.txt"
    link = f"{workdir}/link"
    Path(target).write_text("pointed at")
    os.symlink(target, link)

    with httpx.Client(trust_env=False, timeout=10) as client:
        r = client.post(
            f"{envd.base_url}/filesystem.Filesystem/Stat",
            json={"path": link},
            headers={"Connect-Protocol-Version": "1"},
        )

    assert r.status_code == 200, r.text
    entry = r.json()["entry"]
    assert entry["type"] == "FILE_TYPE_FILE"
    assert entry["isSymlink"] is True
    assert entry["symlinkTarget"] == target
    assert entry["path"] == link
