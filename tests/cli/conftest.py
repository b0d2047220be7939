"""Drive the ``wrenn`` command against ``wrenn up``: every subcommand as a
user types it (a subprocess with ``WRENN_BASE_URL`` / ``WRENN_API_KEY``),
``wrenn shell`` inside ``tmux`` (type, read the screen, resize, detach,
reattach).

The session fixture ``server`` starts one ``wrenn up`` through ``WrennUp``
(tests/support/wrenn_up.py, as tests/wrenn_sdk does) without the templates
that need PyPI.

Run:  ENVD_BIN=... target/wrenn-sdk-venv/bin/python -m pytest -q tests/cli
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for _dir in (HERE, HERE.parent / "support"):
    if str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))

import wrenn_up  # noqa: E402
from wrenn_up import Server  # noqa: E402


class WrennUp(wrenn_up.WrennUp):
    label = "wrenn-cli"
    cached_templates = ()


@dataclass
class Cli:
    """Runs the ``wrenn`` binary with the server's URL and key."""

    binary: str
    server: Server
    config_dir: Path

    def env(self, **extra: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WRENN_")}
        env.update(
            WRENN_BASE_URL=self.server.base_url,
            WRENN_API_KEY=self.server.api_key,
            WRENN_CONFIG=str(self.config_dir / "config.json"),
            RUST_LOG="warn",
        )
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 120, input: bytes | None = None,
            **env: str | None) -> subprocess.CompletedProcess:
        r = subprocess.run([self.binary, *args], env=self.env(**env), capture_output=True,
                           timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"wrenn {' '.join(args)} exited {r.returncode}:\n"
                                 f"stdout: {r.stdout.decode(errors='replace')}\n"
                                 f"stderr: {r.stderr.decode(errors='replace')}")
        return r

    def out(self, *args: str, **kw) -> str:
        return self.run(*args, **kw).stdout.decode()


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    with WrennUp.serving(request, failed_attr="cli_failed", code_runner=False) as up:
        yield up.server


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        item.session.cli_failed = True


@pytest.fixture(scope="session")
def cli(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    binary, _ = wrenn_up.resolve_binaries()
    return Cli(binary=binary, server=server, config_dir=tmp_path_factory.mktemp("wrenn-config"))


@pytest.fixture
def capsule(cli: Cli) -> Iterator[str]:
    """A running `minimal` capsule, killed after the test."""
    cid = cli.out("create", "--template", "minimal", "--env", "FROM_CLI=yes", "--meta", "suite=cli").strip()
    yield cid
    cli.run("kill", cid, check=False)
