//! CPU and memory hotplug without ACPI on the project's guest kernel: one boot (1 vCPU,
//! 256 MiB; max 2 vCPUs, 1 GiB), many checks through the sandbox API and the guest agent.

use std::time::{Duration, Instant};

use kestrel_api::{SerialOutput, VmConfig};
use kestrel_tests::*;

use super::{agent_vsock, create_captured, sandbox, sh};
use kestrel_sandbox::SandboxError;
use kestrel_vmm::{ThreadKind, VcpuRunState, VmExit};

/// Resident KiB of the host pages in [start, end) (mincore; 0 when the range is unmapped).
fn rss_in(start: u64, end: u64) -> u64 {
    let pages = ((end - start) / 4096) as usize;
    let mut v = vec![0u8; pages];
    // SAFETY: mincore only writes `pages` bytes into `v`; the range is page-aligned.
    let r = unsafe {
        libc::mincore(
            start as *mut libc::c_void,
            (end - start) as usize,
            v.as_mut_ptr(),
        )
    };
    if r != 0 {
        return 0;
    }
    v.iter().filter(|b| *b & 1 != 0).count() as u64 * 4
}

fn vm_rss_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn vcpu_and_memory_hotplug() {
    let g = guest_artifacts();
    let dir = scratch_dir().join("hotplug");
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let mut c = VmConfig::new(g.vmlinux, 1, 256);
    c.boot_source.initrd_path = Some(g.initramfs);
    c.machine_config.max_vcpus = Some(2);
    c.machine_config.max_mem_size_mib = Some(1024);
    c.serial.output = SerialOutput::None;
    c.kestrel.name = Some("hp".into());
    c.vsock = agent_vsock(&uds);
    let (vm, cap) = create_captured(&c);
    assert!(vm.cmdline().contains("maxcpus=1"), "{}", vm.cmdline());
    let sb = sandbox(&c, vm, &cap);
    {
        let mut a = sb.agent();
        let cpus = a.cpus().unwrap();
        assert_eq!(cpus.online, "0");
        assert_eq!(cpus.possible, "0-1", "the MP table lists max_vcpus CPUs");
    }

    // Grow to 2 vCPUs.
    let t = Instant::now();
    let r = sb.resize_vcpus(2).unwrap();
    eprintln!(
        "resize_vcpus 1->2: {:?} total (VMM {:?}, guest {:?})",
        t.elapsed(),
        r.vmm_time,
        r.guest_time
    );
    assert_eq!(r.online, "0-1");
    let threads = sb.vm().threads();
    assert!(
        threads.iter().any(|t| t.kind == ThreadKind::Vcpu(1)),
        "new vCPU thread listed: {threads:?}"
    );
    {
        let mut a = sb.agent();
        let (code, out, err) = sh(
            &mut a,
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

    // Shrink to 1: CPU 1 goes offline, its thread is parked.
    let r = sb.resize_vcpus(1).unwrap();
    assert_eq!(r.online, "0");
    assert!(sb.vm().vcpu_states().contains(&(1, VcpuRunState::Parked)));
    let nthreads = sb.vm().threads().len();
    // vCPU 0 is never removed; out-of-range requests are typed errors.
    assert!(matches!(
        sb.resize_vcpus(0),
        Err(SandboxError::VcpuRange { .. })
    ));
    assert!(matches!(
        sb.resize_vcpus(3),
        Err(SandboxError::VcpuRange { max: 2, .. })
    ));
    // Grow again: the parked vCPU is reused, no new thread.
    let r = sb.resize_vcpus(2).unwrap();
    assert_eq!(r.online, "0-1");
    assert_eq!(sb.vm().threads().len(), nthreads);
    assert!(sb.vm().vcpu_states().contains(&(1, VcpuRunState::Running)));

    // Memory: +256 MiB.
    let before_kb = sb.agent().meminfo().unwrap().mem_total_kb;
    let t = Instant::now();
    let r = sb.resize_memory(512).unwrap();
    eprintln!(
        "resize_memory +256 MiB: {:?} total (VMM {:?}, guest {:?})",
        t.elapsed(),
        r.vmm_time,
        r.guest_time
    );
    assert_eq!(r.block_size, 128 << 20);
    assert_eq!(r.total_mib, 512);
    let after_kb = sb.agent().meminfo().unwrap().mem_total_kb;
    assert!(
        after_kb >= before_kb + 240 * 1024,
        "MemTotal {before_kb} -> {after_kb} kB"
    );
    // A process can allocate and touch 200 MiB (more than was free before the grow).
    {
        let mut a = sb.agent();
        a.set_call_timeout(Some(Duration::from_secs(900)));
        let t = Instant::now();
        let r = a
            .call("alloc_touch", serde_json::json!({"mib": 200}))
            .expect("allocate and touch 200 MiB");
        eprintln!("touching 200 MiB in the guest took {:?}", t.elapsed());
        assert_eq!(r["pages"], 51200);
    }
    // Shrink by 128 MiB: the top block goes offline in the guest, its slot is deleted and its
    // host pages are released.
    let top = *sb.vm().plugged_memory().last().unwrap();
    let ranges = sb.vm().guest_memory_host_ranges();
    // Host ranges come in guest-address order: the top block is the last one.
    let (hs, he) = *ranges.last().unwrap();
    assert_eq!(he - hs, top.size);
    let block_rss_before = rss_in(hs, he);
    let rss_before = vm_rss_kb();
    let r = sb.resize_memory(384).unwrap();
    assert_eq!(r.total_mib, 384);
    // The block's host pages are gone (the mapping is dropped or emptied); the process RSS is
    // printed too, but other guests may run in this process, so only the range is asserted.
    let block_rss_after = rss_in(hs, he);
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
    assert!(mt < after_kb, "guest MemTotal {after_kb} -> {mt} kB");
    assert_eq!(sb.vm().plugged_memory().len(), 1);
    // Beyond the maximum: a typed error.
    assert!(matches!(
        sb.resize_memory(2048),
        Err(SandboxError::MemoryRange { .. })
    ));
    // Grow again after a shrink reuses the freed range.
    let r = sb.resize_memory(512).unwrap();
    assert_eq!(r.total_mib, 512);

    assert_eq!(sb.shutdown(Duration::from_secs(120)), Some(VmExit::Reset));
}
