"""``e2b_code_interpreter.Sandbox`` (template ``code-interpreter-v1``): the
SDK posts to ``{E2B_SANDBOX_URL}/execute`` and ``/contexts`` with
``E2b-Sandbox-Port: 49999`` (code_interpreter_sync.py:60-63, 196-215) and
reads NDJSON lines ``{"type": "stdout"|"stderr"|"result"|"error"|
"number_of_executions", …}`` (models.py:462-492). The server on 49999 lives
in the template (docs/e2b-compat-plan.md §9)."""

from __future__ import annotations

import threading
import time

import pytest
from e2b_code_interpreter import AsyncSandbox as AsyncCodeSandbox
from e2b_code_interpreter import Context, Execution
from e2b_code_interpreter import Sandbox as CodeSandbox

from e2bcp_support import CODE_INTERPRETER, SANDBOX_TIMEOUT

pytestmark = pytest.mark.code_interpreter


@pytest.fixture
def ci(code_interpreter_template: str):
    sbx = CodeSandbox.create(timeout=SANDBOX_TIMEOUT)
    try:
        yield sbx
    finally:
        try:
            sbx.kill()
        except Exception:
            pass


def test_run_code(ci: CodeSandbox) -> None:
    # The very first call right after create: the sandbox is ready when
    # create returns (no client-side retry exists in the SDK).
    r = ci.run_code("1+1")
    assert isinstance(r, Execution)
    assert r.error is None and r.text == "2"
    assert r.results[0].is_main_result and r.execution_count is not None

    r = ci.run_code("print('hello')")
    assert r.logs.stdout == ["hello\n"] and r.text is None

    ci.run_code("x = 41")
    assert ci.run_code("x + 1").text == "42"  # the kernel keeps state

    r = ci.run_code("import sys; sys.stderr.write('oops\\n')")
    assert "oops" in "".join(r.logs.stderr)

    r = ci.run_code("1/0")
    assert r.error is not None and r.error.name == "ZeroDivisionError"
    assert "division by zero" in r.error.value and r.error.traceback

    seen: list[str] = []
    ci.run_code("for i in range(3): print(i)", on_stdout=lambda m: seen.append(m.line))
    assert "".join(seen) == "0\n1\n2\n"

    r = ci.run_code("import os; os.environ.get('CI_VAR')", envs={"CI_VAR": "set"})
    assert r.text == "'set'"


def test_rich_results(ci: CodeSandbox) -> None:
    r = ci.run_code("from IPython.display import HTML, display; display(HTML('<b>x</b>')); 7")
    assert r.text == "7"
    assert any(res.html == "<b>x</b>" and not res.is_main_result for res in r.results)
    r = ci.run_code(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"
    )
    assert any(res.png for res in r.results), r.results


def test_contexts(ci: CodeSandbox) -> None:
    ctx = ci.create_code_context(cwd="/tmp")
    assert isinstance(ctx, Context) and ctx.id and ctx.cwd == "/tmp"
    assert ci.run_code("import os; os.getcwd()", context=ctx).text == "'/tmp'"
    ci.run_code("y = 5", context=ctx)
    assert ci.run_code("y", context=ctx).text == "5"
    assert ctx.id in [c.id for c in ci.list_code_contexts()]
    ci.restart_code_context(ctx)
    assert ci.run_code("'y' in dir()", context=ctx).text == "False"
    ci.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in ci.list_code_contexts()]


def test_language_python(ci: CodeSandbox) -> None:
    assert ci.run_code("2**10", language="python").text == "1024"
    ctx = ci.create_code_context(language="python")
    assert ctx.language == "python"


def test_base_api_on_code_interpreter(ci: CodeSandbox) -> None:
    info = ci.get_info()
    assert info.template_id and info.state.value == "running"
    assert ci.commands.run("whoami").stdout == "user\n"
    assert ci.files.write("/home/user/a.py", "print(1)").path == "/home/user/a.py"


def test_kill_during_execution(code_interpreter_template: str) -> None:
    sbx = CodeSandbox.create(timeout=SANDBOX_TIMEOUT)
    out: list = []

    def run() -> None:
        try:
            out.append(sbx.run_code("import time; time.sleep(60)", timeout=90))
        except Exception as exc:  # noqa: BLE001
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(2)
    sbx.kill()
    t.join(60)
    assert out and isinstance(out[0], Exception), out


async def test_async_run_code(code_interpreter_template: str) -> None:
    sbx = await AsyncCodeSandbox.create(timeout=SANDBOX_TIMEOUT)
    try:
        r = await sbx.run_code("sum(range(10))")
        assert r.text == "45"
    finally:
        await sbx.kill()


@pytest.mark.no_server
def test_default_template() -> None:
    assert CodeSandbox.default_template == CODE_INTERPRETER
