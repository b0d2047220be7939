"""``wrenn up`` for the Python suites that drive it (tests/wrenn_sdk and
tests/e2b_cp): ``Server``, ``WrennUp``, ``unique_instance``, ``unique_pool``.

Needs only the standard library, httpx and pytest (both suites' venvs have
them): no SDK is imported here. Each suite's conftest puts this directory on
``sys.path`` and subclasses ``WrennUp`` to say what differs (``label``,
``key_env``, ``e2b_key``, ``cached_templates``).

``wrenn up`` runs on a fresh data dir ``D`` under /var/tmp with a unique
``--instance`` and ``--pool``. The shared debootstrap template
``target/wrenn-fixtures/templates/minimal`` (or ``$WRENN_FIXTURES/templates/
minimal``) and any cached recipe-built template are symlinked into
``D/templates`` first, so the server need not build them. The server prints
``wrenn listening on http://…`` once bound; ``GET /health`` answers 503
while templates build and 200 when ready; the admin team's API key is in
``D/admin-api-key`` (mode 0600), its E2B key in ``D/admin-e2b-api-key``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

# Loopback traffic must never go through a proxy from the environment.
_no_proxy = [h for h in os.environ.get("NO_PROXY", "").split(",") if h]
os.environ["NO_PROXY"] = ",".join(_no_proxy + ["localhost", "127.0.0.1", ".localhost"])
os.environ["no_proxy"] = os.environ["NO_PROXY"]

HERE = Path(__file__).resolve().parent

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
    instance: str | None = None
    pool: str | None = None
    e2b_api_key: str = ""  # D/admin-e2b-api-key, read when WrennUp.e2b_key
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


def say(request: pytest.FixtureRequest, message: str) -> None:
    """Print past pytest's capture (progress of a long server start)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print(message, file=sys.stderr, flush=True)
    else:
        print(message, file=sys.stderr, flush=True)


