#!/usr/bin/env bash
# Device benchmark: virtio-blk (seq 1 MiB, random 4 KiB) in the guest vs the host file,
# vsock host->guest, VMM CPU time per request. Prints a markdown table.
source "$(dirname "$0")/../scripts/common.sh"
need_root
build_guest
cd "$ROOT"
cargo build --release --quiet -p kestrel-tests --bin bench_devices
exec "$ROOT/target/release/bench_devices"
