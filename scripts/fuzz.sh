#!/usr/bin/env bash
# Build the fuzz targets (envd's and wrenn-types') with cargo-fuzz and run each one
# (as many at once as there are CPUs).
#   scripts/fuzz.sh smoke        build, then 20 s per target (what CI does)
#   scripts/fuzz.sh run SECONDS  build, then SECONDS per target
# The toolchain here is stable only; RUSTC_BOOTSTRAP lets cargo-fuzz pass its
# -Z flags. Sanitizers are off (none ships for stable); coverage guidance and
# panics-as-crashes still apply. A crash leaves its input under
# crates/<crate>/fuzz/artifacts/ and fails the script with the fuzzer's log.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-smoke}
secs=${2:-20}
[ "$mode" = smoke ] && secs=20
# Both crates' targets share one directory: libFuzzer's C++ and the crates
# they have in common are built once (wrenn-types' build: 32 s → 9 s here).
build=(-s none --target-dir "$PWD/target/fuzz")
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked -q
export RUSTC_BOOTSTRAP=1
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# Every target of every crate's fuzz/ (name → that crate).
declare -A crate_of=()
targets=()
for f in crates/*/fuzz/fuzz_targets/*.rs; do
  target=$(basename "$f" .rs)
  crate_of[$target]=${f%/fuzz/fuzz_targets/*}
  targets+=("$target")
done
for dir in crates/*/fuzz; do
  (cd "${dir%/fuzz}" && cargo fuzz build "${build[@]}")
done
# One target per CPU at a time (libFuzzer runs on one thread): the smoke
# takes 3 rounds of 20 s here instead of 5.
fuzz_one() {
  local target=$1 dir=${crate_of[$1]}
  cd "$dir"
  mkdir -p "fuzz/corpus/$target"
  cargo fuzz run "${build[@]}" "$target" -- -max_total_time="$secs" -rss_limit_mb=2048 \
    -max_len=65536 >"$logs/$target.log" 2>&1
}
jobs_max=$(nproc)
declare -A pid_of=()
# A TERM or ^C to this script alone ends the runs too (each is a subshell,
# cargo, cargo-fuzz and the fuzzer: the tree, leaves first).
kill_tree() {
  local child
  for child in $(pgrep -P "$1"); do kill_tree "$child"; done
  kill -TERM "$1" 2>/dev/null || true
}
trap 'for p in "${pid_of[@]}"; do kill_tree "$p"; done; exit 130' INT TERM
echo "==> fuzz ${targets[*]} (${secs}s each, $jobs_max at a time)"
for target in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n || true; done
  fuzz_one "$target" &
  pid_of[$target]=$!
done
failed=()
for target in "${targets[@]}"; do
  if wait "${pid_of[$target]}"; then
    echo "$target: $(grep -E '^Done|^#[0-9]+ +DONE' "$logs/$target.log" | tail -n 1)"
  else
    cat "$logs/$target.log"
    failed+=("$target")
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz targets failed: ${failed[*]}" >&2
  exit 1
fi
