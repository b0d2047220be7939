"""Every ``wrenn`` subcommand against ``wrenn up``, and the failing paths:
no server, a bad key, no key, an unknown capsule."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ID = re.compile(r"^cl-[0-9a-z]{25}$")


def test_completions(cli) -> None:
    for shell, needle in (("bash", "_wrenn"), ("zsh", "#compdef wrenn"), ("fish", "complete -c wrenn")):
        assert needle in cli.out("completions", shell), shell


# ---- failing paths ------------------------------------------------------------


def test_no_server(cli) -> None:
    r = cli.run("ls", check=False, WRENN_BASE_URL="http://127.0.0.1:9")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "cannot reach wrenn at http://127.0.0.1:9" in err and "wrenn up" in err, err
    assert err.count("\n") == 1, err  # one line, no backtrace


def test_bad_key(cli) -> None:
    r = cli.run("ls", check=False, WRENN_API_KEY="wrn_" + "0" * 32)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "invalid API key" in err and "wrenn login" in err, err


def test_no_key(cli, tmp_path: Path) -> None:
    r = cli.run("ls", check=False, WRENN_API_KEY=None, WRENN_CONFIG=str(tmp_path / "none.json"))
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "no API key" in err and "wrenn login" in err, err


def test_unknown_capsule(cli) -> None:
    unknown = "cl-" + "0" * 25
    for args in (("kill", unknown), ("exec", unknown, "--", "true"), ("url", unknown, "80"),
                 ("cp", "/etc/hostname", f"{unknown}:/tmp/x"), ("shell", unknown)):
        r = cli.run(*args, check=False)
        assert r.returncode == 1, args
        err = r.stderr.decode()
        assert "not found" in err, (args, err)
    # each with a hint that fits (a stream's refusal is in band, not a status)
    for args in (("kill", unknown), ("exec", unknown, "--", "true")):
        err = cli.run(*args, check=False).stderr.decode()
        assert "wrenn ls" in err and "unexpected answer" not in err, (args, err)
    err = cli.run("create", "-t", "no-such-template", check=False).stderr.decode()
    assert "wrenn template ls" in err, err


def test_bad_arguments(cli) -> None:
    r = cli.run("create", "--env", "NOEQUALS", check=False)
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr.decode()
    r = cli.run("cp", "/etc/hostname", "/tmp/x", check=False)
    assert r.returncode == 1 and "ID:/path" in r.stderr.decode()
    r = cli.run("url", "cl-" + "0" * 25, "0", check=False)  # ports are 1-65535
    assert r.returncode == 2 and "0" in r.stderr.decode(), r.stderr


# ---- capsules -----------------------------------------------------------------


def test_create_ls_exec(cli, capsule: str) -> None:
    assert ID.match(capsule), capsule
    table = cli.out("ls")
    assert table.splitlines()[0].split()[:3] == ["ID", "STATUS", "TEMPLATE"]
    row = next(line for line in table.splitlines() if line.startswith(capsule))
    assert row.split()[1:3] == ["running", "minimal"]
    listed = {c["id"]: c for c in json.loads(cli.out("ls", "--json"))}
    assert listed[capsule]["metadata"]["suite"] == "cli"

    r = cli.run("exec", capsule, "--", "sh", "-c", "echo out:$FROM_CLI; echo err >&2; exit 3", check=False)
    assert r.returncode == 3
    assert r.stdout.decode() == "out:yes\n" and r.stderr.decode() == "err\n"
    r = cli.run("exec", "-e", "A=1", "-w", "/tmp", capsule, "--", "sh", "-c", "echo $A $(pwd)")
    assert r.stdout.decode() == "1 /tmp\n"
    # killed by a signal: no exit code (the API does not say which signal)
    r = cli.run("exec", capsule, "--", "sh", "-c", "kill -9 $$", check=False)
    assert r.returncode == 255 and "killed by a signal" in r.stderr.decode()
    # output streams as it comes, not at the end
    t0 = time.monotonic()
    r = cli.run("exec", capsule, "--", "sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.2; done")
    assert r.stdout.decode() == "1\n2\n3\n" and time.monotonic() - t0 < 30


def _internet_set(server) -> str:
    """The addresses the agent's firewall lets out to the internet."""
    r = subprocess.run(["nft", "list", "set", "inet", server.instance, "internet"],
                       capture_output=True, text=True, check=True)
    return r.stdout


def _address(cli, cid: str) -> str:
    out = cli.out("exec", cid, "--", "ip", "-4", "-o", "addr", "show", "eth0")
    return re.search(r"inet (\d+\.\d+\.\d+\.\d+)", out).group(1)


