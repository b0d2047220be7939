"""Capsule lifecycle through ``WrennClient.capsules``, ``Capsule`` and their
async twins: create, list, get, ping, pause/resume, connect, destroy,
stats, usage, metrics, and the error classes of bad requests."""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta, timezone

import httpx
import pytest
from wrenn import (
    AsyncCapsule,
    AsyncWrennClient,
    Capsule,
    WrennClient,
    WrennConflictError,
    WrennHostUnavailableError,
    WrennNotFoundError,
    WrennValidationError,
)
from wrenn.models import Capsule as CapsuleModel
from wrenn.models import CapsuleMetrics, CapsuleStats, Status, UsageResponse
from wrennsdk_support import poll, unknown_capsule_id

GONE = {Status.stopped}


def _assert_model(m: CapsuleModel, *, id: str | None = None) -> None:
    assert isinstance(m, CapsuleModel)
    assert m.id is not None and m.id.startswith("cl-") and len(m.id) == 28, m.id
    if id is not None:
        assert m.id == id
    assert m.status is not None
    assert m.created_at is not None and m.created_at.tzinfo is not None


def _gone(client: WrennClient, capsule_id: str, timeout: float = 10.0) -> bool:
    """A destroyed capsule reads back ``stopped`` or 404 (soon)."""

    def check() -> bool:
        try:
            return client.capsules.get(capsule_id).status in GONE
        except WrennNotFoundError:
            return True

    return poll(check, timeout, 0.2, f"{capsule_id} to be stopped")


def test_sdk_is_the_pinned_one(sdk_version: str) -> None:
    assert sdk_version == "0.3.0"


# --------------------------------------------------------------------------- #
# create
# --------------------------------------------------------------------------- #


def test_capsule_then_immediate_exec(server, client: WrennClient) -> None:
    """The README quick start: ``Capsule()`` (wait=False) then run at once."""
    with Capsule(template="minimal", api_key=server.api_key, base_url=server.base_url) as c:
        assert c.capsule_id.startswith("cl-") and len(c.capsule_id) == 28
        assert c.info is not None and c.info.id == c.capsule_id
        assert c.info.status in {Status.pending, Status.starting, Status.running}
        r = c.commands.run("echo ready")
        assert (r.exit_code, r.stdout, r.stderr) == (0, "ready\n", "")
    assert _gone(client, c.capsule_id)


def test_create_with_wait_and_sizes(server, client: WrennClient) -> None:
    c = Capsule.create(
        template="minimal",
        vcpus=2,
        memory_mb=1024,
        timeout=300,
        wait=True,
        api_key=server.api_key,
        base_url=server.base_url,
    )
    with c:
        assert c.info is not None and c.info.status == Status.running
        assert c.is_running() is True
        info = c.get_info()
        _assert_model(info, id=c.capsule_id)
        assert info.template == "minimal"
        assert (info.vcpus, info.memory_mb, info.timeout_sec) == (2, 1024, 300)
        assert info.started_at is not None and info.started_at.tzinfo is not None
        assert info.metadata is None or all(isinstance(v, str) for v in info.metadata.values())
        assert info.disk_size_mb is None or info.disk_size_mb > 0
        # the CPU share is real inside the capsule (cgroup v2 quota/period)
        r = c.commands.run("cat /sys/fs/cgroup/cpu.max 2>/dev/null || true")
        parts = r.stdout.split()
        if len(parts) == 2 and parts[0] != "max":
            assert int(parts[0]) / int(parts[1]) == 2, r.stdout
    assert _gone(client, c.capsule_id)


def test_client_create_defaults(client: WrennClient) -> None:
    m = client.capsules.create(template="minimal")
    try:
        _assert_model(m)
        assert m.status in {Status.pending, Status.starting, Status.running}
        assert m.template == "minimal"
        assert m.vcpus == 1 and m.memory_mb == 512, (m.vcpus, m.memory_mb)
        assert m.timeout_sec == 0
    finally:
        client.capsules.destroy(m.id)


@pytest.mark.parametrize("asked,stored", [(0, 0), (1, 60), (30, 60), (59, 60), (60, 60), (600, 600)])
def test_timeout_sec_round_trips(client: WrennClient, asked: int, stored: int) -> None:
    """Positive values under 60 are raised to 60; others round-trip."""
    m = client.capsules.create(template="minimal", timeout_sec=asked)
    try:
        assert m.timeout_sec == stored
        assert client.capsules.get(m.id).timeout_sec == stored
    finally:
        client.capsules.destroy(m.id)


