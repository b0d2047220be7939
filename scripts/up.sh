#!/usr/bin/env bash
# Install what Wrenn needs, build it, and run `wrenn up`: the control plane
# and a host agent on this machine, API on http://127.0.0.1:8000, data in
# /var/lib/wrenn (SQLite). The first start builds the `minimal` template
# (debootstrap, a few minutes) and then `code-runner-beta` (Jupyter).
# Extra arguments go to `wrenn up` (e.g. --listen 0.0.0.0:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
install_packages
ensure_cargo
envd=$(build_static_envd | tail -n 1)
$SUDO install -D -m 0755 "$envd" /usr/local/lib/wrenn/envd
cargo build --release -p wrenn-cli
$SUDO install -D -m 0755 target/release/wrenn /usr/local/bin/wrenn
echo "==> wrenn up (Ctrl-C stops it; capsules keep running and are re-adopted next time)"
exec $SUDO /usr/local/bin/wrenn up "$@"
