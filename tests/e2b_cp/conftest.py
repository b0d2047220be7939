"""Drive ``wrenn up`` through the unmodified E2B SDKs (``e2b`` 2.63.0 and
``e2b-code-interpreter`` 2.11.5 for Python, ``e2b`` 2.51.0 for Node).

The session fixture ``server`` starts one ``wrenn up`` (``WrennUp`` of
tests/support/wrenn_up.py, shared with tests/wrenn_sdk) unless
``WRENN_BASE_URL`` and ``WRENN_E2B_API_KEY`` point at a running one, and reads
the admin team's E2B key from ``D/admin-e2b-api-key``. The SDKs are pointed at it only through
their environment variables, as a user switching from E2B would do::

    E2B_API_KEY=<D/admin-e2b-api-key>
    E2B_API_URL=http://127.0.0.1:PORT      # the control plane
    E2B_SANDBOX_URL=http://127.0.0.1:PORT  # data plane, routed by E2b-Sandbox-Id/-Port
    E2B_DOMAIN=localhost:PORT              # only a fallback for get_host()

(``WRENN_E2B_SANDBOX_URL`` overrides the sandbox URL, e.g. if the data plane
gets a port of its own.) ``E2B_DEBUG`` is removed; the debug-mode tests set
it themselves.

Run:  ENVD_BIN=... target/e2b-venv/bin/python -m pytest -q tests/e2b_cp
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent
for _dir in (HERE, HERE.parent / "support"):  # e2bcp_support / wrenn_up, under any import mode
    if str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))

# Nothing from the caller's environment may steer the SDK elsewhere (a real
# E2B account, debug mode, another server): the fixtures set what is needed.
for _var in (
    "E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DOMAIN", "E2B_DEBUG",
    "E2B_ACCESS_TOKEN", "E2B_HTTP_VERSION",
):
    os.environ.pop(_var, None)

import wrenn_up  # noqa: E402
from wrenn_up import CODE_RUNNER, Server, say  # noqa: E402
from e2bcp_support import CODE_INTERPRETER, SANDBOX_TIMEOUT, unique_tag  # noqa: E402

import e2b  # noqa: E402
from e2b import AsyncSandbox, Sandbox  # noqa: E402


class WrennUp(wrenn_up.WrennUp):
    """``wrenn up`` for this suite (see tests/support/wrenn_up.py): reads
    the admin team's E2B key too, and keeps the templates E2B SDKs default
    to when a recipe builds them."""

    label = "e2b-cp"
    key_env = "WRENN_E2B_API_KEY"
    e2b_key = True
    cached_templates = (CODE_RUNNER, "base", CODE_INTERPRETER)


# How long the first create of code-interpreter-v1 may keep failing because
# the server is still building it (a recipe with a PyPI install, like
# code-runner-beta).
CODE_INTERPRETER_WAIT = float(os.environ.get("WRENN_E2B_TEMPLATE_WAIT", 25 * 60))


# --------------------------------------------------------------------------- #
# The server and the SDK's environment
# --------------------------------------------------------------------------- #


@dataclass
class E2bServer:
    """What the tests need to know about the server."""

    base_url: str  # wrenn's API root (= E2B_API_URL)
    sandbox_url: str  # E2B_SANDBOX_URL
    e2b_api_key: str  # the admin team's E2B key
    admin_key: str | None  # the admin team's wrenn key (None: external server without it)
    server: Server
    up: WrennUp | None = None

    @property
    def port(self) -> int:
        return self.server.port  # the same URL as base_url

    @property
    def domain(self) -> str:
        return f"localhost:{self.port}"

    def api(self, api_key: str | None = "e2b", **kw) -> httpx.Client:
        """A raw client on the E2B REST API: the admin team's E2B key by
        default, ``None`` for no key, or the key given."""
        key = self.e2b_api_key if api_key == "e2b" else api_key
        headers = {"X-API-KEY": key} if key is not None else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60.0, trust_env=False, **kw)

    def wrenn(self) -> httpx.Client:
        """A raw client on wrenn's /v1 API with the admin team's wrenn key."""
        if not self.admin_key:
            pytest.skip("the admin team's wrenn key is unknown (set WRENN_API_KEY with an external server)")
        return httpx.Client(
            base_url=self.base_url, headers={"X-API-Key": self.admin_key}, timeout=60.0, trust_env=False
        )

    def data_plane(self, sandbox_id: str, port: int = 49983, **headers: str) -> httpx.Client:
        """A raw client on E2B_SANDBOX_URL that routes like the SDK does:
        ``E2b-Sandbox-Id`` + ``E2b-Sandbox-Port`` headers."""
        h = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port), **headers}
        return httpx.Client(base_url=self.sandbox_url, headers=h, timeout=60.0, trust_env=False)

    def log_tail(self, lines: int = 80) -> str:
        return self.server.log_tail(lines)


_current: E2bServer | None = None


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> Iterator[E2bServer]:
    global _current
    ext_url, ext_key = os.environ.get("WRENN_BASE_URL"), os.environ.get("WRENN_E2B_API_KEY")
    if ext_url and ext_key:
        base = ext_url.rstrip("/")
        srv = E2bServer(
            base_url=base,
            sandbox_url=(os.environ.get("WRENN_E2B_SANDBOX_URL") or base).rstrip("/"),
            e2b_api_key=ext_key,
            admin_key=os.environ.get("WRENN_API_KEY"),
            server=Server(base_url=base, api_key=os.environ.get("WRENN_API_KEY", "")),
        )
        _current = srv
        yield srv
        _current = None
        return

    with WrennUp.serving(
        request,
        failed_attr="e2bcp_failed",
        # (debug mode is off unless asked for: test_debug_mode.py needs it)
        extra_args=["--e2b-debug", *shlex.split(os.environ.get("WRENN_E2B_UP_ARGS", ""))],
        database_url=os.environ.get("WRENN_TEST_DATABASE_URL"),
        # code-interpreter-v1 is built like code-runner-beta (from PyPI); with
        # WRENN_SKIP_CODE_INTERPRETER=1 nothing network-built is needed.
        code_runner=not os.environ.get("WRENN_SKIP_CODE_INTERPRETER"),
    ) as up:
        srv_ = up.server
        base = srv_.base_url.rstrip("/")
        srv = E2bServer(
            base_url=base,
            sandbox_url=(os.environ.get("WRENN_E2B_SANDBOX_URL") or base).rstrip("/"),
            e2b_api_key=srv_.e2b_api_key,
            admin_key=srv_.api_key,
            server=srv_,
            up=up,
        )
        _current = srv
        try:
            yield srv
        finally:
            _current = None


@pytest.fixture(scope="session", autouse=True)
def e2b_environment(request: pytest.FixtureRequest) -> Iterator[None]:
    """Point the SDKs at the server through their environment variables
    (read at every ``ConnectionConfig()``: e2b/connection_config.py:224-242).
    Tests that need no server (``-k versions``) do not start one."""
    if request.node.get_closest_marker("no_server") or all(
        item.get_closest_marker("no_server") for item in request.session.items
    ):
        yield
        return
    srv: E2bServer = request.getfixturevalue("server")
    saved = {k: os.environ.get(k) for k in ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DOMAIN")}
    os.environ["E2B_API_KEY"] = srv.e2b_api_key
    os.environ["E2B_API_URL"] = srv.base_url
    os.environ["E2B_SANDBOX_URL"] = srv.sandbox_url
    os.environ["E2B_DOMAIN"] = srv.domain
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        item.session.e2bcp_failed = True
        if _current is not None and _current.up is not None:
            rep.sections.append(("wrenn up log (tail)", _current.log_tail(80)))


# --------------------------------------------------------------------------- #
# Sandboxes
# --------------------------------------------------------------------------- #


@pytest.fixture
def tag() -> str:
    """A unique metadata value, so list filters find this test's sandboxes only."""
    return unique_tag()