def test_wrenn_0_2_default_template_name_is_accepted(server, client: WrennClient) -> None:
    """The SDK's own examples (and its model's default) name wrenn 0.2's
    default template, ``minimal-ubuntu``: it stands for ``minimal``."""
    m = client.capsules.create(template="minimal-ubuntu")
    try:
        assert m.template == "minimal" and m.status == Status.running, m
        with Capsule.connect(m.id, api_key=server.api_key, base_url=server.base_url) as c:
            assert c.commands.run("echo ok").stdout == "ok\n"
    finally:
        client.capsules.destroy(m.id)


def test_create_unknown_template(client: WrennClient) -> None:
    with pytest.raises(WrennNotFoundError) as ei:
        client.capsules.create(template="no-such-template-xyz")
    assert ei.value.code == "not_found" and ei.value.status_code == 404


def test_create_bad_values(client: WrennClient) -> None:
    with pytest.raises(WrennValidationError):
        client.capsules.create(template="bad name!")
    with pytest.raises(WrennValidationError):
        client.capsules.create(template="minimal", timeout_sec=-1)


# --------------------------------------------------------------------------- #
# list / get / ping
# --------------------------------------------------------------------------- #


def test_list_newest_first(server, client: WrennClient) -> None:
    a = client.capsules.create(template="minimal")
    time.sleep(0.05)
    b = client.capsules.create(template="minimal")
    try:
        items = client.capsules.list()
        assert isinstance(items, list) and all(isinstance(i, CapsuleModel) for i in items)
        ids = [i.id for i in items]
        assert a.id in ids and b.id in ids
        assert ids.index(b.id) < ids.index(a.id), "list must be newest first"
        created = [i.created_at for i in items if i.created_at is not None]
        assert created == sorted(created, reverse=True)
        # the classmethod form
        ids2 = [i.id for i in Capsule.list(api_key=server.api_key, base_url=server.base_url)]
        assert a.id in ids2 and b.id in ids2
    finally:
        client.capsules.destroy(a.id)
        client.capsules.destroy(b.id)
    poll(lambda: not {a.id, b.id} & {i.id for i in client.capsules.list()}, 10, 0.2,
         "destroyed capsules to leave the list")


def test_get_and_get_info(server, client: WrennClient, capsule: Capsule) -> None:
    m = client.capsules.get(capsule.capsule_id)
    _assert_model(m, id=capsule.capsule_id)
    assert m.status == Status.running
    assert m.last_updated is None or m.last_updated.tzinfo is not None
    assert capsule.get_info().id == capsule.capsule_id
    assert capsule.info is not None and capsule.info.status == Status.running
    static = Capsule.get_info(capsule.capsule_id, api_key=server.api_key, base_url=server.base_url)
    assert static.id == capsule.capsule_id and static.status == Status.running


def test_last_active_at_follows_use(client: WrennClient, capsule: Capsule) -> None:
    """Commands, files and terminals are activity (they hold off the
    inactivity timeout), and ``last_active_at`` shows it, not only pings."""
    seen = [client.capsules.get(capsule.capsule_id).last_active_at]
    for use in (lambda: capsule.commands.run("true"),
                lambda: capsule.files.write("/tmp/active.txt", "x"),
                lambda: capsule.files.read("/tmp/active.txt")):
        time.sleep(1.1)
        use()
        seen.append(client.capsules.get(capsule.capsule_id).last_active_at)
    assert None not in seen and seen == sorted(seen) and len(set(seen)) == len(seen), seen


def test_ping(client: WrennClient, capsule: Capsule) -> None:
    assert capsule.ping() is None
    assert client.capsules.ping(capsule.capsule_id) is None
    with pytest.raises(WrennNotFoundError):
        client.capsules.ping(unknown_capsule_id())


def test_bad_id_is_validation_error(client: WrennClient) -> None:
    for bad in ("nope", "cl-short", "sb-0123456789abcdefghijklmno", "cl-0123456789abcdefghijklmnop"):
        with pytest.raises(WrennValidationError) as ei:
            client.capsules.get(bad)
        assert ei.value.code == "invalid_request" and ei.value.status_code == 400
    with pytest.raises(WrennValidationError):
        client.capsules.destroy("nope")
    with pytest.raises(WrennValidationError):
        client.capsules.pause("nope")


