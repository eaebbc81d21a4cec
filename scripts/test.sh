#!/usr/bin/env bash
# Run every test: formatting, lints, unit tests, KVM tests with tiny guests, real-guest tests
# (block, vsock, network in a namespace, virtio-fs incl. virtiofsd, hotplug), the guest agent's
# lints and unit tests (its own workspace, built static as for the guest) and 60 s fuzz runs.
#   FUZZ_SECONDS=0 scripts/test.sh   # skip fuzzing
source "$(dirname "$0")/common.sh"
need_root
check_toolchain
check_kvm
check_tun
install_host_packages
build_guest
VIRTIOFSD="$(bash "$ROOT/scripts/install-virtiofsd.sh")"
export VIRTIOFSD
log "virtiofsd: $VIRTIOFSD"
cd "$ROOT"
log "cargo fmt --check"
cargo fmt --all -- --check
# Every test, the ones that need KVM, root, TAP and the real guest included (a plain
# `cargo test --workspace` leaves those out). With KESTREL_TEST_REQUIRE_ALL set, a test whose
# prerequisite is missing fails instead of skipping: a green run means everything ran.
export KESTREL_TEST_REQUIRE_ALL=1
ALL_TESTS=(--workspace --features kestrel-tests/guest)
log "cargo clippy"
cargo clippy "${ALL_TESTS[@]}" --all-targets --quiet -- -D warnings
log "guest agent: cargo fmt --check, clippy, test, release build (static $AGENT_TARGET)"
(cd "$ROOT/resources/agent" && cargo fmt -- --check)
agent_cargo clippy --all-targets --quiet -- -D warnings
agent_cargo test
agent_cargo build --release --quiet
# The host client's test against the real agent (kestrel-sandbox, real_agent_over_unix_socket):
# both ends of the wire protocol as built from this checkout.
KESTREL_AGENT_TEST_BIN="$(agent_target_dir)/$AGENT_TARGET/release/kestrel-agent"
export KESTREL_AGENT_TEST_BIN
log "cargo test"
cargo test "${ALL_TESTS[@]}" -- --test-threads=2
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
if [ "$FUZZ_SECONDS" -gt 0 ]; then
    for t in $(ls "$ROOT/fuzz/fuzz_targets" | sed 's/\.rs$//'); do
        log "fuzz $t for $FUZZ_SECONDS s"
        bash "$ROOT/fuzz/run.sh" "$t" "$FUZZ_SECONDS" > "/tmp/kestrel-fuzz-$t.log" 2>&1 || {
            # The crash report (panic message, stack) comes before libFuzzer's summary.
            grep -E -A25 "panicked at|fatal runtime error|ERROR: libFuzzer|ERROR: AddressSanitizer" \
                "/tmp/kestrel-fuzz-$t.log" | head -60 >&2 || true
            tail -40 "/tmp/kestrel-fuzz-$t.log" >&2
            echo "fuzz target $t failed" >&2
            exit 1
        }
        grep -E "^stat::number_of_executed_units|Done [0-9]+ runs" "/tmp/kestrel-fuzz-$t.log" >&2 || true
    done
fi
log "all tests passed"
