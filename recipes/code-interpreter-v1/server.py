"""The code interpreter of `code-interpreter-v1`: the HTTP API that E2B's
`e2b-code-interpreter` SDK speaks on port 49999, backed by IPython kernels
(jupyter_client + ipykernel).

    GET    /health                  200 once the default context's kernel runs
    POST   /execute                 {"code", "context_id"?, "language"?, "env_vars"?}
                                    -> 200, NDJSON: stdout / stderr / result /
                                       error / number_of_executions lines
    POST   /contexts                {"language"?, "cwd"?} -> {"id", "language", "cwd"}
    GET    /contexts                -> [{"id", "language", "cwd"}]
    DELETE /contexts/{id}           -> 204
    POST   /contexts/{id}/restart   -> 204

One kernel per context; executions in a context run one at a time.
Errors are JSON {"code", "message"}: 404 unknown context, 400 bad input.
Written for wrenn (docs/e2b-compat-plan.md §8); only Python is offered.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from jupyter_client.manager import KernelManager

DEFAULT_CWD = os.environ.get("HOME", "/home/user")
LANGUAGES = ("python",)
MAX_BODY = 16 << 20

# MIME type of a display bundle -> the SDK's Result field
MIME_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
}


class Context:
    def __init__(self, language: str, cwd: str) -> None:
        self.id = str(uuid.uuid4())
        self.language = language
        self.cwd = cwd
        self.lock = threading.Lock()
        self.manager = KernelManager(kernel_name="python3")
        self.client = None
        self.start()

    def start(self) -> None:
        self.manager.start_kernel(cwd=self.cwd)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def restart(self) -> None:
        with self.lock:
            self.client.stop_channels()
            self.manager.restart_kernel(now=True)
            self.client = self.manager.client()
            self.client.start_channels()
            self.client.wait_for_ready(timeout=60)

    def shutdown(self) -> None:
        try:
            self.client.stop_channels()
        finally:
            self.manager.shutdown_kernel(now=True)

    def json(self) -> dict:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def _silent(self, code: str) -> None:
        msg_id = self.client.execute(code, silent=True, store_history=False)
        while True:
            msg = self.client.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status" \
                    and msg["content"]["execution_state"] == "idle":
                return

    def execute(self, code: str, env_vars: dict | None, emit) -> None:
        """Run `code`, calling `emit(dict)` for every output line."""
        with self.lock:
            if env_vars:
                # For this execution only: set, then restore.
                self._silent(
                    "import os as __o, json as __j\n"
                    f"__wrenn_env = {{k: __o.environ.get(k) for k in {list(env_vars)!r}}}\n"
                    f"__o.environ.update(__j.loads({json.dumps(json.dumps(env_vars))}))\n"
                )
            try:
                self._run(code, emit)
            finally:
                if env_vars:
                    self._silent(
                        "for __k, __v in __wrenn_env.items():\n"
                        "    __o.environ.pop(__k, None) if __v is None else __o.environ.__setitem__(__k, __v)\n"
                        "del __wrenn_env\n"
                    )

    def _run(self, code: str, emit) -> None:
        msg_id = self.client.execute(code, store_history=True, allow_stdin=False)
        count = None
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=1)
            except queue.Empty:
                if not self.manager.is_alive():
                    emit({"type": "error", "name": "KernelDied", "value": "the kernel died",
                          "traceback": ""})
                    return
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            now = time.time_ns()
            if kind == "stream":
                emit({"type": content["name"], "text": content["text"], "timestamp": now})
            elif kind in ("execute_result", "display_data"):
                emit(result(content["data"], kind == "execute_result"))
            elif kind == "error":
                emit({"type": "error", "name": content["ename"], "value": content["evalue"],
                      "traceback": "\n".join(content["traceback"])})
            elif kind == "execute_input":
                count = content.get("execution_count")
            elif kind == "status" and content["execution_state"] == "idle":
                break
        if count is not None:
            emit({"type": "number_of_executions", "execution_count": count})


def result(data: dict, main: bool) -> dict:
    out: dict = {"type": "result", "is_main_result": main}
    extra = {}
    for mime, value in data.items():
        field = MIME_FIELDS.get(mime)
        if field:
            out[field] = value
        else:
            extra[mime] = value
    if extra:
        out["extra"] = extra
    return out


class Contexts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_id: dict[str, Context] = {}
        self.default: Context | None = None

    def create(self, language: str, cwd: str) -> Context:
        ctx = Context(language, cwd)
        with self.lock:
            self.by_id[ctx.id] = ctx
        return ctx

    def get(self, context_id: str) -> Context | None:
        with self.lock:
            return self.by_id.get(context_id)

    def remove(self, context_id: str) -> Context | None:
        with self.lock:
            return self.by_id.pop(context_id, None)

    def all(self) -> list[Context]:
        with self.lock:
            return list(self.by_id.values())


CONTEXTS = Contexts()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "wrenn-code-interpreter"

    def log_message(self, fmt, *args):  # quiet: the capsule has no log reader
        pass

    # ---- helpers -------------------------------------------------------
    def send_json(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, status: int, message: str) -> None:
        self.send_json(status, {"code": status, "message": message})

    def send_empty(self, status: int = 204) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def read_json(self):
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = self.read_chunked()
        elif length > MAX_BODY:
            raise ValueError("body too large")
        else:
            raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        return body

    def read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():
                    pass
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline()
            if len(out) > MAX_BODY:
                raise ValueError("body too large")

    # ---- routes --------------------------------------------------------
    def do_GET(self) -> None:
        if self.path == "/health":
            ok = CONTEXTS.default is not None
            return self.send_json(200 if ok else 503, {"status": "ok" if ok else "starting"})
        if self.path == "/contexts":
            return self.send_json(200, [c.json() for c in CONTEXTS.all()])
        self.send_error_json(404, f"no route {self.path}")

    def do_DELETE(self) -> None:
        parts = self.path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "contexts":
            ctx = CONTEXTS.remove(parts[1])
            if ctx is None:
                return self.send_error_json(404, f"context {parts[1]} not found")
            if ctx is CONTEXTS.default:
                CONTEXTS.default = None
            ctx.shutdown()
            return self.send_empty()
        self.send_error_json(404, f"no route {self.path}")

    def do_POST(self) -> None:
        try:
            body = self.read_json()
        except (ValueError, json.JSONDecodeError) as e:
            return self.send_error_json(400, f"invalid JSON body: {e}")
        parts = self.path.strip("/").split("/")
        if parts == ["execute"]:
            return self.execute(body)
        if parts == ["contexts"]:
            language = body.get("language") or "python"
            if language not in LANGUAGES:
                return self.send_error_json(400, f"language {language!r} is not supported (python only)")
            cwd = body.get("cwd") or DEFAULT_CWD
            if not os.path.isdir(cwd):
                return self.send_error_json(400, f"cwd {cwd!r} is not a directory")
            return self.send_json(200, CONTEXTS.create(language, cwd).json())
        if len(parts) == 3 and parts[0] == "contexts" and parts[2] == "restart":
            ctx = CONTEXTS.get(parts[1])
            if ctx is None:
                return self.send_error_json(404, f"context {parts[1]} not found")
            ctx.restart()
            return self.send_empty()
        self.send_error_json(404, f"no route {self.path}")

    def execute(self, body: dict) -> None:
        code = body.get("code")
        if not isinstance(code, str):
            return self.send_error_json(400, "code must be a string")
        env_vars = body.get("env_vars") or None
        if env_vars is not None and not (
            isinstance(env_vars, dict) and all(isinstance(v, str) for v in env_vars.values())
        ):
            return self.send_error_json(400, "env_vars must map names to strings")
        language = body.get("language")
        if language and language not in LANGUAGES:
            return self.send_error_json(400, f"language {language!r} is not supported (python only)")
        context_id = body.get("context_id")
        ctx = CONTEXTS.get(context_id) if context_id else CONTEXTS.default
        if ctx is None:
            return self.send_error_json(404, f"context {context_id} not found")

        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def emit(line: dict) -> None:
            data = (json.dumps(line) + "\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        try:
            ctx.execute(code, env_vars, emit)
        except Exception as e:  # noqa: BLE001 - reported to the client
            emit({"type": "error", "name": type(e).__name__, "value": str(e), "traceback": ""})
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=49999)
    args = p.parse_args()
    server = ThreadingHTTPServer(("0.0.0.0", args.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    CONTEXTS.default = CONTEXTS.create("python", DEFAULT_CWD)
    threading.Event().wait()


if __name__ == "__main__":
    main()