def test_unknown_capsule_is_not_found(client: WrennClient) -> None:
    cid = unknown_capsule_id()
    for call in (
        client.capsules.get,
        client.capsules.pause,
        client.capsules.resume,
        client.capsules.ping,
        client.capsules.metrics,
    ):
        with pytest.raises(WrennNotFoundError) as ei:
            call(cid)
        assert ei.value.code == "not_found" and ei.value.status_code == 404


# --------------------------------------------------------------------------- #
# pause / resume / connect
# --------------------------------------------------------------------------- #


def test_pause_resume(server, client: WrennClient, capsule: Capsule) -> None:
    capsule.files.write("/var/tmp/keep.txt", "survives pause")
    bg = capsule.commands.run("sleep 1000", background=True)

    info = capsule.pause(wait=True)
    assert info.status == Status.paused
    assert client.capsules.get(capsule.capsule_id).status == Status.paused
    assert capsule.is_running() is False
    with pytest.raises(WrennConflictError):
        capsule.commands.run("true")
    with pytest.raises(WrennConflictError):
        client.capsules.pause(capsule.capsule_id)  # not running
    with pytest.raises(WrennConflictError):
        client.capsules.ping(capsule.capsule_id)

    info = capsule.resume(wait=True)
    assert info.status == Status.running
    assert capsule.files.read("/var/tmp/keep.txt") == "survives pause"
    r = capsule.commands.run(f"kill -0 {bg.pid} && echo alive")
    assert r.stdout == "alive\n", "processes survive pause/resume"
    with pytest.raises(WrennConflictError):
        client.capsules.resume(capsule.capsule_id)  # not paused

    # the static (classmethod) forms
    m = Capsule.pause(capsule.capsule_id, wait=True, api_key=server.api_key, base_url=server.base_url)
    assert m.status == Status.paused
    m = Capsule.resume(capsule.capsule_id, wait=True, api_key=server.api_key, base_url=server.base_url)
    assert m.status == Status.running
    assert capsule.commands.run("echo back").stdout == "back\n"


def test_client_pause_resume_models(client: WrennClient, capsule: Capsule) -> None:
    m = client.capsules.pause(capsule.capsule_id)
    _assert_model(m, id=capsule.capsule_id)
    assert m.status in {Status.pausing, Status.paused}
    poll(lambda: client.capsules.get(capsule.capsule_id).status == Status.paused, 30, 0.5, "paused")
    m = client.capsules.resume(capsule.capsule_id)
    _assert_model(m, id=capsule.capsule_id)
    assert m.status in {Status.resuming, Status.running}
    poll(lambda: client.capsules.get(capsule.capsule_id).status == Status.running, 30, 0.5, "running")


def test_connect_resumes_a_paused_capsule(server, client: WrennClient, capsule: Capsule) -> None:
    capsule.files.write("/var/tmp/conn.txt", "hello")
    capsule.pause(wait=True)
    conn = Capsule.connect(capsule.capsule_id, api_key=server.api_key, base_url=server.base_url)
    with conn:
        assert conn.capsule_id == capsule.capsule_id
        assert conn.get_info().status == Status.running
        assert conn.files.read("/var/tmp/conn.txt") == "hello"
        assert conn.commands.run("echo hi").stdout == "hi\n"
    # leaving the connected capsule's context destroys it
    assert _gone(client, capsule.capsule_id)


def test_connect_running_and_unknown(server, capsule: Capsule) -> None:
    conn = Capsule.connect(capsule.capsule_id, api_key=server.api_key, base_url=server.base_url)
    with conn:  # exit destroys; the fixture's destroy after it is idempotent
        assert conn.info is not None and conn.info.status == Status.running
        assert conn.commands.run("echo x").stdout == "x\n"
    with pytest.raises(WrennNotFoundError):
        Capsule.connect(unknown_capsule_id(), api_key=server.api_key, base_url=server.base_url)


# --------------------------------------------------------------------------- #
# destroy
# --------------------------------------------------------------------------- #


