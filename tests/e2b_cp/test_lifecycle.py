"""Sandbox lifecycle through ``e2b.Sandbox``: create, get_info, list with the
metadata filter, connect, set_timeout, pause/resume (connect), kill,
metrics, errors, and the same capsule seen through wrenn's /v1 API.

Wire calls (e2b 2.63.0): create ``POST /v2/sandboxes`` (201), connect ``POST
/v2/sandboxes/{id}/connect`` (200 running / 201 resumed), list ``GET
/v2/sandboxes`` (+ ``X-Next-Token``), get ``GET /sandboxes/{id}``, kill
``DELETE /sandboxes/{id}`` (204; 404 → False), timeout ``POST
/sandboxes/{id}/timeout`` (204), pause ``POST /sandboxes/{id}/pause`` (204;
409 → False), metrics ``GET /sandboxes/{id}/metrics``; ``is_running`` is
``GET /health`` on the data plane (502 → False).
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from e2b import (
    AuthenticationException,
    Sandbox,
    SandboxException,
    SandboxInfo,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
)

from e2bcp_support import BASE, CODE_INTERPRETER_VERSION, E2B_VERSION, now, poll, unique_tag

WRENN_ID = re.compile(r"^cl-[0-9a-z]{25}$")


@pytest.mark.no_server
def test_sdk_versions() -> None:
    assert importlib.metadata.version("e2b") == E2B_VERSION
    assert importlib.metadata.version("e2b-code-interpreter") == CODE_INTERPRETER_VERSION


def test_create_defaults(sandbox: Sandbox, server) -> None:
    # The sandbox ID is the capsule ID (docs/e2b-compat-plan.md §7): used
    # verbatim in paths, E2b-Sandbox-Id and the {port}-{id}.{domain} host.
    assert WRENN_ID.match(sandbox.sandbox_id), sandbox.sandbox_id
    # A string domain makes get_host routable (sandbox/main.py:46, 213-224).
    assert sandbox.sandbox_domain == server.domain
    assert sandbox.is_running()
    # Every sandbox is "secured": an envd access token comes back, so the
    # SDK signs file URLs (sandbox/main.py:147, 189).
    assert "signature=v1_" in sandbox.download_url("/etc/hostname")

    info = sandbox.get_info()
    assert isinstance(info, SandboxInfo)
    assert info.sandbox_id == sandbox.sandbox_id
    assert info.template_id  # the template's ID; `base` is its name/alias
    assert info.state == SandboxState.RUNNING
    assert info.metadata == {"suite": "e2b-cp"}
    assert info.cpu_count >= 1 and info.memory_mb >= 128
    assert info.envd_version and tuple(map(int, info.envd_version.split(".")[:3])) >= (0, 6, 4)
    assert info.sandbox_domain == server.domain
    # timeout=300 was asked for: endAt = startedAt + 300 s (± clock slack)
    span = (info.end_at - info.started_at).total_seconds()
    assert 290 <= span <= 310, (info.started_at, info.end_at)
    assert abs((info.started_at - now()).total_seconds()) < 120


def test_base_template_user(sandbox: Sandbox) -> None:
    """The ``base`` template (spec §6): user ``user`` with home /home/user,
    passwordless sudo, bash, python3, curl."""
    r = sandbox.commands.run("whoami; pwd; echo $HOME; sudo -n whoami; "
                             "command -v bash python3 curl >/dev/null && echo tools")
    assert r.stdout.split() == ["user", "/home/user", "/home/user", "root", "tools"], r
    assert sandbox.files.write("rel.txt", "x").path == "/home/user/rel.txt"


def test_create_with_envs_and_metadata(make_sandbox, tag: str) -> None:
    sbx = make_sandbox(envs={"E2B_CP_VAR": "v1"}, metadata={"tag": tag, "k": "a b/c&d=e"})
    assert sbx.commands.run("echo $E2B_CP_VAR").stdout == "v1\n"
    # E2B_SANDBOX / E2B_SANDBOX_ID are in every process's environment (spec §5.2)
    r = sbx.commands.run("echo $E2B_SANDBOX:$E2B_SANDBOX_ID")
    assert r.stdout.strip() == f"true:{sbx.sandbox_id}"
    assert sbx.get_info().metadata == {"tag": tag, "k": "a b/c&d=e"}


def test_internet_access_as_asked(make_sandbox, server) -> None:
    """``allow_internet_access=False`` reaches the agent's firewall, and
    ``get_info`` shows the setting as it was given, and ``None`` when it
    was not (E2B's sandbox detail leaves it out then)."""
    closed = make_sandbox(allow_internet_access=False)
    opened = make_sandbox(allow_internet_access=True)
    default = make_sandbox()
    assert closed.get_info().allow_internet_access is False
    assert opened.get_info().allow_internet_access is True
    assert default.get_info().allow_internet_access is None
    if server.server.instance is None:
        return  # an external server: its firewall is not ours to read
    allowed = subprocess.run(["nft", "list", "set", "inet", server.server.instance, "internet"],
                             capture_output=True, text=True, check=True).stdout
    for sbx, out in ((closed, False), (opened, True), (default, True)):
        addr = sbx.commands.run("hostname -I").stdout.split()[0]
        assert bool(re.search(rf"\b{re.escape(addr)}\b", allowed)) == out, (addr, out, allowed)


def test_create_unknown_template(server) -> None:
    with pytest.raises(SandboxException) as ei:
        Sandbox.create(template=unique_tag("no-such-template"), timeout=60)
    assert ei.value.status_code in (400, 404), ei.value


@pytest.mark.parametrize("opts", [
    {"network": {"deny_out": ["0.0.0.0/0"]}},
    {"network": {"allow_out": ["1.1.1.1"], "deny_out": ["0.0.0.0/0"]}},
    {"network": {"allow_public_traffic": False}},
    {"network": {"dns_servers": []}},
    {"lifecycle": {"on_timeout": "pause", "auto_resume": True}},
])
def test_settings_not_served_are_refused_not_ignored(server, opts: dict) -> None:
    """Egress rules, closed public traffic and auto-resume are not served
    here: asking for them is a 400, never a sandbox without them."""
    before = {s.sandbox_id for s in Sandbox.list().next_items()}
    with pytest.raises(SandboxException) as ei:
        Sandbox.create(timeout=60, **opts)
    assert "not supported" in str(ei.value), ei.value
    assert {s.sandbox_id for s in Sandbox.list().next_items()} <= before


def test_defaults_of_those_settings_are_taken(make_sandbox) -> None:
    sbx = make_sandbox(network={"allow_public_traffic": True},
                       lifecycle={"on_timeout": "kill", "auto_resume": False})
    assert sbx.commands.run("echo ok").stdout == "ok\n"


def test_bad_api_key(server) -> None:
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="e2b_" + "0" * 40, timeout=60)
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="e2b_" + "1" * 40).next_items()
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="not-a-key").next_items()


