#!/usr/bin/env bash
# Install virtiofsd (the Rust vhost-user-fs daemon) if it is missing, and print the path of the
# binary on stdout (nothing else goes to stdout; progress goes to stderr).
#
#   scripts/install-virtiofsd.sh            # find or install, print the path
#   VIRTIOFSD=/path/to/virtiofsd scripts/install-virtiofsd.sh   # use this one if it works
#
# Order:
#   1. $VIRTIOFSD, then `virtiofsd` on PATH, ~/.cargo/bin/virtiofsd, /usr/libexec/virtiofsd
#      (where Debian 13+ / Fedora put it) -- any of them that is the Rust daemon.
#   2. Debian's `virtiofsd` package, when the configured suites have one (trixie and later;
#      bookworm does not).
#   3. `cargo install virtiofsd --locked` from crates.io, after `apt-get install`ing its build
#      dependencies (libcap-ng-dev, libseccomp-dev, pkg-config).
#
# Not used: the legacy C virtiofsd that bookworm's qemu-system-common ships at
# /usr/lib/qemu/virtiofsd (QEMU 7.2). It is unmaintained upstream (removed in QEMU 8.0), has a
# different command line (`-o source=DIR`, no `--shared-dir`/`--sandbox`), and pulls in the QEMU
# system packages. Kestrel's docs and tests use the Rust daemon's command line.
set -euo pipefail

log() { echo "install-virtiofsd: $*" >&2; }

# The Rust daemon answers --version with "virtiofsd <version>" and knows --shared-dir.
is_rust_virtiofsd() {
    local bin=$1
    [ -x "$bin" ] || return 1
    "$bin" --help 2>&1 | grep -q -- '--shared-dir' || return 1
}

found() {
    log "using $1 ($("$1" --version 2>/dev/null | head -n1 || true))"
    echo "$1"
    exit 0
}

candidates=()
if [ -n "${VIRTIOFSD:-}" ]; then
    candidates+=("$VIRTIOFSD")
fi
if p=$(command -v virtiofsd 2>/dev/null); then
    candidates+=("$p")
fi
candidates+=("${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd" /usr/libexec/virtiofsd /usr/bin/virtiofsd)
for c in "${candidates[@]}"; do
    if is_rust_virtiofsd "$c"; then
        found "$c"
    fi
done

if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
    SUDO=()
    log "not root and no sudo: apt-get steps may fail"
elif [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
else
    SUDO=()
fi

apt_updated=0
apt_update() {
    if [ $apt_updated -eq 0 ]; then
        log "apt-get update"
        "${SUDO[@]}" apt-get update >&2
        apt_updated=1
    fi
}

if command -v apt-get >/dev/null 2>&1; then
    apt_update
    candidate=$(apt-cache policy virtiofsd 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [ -n "$candidate" ] && [ "$candidate" != "(none)" ]; then
        log "installing Debian package virtiofsd $candidate"
        DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y --no-install-recommends \
            virtiofsd >&2
        for c in /usr/libexec/virtiofsd /usr/bin/virtiofsd; do
            if is_rust_virtiofsd "$c"; then
                found "$c"
            fi
        done
        log "the virtiofsd package did not leave a usable binary; building from crates.io"
    else
        log "no Debian virtiofsd package in the configured suites; building from crates.io"
    fi
    log "installing build dependencies (libcap-ng-dev libseccomp-dev pkg-config)"
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y --no-install-recommends \
        libcap-ng-dev libseccomp-dev pkg-config >&2
fi

if ! command -v cargo >/dev/null 2>&1; then
    log "cargo not found: install a Rust toolchain first"
    exit 1
fi
log "cargo install virtiofsd --locked (a few minutes)"
cargo install --locked virtiofsd >&2
bin="${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd"
if is_rust_virtiofsd "$bin"; then
    found "$bin"
fi
log "cargo install finished but $bin is not usable"
exit 1
