"""``capsule.git``: the SDK's git helpers, each a foreground exec with
``cwd`` and ``envs`` (``GIT_TERMINAL_PROMPT=0``), against repositories
made inside the capsule."""

from __future__ import annotations

import pytest
from wrenn import (
    AsyncCapsule,
    Capsule,
    CommandResult,
    GitAuthError,
    GitBranch,
    GitCommandError,
    GitStatus,
)
from wrennsdk_support import poll

G = "/tmp/g"
ORIGIN = f"{G}/origin.git"
SEED = f"{G}/seed"
WORK = f"{G}/work"

# Answers every request 401 with a Basic challenge: git must fail without prompting.
AUTH_WALL = r'''
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="wall"')
        self.send_header("Content-Length", "0")
        self.end_headers()
    do_POST = do_GET
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", 8123), H).serve_forever()
'''


def _setup(capsule: Capsule) -> None:
    """origin.git (bare) <- seed (one commit) ; work = clone of origin."""
    git = capsule.git
    git.configure_user("Wrenn Test", "test@wrenn.invalid")
    assert git.get_config("user.name", scope="global") == "Wrenn Test"
    assert git.get_config("user.email", scope="global") == "test@wrenn.invalid"
    r = git.init(ORIGIN, bare=True, initial_branch="main")
    assert isinstance(r, CommandResult) and r.exit_code == 0
    git.init(SEED, initial_branch="main")
    capsule.files.write(f"{SEED}/README.md", "one\n")
    git.add(cwd=SEED)
    git.commit("first", author_name="Seed Author", author_email="seed@wrenn.invalid", cwd=SEED)
    git.remote_add("origin", f"file://{ORIGIN}", cwd=SEED)
    git.push("origin", "main", set_upstream=True, cwd=SEED)
    git.clone(f"file://{ORIGIN}", WORK)


def test_clone_status_branches(capsule: Capsule) -> None:
    _setup(capsule)
    git = capsule.git
    assert capsule.files.read(f"{WORK}/README.md") == "one\n"
    author = capsule.commands.run("git log -1 --format=%an", cwd=WORK).stdout.strip()
    assert author == "Seed Author"

    st = git.status(cwd=WORK)
    assert isinstance(st, GitStatus)
    assert st.branch == "main" and st.upstream == "origin/main"
    assert st.is_clean and not st.detached and (st.ahead, st.behind) == (0, 0)

    capsule.files.write(f"{WORK}/README.md", "one\nmore\n")
    capsule.files.write(f"{WORK}/new.txt", "n\n")
    st = git.status(cwd=WORK)
    by = {f.path: f for f in st.files}
    assert by["README.md"].status == "modified" and not by["README.md"].staged
    assert by["new.txt"].status == "untracked" and st.has_untracked

    git.add(["new.txt"], cwd=WORK)
    st = git.status(cwd=WORK)
    assert {f.path: f for f in st.files}["new.txt"].staged and st.has_staged

    git.reset(paths=["new.txt"], cwd=WORK)  # unstage
    assert not {f.path: f for f in git.status(cwd=WORK).files}["new.txt"].staged
    git.restore(["README.md"], cwd=WORK)  # drop the worktree change
    assert capsule.files.read(f"{WORK}/README.md") == "one\n"
    capsule.files.remove(f"{WORK}/new.txt")
    assert git.status(cwd=WORK).is_clean

    git.create_branch("feature", cwd=WORK)
    branches = git.branches(cwd=WORK)
    assert all(isinstance(b, GitBranch) for b in branches)
    assert {b.name: b.is_current for b in branches} == {"feature": True, "main": False}
    git.checkout_branch("main", cwd=WORK)
    assert {b.name: b.is_current for b in git.branches(cwd=WORK)} == {"feature": False, "main": True}
    git.delete_branch("feature", cwd=WORK)
    assert [b.name for b in git.branches(cwd=WORK)] == ["main"]
    with pytest.raises(GitCommandError) as ei:
        git.delete_branch("no-such-branch", cwd=WORK)
    assert ei.value.exit_code != 0 and "no-such-branch" in ei.value.stderr


def test_commit_push_pull(capsule: Capsule) -> None:
    _setup(capsule)
    git = capsule.git
    capsule.files.write(f"{SEED}/README.md", "one\ntwo\n")
    git.add(all=True, cwd=SEED)
    git.commit("second", cwd=SEED)
    git.push(cwd=SEED)

    r = git.pull(cwd=WORK)
    assert r.exit_code == 0
    assert capsule.files.read(f"{WORK}/README.md") == "one\ntwo\n"
    st = git.status(cwd=WORK)
    assert (st.ahead, st.behind) == (0, 0)

    # a commit in work is ahead until pushed
    capsule.files.write(f"{WORK}/w.txt", "w\n")
    git.add(cwd=WORK)
    git.commit("from work", cwd=WORK)
    assert git.status(cwd=WORK).ahead == 1
    git.push("origin", "main", cwd=WORK)
    assert git.status(cwd=WORK).ahead == 0
    git.pull("origin", "main", ff_only=True, cwd=SEED)
    assert capsule.files.read(f"{SEED}/w.txt") == "w\n"

    with pytest.raises(GitCommandError):
        git.commit("nothing to commit", cwd=WORK)
    git.commit("empty", allow_empty=True, cwd=WORK)
    git.reset(mode="hard", ref="HEAD~1", cwd=WORK)
    log = capsule.commands.run("git log --format=%s", cwd=WORK).stdout.splitlines()
    assert log[0] == "from work"
    with pytest.raises(ValueError):
        git.reset(mode="sideways", cwd=WORK)


