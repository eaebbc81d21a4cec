//! Soak: 1000 create/start/stop cycles of a tiny guest that activates a hybrid vsock device
//! — fds, threads, socket files, network interfaces, mounts and child processes back to their
//! starting values, RSS within a bound. The cycles live in `kestrel_tests::soak`, shared with
//! `bench/soak.sh`; `KESTREL_SOAK_TABLE=1` prints the table here too. One test per binary, so
//! no other test's threads disturb the counts (the device soak is `soak_devices.rs`).

use kestrel_tests::soak::{tiny_soak, CountingAlloc, TINY_CYCLES};

/// Counts the live Rust heap: it must be back to the same bytes and blocks after the cycles.
#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[test]
fn thousand_tiny_cycles_leave_nothing_behind() {
    let r = tiny_soak(TINY_CYCLES);
    assert_eq!(r.cycles, 1000);
    // The counts see a live VM: its event loop and vCPU thread (and, on hosts whose KVM
    // runs one, the VM's `kvm-nx-lpage-recovery` worker, which the kernel counts as a thread
    // of this process), its fds, its vsock socket.
    let (b, d) = (&r.before, &r.during);
    assert_eq!(
        d.threads_named(&["k-soak-"]),
        ["k-soak-evloop", "k-soak-vcpu0"]
    );
    let kvm = d.kvm_threads();
    assert_eq!(d.threads, b.threads + 2 + kvm, "{:?}", d.thread_names);
    assert!(d.fds > b.fds, "{d:?}");
    assert_eq!(d.sockets, ["v.sock"]);
    r.assert_clean();
}
