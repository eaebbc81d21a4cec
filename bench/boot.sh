#!/usr/bin/env bash
# Boot benchmark: VMM setup time, time to the kernel's `Run /init` and to the userspace marker,
# VMM RSS outside guest memory, emulation assists. Prints a markdown table. Then the kestrel
# binary next to QEMU microvm (Debian's qemu-system-x86, installed if missing): exec → VM
# created, CPU time, RSS outside guest RAM.
source "$(dirname "$0")/../scripts/common.sh"
need_root
build_guest
cd "$ROOT"
install_packages qemu-system-x86
cargo build --release --quiet -p kestrel -p kestrel-tests --bin kestrel --bin bench_boot --bin bench_peer
for v in 1 2; do
    "$ROOT/target/release/bench_boot" --vcpus "$v" --mem 128 --runs "${RUNS:-1}"
    echo
done
"$ROOT/target/release/bench_peer" --vcpus 1 --mem 128 --runs "${RUNS:-3}"
