# Shared by the scripts in this folder: privileges and package installs.
# shellcheck shell=bash

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi

# The Debian packages the build and the tests need (idempotent).
install_packages() {
  local pkgs=(
    build-essential pkg-config      # cc for crates that build C
    busybox-static                  # a bare rootfs for PID-1 tests
    procps psmisc                   # pgrep, ps: tests look for processes
    passwd                          # useradd/userdel: tests switch users
    iproute2 util-linux             # ip netns, unshare: privileged tests
    python3-venv                    # the SDK test venv
    tmux                            # drives `wrenn shell` in tests/cli
    curl ca-certificates
    libnss-myhostname               # *.localhost resolves: the SDKs' capsule port URLs
    runc crun                       # OCI runtimes the agent drives
    nftables                        # the agent's capsule firewall
    debootstrap                     # the `minimal` (Debian) template
    python3                         # a stand-in "internet" server in tests
    postgresql                      # the control plane's second database
    nginx-light wrk                 # the proxy benchmark's baseline and load generator
    qemu-system-x86 qemu-utils      # VM capsules (QEMU microvm; qcow2 overlays)
    e2fsprogs                       # mkfs.ext4 -d: VM capsules' root disks
    kmod                            # depmod: the guest kernel's modules.dep
  )
  local missing
  mapfile -t missing < <(not_installed "${pkgs[@]}")
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "==> installing: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Installing one package can remove another (an image with a
    # backported qemu-utils lost it to Debian's qemu-system-x86): once
    # more for whatever is missing now.
    mapfile -t missing < <(not_installed "${pkgs[@]}")
    if [ "${#missing[@]}" -gt 0 ]; then
      echo "==> installing (removed by the first pass): ${missing[*]}"
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    mapfile -t missing < <(not_installed "${pkgs[@]}")
    if [ "${#missing[@]}" -gt 0 ]; then
      echo "cannot install: ${missing[*]}" >&2
      return 1
    fi
    # Debian starts the nginx service on install; the benchmark runs its own.
    $SUDO service nginx stop >/dev/null 2>&1 || true
  fi
}

# Cargo, through rustup, when this machine has none (a fresh Debian: its
# own rustc is too old for this workspace). The toolchain installed is the
# one rust-toolchain.toml pins, with its components. Needs curl (from
# install_packages) and the network; a no-op where cargo is on PATH.
ensure_cargo() {
  command -v cargo >/dev/null && return 0
  if [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    local channel
    channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
    echo "==> installing Rust $channel (rustup, into $HOME/.cargo)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
      sh -s -- -y -q --no-modify-path --profile minimal --default-toolchain "$channel" -c rustfmt -c clippy
  fi
  export PATH="$HOME/.cargo/bin:$PATH"
}

# The packages of "$@" that are not installed, one per line (a package
# removed with its configuration files kept counts as not installed).
not_installed() {
  local p
  for p in "$@"; do
    # (second letter: the state, i = installed; the first is the wanted
    # action, h for a held package)
    [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null)" == ?i* ]] || echo "$p"
  done
}

# envd as the static binary capsules run (static-pie glibc, no NSS).
build_static_envd() {
  RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release -p envd --target x86_64-unknown-linux-gnu
  echo "$PWD/target/x86_64-unknown-linux-gnu/release/envd"
}

# Debian's cloud kernel, unpacked (not installed) into $1, for VM capsules:
# what the agent would download on its first VM capsule, fetched once here
# so that every test shares it.
fetch_guest_kernel() {
  local dir=$1
  if ls "$dir"/boot/vmlinuz-* >/dev/null 2>&1; then return 0; fi
  local pkg tmp
  pkg=$(apt-cache depends --no-recommends --no-suggests linux-image-cloud-amd64 |
        sed -n 's/^ *Depends: \(linux-image-.*\)$/\1/p' | head -n 1)
  tmp=$(mktemp -d "$(dirname "$dir")/.kernel-XXXXXX")
  (cd "$tmp" && apt-get download -q "$pkg" >/dev/null)
  dpkg-deb -x "$tmp"/*.deb "$tmp/root"
  # (the package's postinst would make modules.dep; unpacked, we do)
  depmod -b "$tmp/root" "$(ls "$tmp/root/lib/modules")"
  mv "$tmp/root" "$dir"
  rm -rf "$tmp"
}

# A private PostgreSQL cluster for the tests: Debian's server binaries,
# our own data directory, socket and port, trust auth on 127.0.0.1. Two
# databases: `wrenn_rust` (cargo tests) and `wrenn_sdk` (the SDK suite).
# `stop_postgres` stops it and removes everything.
start_postgres() {
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  PG_DIR=$(mktemp -d /var/tmp/wrenn-pg.XXXXXX)
  PG_PORT=$((20000 + RANDOM % 20000))
  chown postgres: "$PG_DIR"
  runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_DIR/data" -A trust -U postgres >/dev/null
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
    -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
  for db in wrenn_rust wrenn_sdk; do
    runuser -u postgres -- "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" "$db"
  done
  export WRENN_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/wrenn_rust"
  WRENN_SDK_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/wrenn_sdk"
  echo "==> PostgreSQL on 127.0.0.1:$PG_PORT ($PG_DIR)"
}

stop_postgres() {
  [ -n "${PG_DIR:-}" ] || return 0
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$PG_DIR"
  PG_DIR=""
}

# What the build left on disk, for CI logs (a full disk failed a CI run).
disk_report() {
  echo "==> disk: target $(du -sh target 2>/dev/null | cut -f1); $(df -h --output=avail . | tail -n 1 | tr -d ' ') free"
}
