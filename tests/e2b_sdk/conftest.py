"""Drive a real envd through the unmodified ``e2b`` Python SDK.

The SDK runs in debug mode (``E2B_DEBUG=true``): it talks to envd at
``http://localhost:49983`` with sandbox id ``debug_sandbox_id`` and never calls
a control plane. The ``envd`` fixture starts ``$ENVD_BIN --dev --port 49983
--addr 127.0.0.1`` once per session and stops it at the end.

Run:  ENVD_BIN=target/debug/envd pytest tests/e2b_sdk

The "sandbox" is this very machine: envd runs as the current user (root in
CI), so the tests prepare and clean up their files with plain local file
operations and exercise envd only through the SDK.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import httpx
import pytest

# The SDK reads these when a sandbox is created, so set them before any test
# runs. E2B_SANDBOX_URL would take precedence over debug mode: drop it.
os.environ["E2B_DEBUG"] = "true"
os.environ.pop("E2B_SANDBOX_URL", None)
_no_proxy = [h for h in os.environ.get("NO_PROXY", "").split(",") if h]
os.environ["NO_PROXY"] = ",".join(_no_proxy + ["localhost", "127.0.0.1"])
os.environ["no_proxy"] = os.environ["NO_PROXY"]

from e2b import AsyncSandbox, Sandbox  # noqa: E402  (after the env setup above)

ENVD_HOST = "127.0.0.1"
ENVD_PORT = 49983  # fixed: debug mode always dials localhost:49983
ENVD_READY_LINE = f"envd listening on {ENVD_HOST}:{ENVD_PORT}"
ENVD_START_TIMEOUT = 30.0
ENVD_STOP_TIMEOUT = 10.0

TEST_USER = "wrenntest"


@dataclass(frozen=True)
class User:
    name: str
    home: str
    group: str
    uid: int
    gid: int

    @classmethod
    def from_pwd(cls, entry: pwd.struct_passwd) -> "User":
        return cls(
            name=entry.pw_name,
            home=entry.pw_dir,
            group=grp.getgrgid(entry.pw_gid).gr_name,
            uid=entry.pw_uid,
            gid=entry.pw_gid,
        )


@dataclass
class Envd:
    process: subprocess.Popen
    log_path: Path
    base_url: str

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no envd log)"
        return "\n".join(text.splitlines()[-lines:])


_envd: Optional[Envd] = None


# --------------------------------------------------------------------------- #
# The throwaway user (created before envd starts, so envd sees it however it
# reads the account database).
# --------------------------------------------------------------------------- #


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _delete_user(name: str) -> None:
    if not _user_exists(name):
        return
    done = subprocess.run(["userdel", "-r", name], capture_output=True)
    if done.returncode != 0 and _user_exists(name):
        subprocess.run(["userdel", "-f", "-r", name], capture_output=True)


@pytest.fixture(scope="session")
def _throwaway_user() -> Iterator[Optional[User]]:
    """Create ``wrenntest`` when running as root; ``None`` otherwise."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        yield None
        return
    _delete_user(TEST_USER)  # a leftover from an interrupted run
    subprocess.run(
        ["useradd", "-m", "-s", "/bin/bash", TEST_USER],
        check=True,
        capture_output=True,
    )
    try:
        yield User.from_pwd(pwd.getpwnam(TEST_USER))
    finally:
        _delete_user(TEST_USER)


@pytest.fixture(scope="session")
def test_user(_throwaway_user: Optional[User], envd: Envd) -> User:
    """A second, unprivileged user for the ``user=`` tests."""
    if _throwaway_user is None:
        pytest.skip(
            f"user= tests need root (to create the throwaway user {TEST_USER!r} "
            "with useradd); running as uid %d" % os.geteuid()
        )
    return _throwaway_user


@pytest.fixture(scope="session")
def default_user() -> User:
    """The user envd acts as when no ``user=`` is given: the one running it."""
    return User.from_pwd(pwd.getpwuid(os.geteuid()))


