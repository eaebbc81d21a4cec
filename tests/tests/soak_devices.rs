//! Soak: 20 cycles of a VM with every device kind (virtio-blk on a file, virtio-net on a TAP
//! in a network namespace, hybrid vsock with a connection each way, virtio-fs in-process and
//! through vhost-user with a real virtiofsd, a hot-plugged vCPU and memory block) — fds,
//! threads, socket files, TAPs, mounts and child processes (virtiofsd) back to their starting
//! values, RSS within a bound. Needs root, iproute2 and virtiofsd (`$VIRTIOFSD` or
//! `scripts/install-virtiofsd.sh`); a missing one fails the test. Shares its cycles with
//! `bench/soak.sh` (`kestrel_tests::soak`); `KESTREL_SOAK_TABLE=1` prints the table here too.

use kestrel_tests::soak::{device_soak, CountingAlloc, DEVICE_CYCLES};

/// Counts the live Rust heap: it must be back to the same bytes and blocks after the cycles.
#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[test]
fn twenty_cycles_with_every_device_kind_leave_nothing_behind() {
    let r = device_soak(DEVICE_CYCLES);
    assert_eq!(r.cycles, 20);
    // The counts see a live VM: event loop, two vCPUs (one hot-plugged) and the in-process
    // share's worker; the vsock socket and the host-port listener; the TAP; virtiofsd.
    let (b, d) = (&r.before, &r.during);
    // (Linux keeps 15 bytes of a thread name, so Kestrel's threads carry the short
    // `k-<vm>-...` form: loop, vCPUs, and the share's worker `k-<vm>-fs0-q1`.)
    assert_eq!(
        d.threads_named(&["k-", "kestrel-"]),
        ["k-sd-evloop", "k-sd-fs0-q1", "k-sd-vcpu0", "k-sd-vcpu1"],
        "{:?}",
        d.thread_names
    );
    let kvm = d.kvm_threads();
    assert_eq!(d.threads, b.threads + 4 + kvm, "{:?}", d.thread_names);
    assert!(d.fds > b.fds, "{d:?}");
    assert_eq!(d.sockets, ["v.sock", "v.sock_5000"]);
    assert_eq!(d.links.len(), b.links.len() + 1, "{d:?}");
    assert!(
        d.children.len() == 1 && d.children[0].contains("virtiofsd"),
        "{d:?}"
    );
    assert!(r.after.children.is_empty(), "{:?}", r.after.children);
    r.assert_clean();
}
