#!/usr/bin/env bash
# The whole test suite: format, lints, Rust tests (the privileged ones need
# root: envd as PID 1, the agent on real runc, namespaces and nftables), the
# unmodified e2b SDK against a real envd, the wrenn and E2B SDKs against
# `wrenn up`, fuzz targets, and a smoke run of
# every benchmark. Installs what it needs; cleans up after itself. The Debian
# `minimal` template is built once into target/wrenn-fixtures and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
export CARGO_TERM_COLOR=never
# A fresh clone gains nothing from incremental caches but their disk space.
[ "${CI:-}" = true ] && export CARGO_INCREMENTAL=0

install_packages
ensure_cargo
start_postgres
trap stop_postgres EXIT
trap 'exit 130' INT TERM   # runs the EXIT trap: PostgreSQL is stopped on Ctrl-C / kill too

echo "==> [${SECONDS}s] cargo fmt --check"
cargo fmt --all -- --check

echo "==> [${SECONDS}s] cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "==> [${SECONDS}s] static envd"
ENVD_STATIC_BIN=$(build_static_envd | tail -n 1)
export ENVD_STATIC_BIN
if ldd "$ENVD_STATIC_BIN" 2>&1 | grep -q '=>'; then
  echo "envd is not static:"; ldd "$ENVD_STATIC_BIN"; exit 1
fi

echo "==> [${SECONDS}s] guest kernel for VM capsules"
mkdir -p target/wrenn-fixtures
fetch_guest_kernel "$PWD/target/wrenn-fixtures/vm-kernel"
export WRENN_VM_KERNEL="$PWD/target/wrenn-fixtures/vm-kernel"
ls "$WRENN_VM_KERNEL"/boot/

echo "==> [${SECONDS}s] cargo test"
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast
# (libtest hides what a passing test printed: say whether Firecracker ran)
cargo test -q -p wrenn-agent --test firecracker -- --nocapture 2>&1 | grep -E "SKIPPED|passed" || true
disk_report

echo "==> [${SECONDS}s] e2b SDK against envd"
venv=target/sdk-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade -r tests/e2b_sdk/requirements.txt
ENVD_BIN="$ENVD_STATIC_BIN" "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/e2b_sdk

echo "==> [${SECONDS}s] wrenn SDK against wrenn up (SQLite and PostgreSQL side by side)"
venv=target/wrenn-sdk-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --ignore-requires-python -r tests/wrenn_sdk/requirements.txt
# Most of a run is waiting on the API (TTLs, the SDK's pings, heartbeats), so
# the two runs share the machine well. Each has its own servers, instances
# and address pools (WRENN_TEST_POOLS: second octets of its own); their
# output is interleaved line by line, each line marked with its run.
# (WRENN_TEST_DATABASE_URL, the cargo tests' database, selects PostgreSQL
# for the suite: unset for the SQLite run.)
# A TERM to a run ends it as ^C would, tearing its servers down (conftest).
suite=("$venv/bin/python" -m pytest -q -p no:cacheprovider tests/wrenn_sdk)
env -u WRENN_TEST_DATABASE_URL WRENN_TEST_POOLS=120-159 ENVD_BIN="$ENVD_STATIC_BIN" \
  "${suite[@]}" > >(sed -u 's/^/[sqlite] /') 2>&1 &
runs=($!)
env WRENN_TEST_DATABASE_URL="$WRENN_SDK_DATABASE_URL" WRENN_TEST_POOLS=160-199 \
  ENVD_BIN="$ENVD_STATIC_BIN" "${suite[@]}" > >(sed -u 's/^/[postgres] /') 2>&1 &
runs+=($!)
trap 'kill -TERM "${runs[@]}" 2>/dev/null; wait; exit 130' INT TERM
failed=()
wait "${runs[0]}" || failed+=(SQLite)
wait "${runs[1]}" || failed+=(PostgreSQL)
trap 'exit 130' INT TERM
wait  # (the output's last lines)
if [ ${#failed[@]} -gt 0 ]; then
  echo "wrenn SDK suite failed on: ${failed[*]}"; exit 1
fi

echo "==> [${SECONDS}s] the wrenn command against wrenn up (wrenn shell in tmux)"
env -u WRENN_TEST_DATABASE_URL ENVD_BIN="$ENVD_STATIC_BIN" \
  target/wrenn-sdk-venv/bin/python -m pytest -q -p no:cacheprovider tests/cli

echo "==> [${SECONDS}s] E2B SDKs (Python and npm) against wrenn up"
venv=target/e2b-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -r tests/e2b_cp/requirements.txt
(cd tests/e2b_cp/js && npm ci --no-audit --no-fund --loglevel=error)
env -u WRENN_TEST_DATABASE_URL ENVD_BIN="$ENVD_STATIC_BIN" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/e2b_cp

echo "==> [${SECONDS}s] benchmark (smoke): the SDKs' first command"
ENVD_BIN="$ENVD_STATIC_BIN" target/e2b-venv/bin/python bench/sdk_first_command.py --smoke

# The smoke runs only prove that each benchmark still runs: the debug build
# that the tests made serves (a release build of the workspace would cost CI
# another ten minutes). Measurements use `cargo bench` (bench/RESULTS.md).
echo "==> [${SECONDS}s] benchmarks (smoke)"
cargo run -q -p wrenn-bench -- all --smoke --envd "$ENVD_STATIC_BIN"
cargo bench -q --profile dev -p wrenn-agent --bench capsules -- --smoke
cargo bench -q --profile dev -p wrenn-cli --bench api -- --smoke

disk_report
if [ "${CI:-}" = true ]; then
  # Nothing below uses the debug build; a CI disk is not big enough for it
  # and the fuzz builds at once.
  echo "==> [${SECONDS}s] CI: removing the debug build"
  cargo clean -q --profile dev
fi

echo "==> [${SECONDS}s] fuzz targets (build + short run)"
scripts/fuzz.sh smoke

disk_report
echo "==> all tests passed in ${SECONDS}s"