# --------------------------------------------------------------------------- #
# envd
# --------------------------------------------------------------------------- #


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _healthy(base_url: str) -> bool:
    try:
        with httpx.Client(trust_env=False, timeout=1.0) as client:
            return client.get(f"{base_url}/health").is_success
    except httpx.HTTPError:
        return False


def _drain_stdout(process: subprocess.Popen, ready: threading.Event, log) -> None:
    """Copy envd's stdout into the log; flag the readiness line."""
    assert process.stdout is not None
    for raw in process.stdout:
        log.write(b"[stdout] " + raw)
        log.flush()
        if raw.decode(errors="replace").strip() == ENVD_READY_LINE:
            ready.set()


@pytest.fixture(scope="session")
def envd(
    tmp_path_factory: pytest.TempPathFactory, _throwaway_user: Optional[User]
) -> Iterator[Envd]:
    global _envd
    binary = os.environ.get("ENVD_BIN")
    if not binary:
        message = "ENVD_BIN is not set: point it at an envd binary (e.g. target/debug/envd)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if not os.access(binary, os.X_OK):
        pytest.fail(f"ENVD_BIN={binary!r} is not an executable file")
    if _port_in_use(ENVD_HOST, ENVD_PORT):
        pytest.fail(
            f"port {ENVD_PORT} is already in use; the SDK's debug mode can only "
            "reach envd there, so stop whatever listens on it first"
        )

    log_path = tmp_path_factory.mktemp("envd") / "envd.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [binary, "--dev", "--port", str(ENVD_PORT), "--addr", ENVD_HOST],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    ready = threading.Event()
    reader = threading.Thread(
        target=_drain_stdout, args=(process, ready, log), daemon=True
    )
    reader.start()
    base_url = f"http://{ENVD_HOST}:{ENVD_PORT}"
    instance = Envd(process=process, log_path=log_path, base_url=base_url)

    try:
        deadline = time.monotonic() + ENVD_START_TIMEOUT
        while not ready.wait(0.05):
            if process.poll() is not None:
                pytest.fail(
                    f"envd exited with status {process.returncode} before it was "
                    f"ready; log:\n{instance.log_tail()}"
                )
            if _healthy(base_url):
                break
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"envd did not print {ENVD_READY_LINE!r} nor answer /health "
                    f"within {ENVD_START_TIMEOUT}s; log:\n{instance.log_tail()}"
                )
        _envd = instance
        yield instance
    finally:
        _envd = None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(ENVD_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(ENVD_STOP_TIMEOUT)
        reader.join(ENVD_STOP_TIMEOUT)
        log.close()


@pytest.fixture(autouse=True)
def _envd_still_running(envd: Envd) -> None:
    """Fail fast, with envd's log, once envd has died instead of timing out."""
    if envd.process.poll() is not None:
        pytest.fail(
            f"envd exited with status {envd.process.returncode}; log:\n{envd.log_tail()}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _envd is not None:
        report.sections.append(("envd log (tail)", _envd.log_tail()))


# --------------------------------------------------------------------------- #
# Sandboxes and scratch space
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="session")
def sandbox(envd: Envd) -> Sandbox:
    """A sync SDK client; in debug mode creating it sends no request."""
    sbx = Sandbox.create()
    assert sbx.sandbox_id == "debug_sandbox_id"
    return sbx


@pytest.fixture
async def async_sandbox(envd: Envd) -> AsyncSandbox:
    sbx = await AsyncSandbox.create()
    assert sbx.sandbox_id == "debug_sandbox_id"
    return sbx


@pytest.fixture
def workdir() -> Iterator[str]:
    """A fresh absolute directory ``/tmp/e2bsdk-<random>``, removed afterwards."""
    path = Path("/tmp") / f"e2bsdk-{uuid.uuid4().hex[:12]}"
    path.mkdir(mode=0o755)
    path.chmod(0o755)  # independent of the umask
    try:
        yield str(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def home_scratch(default_user: User) -> Iterator[str]:
    """A unique relative name under the default user's home, removed afterwards.

    For tests of relative paths, which envd resolves against the home.
    """
    name = f"e2bsdk-rel-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        target = Path(default_user.home) / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
