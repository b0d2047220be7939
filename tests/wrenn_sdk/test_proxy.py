"""The port proxy: ``{port}-{capsule_id}.{domain}`` by Host header (what
``get_url`` builds) and the path form ``/proxy/{id}/{port}/…``."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import httpx_ws
import pytest
from wrenn import Capsule
from wrennsdk_support import unknown_capsule_id, wildcard_localhost

ECHO_SERVER = r'''
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _reply(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if self.headers.get("Transfer-Encoding") == "chunked":
            while size := int(self.rfile.readline().split(b";")[0], 16):
                raw += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        body = raw.decode("utf-8", "replace")
        out = json.dumps({"method": self.command, "path": self.path, "body": body,
                          "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_PUT = do_DELETE = _reply
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", PORT), H).serve_forever()
'''

# A WebSocket echo server on port 8765 (shared with the agent's proxy test).
WS_ECHO = (Path(__file__).parent.parent / "support" / "ws_echo.py").read_text()


def _host(port: int, capsule_id: str, server) -> str:
    return f"{port}-{capsule_id}.localhost:{server.port}"


def _get(server, port: int, capsule_id: str, path: str, **kw) -> httpx.Response:
    headers = {"Host": _host(port, capsule_id, server), **kw.pop("headers", {})}
    return httpx.get(f"http://127.0.0.1:{server.port}{path}", headers=headers, timeout=10, **kw)


def _wait_200(fn, timeout: float = 15.0) -> httpx.Response:
    """Retry until 200; everything before must be 502/503 (never 404)."""
    deadline = time.monotonic() + timeout
    while True:
        r = fn()
        if r.status_code == 200:
            return r
        assert r.status_code in (502, 503), f"{r.status_code} while the port comes up: {r.text[:300]}"
        assert time.monotonic() < deadline, f"port not reachable in {timeout}s: {r.status_code} {r.text[:300]}"
        time.sleep(0.25)


def _serve_dir(capsule: Capsule) -> str:
    root = "/tmp/www"
    capsule.files.write(f"{root}/file", "hello from the capsule\n")
    capsule.files.write(f"{root}/sub/page.html", "<p>sub</p>")
    return root


def test_subdomain_proxy(server, capsule: Capsule) -> None:
    root = _serve_dir(capsule)
    cid = capsule.capsule_id
    before = _get(server, 8080, cid, "/file")
    assert before.status_code in (502, 503), f"nothing listens yet: want 502/503, got {before.status_code}"

    capsule.commands.run("python3 -m http.server 8080", background=True, cwd=root)
    r = _wait_200(lambda: _get(server, 8080, cid, "/file"))
    assert r.text == "hello from the capsule\n"
    # paths, query strings and directory redirects pass through
    assert _get(server, 8080, cid, "/sub/page.html?x=1").text == "<p>sub</p>"
    redirect = _get(server, 8080, cid, "/sub")
    assert redirect.status_code == 301
    assert redirect.headers["location"] in ("/sub/", f"http://{_host(8080, cid, server)}/sub/")
    assert _get(server, 8080, cid, "/nope").status_code == 404  # the guest's own 404
    # the proxy needs no API key; with one it works too
    assert _get(server, 8080, cid, "/file", headers={"X-API-Key": server.api_key}).status_code == 200


def test_get_url_shape(server, capsule: Capsule, monkeypatch: pytest.MonkeyPatch) -> None:
    domain = os.environ.get("WRENN_PROXY_DOMAIN") or f"{server.host}:{server.port}"
    assert capsule.get_url(8080) == f"http://8080-{capsule.capsule_id}.{domain}"

    monkeypatch.setenv("WRENN_PROXY_DOMAIN", f"localhost:{server.port}")
    conn = Capsule.connect(capsule.capsule_id, api_key=server.api_key, base_url=server.base_url)
    with conn:  # exit destroys; the fixture's destroy after it is idempotent
        url = conn.get_url(8080)
        assert url == f"http://8080-{capsule.capsule_id}.localhost:{server.port}"
        root = _serve_dir(conn)
        conn.commands.run("python3 -m http.server 8080", background=True, cwd=root)
        with wildcard_localhost():  # what a browser or curl would resolve
            r = _wait_200(lambda: httpx.get(f"{url}/file", timeout=10))
        assert r.text == "hello from the capsule\n"


SDK_GET_URL = '''
import sys, time
import httpx
from wrenn import Capsule
url = Capsule.connect(sys.argv[1]).get_url(8080)
deadline = time.monotonic() + 15
while True:
    try:
        r = httpx.get(url + "/file", timeout=10)
        if r.status_code == 200:
            break
    except httpx.HTTPError as exc:
        r = exc
    if time.monotonic() > deadline:
        sys.exit(f"{url}: {r!r}")
    time.sleep(0.25)
print(url)
print(r.text, end="")
'''


def test_the_sdk_set_up_as_wrenn_up_says_reaches_a_capsule_port(server, capsule: Capsule) -> None:
    """``wrenn up`` prints how to point the SDK at it. Followed literally in
    a fresh shell (no resolver shim, no other ``WRENN_*``), ``get_url``
    gives a URL that reaches a server in the capsule: the proxy domain
    must not be the base URL's IP address, and ``*.localhost`` must
    resolve on the machine (``scripts/up.sh`` installs nss-myhostname)."""
    if server.log_path is None:
        pytest.skip("needs the log of a local wrenn up")
    log = server.log_path.read_text(errors="replace")
    # (the log is wrenn up's stdout and stderr, copied line by line by one
    # thread each: its stdout's "wrenn listening on" can land among these)
    said = log[log.rindex("Point the SDK at it:"):].splitlines()[1:5]
    exports = [line.strip() for line in said if line.startswith("  export WRENN_")]
    names = {e.split("=", 1)[0].removeprefix("export ") for e in exports}
    assert names == {"WRENN_BASE_URL", "WRENN_PROXY_DOMAIN", "WRENN_API_KEY"}, exports
    root = _serve_dir(capsule)
    capsule.commands.run("python3 -m http.server 8080", background=True, cwd=root)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WRENN_")}
    shell = "\n".join(exports) + '\nexec "$PYTHON" -c "$SCRIPT" "$CAPSULE"'
    r = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=60,
                       env={**env, "PYTHON": sys.executable, "SCRIPT": SDK_GET_URL,
                            "CAPSULE": capsule.capsule_id})
    assert r.returncode == 0, f"{exports}\n{r.stdout}\n{r.stderr}"
    url, text = r.stdout.split("\n", 1)
    assert url == f"http://8080-{capsule.capsule_id}.localhost:{server.port}", url
    assert text == "hello from the capsule\n"


def test_path_proxy(server, capsule: Capsule) -> None:
    root = _serve_dir(capsule)
    cid = capsule.capsule_id
    with server.http() as h:
        before = h.get(f"/proxy/{cid}/8080/file")
        assert before.status_code in (502, 503), before.status_code
        capsule.commands.run("python3 -m http.server 8080", background=True, cwd=root)
        r = _wait_200(lambda: h.get(f"/proxy/{cid}/8080/file"))
        assert r.text == "hello from the capsule\n"
        assert h.get(f"/proxy/{cid}/8080/sub/page.html").text == "<p>sub</p>"


def test_proxy_forwards_requests_faithfully(server, capsule: Capsule) -> None:
    capsule.files.write("/tmp/echo.py", ECHO_SERVER.replace("PORT", "8081"))
    capsule.commands.run("python3 /tmp/echo.py", background=True)
    cid = capsule.capsule_id
    url = f"http://127.0.0.1:{server.port}/a/b?q=1&r=%20x"
    headers = {"Host": _host(8081, cid, server), "X-API-Key": server.api_key, "X-Custom": "kept"}
    r = _wait_200(lambda: httpx.get(url, headers=headers, timeout=10))
    seen = r.json()
    assert seen["method"] == "GET" and seen["path"] == "/a/b?q=1&r=%20x"
    assert seen["headers"].get("x-custom") == "kept"
    assert "x-api-key" not in seen["headers"], "the proxy must strip X-API-Key"

    post = httpx.post(url, headers=headers, content=b"payload-\xe2\x9c\x93", timeout=10)
    assert post.status_code == 200 and post.json()["body"] == "payload-✓"
    assert post.json()["method"] == "POST"

    with server.http() as h:
        via_path = h.get(f"/proxy/{cid}/8081/c/d?z=9", headers={"X-Custom": "p"}).json()
    assert via_path["path"] == "/c/d?z=9" and via_path["headers"].get("x-custom") == "p"
    assert "x-api-key" not in via_path["headers"], "the proxy must strip X-API-Key"

    # over HTTP/2 (h2c) the host is `:authority`: the capsule still sees it
    # as Host (it saw its own address, 10.x, which it must not learn)
    with httpx.Client(http1=False, http2=True, timeout=10) as h2c:
        r = h2c.get(f"http://127.0.0.1:{server.port}/h2", headers={"Host": _host(8081, cid, server)})
    assert r.http_version == "HTTP/2" and r.status_code == 200, r
    seen = r.json()["headers"]
    assert seen["host"] == _host(8081, cid, server) == seen["x-forwarded-host"], seen

    # the client's broken chunked body is its mistake, not a port that is
    # not open (a 502 "unreachable", which E2B's SDKs read as a dead sandbox)
    host = _host(8081, cid, server)
    chunked = ["POST /chunked HTTP/1.1", f"Host: {host}", "Transfer-Encoding: chunked"]
    status, body = _raw_head(server, chunked, b"zz\r\nabc\r\n0\r\n\r\n")
    assert status == 400 and b"malformed request body" in body, (status, body)
    status, body = _raw_head(server, chunked, b"3\r\nabc\r\n0\r\n\r\n")
    assert status == 200 and json.loads(body)["body"] == "abc", (status, body)


def _raw_head(server, lines: list[str], body: bytes = b"") -> tuple[int, bytes]:
    """Send a request of these head lines and ``body`` over a socket;
    (status, body)."""
    import socket
    u = httpx.URL(server.base_url)
    with socket.create_connection((u.host, u.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines + ["Connection: close"]) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_the_host_a_request_is_for_is_unambiguous(server, capsule: Capsule) -> None:
    """RFC 9112 §3.2: two Host headers, or an HTTP/1.1 request without one,
    is a 400 (the proxy routed by the first and the capsule saw both); an
    absolute-form target's authority wins over the Host header (the API
    answered instead of the capsule)."""
    port = httpx.URL(server.base_url).port
    envd = f"49983-{capsule.capsule_id}.localhost:{port}"
    status, body = _raw_head(server, ["GET /health HTTP/1.1", f"Host: {envd}", "Host: localhost"])
    assert status == 400 and b"more than one Host" in body, (status, body)
    status, body = _raw_head(server, ["GET /health HTTP/1.1"])
    assert status == 400 and b"missing Host" in body, (status, body)
    status, body = _raw_head(server, [f"GET http://{envd}/health HTTP/1.1", f"Host: 127.0.0.1:{port}"])
    assert status in (200, 204) and b'"status"' not in body, (status, body)  # envd's, not the API's
    status, body = _raw_head(server, ["GET /health HTTP/1.0"])
    assert status == 200 and b'"status"' in body, (status, body)  # HTTP/1.0 needs none


def test_e2b_debug_mode_is_off_unless_asked_for(server) -> None:
    """E2B's debug mode hands root in a capsule to any loopback client with
    no key (behind a reverse proxy on the same host: to anyone), so
    ``wrenn up`` serves it only with ``--e2b-debug``; this server has no
    flag. The request is E2B's 502 "not found" and no capsule is made."""
    debug = {"E2b-Sandbox-Id": "debug_sandbox_id", "E2b-Sandbox-Port": "49983"}
    with httpx.Client(base_url=server.base_url, timeout=30) as raw:
        r = raw.get("/health", headers=debug)
        assert r.status_code == 502 and r.json()["message"] == "The sandbox was not found", r.text
        r = raw.post("/filesystem.Filesystem/ListDir", json={"path": "/root"},
                     headers={**debug, "Content-Type": "application/json"})
        assert r.status_code == 502, r.text
        made = raw.get("/v1/capsules", headers={"X-API-Key": server.api_key}).json()
    assert not [c for c in made if (c.get("metadata") or {}).get("e2b_debug_sandbox")], made


