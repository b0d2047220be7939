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
    curl ca-certificates
    runc crun                       # OCI runtimes the agent drives
    nftables                        # the agent's capsule firewall
    debootstrap                     # the `minimal` (Debian) template
    python3                         # a stand-in "internet" server in tests
  )
  local missing=()
  for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "==> installing: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# envd as the static binary capsules run (static-pie glibc, no NSS).
build_static_envd() {
  RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release -p envd --target x86_64-unknown-linux-gnu
  echo "$PWD/target/x86_64-unknown-linux-gnu/release/envd"
}
