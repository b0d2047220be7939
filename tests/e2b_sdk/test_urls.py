"""``/health`` and the file URLs the SDK hands out.

Debug mode has no envd access token, so ``upload_url()`` / ``download_url()``
return plain, unsigned ``http://localhost:49983/files?path=...`` URLs; the
tests use them with a plain HTTP client, as an SDK user would.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import httpx
import pytest

from e2b import Sandbox

ALL_BYTES = bytes(range(256)) * 8


@pytest.fixture
def http() -> httpx.Client:
    with httpx.Client(trust_env=False, timeout=30) as client:
        yield client


def query(url: str) -> dict:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


def test_health(envd, http: httpx.Client):
    # wrenn's envd answers 200 {"version"} (wrenn-api.md §7.1); the SDK only
    # needs a 2xx, which is_running() below checks through the SDK itself.
    r = http.get(f"{envd.base_url}/health")
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    assert isinstance(r.json()["version"], str)


def test_is_running(sandbox: Sandbox):
    assert sandbox.is_running() is True


def test_file_urls_are_plain_in_debug_mode(sandbox: Sandbox, workdir: str):
    path = f"{workdir}/u.txt"
    for url in (sandbox.upload_url(path), sandbox.download_url(path)):
        assert url.startswith("http://localhost:49983/files?")
        assert query(url) == {"path": path}
    assert query(sandbox.download_url(path, user="root")) == {
        "path": path,
        "username": "root",
    }


def test_upload_url_then_download_url(sandbox: Sandbox, workdir: str, http: httpx.Client):
    path = f"{workdir}/via-url.bin"

    r = http.post(sandbox.upload_url(path), files={"file": ("via-url.bin", ALL_BYTES)})

    assert r.status_code == 200, r.text
    written = r.json()
    assert isinstance(written, list) and len(written) == 1
    assert written[0]["path"] == path
    assert written[0]["name"] == "via-url.bin"
    assert written[0]["type"] == "file"
    assert Path(path).read_bytes() == ALL_BYTES

    r = http.get(sandbox.download_url(path))

    assert r.status_code == 200
    assert r.content == ALL_BYTES
    assert 'filename="via-url.bin"' in r.headers.get("content-disposition", "")


def test_download_url_serves_gzip_when_asked(sandbox: Sandbox, workdir: str, http: httpx.Client):
    path = f"{workdir}/gz.txt"
    content = b"gzip me please\n" * 10_000
    Path(path).write_bytes(content)

    r = http.get(sandbox.download_url(path), headers={"Accept-Encoding": "gzip"})

    assert r.status_code == 200
    assert r.headers.get("content-encoding") == "gzip"
    assert r.content == content  # httpx decodes the gzip body


def test_download_url_of_missing_file(sandbox: Sandbox, workdir: str, http: httpx.Client):
    r = http.get(sandbox.download_url(f"{workdir}/missing"))

    assert r.status_code == 404
    body = r.json()
    assert body["code"] == 404
    assert isinstance(body["message"], str) and body["message"]


def test_multipart_upload_uses_part_filenames_as_paths(
    sandbox: Sandbox, workdir: str, http: httpx.Client
):
    # What the SDK's write_files sends: no ?path=, one `file` part per file,
    # each part's filename being the destination path.
    url = sandbox.upload_url("")
    assert "path=" not in url
    r = http.post(
        url,
        files=[
            ("file", (f"{workdir}/m1.txt", b"one")),
            ("file", (f"{workdir}/sub/m2.txt", b"two")),
        ],
    )

    assert r.status_code == 200, r.text
    assert sorted(e["path"] for e in r.json()) == [
        f"{workdir}/m1.txt",
        f"{workdir}/sub/m2.txt",
    ]
    assert Path(f"{workdir}/m1.txt").read_bytes() == b"one"
    assert Path(f"{workdir}/sub/m2.txt").read_bytes() == b"two"


def test_download_url_as_unknown_user(sandbox: Sandbox, workdir: str, http: httpx.Client):
    Path(f"{workdir}/f").write_text("x")
    r = http.get(sandbox.download_url(f"{workdir}/f", user="e2bsdk-no-such-user"))
    assert r.status_code == 401
    assert r.json()["code"] == 401