def test_proxy_bad_hosts(server, capsule: Capsule) -> None:
    unknown = _get(server, 8080, unknown_capsule_id(), "/")
    assert unknown.status_code == 404
    for bad_host in (f"8080-cl-short.localhost:{server.port}", f"0-{capsule.capsule_id}.localhost",
                     f"70000-{capsule.capsule_id}.localhost"):
        r = httpx.get(f"http://127.0.0.1:{server.port}/", headers={"Host": bad_host}, timeout=10)
        assert r.status_code == 400, (bad_host, r.status_code, r.text[:200])
    with server.http() as h:
        assert h.get(f"/proxy/{unknown_capsule_id()}/8080/").status_code == 404


def test_proxy_to_paused_capsule(server, capsule: Capsule) -> None:
    root = _serve_dir(capsule)
    capsule.commands.run("python3 -m http.server 8080", background=True, cwd=root)
    _wait_200(lambda: _get(server, 8080, capsule.capsule_id, "/file"))
    capsule.pause(wait=True)
    r = _get(server, 8080, capsule.capsule_id, "/file")
    assert r.status_code in (409, 502, 503), r.status_code
    capsule.resume(wait=True)
    r = _wait_200(lambda: _get(server, 8080, capsule.capsule_id, "/file"))
    assert r.text == "hello from the capsule\n"



