"""Time to first command from a cold create, through E2B's Python SDK and
through wrenn's, against one `wrenn up` (issue 5's benchmark).

Each sample: `Sandbox.create()` (e2b 2.63, template `base`) or
`Capsule(template="base")` (wrenn 0.3.0), then `commands.run("echo hi")`,
timed from before the create until the output is back. The two SDKs run
alternately in batches of 10 in the same run (this machine is shared and
noisy: the ratio is the result, the milliseconds are context). Published
anchors on their own clouds: E2B 366-491 ms, Daytona 136-186 ms p50.

    ENVD_BIN=... target/e2b-venv/bin/python bench/sdk_first_command.py [--runs 50] [--smoke]

Needs target/e2b-venv (tests/e2b_cp/requirements.txt) and
target/wrenn-sdk-venv (tests/wrenn_sdk/requirements.txt). Prints a result
block for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "support"))

import wrenn_up  # noqa: E402

WORKER = Path(__file__).resolve().parent / "sdk_first_command_worker.py"
VENVS = {"e2b": REPO / "target/e2b-venv/bin/python", "wrenn": REPO / "target/wrenn-sdk-venv/bin/python"}


class WrennUp(wrenn_up.WrennUp):
    label = "bench-sdk"
    e2b_key = True
    cached_templates = ("base",)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def batch(which: str, n: int, srv) -> list[float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "WRENN_"))}
    if which == "e2b":
        env.update(E2B_API_KEY=srv.e2b_api_key, E2B_API_URL=srv.base_url, E2B_SANDBOX_URL=srv.base_url,
                   E2B_DOMAIN=f"localhost:{srv.port}")
    else:
        env.update(WRENN_API_KEY=srv.api_key, WRENN_BASE_URL=srv.base_url)
    r = subprocess.run([str(VENVS[which]), str(WORKER), which, str(n)], env=env,
                       capture_output=True, text=True, timeout=60 + 60 * n)
    if r.returncode != 0:
        raise SystemExit(f"{which} worker failed:\n{r.stdout}\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def breakdown(srv, n: int) -> dict[str, float]:
    """Where the wrenn flow's time goes: the server's part (raw `POST
    /v1/capsules` from `base`, then the first `POST /exec`, one reused httpx
    client) and the wrenn SDK's client construction (`WrennClient()`)."""
    import httpx

    create, first = [], []
    with httpx.Client(base_url=srv.base_url, headers={"X-API-Key": srv.api_key}, timeout=60,
                      trust_env=False) as h:
        for _ in range(n):
            t0 = time.perf_counter()
            r = h.post("/v1/capsules", json={"template": "base"})
            r.raise_for_status()
            cid = r.json()["id"]
            t1 = time.perf_counter()
            r = h.post(f"/v1/capsules/{cid}/exec", json={"cmd": "/bin/sh", "args": ["-c", "echo hi"]})
            t2 = time.perf_counter()
            assert r.json()["stdout"] == "hi\n", r.text
            h.delete(f"/v1/capsules/{cid}")
            create.append((t1 - t0) * 1000)
            first.append((t2 - t1) * 1000)
    code = ("import json, time\nfrom wrenn import WrennClient\nts = []\n"
            f"for _ in range({n}):\n    t = time.perf_counter(); WrennClient(); ts.append((time.perf_counter() - t) * 1000)\n"
            "print(json.dumps(ts))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WRENN_")}
    env.update(WRENN_API_KEY=srv.api_key, WRENN_BASE_URL=srv.base_url)
    r = subprocess.run([str(VENVS["wrenn"]), "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"WrennClient timing failed: {r.stderr}")
    client = json.loads(r.stdout.strip().splitlines()[-1])
    return {"create": statistics.median(create), "first exec": statistics.median(first),
            "WrennClient()": statistics.median(client)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="2 runs each: CI's check that it still works")
    args = ap.parse_args()
    runs = 2 if args.smoke else args.runs
    for which, py in VENVS.items():
        if not py.exists():
            raise SystemExit(f"{py} is missing: create the {which} venv (see the docstring)")
    up = WrennUp.fresh(code_runner=False, say=lambda m: print(m, file=sys.stderr))
    srv = up.start()
    try:
        times: dict[str, list[float]] = {"e2b": [], "wrenn": []}
        size = min(10, runs)
        while len(times["e2b"]) < runs:
            n = min(size, runs - len(times["e2b"]))
            for which in ("e2b", "wrenn"):
                times[which] += batch(which, n, srv)
        parts = breakdown(srv, 2 if args.smoke else 15)
    finally:
        up.finish(failed=False)
    p50 = {k: statistics.median(v) for k, v in times.items()}
    print(f"time to first command, {runs} runs each, template base, interleaved batches of {size}")
    for k, v in times.items():
        sdk = "e2b 2.63.0 Sandbox.create()" if k == "e2b" else "wrenn 0.3.0 Capsule()      "
        print(f"  {sdk}  p50 {p50[k]:7.1f} ms  p90 {pct(v, 90):7.1f} ms  min {min(v):7.1f} ms")
    print(f"  e2b/wrenn p50 ratio {p50['e2b'] / p50['wrenn']:.2f}x")
    print("  the wrenn flow's parts (p50): " + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()))


if __name__ == "__main__":
    main()