def _kill_quietly(sbx) -> None:
    try:
        Sandbox.kill(sbx.sandbox_id)
    except Exception:
        pass


@pytest.fixture
def make_sandbox(server: E2bServer) -> Iterator[Callable[..., Sandbox]]:
    """Factory: ``make_sandbox(**Sandbox.create kwargs)``; every sandbox is
    killed at teardown (a failing kill is ignored: the test may have killed it)."""
    made: list[Sandbox] = []

    def make(cls=Sandbox, **kwargs):
        kwargs.setdefault("timeout", SANDBOX_TIMEOUT)
        sbx = cls.create(**kwargs)
        made.append(sbx)
        return sbx

    yield make
    for sbx in made:
        _kill_quietly(sbx)


@pytest.fixture
def sandbox(make_sandbox) -> Sandbox:
    """A running sandbox from ``base`` (the SDK's default template)."""
    return make_sandbox(metadata={"suite": "e2b-cp"})


@pytest.fixture
async def async_sandbox(server: E2bServer) -> AsyncIterator[AsyncSandbox]:
    sbx = await AsyncSandbox.create(timeout=SANDBOX_TIMEOUT, metadata={"suite": "e2b-cp"})
    try:
        yield sbx
    finally:
        try:
            await AsyncSandbox.kill(sbx.sandbox_id)
        except Exception:
            pass