def _interrupted(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def end_on_sigterm() -> None:
    """Make a SIGTERM end the run as ^C does: pytest stops and tears its
    fixtures down (servers stopped, capsules and host objects purged).
    scripts/test.sh runs the wrenn SDK suite in the background, where SIGINT
    is ignored, and passes an interrupt on as SIGTERM."""
    signal.signal(signal.SIGTERM, _interrupted)


def sayer(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``say`` bound to a request (for ``WrennUp(say=…)``)."""
    return lambda message: say(request, message)


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


CODE_RUNNER = "code-runner-beta"


def _fixtures() -> Path:
    return Path(os.environ.get("WRENN_FIXTURES") or DEFAULT_FIXTURES)


def _template_cache(name: str) -> Path | None:
    """Where a recipe-built ``name`` is kept between server starts, keyed by
    its recipe (a changed recipe is built afresh): the contents of
    ``recipes/<name>.recipefile`` and ``.healthcheck``, then path and
    contents of any other ``recipes/<name>.*`` and of ``recipes/<name>/``.
    ``code-runner-beta`` lives under ``code-runner/``, the others under
    ``templates-cache/<name>/``. None without recipe files (never cached)."""
    recipes = REPO / "recipes"
    main = [p for p in (recipes / f"{name}.recipefile", recipes / f"{name}.healthcheck") if p.is_file()]
    extra = sorted(p for p in recipes.glob(f"{name}.*") if p.is_file() and p not in main)
    if (recipes / name).is_dir():
        extra += sorted(p for p in (recipes / name).rglob("*") if p.is_file())
    if not main and not extra:
        return None
    h = hashlib.sha256()
    for p in main:
        h.update(p.read_bytes())
    for p in extra:
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    key = h.hexdigest()[:16]
    if name == CODE_RUNNER:
        return _fixtures() / "code-runner" / key / name
    return _fixtures() / "templates-cache" / name / key / name


def _link_fixture_templates(data_dir: Path, cached: tuple[str, ...]) -> None:
    """Link the prebuilt ``minimal`` and the cached recipe-built templates
    named in ``cached`` (once a server built them) so servers need not build
    them again."""
    sources = [_fixtures() / "templates" / TEMPLATE]
    sources += [c for c in map(_template_cache, cached) if c is not None]
    for src in sources:
        if src.is_dir():
            (data_dir / "templates").mkdir(parents=True, exist_ok=True)
            os.symlink(src.resolve(), data_dir / "templates" / src.name)


def _keep_built_templates(data_dir: Path, cached: tuple[str, ...]) -> None:
    """Keep the templates named in ``cached`` that this server built (copied,
    then renamed into place, so the cache holds whole templates only)."""
    for name in cached:
        built = data_dir / "templates" / name
        cache = _template_cache(name)
        if cache is None or not built.is_dir() or built.is_symlink() or cache.exists():
            continue
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.parent / f".tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        if subprocess.run(["cp", "-a", str(built), str(tmp)]).returncode == 0:
            try:
                os.rename(tmp, cache)
            except OSError as exc:  # a suite beside this one kept it first
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        shutil.rmtree(tmp, ignore_errors=True)


def _fail_with_log(server: Server, message: str) -> None:
    pytest.fail(f"{message}\n--- server log ({server.log_path}) ---\n{server.log_tail()}", pytrace=False)


def runc_containers(instance: str) -> dict[str, str]:
    """``{container id: runc status}`` of the runc containers of ``wrenn up
    --instance <instance>`` (its agent runs ``runc --root=/run/<instance>/runc``)."""
    root = Path("/run") / instance / "runc"
    if not root.exists():
        return {}
    r = subprocess.run(
        ["runc", "--root", str(root), "list", "--format", "json"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, f"runc list: {r.returncode} {r.stderr}"
    return {c["id"]: c["status"] for c in (json.loads(r.stdout or "null") or [])}


def resolve_binaries(key_env: str = "WRENN_API_KEY") -> tuple[str, str]:
    """``(wrenn, envd)`` from ``WRENN_BIN``/``ENVD_BIN``, or fail the test
    (``key_env``: the variable that, with ``WRENN_BASE_URL``, names a running
    server's key instead)."""
    envd = os.environ.get("ENVD_BIN")
    if not envd:
        pytest.fail(
            "ENVD_BIN is not set: point it at the static envd binary "
            f"(or set WRENN_BASE_URL and {key_env} to use a running server)",
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
    return binary, envd


# Names and pools handed out in this process (never twice).
_TAKEN_INSTANCES: set[str] = set()
_TAKEN_POOLS: list[ipaddress.IPv4Network] = []
_RNG = random.SystemRandom()  # independent of any seeding a test does


def unique_instance() -> str:
    """A fresh ``--instance``: ``w`` + 5 of [a-z0-9], unused on this host
    (no ``/run/<name>``, no netns, link or nft table of that prefix), so a
    run never shares host objects with a real ``wrenn up`` (``wrenn``) or
    another run."""
    alphabet = string.ascii_lowercase + string.digits
    for _ in range(1000):
        name = "w" + "".join(_RNG.choice(alphabet) for _ in range(5))
        if name in _TAKEN_INSTANCES or Path("/run", name).exists():
            continue
        prefix = f"{name}-"
        busy = any(
            n.startswith(prefix)
            for d in ("/run/netns", "/sys/class/net")
            for n in (os.listdir(d) if os.path.isdir(d) else [])
        )
        if busy or _nft_table_exists(name):
            continue
        _TAKEN_INSTANCES.add(name)
        return name
    raise AssertionError("no free instance name")


def _host_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks on this host's addresses and routes."""
    nets: list[ipaddress.IPv4Network] = []
    for cmd in (["ip", "-o", "-4", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for tok in re.findall(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)\b", out):
            try:
                nets.append(ipaddress.IPv4Network(tok, strict=False))
            except ValueError:
                pass
    return nets


def _pool_octets() -> tuple[int, int]:
    """The second octets ``unique_pool`` draws from: 120–199, or the
    ``LOW-HIGH`` inside it that ``WRENN_TEST_POOLS`` names (suites run side
    by side get ranges of their own: a pool the other run has just drawn
    shows in no route until its first capsule starts)."""
    spec = os.environ.get("WRENN_TEST_POOLS", "120-199")
    m = re.fullmatch(r"(\d+)-(\d+)", spec)
    assert m and 120 <= int(m[1]) <= int(m[2]) <= 199, f"WRENN_TEST_POOLS={spec!r}: want LOW-HIGH in 120-199"
    return int(m[1]), int(m[2])


def unique_pool() -> str:
    """A fresh ``--pool``: a random ``10.{120..199}.{0..255}.0/24`` (64
    capsules; ``_pool_octets`` narrows the second octet) that overlaps
    neither this host's addresses and routes (a running wrenn's capsules
    show there) nor the default ``10.88.0.0/16`` nor any pool handed out
    before in this process."""
    taken = _host_networks() + _TAKEN_POOLS + [ipaddress.IPv4Network("10.88.0.0/16")]
    low, high = _pool_octets()
    for _ in range(1000):
        net = ipaddress.IPv4Network(f"10.{_RNG.randint(low, high)}.{_RNG.randint(0, 255)}.0/24")
        if any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            continue
        _TAKEN_POOLS.append(net)
        return str(net)
    raise AssertionError("no free address pool")


def _nft_table_exists(name: str) -> bool:
    try:
        r = subprocess.run(["nft", "list", "table", "inet", name], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _run_quiet(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _up_has_flag(binary: str, flag: str) -> bool:
    """Whether ``binary up --help`` lists ``flag``."""
    r = _run_quiet([binary, "up", "--help"])
    return r is not None and r.returncode == 0 and re.search(rf"(^|\s){re.escape(flag)}\b", r.stdout) is not None


def _file_id(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


# Exec failures worth retrying: the binary is being rebuilt under us.
_RETRY_EXEC = {errno.ETXTBSY, errno.ENOEXEC, errno.ENOENT}
_EXEC_RETRY_FOR = 120.0
_ADDR_IN_USE = re.compile(r"listen on .*(in use|EADDRINUSE)", re.IGNORECASE)


class WrennUp:
    """One ``wrenn up`` on one data dir, that a test can start, SIGKILL and
    start again on the same data dir — always with the same ``--instance``
    and ``--pool`` (unique to this object) and, when it is free, the same
    port, so clients made before a restart still reach it::

        up = WrennUp.fresh(say=sayer(request))   # new data dir under /var/tmp
        server = up.start()                      # /health 200, admin key read
        up.kill()                                # SIGKILL the process (a crash)
        server = up.start()                      # again: same dir, instance, pool
        up.stop()                                # SIGTERM
        up.close(keep_log=False)                 # purge host objects, remove dir

    ``server`` is one ``Server`` object updated in place by each start.
    stdout and stderr of every start are appended to ``D/server.log``,
    with ``=== <label> …`` lines marking starts, kills and stops.

    Each suite's conftest subclasses it, setting the class attributes
    below (what differs between the suites).
    """

    #: names the suite in log marks, messages, data dirs and kept logs
    label = "wrenn-up"
    #: the variable that, with ``WRENN_BASE_URL``, names a running server's
    #: key (in the hint when ``ENVD_BIN`` is missing)
    key_env = "WRENN_API_KEY"
    #: also read the admin team's E2B key (``D/admin-e2b-api-key``) into
    #: ``Server.e2b_api_key`` on each start
    e2b_key = False
    #: recipe-built templates linked from, and kept in, the fixture cache
    cached_templates: tuple[str, ...] = (CODE_RUNNER,)

    def __init__(
        self,
        data_dir: Path,
        *,
        binary: str,
        envd: str,
        database_url: str | None = None,
        instance: str | None = None,
        pool: str | None = None,
        extra_args: list[str] | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.binary, self.envd, self.database_url = binary, envd, database_url
        self.extra_args = list(extra_args or [])
        self.instance = instance or unique_instance()
        self.pool = pool or unique_pool()
        self.say = say or (lambda m: print(m, file=sys.stderr, flush=True))
        self.log_path = self.data_dir / "server.log"
        self.server = Server(
            base_url="", api_key="", data_dir=self.data_dir, log_path=self.log_path,
            instance=self.instance, pool=self.pool,
        )
        self.starts = 0
        self._port: int | None = None
        self._log = None
        self._lock = threading.Lock()

    @classmethod
    def fresh(
        cls,
        *,
        prefix: str | None = None,
        database_url: str | None = None,
        code_runner: bool = True,
        say: Callable[[str], None] | None = None,
    ) -> "WrennUp":
        """A new data dir under /var/tmp (named ``prefix``…, by default
        ``<label>-``…) with the fixture templates linked in.
        ``code_runner=False``: pass ``--no-code-runner`` and
        ``--no-code-interpreter`` (when the binary has them), so no template
        build runs capsules in the background; a suite that does not keep
        ``code-interpreter-v1`` (``cached_templates``) does not build it."""
        binary, envd = resolve_binaries(cls.key_env)
        skip = []
        if not code_runner:
            skip.append("--no-code-runner")
        if not code_runner or "code-interpreter-v1" not in cls.cached_templates:
            skip.append("--no-code-interpreter")
        extra = [flag for flag in skip if _up_has_flag(binary, flag)]
        data_dir = Path(tempfile.mkdtemp(prefix=prefix or f"{cls.label}-", dir="/var/tmp"))
        _link_fixture_templates(data_dir, cls.cached_templates)
        return cls(data_dir, binary=binary, envd=envd, database_url=database_url,
                   extra_args=extra, say=say)

    # ---- process ---------------------------------------------------------

    @property
    def process(self) -> subprocess.Popen | None:
        return self.server.process

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def mark(self, text: str) -> None:
        """A ``=== <label> HH:MM:SS: text`` line in the server log."""
        if self._log is None:
            self._log = open(self.log_path, "ab")
        with self._lock:
            self._log.write(f"\n=== {self.label} {time.strftime('%H:%M:%S')}: {text}\n".encode())
            self._log.flush()

    def command(self, listen: str) -> list[str]:
        cmd = [
            self.binary, "up", "--data-dir", str(self.data_dir), "--listen", listen,
            "--envd", self.envd, "--instance", self.instance, "--pool", self.pool,
        ]
        if self.database_url:
            cmd += ["--database-url", self.database_url]
        return cmd + self.extra_args

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        deadline = time.monotonic() + _EXEC_RETRY_FOR
        while True:
            try:
                return subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,  # a ^C to pytest reaches us, not the server
                )
            except OSError as exc:
                if exc.errno not in _RETRY_EXEC or time.monotonic() > deadline:
                    raise
                self.mark(f"cannot exec {cmd[0]} ({exc}); retrying (being rebuilt?)")
                time.sleep(2)

    def start(self, *, listen: str | None = None, ready_timeout: float = READY_TIMEOUT) -> Server:
        """Start (or start again) and wait until ``/health`` answers 200."""
        assert not self.running, "wrenn up is already running"
        srv = self.server
        same_port = listen is None and self._port is not None
        if listen is None:
            listen = f"127.0.0.1:{self._port}" if self._port else "127.0.0.1:0"
        # A just-freed port can be briefly busy, and the binary can be rebuilt
        # under us: retry those (only those) a few times.
        for attempt in range(8):
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            before = _file_id(self.binary)
            if self._listen_once(listen, ready_timeout):
                break
            text = self.log_path.read_bytes()[log_offset:].decode(errors="replace")
            busy = bool(_ADDR_IN_USE.search(text))
            rebuilt = _file_id(self.binary) != before
            if attempt == 7 or not (busy or rebuilt):
                _fail_with_log(srv, f"wrenn up exited with {srv.process.returncode} "
                                    f"before listening: {self.command(listen)}")
            self.mark(f"exited before listening ({'port busy' if busy else 'binary rebuilt'}); retrying")
            if busy and same_port and attempt >= 4:
                self.mark(f"port {self._port} stays busy: falling back to port 0")
                listen = "127.0.0.1:0"
            time.sleep(1.5)
        self.starts += 1
        self._port = srv.port
        return srv

    def _listen_once(self, listen: str, ready_timeout: float) -> bool:
        """One start; False if the process exited before listening (retry)."""
        srv = self.server
        cmd = self.command(listen)
        self.mark(f"start #{self.starts + 1}: {' '.join(cmd)}")
        proc = self._spawn(cmd)
        self.mark(f"pid {proc.pid}")
        srv.process = proc
        srv._threads = []
        bound = threading.Event()
        url: list[str] = []

        def on_stdout(line: str) -> None:
            if not bound.is_set():
                m = LISTEN_LINE.search(line)
                if m:
                    url.append(m.group(1).rstrip("/"))
                    bound.set()

        for stream, cb in ((proc.stdout, on_stdout), (proc.stderr, None)):
            t = threading.Thread(target=_pump, args=(stream, self._log, self._lock, cb), daemon=True)
            t.start()
            srv._threads.append(t)

        try:
            deadline = time.monotonic() + LISTEN_TIMEOUT
            while not bound.wait(0.2):
                if proc.poll() is not None:
                    self._join_pumps()
                    return False
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
                    if now - started > ready_timeout:
                        _fail_with_log(srv, f"/health not 200 within {ready_timeout:.0f}s; last: {last}")
                    if now - last_report > 30:
                        last_report = now
                        self.say(f"[{self.label}] waiting for {srv.base_url}/health "
                                 f"({now - started:.0f}s): {last}")
                    time.sleep(0.5)

            srv.api_key = self._read_key(
                "admin-api-key", "the admin key", lambda k: k.startswith("wrn_"), srv.api_key
            )
            if self.e2b_key:
                srv.e2b_api_key = self._read_key(
                    "admin-e2b-api-key", "the E2B key",
                    lambda k: re.fullmatch(r"e2b_[0-9a-f]{40}", k) is not None, srv.e2b_api_key,
                )
        except BaseException:
            self.stop()
            raise
        self.mark(f"ready on {srv.base_url}")
        return True

    def _read_key(self, name: str, what: str, looks_right: Callable[[str], bool], before: str) -> str:
        """The key in ``D/name`` (mode 0600); the same as ``before``, if set
        (a restart keeps the keys)."""
        path = self.data_dir / name
        assert path.is_file(), f"{path} missing"
        mode = path.stat().st_mode & 0o777
        assert mode == 0o600, f"{path} has mode {oct(mode)}, want 0o600"
        key = path.read_text().strip()
        assert looks_right(key), f"{what} looks wrong: {key[:8]}…"
        if before:
            assert key == before, f"{what} changed across a restart"
        return key

    def _join_pumps(self) -> None:
        for t in self.server._threads:
            t.join(5)

    def kill(self) -> int | None:
        """SIGKILL the server process only, like a crash: its children (a
        runtime CLI mid-call) and the capsules live on."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            self.mark(f"SIGKILL pid {proc.pid}")
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        self._join_pumps()
        return proc.returncode

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM and wait (SIGKILL to its process group after ``timeout``)."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            self.mark(f"SIGTERM pid {proc.pid}")
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.mark(f"still running {timeout:.0f}s after SIGTERM: SIGKILL")
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: see Popen
                except ProcessLookupError:
                    pass
                proc.wait(10)
            self.mark(f"exited with {proc.returncode}")
        self._join_pumps()
        return proc.returncode

    # ---- host objects ------------------------------------------------------

    @property
    def runc_root(self) -> Path:
        """The agent runs ``runc --root=/run/<instance>/runc``."""
        return Path("/run") / self.instance / "runc"

    def runc_containers(self) -> dict[str, str]:
        """``{container id: runc status}`` under this instance's runc root
        (containers are named by capsule ID)."""
        return runc_containers(self.instance)

    def capsule_objects(self) -> dict[str, list[str]]:
        """What capsules hold on the host: runc containers, network
        namespaces and links of this instance, mounts under the data dir
        (empty once every capsule is destroyed)."""
        prefix = f"{self.instance}-"

        def named(d: str) -> list[str]:
            return sorted(n for n in (os.listdir(d) if os.path.isdir(d) else []) if n.startswith(prefix))

        try:
            runc = sorted(self.runc_containers())
        except (AssertionError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
            runc = [f"(runc list failed: {exc})"]
        out = {
            "runc": runc,
            "netns": named("/run/netns"),
            "links": named("/sys/class/net"),
            "mounts": _mounts_under(self.data_dir),
        }
        return {k: v for k, v in out.items() if v}

    def _cgroup_dirs(self) -> list[Path]:
        root = Path("/sys/fs/cgroup")
        dirs = [root / self.instance] + [d / self.instance for d in root.iterdir() if d.is_dir()]
        return [d for d in dirs if d.is_dir()]

    def host_objects(self) -> dict[str, list[str]]:
        """Everything of this instance on the host, including what a stopped
        ``wrenn up`` leaves by design (its nft table, ``/run/<instance>``,
        parent cgroups)."""
        out = self.capsule_objects()
        if _nft_table_exists(self.instance):
            out["nft"] = [f"inet {self.instance}"]
        if Path("/run", self.instance).exists():
            out["run"] = [f"/run/{self.instance}"]
        cg = [str(d) for d in self._cgroup_dirs()]
        if cg:
            out["cgroups"] = cg
        return out

    def purge(self) -> dict[str, list[str]]:
        """Remove every host object of this instance (the server must be
        stopped); returns what was there."""
        assert not self.running, "purge needs the server stopped"
        found = self.host_objects()
        root = str(self.runc_root)
        for cid in found.get("runc", []):
            if cid.startswith("("):
                continue
            _run_quiet(["runc", "--root", root, "kill", cid, "KILL"])
            _run_quiet(["runc", "--root", root, "delete", "--force", cid])
        for mp in sorted(_mounts_under(self.data_dir), key=lambda m: m.count("/"), reverse=True):
            _run_quiet(["umount", "-l", mp])
        for ns in found.get("netns", []):
            _run_quiet(["ip", "netns", "delete", ns])
        for link in self.capsule_objects().get("links", []):
            _run_quiet(["ip", "link", "delete", link])
        if "nft" in found:
            _run_quiet(["nft", "delete", "table", "inet", self.instance])
        for top in self._cgroup_dirs():
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
            try:
                os.rmdir(top)
            except OSError:
                pass
        shutil.rmtree(Path("/run", self.instance), ignore_errors=True)
        return found

    # ---- the end -----------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def serving(cls, request, *, failed_attr: str, extra_args: list[str] = (),
                **fresh) -> Iterator["WrennUp"]:
        """A session's server: ``fresh(**fresh)``, started (its log kept if
        it does not start), then ``finish`` — keeping the log when the
        session's ``failed_attr`` flag says a test failed."""
        up = cls.fresh(say=sayer(request), **fresh)
        up.extra_args += list(extra_args)
        try:
            up.start()
        except BaseException:
            up.close(keep_log=True)
            raise
        try:
            yield up
        finally:
            up.finish(failed=getattr(request.session, failed_attr, False))

    def finish(self, *, failed: bool) -> None:
        """The end of a session's server: SIGTERM, then ``close`` (keeping
        the log if ``failed`` or the exit was not clean), with a warning for
        an unclean exit and for capsules that outlived the session."""
        code = self.stop()
        if code not in (0, None):
            self.say(f"[{self.label}] WARNING: wrenn up exited with {code} on SIGTERM")
        leaks = self.close(keep_log=failed or code not in (0, None))
        if leaks:
            self.say(f"[{self.label}] WARNING: capsules outlived the session (purged): {leaks}")

    def close(self, *, keep_log: bool) -> dict[str, list[str]]:
        """Stop the server if it runs, keep the log (and print its tail) if
        asked, purge this instance's host objects and remove the data dir
        (both kept with ``WRENN_KEEP_DATA_DIR``). Returns the capsule
        objects (``capsule_objects``) that were still there: leaks, if the
        caller destroyed every capsule."""
        self.stop()
        leaks = self.capsule_objects()
        if self._log is not None:
            self._log.close()
            self._log = None
        if keep_log:
            keep = Path("/var/tmp") / (
                f"{self.label}-server-{time.strftime('%Y%m%d-%H%M%S')}-{self.instance}.log"
            )
            try:
                shutil.copyfile(self.log_path, keep)
            except OSError:
                keep = self.log_path
            self.say(f"[{self.label}] server log kept at {keep}; tail:\n{self.server.log_tail(200)}")
        if os.environ.get("WRENN_KEEP_DATA_DIR"):
            self.say(f"[{self.label}] data dir kept: {self.data_dir} "
                     f"(--instance {self.instance} --pool {self.pool}); host objects: "
                     f"{self.host_objects()}")
            return leaks
        self.purge()
        _keep_built_templates(self.data_dir, self.cached_templates)
        mounts = _mounts_under(self.data_dir)
        if mounts:
            self.say(f"[{self.label}] NOT removing {self.data_dir}: still mounted: {mounts[:5]}")
            return leaks
        shutil.rmtree(self.data_dir, ignore_errors=True)
        return leaks

