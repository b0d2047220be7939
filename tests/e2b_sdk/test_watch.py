"""``sandbox.files.watch_dir`` through the sync SDK, which polls:
CreateWatcher, then GetWatcherEvents (drains the buffer), then RemoveWatcher."""

from __future__ import annotations

import os
from typing import Callable, List

import pytest

from e2b import (
    FileNotFoundException,
    FilesystemEvent,
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
    Sandbox,
)
from e2b.sandbox_sync.filesystem.watch_handle import WatchHandle

from e2bsdk_support import wait_until

CREATE = FilesystemEventType.CREATE
CHMOD = FilesystemEventType.CHMOD
WRITE = FilesystemEventType.WRITE
REMOVE = FilesystemEventType.REMOVE
RENAME = FilesystemEventType.RENAME


def collect_until(
    handle: WatchHandle,
    done: Callable[[List[FilesystemEvent]], bool],
    what: str,
    timeout: float = 10,
) -> List[FilesystemEvent]:
    """Poll ``get_new_events`` until ``done(all events so far)``; return them all.

    One more poll after that picks up events of the same burst that envd had
    not buffered yet when the condition first held.
    """
    events: List[FilesystemEvent] = []

    def probe() -> bool:
        events.extend(handle.get_new_events())
        return done(events)

    wait_until(probe, what, timeout)
    events.extend(handle.get_new_events())
    return events


def has(events: List[FilesystemEvent], kind: FilesystemEventType, name: str) -> bool:
    return any(e.type == kind and e.name == name for e in events)


def kinds_for(events: List[FilesystemEvent], name: str) -> List[FilesystemEventType]:
    return [e.type for e in events if e.name == name]


def test_watch_reports_create_of_new_file(sandbox: Sandbox, workdir: str):
    handle = sandbox.files.watch_dir(workdir)
    try:
        sandbox.files.write(f"{workdir}/new.txt", "watched")

        events = collect_until(
            handle, lambda ev: has(ev, WRITE, "new.txt"), "WRITE of new.txt"
        )

        assert has(events, CREATE, "new.txt")
        # Names are relative to the watched directory.
        assert all(not e.name.startswith("/") for e in events)
    finally:
        handle.stop()


def test_watch_event_granularity_is_inotify_like(sandbox: Sandbox, workdir: str):
    # E2B's own suite relies on exactly these three events for a new file
    # written through POST /files: the create, the chown, the data.
    handle = sandbox.files.watch_dir(workdir)
    try:
        sandbox.files.write(f"{workdir}/g.txt", "granular")

        events = collect_until(
            handle, lambda ev: has(ev, WRITE, "g.txt"), "WRITE of g.txt"
        )

        assert kinds_for(events, "g.txt") == [CREATE, CHMOD, WRITE]
    finally:
        handle.stop()


def test_watch_events_are_drained_by_each_poll(sandbox: Sandbox, workdir: str):
    handle = sandbox.files.watch_dir(workdir)
    try:
        sandbox.files.write(f"{workdir}/first.txt", "1")
        collect_until(handle, lambda ev: has(ev, WRITE, "first.txt"), "first.txt")

        sandbox.files.write(f"{workdir}/second.txt", "2")
        events = collect_until(
            handle, lambda ev: has(ev, WRITE, "second.txt"), "second.txt"
        )
        assert not any(e.name == "first.txt" for e in events)
    finally:
        handle.stop()


def test_watch_reports_remove_and_rename(sandbox: Sandbox, workdir: str):
    with open(f"{workdir}/doomed.txt", "w") as f:
        f.write("x")
    with open(f"{workdir}/before.txt", "w") as f:
        f.write("y")
    handle = sandbox.files.watch_dir(workdir)
    try:
        sandbox.files.remove(f"{workdir}/doomed.txt")
        sandbox.files.rename(f"{workdir}/before.txt", f"{workdir}/after.txt")

        events = collect_until(
            handle,
            lambda ev: any(e.name == "after.txt" for e in ev),
            "an event for after.txt",
        )

        assert has(events, REMOVE, "doomed.txt")
        assert has(events, RENAME, "before.txt")
    finally:
        handle.stop()


def test_recursive_watch_names_nested_file(sandbox: Sandbox, workdir: str):
    os.mkdir(f"{workdir}/nested")
    handle = sandbox.files.watch_dir(workdir, recursive=True)
    try:
        sandbox.files.write(f"{workdir}/nested/file.txt", "deep")

        events = collect_until(
            handle,
            lambda ev: has(ev, WRITE, "nested/file.txt"),
            "WRITE of nested/file.txt",
        )

        assert events[0].type == CREATE
        assert events[0].name == "nested/file.txt"
    finally:
        handle.stop()


def test_recursive_watch_covers_directory_created_after_start(
    sandbox: Sandbox, workdir: str
):
    handle = sandbox.files.watch_dir(workdir, recursive=True)
    try:
        sandbox.files.make_dir(f"{workdir}/later")
        # Once envd reported the new directory it must be watching it too.
        events = collect_until(
            handle, lambda ev: has(ev, CREATE, "later"), "CREATE of later/"
        )

        sandbox.files.write(f"{workdir}/later/file.txt", "late")
        events += collect_until(
            handle,
            lambda ev: has(ev, WRITE, "later/file.txt"),
            "WRITE of later/file.txt",
        )

        assert events[0].type == CREATE
        assert events[0].name == "later"
        nested = kinds_for(events, "later/file.txt")
        assert nested[0] == CREATE
        assert WRITE in nested
    finally:
        handle.stop()


def test_non_recursive_watch_ignores_nested_changes(sandbox: Sandbox, workdir: str):
    os.mkdir(f"{workdir}/sub")
    handle = sandbox.files.watch_dir(workdir)
    try:
        sandbox.files.write(f"{workdir}/sub/hidden.txt", "not reported")
        # A top-level write after it acts as a barrier for the nested one.
        sandbox.files.write(f"{workdir}/top.txt", "reported")

        events = collect_until(
            handle, lambda ev: has(ev, WRITE, "top.txt"), "WRITE of top.txt"
        )

        assert not any("hidden.txt" in e.name for e in events)
    finally:
        handle.stop()


def test_watch_include_entry(sandbox: Sandbox, workdir: str):
    handle = sandbox.files.watch_dir(workdir, include_entry=True)
    try:
        sandbox.files.write(f"{workdir}/entry.txt", "12345")

        events = collect_until(
            handle, lambda ev: has(ev, WRITE, "entry.txt"), "WRITE of entry.txt"
        )

        create = next(e for e in events if e.type == CREATE and e.name == "entry.txt")
        assert create.entry is not None
        assert create.entry.path == f"{workdir}/entry.txt"
        assert create.entry.type == FileType.FILE
    finally:
        handle.stop()


def test_watch_missing_directory_raises_not_found(sandbox: Sandbox, workdir: str):
    with pytest.raises(FileNotFoundException):
        sandbox.files.watch_dir(f"{workdir}/does-not-exist")


def test_watch_a_file_raises_invalid_argument(sandbox: Sandbox, workdir: str):
    path = f"{workdir}/plain.txt"
    with open(path, "w") as f:
        f.write("not a dir")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.watch_dir(path)