def test_list_metadata_filter(make_sandbox, tag: str) -> None:
    # Values with the characters the triple encoding must survive
    # (e2b/sandbox_sync/paginator.py:50-57).
    weird = "a b/c&d=e%f+g"
    a = make_sandbox(metadata={"tag": tag, "which": "a", "weird": weird})
    b = make_sandbox(metadata={"tag": tag, "which": "b"})
    make_sandbox(metadata={"tag": unique_tag(), "which": "a"})

    found = Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()
    assert sorted(s.sandbox_id for s in found) == sorted([a.sandbox_id, b.sandbox_id])
    # newest first by default (a test of E2B's relies on it)
    assert [s.sandbox_id for s in found] == [b.sandbox_id, a.sandbox_id]
    one = found[1]
    assert one.metadata == {"tag": tag, "which": "a", "weird": weird}
    assert one.state == SandboxState.RUNNING and one.template_id
    assert one.cpu_count >= 1 and one.memory_mb >= 128 and one.end_at > one.started_at

    both = Sandbox.list(query=SandboxQuery(metadata={"tag": tag, "which": "a"})).next_items()
    assert [s.sandbox_id for s in both] == [a.sandbox_id]
    w = Sandbox.list(query=SandboxQuery(metadata={"weird": weird, "tag": tag})).next_items()
    assert [s.sandbox_id for s in w] == [a.sandbox_id]
    assert Sandbox.list(query=SandboxQuery(metadata={"tag": tag, "which": "c"})).next_items() == []

    asc = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}), order="asc").next_items()
    assert [s.sandbox_id for s in asc] == [a.sandbox_id, b.sandbox_id]


def test_list_pagination(make_sandbox, tag: str) -> None:
    ids = [make_sandbox(metadata={"tag": tag}).sandbox_id for _ in range(3)]
    p = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}), limit=2)
    first = p.next_items()
    assert len(first) == 2 and p.has_next and p.next_token
    second = p.next_items()
    assert len(second) == 1 and not p.has_next
    assert sorted(s.sandbox_id for s in first + second) == sorted(ids)


