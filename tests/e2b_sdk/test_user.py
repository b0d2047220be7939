"""The ``user=`` parameter: ``Authorization: Basic base64("<user>:")`` on Start
and filesystem RPCs, ``?username=`` on ``/files``.

Needs root: the session creates the throwaway user ``wrenntest`` before envd
starts and deletes it at the end; without root these tests are skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from e2b import FileType, PtySize, Sandbox

from e2bsdk_support import PtyReader


@pytest.fixture
def user_dir(workdir: str, test_user) -> str:
    """A directory inside ``workdir`` owned by the test user."""
    path = f"{workdir}/owned-by-{test_user.name}"
    os.mkdir(path)
    os.chown(path, test_user.uid, test_user.gid)
    return path


@pytest.fixture
def user_home_scratch(test_user):
    name = "e2bsdk-user-scratch.txt"
    yield name
    Path(test_user.home, name).unlink(missing_ok=True)


def test_run_as_user(sandbox: Sandbox, test_user):
    result = sandbox.commands.run('whoami; id -g -n; echo "$HOME"; pwd', user=test_user.name)
    assert result.stdout.splitlines() == [
        test_user.name,
        test_user.group,
        test_user.home,
        test_user.home,  # default cwd is the user's home
    ]


def test_run_as_root_explicitly(sandbox: Sandbox, test_user):
    assert sandbox.commands.run("id -u", user="root").stdout == "0\n"


def test_process_of_user_lacks_root_rights(sandbox: Sandbox, test_user, workdir: str):
    # workdir is root-owned 0755: the user may read it but not create in it.
    result = sandbox.commands.run(
        f"touch {workdir}/forbidden 2>&1 || echo denied", user=test_user.name
    )
    assert "denied" in result.stdout
    assert not os.path.exists(f"{workdir}/forbidden")


def test_write_relative_path_as_user(sandbox: Sandbox, test_user, user_home_scratch):
    info = sandbox.files.write(user_home_scratch, "mine", user=test_user.name)

    expected = f"{test_user.home}/{user_home_scratch}"
    assert info.path == expected
    stat = os.stat(expected)
    assert (stat.st_uid, stat.st_gid) == (test_user.uid, test_user.gid)
    assert sandbox.files.read(user_home_scratch, user=test_user.name) == "mine"


def test_file_info_reports_user_as_owner(sandbox: Sandbox, test_user, user_dir: str):
    path = f"{user_dir}/owned.txt"
    sandbox.files.write(path, "x", user=test_user.name)

    info = sandbox.files.get_info(path, user=test_user.name)

    assert info.owner == test_user.name
    assert info.group == test_user.group
    assert info.mode == 0o644


def test_make_dir_as_user_is_owned_by_user(sandbox: Sandbox, test_user, user_dir: str):
    path = f"{user_dir}/a/b"

    assert sandbox.files.make_dir(path, user=test_user.name) is True

    for created in (f"{user_dir}/a", path):
        stat = os.stat(created)
        assert (stat.st_uid, stat.st_gid) == (test_user.uid, test_user.gid)
    entries = sandbox.files.list(user_dir, user=test_user.name)
    assert [(e.name, e.type, e.owner) for e in entries] == [
        ("a", FileType.DIR, test_user.name)
    ]


def test_upload_creates_parents_owned_by_user(sandbox: Sandbox, test_user, user_dir: str):
    sandbox.files.write(f"{user_dir}/p/q/file.txt", "nested", user=test_user.name)

    for created in (f"{user_dir}/p", f"{user_dir}/p/q", f"{user_dir}/p/q/file.txt"):
        stat = os.stat(created)
        assert (stat.st_uid, stat.st_gid) == (test_user.uid, test_user.gid)


def test_pty_as_user(sandbox: Sandbox, test_user):
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80), user=test_user.name, timeout=60)
    reader = PtyReader(terminal)
    try:
        sandbox.pty.send_stdin(terminal.pid, b'echo "who-$((1+1)):$(whoami):$PWD"\n')
        reader.expect(f"who-2:{test_user.name}:{test_user.home}".encode())
    finally:
        sandbox.pty.kill(terminal.pid)
