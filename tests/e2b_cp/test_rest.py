"""The E2B REST surface on the wire: response fields the SDKs parse
(required ones included, deprecated ``clientID``/``timestamp`` too), status
codes, error bodies, and the routes e2b 2.63 only ships in its generated
client (``POST /sandboxes``, ``/sandboxes/{id}/connect``, ``/resume``,
``/refreshes``, ``/logs``, ``/v2/sandboxes/{id}/logs``, ``GET /sandboxes``,
``GET /sandboxes/metrics``) — what older SDKs and other tools call. The
generated client is driven unmodified wherever it covers a route."""

from __future__ import annotations

import time

import httpx
import pytest
from e2b import Sandbox
from e2b.api.client.api.sandboxes import (
    get_sandboxes,
    get_sandboxes_metrics,
    get_sandboxes_sandbox_id,
    get_sandboxes_sandbox_id_logs,
    get_v2_sandboxes,
    get_v_2_sandboxes_sandbox_id_logs,
    post_sandboxes,
    post_sandboxes_sandbox_id_connect,
    post_sandboxes_sandbox_id_refreshes,
    post_sandboxes_sandbox_id_resume,
)
from e2b.api.client.models import (
    ConnectSandbox,
    Error,
    ListedSandbox,
    NewSandbox,
    ResumedSandbox,
    SandboxDetail,
    SandboxLogs,
    SandboxLogsV2Response,
    SandboxRefreshRequest,
    SandboxesWithMetrics,
)
from e2b.api.client.models import Sandbox as CreatedSandbox
from e2b.api.client_sync import get_api_client
from e2b.connection_config import ConnectionConfig

from e2bcp_support import BASE, assert_e2b_error, now, parse_time, unique_tag

SANDBOX_REQUIRED = {"templateID", "sandboxID", "clientID", "envdVersion"}
DETAIL_REQUIRED = SANDBOX_REQUIRED | {"startedAt", "endAt", "cpuCount", "memoryMB", "diskSizeMB", "state"}
LISTED_REQUIRED = DETAIL_REQUIRED


@pytest.fixture
def api_client(server):
    return get_api_client(ConnectionConfig())


@pytest.fixture
def raw_sandbox(server):
    """A sandbox made with a raw ``POST /v2/sandboxes``; killed after."""
    with server.api() as h:
        r = h.post("/v2/sandboxes", json={"templateID": BASE, "timeout": 120,
                                          "metadata": {"raw": "yes"}, "envVars": {"A": "1"}})
        assert r.status_code == 201, r.text
        body = r.json()
        try:
            yield body
        finally:
            h.delete(f"/sandboxes/{body['sandboxID']}")


def test_create_response(raw_sandbox, server) -> None:
    body = raw_sandbox
    assert SANDBOX_REQUIRED <= set(body), body
    assert isinstance(body["clientID"], str)  # deprecated, still required
    assert isinstance(body["envdAccessToken"], str) and body["envdAccessToken"]
    assert body["domain"] == server.domain
    assert body.get("trafficAccessToken") is None or isinstance(body["trafficAccessToken"], str)
    assert body.get("alias") in (None, BASE)
    parsed = CreatedSandbox.from_dict(body)  # what the SDK does with it
    assert parsed.sandbox_id == body["sandboxID"]


def test_detail_and_list_shapes(raw_sandbox, server) -> None:
    sid = raw_sandbox["sandboxID"]
    with server.api() as h:
        r = h.get(f"/sandboxes/{sid}")
        assert r.status_code == 200, r.text
        d = r.json()
        assert DETAIL_REQUIRED <= set(d), d
        assert d["state"] == "running" and d["metadata"] == {"raw": "yes"}
        assert isinstance(d["cpuCount"], int) and isinstance(d["memoryMB"], int)
        assert isinstance(d["diskSizeMB"], int)
        assert parse_time(d["endAt"]) > parse_time(d["startedAt"])
        assert d["startedAt"].endswith("Z") or "+" in d["startedAt"][10:]
        if "lifecycle" in d:
            assert d["lifecycle"] == {"autoResume": False, "onTimeout": "kill"}, d
        SandboxDetail.from_dict(d)

        r = h.get("/v2/sandboxes", params={"metadata": "raw=yes"})
        assert r.status_code == 200, r.text
        items = r.json()
        assert [i["sandboxID"] for i in items] == [sid]
        assert LISTED_REQUIRED <= set(items[0])
        ListedSandbox.from_dict(items[0])
        assert not r.headers.get("x-next-token")  # last page: no (or empty) token

        # the legacy list: running sandboxes, same shape
        r = h.get("/sandboxes", params={"metadata": "raw=yes"})
        assert r.status_code == 200 and [i["sandboxID"] for i in r.json()] == [sid], r.text


