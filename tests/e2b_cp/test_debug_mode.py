"""``E2B_DEBUG=true`` against ``wrenn up``.

In debug mode the SDK never creates, connects, kills or times out a sandbox
through the API (e2b/sandbox_sync/main.py:384-386, 557-559, 1205-1209;
sandbox_api.py:144-146, 171-173, 288-290): the sandbox ID is the literal
``debug_sandbox_id``, no envd access token is sent, ``get_host(p)`` is
``localhost:p`` (connection_config.py:380-381) and the envd URL is
``E2B_SANDBOX_URL`` when set (it wins over debug, connection_config.py:344-348).
The data plane therefore routes ``E2b-Sandbox-Id: debug_sandbox_id`` (from
loopback) to a lazily created ``base`` capsule of the admin team and adds
that capsule's envd token itself. ``list``/``get_info`` still call
``E2B_API_URL`` with the API key.
"""

from __future__ import annotations

import httpx
import pytest
from e2b import AsyncSandbox, Sandbox

DEBUG_ID = "debug_sandbox_id"


@pytest.fixture
def debug(monkeypatch: pytest.MonkeyPatch, server) -> None:
    monkeypatch.setenv("E2B_DEBUG", "true")


@pytest.fixture(scope="module", autouse=True)
def debug_capsule_ends(server):
    """The debug capsule lives as long as its server, by design: ended
    after these tests, so that a capsule left at the session's end is a
    leak worth the warning."""
    yield
    with server.wrenn() as h:
        for c in h.get("/v1/capsules").json():
            if (c.get("metadata") or {}).get("e2b_debug_sandbox"):
                r = h.delete(f"/v1/capsules/{c['id']}")
                assert r.status_code == 204, r.text


def test_debug_sandbox(debug, server) -> None:
    sbx = Sandbox.create()
    assert sbx.sandbox_id == DEBUG_ID
    assert sbx.connection_config.debug
    assert sbx.get_host(8080) == "localhost:8080"
    assert sbx.envd_api_url == server.sandbox_url

    assert sbx.is_running()
    assert sbx.commands.run("whoami; echo $E2B_SANDBOX").stdout == "user\ntrue\n"
    sbx.files.write("/tmp/debug.txt", "persisted")
    assert sbx.files.read("/tmp/debug.txt") == "persisted"
    assert [e.name for e in sbx.files.list("/tmp") if e.name == "debug.txt"] == ["debug.txt"]

    # no-ops client-side
    assert sbx.kill() is True
    sbx.set_timeout(1)
    assert sbx.get_metrics() == []
    assert sbx.connect() is sbx
    assert sbx.is_running()

    # the same sandbox for every debug client
    other = Sandbox.create(template="anything")
    assert other.files.read("/tmp/debug.txt") == "persisted"


def test_debug_commands_and_pty(debug) -> None:
    from e2b import PtySize

    sbx = Sandbox.create()
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "echo-through-debug")
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout == "echo-through-debug"
    pty = sbx.pty.create(PtySize(rows=10, cols=40), timeout=30)
    sbx.pty.send_stdin(pty.pid, b"exit 0\n")
    assert pty.wait().exit_code == 0


def test_debug_unsigned_urls(debug, server) -> None:
    sbx = Sandbox.create()
    sbx.files.write("/tmp/dl.txt", "debug download")
    url = sbx.download_url("/tmp/dl.txt")
    assert "signature" not in url  # no token in debug mode: unsigned
    with httpx.Client(trust_env=False, timeout=30) as h:
        r = h.get(url, headers={"E2b-Sandbox-Id": DEBUG_ID, "E2b-Sandbox-Port": "49983"})
        assert r.status_code == 200 and r.text == "debug download", r.text


def test_debug_api_calls_still_need_the_key(debug, server) -> None:
    # list and get_info go to E2B_API_URL even in debug mode
    items = Sandbox.list().next_items()
    assert isinstance(items, list)


async def test_debug_async(debug) -> None:
    sbx = await AsyncSandbox.create()
    assert sbx.sandbox_id == DEBUG_ID
    r = await sbx.commands.run("echo async-debug")
    assert r.stdout == "async-debug\n"
