# Shared by scripts/*.sh. Source it; it sets ROOT and helpers.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KESTREL_CACHE="${KESTREL_CACHE:-/var/cache/kestrel}"

log() { echo "[kestrel] $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "run as root (KVM, TAP devices, network namespaces and apt need it)" >&2
        exit 1
    fi
}

# Debian packages the build and the tests use, beyond what build-guest.sh installs.
HOST_PACKAGES=(e2fsprogs iproute2 procps iputils-ping cpio curl)

install_host_packages() {
    install_packages "${HOST_PACKAGES[@]}"
}

# Install the given Debian packages if any is missing.
install_packages() {
    local missing=()
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$p")
        fi
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

check_toolchain() {
    if ! command -v cargo >/dev/null; then
        echo "cargo not found: install a Rust toolchain (rustup, stable >= 1.80) first" >&2
        exit 1
    fi
}

check_kvm() {
    if [ ! -c /dev/kvm ]; then
        echo "/dev/kvm is missing: Kestrel needs KVM" >&2
        exit 1
    fi
}

# TAP devices (the network tests) need /dev/net/tun.
check_tun() {
    if [ ! -c /dev/net/tun ]; then
        echo "/dev/net/tun is missing: the network tests need TAP devices" >&2
        exit 1
    fi
}

# The guest agent (resources/agent) is its own workspace (the root Cargo.toml excludes it) and
# runs in the guest as a static binary: cargo for it with the target and flags
# resources/build-guest.sh builds it with (static glibc; CARGO_ENCODED_RUSTFLAGS beats any
# RUSTFLAGS of the caller, --target keeps crt-static off proc-macros), in its own target dir,
# one per checkout (cargo's freshness check cannot tell checkouts apart; see build-guest.sh).
AGENT_TARGET=x86_64-unknown-linux-gnu
agent_target_dir() {
    echo "$KESTREL_CACHE/agent-test-target/$(printf '%s' "$ROOT" | sha256sum | cut -c1-16)"
}
agent_cargo() {
    local tdir
    tdir="$(agent_target_dir)"
    (cd "$ROOT/resources/agent" &&
        CARGO_ENCODED_RUSTFLAGS=$'-Ctarget-feature=+crt-static\x1f-Crelocation-model=static' \
        cargo "$1" --locked --target "$AGENT_TARGET" --target-dir "$tdir" "${@:2}")
}

build_guest() {
    log "building the guest kernel and initramfs (cached in $KESTREL_CACHE)"
    bash "$ROOT/resources/build-guest.sh" >/dev/null
}
