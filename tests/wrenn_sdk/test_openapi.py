"""The OpenAPI document (``crates/wrenn-cp/openapi.yaml``) against the code
and against a live server.

* the document is valid OpenAPI 3.0 (``openapi-spec-validator``);
* its paths and methods are exactly the router's (``.route("…", …)`` lines of
  ``crates/wrenn-cp/src/api/mod.rs`` and ``src/server.rs``), so neither can
  drift from the other;
* ``src/docs.html`` is the page rendered from the document (regenerate with
  ``target/wrenn-sdk-venv/bin/python tests/wrenn_sdk/test_openapi.py --write-docs``);
* real calls to most routes — successes and 400/401/403/404/409 errors —
  each answer with a status the document lists for that operation and a
  body that validates against the schema it gives (``openapi-schema-validator``,
  OpenAPI 3.0 semantics: ``nullable``, formats). Every event seen on the SSE
  stream meanwhile validates against ``Event``;
* ``GET /openapi.yaml`` and ``GET /docs`` serve exactly the files on disk
  (both are compiled in: this fails against a binary built before the
  files last changed).

The document is always read from disk, never from the server.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

REPO = HERE.parent.parent
CP = REPO / "crates" / "wrenn-cp"
SPEC_PATH = CP / "openapi.yaml"
DOCS_PATH = CP / "src" / "docs.html"
ROUTER_PATH = CP / "src" / "api" / "mod.rs"
SERVER_RS_PATH = CP / "src" / "server.rs"

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# `any(...)` in the router: every method the proxy path documents
ANY_METHODS = {"get", "post", "put", "patch", "delete", "head", "options"}
PROXY_ROUTE = "/proxy/{*rest}"
PROXY_SPEC_PATH = "/proxy/{capsule_id}/{port}/{path}"


def load_spec() -> dict:
    with open(SPEC_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


# --------------------------------------------------------------------------- #
# The router, read from the Rust source
# --------------------------------------------------------------------------- #


def _route_calls(source: str) -> list[tuple[str, str]]:
    """Every ``.route("PATH", HANDLERS)`` in ``source``: (PATH, HANDLERS),
    with HANDLERS the text up to the call's closing parenthesis."""
    out = []
    for m in re.finditer(r'\.route\(\s*"([^"]+)"\s*,', source):
        depth, i = 1, m.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        out.append((m.group(1), source[m.end() : i - 1]))
    return out


def _methods(handlers: str) -> set[str]:
    found = set(re.findall(r"\b(get|post|put|patch|delete|head|options|any)\(", handlers))
    if "any" in found:
        found = (found - {"any"}) | ANY_METHODS
    return found


def router_routes() -> dict[str, set[str]]:
    """path -> methods, for every route the server answers (the `/api`
    copies left out: the document covers them with its `/api` server)."""
    routes: dict[str, set[str]] = {}
    for source in (ROUTER_PATH, SERVER_RS_PATH):
        for p, handlers in _route_calls(source.read_text()):
            if p.startswith("/api/"):
                continue
            routes.setdefault(p, set()).update(_methods(handlers))
    return routes


def spec_routes(spec: dict) -> dict[str, set[str]]:
    return {p: {m for m in item if m in HTTP_METHODS} for p, item in spec["paths"].items()}


# --------------------------------------------------------------------------- #
# The docs page, rendered from the document
# --------------------------------------------------------------------------- #


