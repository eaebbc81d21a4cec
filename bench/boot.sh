#!/usr/bin/env bash
# Boot benchmark: VMM setup time, time to the kernel's `Run /init` and to the userspace marker,
# VMM RSS outside guest memory, emulation assists. Prints a markdown table.
source "$(dirname "$0")/../scripts/common.sh"
need_root
build_guest
cd "$ROOT"
cargo build --release --quiet -p kestrel-tests --bin bench_boot
for v in 1 2; do
    "$ROOT/target/release/bench_boot" --vcpus "$v" --mem 128 --runs "${RUNS:-1}"
    echo
done
