"""Hostile and malformed requests, sent raw (not through the SDK): every
error is ``{"error":{"code","message"}}`` JSON with the right status, and
nothing is ever a 500."""

from __future__ import annotations

import json

import pytest
from wrenn import Capsule
from wrennsdk_support import assert_error_body, raw_request, repeat_bytes, unknown_capsule_id

MIB = 1024 * 1024


@pytest.fixture
def api(server):
    with server.http() as h:
        yield h


def test_malformed_json(api) -> None:
    for body in (b"{not json", b"", b"[]", b"null", b'"minimal"', b'{"template": "minimal"'):
        r = api.post("/v1/capsules", content=body, headers={"Content-Type": "application/json"})
        if body == b"" and r.status_code < 400:
            # an empty body may count as {}: then it made a capsule
            api.delete(f"/v1/capsules/{r.json()['id']}")
            continue
        assert_error_body(r, 400, "invalid_request")


def test_wrong_types(api) -> None:
    for body in (
        {"template": 5},
        {"template": "minimal", "vcpus": "two"},
        {"template": "minimal", "memory_mb": 1.5},
        {"template": "minimal", "timeout_sec": -1},
        {"template": "minimal", "timeout_sec": "60"},
        {"template": "minimal", "vcpus": 1e30},
        {"template": ["minimal"]},
    ):
        assert_error_body(api.post("/v1/capsules", json=body), 400, "invalid_request")


def test_values_an_agent_would_refuse(api) -> None:
    """400 (test_events.py checks that nothing was made of them)."""
    for body in (
        {"template": "minimal", "memory_mb": 16},
        {"template": "minimal", "timeout_sec": 10**9},
        {"template": "minimal", "disk_size_mb": 2**40},
    ):
        assert_error_body(api.post("/v1/capsules", json=body), 400, "invalid_request")


def test_unknown_fields_are_ignored(api) -> None:
    r = api.post("/v1/capsules", json={"template": "minimal", "bogus": 1, "nested": {"x": [1]}})
    assert r.status_code in (200, 201, 202), r.text
    body = r.json()
    assert body["id"].startswith("cl-")
    assert api.delete(f"/v1/capsules/{body['id']}").status_code in (200, 202, 204)


def test_unknown_template_is_404(api) -> None:
    assert_error_body(api.post("/v1/capsules", json={"template": "no-such-template"}), 404, "not_found")