def _inline(text: str) -> str:
    s = html.escape(text, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    return s


def _markdown(text: str) -> str:
    """The small Markdown subset the document's descriptions use:
    paragraphs, `*` lists (with indented continuation lines), `code`
    and **bold**."""
    out: list[str] = []
    para: list[str] = []
    items: list[list[str]] = []

    def flush_para() -> None:
        if para:
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()

    def flush_list() -> None:
        if items:
            out.append("<ul>" + "".join("<li>" + _inline(" ".join(i)) + "</li>" for i in items) + "</ul>")
            items.clear()

    for raw in (text or "").splitlines():
        line = raw.rstrip()
        if not line.strip():
            flush_para()
            flush_list()
        elif line.startswith("* "):
            flush_para()
            items.append([line[2:].strip()])
        elif items and line.startswith("  "):
            items[-1].append(line.strip())
        else:
            flush_list()
            para.append(line.strip())
    flush_para()
    flush_list()
    return "\n".join(out)


DOCS_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2433;background:#fff}
main{max-width:72rem;margin:0 auto;padding:1.5rem 1.25rem 4rem}
h1{margin:.2rem 0 .2rem;font-size:1.7rem}
h2{margin:2.2rem 0 .4rem;font-size:1.25rem;border-bottom:1px solid #e3e6ec;padding-bottom:.25rem}
.lead{color:#4a5468;margin:0 0 1rem}
code{font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f2f4f8;border-radius:3px;padding:0 .2em}
table{border-collapse:collapse;width:100%;margin:.4rem 0 1rem}
th,td{text-align:left;vertical-align:top;border-top:1px solid #e3e6ec;padding:.5rem .55rem}
th{font-size:.8rem;text-transform:uppercase;letter-spacing:.04em;color:#5b6478;border-top:0}
td.m{white-space:nowrap;width:5.5rem}
td.p{white-space:nowrap;font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
td p{margin:0 0 .45rem}td ul{margin:0 0 .45rem;padding-left:1.2rem}
.verb{display:inline-block;min-width:3.8rem;text-align:center;font:600 12px/1.7 ui-monospace,monospace;border-radius:3px;color:#fff;background:#6b7280}
.get{background:#2563eb}.post{background:#16a34a}.delete{background:#dc2626}.any{background:#7c3aed}
.sum{font-weight:600;margin-bottom:.3rem}
.intro p,.intro ul{max-width:60rem}
nav a{margin-right:.9rem}
""".strip()


def render_docs(spec: dict) -> str:
    """The static page served at ``/docs``: the document's description and
    one table of endpoints per tag (method, path, summary, description)."""
    info = spec["info"]
    tags = [t["name"] for t in spec.get("tags", [])]
    tag_desc = {t["name"]: t.get("description", "") for t in spec.get("tags", [])}
    rows: dict[str, list[str]] = {t: [] for t in tags}
    for path, item in spec["paths"].items():
        methods = [m for m in HTTP_METHODS if m in item]
        ops = [item[m] for m in methods]
        # the proxy documents one operation under every method: one row, ANY
        if len(methods) > 1 and all(op is ops[0] or op == ops[0] for op in ops):
            groups = [("ANY", ops[0])]
        else:
            groups = [(m.upper(), item[m]) for m in methods]
        for verb, op in groups:
            desc = op.get("description") or item.get("description") or ""
            if op.get("description") and item.get("description"):
                desc = item["description"] + "\n\n" + op["description"]
            tag = (op.get("tags") or ["other"])[0]
            rows.setdefault(tag, [])
            rows[tag].append(
                "<tr>"
                f'<td class="m"><span class="verb {verb.lower()}">{verb}</span></td>'
                f'<td class="p">{html.escape(path)}</td>'
                f'<td><div class="sum">{_inline(op.get("summary", ""))}</div>{_markdown(desc)}</td>'
                "</tr>"
            )
    sections = []
    for tag, trs in rows.items():
        if not trs:
            continue
        sections.append(
            f'<h2 id="{html.escape(tag)}">{html.escape(tag)}</h2>\n'
            f'<p class="lead">{_inline(tag_desc.get(tag, ""))}</p>\n'
            "<table><thead><tr><th>Method</th><th>Path</th><th>What it does</th></tr></thead><tbody>\n"
            + "\n".join(trs)
            + "\n</tbody></table>"
        )
    nav = " ".join(f'<a href="#{html.escape(t)}">{html.escape(t)}</a>' for t, trs in rows.items() if trs)
    title = html.escape(info["title"])
    return (
        "<!doctype html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n"
        "<!-- Generated from crates/wrenn-cp/openapi.yaml by tests/wrenn_sdk/test_openapi.py "
        "(--write-docs); do not edit by hand. -->\n"
        f"<style>\n{DOCS_CSS}\n</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{title}</h1>\n"
        f'<p class="lead">Version {html.escape(str(info["version"]))} · the machine-readable '
        'contract is <a href="/openapi.yaml">/openapi.yaml</a> (OpenAPI 3.0).</p>\n'
        f"<nav>{nav}</nav>\n"
        f'<section class="intro">\n{_markdown(info.get("description", ""))}\n</section>\n'
        + "\n".join(sections)
        + "\n</main>\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------- #
# Checking responses against the document
# --------------------------------------------------------------------------- #


class SpecChecker:
    """Checks responses against the document; collects every mismatch so a
    run reports all of them at once."""

    def __init__(self, spec: dict):
        from openapi_schema_validator import OAS30Validator, oas30_format_checker

        self.spec = spec
        self._validator_cls = OAS30Validator
        self._formats = oas30_format_checker
        self.failures: list[str] = []
        self.covered: set[tuple[str, str, int]] = set()

    # -- document access -------------------------------------------------- #

    def deref(self, node: dict) -> dict:
        seen = 0
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            assert ref.startswith("#/"), ref
            node = self.spec
            for part in ref[2:].split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]
            seen += 1
            assert seen < 20, ref
        return node

    def errors(self, schema: dict, data: Any) -> list[str]:
        """Validation errors of ``data`` against ``schema`` (a node of the
        document; its ``#/components/...`` references resolve in it)."""
        root = dict(schema)
        root["components"] = self.spec["components"]
        v = self._validator_cls(root, format_checker=self._formats)
        out = []
        for e in sorted(v.iter_errors(data), key=lambda e: list(e.absolute_path)):
            where = "/".join(str(p) for p in e.absolute_path) or "(root)"
            out.append(f"{where}: {e.message[:300]}")
        return out

    def schema(self, name: str) -> dict:
        return {"$ref": f"#/components/schemas/{name}"}

    # -- checks ------------------------------------------------------------- #

    def fail(self, msg: str) -> None:
        self.failures.append(msg)

    def check(
        self,
        method: str,
        template: str,
        resp: httpx.Response,
        expect: int | tuple[int, ...] | None = None,
        label: str = "",
    ) -> httpx.Response:
        method = method.lower()
        name = f"{method.upper()} {template}" + (f" [{label}]" if label else "")
        status = resp.status_code
        body = resp.content
        snippet = body[:400].decode(errors="replace")
        if expect is not None:
            allowed = expect if isinstance(expect, tuple) else (expect,)
            if status not in allowed:
                self.fail(f"{name}: expected {allowed}, got {status}: {snippet}")
        item = self.spec["paths"].get(template)
        if item is None or method not in item:
            self.fail(f"{name}: no such operation in the document")
            return resp
        self.covered.add((method.upper(), template, status))
        responses = item[method]["responses"]
        rdef = responses.get(str(status)) or responses.get("default")
        if rdef is None:
            self.fail(
                f"{name}: status {status} is not documented (documented: "
                f"{sorted(responses)}): {snippet}"
            )
            return resp
        rdef = self.deref(rdef)
        content = rdef.get("content")
        if not content:
            if body:
                self.fail(f"{name}: {status} is documented without a body, got {snippet!r}")
            return resp
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in content:
            self.fail(
                f"{name}: {status} content-type {ctype!r} not documented "
                f"({sorted(content)}): {snippet}"
            )
            return resp
        if ctype == "application/json":
            try:
                data = resp.json()
            except ValueError as exc:
                self.fail(f"{name}: {status} body is not JSON ({exc}): {snippet}")
                return resp
            errs = self.errors(content[ctype]["schema"], data)
            if errs:
                self.fail(f"{name}: {status} body does not match the document:\n    "
                          + "\n    ".join(errs) + f"\n    body: {snippet}")
        return resp

    def check_data(self, what: str, schema_name: str, data: Any) -> None:
        errs = self.errors(self.schema(schema_name), data)
        if errs:
            self.fail(f"{what}: does not match {schema_name}:\n    " + "\n    ".join(errs)
                      + f"\n    data: {json.dumps(data)[:400]}")


class Api:
    """Raw calls by operation: ``api.call("POST", "/v1/capsules/{id}/exec",
    id=cid, json=..., expect=200)`` formats the path, sends the request and
    checks the response against that operation."""

    def __init__(self, checker: SpecChecker, client: httpx.Client, prefix: str = ""):
        self.c = checker
        self.h = client
        self.prefix = prefix

    def call(self, method: str, template: str, *, expect=None, label: str = "",
             params=None, json=None, content=None, files=None, data=None, headers=None,
             raw_path: str | None = None, **path_params) -> httpx.Response:
        path = raw_path if raw_path is not None else template.format(**path_params)
        resp = self.h.request(method, self.prefix + path, params=params, json=json,
                              content=content, files=files, data=data, headers=headers)
        return self.c.check(method, template, resp, expect=expect, label=label)


WS_HEADERS = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": base64.b64encode(b"wrenn-openapi-ts").decode(),
}


def _sse_frames(client: httpx.Client, stop: threading.Event):
    """``(event, data)`` for each SSE event; first ``("__response__", status,
    content-type)``. Once ``stop`` is set it ends after the next event or
    keepalive comment (one comes every 30 s)."""
    with client.stream("GET", "/v1/events/stream", timeout=httpx.Timeout(10.0, read=None)) as r:
        yield ("__response__", r.status_code, r.headers.get("content-type", ""))
        if r.status_code != 200:
            return
        event, data = None, []
        for line in r.iter_lines():
            if line == "":
                if event is not None or data:
                    yield (event, "\n".join(data))
                event, data = None, []
                if stop.is_set():
                    return
            elif line.startswith(":"):
                if stop.is_set():
                    return
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                v = line[5:]
                data.append(v[1:] if v.startswith(" ") else v)


# --------------------------------------------------------------------------- #
# Tests that need no server
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def spec() -> dict:
    return load_spec()


def test_document_is_valid_openapi_3_0(spec: dict) -> None:
    from openapi_spec_validator import validate

    assert spec["openapi"] == "3.0.3"
    validate(spec)
    ids = [op.get("operationId") for item in spec["paths"].values()
           for m, op in item.items() if m in HTTP_METHODS and op.get("operationId")]
    assert len(ids) == len(set(ids)), "duplicate operationIds"


def test_router_and_document_list_the_same_routes(spec: dict) -> None:
    routes = router_routes()
    assert len(routes) > 30, f"the route parser found only {sorted(routes)}"
    documented = spec_routes(spec)
    # the proxy's catch-all segment is documented with named parameters
    assert PROXY_ROUTE in routes, "the path-form proxy route moved: update this test"
    routes[PROXY_SPEC_PATH] = routes.pop(PROXY_ROUTE)

    problems = []
    for path, methods in sorted(routes.items()):
        if path not in documented:
            problems.append(f"router has {path} {sorted(methods)}; the document does not")
        elif methods != documented[path]:
            problems.append(f"{path}: router methods {sorted(methods)}, document {sorted(documented[path])}")
    for path in sorted(set(documented) - set(routes)):
        problems.append(f"the document has {path}; the router does not")
    assert not problems, "\n".join(problems)

    # every /v1 route is also nested under /api, as the document's servers say
    server_rs = SERVER_RS_PATH.read_text()
    assert re.search(r'\.nest\(\s*"/api"\s*,\s*api\s*\)', server_rs), "the /api nesting moved"
    assert "/api" in [s["url"] for s in spec["servers"]], "the document lacks the /api server"


def test_document_enums_match_the_code(spec: dict) -> None:
    """Closed sets the SDK is strict about, read from the Rust source."""
    schemas = spec["components"]["schemas"]
    model = (CP / "src" / "model.rs").read_text()
    statuses = re.findall(r'Status::\w+ => "([a-z]+)"', model)
    assert len(statuses) == 12, statuses
    assert schemas["CapsuleStatus"]["enum"] == statuses

    error_rs = (CP / "src" / "error.rs").read_text()
    codes = set(re.findall(r'(?:Self::new|ApiError::new)\([^,]+,\s*"([a-z_]+)"', error_rs))
    assert codes and set(schemas["ErrorCode"]["enum"]) == codes, (codes, schemas["ErrorCode"]["enum"])

    events_rs = (CP / "src" / "events.rs").read_text()
    names = re.findall(r'Kind::\w+ => "([a-z.]+)"', events_rs)
    assert names and schemas["Event"]["properties"]["event"]["enum"] == names

    # info.version is the crate's (what /health reports)
    cargo = (REPO / "Cargo.toml").read_text()
    m = re.search(r'\[workspace\.package\][^\[]*?\nversion\s*=\s*"([^"]+)"', cargo)
    assert m and spec["info"]["version"] == m.group(1), (m and m.group(1), spec["info"]["version"])


def test_docs_page_is_rendered_from_the_document(spec: dict) -> None:
    page = DOCS_PATH.read_text(encoding="utf-8")
    assert page == render_docs(spec), (
        "crates/wrenn-cp/src/docs.html is not the page rendered from openapi.yaml; run "
        "target/wrenn-sdk-venv/bin/python tests/wrenn_sdk/test_openapi.py --write-docs"
    )
    # self-contained: no scripts, nothing loaded from elsewhere
    assert "<script" not in page.lower()
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page), "the page loads something external"


# --------------------------------------------------------------------------- #
# Against the server
# --------------------------------------------------------------------------- #


def test_served_document_and_docs_are_the_files_on_disk(server) -> None:
    with server.http(api_key=None) as h:
        r = h.get("/openapi.yaml")
        d = h.get("/docs")
    assert r.status_code == 200
    assert r.headers.get("content-type", "").startswith("application/yaml"), r.headers
    assert r.content == SPEC_PATH.read_bytes(), (
        "GET /openapi.yaml is not crates/wrenn-cp/openapi.yaml (is the binary older than the file?)"
    )
    assert d.status_code == 200
    assert d.headers.get("content-type", "").startswith("text/html"), d.headers
    assert d.content == DOCS_PATH.read_bytes(), (
        "GET /docs is not crates/wrenn-cp/src/docs.html (is the binary older than the file?)"
    )


def test_live_responses_match_the_document(server, spec: dict) -> None:
    import httpx_ws

    from wrennsdk_support import Collector, unique, unknown_capsule_id

    chk = SpecChecker(spec)
    h = server.http()
    anon = server.http(api_key=None)
    api, api_anon = Api(chk, h), Api(chk, anon)
    stop_sse = threading.Event()
    sse_client = server.http()
    sse = Collector(lambda: _sse_frames(sse_client, stop_sse), name="openapi-sse")
    created_keys: list[str] = []
    snapshot_names: list[str] = []
    cid = None
    try:
        sse.wait_for(lambda items: any(i[0] == "connected" for i in items), 15, "the SSE connected frame")

        # -- service ---------------------------------------------------------- #
        api_anon.call("GET", "/health", expect=200)
        Api(chk, anon, prefix="/api").call("GET", "/health", expect=200, label="/api prefix")
        r = anon.get("/v1/no-such-route")
        chk.check_data("GET /v1/no-such-route (fallback 404)", "ErrorBody", r.json())
        if r.status_code != 404 or r.json().get("error", {}).get("code") != "not_found":
            chk.fail(f"fallback: expected 404 not_found, got {r.status_code} {r.text[:200]}")

        # -- auth ------------------------------------------------------------- #
        api_anon.call("GET", "/v1/capsules", expect=401, label="no key")
        api_anon.call("GET", "/v1/capsules", expect=401, label="bad key",
                      headers={"X-API-Key": "wrn_" + "0" * 32})
        api_anon.call("GET", "/v1/events/stream", expect=401, label="no key")

        # -- capsules --------------------------------------------------------- #
        api.call("POST", "/v1/capsules", json={"template": unique("no-such-template")}, expect=404)
        api.call("POST", "/v1/capsules", json={"vcpus": "two"}, expect=400, label="wrong type")
        api.call("POST", "/v1/capsules", json={"timeout_sec": -1}, expect=400, label="negative timeout")
        api.call("POST", "/v1/capsules", json={"template": "bad name!"}, expect=400, label="bad template")
        api.call("POST", "/v1/capsules", content=b"{", expect=400, label="malformed JSON",
                 headers={"Content-Type": "application/json"})
        r = api.call("POST", "/v1/capsules", json={"template": "minimal", "timeout_sec": 600,
                                                   "metadata": {"suite": "openapi"}}, expect=201)
        assert r.status_code == 201, f"cannot create a capsule: {r.status_code} {r.text[:500]}"
        cid = r.json()["id"]

        api.call("GET", "/v1/capsules", expect=200)
        Api(chk, h, prefix="/api").call("GET", "/v1/capsules", expect=200, label="/api prefix")
        r = api.call("GET", "/v1/capsules/{id}", id=cid, expect=200)
        if r.status_code == 200 and "disk_used_mb" not in r.json():
            chk.fail("GET /v1/capsules/{id}: a running capsule came back without disk_used_mb")
        api.call("GET", "/v1/capsules/{id}", id="not-a-capsule", expect=400)
        api.call("GET", "/v1/capsules/{id}", id=unknown_capsule_id(), expect=404)
        api.call("POST", "/v1/capsules/{id}/ping", id=cid, expect=204)

        # -- commands --------------------------------------------------------- #
        r = api.call("POST", "/v1/capsules/{id}/exec", id=cid, expect=200,
                     json={"cmd": "/bin/sh", "args": ["-c", "echo out; echo err >&2; exit 3"]})
        if r.status_code == 200 and (r.json().get("exit_code"), r.json().get("encoding")) != (3, "utf-8"):
            chk.fail(f"exec: unexpected result {r.json()}")
        r = api.call("POST", "/v1/capsules/{id}/exec", id=cid, expect=200, label="binary output",
                     json={"cmd": "/bin/sh", "args": ["-c", "printf '\\377\\376'"]})
        if r.status_code == 200 and r.json().get("encoding") != "base64":
            chk.fail(f"exec: non-UTF-8 output not base64: {r.json()}")
        api.call("POST", "/v1/capsules/{id}/exec", id=cid, json={"cmd": ""}, expect=400, label="empty cmd")
        api.call("POST", "/v1/capsules/{id}/exec", id=unknown_capsule_id(), json={"cmd": "true"}, expect=404)
        api.call("POST", "/v1/capsules/{id}/exec", id=cid, content=b"x" * ((1 << 20) + 10),
                 headers={"Content-Type": "application/json"}, expect=413, label="over the JSON limit")
        tag = unique("oa-sleep")
        api.call("POST", "/v1/capsules/{id}/exec", id=cid, expect=202, label="background",
                 json={"cmd": "/bin/sleep", "args": ["300"], "background": True, "tag": tag})
        r = api.call("POST", "/v1/capsules/{id}/exec", id=cid, expect=202, label="background, no tag",
                     json={"cmd": "/bin/sleep", "args": ["300"], "background": True})
        untagged_pid = r.json().get("pid") if r.status_code == 202 else None
        api.call("GET", "/v1/capsules/{id}/processes", id=cid, expect=200)
        api.call("DELETE", "/v1/capsules/{id}/processes/{selector}", id=cid, selector=tag,
                 params={"signal": "SIGHUP"}, expect=400, label="bad signal")
        api.call("DELETE", "/v1/capsules/{id}/processes/{selector}", id=cid, selector=tag,
                 params={"signal": "SIGTERM"}, expect=204, label="by tag")
        if untagged_pid:
            api.call("DELETE", "/v1/capsules/{id}/processes/{selector}", id=cid,
                     selector=str(untagged_pid), expect=204, label="by pid")
        api.call("DELETE", "/v1/capsules/{id}/processes/{selector}", id=cid,
                 selector=unique("no-such-process"), expect=404)

        # WebSockets: a bad key is refused before the upgrade (the JSON error);
        # the capsule in band, after it (an error frame, then the close)
        api_anon.call("GET", "/v1/capsules/{id}/exec/stream", id=cid, headers=WS_HEADERS, expect=401)
        def refused_in_band(path: str, capsule: str, says: str) -> None:
            """One error frame (the terminal's fatal) after the client's
            first frame, then the close."""
            first = {"exec/stream": {"type": "start", "cmd": "true"}, "pty": {"type": "start"}}
            kind = path.rsplit("/", 1)[-1]
            with httpx_ws.connect_ws(path.format(id=capsule), h) as ws:
                if kind in first:
                    ws.send_text(json.dumps(first[kind]))
                frame = ws.receive_json(timeout=20)
                want = {"type": "error", **({"fatal": True} if kind == "pty" else {})}
                if {k: frame.get(k) for k in want} != want or says not in frame.get("data", ""):
                    chk.fail(f"{path} on {capsule}: first frame {frame}, wanted an error saying {says!r}")
                try:
                    extra = ws.receive(timeout=10)
                except httpx_ws.WebSocketDisconnect:
                    extra = None
                except Exception as e:  # noqa: BLE001 (a timeout: still open)
                    extra = e
                if extra is not None:
                    chk.fail(f"{path} on {capsule}: not closed after the error ({extra!r})")

        ws_paths = ("/v1/capsules/{id}/exec/stream", "/v1/capsules/{id}/processes/1/stream",
                    "/v1/capsules/{id}/pty")
        for path in ws_paths:
            refused_in_band(path, "nope", "invalid capsule ID")
            refused_in_band(path, unknown_capsule_id(), "not found")
        with httpx_ws.connect_ws(f"/v1/capsules/{cid}/exec/stream", h) as ws:
            chk.covered.add(("GET", "/v1/capsules/{id}/exec/stream", 101))
            ws.send_text(json.dumps({"type": "start", "cmd": "/bin/sh", "args": ["-c", "echo ws"]}))
            frames = []
            while not frames or frames[-1].get("type") not in ("exit", "error"):
                frames.append(ws.receive_json(timeout=20))
            types = [f.get("type") for f in frames]
            if types[0] != "start" or types[-1] != "exit" or not set(types) <= {"start", "stdout", "stderr", "exit"}:
                chk.fail(f"exec/stream frames: {frames}")
        with httpx_ws.connect_ws(f"/v1/capsules/{cid}/pty", h) as ws:
            chk.covered.add(("GET", "/v1/capsules/{id}/pty", 101))
            ws.send_text(json.dumps({"type": "start", "cmd": "/bin/sh", "cols": 80, "rows": 24}))
            while True:
                m = ws.receive(timeout=20)
                if isinstance(getattr(m, "data", None), str):
                    started = json.loads(m.data)
                    break
            if started.get("type") != "started" or not str(started.get("tag", "")).startswith("pty-"):
                chk.fail(f"pty: first control frame {started}")
            ws.send_text(json.dumps({"type": "kill"}))

        # -- files ------------------------------------------------------------ #
        d = f"/tmp/{unique('oa-dir')}"
        api.call("POST", "/v1/capsules/{id}/files/mkdir", id=cid, json={"path": d}, expect=200)
        r = api.call("POST", "/v1/capsules/{id}/files/mkdir", id=cid, json={"path": d}, expect=409, label="exists")
        if r.status_code == 409 and "already_exists" not in r.json()["error"]["message"]:
            chk.fail(f"mkdir of an existing path: message lacks already_exists: {r.text}")
        api.call("POST", "/v1/capsules/{id}/files/write", id=cid, expect=204,
                 files=[("path", (None, f"{d}/a.txt")), ("file", ("upload", b"hello\n", "application/octet-stream"))])
        api.call("POST", "/v1/capsules/{id}/files/write", id=cid, expect=400, label="file before path",
                 files=[("file", ("upload", b"x", "application/octet-stream")), ("path", (None, f"{d}/b.txt"))])
        api.call("POST", "/v1/capsules/{id}/files/write", id=cid, expect=400, label="not multipart",
                 content=b"x", headers={"Content-Type": "text/plain"})
        api.call("POST", "/v1/capsules/{id}/files/stream/write", id=cid, expect=204,
                 files=[("path", (None, f"{d}/big.bin")), ("file", ("upload.bin", os.urandom(200_000), "application/octet-stream"))])
        api.call("POST", "/v1/capsules/{id}/files/list", id=cid, json={"path": d}, expect=200)
        api.call("POST", "/v1/capsules/{id}/files/list", id=cid, json={"path": "/", "depth": 2}, expect=200, label="depth 2")
        api.call("POST", "/v1/capsules/{id}/files/list", id=cid, json={"path": f"{d}/none"}, expect=404)
        api.call("POST", "/v1/capsules/{id}/files/list", id=cid, json={}, expect=400, label="no path")
        r = api.call("POST", "/v1/capsules/{id}/files/read", id=cid, json={"path": f"{d}/a.txt"}, expect=200)
        if r.status_code == 200 and r.content != b"hello\n":
            chk.fail(f"files/read: {r.content!r}")
        api.call("POST", "/v1/capsules/{id}/files/read", id=cid, json={"path": f"{d}/none"}, expect=404)
        api.call("POST", "/v1/capsules/{id}/files/stream/read", id=cid, json={"path": f"{d}/big.bin"}, expect=200)
        api.call("POST", "/v1/capsules/{id}/files/stream/read", id=cid, json={"path": f"{d}/none"}, expect=404)
        # directories as tar streams, both ways
        r = api.call("GET", "/v1/capsules/{id}/files/tar", id=cid, params={"path": d}, expect=200)
        if r.status_code == 200:
            with tarfile.open(fileobj=io.BytesIO(r.content)) as tf:
                names = sorted(n.lstrip("./") for n in tf.getnames())
            if "a.txt" not in names or "big.bin" not in names:
                chk.fail(f"files/tar: the archive holds {names}")
        api.call("GET", "/v1/capsules/{id}/files/tar", id=cid, params={"path": f"{d}/none"}, expect=404)
        api.call("GET", "/v1/capsules/{id}/files/tar", id=cid, params={"path": f"{d}/a.txt"}, expect=404,
                 label="a file")
        api.call("GET", "/v1/capsules/{id}/files/tar", id=cid, expect=400, label="no path")
        packed = io.BytesIO()
        with tarfile.open(fileobj=packed, mode="w") as tf:
            blob = bytes(range(256)) * 64
            info = tarfile.TarInfo("sub/bin.dat")
            info.size, info.mode = len(blob), 0o750
            tf.addfile(info, io.BytesIO(blob))
        api.call("PUT", "/v1/capsules/{id}/files/tar", id=cid, params={"path": f"{d}/unpacked"},
                 content=packed.getvalue(), headers={"Content-Type": "application/x-tar"}, expect=204)
        r = api.call("POST", "/v1/capsules/{id}/files/read", id=cid, json={"path": f"{d}/unpacked/sub/bin.dat"},
                     expect=200, label="unpacked")
        if r.status_code == 200 and r.content != blob:
            chk.fail("files/tar PUT: the unpacked file differs")
        api.call("PUT", "/v1/capsules/{id}/files/tar", id=cid, params={"path": f"{d}/junk"},
                 content=os.urandom(4096), headers={"Content-Type": "application/x-tar"}, expect=400,
                 label="not a tar")
        # a client that goes away mid-upload leaves no tar running (it
        # would wait on its stdin for ever)
        def half_then_gone():
            yield packed.getvalue()[:1024]
            time.sleep(0.5)
            raise ConnectionAbortedError("the client went away")
        with pytest.raises(Exception):
            h.put(f"/v1/capsules/{cid}/files/tar", params={"path": f"{d}/half"}, content=half_then_gone(),
                  headers={"Content-Type": "application/x-tar"})
        deadline = time.monotonic() + 15
        while True:
            procs = h.get(f"/v1/capsules/{cid}/processes").json()["processes"]
            left = [p for p in procs if str(p.get("tag") or "").startswith("tar-")]
            if not left:
                break
            if time.monotonic() > deadline:
                chk.fail(f"files/tar PUT: tar left running after the client went away: {left}")
                break
            time.sleep(0.2)
        api.call("POST", "/v1/capsules/{id}/files/remove", id=cid, json={"path": d}, expect=204)
        api.call("POST", "/v1/capsules/{id}/files/remove", id=cid, json={"path": d}, expect=404, label="gone")

        # -- metrics, stats, usage -------------------------------------------- #
        api.call("GET", "/v1/capsules/{id}/metrics", id=cid, expect=200)
        api.call("GET", "/v1/capsules/{id}/metrics", id=cid, params={"range": "24h"}, expect=200, label="24h")
        api.call("GET", "/v1/capsules/{id}/metrics", id=cid, params={"range": "3d"}, expect=400)
        api.call("GET", "/v1/capsules/stats", expect=200)
        api.call("GET", "/v1/capsules/stats", params={"range": "30d"}, expect=200, label="30d")
        api.call("GET", "/v1/capsules/stats", params={"range": "1y"}, expect=400)
        api.call("GET", "/v1/capsules/usage", expect=200)
        api.call("GET", "/v1/capsules/usage", params={"from": "2026-01-01", "to": "2026-01-03"}, expect=200, label="range")
        api.call("GET", "/v1/capsules/usage", params={"from": "2026-02-01", "to": "2026-01-01"}, expect=400, label="from > to")
        api.call("GET", "/v1/capsules/usage", params={"from": "2025-01-01", "to": "2026-01-01"}, expect=400, label="> 92 days")
        api.call("GET", "/v1/capsules/usage", params={"from": "yesterday"}, expect=400, label="bad date")

        # -- snapshots -------------------------------------------------------- #
        snap = unique("oa-snap")
        snapshot_names.append(snap)
        api.call("POST", "/v1/snapshots", json={"sandbox_id": cid, "name": snap}, expect=201)
        api.call("POST", "/v1/snapshots", json={"sandbox_id": cid, "name": snap}, expect=409, label="name taken")
        api.call("POST", "/v1/snapshots", params={"overwrite": "true"}, json={"sandbox_id": cid, "name": snap},
                 expect=201, label="overwrite")
        api.call("POST", "/v1/snapshots", json={"sandbox_id": cid, "name": "minimal"}, expect=409, label="platform name")
        api.call("POST", "/v1/snapshots", json={"sandbox_id": "", "name": unique("x")}, expect=400, label="no capsule")
        api.call("POST", "/v1/snapshots", json={"sandbox_id": cid, "name": "bad name!"}, expect=400, label="bad name")
        api.call("POST", "/v1/snapshots", json={"sandbox_id": unknown_capsule_id()}, expect=404)
        api.call("GET", "/v1/snapshots", expect=200)
        api.call("GET", "/v1/snapshots", params={"type": "base"}, expect=200, label="base")
        r = api.call("GET", "/v1/snapshots", params={"type": "custom"}, expect=200, label="unknown type")
        if r.status_code == 200 and r.json() != []:
            chk.fail(f"GET /v1/snapshots?type=custom: expected [], got {r.text[:200]}")
        api.call("DELETE", "/v1/snapshots/{name}", name=snap, expect=204)
        snapshot_names.remove(snap)
        api.call("DELETE", "/v1/snapshots/{name}", name=snap, expect=404, label="gone")
        api.call("DELETE", "/v1/snapshots/{name}", name="minimal", expect=403, label="platform")
        api.call("DELETE", "/v1/snapshots/{name}", name="bad name!", expect=400,
                 raw_path="/v1/snapshots/bad%20name%21")
        r = api.call("GET", "/v1/admin/templates", expect=200)
        if r.status_code == 200 and "minimal" not in {t["name"] for t in r.json()}:
            chk.fail(f"GET /v1/admin/templates: no minimal in {r.text[:200]}")
        api.call("DELETE", "/v1/admin/templates/{name}", name="minimal", expect=403, label="built in")
        api.call("DELETE", "/v1/admin/templates/{name}", name=unique("none"), expect=404)
        api.call("DELETE", "/v1/admin/templates/{name}", name="bad name!", expect=400,
                 raw_path="/v1/admin/templates/bad%20name%21")

        # -- pause / resume --------------------------------------------------- #
        r = api.call("POST", "/v1/capsules/{id}/pause", id=cid, expect=200)
        if r.status_code == 200 and r.json().get("status") != "paused":
            chk.fail(f"pause: status {r.json().get('status')}")
        api.call("POST", "/v1/capsules/{id}/pause", id=cid, expect=409, label="already paused")
        api.call("POST", "/v1/capsules/{id}/ping", id=cid, expect=409, label="paused")
        api.call("POST", "/v1/capsules/{id}/exec", id=cid, json={"cmd": "true"}, expect=409, label="paused")
        api.call("GET", "/v1/capsules/{id}/processes", id=cid, expect=409, label="paused")
        api.call("POST", "/v1/capsules/{id}/files/list", id=cid, json={"path": "/"}, expect=409, label="paused")
        for path in ws_paths:
            refused_in_band(path, cid, "not running (status: paused)")
        api.call("GET", "/v1/capsules/{id}", id=cid, expect=200, label="paused")
        api.call("GET", "/v1/capsules/{id}/metrics", id=cid, expect=200, label="paused")
        r = api.call("POST", "/v1/capsules/{id}/resume", id=cid, expect=200)
        if r.status_code == 200 and r.json().get("status") != "running":
            chk.fail(f"resume: status {r.json().get('status')}")
        api.call("POST", "/v1/capsules/{id}/resume", id=cid, expect=409, label="not paused")

        # -- API keys --------------------------------------------------------- #
        r = api.call("POST", "/v1/api-keys", json={"name": unique("oa-key")}, expect=201)
        if r.status_code == 201:
            created_keys.append(r.json()["id"])
        r = api.call("POST", "/v1/api-keys", params={"kind": "e2b"}, json={}, expect=201, label="e2b, default name")
        if r.status_code == 201:
            created_keys.append(r.json()["id"])
        api.call("POST", "/v1/api-keys", params={"kind": "bogus"}, json={}, expect=400, label="bad kind")
        api.call("POST", "/v1/api-keys", json={"name": "a\u0001b"}, expect=400, label="control char")
        api.call("GET", "/v1/api-keys", expect=200)
        while created_keys:
            kid = created_keys.pop()
            api.call("DELETE", "/v1/api-keys/{id}", id=kid, expect=204)
            api.call("DELETE", "/v1/api-keys/{id}", id=kid, expect=404, label="gone")
        api.call("DELETE", "/v1/api-keys/{id}", id="key-nope", expect=400)

        # -- teams ------------------------------------------------------------ #
        r = api.call("GET", "/v1/teams", expect=200)
        admin_team = next((t["id"] for t in r.json() if t.get("is_admin")), None) if r.status_code == 200 else None
        if admin_team:
            api.call("GET", "/v1/teams/{id}", id=admin_team, expect=200)
        api.call("GET", "/v1/teams/{id}", id="team-nope", expect=400)
        api.call("GET", "/v1/teams/{id}", id="team-" + "0" * 25, expect=404)
        api.call("POST", "/v1/teams", json={}, expect=400, label="no name")
        r = api.call("POST", "/v1/teams", json={"name": unique("oa-team")}, expect=201)
        if r.status_code == 201:
            with server.http(r.json()["api_key"]) as hb:
                b = Api(chk, hb)
                b.call("GET", "/v1/teams", expect=200, label="team B")
                b.call("POST", "/v1/teams", json={"name": "x"}, expect=403, label="team B")
                b.call("GET", "/v1/hosts", expect=403, label="team B")
                b.call("POST", "/v1/hosts", expect=403, label="team B")
                b.call("GET", "/v1/capsules/{id}", id=cid, expect=404, label="team A's capsule")
                b.call("POST", "/v1/capsules/{id}/exec", id=cid, json={"cmd": "true"}, expect=404,
                       label="team A's capsule")
                if admin_team:
                    b.call("GET", "/v1/teams/{id}", id=admin_team, expect=404, label="another team")

        # -- hosts ------------------------------------------------------------ #
        r = api.call("GET", "/v1/hosts", expect=200)
        host_id = r.json()[0]["id"] if r.status_code == 200 and r.json() else None
        if host_id:
            api.call("GET", "/v1/hosts/{id}", id=host_id, expect=200)
            api_anon.call("POST", "/v1/hosts/{id}/heartbeat", id=host_id, expect=401, label="no token")
            api_anon.call("POST", "/v1/hosts/{id}/heartbeat", id=host_id, expect=401, label="not a host token",
                          headers={"X-Host-Token": "0" * 64})
        api.call("GET", "/v1/hosts/{id}", id="host-nope", expect=400)
        api.call("GET", "/v1/hosts/{id}", id="host-" + "0" * 25, expect=404)
        api_anon.call("POST", "/v1/hosts/{id}/heartbeat", id="host-" + "0" * 25, expect=401,
                      headers={"X-Host-Token": "0" * 64}, label="unknown host, not a host token")
        api_anon.call("POST", "/v1/hosts/{id}/heartbeat", id="host-nope", expect=400,
                      headers={"X-Host-Token": "0" * 64}, label="bad id")
        api.call("POST", "/v1/hosts", expect=201)
        api_anon.call("POST", "/v1/hosts/register", json={"token": "0" * 64, "address": "127.0.0.1:1"},
                      expect=401, label="unknown token")
        api_anon.call("POST", "/v1/hosts/register", json={"token": "0" * 64, "address": "nowhere"},
                      expect=400, label="bad address")
        api_anon.call("POST", "/v1/hosts/register", json={"token": "0" * 64}, expect=400, label="no address")
        api_anon.call("POST", "/v1/hosts/auth/refresh", json={"refresh_token": "0" * 64}, expect=401,
                      label="unknown refresh token")
        api_anon.call("POST", "/v1/hosts/auth/refresh", json={}, expect=400, label="no refresh token")

        # -- the path-form proxy (plain-text refusals) ------------------------ #
        api.call("GET", PROXY_SPEC_PATH, raw_path=f"/proxy/{cid}/8080/", expect=502, label="nothing listening")
        api_anon.call("GET", PROXY_SPEC_PATH, raw_path=f"/proxy/{cid}/8080/", expect=401, label="no key")
        api.call("GET", PROXY_SPEC_PATH, raw_path=f"/proxy/{unknown_capsule_id()}/8080/", expect=404)
        api.call("GET", PROXY_SPEC_PATH, raw_path="/proxy/nope/8080/", expect=400, label="bad id")
        api.call("GET", PROXY_SPEC_PATH, raw_path=f"/proxy/{cid}/0/", expect=400, label="bad port")

        # -- destroy ---------------------------------------------------------- #
        stop_sse.set()  # the event stream's reader ends after the destroy event
        api.call("DELETE", "/v1/capsules/{id}", id=cid, expect=204)
        api.call("DELETE", "/v1/capsules/{id}", id=cid, expect=204, label="again (idempotent)")
        destroyed, cid = cid, None
        r = api.call("GET", "/v1/capsules/{id}", id=destroyed, expect=200, label="stopped")
        if r.status_code == 200 and r.json().get("status") != "stopped":
            chk.fail(f"GET after destroy: status {r.json().get('status')}")
        api.call("POST", "/v1/capsules/{id}/exec", id=destroyed, json={"cmd": "true"}, expect=409, label="stopped")
        api.call("GET", "/v1/capsules/{id}/metrics", id=destroyed, expect=404, label="stopped")
        api.call("POST", "/v1/capsules/{id}/resume", id=destroyed, expect=409, label="stopped")
        api.call("DELETE", "/v1/capsules/{id}", id=unknown_capsule_id(), expect=404)

        # -- the events seen meanwhile ---------------------------------------- #
        sse.wait_for(
            lambda items: any(i[0] == "capsule.destroy" and destroyed in str(i[1]) for i in items),
            30, "capsule.destroy on the event stream",
        )
        head = sse.items[0]
        if head[0] != "__response__" or head[1] != 200 or not head[2].startswith("text/event-stream"):
            chk.fail(f"GET /v1/events/stream: {head}")
        chk.covered.add(("GET", "/v1/events/stream", 200))
        seen = []
        for name, data in list(sse.items[1:]):
            try:
                obj = json.loads(data)
            except ValueError:
                chk.fail(f"SSE {name}: data is not JSON: {data[:300]!r}")
                continue
            if name == "connected":
                chk.check_data("SSE connected", "ConnectedEvent", obj)
                continue
            chk.check_data(f"SSE {name}", "Event", obj)
            if obj.get("event") != name:
                chk.fail(f"SSE: event line {name!r} but data.event {obj.get('event')!r}")
            rid = (obj.get("resource") or {}).get("id")
            if rid in (destroyed, snap):
                seen.append(name)
        for want in ("capsule.create", "template.snapshot.create", "capsule.pause", "capsule.resume",
                     "template.snapshot.delete", "capsule.destroy"):
            if want not in seen:
                chk.fail(f"SSE: no {want} event for this test's capsule/template (saw {seen})")
    finally:
        stop_sse.set()
        for kid in created_keys:
            h.delete(f"/v1/api-keys/{kid}")
        for name in snapshot_names:
            h.delete(f"/v1/snapshots/{name}")
        if cid:
            h.delete(f"/v1/capsules/{cid}")
        h.close()
        anon.close()
        sse.done.wait(5)
        sse_client.close()

    # what was exercised, per operation (visible with -rA or on failure)
    ops = {}
    for m, p, s in sorted(chk.covered):
        ops.setdefault(f"{m} {p}", []).append(s)
    print("exercised:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(ops.items())))
    untested = [f"{m.upper()} {p}" for p, item in spec["paths"].items() for m in item
                if m in HTTP_METHODS and f"{m.upper()} {p}" not in ops and p != PROXY_SPEC_PATH]
    print("not exercised here:", untested)
    assert not chk.failures, f"{len(chk.failures)} mismatch(es) with openapi.yaml:\n- " + "\n- ".join(chk.failures)


def test_rejections_are_json_errors(server) -> None:
    """Refusals of axum's own extractors must leave as the JSON error too
    (``crates/wrenn-cp/src/api/mod.rs``: "errors leave as ApiError JSON,
    never as axum's plain-text rejections"), and the document promises JSON
    for these statuses."""
    from wrennsdk_support import raw_request, unknown_capsule_id

    spec = load_spec()
    chk = SpecChecker(spec)
    with server.http() as h:
        api = Api(chk, h)
        # a WebSocket route asked without the upgrade headers
        api.call("GET", "/v1/capsules/{id}/exec/stream", id=unknown_capsule_id(), label="no upgrade headers")
        api.call("GET", "/v1/capsules/{id}/pty", id=unknown_capsule_id(), label="no upgrade headers")
    assert not chk.failures, "\n- ".join(["plain-text rejections:"] + chk.failures)
    # a method the route does not have: a JSON error too
    with server.http() as h:
        r = h.put("/v1/capsules", json={})
        assert r.status_code == 405 and r.json()["error"]["code"] == "invalid_request", r.text
        # a path parameter that is not UTF-8, a query parameter given twice,
        # a body that breaks off (chunked, no end): 400 JSON, as the SDK
        # needs to raise its validation error
        for path in ("/v1/capsules/%FF", "/api/v1/capsules/%FF/exec",
                     f"/v1/capsules/{unknown_capsule_id()}/files/tar?path=a&path=b"):
            r = h.request("POST" if path.endswith("/exec") else "GET", path)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", (path, r.text)
    broken = raw_request(server.base_url, "POST", "/v1/capsules",
                         {"X-API-Key": server.api_key, "Content-Type": "application/json"},
                         [b'{"template": "min'], content_length=None, chunked_end=b"zz\r\n")
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_request", broken.text


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-docs"]:
        DOCS_PATH.write_text(render_docs(load_spec()), encoding="utf-8")
        print(f"wrote {DOCS_PATH}")
    else:
        print(f"usage: {sys.argv[0]} --write-docs", file=sys.stderr)
        sys.exit(2)
