"""Multi-host: a second ``wrenn-agent`` on this machine (its own data dir,
instance and address pool) joins the running control plane with a
registration token, heartbeats, takes capsules by least-loaded placement,
moves to a new address across a restart (its heartbeat says so), and can be
deleted once it has no capsules. A host that stops heartbeating is
``unreachable`` and its capsules ``missing`` until it is back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from wrenn import Capsule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
import wrenn_up  # noqa: E402

LISTENING = "wrenn-agent listening on "
NET_POOL = 1  # capsule networks a second agent keeps ready


def start_agent(binary: str, up: wrenn_up.WrennUp, control_plane: str, token: str | None,
                extra: tuple[str, ...] = (), listen: str = "127.0.0.1:0") -> tuple[subprocess.Popen, str]:
    cmd = [
        binary, "--listen", listen, "--data-dir", str(up.data_dir), "--envd", up.envd,
        "--instance", up.instance, "--pool", up.pool, "--net-pool", str(NET_POOL),
        "--control-plane", control_plane, *extra,
    ]
    if token:
        cmd += ["--registration-token", token]
    log = open(up.data_dir / "agent.log", "ab")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    assert line.startswith(LISTENING), f"agent said {line!r}; log: {(up.data_dir / 'agent.log').read_text()[-2000:]}"
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, line[len(LISTENING):].strip()


def wait_host(h: httpx.Client, host_id: str, address: str, limit: float = 30) -> dict:
    deadline = time.monotonic() + limit
    while True:
        r = h.get(f"/v1/hosts/{host_id}")
        if r.status_code == 200 and r.json()["status"] == "online" and r.json()["address"] == address:
            return r.json()
        assert time.monotonic() < deadline, f"host {host_id} never online at {address}: {r.text}"
        time.sleep(0.2)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class SecondAgent:
    """A second agent beside ``server``: its own data dir under /var/tmp
    (the fixture templates linked in), instance and pool; ``start`` runs it
    (``proc``). On leaving the ``with`` block, however the test ended, the
    capsules in ``made`` are destroyed through ``h``, the agent stopped,
    its host objects purged and its data dir removed."""

    def __init__(self, server, with_minimal: bool = True) -> None:
        wrenn_bin, envd = wrenn_up.resolve_binaries()
        self.binary = (os.environ.get("WRENN_AGENT_BIN")
                       or str(Path(wrenn_bin).with_name("wrenn-agent")))
        self.data = Path(tempfile.mkdtemp(prefix="wrenn-sdk-agent-", dir="/var/tmp"))
        if with_minimal:  # (a host of its own makes busybox only)
            wrenn_up._link_fixture_templates(self.data, ())
        self.up = wrenn_up.WrennUp(self.data, binary=wrenn_bin, envd=envd)
        self.server = server
        self.h = server.http()
        self.proc: subprocess.Popen | None = None
        self.made: list[str] = []

    def start(self, token: str | None, extra: tuple[str, ...] = (),
              listen: str = "127.0.0.1:0") -> str:
        """Start the agent (registering with ``token``) on ``listen``; its
        address."""
        self.proc, addr = start_agent(self.binary, self.up, self.server.base_url, token, extra,
                                      listen)
        return addr

    def join(self, busier_first: bool = False) -> str:
        """Register a new host for this agent and start it; its host ID,
        once the host is online. ``busier_first``: first make the hosts
        there are busier than the new one (a ``minimal`` capsule, in
        ``made``), so that placement prefers the new one. It heartbeats
        every second, so that ``leave`` does not wait for the default 30 s."""
        if busier_first:
            r = self.h.post("/v1/capsules", json={"template": "minimal", "memory_mb": 256})
            assert r.status_code == 201, r.text
            self.made.append(r.json()["id"])
        reg = self.h.post("/v1/hosts")
        assert reg.status_code == 201, reg.text
        host_id, token = reg.json()["host"]["id"], reg.json()["registration_token"]
        wait_host(self.h, host_id, self.start(token, ("--heartbeat-interval", "1s")))
        return host_id

    def place(self, template: str) -> str:
        """Create capsules from ``template`` (256 MiB; each kept in
        ``made``) until one lands on this agent's host, at most 4; its ID."""
        for _ in range(4):
            r = self.h.post("/v1/capsules", json={"template": template, "memory_mb": 256})
            assert r.status_code == 201, r.text
            self.made.append(r.json()["id"])
            if self.made[-1] in self.up.runc_containers():
                return self.made[-1]
        raise AssertionError(f"no capsule landed on the second host: {self.made}")

    def destroy_made(self, gone_ok: bool = False) -> None:
        """Destroy the capsules in ``made`` through the API, each a 204
        (or a 404 too, ``gone_ok``: one the test saw go), and forget them."""
        for cid in self.made:
            r = self.h.delete(f"/v1/capsules/{cid}")
            assert r.status_code == 204 or (gone_ok and r.status_code == 404), (cid, r.text)
        self.made.clear()

    def leave(self, host_id: str) -> None:
        """Delete host ``host_id`` (this agent's): the agent exits, 0."""
        assert self.h.delete(f"/v1/hosts/{host_id}").status_code == 204
        assert self.proc is not None and self.proc.wait(60) == 0, self.log_tail()
        self.proc = None

    def log_tail(self) -> str:
        return (self.data / "agent.log").read_text()[-2000:]

    def __enter__(self) -> "SecondAgent":
        return self

    def __exit__(self, *exc) -> None:
        for cid in self.made:
            self.h.delete(f"/v1/capsules/{cid}")
        self.h.close()
        stop(self.proc)
        self.up.purge()
        shutil.rmtree(self.data, ignore_errors=True)


def posting(server, path: str, body: dict) -> tuple[threading.Thread, dict[str, httpx.Response]]:
    """``POST path`` with ``body`` to ``server`` on a thread of its own (a
    client of its own, 600 s): the thread, started, and the dict its
    answer goes to (``"r"``)."""
    answer: dict[str, httpx.Response] = {}

    def post() -> None:
        with server.http() as c:
            answer["r"] = c.post(path, timeout=600, json=body)

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread, answer