def test_generated_v1_create_connect_resume(api_client, server, tag: str) -> None:
    body = NewSandbox(template_id=BASE, timeout=120, secure=True, allow_internet_access=True,
                      auto_pause=False, metadata={"tag": tag}, env_vars={})
    res = post_sandboxes.sync_detailed(client=api_client, body=body)
    assert res.status_code == 201, res.content
    sid = res.parsed.sandbox_id
    try:
        res = post_sandboxes_sandbox_id_connect.sync_detailed(sid, client=api_client, body=ConnectSandbox(timeout=300))
        assert res.status_code == 200, res.content  # running: 200
        assert res.parsed.sandbox_id == sid and res.parsed.envd_access_token

        res = post_sandboxes_sandbox_id_resume.sync_detailed(sid, client=api_client, body=ResumedSandbox(timeout=60))
        assert res.status_code == 409 and isinstance(res.parsed, Error), res.content  # already running

        assert Sandbox.pause(sid) is True
        res = post_sandboxes_sandbox_id_resume.sync_detailed(sid, client=api_client, body=ResumedSandbox(timeout=60))
        assert res.status_code == 201, res.content
        assert res.parsed.sandbox_id == sid

        assert Sandbox.pause(sid) is True
        res = post_sandboxes_sandbox_id_connect.sync_detailed(sid, client=api_client, body=ConnectSandbox(timeout=60))
        assert res.status_code == 201, res.content  # resumed: 201
        assert Sandbox.connect(sid).commands.run("echo back").stdout == "back\n"
    finally:
        Sandbox.kill(sid)


def test_generated_refreshes_logs_metrics(api_client, sandbox, server) -> None:
    sid = sandbox.sandbox_id
    sandbox.set_timeout(30)
    res = post_sandboxes_sandbox_id_refreshes.sync_detailed(sid, client=api_client,
                                                            body=SandboxRefreshRequest(duration=600))
    assert res.status_code == 204, res.content
    left = (Sandbox.get_info(sid).end_at - now()).total_seconds()
    assert left > 500, left

    res = get_sandboxes_sandbox_id_logs.sync_detailed(sid, client=api_client)
    assert res.status_code == 200 and isinstance(res.parsed, SandboxLogs), res.content
    res = get_v_2_sandboxes_sandbox_id_logs.sync_detailed(sid, client=api_client)
    assert res.status_code == 200 and isinstance(res.parsed, SandboxLogsV2Response), res.content

    deadline = time.monotonic() + 60
    while True:
        res = get_sandboxes_metrics.sync_detailed(client=api_client, sandbox_ids=[sid])
        assert res.status_code == 200 and isinstance(res.parsed, SandboxesWithMetrics), res.content
        if sid in res.parsed.sandboxes or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert isinstance(res.parsed.sandboxes, dict) and sid in res.parsed.sandboxes, res.content
    metric = res.parsed.sandboxes[sid]
    assert {"timestamp", "timestampUnix", "cpuCount", "cpuUsedPct", "memUsed", "memTotal",
            "memCache", "diskUsed", "diskTotal"} <= set(metric), metric

    res = get_sandboxes_sandbox_id.sync_detailed(sid, client=api_client)
    assert res.status_code == 200 and isinstance(res.parsed, SandboxDetail)
    res = get_v2_sandboxes.sync_detailed(client=api_client, limit=1)
    assert res.status_code == 200 and isinstance(res.parsed, list)
    res = get_sandboxes.sync_detailed(client=api_client)
    assert res.status_code == 200 and isinstance(res.parsed, list)


