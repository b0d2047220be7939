"""Drive our control plane through the unmodified ``wrenn`` Python SDK 0.3.0.

The session fixture ``server`` starts ``wrenn up`` once for the whole run
(unless ``WRENN_BASE_URL`` and ``WRENN_API_KEY`` point at a running one):

    $WRENN_BIN up --data-dir D --listen 127.0.0.1:0 --envd $ENVD_BIN \
        --instance <unique> --pool <unique> [--database-url $WRENN_TEST_DATABASE_URL]

through ``WrennUp`` (tests/support/wrenn_up.py, shared with tests/e2b_cp):
``D`` is a fresh directory under /var/tmp with the prebuilt ``minimal`` (and
a cached ``code-runner-beta``) linked in; the admin team's API key is read
from ``D/admin-api-key`` once ``/health`` answers 200.

Run:  ENVD_BIN=... target/wrenn-sdk-venv/bin/python -m pytest -q tests/wrenn_sdk
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for _dir in (HERE, HERE.parent / "support"):  # the support modules, under any import mode
    if str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))

import wrenn_up  # noqa: E402
from wrenn_up import CODE_RUNNER, TEMPLATE, Server  # noqa: E402

import wrenn  # noqa: E402
from wrenn import AsyncWrennClient, Capsule, WrennClient  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    wrenn_up.end_on_sigterm()


class WrennUp(wrenn_up.WrennUp):
    """``wrenn up`` for this suite (see tests/support/wrenn_up.py)."""

    label = "wrenn-sdk"
    cached_templates = (CODE_RUNNER,)


# --------------------------------------------------------------------------- #
# The server
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    ext_url, ext_key = os.environ.get("WRENN_BASE_URL"), os.environ.get("WRENN_API_KEY")
    if ext_url and ext_key:
        yield Server(base_url=ext_url.rstrip("/"), api_key=ext_key)
        return

    with WrennUp.serving(
        request,
        failed_attr="wrenn_failed",
        database_url=os.environ.get("WRENN_TEST_DATABASE_URL"),
        code_runner=not os.environ.get("WRENN_SKIP_CODE_RUNNER"),
    ) as up:
        yield up.server


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"wrenn_rep_{rep.when}", rep)  # for fixtures that clean up
    if rep.failed:
        item.session.wrenn_failed = True


# --------------------------------------------------------------------------- #
# Clients and capsules
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[WrennClient]:
    with WrennClient(api_key=server.api_key, base_url=server.base_url) as c:
        yield c


@pytest.fixture
async def async_client(server: Server) -> AsyncIterator[AsyncWrennClient]:
    async with AsyncWrennClient(api_key=server.api_key, base_url=server.base_url) as c:
        yield c


@pytest.fixture
def capsule(server: Server) -> Iterator[Capsule]:
    """A running capsule from ``minimal``; destroyed (and its client closed) after."""
    c = Capsule(template=TEMPLATE, wait=True, api_key=server.api_key, base_url=server.base_url)
    try:
        yield c
    finally:
        c.__exit__(None, None, None)  # destroy + close (destroy is idempotent)


@pytest.fixture
def make_capsule(server: Server) -> Iterator[Callable[..., Capsule]]:
    """Factory: ``make_capsule(**Capsule kwargs)``; every capsule made is
    destroyed at teardown."""
    made: list[Capsule] = []

    def make(**kwargs) -> Capsule:
        kwargs.setdefault("template", TEMPLATE)
        kwargs.setdefault("api_key", server.api_key)
        kwargs.setdefault("base_url", server.base_url)
        c = Capsule(**kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.__exit__(None, None, None)


# --------------------------------------------------------------------------- #
# A second team
# --------------------------------------------------------------------------- #


@dataclass
class Team:
    id: str
    name: str
    api_key: str
    client: WrennClient


def create_team(server: Server, name: str | None = None) -> Team:
    """``POST /v1/teams`` with the admin key: 201 ``{id, name, api_key}``."""
    name = name or f"team-b-{os.urandom(4).hex()}"
    with server.http() as h:
        r = h.post("/v1/teams", json={"name": name})
    assert r.status_code == 201, f"POST /v1/teams: {r.status_code} {r.text}"
    body = r.json()
    assert str(body.get("id", "")).startswith("team-"), body
    assert body.get("name") == name, body
    key = body.get("api_key")
    assert isinstance(key, str) and re.fullmatch(r"wrn_[0-9a-f]{32}", key), body
    return Team(
        id=body["id"],
        name=name,
        api_key=key,
        client=WrennClient(api_key=key, base_url=server.base_url),
    )


@pytest.fixture(scope="session")
def team_b(server: Server) -> Iterator[Team]:
    team = create_team(server)
    try:
        yield team
    finally:
        team.client.close()


@pytest.fixture(scope="session")
def sdk_version() -> str:
    assert wrenn.__version__ == "0.3.0", wrenn.__version__
    return wrenn.__version__