@contextlib.contextmanager
def watching_events(h: httpx.Client) -> Iterator[list[dict]]:
    """The team's events (``/v1/events/stream``), appended as they come to
    the list yielded, while the block runs."""
    seen: list[dict] = []

    def listen(events: httpx.Response) -> None:
        try:
            for line in events.iter_lines():
                if line.startswith("data:"):
                    seen.append(json.loads(line[5:]))
        except httpx.HTTPError:
            pass  # (closed at the end)

    with h.stream("GET", "/v1/events/stream", timeout=None) as events:
        threading.Thread(target=listen, args=(events,), daemon=True).start()
        yield seen


def wait_event(seen: list[dict], event: str, capsule_id: str, limit: float) -> dict:
    """The first ``event`` about ``capsule_id`` in ``seen`` (as
    ``watching_events`` fills it), waited for up to ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not (found := [e for e in seen if e["event"] == event
                         and e["resource"]["id"] == capsule_id]):
        assert time.monotonic() < deadline, f"no {event} for {capsule_id} in {seen}"
        time.sleep(0.1)
    return found[0]


def wait_status(h: httpx.Client, path: str, want: str, limit: float) -> dict:
    deadline = time.monotonic() + limit
    while True:
        r = h.get(path)
        assert r.status_code == 200, r.text
        if r.json()["status"] == want:
            return r.json()
        assert time.monotonic() < deadline, f"{path} never {want}: {r.json()}"
        time.sleep(0.1)


# The host monitor made quick for the test below (the defaults: 90 s, 15 s;
# `wrenn up`'s own agent heartbeats every 30 s), and the reconciler's rounds
# slow (a minute, from the start): a host that is back must be reconciled by
# its heartbeat.
QUICK_MONITOR = ["--host-heartbeat-timeout", "4s", "--host-monitor-interval", "500ms",
                 "--heartbeat-interval", "1s", "--reconcile-interval", "60s",
                 "--orphan-layer-grace", "0s"]


def snapshot_layers(agent: "SecondAgent") -> set[str]:
    """The team snapshots' layers an agent keeps (``D/templates/s-*``)."""
    d = agent.data / "templates"
    return {p.name for p in d.iterdir() if p.name.startswith("s-")} if d.is_dir() else set()


