#!/usr/bin/env bash
# Run every test: formatting, lints, unit tests, KVM tests with tiny guests and real-guest tests.
source "$(dirname "$0")/common.sh"
need_root
check_toolchain
check_kvm
install_host_packages
build_guest
cd "$ROOT"
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
log "cargo test"
cargo test --workspace -- --test-threads=2
log "all tests passed"
