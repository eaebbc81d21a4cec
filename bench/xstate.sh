#!/usr/bin/env bash
# Extended-state switch benchmark (docs/nested-kvm.md §10): VMM cost of one guest task switch's
# save + load next to a host task switch, then two guests side by side, assist on and off:
# vector-register probe, busybox pipelines, segfaults. Prints markdown tables.
#   OPS=20000 PIPELINES=30 bench/xstate.sh
source "$(dirname "$0")/../scripts/common.sh"
need_root
build_guest
cd "$ROOT"
cargo build --release --quiet -p kestrel-tests --bin bench_xstate
"$ROOT/target/release/bench_xstate" --ops "${OPS:-20000}" --pipelines "${PIPELINES:-30}"
