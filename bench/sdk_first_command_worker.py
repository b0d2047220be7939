"""One side of bench/sdk_first_command.py, run in that SDK's venv: N times,
create a sandbox/capsule from `base` cold, run `echo hi` in it, and time
creation + first command (the teardown is not timed). Prints the times in
milliseconds as a JSON list on the last line.

    python sdk_first_command_worker.py e2b|wrenn N
"""

import json
import sys
import time


def e2b_once() -> float:
    from e2b import Sandbox

    t0 = time.perf_counter()
    with Sandbox.create() as sbx:  # template `base`, POST /v2/sandboxes
        r = sbx.commands.run("echo hi")
        dt = time.perf_counter() - t0
        assert r.stdout == "hi\n", r
    return dt


def wrenn_once() -> float:
    from wrenn import Capsule

    t0 = time.perf_counter()
    with Capsule(template="base") as c:  # POST /v1/capsules
        r = c.commands.run("echo hi")
        dt = time.perf_counter() - t0
        assert r.stdout == "hi\n", r
    return dt


def main() -> None:
    which, n = sys.argv[1], int(sys.argv[2])
    once = {"e2b": e2b_once, "wrenn": wrenn_once}[which]
    print(json.dumps([round(once() * 1000, 2) for _ in range(n)]))


if __name__ == "__main__":
    main()