def _ws_echoes(ws) -> None:
    ws.send_bytes(b"\x00\xffbinary")
    assert ws.receive_bytes(timeout=10) == b"\x00\xffbinary"
    ws.send_text("text " * 100)
    assert ws.receive_text(timeout=10) == "text " * 100


def _ws_ends(ws) -> None:
    """The tunnel is cut: the next read fails (no close frame comes: the
    proxy drops the connection) within seconds."""
    with pytest.raises((httpx_ws.WebSocketDisconnect, httpx_ws.WebSocketNetworkError)):
        ws.receive_bytes(timeout=10)


def test_websocket_tunnels_echo_and_end_with_pause_and_destroy(server, capsule: Capsule) -> None:
    """WebSockets through the subdomain proxy (``wrenn up`` hands the upgrade
    to its own agent in-process; the agent owns the tunnel): both ways,
    text and binary; a pause and a destroy each end the open tunnels."""
    capsule.files.write("/tmp/ws_echo.py", WS_ECHO)
    capsule.commands.run("python3 /tmp/ws_echo.py", background=True)
    url = f"http://127.0.0.1:{server.port}/chat"
    headers = {"Host": _host(8765, capsule.capsule_id, server)}

    def connect(client: httpx.Client, opened: contextlib.ExitStack):
        deadline = time.monotonic() + 15
        while True:
            try:
                return opened.enter_context(httpx_ws.connect_ws(url, client, headers=headers))
            except httpx_ws.WebSocketUpgradeError as e:
                # only "not up yet" on the way (never 404)
                assert e.response.status_code in (502, 503), e.response.status_code
                assert time.monotonic() < deadline, "the WebSocket server never came up"
                time.sleep(0.25)

    with httpx.Client(timeout=10) as client:
        with contextlib.suppress(httpx_ws.WebSocketNetworkError), contextlib.ExitStack() as opened:
            ws = connect(client, opened)
            _ws_echoes(ws)
            capsule.pause(wait=True)
            _ws_ends(ws)
        capsule.resume(wait=True)
        with contextlib.suppress(httpx_ws.WebSocketNetworkError), contextlib.ExitStack() as opened:
            ws = connect(client, opened)
            _ws_echoes(ws)
            capsule.destroy(wait=True)
            _ws_ends(ws)