def test_bad_ids(api) -> None:
    for bad in ("nope", "cl-short", "cl-" + "0" * 26, "sb-" + "0" * 25, "cl-" + "!" * 25):
        assert_error_body(api.get(f"/v1/capsules/{bad}"), 400, "invalid_request")
        assert_error_body(api.delete(f"/v1/capsules/{bad}"), 400, "invalid_request")
        assert_error_body(api.post(f"/v1/capsules/{bad}/pause"), 400, "invalid_request")
        assert_error_body(api.post(f"/v1/capsules/{bad}/exec", json={"cmd": "true"}), 400, "invalid_request")
        assert_error_body(api.post(f"/v1/capsules/{bad}/files/read", json={"path": "/x"}), 400,
                          "invalid_request")
        assert_error_body(api.get(f"/v1/capsules/{bad}/metrics"), 400, "invalid_request")
    cid = unknown_capsule_id()
    assert_error_body(api.get(f"/v1/capsules/{cid}"), 404, "not_found")
    assert_error_body(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"}), 404, "not_found")


def test_unknown_route(api) -> None:
    assert_error_body(api.get("/v1/no-such-route"), 404, "not_found")
    assert_error_body(api.get("/v1/capsules/cl-x/no-such-sub-route"), (400, 404))


def test_exec_bad_bodies(api, capsule: Capsule) -> None:
    base = f"/v1/capsules/{capsule.capsule_id}"
    assert_error_body(api.post(f"{base}/exec", json={"cmd": ""}), 400, "invalid_request")
    assert_error_body(api.post(f"{base}/exec", json={"args": ["x"]}), 400, "invalid_request")
    assert_error_body(api.post(f"{base}/exec", json={"cmd": 5}), 400, "invalid_request")
    assert_error_body(api.post(f"{base}/exec", json={"cmd": "/bin/true", "args": "x"}), 400, "invalid_request")
    assert_error_body(api.post(f"{base}/exec", json={"cmd": "/bin/true", "envs": ["A=1"]}), 400,
                      "invalid_request")
    assert_error_body(api.post(f"{base}/exec", content=b"{", headers={"Content-Type": "application/json"}),
                      400, "invalid_request")
    assert_error_body(api.delete(f"{base}/processes/not-a-pid-or-tag-that-exists"), 404, "not_found")
    # a nonexistent binary is a clean failure, not a 500
    r = api.post(f"{base}/exec", json={"cmd": "/no/such/binary"})
    assert r.status_code != 500, r.text
    if r.status_code < 400:
        assert r.json()["exit_code"] != 0
    else:
        assert_error_body(r)
    # the raw API keeps stdout/stderr and the encoding
    ok = api.post(f"{base}/exec", json={"cmd": "/bin/sh", "args": ["-c", "printf hi"]})
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["stdout"] == "hi" and body["exit_code"] == 0 and body.get("encoding") in (None, "utf-8")
    bg = api.post(f"{base}/exec", json={"cmd": "/bin/sleep", "args": ["30"], "background": True})
    assert bg.status_code in (200, 202), bg.text
    assert isinstance(bg.json()["pid"], int) and isinstance(bg.json()["tag"], str)
    procs = api.get(f"{base}/processes").json()
    assert isinstance(procs["processes"], list)
    assert api.delete(f"{base}/processes/{bg.json()['tag']}").status_code in (200, 204)


def test_files_bad_bodies(api, capsule: Capsule) -> None:
    base = f"/v1/capsules/{capsule.capsule_id}/files"
    assert_error_body(api.post(f"{base}/read", json={}), 400, "invalid_request")
    assert_error_body(api.post(f"{base}/read", json={"path": 5}), 400, "invalid_request")
    assert_error_body(api.post(f"{base}/read", json={"path": ""}), 400, "invalid_request")
    assert_error_body(api.post(f"{base}/list", content=b"nope", headers={"Content-Type": "application/json"}),
                      400, "invalid_request")
    assert_error_body(api.post(f"{base}/read", json={"path": "/tmp/nope"}), 404, "not_found")
    # multipart without a path, or without a file part
    assert_error_body(api.post(f"{base}/write", files={"file": ("upload", b"x")}), 400, "invalid_request")
    assert_error_body(api.post(f"{base}/write", data={"path": "/tmp/x"}), 400, "invalid_request")
    assert_error_body(api.post(f"{base}/write", content=b"raw", headers={"Content-Type": "text/plain"}),
                      (400, 415))
    # reading a directory is not a file read
    r = api.post(f"{base}/read", json={"path": "/tmp"})
    assert_error_body(r, (400, 404, 409))


def test_paths_and_names_that_would_land_elsewhere(api, capsule: Capsule) -> None:
    """Inputs that used to be quietly taken for something else: an
    environment variable named ``A=B`` (the process got ``A=B=c``), a path
    part that is not UTF-8 (the file was written at U+FFFD), two path
    parts (the last won), a path ending in ``/`` (a file at the path
    without it), and removing ``/`` (which took part of the capsule down,
    then failed with a 502). Each is a 400 and changes nothing."""
    base = f"/v1/capsules/{capsule.capsule_id}"
    for envs in ({"A=B": "c"}, {"": "x"}):
        assert_error_body(api.post(f"{base}/exec", json={"cmd": "/usr/bin/env", "envs": envs}), 400,
                          "invalid_request")
        assert_error_body(api.post(f"{base}/exec", json={"cmd": "/bin/sleep", "args": ["9"], "envs": envs,
                                                         "background": True}), 400, "invalid_request")
    boundary = "b0und"

    def multipart(*parts: tuple[bytes, bytes]) -> bytes:
        out = b""
        for name, value in parts:
            out += b"--b0und\r\nContent-Disposition: form-data; name=\"" + name + b"\"\r\n\r\n" + value + b"\r\n"
        return out + b"--b0und--\r\n"

    write = f"{base}/files/write"
    ct = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    for body in (multipart((b"path", b"/tmp/\xff\xfe"), (b"file", b"x")),
                 multipart((b"path", b"/tmp/one"), (b"path", b"/tmp/two"), (b"file", b"x")),
                 multipart((b"path", b"/tmp/newdir/"), (b"file", b"x"))):
        r = api.post(write, content=body, headers=ct)
        assert_error_body(r, 400, "invalid_request")
    listed = {e.name for e in capsule.files.list("/tmp")}
    assert not listed & {"\ufffd\ufffd", "one", "two", "newdir"}, listed
    assert_error_body(api.post(f"{base}/files/remove", json={"path": "/"}), 400, "invalid_request")
    assert capsule.commands.run("test -x /bin/sh && ls /etc/passwd").exit_code == 0
    # (spec §7.1: envd's marker file, beside the ID files)
    assert capsule.files.read("/run/wrenn/.WRENN_SANDBOX") == "true"


def _upload(server, capsule: Capsule, route: str, boundary: str, body, length: int | None):
    """POST a raw multipart ``body`` to the capsule's ``route``."""
    return raw_request(
        server.base_url,
        "POST",
        f"/v1/capsules/{capsule.capsule_id}/{route}",
        {"X-API-Key": server.api_key, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        body,
        content_length=length,
    )


def test_files_write_over_limit_is_413(server, capsule: Capsule) -> None:
    """``files/write`` caps at 100 MiB: 101 MiB is refused with 413."""
    size = 101 * MIB
    boundary = "wrennsdktestboundary0123456789"
    pre = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="path"\r\n\r\n/var/tmp/huge\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="upload"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    post = f"\r\n--{boundary}--\r\n".encode()

    def body():
        yield pre
        yield from repeat_bytes(size)
        yield post

    r = _upload(server, capsule, "files/write", boundary, body(), len(pre) + size + len(post))
    assert_error_body(r, 413)
    assert capsule.commands.run("echo ok").stdout == "ok\n"  # the capsule is fine


@pytest.mark.parametrize("route", ["files/write", "files/stream/write"])
@pytest.mark.parametrize("part,status", [("path", 400), ("notes", 413)])
def test_upload_parts_before_the_file_are_bounded(server, capsule: Capsule, route: str,
                                                  part: str, status: int) -> None:
    """A chunked upload (no length to check up front) whose ``path`` part,
    or a part before the file that the server skips, never ends: refused
    as soon as it passes its bound, not read (and held) to the end."""
    boundary = "wrennsdktestboundary0123456789"
    sent = 0

    def body():
        nonlocal sent
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="{part}"\r\n\r\n'.encode()
        for piece in repeat_bytes(256 * MIB):
            sent += len(piece)
            yield piece

    r = _upload(server, capsule, route, boundary, body(), None)
    assert_error_body(r, status)
    assert sent < 64 * MIB, f"the server read {sent >> 20} MiB of a {part} part before refusing it"
    assert capsule.commands.run("echo ok").stdout == "ok\n"


def test_json_body_over_limit(server) -> None:
    big = json.dumps({"template": "minimal", "pad": "x" * (2 * MIB)}).encode()
    for content_length in (len(big), None):  # with a length, and chunked without
        r = raw_request(
            server.base_url,
            "POST",
            "/v1/capsules",
            {"X-API-Key": server.api_key, "Content-Type": "application/json"},
            iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
            content_length=content_length,
        )
        assert_error_body(r, (400, 413))


def test_query_validation(api, capsule: Capsule) -> None:
    assert_error_body(api.get(f"/v1/capsules/{capsule.capsule_id}/metrics", params={"range": "bogus"}), 400,
                      "invalid_request")
    assert_error_body(api.get("/v1/capsules/stats", params={"range": "bogus"}), 400, "invalid_request")
    assert_error_body(api.get("/v1/capsules/stats", params={"range": "10m"}), 400, "invalid_request")
    assert_error_body(api.get("/v1/capsules/usage", params={"from": "2024-02-01", "to": "2024-01-01"}), 400,
                      "invalid_request")
    assert_error_body(api.get("/v1/capsules/usage", params={"from": "01/02/2024"}), 400, "invalid_request")
    assert_error_body(api.get("/v1/capsules/usage", params={"from": "2024-01-01", "to": "2024-12-31"}), 400,
                      "invalid_request")
    assert api.get("/v1/capsules/stats").status_code == 200
    assert api.get("/v1/snapshots", params={"type": "nonsense"}).json() == []


def test_snapshot_bad_bodies(api, capsule: Capsule) -> None:
    assert_error_body(api.post("/v1/snapshots", json={}), 400, "invalid_request")
    assert_error_body(api.post("/v1/snapshots", json={"sandbox_id": "nope"}), 400, "invalid_request")
    assert_error_body(api.post("/v1/snapshots", json={"sandbox_id": capsule.capsule_id, "name": "a b"}), 400,
                      "invalid_request")
    assert_error_body(api.post("/v1/snapshots", json={"sandbox_id": capsule.capsule_id, "name": "x" * 65}),
                      400, "invalid_request")
    assert_error_body(api.post("/v1/snapshots", json={"sandbox_id": unknown_capsule_id()}), 404, "not_found")
    assert_error_body(api.delete("/v1/snapshots/bad%20name"), 400, "invalid_request")
    assert_error_body(api.delete("/v1/snapshots/no-such-snapshot"), 404, "not_found")


def test_teams_bad_bodies(api) -> None:
    assert_error_body(api.post("/v1/teams", json={}), 400, "invalid_request")
    assert_error_body(api.post("/v1/teams", json={"name": ""}), 400, "invalid_request")
    assert_error_body(api.post("/v1/teams", content=b"{", headers={"Content-Type": "application/json"}), 400,
                      "invalid_request")


def test_api_prefix_alias(server, api) -> None:
    """Both ``/v1`` and ``/api/v1`` route (the SDK's default base ends in ``/api``)."""
    a = api.get("/v1/capsules")
    b = api.get("/api/v1/capsules")
    assert a.status_code == b.status_code == 200
    assert isinstance(b.json(), list)