def test_a_silent_host_is_unreachable_and_its_capsules_missing_until_it_returns(request) -> None:
    """The spec's host monitor (§3): a host with no heartbeat for the
    timeout becomes ``unreachable`` and its running capsules ``missing``;
    the SDK's wait fails on them and data-plane calls are refused, while
    capsules on other hosts go on. Its first heartbeat back brings the host
    ``online`` and its capsules in line at once: a capsule whose container
    outlived the agent is ``running`` again, its files intact.

    A private ``wrenn up`` (SQLite) with ``QUICK_MONITOR``, and a second
    agent heartbeating every second that is SIGKILLed (its runc containers
    outlive it) and started again on the same data dir."""
    with wrenn_up.WrennUp.serving(request, failed_attr="wrenn_failed", extra_args=QUICK_MONITOR,
                                  prefix="wrenn-sdk-monitor-", code_runner=False) as up, \
            SecondAgent(up.server) as second:
        server, h, made = up.server, second.h, second.made
        started = time.monotonic()  # (the reconciler's first round)
        reg = h.post("/v1/hosts")
        assert reg.status_code == 201, reg.text
        host_id, token = reg.json()["host"]["id"], reg.json()["registration_token"]
        addr = second.start(token, ("--heartbeat-interval", "1s"))
        wait_host(h, host_id, addr)
        # least-loaded placement alternates between the two empty hosts
        for _ in range(4):
            r = h.post("/v1/capsules", json={"template": "minimal", "memory_mb": 256})
            assert r.status_code == 201, r.text
            made.append(r.json()["id"])
        away = [c for c in made if c in second.up.runc_containers()]
        home = [c for c in made if c not in away]
        assert away and home, f"placement put all of {made} on one host"
        r = h.post(f"/v1/capsules/{away[0]}/files/write", data={"path": "/root/marker"},
                   files={"file": ("upload", b"still here", "application/octet-stream")})
        assert r.status_code < 300, r.text
        snap = f"mon-{uuid.uuid4().hex[:6]}"
        r = h.post("/v1/snapshots", json={"sandbox_id": away[0], "name": snap})
        assert r.status_code == 201, r.text
        layers = snapshot_layers(second)
        assert len(layers) == 1, layers

        second.proc.kill()
        second.proc.wait()
        second.proc = None
        host = wait_status(h, f"/v1/hosts/{host_id}", "unreachable", 15)
        # a snapshot on the silent host: creates from it say where it is;
        # deleted, its name is free at once (its layers wait for the host)
        r = h.post("/v1/capsules", json={"template": snap})
        assert r.status_code == 503 and "unreachable" in r.json()["error"]["message"], r.text
        assert h.delete(f"/v1/snapshots/{snap}").status_code == 204
        assert snapshot_layers(second) == layers
        for cid in away:
            wait_status(h, f"/v1/capsules/{cid}", "missing", 5)
        # the SDK's connect waits for running and fails on missing
        with pytest.raises(RuntimeError, match="missing"):
            Capsule.connect(away[0], api_key=server.api_key, base_url=server.base_url)
        r = h.post(f"/v1/capsules/{away[0]}/exec", json={"cmd": "/bin/true"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state", r.text
        # the other host's capsules are untouched
        for cid in home:
            r = h.post(f"/v1/capsules/{cid}/exec", json={"cmd": "/bin/echo", "args": ["ok"]})
            assert r.status_code == 200 and r.json()["stdout"] == "ok\n", r.text
        assert h.get(f"/v1/hosts/{host_id}").json()["last_heartbeat"] == host["last_heartbeat"]

        # back: its first heartbeat reconciles it at once (the
        # reconciler's next round is a minute away)
        addr = second.start(None, ("--heartbeat-interval", "1s"))
        wait_host(h, host_id, addr, limit=15)
        for cid in away:
            wait_status(h, f"/v1/capsules/{cid}", "running", 10)
        assert time.monotonic() - started < 55, "too slow to tell the heartbeat from a round"
        r = h.post(f"/v1/capsules/{away[0]}/files/read", json={"path": "/root/marker"})
        assert r.status_code == 200 and r.content == b"still here", r.text
        # the deleted snapshot's layers go when the host is back
        deadline = time.monotonic() + 15
        while snapshot_layers(second):
            assert time.monotonic() < deadline, f"layers left: {snapshot_layers(second)}"
            time.sleep(0.2)
        second.destroy_made()
        second.leave(host_id)


def test_a_create_cut_off_by_an_agent_crash_is_undone_when_it_returns(request) -> None:
    """An agent killed in the middle of a create: the caller is told it
    failed and the capsule is ``error``, but the agent had begun it (its
    directory, and whatever else it got to). Nobody holds the ID to
    destroy it, so when the host is back its reconciliation does: the
    capsule is ``stopped`` (event reason ``cleanup_after_create_error``) and
    nothing of it is left on the host.

    A private ``wrenn up`` with ``QUICK_MONITOR``; the second agent is
    SIGKILLed the moment its record of the new capsule appears."""
    with wrenn_up.WrennUp.serving(request, failed_attr="wrenn_failed", extra_args=QUICK_MONITOR,
                                  prefix="wrenn-sdk-cutoff-", code_runner=False) as up, \
            SecondAgent(up.server) as second:
        h, made = second.h, second.made
        reg = h.post("/v1/hosts")
        assert reg.status_code == 201, reg.text
        host_id, token = reg.json()["host"]["id"], reg.json()["registration_token"]
        addr = second.start(token, ("--heartbeat-interval", "1s"))
        wait_host(h, host_id, addr)
        dirs = second.data / "capsules"

        def on_second() -> set[str]:
            return {p.name for p in dirs.iterdir()} if dirs.is_dir() else set()

        # Least-loaded placement: once the home host has more, the next
        # create goes to the second.
        for _ in range(4):
            away = on_second()
            if len([c for c in made if c not in away]) > len([c for c in made if c in away]):
                break
            r = h.post("/v1/capsules", json={"template": "minimal", "memory_mb": 256})
            assert r.status_code == 201, r.text
            made.append(r.json()["id"])
        before = on_second()
        assert len(made) > 2 * len(before), f"placement: {made}, on the second host {before}"

        create, answer = posting(up.server, "/v1/capsules", {"template": "minimal", "memory_mb": 256})
        deadline = time.monotonic() + 30
        # (its record, written first: without one the agent sweeps the
        # directory when it starts, and the capsule is merely `orphaned`)
        while not any((dirs / c / "capsule.json").exists() for c in on_second() - before):
            assert create.is_alive(), f"the create ended before the second host began it: {answer}"
            assert time.monotonic() < deadline, "the second host never began the create"
            time.sleep(0.001)
        second.proc.kill()
        second.proc.wait()
        second.proc = None
        create.join(60)
        (cid,) = on_second() - before
        made.append(cid)
        r = answer["r"]
        assert r.status_code >= 500, f"a create cut off by the agent's death answered {r.status_code}: {r.text}"
        assert h.get(f"/v1/capsules/{cid}").json()["status"] == "error"
        wait_status(h, f"/v1/hosts/{host_id}", "unreachable", 15)

        # back: its first heartbeat reconciles it, which undoes the create
        with watching_events(h) as seen:
            addr = second.start(None, ("--heartbeat-interval", "1s"))
            wait_host(h, host_id, addr, limit=15)
            undone = wait_event(seen, "capsule.destroy", cid, 30)
        assert undone["metadata"]["reason"] == "cleanup_after_create_error", undone
        assert h.get(f"/v1/capsules/{cid}").json()["status"] == "stopped"
        deadline = time.monotonic() + 30
        while cid in on_second() or any(cid in o for objs in second.up.capsule_objects().values()
                                        for o in objs):
            assert time.monotonic() < deadline, (on_second(), second.up.capsule_objects())
            time.sleep(0.2)
        # (a network namespace is named by its slot, not by its capsule: one
        # per capsule still there and the agent's ready ones, or the undone
        # one's leaked)
        deadline = time.monotonic() + 15
        while len((objs := second.up.capsule_objects()).get("netns", [])) != len(on_second()) + NET_POOL:
            assert time.monotonic() < deadline, (on_second(), objs)
            time.sleep(0.2)
        # the capsules that were made whole are untouched
        for c in made[:-1]:
            r = h.post(f"/v1/capsules/{c}/exec", json={"cmd": "/bin/echo", "args": ["ok"]})
            assert r.status_code == 200 and r.json()["stdout"] == "ok\n", r.text
        second.destroy_made(gone_ok=True)
        second.leave(host_id)
        assert not second.up.capsule_objects(), second.up.capsule_objects()


def test_an_idle_capsule_shows_paused_at_once_on_either_host(request) -> None:
    """``timeout_sec``: an agent's reaper pauses an idle capsule and says so
    at once (``wrenn up``'s own agent in-process, a remote one by ``POST
    /v1/hosts/sandbox-events``), so the API shows it ``paused`` then
    (``capsule.pause``, reason ``ttl_expired``) and ``connect`` resumes
    it, instead of ``running`` until a reconciliation and a resume refused.
    The reconciler is slowed to ten minutes here: only the reports can
    tell. (60 s is the shortest timeout the API takes.)"""
    with wrenn_up.WrennUp.serving(request, failed_attr="wrenn_failed",
                                  extra_args=["--reconcile-interval", "10m"],
                                  prefix="wrenn-sdk-ttl-", code_runner=False) as up, \
            SecondAgent(up.server) as second:
        h, made = second.h, second.made
        reg = h.post("/v1/hosts")
        assert reg.status_code == 201, reg.text
        host_id = reg.json()["host"]["id"]
        wait_host(h, host_id, second.start(reg.json()["registration_token"]))
        # one idle capsule on each host (least-loaded placement alternates)
        for _ in range(4):
            r = h.post("/v1/capsules", json={"template": "minimal", "memory_mb": 256, "timeout_sec": 60})
            assert r.status_code == 201, r.text
            made.append(r.json()["id"])
            away = set(second.up.runc_containers())
            if any(c in away for c in made) and any(c not in away for c in made):
                break
        idle = [made[-2], made[-1]]
        assert {c in set(second.up.runc_containers()) for c in idle} == {True, False}, made

        with watching_events(h) as seen:
            deadline = time.monotonic() + 90  # (for both)
            pauses = {c: wait_event(seen, "capsule.pause", c, deadline - time.monotonic())
                      for c in idle}
        for c, paused in pauses.items():
            assert paused["metadata"]["reason"] == "ttl_expired", paused
            # within seconds of the timeout (reconciliation would be minutes)
            idle_for = (datetime.fromisoformat(paused["timestamp"])
                        - datetime.fromisoformat(paused["sandbox"]["last_active_at"])).total_seconds()
            assert idle_for <= 70, paused
            assert h.get(f"/v1/capsules/{c}").json()["status"] == "paused"
            with Capsule.connect(c, api_key=up.server.api_key, base_url=up.server.base_url) as conn:
                assert conn.commands.run("echo back").stdout == "back\n"
        second.destroy_made(gone_ok=True)  # (the idle two were destroyed leaving their `with`)


def test_a_second_agent_joins_takes_capsules_and_leaves(server) -> None:
    with SecondAgent(server) as second:
        h, made, up, data = second.h, second.made, second.up, second.data
        reg = h.post("/v1/hosts")
        assert reg.status_code == 201, reg.text
        host_id, token = reg.json()["host"]["id"], reg.json()["registration_token"]
        assert reg.json()["host"]["status"] == "pending"

        addr = second.start(token)
        host = wait_host(h, host_id, addr)
        assert host["cpu_cores"] >= 1 and host["memory_mb"] > 0
        ident = data / "host.json"  # written once the answer is in
        deadline = time.monotonic() + 10
        while not ident.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stat.S_IMODE(ident.stat().st_mode) == 0o600
        # the registration token is used up
        again = h.post("/v1/hosts/register", json={"token": token, "address": "127.0.0.1:9"})
        assert again.status_code == 401, again.text

        # least-loaded placement puts one of the next creates on the empty host
        on_new = second.place("minimal")
        r = h.post(f"/v1/capsules/{on_new}/exec", json={"cmd": "/bin/sh", "args": ["-c", "echo hi"]})
        assert r.status_code == 200 and r.json()["stdout"] == "hi\n", r.text
        # the agent answers only mutual TLS, with the certificate the control
        # plane issued it (kept in host.json, 0600), which names the host;
        # its token stays a second check (in the file only it reads)
        assert stat.S_IMODE((data / "agent-token").stat().st_mode) == 0o600
        kept = json.loads(ident.read_text())
        issued = kept["tls"]
        # a host token (a JWT) and a refresh token (64 hex) for when it expires
        assert kept["token"].count(".") == 2, kept["token"]
        assert len(kept["refresh_token"]) == 64 and int(kept["refresh_token"], 16) >= 0
        for field in ("cert_pem", "ca_cert_pem"):
            assert issued[field].startswith("-----BEGIN CERTIFICATE-----"), issued.keys()
        assert issued["key_pem"].startswith("-----BEGIN PRIVATE KEY-----")
        pems = Path(tempfile.mkdtemp(prefix="wrenn-pems-"))
        try:
            for field in ("cert_pem", "key_pem", "ca_cert_pem"):
                (pems / field).write_text(issued[field])
            names = ssl._ssl._test_decode_cert(str(pems / "cert_pem"))["subjectAltName"]
            assert names == (("DNS", f"{host_id}.hosts.wrenn"),), names
            # plain HTTP is not served: the connection is taken and closed
            with pytest.raises(httpx.RemoteProtocolError):
                httpx.get(f"http://{addr}/health", timeout=5)
            # the server's certificate chains to the CA, but a client
            # without a certificate, or with a host's (for serving only),
            # is refused by the agent with a TLS alert
            def client(with_cert: bool) -> ssl.SSLContext:
                ctx = ssl.create_default_context(cafile=str(pems / "ca_cert_pem"))
                ctx.check_hostname = False  # (it names the host, not 127.0.0.1)
                if with_cert:
                    ctx.load_cert_chain(str(pems / "cert_pem"), str(pems / "key_pem"))
                return ctx
            for ctx in (client(False), client(True)):
                with pytest.raises(httpx.HTTPError) as refused:
                    httpx.get(f"https://{addr}/health", verify=ctx, timeout=5)
                message = str(refused.value).lower()
                assert "alert" in message and "verify_failed" not in message, message
        finally:
            shutil.rmtree(pems)

        # a server in the capsule, reached through the proxy (which caches
        # the route: the agent's address)
        r = h.post(f"/v1/capsules/{on_new}/exec", json={
            "cmd": "/bin/sh", "background": True,
            "args": ["-c", "mkdir -p /tmp/www && echo moved > /tmp/www/index.html && "
                           "cd /tmp/www && exec python3 -m http.server 8081"]})
        assert r.status_code == 202, r.text
        served = f"/proxy/{on_new}/8081/index.html"
        deadline = time.monotonic() + 30
        while (r := h.get(served)).status_code != 200:
            assert r.status_code in (502, 503) and time.monotonic() < deadline, r.text
            time.sleep(0.25)

        # a restart on another port: no token needed, the heartbeat moves it,
        # and the proxy's cached route with it (the first request after
        # reaches the new address)
        stop(second.proc)
        addr2 = second.start(None, ("--heartbeat-interval", "1s"))
        wait_host(h, host_id, addr2)
        r = h.get(served)
        assert r.status_code == 200 and r.text == "moved\n", r.text
        r = h.post(f"/v1/capsules/{on_new}/exec", json={"cmd": "/bin/sh", "args": ["-c", "echo again"]})
        assert r.status_code == 200 and r.json()["stdout"] == "again\n", r.text

        # a host with capsules is not deleted (the SDK's host_has_capsules shape)
        r = h.delete(f"/v1/hosts/{host_id}")
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "host_has_capsules" and on_new in r.json()["capsule_ids"]
        for cid in made:
            if cid != on_new:
                assert h.delete(f"/v1/capsules/{cid}").status_code == 204
        made[:] = [on_new]
        # a snapshot on that host: once the host is deleted, a create from
        # it says so (not "no capacity")
        snap = f"gone-{uuid.uuid4().hex[:6]}"
        r = h.post("/v1/snapshots", json={"sandbox_id": on_new, "name": snap})
        assert r.status_code == 201, r.text
        # forced: the control plane forgets the host and its capsule; told so
        # by its next heartbeat (404), the agent destroys the capsule, gives
        # back its network slots and leaves, and forgets its registration
        # (its capsules' destroys are published, as every other)
        with watching_events(h) as seen:
            assert h.delete(f"/v1/hosts/{host_id}", params={"force": "1"}).status_code == 204
            gone = wait_event(seen, "capsule.destroy", on_new, 10)
        assert gone["metadata"]["reason"] == "host_deleted", gone
        assert h.get(f"/v1/capsules/{on_new}").json()["status"] == "stopped"
        assert h.get(f"/v1/hosts/{host_id}").status_code == 404
        r = h.post("/v1/capsules", json={"template": snap})
        assert r.status_code == 503 and "deleted" in r.json()["error"]["message"], r.text
        assert h.delete(f"/v1/snapshots/{snap}").status_code == 204
        assert second.proc.wait(60) == 0, second.log_tail()
        second.proc = None
        made.clear()
        assert on_new not in up.runc_containers()
        assert up.capsule_objects() == {}, up.capsule_objects()
        assert not (data / "host.json").exists()


def test_a_template_is_copied_to_the_host_a_capsule_is_placed_on(server) -> None:
    """A snapshot's files are on the host that took it; a capsule placed
    on another host (least-loaded placement) gets them copied there first,
    whole: owners and modes, files removed from the layer below, and the
    layer below itself (``minimal``, which ``wrenn up`` makes and a host of
    its own lacks). Deleting the snapshot removes its copy."""
    with SecondAgent(server, with_minimal=False) as second:
        h, made, up = second.h, second.made, second.up
        # a snapshot on wrenn up's own host, before the second host joins
        r = h.post("/v1/capsules", json={"template": "minimal", "memory_mb": 256})
        assert r.status_code == 201, r.text
        src = r.json()["id"]
        made.append(src)
        r = h.post(f"/v1/capsules/{src}/exec", json={"cmd": "/bin/sh", "args": ["-c",
            "echo copied > /root/f && chown 1000:1001 /root/f && chmod 640 /root/f "
            "&& rm /etc/debian_version && echo ok"]})
        assert r.status_code == 200 and r.json()["stdout"] == "ok\n", r.text
        snap = f"copied-{uuid.uuid4().hex[:6]}"
        r = h.post("/v1/snapshots", json={"sandbox_id": src, "name": snap})
        assert r.status_code == 201, r.text
        assert snapshot_layers(second) == set()

        host_id = second.join()
        # the empty host is the least loaded: a capsule from the snapshot
        # goes there, with a copy of its files
        on_new = second.place(snap)
        copied = snapshot_layers(second)
        assert len(copied) == 1, copied
        below = second.data / "templates" / "minimal"
        assert below.is_dir() and not below.is_symlink()
        r = h.post(f"/v1/capsules/{on_new}/exec", json={"cmd": "/bin/sh", "args": ["-c",
            "cat /root/f; stat -c '%u:%g %a' /root/f; test -e /etc/debian_version || echo gone"]})
        assert r.status_code == 200 and r.json()["stdout"] == "copied\n1000:1001 640\ngone\n", r.text
        # another capsule from it, wherever it goes, uses the files there
        r = h.post("/v1/capsules", json={"template": snap, "memory_mb": 256})
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
        assert snapshot_layers(second) == copied

        # once its capsules are gone, deleting the snapshot removes the copy
        second.destroy_made()
        assert h.delete(f"/v1/snapshots/{snap}").status_code == 204
        deadline = time.monotonic() + 10
        while snapshot_layers(second):
            assert time.monotonic() < deadline, snapshot_layers(second)
            time.sleep(0.2)
        second.leave(host_id)


def test_a_host_without_minimal_gets_it_before_any_capsule_asks(request) -> None:
    """``minimal``, a template of every host that ``wrenn up`` made on its
    own host, is copied to a host that joins without it, though no capsule
    has asked for it there: at once, by the reconciliation its first
    heartbeat starts (the rounds are slowed to ten minutes here); a
    capsule placed there then runs on that copy."""
    with wrenn_up.WrennUp.serving(request, failed_attr="wrenn_failed",
                                  extra_args=["--reconcile-interval", "10m"],
                                  prefix="wrenn-sdk-join-", code_runner=False) as up, \
            SecondAgent(up.server, with_minimal=False) as second:
        h, made = second.h, second.made
        below = second.data / "templates" / "minimal"
        assert not below.exists()
        host_id = second.join()
        deadline = time.monotonic() + 150
        while not below.is_dir():
            assert time.monotonic() < deadline, second.log_tail()
            time.sleep(0.5)
        assert made == [] and not below.is_symlink()
        on_new = second.place("minimal")
        r = h.post(f"/v1/capsules/{on_new}/exec", json={"cmd": "/bin/sh", "args": ["-c",
                   "cat /etc/debian_version && stat -c %U /root"]})
        assert r.status_code == 200 and r.json()["stdout"].endswith("\nroot\n"), r.text
        assert r.json()["stdout"].split(".")[0] == "12", r.text  # (bookworm)
        second.destroy_made()
        second.leave(host_id)


def test_an_agent_restarted_on_its_address_is_reconciled_at_once(request) -> None:
    """An agent that restarts on the same address, with the same token, says
    so in its heartbeat (when it started): the host is reconciled then, not
    at the next round (ten minutes apart here). A capsule whose container
    died while the agent was down is ``stopped`` at once (event reason
    ``capsule_gone``) and its container removed; the host's other capsule
    runs on."""
    with wrenn_up.WrennUp.serving(request, failed_attr="wrenn_failed",
                                  extra_args=["--reconcile-interval", "10m"],
                                  prefix="wrenn-sdk-restarted-", code_runner=False) as up, \
            SecondAgent(up.server) as second:
        h = second.h
        host_id = second.join(busier_first=True)
        gone, kept = second.place("minimal"), second.place("minimal")
        addr = h.get(f"/v1/hosts/{host_id}").json()["address"]
        second.proc.kill()
        second.proc.wait()
        second.proc = None
        root = str(second.up.runc_root)
        subprocess.run(["runc", "--root", root, "kill", gone, "KILL"], check=True, timeout=30)
        deadline = time.monotonic() + 15
        while second.up.runc_containers().get(gone) != "stopped":
            assert time.monotonic() < deadline, second.up.runc_containers()
            time.sleep(0.1)
        assert h.get(f"/v1/capsules/{gone}").json()["status"] == "running"

        with watching_events(h) as seen:
            assert second.start(None, ("--heartbeat-interval", "1s"), listen=addr) == addr
            stopped = wait_event(seen, "capsule.destroy", gone, 15)
        assert stopped["metadata"]["reason"] == "capsule_gone", stopped
        assert h.get(f"/v1/capsules/{gone}").json()["status"] == "stopped"
        assert gone not in second.up.runc_containers()
        r = h.post(f"/v1/capsules/{kept}/exec", json={"cmd": "/bin/echo", "args": ["ok"]})
        assert r.status_code == 200 and r.json()["stdout"] == "ok\n", r.text
        second.destroy_made(gone_ok=True)
        second.leave(host_id)


def destroyed_while_made(server, h: httpx.Client, template: str) -> str:
    """Create a capsule from ``template`` (256 MiB) and destroy it while
    its create is under way (``starting``); the create answers 404. Its ID."""
    creator, answer = posting(server, "/v1/capsules", {"template": template, "memory_mb": 256})
    deadline = time.monotonic() + 60
    while not (starting := [c["id"] for c in h.get("/v1/capsules").json()
                            if c["status"] == "starting"]):
        assert creator.is_alive(), f"the create ended at once: {answer}"
        assert time.monotonic() < deadline, "the create never started"
        time.sleep(0.1)
    (cid,) = starting
    assert h.delete(f"/v1/capsules/{cid}").status_code == 204
    creator.join(600)
    r = answer["r"]
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    return cid


def test_a_capsule_destroyed_while_its_template_is_copied_is_not_made(server) -> None:
    """A capsule destroyed while its host is still getting a copy of its
    template (its create takes as long as the copy) is not made there
    after all: the create answers 404, and nothing of it is left on the
    host for the reconciler to find."""
    with SecondAgent(server, with_minimal=False) as second:
        h, up = second.h, second.up
        host_id = second.join(busier_first=True)

        cid = destroyed_while_made(server, h, "minimal")
        assert (second.data / "templates" / "minimal").is_dir()  # (the copy was whole)
        assert up.runc_containers() == {}, up.runc_containers()
        assert h.get(f"/v1/capsules/{cid}").json()["status"] == "stopped"
        second.leave(host_id)
        assert up.capsule_objects() == {}, up.capsule_objects()


def test_a_capsule_destroyed_before_its_copy_fails_stays_destroyed(server) -> None:
    """A capsule destroyed while its template is copied to its host, where
    the copy then fails, stays ``stopped``: its create answers 404, and is
    not recorded as a failed create (``error``) after the destroy."""
    big, top = (f"{w}-{uuid.uuid4().hex[:6]}" for w in ("big", "top"))
    with SecondAgent(server) as second:
        h, made, up = second.h, second.made, second.up
        r = h.post("/v1/capsules", json={"template": "minimal", "memory_mb": 256})
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
        # (a large layer under the one that fails: its copy takes seconds)
        r = h.post(f"/v1/capsules/{made[0]}/exec", timeout=120, json={"cmd": "/bin/sh", "args": [
            "-c", "head -c 300M /dev/urandom > /root/big && echo ok"]})
        assert r.status_code == 200 and r.json()["stdout"] == "ok\n", r.text
        assert h.post("/v1/snapshots", json={"sandbox_id": made[0], "name": big}).status_code == 201
        r = h.post("/v1/capsules", json={"template": big, "memory_mb": 256})
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
        layers = server.data_dir / "templates"
        before = {p.name for p in layers.iterdir()}
        assert h.post("/v1/snapshots", json={"sandbox_id": made[1], "name": top}).status_code == 201
        (layer,) = {p.name for p in layers.iterdir()} - before
        (second.data / "templates").mkdir(parents=True, exist_ok=True)
        (second.data / "templates" / layer).write_text("in the way\n")

        host_id = second.join()
        cid = destroyed_while_made(server, h, top)
        assert (second.data / "templates" / layer).read_text() == "in the way\n"
        assert h.get(f"/v1/capsules/{cid}").json()["status"] == "stopped"
        second.destroy_made()
        for name in (top, big):
            assert h.delete(f"/v1/snapshots/{name}").status_code == 204
        second.leave(host_id)


def test_a_layer_copied_under_another_is_not_collected_before_it_arrives(server) -> None:
    """A stack is copied to a host from the bottom up: a layer that has
    arrived while the one above it is still coming has nothing standing on
    it there yet, and is not collected meanwhile, even when the last
    capsule of its deleted snapshot goes (else the layer above would find
    nothing to stand on, and the capsule would be placed elsewhere)."""
    lower, upper = (f"{w}-{uuid.uuid4().hex[:6]}" for w in ("lower", "upper"))
    with SecondAgent(server) as second:
        h, made, up = second.h, second.made, second.up
        r = h.post("/v1/capsules", json={"template": "minimal", "memory_mb": 256})
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
        assert h.post("/v1/snapshots", json={"sandbox_id": made[0], "name": lower}).status_code == 201
        r = h.post("/v1/capsules", json={"template": lower, "memory_mb": 256})
        assert r.status_code == 201, r.text
        user = r.json()["id"]
        made.append(user)
        # (a large upper layer: its copy takes seconds)
        r = h.post(f"/v1/capsules/{user}/exec", timeout=120, json={"cmd": "/bin/sh", "args": [
            "-c", "head -c 300M /dev/urandom > /root/big && echo ok"]})
        assert r.status_code == 200 and r.json()["stdout"] == "ok\n", r.text
        assert h.post("/v1/snapshots", json={"sandbox_id": user, "name": upper}).status_code == 201
        # the lower snapshot's name goes; its layer stays while `user` runs from it
        assert h.delete(f"/v1/snapshots/{lower}").status_code == 204

        host_id = second.join()
        creator, answer = posting(server, "/v1/capsules", {"template": upper, "memory_mb": 256})
        deadline = time.monotonic() + 120
        while not (arrived := snapshot_layers(second)):
            assert creator.is_alive(), f"the create ended before a layer arrived: {answer}"
            assert time.monotonic() < deadline, "no layer was copied to the second host"
            time.sleep(0.05)
        assert creator.is_alive() and len(arrived) == 1, arrived
        assert h.delete(f"/v1/capsules/{user}").status_code == 204
        made.remove(user)
        creator.join(600)
        r = answer["r"]
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
        assert made[-1] in up.runc_containers(), "the capsule was not placed on the second host"
        assert arrived < snapshot_layers(second), snapshot_layers(second)
        r = h.post(f"/v1/capsules/{made[-1]}/exec", json={"cmd": "/bin/sh", "args": [
            "-c", "stat -c %s /root/big"]})
        assert r.status_code == 200 and r.json()["stdout"] == f"{300 << 20}\n", r.text

        second.destroy_made()
        assert h.delete(f"/v1/snapshots/{upper}").status_code == 204
        second.leave(host_id)


def shared_db(server, query: str) -> list[list[str]]:
    """``query`` on the server's database, as another control plane sharing
    it would run it: SQLite under its data dir, or the PostgreSQL of
    ``WRENN_TEST_DATABASE_URL`` (by ``psql``); the rows, as text."""
    url = os.environ.get("WRENN_TEST_DATABASE_URL")
    if url:
        r = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-At", "-F", "\t", "-c", query],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return [line.split("\t") for line in r.stdout.splitlines() if line]
    import sqlite3
    with contextlib.closing(sqlite3.connect(server.data_dir / "wrenn.db", timeout=30)) as db:
        with db:
            return [[str(v) for v in row] for row in db.execute(query).fetchall()]


def test_a_create_of_another_control_plane_is_left_to_it(server) -> None:
    """Control planes sharing a database: a capsule row that another one's
    create made and has not started yet (its host may be getting a copy of
    the template, for minutes) is left ``starting`` by this one's
    reconciler, not stopped as orphaned, nor taken to ``running`` when its
    agent has made the capsule already (the create moves it on); once older
    than the grace (30 minutes: that control plane has stopped), it is
    stopped."""
    h = server.http()
    r = h.post("/v1/capsules", json={"template": "busybox"})
    assert r.status_code == 201, r.text
    real = r.json()["id"]
    assert h.delete(f"/v1/capsules/{real}").status_code == 204
    now = int(time.time() * 1000)
    # one the agent has made, its row as the other control plane's create
    # leaves it before its last step
    r = h.post("/v1/capsules", json={"template": "busybox"})
    assert r.status_code == 201, r.text
    made = r.json()["id"]
    shared_db(server, f"UPDATE capsules SET status = 'starting', started_at = NULL, "
                      f"created_at = {now}, created_by = 'cp-elsewhere' WHERE id = '{made}'")
    ids = {}
    for which, at in (("recent", now), ("old", now - 31 * 60_000)):
        ids[which] = "cl-" + "".join(
            "0123456789abcdefghijklmnopqrstuvwxyz"[b % 36] for b in os.urandom(25))
        shared_db(server, (
            "INSERT INTO capsules (id, team_id, host_id, template, agent_template, status, "
            "vcpus, memory_mb, timeout_sec, disk_size_mb, metadata, created_at, started_at, "
            "last_active_at, last_updated, access_token, end_at, on_timeout, allow_internet, "
            f"created_by) SELECT '{ids[which]}', team_id, host_id, template, agent_template, "
            f"'starting', vcpus, memory_mb, timeout_sec, disk_size_mb, metadata, {at}, NULL, "
            f"NULL, {at}, access_token, NULL, on_timeout, allow_internet, 'cp-elsewhere' "
            f"FROM capsules WHERE id = '{real}'"))
    try:
        # (the reconciler's round, every 30 s)
        deadline = time.monotonic() + 75
        while (old := h.get(f"/v1/capsules/{ids['old']}").json())["status"] != "stopped":
            assert old["status"] == "starting", old
            assert time.monotonic() < deadline, "no reconciler round stopped the old row"
            time.sleep(0.5)
        time.sleep(2)  # (the rest of that round)
        assert h.get(f"/v1/capsules/{ids['recent']}").json()["status"] == "starting"
        assert h.get(f"/v1/capsules/{made}").json()["status"] == "starting"
        assert h.delete(f"/v1/capsules/{made}").status_code == 204
        # (this one's destroy takes it: its agent never had it)
        assert h.delete(f"/v1/capsules/{ids['recent']}").status_code == 204
        assert h.get(f"/v1/capsules/{ids['recent']}").json()["status"] == "stopped"
    finally:
        for cid in [*ids.values(), made]:
            h.delete(f"/v1/capsules/{cid}")
        h.close()


# Placement's advisory lock on PostgreSQL (``Db::placing``'s key, "wrnnplac").
PLACING_KEY = 0x7772_6E6E_706C_6163


def test_a_create_waits_while_another_control_plane_places(server) -> None:
    """PostgreSQL: control planes sharing the database place capsules one at
    a time. While another holds placement's lock (taken here by ``psql`` as
    that control plane's would be), a create waits; once that session ends,
    the create goes through. (SQLite: a database file is one ``wrenn up``'s,
    and its own lock is all there is.)"""
    url = os.environ.get("WRENN_TEST_DATABASE_URL")
    if not url:
        pytest.skip("placement's lock across control planes is PostgreSQL's")
    holder = subprocess.Popen(["psql", url, "-v", "ON_ERROR_STOP=1", "-Atq"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    h = server.http()
    created: list[httpx.Response] = []
    creating = threading.Thread(
        target=lambda: created.append(h.post("/v1/capsules", json={"template": "busybox"})))
    try:
        holder.stdin.write(f"SELECT pg_advisory_lock({PLACING_KEY});\n")
        holder.stdin.flush()
        def wait_for_lock(granted: bool, what: str) -> None:
            deadline = time.monotonic() + 30
            query = (f"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted = {granted} "
                     f"AND classid = {PLACING_KEY >> 32} AND objid = {PLACING_KEY & 0xFFFFFFFF} "
                     f"AND objsubid = 1")
            while shared_db(server, query) != [["1"]]:
                assert holder.poll() is None, holder.stderr.read()
                assert not created, f"a create went through while another control plane placed: {created[0].text}"
                assert time.monotonic() < deadline, what
                time.sleep(0.1)

        wait_for_lock(True, "psql never took placement's lock")
        creating.start()
        # (the create's own request for the lock, queued behind psql's)
        wait_for_lock(False, "the create never asked for placement's lock")
        creating.join(1)
        assert not created, f"a create went through while another control plane placed: {created[0].text}"
        holder.stdin.close()  # (the session ends, and its lock with it)
        holder.wait(10)
        creating.join(60)
        assert created and created[0].status_code == 201, created and created[0].text
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if creating.is_alive():
            creating.join(60)
        for r in created:
            if r.status_code == 201:
                h.delete(f"/v1/capsules/{r.json()['id']}")
        h.close()


def test_a_platform_template_is_deleted_from_every_host_that_has_it(server, tmp_path) -> None:
    """An admin's template built before a second host joined is copied to
    it for a capsule placed there. A snapshot taken there stacks on that
    copy, so the template is not deleted while the snapshot exists (409:
    its files would be gone from under it); once it is gone, the template
    goes from both hosts."""
    name = f"spread-{uuid.uuid4().hex[:6]}"
    recipe = tmp_path / "spread.recipefile"
    recipe.write_text("RUN echo one > /version\n")
    wrenn_bin, _ = wrenn_up.resolve_binaries()
    r = subprocess.run([wrenn_bin, "template", "build", str(recipe), "--name", name,
                        "--base-url", server.base_url, "--api-key", server.api_key],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    path = f"/v1/admin/templates/{name}"
    with SecondAgent(server) as second:
        h, up = second.h, second.up
        try:
            host_id = second.join(busier_first=True)
            on_new = second.place(name)
            copy = second.data / "templates" / name
            assert copy.is_dir()
            r = h.post(f"/v1/capsules/{on_new}/exec", json={"cmd": "cat", "args": ["/version"]})
            assert r.status_code == 200 and r.json()["stdout"] == "one\n", r.text
            snap = f"on-copy-{uuid.uuid4().hex[:6]}"
            r = h.post("/v1/snapshots", json={"sandbox_id": on_new, "name": snap})
            assert r.status_code == 201, r.text
            second.destroy_made()

            r = h.delete(path)
            assert r.status_code == 409, r.text
            assert name in {t["name"] for t in h.get("/v1/admin/templates").json()}
            assert copy.is_dir() and (server.data_dir / "templates" / name).is_dir()
            assert h.delete(f"/v1/snapshots/{snap}").status_code == 204
            r = h.delete(path)
            assert r.status_code == 204, r.text
            assert not copy.exists() and not (server.data_dir / "templates" / name).exists()
            second.leave(host_id)
        finally:
            h.delete(path)


def test_a_capsule_whose_copy_fails_goes_where_the_files_are(server) -> None:
    """A copy to the least-loaded host that fails (here: a file in the way
    of the template's directory there) does not fail the create: the
    capsule is placed again on the host that has the files."""
    with SecondAgent(server) as second:
        h, made, up = second.h, second.made, second.up
        r = h.post("/v1/capsules", json={"template": "minimal", "memory_mb": 256})
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
        layers = server.data_dir / "templates"
        before = {p.name for p in layers.iterdir()}
        snap = f"blocked-{uuid.uuid4().hex[:6]}"
        r = h.post("/v1/snapshots", json={"sandbox_id": made[0], "name": snap})
        assert r.status_code == 201, r.text
        (layer,) = {p.name for p in layers.iterdir()} - before
        (second.data / "templates").mkdir(parents=True, exist_ok=True)
        (second.data / "templates" / layer).write_text("in the way\n")

        host_id = second.join()
        # the empty host is picked first, its copy fails, and the capsule
        # runs on wrenn up's host; the next ones are not sent there again
        for _ in range(2):
            r = h.post("/v1/capsules", json={"template": snap, "memory_mb": 256})
            assert r.status_code == 201, r.text
            made.append(r.json()["id"])
            assert r.json()["status"] == "running", r.text
            assert made[-1] not in up.runc_containers()
        r = h.post(f"/v1/capsules/{made[-1]}/exec", json={"cmd": "true"})
        assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
        assert (second.data / "templates" / layer).read_text() == "in the way\n"
        second.destroy_made()
        assert h.delete(f"/v1/snapshots/{snap}").status_code == 204
        second.leave(host_id)


def running_command(argv: list[str]) -> bool:
    """Whether a process of this machine runs exactly ``argv``."""
    want = "\0".join(argv).encode() + b"\0"
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes() == want:
                    return True
            except OSError:
                pass  # (gone meanwhile)
    return False


def test_a_build_whose_host_dies_is_a_503_and_its_capsule_goes(server) -> None:
    """A build on a host that dies in the middle of a step answers 503
    ``host_unavailable`` (it may be tried again), not the 400 of a step that
    failed; no template is made, and the build's capsule, which outlived
    its agent, is destroyed by the reconciler once the host is back."""
    name = f"orphaned-{uuid.uuid4().hex[:6]}"
    step = ["sleep", f"{300 + uuid.uuid4().int % 500}"]  # (this build's own)
    with SecondAgent(server) as second:
        h, up = second.h, second.up
        host_id = second.join(busier_first=True)

        builder, answer = posting(server, "/v1/admin/builds", {
            "name": name, "base_template": "busybox", "recipe": ["RUN " + " ".join(step)]})
        deadline = time.monotonic() + 120
        while not (up.runc_containers() and running_command(step)):
            assert builder.is_alive(), f"the build ended before its step ran: {answer}"
            assert time.monotonic() < deadline, "the build's step never ran on the second host"
            time.sleep(0.1)
        (capsule,) = up.runc_containers()
        second.proc.kill()
        second.proc.wait()
        second.proc = None
        builder.join(120)
        r = answer["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "host_unavailable", r.text
        assert name not in {t["name"] for t in h.get("/v1/admin/templates").json()}

        # back: the abandoned build's capsule is destroyed (the
        # reconciler's round, every 30 s)
        wait_host(h, host_id, second.start(None, ("--heartbeat-interval", "1s")))
        deadline = time.monotonic() + 75
        while capsule in up.runc_containers():
            assert time.monotonic() < deadline, f"build capsule {capsule} left on the host"
            time.sleep(0.5)
        second.destroy_made()
        second.leave(host_id)
