"""Helpers for the E2B suite (no fixtures here; see conftest.py)."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

import httpx

E2B_VERSION = "2.63.0"
CODE_INTERPRETER_VERSION = "2.11.5"
BASE = "base"  # Sandbox.default_template (e2b/sandbox/main.py:32)
CODE_INTERPRETER = "code-interpreter-v1"  # e2b_code_interpreter/constants.py:1
SANDBOX_TIMEOUT = 300  # seconds; every sandbox a test makes is killed at teardown anyway

# The proxy's answers the SDK classifies by substring (e2b/exceptions.py:7-8).
NOT_FOUND_MESSAGE = "was not found"
PORT_NOT_OPEN_MESSAGE = "port is not open"
ENVD_PORT = 49983
JUPYTER_PORT = 49999


def unique_tag(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def poll(fn: Callable[[], Any], timeout: float, interval: float = 0.5, what: str = "") -> Any:
    """Call ``fn`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = fn()
        except Exception as exc:  # noqa: BLE001 - report the last failure
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}: last={last!r}")
        time.sleep(interval)


def assert_e2b_error(r: httpx.Response, status: int) -> dict:
    """An E2B REST error: ``status`` and the body ``{"code": status, "message":
    str}`` that both SDKs parse (Python ``Error.from_dict`` needs both keys,
    e2b/api/client/models/error.py:58-62; JS compares ``body.code`` with 404/409)."""
    assert r.status_code == status, f"want {status}, got {r.status_code}: {r.text}"
    assert r.headers.get("content-type", "").split(";")[0].strip() == "application/json", r.headers
    body = r.json()
    assert isinstance(body, dict), body
    assert body.get("code") == status and not isinstance(body.get("code"), bool), body
    assert isinstance(body.get("message"), str) and body["message"], body
    return body


def assert_proxy_502(r: httpx.Response, needle: str) -> dict:
    """What E2B's sandbox proxy answers for a gone sandbox or a closed port:
    502, JSON, ``message`` containing ``needle``."""
    assert r.status_code == 502, f"want 502, got {r.status_code}: {r.text}"
    assert r.headers.get("content-type", "").split(";")[0].strip() == "application/json", r.headers
    body = r.json()
    assert needle in body.get("message", ""), body
    return body


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def now() -> datetime:
    return datetime.now(timezone.utc)


def ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
