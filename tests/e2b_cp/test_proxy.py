"""The data plane as E2B's SDKs and users reach it: ``get_host(port)`` and a
request to a server in the sandbox, routing by ``E2b-Sandbox-Id`` /
``E2b-Sandbox-Port`` headers and by Host ``{port}-{id}.{domain}``, envd
access tokens, and what a killed or paused sandbox answers (502 JSON whose
``message`` says ``was not found``: e2b/exceptions.py:7-36,
e2b/envd/api.py:91-99)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from e2b import (
    AuthenticationException,
    Sandbox,
    SandboxNotRunningException,
)

from e2bcp_support import NOT_FOUND_MESSAGE, PORT_NOT_OPEN_MESSAGE, assert_proxy_502, poll

PAGE = "<h1>served from the sandbox</h1>\n"


def _start_http_server(sandbox: Sandbox, port: int) -> None:
    sandbox.files.write("/tmp/www/index.html", PAGE)
    sandbox.commands.run(f"python3 -m http.server {port} --directory /tmp/www", background=True, timeout=0)


def test_get_host_and_http(sandbox: Sandbox, server) -> None:
    host = sandbox.get_host(8080)
    # connection_config.py:369-383: "{port}-{id}.{sandbox domain}", no scheme
    assert host == f"8080-{sandbox.sandbox_id}.{sandbox.sandbox_domain}"
    _start_http_server(sandbox, 8080)
    with httpx.Client(trust_env=False, timeout=30) as h:
        # by Host (what a browser sends for http://{host}/ with *.localhost → 127.0.0.1)
        r = poll(lambda: (lambda r: r if r.status_code == 200 else None)(
            h.get(f"http://127.0.0.1:{server.port}/index.html", headers={"Host": host})),
            timeout=30, what="the sandbox's http server through Host routing")
        assert r.text == PAGE
        # by the SDK's routing headers at E2B_SANDBOX_URL
        r = h.get(f"{server.sandbox_url}/index.html",
                  headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "8080"})
        assert r.status_code == 200 and r.text == PAGE, r.text
        # a user port needs no envd access token and no API key
        assert "X-Access-Token" not in r.request.headers


def test_port_not_open(sandbox: Sandbox, server) -> None:
    with server.data_plane(sandbox.sandbox_id, port=8099) as h:
        body = assert_proxy_502(h.get("/"), PORT_NOT_OPEN_MESSAGE)
        assert body.get("sandboxId") == sandbox.sandbox_id and body.get("port") == 8099
        assert body.get("code") == 502


def test_envd_routing_and_token(sandbox: Sandbox, server) -> None:
    token = sandbox._envd_access_token
    with server.data_plane(sandbox.sandbox_id) as h:
        assert h.get("/health").is_success  # no token needed
        rpc = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}
        r = h.post("/process.Process/List", content=b"{}", headers=rpc)
        assert r.status_code == 401, r.text  # envd wants X-Access-Token
        assert r.json()["code"] == 401
        r = h.post("/process.Process/List", content=b"{}", headers={**rpc, "X-Access-Token": token})
        assert r.status_code == 200, r.text
        assert set(r.json()) <= {"processes"}, r.text
    # Host routing reaches envd too (49983-{id}.{domain})
    with httpx.Client(trust_env=False, timeout=30) as h:
        r = h.get(f"http://127.0.0.1:{server.port}/health",
                  headers={"Host": f"49983-{sandbox.sandbox_id}.{sandbox.sandbox_domain}"})
        assert r.is_success, r.text
    # the SDK with a wrong token: AuthenticationException
    wrong = Sandbox(  # the deprecated constructor, as Sandbox.connect builds one
        sandbox_id=sandbox.sandbox_id,
        sandbox_domain=sandbox.sandbox_domain,
        envd_version=sandbox._envd_version,
        envd_access_token="wrong",
        connection_config=type(sandbox.connection_config)(
            extra_sandbox_headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49983",
                                   "X-Access-Token": "wrong"}),
    )
    with pytest.raises(AuthenticationException):
        wrong.commands.run("true")


def test_killed_sandbox_answers(make_sandbox, server) -> None:
    sbx = make_sandbox()
    sid = sbx.sandbox_id
    sbx.kill()
    with server.data_plane(sid) as h:
        body = assert_proxy_502(h.get("/health"), NOT_FOUND_MESSAGE)
        assert body.get("sandboxId") == sid and body.get("code") == 502
        assert_proxy_502(h.post("/process.Process/List", content=b"{}",
                                headers={"Content-Type": "application/json"}), NOT_FOUND_MESSAGE)
        assert_proxy_502(h.get("/files", params={"path": "/etc/hostname"}), NOT_FOUND_MESSAGE)
    with server.data_plane(sid, port=8080) as h:
        assert_proxy_502(h.get("/"), NOT_FOUND_MESSAGE)
    with httpx.Client(trust_env=False, timeout=30) as h:
        r = h.get(f"http://127.0.0.1:{server.port}/health",
                  headers={"Host": f"49983-{sid}.{server.domain}"})
        assert_proxy_502(r, NOT_FOUND_MESSAGE)
    assert not sbx.is_running()
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("true")
    with pytest.raises(SandboxNotRunningException):
        sbx.files.read("/etc/hostname")
    # an ID that never existed answers the same
    with server.data_plane("cl-" + "0" * 25) as h:
        assert_proxy_502(h.get("/health"), NOT_FOUND_MESSAGE)


def test_paused_sandbox_answers(sandbox: Sandbox, server) -> None:
    assert sandbox.pause()
    with server.data_plane(sandbox.sandbox_id) as h:
        assert_proxy_502(h.get("/health"), NOT_FOUND_MESSAGE)
    assert not sandbox.is_running()
    with pytest.raises(SandboxNotRunningException):
        sandbox.files.write("/tmp/x", "x")
    sandbox.connect()
    assert sandbox.files.write("/tmp/x", "x").path == "/tmp/x"


def test_kill_mid_stream(make_sandbox) -> None:
    sbx = make_sandbox()
    h = sbx.commands.run("while true; do echo tick; sleep 0.2; done", background=True, timeout=0)
    out: list = []

    def wait() -> None:
        try:
            out.append(h.wait())
        except Exception as exc:  # noqa: BLE001
            out.append(exc)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    time.sleep(1)
    assert Sandbox.kill(sbx.sandbox_id) is True
    t.join(60)
    assert out and isinstance(out[0], SandboxNotRunningException), out
