#!/usr/bin/env bash
# Build the fuzz targets (envd's and wrenn-types') with cargo-fuzz and run each one.
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
log=$(mktemp)
trap 'rm -f "$log"' EXIT
fuzz_crate() {
  local dir=$1; shift
  (
    cd "$dir"
    cargo fuzz build "${build[@]}"
    for target in "$@"; do
      echo "==> fuzz $target (${secs}s)"
      mkdir -p "fuzz/corpus/$target"
      if ! cargo fuzz run "${build[@]}" "$target" -- -max_total_time="$secs" -rss_limit_mb=2048 \
          -max_len=65536 >"$log" 2>&1; then
        cat "$log"
        exit 1
      fi
      grep -E '^Done|^#[0-9]+ +DONE' "$log" | tail -n 1
    done
  )
}
fuzz_crate crates/envd connect_envelope multipart
fuzz_crate crates/wrenn-types ids proxy_path recipe
