"""``wrenn shell`` as a person uses it, inside ``tmux``: type and read the
screen, resize the window (SIGWINCH reaches the remote terminal), detach
with ctrl-p ctrl-q, reattach by tag, and leave with the shell's exit code.
The local terminal must come back out of raw mode."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
import uuid

import pytest


class Tmux:
    """One tmux server of its own (``-L``), killed at the end."""

    def __init__(self) -> None:
        self.socket = f"wrenn-cli-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {r.stderr}")
        return r.stdout

    def screen(self, target: str) -> str:
        return self("capture-pane", "-p", "-J", "-t", target)

    def wait_for(self, target: str, pattern: str, timeout: float = 30) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen(target)
            m = re.search(pattern, text)
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on the screen after {timeout}s:\n{text}")
            time.sleep(0.2)

    def type(self, target: str, line: str) -> None:
        self("send-keys", "-t", target, "-l", line)
        self("send-keys", "-t", target, "Enter")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def tmux():
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed (scripts/lib.sh installs it)")
    t = Tmux()
    yield t
    t.kill()


def _session(tmux: Tmux, cli, name: str, argv: list[str], x: int = 100, y: int = 30) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in cli.env().items()
                   if k.startswith("WRENN_") or k in ("PATH", "HOME", "RUST_LOG"))
    # after wrenn exits: its status and whether the terminal is sane again
    script = (f"env -i {env} TERM=xterm {shlex.join([cli.binary, *argv])}; "
              f"echo \"wrenn-exit:$?\"; stty -a | grep -o -- '-\\?icanon' | head -1; sleep 600")
    tmux("new-session", "-d", "-s", name, "-x", str(x), "-y", str(y), "sh", "-c", script)
    return name


def test_shell_type_resize_detach_reattach_exit(tmux: Tmux, cli, capsule: str) -> None:
    s = _session(tmux, cli, "one", ["shell", capsule])
    tmux.wait_for(s, r"[#$] $|[#$]\s*$")  # a prompt
    tmux.type(s, "echo typed-$((40+2))")
    tmux.wait_for(s, r"typed-42")
    tmux.type(s, "stty size")
    tmux.wait_for(s, r"\b30 100\b")

    tmux("resize-window", "-t", s, "-x", "120", "-y", "40")
    time.sleep(0.5)
    tmux.type(s, "clear; stty size")
    tmux.wait_for(s, r"\b40 120\b")

    tmux.type(s, "export MARK=still-here")
    tmux("send-keys", "-t", s, "C-p", "C-q")
    m = tmux.wait_for(s, r"detached from (pty-[0-9a-z-]+)")
    tag = m.group(1)
    tmux.wait_for(s, r"wrenn-exit:0")
    tmux.wait_for(s, r"(?m)^icanon$")  # cooked mode again (not -icanon)

    s2 = _session(tmux, cli, "two", ["shell", capsule, "--attach", tag])
    time.sleep(1)
    tmux.type(s2, "echo $MARK")  # the same shell: its variables survived
    tmux.wait_for(s2, r"still-here")
    tmux.type(s2, "exit 7")
    tmux.wait_for(s2, r"wrenn-exit:7")
    tmux.wait_for(s2, r"(?m)^icanon$")


def test_shell_unknown_tag(tmux: Tmux, cli, capsule: str) -> None:
    s = _session(tmux, cli, "bad", ["shell", capsule, "--attach", "pty-doesnotexist"])
    tmux.wait_for(s, r"wrenn-exit:1")
    tmux.wait_for(s, r"(?m)^icanon$")


def test_cp_shows_progress_for_big_files_on_a_terminal(tmux: Tmux, cli, capsule: str, tmp_path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(40 << 20))
    up = _session(tmux, cli, "cp-up", ["cp", str(big), f"{capsule}:/tmp/progress.bin"], x=160)
    tmux.wait_for(up, r"wrenn-exit:0", timeout=120)
    bar = r"\[=+\] 40\.00 MiB/40\.00 MiB"
    tmux.wait_for(up, r"/tmp/progress\.bin " + bar, timeout=1)
    down = _session(tmux, cli, "cp-down", ["cp", f"{capsule}:/tmp/progress.bin", str(tmp_path / "back.bin")], x=160)
    tmux.wait_for(down, r"wrenn-exit:0", timeout=120)
    tmux.wait_for(down, r"/tmp/progress\.bin " + bar, timeout=1)
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    # a small file shows none
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    quiet = _session(tmux, cli, "cp-small", ["cp", str(small), f"{capsule}:/tmp/small.bin"], x=160)
    tmux.wait_for(quiet, r"wrenn-exit:0", timeout=60)
    screen = tmux.screen(quiet)
    assert "small.bin" not in screen and "[" not in screen, screen