def test_create_options(cli, server) -> None:
    c = json.loads(cli.out("create", "--json", "--template", "busybox", "--cpu", "2", "--memory", "256",
                           "--timeout", "600", "--no-internet"))
    open_ = cli.out("create", "--template", "busybox").strip()
    try:
        assert (c["template"], c["vcpus"], c["memory_mb"], c["timeout_sec"]) == ("busybox", 2, 256, 600)
        assert cli.out("exec", c["id"], "--", "echo", "busybox") == "busybox\n"
        # --no-internet reaches the firewall: only the other capsule may go out
        allowed = _internet_set(server)
        assert re.search(rf"\b{re.escape(_address(cli, open_))}\b", allowed), allowed
        assert not re.search(rf"\b{re.escape(_address(cli, c['id']))}\b", allowed), allowed
    finally:
        cli.run("kill", c["id"], open_)


def test_create_engine_vm(cli, server) -> None:
    """``--engine vm``: a microVM with its own kernel, shown in ``wrenn ls``;
    the same commands work on it, ``wrenn snapshot`` included (its template
    boots VMs by default). An unknown engine is refused by the CLI
    and, sent raw, by the API (400)."""
    c = json.loads(cli.out("create", "--json", "--template", "busybox", "--engine", "vm",
                           "--memory", "256", timeout=300))
    try:
        assert c["metadata"]["engine"] == "vm", c
        assert c["metadata"]["vmm_version"].startswith("qemu-microvm/"), c
        guest = cli.out("exec", c["id"], "--", "uname", "-r").strip()
        assert guest != os.uname().release and "cloud" in guest, guest
        row = next(line for line in cli.out("ls").splitlines() if line.startswith(c["id"]))
        assert row.split()[1:4] == ["running", "busybox", "vm"], row
        cli.run("pause", c["id"], timeout=300)
        cli.run("resume", c["id"], timeout=300)
        assert cli.out("exec", c["id"], "--", "echo", "back") == "back\n"
        # capsule → template: a VM template whose capsules boot its disk
        cli.run("exec", c["id"], "--", "sh", "-c", "echo in-the-vm > /root/mark")
        name = f"cli-vm-snap-{os.getpid()}"
        assert cli.out("snapshot", c["id"], name, timeout=300).strip() == name
        try:
            d = json.loads(cli.out("create", "--json", "--template", name, "--memory", "256",
                                   timeout=300))
            try:
                assert d["metadata"]["engine"] == "vm", d
                assert cli.out("exec", d["id"], "--", "cat", "/root/mark") == "in-the-vm\n"
            finally:
                cli.run("kill", d["id"], timeout=300)
        finally:
            cli.run("template", "rm", name)
    finally:
        cli.run("kill", c["id"], timeout=300)
    oci = json.loads(cli.out("create", "--json", "--template", "busybox"))
    try:
        assert oci["metadata"]["engine"] == "oci", oci
    finally:
        cli.run("kill", oci["id"])
    r = cli.run("create", "--engine", "xen", check=False)
    assert r.returncode == 2 and "xen" in r.stderr.decode()
    r = httpx.post(f"{server.base_url}/v1/capsules", headers={"X-API-Key": server.api_key},
                   json={"template": "busybox", "engine": "xen"})
    assert r.status_code == 400 and "engine" in r.json()["error"]["message"], r.text


def test_pause_resume_kill(cli) -> None:
    a = cli.out("create", "--template", "busybox").strip()
    b = cli.out("create", "--template", "busybox").strip()
    try:
        assert cli.out("pause", a).strip() == a
        status = {c["id"]: c["status"] for c in json.loads(cli.out("ls", "--json"))}
        assert status[a] == "paused" and status[b] == "running"
        r = cli.run("pause", a, check=False)  # already paused: refused, said why
        assert r.returncode == 1 and "wrenn ls" in r.stderr.decode()
        assert cli.out("resume", a).strip() == a
        assert cli.out("exec", a, "--", "echo", "back") == "back\n"
        # --json: the capsules as they are now, or the IDs killed
        assert [c["status"] for c in json.loads(cli.out("pause", a, b, "--json"))] == ["paused"] * 2
        assert [(c["id"], c["status"]) for c in json.loads(cli.out("resume", a, "--json"))] == \
            [(a, "running")]
        assert json.loads(cli.out("kill", b, "--json")) == [{"id": b}]
    finally:
        assert cli.out("kill", a, b).split() == [a, b]  # (b again: kill is idempotent)
    ids = {c["id"] for c in json.loads(cli.out("ls", "--json"))}
    assert a not in ids and b not in ids


