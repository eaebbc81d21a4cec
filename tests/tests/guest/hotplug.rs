//! CPU and memory hotplug without ACPI on the project's guest kernel: one clone of the shared
//! template (1 vCPU, 256 MiB; max 2 vCPUs, 1 GiB), many checks through the sandbox API and the
//! guest agent.

use std::time::{Duration, Instant};

use kestrel_agent_proto as proto;
use kestrel_sandbox::{Sandbox, SandboxError};
use kestrel_vmm::{ThreadKind, VcpuRunState};

use kestrel_tests::resident_kib;

use super::{check_clean_shutdown, sh};

fn vm_rss_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Print how long a resize took: in all, in the VMM and in the guest.
fn report(what: &str, t: Instant, vmm: Duration, guest: Duration) {
    eprintln!(
        "{what}: {:?} total (VMM {vmm:?}, guest {guest:?})",
        t.elapsed()
    );
}

#[test]
fn vcpu_and_memory_hotplug() {
    // A clone of the shared template (1 vCPU and 256 MiB, up to 2 vCPUs and 1 GiB: the
    // configuration this test needs), so hotplug runs on a restored VM; the template's
    // creation is the cold boot of this configuration.
    let sb = crate::snapshot::clone_of(crate::snapshot::template(), "hp");
    let vm = sb.vm();
    assert!(vm.cmdline().contains("maxcpus=1"), "{}", vm.cmdline());
    let cpus = sb.agent().cpus().unwrap();
    assert_eq!(cpus.online, "0");
    assert_eq!(cpus.possible, "0-1", "the MP table lists max_vcpus CPUs");

    check_vcpu_grow_runs_work_on_the_new_cpu(&sb);
    check_vcpu_shrink_parks_and_grow_reuses(&sb);
    let grown_kb = check_memory_grow_is_usable(&sb);
    check_memory_shrink_releases_host_pages(&sb, grown_kb);
    // Grow again after a shrink reuses the freed range.
    let r = sb.resize_memory(512).unwrap();
    assert_eq!(r.total_mib, 512);
    check_clean_shutdown(&sb);
}

/// Growing to 2 vCPUs onlines CPU 1 in the guest, lists its thread, and a CPU-bound process
/// pinned to it runs there.
fn check_vcpu_grow_runs_work_on_the_new_cpu(sb: &Sandbox) {
    let t = Instant::now();
    let r = sb.resize_vcpus(2).unwrap();
    report("resize_vcpus 1->2", t, r.vmm_time, r.guest_time);
    assert_eq!(r.online, "0-1");
    let threads = sb.vm().threads();
    assert!(
        threads.iter().any(|t| t.kind == ThreadKind::Vcpu(1)),
        "new vCPU thread listed: {threads:?}"
    );
    let (code, out, err) = sh(
        &mut sb.agent(),
        "taskset -c 1 sh -c 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; \
         set -- $(cat /proc/self/stat); shift 38; echo cpu=$1'",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "cpu=1",
        "CPU-bound process did not run on CPU 1"
    );
}

/// Shrinking to 1 offlines CPU 1 and parks its thread; vCPU 0 is never removed and
/// out-of-range requests are typed errors; growing again reuses the parked vCPU (no new
/// thread).
fn check_vcpu_shrink_parks_and_grow_reuses(sb: &Sandbox) {
    let r = sb.resize_vcpus(1).unwrap();
    assert_eq!(r.online, "0");
    assert!(sb.vm().vcpu_states().contains(&(1, VcpuRunState::Parked)));
    let nthreads = sb.vm().threads().len();
    assert!(matches!(
        sb.resize_vcpus(0),
        Err(SandboxError::VcpuRange { .. })
    ));
    assert!(matches!(
        sb.resize_vcpus(3),
        Err(SandboxError::VcpuRange { max: 2, .. })
    ));
    let r = sb.resize_vcpus(2).unwrap();
    assert_eq!(r.online, "0-1");
    assert_eq!(sb.vm().threads().len(), nthreads);
    assert!(sb.vm().vcpu_states().contains(&(1, VcpuRunState::Running)));
}

/// +256 MiB in 128 MiB blocks shows in the guest's MemTotal, and a process can allocate and
/// touch 200 MiB (more than was free before the grow). Returns MemTotal (kB) after the grow.
fn check_memory_grow_is_usable(sb: &Sandbox) -> u64 {
    let before_kb = sb.agent().meminfo().unwrap().mem_total_kb;
    let t = Instant::now();
    let r = sb.resize_memory(512).unwrap();
    report("resize_memory +256 MiB", t, r.vmm_time, r.guest_time);
    assert_eq!(r.block_size, 128 << 20);
    assert_eq!(r.total_mib, 512);
    let after_kb = sb.agent().meminfo().unwrap().mem_total_kb;
    assert!(
        after_kb >= before_kb + 240 * 1024,
        "MemTotal {before_kb} -> {after_kb} kB"
    );
    let mut a = sb.agent();
    a.set_call_timeout(Some(Duration::from_secs(900)));
    let t = Instant::now();
    let r = a
        .request(proto::AllocTouch { mib: 200 })
        .expect("allocate and touch 200 MiB");
    eprintln!("touching 200 MiB in the guest took {:?}", t.elapsed());
    assert_eq!(r.pages, 51200);
    after_kb
}

/// Shrinking by 128 MiB offlines the top block in the guest (MemTotal drops below
/// `grown_kb`), deletes its slot and releases its host pages; beyond the maximum is a typed
/// error.
fn check_memory_shrink_releases_host_pages(sb: &Sandbox, grown_kb: u64) {
    let top = *sb.vm().plugged_memory().last().unwrap();
    let ranges = sb.vm().guest_memory_host_ranges();
    // Host ranges come in guest-address order: the top block is the last one.
    let (hs, he) = *ranges.last().unwrap();
    assert_eq!(he - hs, top.size);
    let block_rss_before = resident_kib(hs, he);
    let rss_before = vm_rss_kb();
    let r = sb.resize_memory(384).unwrap();
    assert_eq!(r.total_mib, 384);
    // The block's host pages are gone (the mapping is dropped or emptied); the process RSS is
    // printed too, but other guests may run in this process, so only the range is asserted.
    let block_rss_after = resident_kib(hs, he);
    eprintln!(
        "shrink: top block resident {block_rss_before} kB before, {block_rss_after} kB after; \
         process RSS {rss_before} -> {} kB",
        vm_rss_kb()
    );
    assert!(
        block_rss_before >= 1024,
        "the top block was never used ({block_rss_before} kB)"
    );
    assert!(
        block_rss_after <= 1024,
        "{block_rss_after} kB still resident"
    );
    let mt = sb.agent().meminfo().unwrap().mem_total_kb;
    assert!(mt < grown_kb, "guest MemTotal {grown_kb} -> {mt} kB");
    assert_eq!(sb.vm().plugged_memory().len(), 1);
    assert!(matches!(
        sb.resize_memory(2048),
        Err(SandboxError::MemoryRange { .. })
    ));
}
