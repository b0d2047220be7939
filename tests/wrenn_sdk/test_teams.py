"""Tenancy: another team's key sees nothing of ours (404, as if it did not
exist), bad keys are 401, and events/stats are per team."""

from __future__ import annotations

import json

import httpx
import httpx_ws
import pytest
from wrenn import (
    Capsule,
    WrennAuthenticationError,
    WrennClient,
    WrennNotFoundError,
)
from wrenn.commands import Commands
from wrenn.files import Files
from wrenn.models import Status
from wrennsdk_support import Collector, assert_error_body, drain, unique

BAD_KEY = "wrn_" + "0" * 32


def test_team_b_cannot_touch_team_a(server, client: WrennClient, team_b, capsule: Capsule) -> None:
    cid = capsule.capsule_id
    b = team_b.client
    assert cid not in [m.id for m in b.capsules.list()]
    for call in (b.capsules.get, b.capsules.pause, b.capsules.resume, b.capsules.ping,
                 b.capsules.metrics, b.capsules.destroy):
        with pytest.raises(WrennNotFoundError) as ei:
            call(cid)
        assert ei.value.code == "not_found" and ei.value.status_code == 404, call

    cmds, files = Commands(cid, b.http), Files(cid, b.http)
    with pytest.raises(WrennNotFoundError):
        cmds.run("echo pwned > /tmp/pwned")
    with pytest.raises(WrennNotFoundError):
        cmds.run("sleep 100", background=True)
    with pytest.raises(WrennNotFoundError):
        cmds.list()
    with pytest.raises(WrennNotFoundError):
        cmds.kill(1)
    with pytest.raises(WrennNotFoundError):
        files.read("/etc/hostname")
    with pytest.raises(WrennNotFoundError):
        files.write("/tmp/pwned", "x")
    with pytest.raises(WrennNotFoundError):
        files.list("/")
    with pytest.raises(WrennNotFoundError):
        files.make_dir("/tmp/pwned-dir")
    with pytest.raises(WrennNotFoundError):
        files.remove("/tmp")
    with pytest.raises(WrennNotFoundError):
        files.upload_stream("/tmp/pwned", iter([b"x"]))
    with pytest.raises(httpx.HTTPStatusError) as hi:
        b"".join(files.download_stream("/etc/hostname"))
    assert hi.value.response.status_code == 404
    with pytest.raises(WrennNotFoundError):
        b.snapshots.create(cid, name=unique("stolen"))

    # WebSockets: ended by an error frame saying the capsule is not found
    events = drain(lambda: cmds.stream("echo pwned"), 10)
    assert [e.type for e in events] == ["error"] and "not found" in events[0].data, events
    with httpx_ws.connect_ws(f"/v1/capsules/{cid}/pty", b.http) as ws:
        ws.send_text(json.dumps({"type": "start", "cmd": "/bin/bash", "cols": 80, "rows": 24}))
        msg = ws.receive(timeout=10)
        data = json.loads(msg.data) if isinstance(msg.data, str) else {}
        assert data.get("type") == "error" and data.get("fatal") is True, msg
        assert "not found" in data.get("data", ""), data

    # the path-form proxy is scoped by key too: plain 404
    with server.http(team_b.api_key) as h:
        r = h.get(f"/proxy/{cid}/8080/")
    assert r.status_code == 404
    assert r.headers.get("content-type", "").startswith("text/plain"), r.headers

    # nothing happened to A's capsule
    assert client.capsules.get(cid).status == Status.running
    assert capsule.files.exists("/tmp/pwned") is False
    assert capsule.commands.run("echo still-mine").stdout == "still-mine\n"


def test_team_b_has_its_own_world(server, client: WrennClient, team_b, capsule: Capsule) -> None:
    with Capsule(template="minimal", wait=True, api_key=team_b.api_key, base_url=server.base_url) as bc:
        assert bc.commands.run("echo team-b").stdout == "team-b\n"
        assert bc.capsule_id in [m.id for m in team_b.client.capsules.list()]
        assert bc.capsule_id not in [m.id for m in client.capsules.list()]
        with pytest.raises(WrennNotFoundError):
            client.capsules.get(bc.capsule_id)
        s = team_b.client.capsules.stats()
        assert s.current is not None and s.current.running_count == 1
        assert "minimal" in [t.name for t in team_b.client.snapshots.list(type="base")]


def test_snapshots_are_per_team(server, client: WrennClient, team_b, capsule: Capsule) -> None:
    name = unique("snapteam")
    capsule.create_snapshot(name=name)
    try:
        assert name not in [t.name for t in team_b.client.snapshots.list()]
        with pytest.raises(WrennNotFoundError):
            team_b.client.snapshots.delete(name)
        with pytest.raises(WrennNotFoundError):
            team_b.client.capsules.create(template=name)
        assert name in [t.name for t in client.snapshots.list()]
    finally:
        client.snapshots.delete(name)


def test_events_are_per_team(server, client: WrennClient, team_b) -> None:
    listener = WrennClient(api_key=team_b.api_key, base_url=server.base_url)
    col = Collector(listener.events.stream, name="sse-b")
    try:
        col.wait_for(lambda items: items, 10, "team B's connected frame")
        a = client.capsules.create(template="minimal")
        client.capsules.destroy(a.id)
        b = team_b.client.capsules.create(template="minimal")
        team_b.client.capsules.destroy(b.id)
        col.wait_for(
            lambda items: any(e.event == "capsule.destroy" and e.resource and e.resource.id == b.id
                              for e in items),
            30,
            "team B's own destroy event",
        )
        assert not any(e.resource and e.resource.id == a.id for e in col.items), "saw team A's events"
    finally:
        listener.close()


def test_bad_and_missing_keys(server) -> None:
    with WrennClient(api_key=BAD_KEY, base_url=server.base_url) as bad:
        with pytest.raises(WrennAuthenticationError) as ei:
            bad.capsules.list()
        assert ei.value.code == "unauthorized" and ei.value.status_code == 401
        with pytest.raises(WrennAuthenticationError):
            bad.snapshots.list()
        with pytest.raises(WrennAuthenticationError):
            bad.capsules.stats()
    with pytest.raises(WrennAuthenticationError):
        Capsule(template="minimal", api_key=BAD_KEY, base_url=server.base_url)
    with pytest.raises(WrennAuthenticationError):
        Capsule(template="minimal", api_key="not-even-a-wrenn-key", base_url=server.base_url)

    with server.http(api_key=None) as anon:
        assert_error_body(anon.get("/v1/capsules"), 401, "unauthorized")
        assert_error_body(anon.post("/v1/capsules", json={}), 401, "unauthorized")
        assert_error_body(anon.get("/v1/snapshots"), 401, "unauthorized")
        assert_error_body(anon.get("/v1/events/stream"), 401, "unauthorized")
        assert_error_body(anon.post("/v1/teams", json={"name": "x"}), 401, "unauthorized")
        r = anon.get("/v1/capsules", headers={"X-API-Key": ""})
        assert_error_body(r, 401, "unauthorized")
        # the WebSocket routes check the key before upgrading
        with pytest.raises(httpx_ws.WebSocketUpgradeError) as wi:
            with httpx_ws.connect_ws(f"/v1/capsules/{'cl-' + '0' * 25}/pty", anon):
                pass
        assert wi.value.response.status_code == 401

