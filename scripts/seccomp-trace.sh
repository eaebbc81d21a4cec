#!/usr/bin/env bash
# Measure the system calls of each Kestrel thread class, to regenerate the allow-lists in
# vmm/src/seccomp.rs (docs/design.md, "Seccomp").
#
#   scripts/seccomp-trace.sh [OUT_DIR] [-- TEST_FILTER...]
#
# Runs under `strace -f -ff` (the filters' EPERM mode only makes a call fail, so a call the
# lists lack still shows up in the trace):
#   - the real-guest tests matching TEST_FILTER (default: block+vsock, virtio-fs (its main share
#     served on a worker thread), TAP networking, hotplug and the extended-state assist; one
#     guest boot each, ~90 s per boot),
#   - the virtio-fs unit test that serves requests on worker threads.
# Each thread's trace is classified by the name the thread gives itself (PR_SET_NAME:
# `k-<vm>-vcpu<N>`, `k-<vm>-evloop`, `...-q<N>` for fs workers, `kestrel-fs-init` for the
# short-lived thread virtio-fs imports a share's root on, under the filter of the thread that
# started it) and only the calls made after naming count (the filter is installed right
# after). Prints, per class, the syscalls with
# their counts and the ioctl requests. Root, /dev/kvm and the guest in /var/cache/kestrel needed.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_root
command -v strace >/dev/null || install_packages strace

OUT=/tmp/kestrel-seccomp-trace
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
    OUT="$1"
    shift
fi
if [ "${1:-}" = "--" ]; then
    shift
fi
FILTERS=("$@")
if [ "${#FILTERS[@]}" -eq 0 ]; then
    FILTERS=(block_and_vsock_through_the_agent virtio_fs_in_process tap_networking
        vcpu_and_memory_hotplug guest_tasks_keep_their_own_vector_registers)
fi
rm -rf "$OUT"
mkdir -p "$OUT/guest" "$OUT/fs"
cd "$ROOT"

test_binary() { # cargo args... -> path of the test executable
    cargo test "$@" --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' | tail -n1
}

GUEST_BIN="$(test_binary -p kestrel-tests --features guest --test guest)"
DEV_BIN="$(test_binary -p kestrel-devices --lib)"
log "tracing $GUEST_BIN ${FILTERS[*]}"
strace -f -ff -qq -o "$OUT/guest/t" \
    "$GUEST_BIN" --test-threads=1 "${FILTERS[@]}" >"$OUT/guest.log" 2>&1 ||
    log "guest tests failed (see $OUT/guest.log); the trace may be incomplete"
log "tracing $DEV_BIN fuse_operations_on_worker_threads"
strace -f -ff -qq -o "$OUT/fs/t" "$DEV_BIN" --test-threads=1 --exact \
    virtio::fs::tests::fuse_operations_on_worker_threads >"$OUT/fs.log" 2>&1 ||
    log "the fs worker test failed (see $OUT/fs.log)"

python3 - "$OUT" <<'EOF'
import collections, glob, re, sys
out = sys.argv[1]
classes = {"vcpu": re.compile(r"-vcpu\d+$"), "evloop": re.compile(r"-evloop$"),
           "fs-worker": re.compile(r"-q\d+$"), "fs-init": re.compile(r"-fs-init$")}
calls = {c: collections.Counter() for c in classes}
ioctls = {c: collections.Counter() for c in classes}
threads = collections.Counter()
line_re = re.compile(r"^([a-z0-9_]+)\((.*)")
for path in glob.glob(out + "/*/t.*"):
    cls, named = None, False
    for line in open(path, errors="replace"):
        m = line_re.match(line)
        if not m:
            continue
        name, args = m.groups()
        if not named:
            n = re.match(r'PR_SET_NAME, "([^"]*)"', args) if name == "prctl" else None
            if n:
                cls = next((c for c, r in classes.items() if r.search(n.group(1))), None)
                named = True
                if cls:
                    threads[cls] += 1
            continue
        if cls is None:
            continue
        calls[cls][name] += 1
        if name == "ioctl":
            ioctls[cls][args.split(",")[1].strip()] += 1
for c in classes:
    print(f"== {c} ({threads[c]} threads)")
    print("  " + " ".join(f"{k}:{v}" for k, v in sorted(calls[c].items())))
    if ioctls[c]:
        print("  ioctl: " + " ".join(f"{k}:{v}" for k, v in sorted(ioctls[c].items())))
EOF