def test_url(cli, capsule: str, server) -> None:
    url = cli.out("url", capsule, "8080").strip()
    assert url == f"http://8080-{capsule}.localhost:{server.port}/"
    assert json.loads(cli.out("url", capsule, "8080", "--json")) == {"url": url}
    cli.run("exec", capsule, "--", "sh", "-c",
            "mkdir -p /tmp/www && echo served > /tmp/www/index.html && "
            "(cd /tmp/www && nohup python3 -m http.server 8080 >/dev/null 2>&1 &)")
    host = f"8080-{capsule}.localhost:{server.port}"
    deadline = time.monotonic() + 30
    while True:
        r = httpx.get(f"http://127.0.0.1:{server.port}/index.html", headers={"Host": host}, trust_env=False)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200 and r.text == "served\n", r.text
    assert cli.out("url", "--domain", "example.test", capsule, "3000").strip() == \
        f"http://3000-{capsule}.example.test/"


def test_logs(cli, capsule: str, server) -> None:
    # a background process with a tag, started through the API
    with httpx.Client(base_url=server.base_url, headers={"X-API-Key": server.api_key}, trust_env=False) as h:
        r = h.post(f"/v1/capsules/{capsule}/exec", json={
            "cmd": "/bin/sh", "args": ["-c", "sleep 2; for i in 1 2 3; do echo tick$i; sleep 0.3; done"],
            "background": True, "tag": "ticker"})
        assert r.status_code == 202, r.text
    r = cli.run("logs", capsule, "ticker", timeout=60)
    assert r.stdout.decode().split() == ["tick1", "tick2", "tick3"]
    assert "exited with 0" in r.stderr.decode()
    # `minimal` has no start command
    r = cli.run("logs", capsule, check=False)
    assert r.returncode == 1 and "no start command" in r.stderr.decode(), r.stderr


# ---- files --------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        mode = stat.S_IMODE(p.lstat().st_mode)
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[rel] = (mode, digest)
    return out


