#!/usr/bin/env bash
# Install what Wrenn needs, build envd, and run it in dev mode on
# 127.0.0.1:49983 (where E2B's SDK looks in debug mode: E2B_DEBUG=true).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
install_packages
envd=$(build_static_envd | tail -n 1)
echo "==> envd --dev on http://127.0.0.1:49983 (Ctrl-C stops it)"
echo "    try: E2B_DEBUG=true python3 -c 'from e2b import Sandbox; print(Sandbox.create().commands.run(\"uname -a\").stdout)'"
exec "$envd" --dev --addr 127.0.0.1 --port 49983
