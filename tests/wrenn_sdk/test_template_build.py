"""``wrenn template build FILE``: a recipe run in a capsule becomes a
platform template; capsules made from it have its files, its default user
(the last ``USER``) and its ``START`` command running. Bad recipes and bad
keys fail with a clear message and a non-zero exit."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import wrenn_up
from wrennsdk_support import poll, sleep_marker, sleepers, start_build_raw
from wrenn import Capsule

RECIPE = """\
# a comment, and a blank line

ENV GREETING=hello
USER dev
WORKDIR /home/dev/app
RUN echo "$GREETING from $(whoami)" > note.txt
START python3 -m http.server 8099
"""


def wrenn(server, *args: str, key: str | None = None) -> subprocess.CompletedProcess:
    binary, _ = wrenn_up.resolve_binaries()
    return subprocess.run(
        [binary, "template", *args, "--base-url", server.base_url, "--api-key", key or server.api_key],
        capture_output=True, text=True, timeout=600,
    )


def build_ok(server, tmp_path: Path, prefix: str, text: str, name: str | None = None) -> str:
    """Build ``text`` (a recipe written to ``tmp_path``, whose files are its
    context) as a new template named ``prefix-…`` (or ``name``); its name."""
    recipe = tmp_path / f"{prefix}.recipefile"
    recipe.write_text(text)
    name = name or f"{prefix}-{uuid.uuid4().hex[:8]}"
    r = wrenn(server, "build", str(recipe), "--name", name)
    assert r.returncode == 0, r.stderr
    return name


def test_build_a_template_and_boot_it(server, tmp_path: Path) -> None:
    name = f"tpl-{uuid.uuid4().hex[:8]}"
    recipe = tmp_path / "app.recipefile"
    recipe.write_text(RECIPE)
    (tmp_path / "app.healthcheck").write_text("--interval=1s --timeout=60s curl -sf http://127.0.0.1:8099/\n")
    r = wrenn(server, "build", str(recipe), "--name", name)
    assert r.returncode == 0, r.stderr
    assert f"built template {name}" in r.stdout and "healthcheck" in r.stdout, r.stdout

    with server.http() as h:
        listed = {t["name"]: t for t in h.get("/v1/snapshots", params={"type": "base"}).json()}
    assert listed[name]["platform"] is True

    with Capsule(template=name, api_key=server.api_key, base_url=server.base_url) as c:
        assert c.commands.run("cat /home/dev/app/note.txt").stdout == "hello from dev\n"
        assert c.commands.run("whoami").stdout == "dev\n"
        # START runs when a capsule boots
        deadline = time.monotonic() + 30
        while c.commands.run("curl -sf -o /dev/null http://127.0.0.1:8099/ && echo up").stdout != "up\n":
            assert time.monotonic() < deadline, "the START command is not serving"
            time.sleep(0.5)

    # the name is taken now
    r = wrenn(server, "build", str(recipe), "--name", name)
    assert r.returncode == 1 and "exists" in r.stderr, r.stderr


def test_bad_recipes_and_keys_fail_clearly(server, tmp_path: Path) -> None:
    bad = tmp_path / "bad.recipefile"
    bad.write_text("RUN true\nFROM debian\n")
    r = wrenn(server, "build", str(bad))
    assert r.returncode == 1 and "line 2" in r.stderr, r.stderr

    failing = tmp_path / "failing.recipefile"
    failing.write_text("RUN echo before\nRUN exit 3\n")
    r = wrenn(server, "build", str(failing), "--name", f"fail-{uuid.uuid4().hex[:6]}")
    assert r.returncode == 1 and "step 2" in r.stderr and "exit 3" in r.stderr, r.stderr

    ok = tmp_path / "ok.recipefile"
    ok.write_text("RUN true\n")
    r = wrenn(server, "build", str(ok), key="wrn_" + "0" * 32)
    assert r.returncode == 1 and "unauthorized" in r.stderr, r.stderr


def test_only_the_admin_team_builds(server, team_b, tmp_path: Path) -> None:
    ok = tmp_path / "ok.recipefile"
    ok.write_text("RUN true\n")
    r = wrenn(server, "build", str(ok), key=team_b.api_key)
    assert r.returncode == 1 and "forbidden" in r.stderr, r.stderr


def test_copy_sends_the_build_context(server, tmp_path: Path) -> None:
    """``COPY`` over HTTP: ``wrenn template build`` archives what the recipe
    copies (from the recipe's directory) and the control plane unpacks it
    for the build; files, nested directories and binary bytes arrive as they
    were, owned by the ``USER`` of the step."""
    blob = bytes(range(256)) * 64
    (tmp_path / "app" / "sub").mkdir(parents=True)
    (tmp_path / "app" / "hello.txt").write_text("hello from the context\n")
    (tmp_path / "app" / "sub" / "blob.bin").write_bytes(blob)
    (tmp_path / "motd").write_text("copied alone\n")
    (tmp_path / "not-copied").write_text("stays here\n")
    name = build_ok(server, tmp_path, "copy",
                    "USER dev\nWORKDIR /home/dev\nCOPY app /opt/app\nCOPY motd motd.txt\n")
    try:
        with Capsule(template=name, api_key=server.api_key, base_url=server.base_url) as c:
            assert c.commands.run("cat /opt/app/hello.txt").stdout == "hello from the context\n"
            assert c.files.read_bytes("/opt/app/sub/blob.bin") == blob
            assert c.commands.run("cat /home/dev/motd.txt").stdout == "copied alone\n"
            assert c.commands.run("stat -c %U /opt/app/sub/blob.bin").stdout == "dev\n"
            assert c.commands.run("ls /opt/app").stdout.split() == ["hello.txt", "sub"]
    finally:
        with server.http() as h:
            h.delete(f"/v1/snapshots/{name}")

    # a COPY whose source is not there fails before anything is sent
    missing = tmp_path / "missing.recipefile"
    missing.write_text("COPY nothing-here /x\n")
    r = wrenn(server, "build", str(missing), "--name", f"miss-{uuid.uuid4().hex[:6]}")
    assert r.returncode == 1 and "nothing-here" in r.stderr, r.stderr


def test_build_contexts_are_checked(server) -> None:
    """The route takes a context only as a tar of files and directories
    inside it; JSON alone cannot COPY."""
    import io
    import tarfile

    def form(archive: bytes) -> dict:
        build = '{"name": "ctx-%s", "recipe": "COPY a /a"}' % uuid.uuid4().hex[:6]
        return {"config": ("build.json", build, "application/json"),
                "archive": ("context.tar", archive, "application/x-tar")}

    def tar_of(*members: tarfile.TarInfo) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for m in members:
                t.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
        return buf.getvalue()

    def member(name: str, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        m = tarfile.TarInfo(name)
        m.type = kind
        m.size = 1 if kind == tarfile.REGTYPE else 0
        if kind == tarfile.SYMTYPE:
            m.linkname = "/etc/shadow"
        return m

    with server.http() as h:
        r = h.post("/v1/admin/builds", json={"name": "ctx-none", "recipe": "COPY a /a"})
        assert r.status_code == 400 and "context" in r.json()["error"]["message"], r.text
        for bad, why in [
            (tar_of(member("../escape")), "inside the archive"),
            (tar_of(member("a", tarfile.SYMTYPE)), "only regular files"),
            (b"not a tar archive at all" * 40, "build context"),
        ]:
            r = h.post("/v1/admin/builds", files=form(bad))
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "invalid_request", r.text
            assert why in r.json()["error"]["message"], r.text
        r = h.post("/v1/admin/builds", files={"archive": ("c.tar", tar_of(member("a")), "application/x-tar")})
        assert r.status_code == 400 and "config part is missing" in r.text, r.text


STEPS_RECIPE = """\
USER nobody
RUN test "$(pwd)" = / && test "$HOME" = /nonexistent
USER root
WORKDIR /opt
WORKDIR app
RUN test "$(pwd)" = /opt/app && touch made-here
USER dev
WORKDIR /srv/data
RUN touch ok && test "$(pwd)" = /srv/data
WORKDIR /tmp
RUN test "$(stat -c %U /tmp)" = root
USER nobody
"""


def test_steps_follow_passwd_and_the_workdir(server, tmp_path: Path) -> None:
    """``USER`` of an existing system user takes its home from /etc/passwd
    (``nobody``: /nonexistent, so it works in /); a relative ``WORKDIR`` is
    taken from the one before; a ``WORKDIR`` made after ``USER`` is made by
    root and given to the user, and an existing one is left as it was. A
    capsule whose default user has no home starts its commands in /."""
    name = build_ok(server, tmp_path, "steps", STEPS_RECIPE)
    try:
        with Capsule(template=name, api_key=server.api_key, base_url=server.base_url) as c:
            assert c.commands.run("whoami; pwd").stdout == "nobody\n/\n"
            assert c.commands.run("ls /opt/app").stdout == "made-here\n"
            assert c.commands.run("stat -c %U /srv/data /srv/data/ok /tmp").stdout == "dev\ndev\nroot\n"
    finally:
        with server.http() as h:
            h.delete(f"/v1/snapshots/{name}")


def test_a_step_whose_workdir_is_gone_fails(server, tmp_path: Path) -> None:
    """A ``RUN`` never runs elsewhere than its ``WORKDIR``: when the
    directory cannot be entered the step fails."""
    recipe = tmp_path / "gone.recipefile"
    recipe.write_text("WORKDIR /work-gone\nRUN rmdir /work-gone\nRUN touch /tmp/ran\n")
    r = wrenn(server, "build", str(recipe), "--name", f"gone-{uuid.uuid4().hex[:6]}")
    assert r.returncode == 1 and "step 3" in r.stderr and "/work-gone" in r.stderr, r.stderr


def envd_above(pid: int) -> int:
    """The PID of the envd that ``pid`` runs under (its nearest ancestor
    named ``envd``)."""
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
        if comm == "envd":
            return pid
        pid = int(rest.split()[1])
    raise AssertionError("no envd above the process")


def test_a_build_whose_envd_dies_fails_as_the_build_not_its_host(server) -> None:
    """A build whose capsule loses envd (as a step that runs it out of
    memory could make it) fails as the build, 400, not as its host's 503
    ``host_unavailable``: the agent still answers, though it says
    ``unavailable`` for the envd it cannot reach. Here envd dies while the
    healthcheck is tried: each try fails until the healthcheck's time is
    up."""
    name = f"downed-{uuid.uuid4().hex[:6]}"
    marker = sleep_marker()
    answer: dict[str, Any] = {}

    def build() -> None:
        with server.http() as b:
            answer["r"] = b.post("/v1/admin/builds", timeout=300, json={
                "name": name, "base_template": "busybox", "recipe": [f"START sleep {marker}"],
                "healthcheck": "--interval=1s --timeout=15s false"})

    builder = threading.Thread(target=build, daemon=True)
    builder.start()
    (sleeper,) = poll(lambda: sleepers(marker), 120, what="the build's START")
    os.kill(envd_above(sleeper), signal.SIGKILL)
    builder.join(120)
    r = answer["r"]
    assert r.status_code == 400, r.text
    assert "healthcheck did not pass" in r.json()["error"]["message"], r.text
    with server.http() as h:
        assert name not in {t["name"] for t in h.get("/v1/admin/templates").json()}
    poll(lambda: not sleepers(marker), 30, what="the START's process to go")


def test_a_build_cut_off_by_its_client_leaves_nothing(server) -> None:
    """A build whose client hangs up stops: its capsule is destroyed at
    once, not left running (counted against the host) for good. While it
    runs, a second build of its name is refused at once (409)."""
    name = f"cut-{uuid.uuid4().hex[:8]}"
    marker = sleep_marker()
    before = set(wrenn_up.runc_containers(server.instance))
    s = start_build_raw(server.base_url, server.api_key, {"name": name, "recipe": [f"RUN sleep {marker}"]})
    try:
        poll(lambda: sleepers(marker), 120, what="the build's RUN step")
        built = set(wrenn_up.runc_containers(server.instance)) - before
        assert len(built) == 1, built
        with server.http() as h:
            r = h.post("/v1/admin/builds", json={"name": name, "recipe": ["RUN true"]})
        assert r.status_code == 409 and "being built" in r.json()["error"]["message"], r.text
    finally:
        s.close()
    poll(lambda: not (built & set(wrenn_up.runc_containers(server.instance))) and not sleepers(marker),
         5, what="the cut-off build's capsule to go (at once, not by the reconciler)")
    if server.log_path:  # (said so: the reconciler's round could have come first)
        assert "build cut off: destroying its capsule" in server.log_path.read_text(errors="replace")
    with server.http() as h:
        assert name not in {t["name"] for t in h.get("/v1/snapshots", params={"type": "base"}).json()}
        r = h.post("/v1/admin/builds", json={"name": "minimal-ubuntu", "recipe": ["RUN true"]})
        assert r.status_code == 409 and "reserved" in r.text, r.text

    # hung up on while its capsule is being made: the launch ends, then
    # the capsule goes
    for delay in (0.05, 0.15, 0.3):
        s = start_build_raw(server.base_url, server.api_key, {"name": name, "recipe": [f"RUN sleep {marker}"]})
        time.sleep(delay)
        s.close()
        poll(lambda: not (set(wrenn_up.runc_containers(server.instance)) - before), 10,
             what=f"the build capsule cut off {delay}s in to go")



def test_platform_templates_are_deleted_by_the_admin(server, team_b, tmp_path: Path) -> None:
    """``DELETE /v1/admin/templates/{name}``: the admin team deletes a
    template built from a recipe, with its files on the host, so the name
    builds again from scratch; not while a capsule uses it (409), not the
    built-in ones (403), not with another team's key (403)."""
    name = build_ok(server, tmp_path, "plat", "RUN echo one > /version\n")
    path = f"/v1/admin/templates/{name}"
    with server.http() as h, server.http(api_key=team_b.api_key) as other:
        assert name in {t["name"] for t in h.get("/v1/admin/templates").json()}
        r = h.delete(f"/v1/snapshots/{name}")
        assert r.status_code == 403 and path in r.json()["error"]["message"], r.text
        assert other.delete(path).status_code == 403
        assert other.get("/v1/admin/templates").status_code == 403
        # wrenn up's own, built from recipes too (`base`) or not: protected
        platform = {t["name"]: t for t in h.get("/v1/admin/templates").json()}
        for builtin in ("minimal", "base"):
            assert platform[builtin]["protected"] is True
            r = h.delete(f"/v1/admin/templates/{builtin}")
            assert r.status_code == 403 and "built in" in r.text, r.text
        assert platform[name]["protected"] is False

        with Capsule(template=name, api_key=server.api_key, base_url=server.base_url) as c:
            assert c.commands.run("cat /version").stdout == "one\n"
            r = h.delete(path)
            assert r.status_code == 409 and "used by" in r.json()["error"]["message"], r.text
        r = h.delete(path)
        assert r.status_code == 204, r.text
        assert name not in {t["name"] for t in h.get("/v1/admin/templates").json()}
        assert h.delete(path).status_code == 404

        build_ok(server, tmp_path, "plat", "RUN test ! -e /version && echo two > /version\n", name)
        try:
            with Capsule(template=name, api_key=server.api_key, base_url=server.base_url) as c:
                assert c.commands.run("cat /version").stdout == "two\n"
        finally:
            assert h.delete(path).status_code == 204
