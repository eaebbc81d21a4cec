#!/usr/bin/env bash
# Hotplug latency: resize_vcpus 1→2→1 and resize_memory +128/−128 MiB on a real guest, split
# into VMM time and guest time. Prints a markdown table.
source "$(dirname "$0")/../scripts/common.sh"
need_root
build_guest
cd "$ROOT"
cargo build --release --quiet -p kestrel-tests --bin bench_hotplug
exec "$ROOT/target/release/bench_hotplug" --rounds "${ROUNDS:-3}"