def test_list_state_and_template_filters(make_sandbox, tag: str) -> None:
    running = make_sandbox(metadata={"tag": tag})
    paused = make_sandbox(metadata={"tag": tag})
    assert paused.pause() is True
    q = lambda *states: SandboxQuery(metadata={"tag": tag}, state=list(states))  # noqa: E731
    assert [s.sandbox_id for s in Sandbox.list(query=q(SandboxState.RUNNING)).next_items()] == [running.sandbox_id]
    got = Sandbox.list(query=q(SandboxState.PAUSED)).next_items()
    assert [s.sandbox_id for s in got] == [paused.sandbox_id] and got[0].state == SandboxState.PAUSED
    # no state: both (sandbox_api.py:84-85)
    assert len(Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()) == 2
    by_template = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}, template=BASE)).next_items()
    assert len(by_template) == 2
    later = Sandbox.list(query=SandboxQuery(metadata={"tag": tag},
                                            started_after=now() + timedelta(hours=1))).next_items()
    assert later == []


def test_kill(make_sandbox, server, tag: str) -> None:
    sbx = make_sandbox(metadata={"tag": tag})
    assert sbx.kill() is True
    assert not sbx.is_running()  # the data plane's /health answers 502 "... was not found"
    assert Sandbox.kill(sbx.sandbox_id) is False  # DELETE → 404
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id)
    assert Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items() == []


def test_unknown_and_malformed_ids(server) -> None:
    # Malformed IDs are unknown sandboxes (404), never 400: the SDK only
    # maps 404 to "not found" / False.
    for sid in ("cl-" + "0" * 25, "doesnotexist", "i" * 20):
        assert Sandbox.kill(sid) is False, sid
        with pytest.raises(SandboxNotFoundException):
            Sandbox.get_info(sid)
        with pytest.raises(SandboxNotFoundException):
            Sandbox.set_timeout(sid, 30)
        with pytest.raises(SandboxNotFoundException):
            Sandbox.pause(sid)
        with pytest.raises(SandboxNotFoundException):
            Sandbox.get_metrics(sid)


def test_set_timeout(sandbox: Sandbox) -> None:
    sandbox.set_timeout(600)
    end = sandbox.get_info().end_at
    assert 590 <= (end - now()).total_seconds() <= 610
    sandbox.set_timeout(120)  # may shorten
    end = sandbox.get_info().end_at
    assert 110 <= (end - now()).total_seconds() <= 130


def test_timeout_kills(make_sandbox, tag: str) -> None:
    """On timeout an E2B sandbox is killed (lifecycle on_timeout defaults to
    kill), not paused as wrenn's own TTL does."""
    sbx = make_sandbox(metadata={"tag": tag})
    sbx.set_timeout(3)
    poll(lambda: not sbx.is_running(), timeout=90, interval=1, what="the sandbox to time out")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
    assert Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items() == []


def test_timeout_pauses_with_lifecycle(make_sandbox, tag: str) -> None:
    sbx = make_sandbox(metadata={"tag": tag}, timeout=4, lifecycle={"on_timeout": "pause"})
    info = sbx.get_info()
    if info.lifecycle is not None:  # optional in the detail; if sent, it must say so
        assert info.lifecycle == {"on_timeout": "pause", "auto_resume": False}
    sbx.files.write("/tmp/marker", "kept")
    poll(lambda: Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED, timeout=90, interval=1,
         what="the timeout to pause the sandbox")
    assert not sbx.is_running()
    again = Sandbox.connect(sbx.sandbox_id, timeout=120)
    assert again.files.read("/tmp/marker") == "kept"


def test_connect_running(sandbox: Sandbox) -> None:
    sandbox.set_timeout(300)
    same = Sandbox.connect(sandbox.sandbox_id)  # body {} (timeout omitted)
    assert same.sandbox_id == sandbox.sandbox_id
    assert same.commands.run("echo hi").stdout == "hi\n"
    # connect never shortens a running sandbox's timeout ...
    Sandbox.connect(sandbox.sandbox_id, timeout=10)
    left = (Sandbox.get_info(sandbox.sandbox_id).end_at - now()).total_seconds()
    assert left > 250, left
    # ... but extends it
    sandbox.connect(timeout=900)
    left = (Sandbox.get_info(sandbox.sandbox_id).end_at - now()).total_seconds()
    assert 880 <= left <= 910, left


