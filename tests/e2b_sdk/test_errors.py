"""How envd's errors surface through the sync SDK.

The SDK maps Connect codes (e2b/envd/rpc.py) and /files HTTP statuses
(e2b/envd/api.py): not_found / 404 -> FileNotFoundException in filesystem
calls (NotFoundException elsewhere), invalid_argument / 400 ->
InvalidArgumentException, unauthenticated / 401 -> AuthenticationException
(which is *not* a SandboxException), already_exists -> make_dir returns False.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from e2b import (
    AuthenticationException,
    FileNotFoundException,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
)

from e2bsdk_support import UNKNOWN_PID

NO_SUCH_USER = "e2bsdk-no-such-user"


def test_read_missing_file(sandbox: Sandbox, workdir: str):
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{workdir}/missing.txt")


def test_read_missing_file_as_bytes_and_stream(sandbox: Sandbox, workdir: str):
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{workdir}/missing.bin", format="bytes")
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{workdir}/missing.bin", format="stream")


def test_read_a_directory_is_invalid(sandbox: Sandbox, workdir: str):
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read(workdir)


def test_write_onto_a_directory_is_invalid(sandbox: Sandbox, workdir: str):
    os.mkdir(f"{workdir}/dir")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write(f"{workdir}/dir", "cannot replace a directory")


def test_get_info_of_missing_path(sandbox: Sandbox, workdir: str):
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info(f"{workdir}/missing")


def test_list_missing_directory(sandbox: Sandbox, workdir: str):
    with pytest.raises(FileNotFoundException):
        sandbox.files.list(f"{workdir}/missing")


def test_list_a_file_is_invalid(sandbox: Sandbox, workdir: str):
    Path(f"{workdir}/file").write_text("x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(f"{workdir}/file")


def test_rename_missing_source(sandbox: Sandbox, workdir: str):
    with pytest.raises(FileNotFoundException):
        sandbox.files.rename(f"{workdir}/missing", f"{workdir}/elsewhere")


def test_make_dir_over_a_file_is_invalid(sandbox: Sandbox, workdir: str):
    Path(f"{workdir}/file").write_text("x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.make_dir(f"{workdir}/file")


def test_run_with_missing_cwd(sandbox: Sandbox, workdir: str):
    missing = f"{workdir}/no/such/dir"
    with pytest.raises(InvalidArgumentException) as raised:
        sandbox.commands.run("pwd", cwd=missing)
    assert missing in str(raised.value)


def test_run_as_unknown_user(sandbox: Sandbox):
    with pytest.raises(AuthenticationException) as raised:
        sandbox.commands.run("whoami", user=NO_SUCH_USER)
    assert NO_SUCH_USER in str(raised.value)


def test_pty_as_unknown_user(sandbox: Sandbox):
    with pytest.raises(AuthenticationException):
        sandbox.pty.create(PtySize(rows=24, cols=80), user=NO_SUCH_USER)


def test_filesystem_rpc_as_unknown_user(sandbox: Sandbox, workdir: str):
    with pytest.raises(AuthenticationException):
        sandbox.files.list(workdir, user=NO_SUCH_USER)
    with pytest.raises(AuthenticationException):
        sandbox.files.make_dir(f"{workdir}/x", user=NO_SUCH_USER)
    assert not os.path.exists(f"{workdir}/x")


def test_files_http_as_unknown_user(sandbox: Sandbox, workdir: str):
    Path(f"{workdir}/f").write_text("x")
    with pytest.raises(AuthenticationException):
        sandbox.files.read(f"{workdir}/f", user=NO_SUCH_USER)
    with pytest.raises(AuthenticationException):
        sandbox.files.write(f"{workdir}/g", "x", user=NO_SUCH_USER)
    assert not os.path.exists(f"{workdir}/g")


def test_kill_unknown_pid(sandbox: Sandbox):
    assert sandbox.commands.kill(UNKNOWN_PID) is False


def test_connect_to_unknown_pid(sandbox: Sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(UNKNOWN_PID)


def test_send_stdin_to_unknown_pid(sandbox: Sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.send_stdin(UNKNOWN_PID, "nobody listens")


def test_send_stdin_without_stdin_enabled(sandbox: Sandbox):
    handle = sandbox.commands.run("sleep 30", background=True, timeout=60)
    try:
        # The SDK sends stdin=false by default: envd opens no stdin pipe.
        with pytest.raises(SandboxException):
            sandbox.commands.send_stdin(handle.pid, "ignored")
    finally:
        sandbox.commands.kill(handle.pid)


def test_resize_unknown_pty(sandbox: Sandbox):
    with pytest.raises(NotFoundException):
        sandbox.pty.resize(UNKNOWN_PID, PtySize(rows=10, cols=10))