def test_destroy_is_idempotent(client: WrennClient, make_capsule) -> None:
    c = make_capsule(wait=True)
    c.destroy()
    c.destroy()  # a second DELETE is still 2xx
    client.capsules.destroy(c.capsule_id)
    assert _gone(client, c.capsule_id)
    with pytest.raises((WrennNotFoundError, WrennConflictError)):
        c.commands.run("true")


def test_destroy_wait(client: WrennClient, make_capsule) -> None:
    c = make_capsule()
    c.destroy(wait=True)
    try:
        m = client.capsules.get(c.capsule_id)
    except WrennNotFoundError:
        return
    assert m.status == Status.stopped
    assert m.id == c.capsule_id


def test_destroy_static_wait(server, client: WrennClient) -> None:
    m = client.capsules.create(template="minimal")
    Capsule.destroy(m.id, wait=True, api_key=server.api_key, base_url=server.base_url)
    assert _gone(client, m.id)
    Capsule.destroy(m.id, api_key=server.api_key, base_url=server.base_url)  # idempotent


def test_context_manager_destroys(server, client: WrennClient) -> None:
    with Capsule(template="minimal", wait=True, api_key=server.api_key, base_url=server.base_url) as c:
        cid = c.capsule_id
        assert client.capsules.get(cid).status == Status.running
    assert _gone(client, cid)


def test_a_client_that_hangs_up_does_not_strand_a_capsule(server, client: WrennClient) -> None:
    """Clients that give up on a create or a destroy mid-way (an SDK
    timeout, a cancelled asyncio task): the server still finishes it.
    Before, the handler was dropped with the connection, and a capsule
    stayed ``starting`` for good (holding its host's room) or ``stopping``
    until the reconciler came by."""
    marker = {"hangup": f"{time.time_ns()}"}
    body = {"template": "minimal", "metadata": marker}
    headers = {"X-API-Key": server.api_key}
    # the request is written whole, then the client stops reading (a
    # create takes longer than that: a warm network slot, runc, envd)
    hang_up = httpx.Timeout(10.0, read=0.03)
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=hang_up) as raw:
        for _ in range(3):
            with pytest.raises(httpx.ReadTimeout):
                raw.post("/v1/capsules", json=body)

    def mine() -> list[CapsuleModel]:
        return [m for m in client.capsules.list() if m.metadata and m.metadata.get("hangup") == marker["hangup"]]

    made = poll(lambda: (ms := mine()) and len(ms) == 3 and all(m.status == Status.running for m in ms) and ms,
                30, 0.3, "the three creates to finish")
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=hang_up) as raw:
        for m in made:
            try:
                raw.delete(f"/v1/capsules/{m.id}")
            except httpx.ReadTimeout:
                pass  # (the point; a destroy may also be quicker)
    for m in made:
        _gone(client, m.id, timeout=10)


def test_resume_needs_room_as_a_create_does(server, client: WrennClient, make_capsule) -> None:
    """A paused capsule holds a quarter of its place on its host: a resume
    that would take the host past its capacity is a 503, as a create that
    does not fit (before, pausing capsules to make room for more and
    resuming them all overcommitted a host about 4×)."""
    with server.http() as h:
        hosts = [x for x in h.get("/v1/hosts").json() if x["status"] == "online"]
    assert len(hosts) == 1, f"this test places on wrenn up's own host alone: {hosts}"
    cap = hosts[0]["cpu_cores"] * 4  # hosts.rs: CPU_OVERCOMMIT
    a = make_capsule(wait=True, vcpus=cap - 1, memory_mb=64)
    a.pause()
    # paused, a counts (cap - 1) / 4: room for cap - 2 more
    b = make_capsule(wait=True, vcpus=cap - 2, memory_mb=64)
    with pytest.raises(WrennHostUnavailableError) as ei:
        a.resume()
    assert ei.value.status_code == 503 and "no room to resume" in str(ei.value), ei.value
    assert client.capsules.get(a.capsule_id).status == Status.paused
    b.destroy()
    a.resume()
    assert a.commands.run("echo back").stdout == "back\n"


def test_pause_destroyed_is_rejected(client: WrennClient) -> None:
    m = client.capsules.create(template="minimal")
    client.capsules.destroy(m.id)
    with pytest.raises((WrennNotFoundError, WrennConflictError)):
        client.capsules.pause(m.id)
    with pytest.raises((WrennNotFoundError, WrennConflictError)):
        client.capsules.resume(m.id)


