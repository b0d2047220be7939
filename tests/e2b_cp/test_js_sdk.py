"""The ``e2b`` npm SDK against the same server: runs ``js/e2b.test.mjs``
(``node --test``) with the SDK's environment variables pointing at it.

Needs Node >= 20 and ``npm ci`` done in ``js/`` (skipped otherwise, failed
in CI: ``CI`` set)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parent / "js"


def _skip_or_fail(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


def test_js_sdk(server) -> None:
    node = shutil.which("node")
    if node is None:
        _skip_or_fail("node is not installed")
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip().lstrip("v").split(".")[0])
    if major < 20:
        _skip_or_fail(f"node {major} is too old (the suite needs >= 20)")
    if not (JS / "node_modules" / "e2b" / "package.json").is_file():
        _skip_or_fail(f"run `npm ci` in {JS} first")

    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    env.update(
        E2B_API_KEY=server.e2b_api_key,
        E2B_API_URL=server.base_url,
        E2B_SANDBOX_URL=server.sandbox_url,
        E2B_DOMAIN=server.domain,
        NO_PROXY="localhost,127.0.0.1,.localhost",
        no_proxy="localhost,127.0.0.1,.localhost",
    )
    r = subprocess.run(
        [node, "--test", "--test-concurrency=1", "--test-reporter=spec", "e2b.test.mjs"],
        cwd=JS, env=env, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, f"node --test failed ({r.returncode}):\n{r.stdout[-8000:]}\n{r.stderr[-4000:]}"