@pytest.fixture(scope="session")
def code_interpreter_template(server: E2bServer, request: pytest.FixtureRequest) -> str:
    """Wait until ``code-interpreter-v1`` can be created (the server may still
    be building it after /health turned 200), creating and killing probe
    sandboxes through the SDK itself."""
    if os.environ.get("WRENN_SKIP_CODE_INTERPRETER") == "1":
        pytest.skip("WRENN_SKIP_CODE_INTERPRETER=1 (code-interpreter-v1 needs a network build)")
    from e2b_code_interpreter import Sandbox as CodeSandbox

    started = time.monotonic()
    last_report = 0.0
    while True:
        try:
            sbx = CodeSandbox.create(timeout=60)
        except e2b.ServiceBusyException as exc:  # 503 (the SDK already retried)
            last = repr(exc)
        except e2b.SandboxException as exc:
            # A template still being built answers like an unknown one: 404
            # (or 400/409). Anything else is a real failure: no point waiting.
            if getattr(exc, "status_code", None) not in (400, 404, 409):
                raise
            last = repr(exc)
        else:
            _kill_quietly(sbx)
            return CODE_INTERPRETER
        now = time.monotonic()
        if now - started > CODE_INTERPRETER_WAIT:
            pytest.fail(f"{CODE_INTERPRETER} not creatable within {CODE_INTERPRETER_WAIT:.0f}s; last: {last}")
        if now - last_report > 60:
            last_report = now
            say(request, f"[e2b-cp] waiting for {CODE_INTERPRETER} ({now - started:.0f}s): {last}")
        time.sleep(10)


# --------------------------------------------------------------------------- #
# A second team
# --------------------------------------------------------------------------- #


@dataclass
class Team:
    id: str
    wrenn_key: str
    e2b_key: str


@pytest.fixture(scope="session")
def team_b(server: E2bServer) -> Team:
    """A second team (``POST /v1/teams`` with the admin's wrenn key) and an
    E2B key of its own (``POST /v1/api-keys?kind=e2b`` with its wrenn key)."""
    with server.wrenn() as h:
        r = h.post("/v1/teams", json={"name": unique_tag("e2b-team-b")})
        assert r.status_code == 201, f"POST /v1/teams: {r.status_code} {r.text}"
        team = r.json()
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": team["api_key"]},
                      timeout=60.0, trust_env=False) as h:
        r = h.post("/v1/api-keys", params={"kind": "e2b"}, json={"name": "e2b"})
        assert r.status_code == 201, f"POST /v1/api-keys?kind=e2b: {r.status_code} {r.text}"
        key = r.json()["key"]
    assert key.startswith("e2b_") and len(key) == 44, key
    return Team(id=team["id"], wrenn_key=team["api_key"], e2b_key=key)