# --------------------------------------------------------------------------- #
# metrics / stats / usage
# --------------------------------------------------------------------------- #


def test_metrics(client: WrennClient, capsule: Capsule) -> None:
    capsule.commands.run("head -c 20000000 /dev/urandom | sha256sum >/dev/null")

    def sampled() -> CapsuleMetrics | None:
        m = client.capsules.metrics(capsule.capsule_id)
        return m if m.points else None

    m = poll(sampled, 10, 0.5, "a metrics point")
    assert isinstance(m, CapsuleMetrics)
    assert m.sandbox_id == capsule.capsule_id
    assert m.range == "10m"
    now = time.time()
    for p in m.points:
        assert p.timestamp_unix is not None and now - 660 <= p.timestamp_unix <= now + 5
        assert p.cpu_pct is not None and 0.0 <= p.cpu_pct <= 100.0
        assert p.mem_bytes is not None and p.mem_bytes >= 0
        assert p.disk_bytes is not None and p.disk_bytes >= 0
    assert any(p.mem_bytes > 0 for p in m.points)
    stamps = [p.timestamp_unix for p in m.points]
    assert stamps == sorted(stamps), "points are oldest first"

    # wrenn samples every 500 ms: a few seconds give points a second or less apart
    def dense() -> CapsuleMetrics | None:
        m = client.capsules.metrics(capsule.capsule_id, range="5m")
        return m if len(m.points) >= 6 else None

    recent = poll(dense, 20, 0.5, "six metrics points").points[-6:]
    gaps = [b.timestamp_unix - a.timestamp_unix for a, b in zip(recent, recent[1:])]
    assert max(gaps) <= 2, f"seconds between samples: {gaps}"

    for r in ("5m", "10m", "1h", "2h", "6h", "12h", "24h"):
        mr = client.capsules.metrics(capsule.capsule_id, range=r)
        assert mr.range == r and isinstance(mr.points, list)
    with pytest.raises(WrennValidationError):
        client.capsules.metrics(capsule.capsule_id, range="bogus")


def test_metrics_of_paused_capsule(client: WrennClient, capsule: Capsule) -> None:
    time.sleep(1.2)
    capsule.pause(wait=True)
    m = client.capsules.metrics(capsule.capsule_id)
    assert m.sandbox_id == capsule.capsule_id and isinstance(m.points, list)


def test_stats(client: WrennClient, capsule: Capsule) -> None:
    s = client.capsules.stats()
    assert isinstance(s, CapsuleStats)
    assert s.range == "1h"
    assert s.current is not None
    assert s.current.running_count is not None and s.current.running_count >= 1
    assert s.current.vcpus_reserved is not None and s.current.vcpus_reserved >= 1
    assert s.current.memory_mb_reserved is not None and s.current.memory_mb_reserved >= 512
    assert s.peaks is not None
    for v in (s.peaks.running_count, s.peaks.vcpus, s.peaks.memory_mb):
        assert v is not None and v >= 0
    assert s.series is not None
    labels = s.series.labels or []
    for arr in (s.series.running, s.series.vcpus, s.series.memory_mb):
        assert arr is not None and len(arr) == len(labels)
    assert all(t.tzinfo is not None for t in labels)
    assert labels == sorted(labels)
    for r in ("5m", "1h", "6h", "24h", "30d"):
        assert client.capsules.stats(range=r).range == r
    with pytest.raises(WrennValidationError):
        client.capsules.stats(range="bogus")


def test_usage(client: WrennClient, capsule: Capsule) -> None:
    time.sleep(1.5)  # a little running time to bill
    today = datetime.now(timezone.utc).date()
    u = client.capsules.usage()
    assert isinstance(u, UsageResponse)
    assert u.to == today and u.from_ == today - timedelta(days=29)
    pts = u.points or []
    dates = [p.date for p in pts]
    assert all(d is not None and u.from_ <= d <= u.to for d in dates)
    assert dates == sorted(dates) and len(dates) == len(set(dates))
    todays = [p for p in pts if p.date == today]
    assert todays, f"no point for today in {dates}"
    assert todays[0].cpu_minutes is not None and todays[0].cpu_minutes > 0
    assert todays[0].ram_mb_minutes is not None and todays[0].ram_mb_minutes > 0

    week = client.capsules.usage(from_=today - timedelta(days=7), to=today)
    assert (week.from_, week.to) == (today - timedelta(days=7), today)
    old = client.capsules.usage(from_="2024-01-01", to="2024-01-10")
    assert (old.from_, old.to) == (date(2024, 1, 1), date(2024, 1, 10))
    assert all(p.cpu_minutes == 0 for p in (old.points or []))
    with pytest.raises(WrennValidationError):
        client.capsules.usage(from_="2024-01-10", to="2024-01-01")
    with pytest.raises(WrennValidationError):
        client.capsules.usage(from_="2024-01-01", to="2024-12-31")  # > 92 days
    with pytest.raises(WrennValidationError):
        client.capsules.usage(from_="yesterday")


