#!/usr/bin/env bash
# Soak tables: 1000 create/start/stop cycles of a tiny guest and 20 cycles of a VM with every
# device kind (blk, TAP net in a network namespace, vsock, virtio-fs in-process and through
# virtiofsd, a hot-plugged vCPU and memory block): time per phase, and fds, threads, RSS, socket
# files, TAPs, mounts and child processes before, during a cycle and after. The same cycles as
# tests/tests/soak.rs and soak_devices.rs. Exits 1 if anything was left behind.
#   TINY=1000 DEVICES=20 bench/soak.sh
source "$(dirname "$0")/../scripts/common.sh"
need_root
check_kvm
install_host_packages
VIRTIOFSD="$(bash "$ROOT/scripts/install-virtiofsd.sh")"
export VIRTIOFSD
cd "$ROOT"
cargo build --release --quiet -p kestrel-tests --bin bench_soak
exec "${CARGO_TARGET_DIR:-$ROOT/target}/release/bench_soak" --tiny "${TINY:-1000}" --devices "${DEVICES:-20}"