def test_pause_and_resume(sandbox: Sandbox, tag: str) -> None:
    sandbox.files.write("/tmp/state.txt", "before pause")
    bg = sandbox.commands.run("sleep 600", background=True, timeout=0)
    bg.disconnect()  # the process lives on; only this client's stream ends
    assert sandbox.pause() is True
    info = sandbox.get_info()
    assert info.state == SandboxState.PAUSED
    assert not sandbox.is_running()
    assert sandbox.pause() is False  # 409: already paused
    with pytest.raises(SandboxException):  # the proxy answers 502 "... was not found"
        sandbox.commands.run("true", request_timeout=30)

    resumed = Sandbox.connect(sandbox.sandbox_id, timeout=300)  # 201
    assert resumed.is_running() and sandbox.is_running()
    assert Sandbox.get_info(sandbox.sandbox_id).state == SandboxState.RUNNING
    assert resumed.files.read("/tmp/state.txt") == "before pause"
    # Processes survive a (full) pause.
    assert bg.pid in [p.pid for p in resumed.commands.list()]
    assert resumed.commands.run("echo after").stdout == "after\n"
    # pausing a running sandbox again works; connect on the instance resumes
    assert Sandbox.pause(sandbox.sandbox_id) is True
    sandbox.connect()
    assert sandbox.is_running()


def test_racing_connects_pauses_and_kills(make_sandbox) -> None:
    """As E2B's API, which waits out a state change: five connects at once
    to a paused sandbox all get it running (before: one resumed it, four
    got 409 "it is running"); a connect sent while a pause is in flight
    leaves it running (before: it answered, then the pause went through);
    of five kills at once exactly one is true."""
    sbx = make_sandbox()
    assert sbx.pause() is True
    with ThreadPoolExecutor(5) as pool:
        connected = list(pool.map(lambda _: Sandbox.connect(sbx.sandbox_id, timeout=300), range(5)))
    assert all(c.sandbox_id == sbx.sandbox_id for c in connected)
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
    for _ in range(3):
        with ThreadPoolExecutor(2) as pool:
            paused = pool.submit(Sandbox.pause, sbx.sandbox_id)
            time.sleep(0.005)
            connect = pool.submit(Sandbox.connect, sbx.sandbox_id, timeout=300)
            paused.result(), connect.result()
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
        assert sbx.commands.run("echo up").stdout == "up\n"
    with ThreadPoolExecutor(5) as pool:
        killed = list(pool.map(lambda _: Sandbox.kill(sbx.sandbox_id), range(5)))
    assert sorted(killed) == [False] * 4 + [True], killed


def test_metrics(sandbox: Sandbox) -> None:
    sandbox.commands.run("head -c 20000000 /dev/urandom | sha256sum >/dev/null")

    def some():
        return sandbox.get_metrics()

    metrics = poll(some, timeout=60, interval=2, what="metrics")
    m = metrics[-1]
    assert m.cpu_count >= 1 and m.mem_total > 0 and m.disk_total > 0
    assert 0 <= m.cpu_used_pct <= 100 * m.cpu_count
    assert m.mem_used <= m.mem_total and m.disk_used <= m.disk_total
    assert abs((m.timestamp - now()).total_seconds()) < 900
    # a time window
    assert isinstance(sandbox.get_metrics(start=now() - timedelta(minutes=5), end=now()), list)
    # one point per 5 s, as E2B collects them (the agent samples every 500 ms)
    two = poll(lambda: len(m := sandbox.get_metrics()) >= 2 and m, timeout=60, interval=1, what="two metrics")
    gaps = [(b.timestamp - a.timestamp).total_seconds() for a, b in zip(two, two[1:])]
    assert min(gaps) >= 4.0, gaps  # (the first sample in each 5 s of the clock)


def test_metrics_only_grow(sandbox: Sandbox) -> None:
    """Polled, a running sandbox's metrics only gain points, across the
    agent's 30 s points too (before, each new one swallowed the 5 s points
    before it, and the list was briefly empty)."""
    seen = poll(lambda: len(m := sandbox.get_metrics()) >= 2 and m, timeout=60, interval=1, what="two metrics")
    seen = {p.timestamp for p in seen}
    end = time.monotonic() + 35
    while time.monotonic() < end:
        time.sleep(2.5)
        now = {p.timestamp for p in sandbox.get_metrics()}
        assert seen <= now, f"points gone: {sorted(seen - now)}"
        seen = now
    assert len(seen) >= 7, sorted(seen)