def test_concurrent_first_tunnels_all_end_with_pause(server, capsule: Capsule) -> None:
    """Many WebSockets opened at once as the first requests to a capsule
    (each finds no cached route and looks one up): a pause ends every one
    of them, not only those of the route cached last."""
    capsule.files.write("/tmp/ws_echo.py", WS_ECHO)
    capsule.commands.run("python3 /tmp/ws_echo.py", background=True)
    # (waited for inside the capsule: a request through the proxy would
    # cache the route first)
    probe = "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8765), 1)'"
    deadline = time.monotonic() + 15
    while capsule.commands.run(probe).exit_code != 0:
        assert time.monotonic() < deadline, "the WebSocket server never came up"
        time.sleep(0.25)
    url = f"http://127.0.0.1:{server.port}/chat"
    headers = {"Host": _host(8765, capsule.capsule_id, server)}
    n = 12
    start = threading.Barrier(n)
    def close(cm) -> None:
        with contextlib.suppress(httpx_ws.WebSocketNetworkError):  # (cut: nothing to close)
            cm.__exit__(None, None, None)

    with contextlib.ExitStack() as opened:
        clients = [opened.enter_context(httpx.Client(timeout=10)) for _ in range(n)]

        def connect(client: httpx.Client):
            cm = httpx_ws.connect_ws(url, client, headers=headers)
            start.wait()
            return cm, cm.__enter__()

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            done = list(pool.map(connect, clients))
        tunnels = []
        for cm, ws in done:
            opened.callback(close, cm)
            tunnels.append(ws)
        for ws in tunnels:
            _ws_echoes(ws)
        capsule.pause(wait=True)
        for ws in tunnels:
            _ws_ends(ws)