def test_logs(server, sandbox) -> None:
    """The sandbox's log: what happened to it, oldest first (v1), and the
    v2 cursor/direction/limit/level/search filters."""
    sid = sandbox.sandbox_id
    assert sandbox.pause() is True
    sandbox.connect()
    with server.api() as h:
        r = h.get(f"/sandboxes/{sid}/logs")
        assert r.status_code == 200, r.text
        v1 = SandboxLogs.from_dict(r.json())
        lines = [l.line for l in v1.logs]
        assert len(lines) == 3 and lines[0].startswith("started from template base"), lines
        assert lines[1:] == ["paused (memory kept)", "resumed"], lines
        assert [e.message for e in v1.log_entries] == lines
        assert {e.level.value for e in v1.log_entries} == {"info"}

        r = h.get(f"/v2/sandboxes/{sid}/logs")
        assert r.status_code == 200, r.text
        v2 = [e["message"] for e in r.json()["logs"]]
        assert v2 == lines
        back = h.get(f"/v2/sandboxes/{sid}/logs", params={"direction": "backward", "limit": 2}).json()["logs"]
        assert [e["message"] for e in back] == ["resumed", "paused (memory kept)"]
        found = h.get(f"/v2/sandboxes/{sid}/logs", params={"search": "paused"}).json()["logs"]
        assert [e["message"] for e in found] == ["paused (memory kept)"]
        assert h.get(f"/v2/sandboxes/{sid}/logs", params={"level": "warn"}).json()["logs"] == []
        later = parse_time(back[0]["timestamp"])
        cursor = int(later.timestamp() * 1000)
        assert [e["message"] for e in h.get(f"/v2/sandboxes/{sid}/logs",
                params={"cursor": cursor}).json()["logs"]] == ["resumed"]
        assert_e2b_error(h.get(f"/v2/sandboxes/{sid}/logs", params={"direction": "sideways"}), 400)
        assert_e2b_error(h.get(f"/sandboxes/{sid}/logs", params={"limit": "many"}), 400)


