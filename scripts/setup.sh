#!/usr/bin/env bash
# Install what is missing, build the guest and kestrel, and boot the default guest.
source "$(dirname "$0")/common.sh"
need_root
check_toolchain
check_kvm
install_host_packages
build_guest
log "building kestrel (release)"
(cd "$ROOT" && cargo build --release --quiet -p kestrel)
log "booting the default guest (about 100 s on a nested KVM); it prints KESTREL_GUEST_READY and reboots"
exec "$ROOT/target/release/kestrel" </dev/null
