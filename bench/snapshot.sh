#!/usr/bin/env bash
# Snapshot benchmark (issue 13): pause and resume latency, snapshot time and size, restore to
# the first KVM_RUN for 128/256/512 MiB (VMM side, tiny guests); with KESTREL_BENCH_GUEST=1 also
# the real guest: restore to the agent answering (VMM and guest shares), pool hand-out and
# refresh, PSS per clone. Prints markdown tables next to the anchors (Firecracker's 180 ms
# full-snapshot create, Dragonball's 11.1 ms restore-to-agent-ready) and the targets
# (restore to first KVM_RUN < 10 ms, hand-out < 1 ms).
#   RUNS=5 KESTREL_BENCH_GUEST=1 CLONES=8 bench/snapshot.sh
source "$(dirname "$0")/../scripts/common.sh"
need_root
if [ "${KESTREL_BENCH_GUEST:-0}" = 1 ]; then
    build_guest
fi
cd "$ROOT"
cargo build --release --quiet -p kestrel-tests --bin bench_snapshot
exec "$ROOT/target/release/bench_snapshot" --runs "${RUNS:-3}" --clones "${CLONES:-8}"