def test_error_bodies(server, sandbox) -> None:
    unknown = "cl-" + "0" * 25
    with server.api() as h:
        for method, path, body in [
            ("GET", f"/sandboxes/{unknown}", None),
            ("DELETE", f"/sandboxes/{unknown}", None),
            ("POST", f"/sandboxes/{unknown}/timeout", {"timeout": 10}),
            ("POST", f"/sandboxes/{unknown}/pause", {}),
            ("POST", f"/sandboxes/{unknown}/resume", {}),
            ("POST", f"/sandboxes/{unknown}/connect", {"timeout": 10}),
            ("POST", f"/v2/sandboxes/{unknown}/connect", {}),
            ("POST", f"/sandboxes/{unknown}/refreshes", {}),
            ("GET", f"/sandboxes/{unknown}/metrics", None),
            ("GET", f"/sandboxes/{unknown}/logs", None),
            ("GET", "/sandboxes/not-an-id", None),
        ]:
            r = h.request(method, path, json=body)
            assert_e2b_error(r, 404)

        # pause twice: 409
        assert h.post(f"/sandboxes/{sandbox.sandbox_id}/pause", json={}).status_code == 204
        assert_e2b_error(h.post(f"/sandboxes/{sandbox.sandbox_id}/pause", json={}), 409)
        # an empty pause body (older SDKs send none)
        assert h.post(f"/v2/sandboxes/{sandbox.sandbox_id}/connect", json={}).status_code == 201
        r = h.post(f"/sandboxes/{sandbox.sandbox_id}/pause")
        assert r.status_code == 204, r.text
        assert h.post(f"/v2/sandboxes/{sandbox.sandbox_id}/connect", json={"timeout": 60}).status_code == 201

        # bad bodies: 400 with the E2B shape
        assert_e2b_error(h.post("/v2/sandboxes", json={"timeout": 10}), 400)  # no templateID
        assert_e2b_error(h.post("/v2/sandboxes", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
        assert_e2b_error(h.post(f"/sandboxes/{sandbox.sandbox_id}/timeout", json={}), 400)

    for key in (None, "e2b_" + "0" * 40, "wrong"):
        with server.api(api_key=key) as h:
            assert_e2b_error(h.get("/v2/sandboxes"), 401)
            assert_e2b_error(h.post("/v2/sandboxes", json={"templateID": BASE}), 401)


def test_connect_memory_false_applies_to_a_paused_sandbox_only(server, sandbox) -> None:
    """``memory: false`` (reboot from the filesystem) is about resuming: on
    a running sandbox connect ignores it; a paused one cannot be rebooted
    here (400)."""
    sid = sandbox.sandbox_id
    with server.api() as h:
        r = h.post(f"/v2/sandboxes/{sid}/connect", json={"timeout": 60, "memory": False})
        assert r.status_code == 200, r.text
        assert h.post(f"/sandboxes/{sid}/pause", json={}).status_code == 204
        assert_e2b_error(h.post(f"/v2/sandboxes/{sid}/connect", json={"memory": False}), 400)
        assert h.post(f"/v2/sandboxes/{sid}/connect", json={"timeout": 60}).status_code == 201


def test_parts_of_the_api_not_served_say_so(server, sandbox) -> None:
    """Templates (built with recipes here), snapshots, forks, network
    updates: 501 in E2B's shape, not a 404 the SDK would read as "no such
    sandbox" (or wrenn's shape, which its parser cannot read)."""
    sid = sandbox.sandbox_id
    with server.api() as h:
        for method, path in [
            ("GET", "/templates/aliases/base"),
            ("POST", "/v3/templates"),
            ("GET", "/v2/templates/base/builds/b1"),
            ("GET", "/snapshots"),
            ("PUT", f"/sandboxes/{sid}/network"),
            ("POST", f"/sandboxes/{sid}/snapshots"),
            ("POST", f"/sandboxes/{sid}/fork"),
        ]:
            r = h.request(method, path, json={})
            assert_e2b_error(r, 501)
            assert "not supported" in r.json()["message"], (path, r.text)
        assert_e2b_error(h.get(f"/sandboxes/{sid}/nothing-here"), 404)
    assert sandbox.is_running()  # (not taken for a missing sandbox)


def test_chunked_body_and_header_case(server) -> None:
    """The JS SDK sends control-plane bodies chunked; header names are
    case-insensitive (``x-api-key``)."""
    def gen():
        yield b'{"templateID": "base",'
        yield b' "timeout": 60}'

    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=60,
                      headers={"x-api-key": server.e2b_api_key}) as h:
        r = h.post("/v2/sandboxes", content=gen(), headers={"Content-Type": "application/json"})
        assert r.status_code == 201, r.text
        assert r.request.headers.get("transfer-encoding") == "chunked"
        assert h.delete(f"/sandboxes/{r.json()['sandboxID']}").status_code == 204


def test_idempotency_key(make_sandbox, tag: str) -> None:
    key = unique_tag("idem")
    a = make_sandbox(metadata={"tag": tag}, idempotency_key=key)
    b = make_sandbox(metadata={"tag": tag}, idempotency_key=key)
    assert a.sandbox_id == b.sandbox_id


def test_api_health_and_envd_health_share_the_port(server, sandbox) -> None:
    """One port: ``GET /health`` without routing headers is wrenn's; with
    ``E2b-Sandbox-Id`` it is the sandbox's envd."""
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=30) as h:
        api = h.get("/health")
        assert api.status_code == 200 and api.json()["status"] == "ok", api.text
        # envd's own answer (wrenn's envd: 200 {"version"}; E2B's: 204 —
        # the SDKs accept any 2xx, e2b/sandbox_sync/main.py:147-164)
        r = h.get("/health", headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49983"})
        assert r.is_success and "status" not in r.text, (r.status_code, r.text)