def test_cp_directory_round_trip(cli, capsule: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "bin.dat").write_bytes(os.urandom(300_000) + b"\x00\xff")
    (src / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (src / "run.sh").chmod(0o755)
    (src / "secret").write_bytes(b"s")
    (src / "secret").chmod(0o600)
    (src / "sub" / "deeper" / "empty").write_bytes(b"")
    (src / "sub" / "with space.txt").write_text("spaced")

    cli.run("cp", str(src), f"{capsule}:/tmp/in")  # /tmp/in does not exist: it becomes the directory
    assert cli.out("exec", capsule, "--", "/tmp/in/run.sh") == "ran\n"
    modes = cli.out("exec", capsule, "--", "stat", "-c", "%a %n", "/tmp/in/run.sh", "/tmp/in/secret")
    assert modes.split() == ["755", "/tmp/in/run.sh", "600", "/tmp/in/secret"]
    remote_sum = cli.out("exec", capsule, "--", "sha256sum", "/tmp/in/bin.dat").split()[0]
    assert remote_sum == hashlib.sha256((src / "bin.dat").read_bytes()).hexdigest()

    cli.run("cp", str(src), f"{capsule}:/tmp/in")  # now it exists: lands inside as /tmp/in/src
    assert cli.out("exec", capsule, "--", "cat", "/tmp/in/src/sub/with space.txt") == "spaced"

    back = tmp_path / "back"
    cli.run("cp", f"{capsule}:/tmp/in", str(back))
    expect = _tree(src)
    got = _tree(back)
    assert {k: v for k, v in got.items() if not k.startswith("src")} == expect
    assert {k[4:]: v for k, v in got.items() if k.startswith("src/")} == expect


def test_cp_files(cli, capsule: str, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20 << 20))
    big.chmod(0o640)
    r = cli.run("cp", str(big), f"{capsule}:/tmp/")  # into a directory
    assert b"MiB" not in r.stderr, "no progress bar when stderr is not a terminal"
    assert cli.out("exec", capsule, "--", "stat", "-c", "%s %a", "/tmp/big.bin").split() == [str(20 << 20), "640"]
    cli.run("cp", str(big), f"{capsule}:/tmp/renamed.bin")
    out = tmp_path / "out"
    out.mkdir()
    cli.run("cp", f"{capsule}:/tmp/renamed.bin", str(out))
    assert (out / "renamed.bin").read_bytes() == big.read_bytes()
    assert stat.S_IMODE((out / "renamed.bin").stat().st_mode) == 0o640
    cli.run("cp", f"{capsule}:/etc/hostname", str(tmp_path / "hn"))
    assert (tmp_path / "hn").read_text().strip()
    r = cli.run("cp", f"{capsule}:/no/such", str(tmp_path / "x"), check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr.decode()


# ---- templates, keys, hosts, login ------------------------------------------


def test_templates_and_snapshot(cli, capsule: str) -> None:
    names = {t["name"]: t for t in json.loads(cli.out("template", "ls", "--json"))}
    assert {"busybox", "minimal"} <= set(names) and names["minimal"]["platform"]
    assert cli.out("template", "ls").splitlines()[0].split()[:2] == ["NAME", "TYPE"]

    cli.run("exec", capsule, "--", "sh", "-c", "echo kept > /root/mark")
    name = f"cli-snap-{os.getpid()}"
    assert cli.out("snapshot", capsule, name).strip() == name
    try:
        assert name in {t["name"] for t in json.loads(cli.out("template", "ls", "--json"))}
        c = cli.out("create", "--template", name).strip()
        try:
            assert cli.out("exec", c, "--", "cat", "/root/mark") == "kept\n"
        finally:
            cli.run("kill", c)
    finally:
        assert cli.out("template", "rm", name).strip() == name
    assert name not in {t["name"] for t in json.loads(cli.out("template", "ls", "--json"))}
    r = cli.run("template", "rm", "minimal", check=False)  # a platform template
    assert r.returncode == 1 and "platform template" in r.stderr.decode()


def test_build_and_remove_a_platform_template(cli, tmp_path: Path) -> None:
    """``template build`` takes a healthcheck line starting with its
    options; ``template rm`` with the admin key removes a platform template
    built from a recipe (``--json``: ``{"name"}``)."""
    recipe = tmp_path / "tiny.recipefile"
    recipe.write_text("RUN echo ok > /ok\n")
    name = f"cli-tpl-{os.getpid()}"
    out = cli.out("template", "build", str(recipe), "--name", name,
                  "--healthcheck", "--interval=1s test -f /ok", timeout=600)
    assert f"built template {name}" in out and "healthcheck: test -f /ok" in out, out
    assert json.loads(cli.out("template", "rm", name, "--json")) == {"name": name}
    assert name not in {t["name"] for t in json.loads(cli.out("template", "ls", "--json"))}


def test_keys(cli, server) -> None:
    secret = cli.out("keys", "create", "cli-key").strip()
    assert re.fullmatch(r"wrn_[0-9a-f]{32}", secret), secret
    e2b = json.loads(cli.out("keys", "create", "--e2b", "--json", "cli-e2b"))
    assert re.fullmatch(r"e2b_[0-9a-f]{40}", e2b["key"]) and e2b["kind"] == "e2b"
    keys = {k["name"]: k for k in json.loads(cli.out("keys", "ls", "--json"))}
    assert {"cli-key", "cli-e2b"} <= set(keys)
    assert all("key" not in k for k in keys.values())  # secrets are never listed
    # the new key works
    assert cli.run("ls", WRENN_API_KEY=secret).returncode == 0
    for name in ("cli-key", "cli-e2b"):
        assert cli.out("keys", "rm", keys[name]["id"]).strip() == keys[name]["id"]
    r = cli.run("ls", check=False, WRENN_API_KEY=secret)
    assert r.returncode == 1 and "invalid API key" in r.stderr.decode()
    assert "cli-key" not in cli.out("keys", "ls")


def test_hosts(cli) -> None:
    hosts = json.loads(cli.out("hosts", "ls", "--json"))
    assert len(hosts) >= 1 and hosts[0]["status"] == "online"
    table = cli.out("hosts", "ls")
    assert table.splitlines()[0].split()[:2] == ["ID", "STATUS"] and hosts[0]["id"] in table


def test_login(cli, server, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg" / "config.json"
    r = cli.run("login", check=False, input=b"wrn_" + b"1" * 32 + b"\n",
                WRENN_API_KEY=None, WRENN_CONFIG=str(cfg))
    assert r.returncode == 1 and not cfg.exists()  # a refused key is not saved
    cli.run("--base-url", server.base_url, "login", input=server.api_key.encode() + b"\n",
                WRENN_API_KEY=None, WRENN_BASE_URL=None, WRENN_CONFIG=str(cfg))
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert json.loads(cfg.read_text()) == {"base_url": server.base_url, "api_key": server.api_key}
    # later commands need neither variable
    assert cli.run("ls", WRENN_API_KEY=None, WRENN_BASE_URL=None, WRENN_CONFIG=str(cfg)).returncode == 0