def test_clone_options_remotes_config(capsule: Capsule) -> None:
    _setup(capsule)
    git = capsule.git
    git.clone(f"file://{ORIGIN}", f"{G}/shallow", branch="main", depth=1)
    n = capsule.commands.run("git rev-list --count HEAD", cwd=f"{G}/shallow").stdout.strip()
    assert n == "1"
    git.clone(f"file://{ORIGIN}", "rel", cwd=G)  # dest relative to cwd
    assert capsule.files.exists(f"{G}/rel/README.md")

    assert git.remote_get(cwd=WORK) == f"file://{ORIGIN}"
    assert git.remote_get("nope", cwd=WORK) is None
    git.remote_add("mirror", f"file://{ORIGIN}", fetch=True, cwd=WORK)
    assert git.remote_get("mirror", cwd=WORK) == f"file://{ORIGIN}"
    with pytest.raises(GitCommandError):
        git.remote_add("mirror", f"file://{ORIGIN}", cwd=WORK)

    git.set_config("core.wrenn", "yes", cwd=WORK)
    assert git.get_config("core.wrenn", cwd=WORK) == "yes"
    assert git.get_config("core.wrenn", scope="global") is None
    assert git.get_config("core.absent", cwd=WORK) is None
    with pytest.raises(ValueError):
        git.set_config("a.b", "c", scope="planet")
    with pytest.raises(ValueError):
        git.configure_user("", "x@y")

    with pytest.raises(GitCommandError):
        git.clone(f"file://{G}/does-not-exist.git", f"{G}/never")
    with pytest.raises(GitCommandError):
        git.status(cwd="/tmp")  # not a repository
    with pytest.raises(ValueError):
        git.push(username="u", password="p", cwd=WORK)  # file:// takes no credentials


def test_auth_failures(capsule: Capsule) -> None:
    """With GIT_TERMINAL_PROMPT=0 (sent in ``envs``) git fails at once
    instead of prompting; the SDK maps that to GitAuthError."""
    capsule.files.write("/tmp/wall.py", AUTH_WALL)
    capsule.commands.run("python3 /tmp/wall.py", background=True)
    poll(lambda: capsule.commands.run("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8123/")
         .stdout == "401", 10, 0.2, "the 401 server")
    git = capsule.git
    with pytest.raises(GitAuthError):
        git.clone("http://127.0.0.1:8123/repo.git", f"{G}/wall1", timeout=30)
    with pytest.raises(GitAuthError):
        git.clone("http://127.0.0.1:8123/repo.git", f"{G}/wall2", username="u", password="p", timeout=30)
    with pytest.raises(ValueError):
        git.clone("http://127.0.0.1:8123/repo.git", password="p")


def test_dangerously_authenticate(capsule: Capsule) -> None:
    git = capsule.git
    git.dangerously_authenticate("someone", "s3cret", host="git.wrenn.invalid")
    assert git.get_config("credential.helper", scope="global") == "store"
    creds = capsule.commands.run('cat "$HOME/.git-credentials"').stdout
    assert "https://someone:s3cret@git.wrenn.invalid" in creds
    with pytest.raises(ValueError):
        git.dangerously_authenticate("someone", "")


async def test_async_git(server) -> None:
    c = await AsyncCapsule.create(template="minimal", wait=True, api_key=server.api_key, base_url=server.base_url)
    async with c:
        git = c.git
        await git.configure_user("Async", "async@wrenn.invalid")
        # an empty clone names its branch after the remote's HEAD or this
        await git.set_config("init.defaultBranch", "main", scope="global")
        await git.init(ORIGIN, bare=True, initial_branch="main")
        await git.clone(f"file://{ORIGIN}", WORK)
        await c.files.write(f"{WORK}/a.txt", "a\n")
        st = await git.status(cwd=WORK)
        assert st.has_untracked
        await git.add(cwd=WORK)
        await git.commit("async first", cwd=WORK)
        await git.push("origin", "main", set_upstream=True, cwd=WORK)
        st = await git.status(cwd=WORK)
        assert st.is_clean and st.branch == "main" and st.upstream == "origin/main"
        await git.create_branch("topic", cwd=WORK)
        assert {b.name for b in await git.branches(cwd=WORK)} == {"main", "topic"}
        await git.checkout_branch("main", cwd=WORK)
        await git.delete_branch("topic", force=True, cwd=WORK)
        assert await git.remote_get(cwd=WORK) == f"file://{ORIGIN}"
        await git.set_config("core.async", "1", cwd=WORK)
        assert await git.get_config("core.async", cwd=WORK) == "1"
        await git.pull(cwd=WORK)
        with pytest.raises(GitCommandError):
            await git.checkout_branch("missing", cwd=WORK)