# --------------------------------------------------------------------------- #
# async
# --------------------------------------------------------------------------- #


async def test_async_lifecycle(server, async_client: AsyncWrennClient) -> None:
    c = await AsyncCapsule.create(
        template="minimal", timeout=120, wait=True, api_key=server.api_key, base_url=server.base_url
    )
    async with c:
        cid = c.capsule_id
        assert c.info is not None and c.info.status == Status.running
        assert await c.is_running()
        info = await c.get_info()
        assert info.id == cid and info.timeout_sec == 120
        assert (await c.commands.run("echo async")).stdout == "async\n"
        assert await c.ping() is None

        assert cid in [m.id for m in await async_client.capsules.list()]
        assert cid in [
            m.id for m in await AsyncCapsule.list(api_key=server.api_key, base_url=server.base_url)
        ]
        assert (await async_client.capsules.get(cid)).status == Status.running
        assert await async_client.capsules.ping(cid) is None

        assert (await c.pause(wait=True)).status == Status.paused
        with pytest.raises(WrennConflictError):
            await c.commands.run("true")
        assert (await c.resume(wait=True)).status == Status.running

        m = await AsyncCapsule.pause(cid, wait=True, api_key=server.api_key, base_url=server.base_url)
        assert m.status == Status.paused
        m = await AsyncCapsule.resume(cid, wait=True, api_key=server.api_key, base_url=server.base_url)
        assert m.status == Status.running
        got = await AsyncCapsule.get_info(cid, api_key=server.api_key, base_url=server.base_url)
        assert got.status == Status.running

        stats = await async_client.capsules.stats(range="5m")
        assert stats.range == "5m" and stats.current and stats.current.running_count >= 1
        usage = await async_client.capsules.usage()
        assert usage.to == datetime.now(timezone.utc).date()
        metrics = await async_client.capsules.metrics(cid, range="10m")
        assert metrics.sandbox_id == cid and metrics.range == "10m"
        with pytest.raises(WrennValidationError):
            await async_client.capsules.get("nope")
        with pytest.raises(WrennNotFoundError):
            await async_client.capsules.get(unknown_capsule_id())

        # connect() of a paused capsule resumes it; its context exit destroys
        await c.pause(wait=True)
        conn = await AsyncCapsule.connect(cid, api_key=server.api_key, base_url=server.base_url)
        async with conn:
            assert (await conn.get_info()).status == Status.running
            assert (await conn.commands.run("echo c")).stdout == "c\n"
    # async context exit destroyed it
    try:
        assert (await async_client.capsules.get(cid)).status == Status.stopped
    except WrennNotFoundError:
        pass


async def test_async_client_create_destroy(server, async_client: AsyncWrennClient) -> None:
    m = await async_client.capsules.create(template="minimal", vcpus=1, memory_mb=512, timeout_sec=0)
    assert m.id and m.template == "minimal"
    m2 = await async_client.capsules.pause(m.id)
    assert m2.status in {Status.pausing, Status.paused}
    await AsyncCapsule.destroy(m.id, wait=True, api_key=server.api_key, base_url=server.base_url)
    await async_client.capsules.destroy(m.id)  # idempotent
    with pytest.raises(WrennNotFoundError):
        await async_client.capsules.create(template="no-such-template-xyz")

    c = await AsyncCapsule.create(template="minimal", api_key=server.api_key, base_url=server.base_url)
    async with c:
        # no wait: the first data-plane call must still work
        assert (await c.commands.run("echo now")).stdout == "now\n"
        await c.destroy(wait=True)
        try:
            assert (await async_client.capsules.get(c.capsule_id)).status == Status.stopped
        except WrennNotFoundError:
            pass