def test_a_deadline_passed_while_paused_does_not_end_a_resumed_sandbox(make_sandbox, server) -> None:
    """Paused before its timeout ran out, resumed after: through wrenn's API
    it gets E2B's default timeout from then (its old deadline would end it
    at once); through E2B's connect, the one asked for."""
    sbx = make_sandbox(timeout=10)
    assert sbx.pause() is True
    time.sleep(12)  # its deadline passes while it is paused
    with server.wrenn() as h:
        r = h.post(f"/v1/capsules/{sbx.sandbox_id}/resume")
        assert r.status_code == 200, r.text
    time.sleep(3)  # (the deadline loop looks every second)
    info = Sandbox.get_info(sbx.sandbox_id)
    assert info.state == SandboxState.RUNNING, info
    assert 280 <= (info.end_at - now()).total_seconds() <= 300, info.end_at
    assert sbx.pause() is True
    again = Sandbox.connect(sbx.sandbox_id, timeout=120)
    assert again.commands.run("echo on").stdout == "on\n"
    assert 100 <= (Sandbox.get_info(sbx.sandbox_id).end_at - now()).total_seconds() <= 120


def test_set_timeout_on_a_wrenn_capsule_takes_its_ttls_place(server) -> None:
    """A capsule made by wrenn's API (an inactivity TTL, which pauses) given
    a timeout through E2B: it lives until then, idle or not (the TTL is
    gone, from the agent and the row), and then pauses, as its lifecycle
    said, instead of being killed."""
    with server.wrenn() as h:
        r = h.post("/v1/capsules", json={"template": "minimal", "timeout_sec": 3})
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        try:
            assert Sandbox.get_info(cid).lifecycle["on_timeout"] == "pause"
            Sandbox.set_timeout(cid, 20)
            assert Sandbox.get_info(cid).lifecycle["on_timeout"] == "pause"
            assert h.get(f"/v1/capsules/{cid}").json()["timeout_sec"] == 0
            time.sleep(8)  # idle for more than twice its old TTL (the reaper looks every second)
            assert h.get(f"/v1/capsules/{cid}").json()["status"] == "running"
            poll(lambda: h.get(f"/v1/capsules/{cid}").json()["status"] == "paused",
                 timeout=60, interval=1, what="the deadline's pause")
            again = Sandbox.connect(cid, timeout=60)
            assert again.commands.run("echo kept").stdout == "kept\n"
        finally:
            h.delete(f"/v1/capsules/{cid}")


def test_same_capsule_in_wrenn_api(sandbox: Sandbox, server) -> None:
    """One control plane, one set of capsules: the E2B sandbox is a capsule
    of the admin team in wrenn's /v1 API, and a wrenn capsule is listed by
    the E2B API."""
    with server.wrenn() as h:
        r = h.get(f"/v1/capsules/{sandbox.sandbox_id}")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "running"
        r = h.post("/v1/capsules", json={"template": "minimal"})
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        try:
            ids = set()
            p = Sandbox.list(limit=100)
            while p.has_next:
                ids |= {s.sandbox_id for s in p.next_items()}
            assert {sandbox.sandbox_id, cid} <= ids
        finally:
            h.delete(f"/v1/capsules/{cid}")


def test_team_isolation(sandbox: Sandbox, server, team_b, tag: str) -> None:
    key_b = team_b.e2b_key
    assert Sandbox.kill(sandbox.sandbox_id, api_key=key_b) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sandbox.sandbox_id, api_key=key_b)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sandbox.sandbox_id, api_key=key_b)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.pause(sandbox.sandbox_id, api_key=key_b)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(sandbox.sandbox_id, 5, api_key=key_b)
    assert sandbox.is_running()

    b = Sandbox.create(api_key=key_b, timeout=120, metadata={"tag": tag})
    try:
        assert b.commands.run("echo b").stdout == "b\n"
        mine = Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()
        assert mine == []  # the admin team does not see team B's sandbox
        theirs = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}), api_key=key_b).next_items()
        assert [s.sandbox_id for s in theirs] == [b.sandbox_id]
    finally:
        Sandbox.kill(b.sandbox_id, api_key=key_b)


def test_context_manager_kills(server, tag: str) -> None:
    with Sandbox.create(timeout=120, metadata={"tag": tag}) as sbx:
        sid = sbx.sandbox_id
        assert sbx.is_running()
    time.sleep(0.5)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sid)
