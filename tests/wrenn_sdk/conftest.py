"""Drive our control plane through the unmodified ``wrenn`` Python SDK 0.3.0.

The session fixture ``server`` starts ``wrenn up`` once for the whole run
(unless ``WRENN_BASE_URL`` and ``WRENN_API_KEY`` point at a running one):

    $WRENN_BIN up --data-dir D --listen 127.0.0.1:0 --envd $ENVD_BIN \
        [--database-url $WRENN_TEST_DATABASE_URL]

``D`` is a fresh directory under /var/tmp. The shared debootstrap template
``target/wrenn-fixtures/templates/minimal`` (or ``$WRENN_FIXTURES/templates/
minimal``) is symlinked into ``D/templates/minimal`` first, so the server
need not build it. The server prints ``wrenn listening on http://…`` once
bound; ``GET /health`` answers 503 while templates build and 200 when ready;
the admin team's API key is in ``D/admin-api-key`` (mode 0600).

Run:  ENVD_BIN=... target/wrenn-sdk-venv/bin/python -m pytest -q tests/wrenn_sdk
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the support module, under any import mode
    sys.path.insert(0, str(HERE))

# Loopback traffic must never go through a proxy from the environment.
_no_proxy = [h for h in os.environ.get("NO_PROXY", "").split(",") if h]
os.environ["NO_PROXY"] = ",".join(_no_proxy + ["localhost", "127.0.0.1", ".localhost"])
os.environ["no_proxy"] = os.environ["NO_PROXY"]

import wrenn  # noqa: E402
from wrenn import AsyncWrennClient, Capsule, WrennClient  # noqa: E402

REPO = HERE.parent.parent
DEFAULT_BIN = REPO / "target" / "debug" / "wrenn"
DEFAULT_FIXTURES = REPO / "target" / "wrenn-fixtures"
LISTEN_LINE = re.compile(r"wrenn listening on (https?://\S+)")
LISTEN_TIMEOUT = 60.0
READY_TIMEOUT = 15 * 60.0
STOP_TIMEOUT = 30.0
TEMPLATE = "minimal"


# --------------------------------------------------------------------------- #
# The server
# --------------------------------------------------------------------------- #


@dataclass
class Server:
    base_url: str
    api_key: str
    data_dir: Path | None = None
    log_path: Path | None = None
    process: subprocess.Popen | None = None
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def port(self) -> int:
        port = httpx.URL(self.base_url).port
        assert port is not None, self.base_url
        return port

    @property
    def host(self) -> str:
        return httpx.URL(self.base_url).host

    def log_tail(self, lines: int = 150) -> str:
        if self.log_path is None:
            return "(external server: no log)"
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def http(self, api_key: str | None = "admin", **kw) -> httpx.Client:
        """A raw httpx client on the API (admin key by default; None: no key)."""
        headers = {}
        key = self.api_key if api_key == "admin" else api_key
        if key is not None:
            headers["X-API-Key"] = key
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60.0, **kw)


def _say(request: pytest.FixtureRequest, message: str) -> None:
    """Print past pytest's capture (progress of a long server start)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print(message, file=sys.stderr, flush=True)
    else:
        print(message, file=sys.stderr, flush=True)


def _pump(stream, log, lock: threading.Lock, on_line: Callable[[str], None] | None) -> None:
    """Copy a pipe to the log, line by line, until EOF (the pipe never fills)."""
    for raw in iter(stream.readline, b""):
        with lock:
            log.write(raw)
            log.flush()
        if on_line is not None:
            on_line(raw.decode(errors="replace"))
    stream.close()


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].encode().decode("unicode_escape")
                if mp.startswith(prefix) or mp == prefix[:-1]:
                    out.append(mp)
    except OSError:
        pass
    return out


def _link_fixture_template(data_dir: Path) -> None:
    fixtures = Path(os.environ.get("WRENN_FIXTURES") or DEFAULT_FIXTURES)
    src = fixtures / "templates" / TEMPLATE
    if src.is_dir():
        (data_dir / "templates").mkdir(parents=True, exist_ok=True)
        os.symlink(src.resolve(), data_dir / "templates" / TEMPLATE)


def _fail_with_log(server: Server, message: str) -> None:
    pytest.fail(f"{message}\n--- server log ({server.log_path}) ---\n{server.log_tail()}", pytrace=False)


