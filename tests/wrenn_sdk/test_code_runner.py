"""``wrenn.code_runner``: Jupyter in the ``code-runner-beta`` template,
reached through the subdomain port proxy on 8888 (REST ``/api/kernels`` and
the kernel WebSocket ``/api/kernels/{id}/channels``).

The SDK builds ``http://8888-{id}.{proxy domain}``; the tests set
``WRENN_PROXY_DOMAIN=localhost:PORT`` and resolve ``*.localhost`` to
127.0.0.1 in-process (as a browser would). Skipped only with
``WRENN_SKIP_CODE_RUNNER=1`` (the template needs a network build)."""

from __future__ import annotations

import os

import pytest
from wrenn.code_runner import DEFAULT_KERNEL, DEFAULT_TEMPLATE, AsyncCapsule, Capsule, Execution
from wrenn.models import Status
from wrennsdk_support import wildcard_localhost

pytestmark = pytest.mark.skipif(
    os.environ.get("WRENN_SKIP_CODE_RUNNER") == "1",
    reason="WRENN_SKIP_CODE_RUNNER=1 (the code-runner-beta template needs a network build)",
)

JUPYTER_BOOT = 90  # first run_code waits this long for Jupyter to answer


TEMPLATE_BUILD = 900  # wrenn up builds code-runner-beta after minimal (~1-3 min; pip)


@pytest.fixture(scope="module")
def code_runner_template(server) -> None:
    """Wait until ``wrenn up`` has built ``code-runner-beta`` (in the
    background, after ``minimal``); a build failure shows in the log."""
    import time

    import httpx

    deadline = time.monotonic() + TEMPLATE_BUILD
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": server.api_key}) as h:
        while True:
            names = [t["name"] for t in h.get("/v1/snapshots", params={"type": "base"}).json()]
            if DEFAULT_TEMPLATE in names:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{DEFAULT_TEMPLATE} was not built within {TEMPLATE_BUILD} s "
                            f"(see the server log in {server.data_dir})", pytrace=False)
            time.sleep(2)


@pytest.fixture
def proxied(server, code_runner_template, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WRENN_PROXY_DOMAIN", f"localhost:{server.port}")
    with wildcard_localhost():
        yield


def test_defaults() -> None:
    assert DEFAULT_TEMPLATE == "code-runner-beta" and DEFAULT_KERNEL == "wrenn"


def test_run_code(server, proxied) -> None:
    with Capsule(wait=True, api_key=server.api_key, base_url=server.base_url) as c:
        assert c.info is not None and c.info.template == "code-runner-beta"
        assert c.info.status == Status.running
        assert c.get_url(8888) == f"http://8888-{c.capsule_id}.localhost:{server.port}"

        r = c.run_code("1+1", jupyter_timeout=JUPYTER_BOOT)
        assert isinstance(r, Execution)
        assert r.error is None and not r.timed_out, r.error
        assert r.text == "2"
        assert r.results[0].is_main_result and r.execution_count is not None

        r = c.run_code("print('hello')")
        assert r.error is None and r.logs.stdout == ["hello\n"] and r.text is None

        c.run_code("x = 41")
        assert c.run_code("x + 1").text == "42"  # the kernel keeps state

        r = c.run_code("import sys; sys.stderr.write('oops\\n')")
        assert "oops" in "".join(r.logs.stderr)

        r = c.run_code("1/0")
        assert r.error is not None and r.error.name == "ZeroDivisionError"
        assert "division by zero" in r.error.value and r.error.traceback

        seen: list[str] = []
        r = c.run_code("for i in range(3): print(i)", on_stdout=seen.append)
        assert "".join(seen) == "0\n1\n2\n"

        r = c.run_code("from IPython.display import HTML, display; display(HTML('<b>x</b>')); 7")
        assert r.text == "7"
        assert any(res.html == "<b>x</b>" and not res.is_main_result for res in r.results)

        with pytest.raises(ValueError):
            c.run_code("1", language="javascript")

        # the ordinary capsule API works on a code runner capsule too
        assert c.commands.run("echo side").stdout == "side\n"


async def test_async_run_code(server, proxied) -> None:
    c = await AsyncCapsule.create(wait=True, api_key=server.api_key, base_url=server.base_url)
    async with c:
        r = await c.run_code("1+1", jupyter_timeout=JUPYTER_BOOT)
        assert r.error is None and r.text == "2"
        r = await c.run_code("print('async hello')")
        assert r.logs.stdout == ["async hello\n"]
        r = await c.run_code("raise ValueError('nope')")
        assert r.error is not None and r.error.name == "ValueError" and r.error.value == "nope"
        # (timeouts are tested async only: the sync SDK's run_code lets
        # queue.Empty escape when ``timeout`` passes)
        r = await c.run_code("import time; time.sleep(10)", timeout=2)
        assert r.timed_out and r.error is not None and r.error.name == "Timeout"
