#!/usr/bin/env bash
# Network (TCP over virtio-net/TAP, MTU 1500 and 65520) and virtio-fs (in-process vs vhost-user)
# benchmark tables. --net-only / --fs-only run one half.
source "$(dirname "$0")/../scripts/common.sh"
need_root
build_guest
VIRTIOFSD="$(bash "$ROOT/scripts/install-virtiofsd.sh")"
export VIRTIOFSD
cd "$ROOT"
cargo build --release --quiet -p kestrel-tests --bin bench_net_fs
exec "$ROOT/target/release/bench_net_fs" "$@"
