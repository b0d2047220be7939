"""Snapshot templates: ``snapshots.create/list/delete`` and
``capsule.create_snapshot``; capsules booted from a snapshot see its files."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from wrenn import (
    AsyncCapsule,
    AsyncWrennClient,
    Capsule,
    WrennClient,
    WrennConflictError,
    WrennError,
    WrennForbiddenError,
    WrennNotFoundError,
    WrennValidationError,
)
from wrenn.models import Status, Template
from wrennsdk_support import SAFE_NAME, unique, unknown_capsule_id

MARK = "/var/tmp/snap-marker.txt"


@pytest.fixture
def snapshot_names(client: WrennClient):
    """Names to delete after the test (missing ones are fine)."""
    names: list[str] = []
    yield names
    for n in names:
        try:
            client.snapshots.delete(n)
        except WrennNotFoundError:
            pass


def _running(c: Capsule) -> None:
    """Snapshotting may leave the capsule paused: make it run again."""
    if c.get_info().status == Status.paused:
        c.resume(wait=True)
    else:
        c.wait_ready()


def test_named_snapshot_boots_with_the_file(client: WrennClient, capsule: Capsule, make_capsule,
                                            snapshot_names) -> None:
    capsule.files.write(MARK, "v1")
    name = unique("snap")
    snapshot_names.append(name)
    t = client.snapshots.create(capsule.capsule_id, name=name)
    assert isinstance(t, Template)
    assert t.name == name and t.type == "snapshot"
    assert t.created_at is not None and t.created_at.tzinfo is not None
    assert t.size_bytes is None or t.size_bytes > 0
    assert t.platform in (None, False) and t.protected in (None, False)
    assert capsule.get_info().status in {Status.running, Status.paused}

    c2 = make_capsule(template=name, wait=True)
    assert c2.info is not None and c2.info.template == name
    assert c2.files.read(MARK) == "v1"
    assert c2.commands.run("echo from-snapshot").stdout == "from-snapshot\n"

    # the source capsule is still usable
    _running(capsule)
    assert capsule.files.read(MARK) == "v1"


def test_unnamed_snapshot(client: WrennClient, capsule: Capsule, snapshot_names) -> None:
    t = capsule.create_snapshot()
    assert t.name and SAFE_NAME.match(t.name), t.name
    snapshot_names.append(t.name)
    assert t.type == "snapshot"
    assert t.name in [s.name for s in client.snapshots.list()]


def test_list_filters(client: WrennClient, capsule: Capsule, snapshot_names) -> None:
    name = unique("snapls")
    snapshot_names.append(name)
    capsule.create_snapshot(name=name)

    every = client.snapshots.list()
    assert isinstance(every, list) and all(isinstance(t, Template) for t in every)
    assert name in [t.name for t in every]
    snaps = client.snapshots.list(type="snapshot")
    assert name in [t.name for t in snaps] and all(t.type == "snapshot" for t in snaps)
    bases = client.snapshots.list(type="base")
    assert all(t.type == "base" for t in bases)
    assert name not in [t.name for t in bases]
    assert "minimal" in [t.name for t in bases]
    assert client.snapshots.list(type="custom") == []
    mine = next(t for t in every if t.name == name)
    assert mine.created_at is not None


def test_overwrite(client: WrennClient, capsule: Capsule, make_capsule, snapshot_names) -> None:
    name = unique("snapow")
    snapshot_names.append(name)
    capsule.files.write(MARK, "first")
    capsule.create_snapshot(name=name)
    _running(capsule)
    capsule.files.write(MARK, "second")

    with pytest.raises(WrennConflictError):
        client.snapshots.create(capsule.capsule_id, name=name)  # taken, no overwrite
    _running(capsule)
    t = client.snapshots.create(capsule.capsule_id, name=name, overwrite=True)
    assert t.name == name and t.type == "snapshot"
    assert [s.name for s in client.snapshots.list()].count(name) == 1

    c2 = make_capsule(template=name, wait=True)
    assert c2.files.read(MARK) == "second"


def test_a_failed_overwrite_keeps_the_old_template(server, client: WrennClient, make_capsule,
                                                   snapshot_names) -> None:
    """``overwrite=true`` replaces the template only once the new snapshot
    exists: when taking it fails (here its container was removed behind
    the agent's back), the old template is still there and still boots."""
    if server.instance is None:
        pytest.skip("needs the host of a local wrenn up")
    name = unique("snapowfail")
    snapshot_names.append(name)
    src = make_capsule(wait=True)
    src.files.write(MARK, "kept")
    src.create_snapshot(name=name)
    _running(src)
    before = [t for t in client.snapshots.list() if t.name == name]
    gone = subprocess.run(["runc", "--root", f"/run/{server.instance}/runc", "delete", "--force",
                           src.capsule_id], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 0, gone.stderr
    with pytest.raises(WrennError) as ei:
        client.snapshots.create(src.capsule_id, name=name, overwrite=True)
    assert ei.value.status_code >= 400, ei.value
    assert [t for t in client.snapshots.list() if t.name == name] == before
    c2 = make_capsule(template=name, wait=True)
    assert c2.files.read(MARK) == "kept"


def test_concurrent_overwrites_leave_no_layers_behind(server, client: WrennClient, make_capsule,
                                                      snapshot_names) -> None:
    """Overwrites of one name at once, from one capsule and from two: one
    template is left, and once it is deleted none of their layers are on
    disk (before, each replaced the row and only the last one's
    predecessor was collected)."""
    if server.data_dir is None:
        pytest.skip("needs the data dir of a local wrenn up")
    templates = server.data_dir / "templates"
    before = {p.name for p in templates.iterdir()}
    name = unique("snaprace")
    snapshot_names.append(name)
    a, b = make_capsule(wait=True), make_capsule(wait=True)
    a.create_snapshot(name=name)
    with ThreadPoolExecutor(3) as pool:
        made = list(pool.map(lambda c: client.snapshots.create(c.capsule_id, name=name, overwrite=True),
                             [a, b, a]))
    assert {t.name for t in made} == {name}
    assert [t.name for t in client.snapshots.list()].count(name) == 1
    client.snapshots.delete(name)
    left = {p.name for p in templates.iterdir()} - before
    assert not left, f"layers left behind: {sorted(left)}"


def test_delete(client: WrennClient, capsule: Capsule, snapshot_names) -> None:
    name = unique("snapdel")
    snapshot_names.append(name)
    capsule.create_snapshot(name=name)
    assert client.snapshots.delete(name) is None
    assert name not in [t.name for t in client.snapshots.list()]
    with pytest.raises(WrennNotFoundError):
        client.capsules.create(template=name)
    with pytest.raises(WrennNotFoundError):
        client.snapshots.delete(name)
    with pytest.raises(WrennNotFoundError):
        client.snapshots.delete(unique("never-was"))


def test_bad_requests(client: WrennClient, capsule: Capsule) -> None:
    with pytest.raises(WrennForbiddenError):
        client.snapshots.delete("minimal")  # a base template is not deletable
    assert "minimal" in [t.name for t in client.snapshots.list(type="base")]
    with pytest.raises(WrennValidationError):
        client.snapshots.create(capsule.capsule_id, name="bad name!")
    with pytest.raises(WrennValidationError):
        client.snapshots.create("not-an-id")
    with pytest.raises(WrennNotFoundError):
        client.snapshots.create(unknown_capsule_id())
    with pytest.raises((WrennConflictError, WrennForbiddenError)):
        client.snapshots.create(capsule.capsule_id, name="minimal")  # a platform name
    # the alias for it too (a team's own would shadow the SDK's default)
    with pytest.raises(WrennConflictError) as ei:
        client.snapshots.create(capsule.capsule_id, name="minimal-ubuntu")
    assert "reserved" in str(ei.value), ei.value
    with pytest.raises(WrennValidationError):
        client.snapshots.delete("bad name!")


def test_snapshot_of_destroyed_capsule(client: WrennClient, make_capsule) -> None:
    c = make_capsule(wait=True)
    c.destroy()
    with pytest.raises((WrennConflictError, WrennNotFoundError)):
        client.snapshots.create(c.capsule_id, name=unique("snapgone"))


async def test_async_snapshots(server, async_client: AsyncWrennClient) -> None:
    name = unique("asnap")
    c = await AsyncCapsule.create(template="minimal", wait=True, api_key=server.api_key, base_url=server.base_url)
    try:
        async with c:
            await c.files.write(MARK, "async")
            t = await c.create_snapshot(name=name)
            assert t.name == name and t.type == "snapshot"
            t2 = await async_client.snapshots.create(c.capsule_id, name=name, overwrite=True)
            assert t2.name == name
            assert name in [s.name for s in await async_client.snapshots.list(type="snapshot")]
            assert await async_client.snapshots.list(type="custom") == []
            c2 = await AsyncCapsule.create(template=name, wait=True, api_key=server.api_key,
                                           base_url=server.base_url)
            async with c2:
                assert await c2.files.read(MARK) == "async"
    finally:
        try:
            await async_client.snapshots.delete(name)
        except WrennNotFoundError:
            pass
    with pytest.raises(WrennNotFoundError):
        await async_client.snapshots.delete(name)