def _stop(server: Server) -> int | None:
    proc = server.process
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: see Popen
            except ProcessLookupError:
                pass
            proc.wait(10)
    for t in server._threads:
        t.join(5)
    return proc.returncode


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    ext_url, ext_key = os.environ.get("WRENN_BASE_URL"), os.environ.get("WRENN_API_KEY")
    if ext_url and ext_key:
        yield Server(base_url=ext_url.rstrip("/"), api_key=ext_key)
        return

    envd = os.environ.get("ENVD_BIN")
    if not envd:
        pytest.fail(
            "ENVD_BIN is not set: point it at the static envd binary "
            "(or set WRENN_BASE_URL and WRENN_API_KEY to use a running server)",
            pytrace=False,
        )
    if not os.access(envd, os.X_OK):
        pytest.fail(f"ENVD_BIN={envd!r} is not an executable file", pytrace=False)
    binary = os.environ.get("WRENN_BIN") or str(DEFAULT_BIN)
    if not os.access(binary, os.X_OK):
        pytest.fail(
            f"the control plane binary {binary!r} is missing: build it (cargo build) "
            "or set WRENN_BIN",
            pytrace=False,
        )

    data_dir = Path(tempfile.mkdtemp(prefix="wrenn-sdk-", dir="/var/tmp"))
    _link_fixture_template(data_dir)
    log_path = data_dir / "server.log"
    log = open(log_path, "ab")
    lock = threading.Lock()
    cmd = [binary, "up", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--envd", envd]
    if os.environ.get("WRENN_TEST_DATABASE_URL"):
        cmd += ["--database-url", os.environ["WRENN_TEST_DATABASE_URL"]]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a ^C to pytest reaches us, not the server
    )
    srv = Server(base_url="", api_key="", data_dir=data_dir, log_path=log_path, process=proc)

    bound = threading.Event()
    url: list[str] = []

    def on_stdout(line: str) -> None:
        if not bound.is_set():
            m = LISTEN_LINE.search(line)
            if m:
                url.append(m.group(1).rstrip("/"))
                bound.set()

    for stream, cb in ((proc.stdout, on_stdout), (proc.stderr, None)):
        t = threading.Thread(target=_pump, args=(stream, log, lock, cb), daemon=True)
        t.start()
        srv._threads.append(t)

    try:
        deadline = time.monotonic() + LISTEN_TIMEOUT
        while not bound.wait(0.2):
            if proc.poll() is not None:
                _fail_with_log(srv, f"wrenn up exited with {proc.returncode} before listening: {cmd}")
            if time.monotonic() > deadline:
                _fail_with_log(srv, f"no 'wrenn listening on …' line within {LISTEN_TIMEOUT:.0f}s")
        srv.base_url = url[0]

        # Ready: /health 200 (503 with build progress while templates build).
        started, last_report, last = time.monotonic(), 0.0, ""
        with httpx.Client(timeout=5.0) as h:
            while True:
                if proc.poll() is not None:
                    _fail_with_log(srv, f"wrenn up exited with {proc.returncode} while starting")
                try:
                    r = h.get(f"{srv.base_url}/health")
                    if r.status_code == 200:
                        break
                    last = f"{r.status_code} {r.text[:300]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                now = time.monotonic()
                if now - started > READY_TIMEOUT:
                    _fail_with_log(srv, f"/health not 200 within {READY_TIMEOUT:.0f}s; last: {last}")
                if now - last_report > 30:
                    last_report = now
                    _say(request, f"[wrenn-sdk] waiting for {srv.base_url}/health "
                                  f"({now - started:.0f}s): {last}")
                time.sleep(0.5)

        key_path = data_dir / "admin-api-key"
        assert key_path.is_file(), f"{key_path} missing"
        mode = key_path.stat().st_mode & 0o777
        assert mode == 0o600, f"{key_path} has mode {oct(mode)}, want 0o600"
        srv.api_key = key_path.read_text().strip()
        assert srv.api_key.startswith("wrn_"), f"admin key looks wrong: {srv.api_key[:8]}…"
    except BaseException:
        _stop(srv)
        log.close()
        _cleanup(request, srv, keep_log=True)
        raise

    yield srv

    code = _stop(srv)
    log.close()
    if code not in (0, None):
        _say(request, f"[wrenn-sdk] WARNING: wrenn up exited with {code} on SIGTERM")
    failed = getattr(request.session, "wrenn_failed", False)
    _cleanup(request, srv, keep_log=failed or code not in (0, None))


def _cleanup(request: pytest.FixtureRequest, srv: Server, keep_log: bool) -> None:
    """Keep the server log (and print its tail) when something failed;
    remove the data dir unless WRENN_KEEP_DATA_DIR is set or mounts remain."""
    assert srv.data_dir is not None and srv.log_path is not None
    if keep_log:
        keep = Path("/var/tmp") / f"wrenn-sdk-server-{time.strftime('%Y%m%d-%H%M%S')}.log"
        try:
            shutil.copyfile(srv.log_path, keep)
        except OSError:
            keep = srv.log_path
        _say(request, f"[wrenn-sdk] server log kept at {keep}; tail:\n{srv.log_tail(200)}")
    if os.environ.get("WRENN_KEEP_DATA_DIR"):
        _say(request, f"[wrenn-sdk] data dir kept: {srv.data_dir}")
        return
    mounts = _mounts_under(srv.data_dir)
    if mounts:
        _say(request, f"[wrenn-sdk] NOT removing {srv.data_dir}: still mounted: {mounts[:5]}")
        return
    shutil.rmtree(srv.data_dir, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
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
