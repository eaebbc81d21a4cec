//! Boot benchmark: prints a table of VMM-side and guest-side boot costs.
//!
//! `cargo run --release -p kestrel-tests --bin bench_boot [-- --vcpus N --mem MIB --runs R]`

use std::time::{Duration, Instant};

use kestrel_api::{SerialOutput, VmConfig};
use kestrel_tests::*;
use kestrel_vmm::{Vm, VmExit};

/// Resident memory of this process outside the given host ranges (KiB), from /proc/self/smaps.
fn rss_outside(ranges: &[(u64, u64)]) -> (u64, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    smaps_rss_split(&smaps, |start, _| {
        ranges.iter().any(|&(s, e)| start >= s && start < e)
    })
}

struct Run {
    create_us: u64,
    first_run_us: u64,
    run_init_s: f64,
    marker_s: f64,
    vmm_rss_kib: u64,
    guest_rss_kib: u64,
    assists: (u64, u64, u64),
    exits: (u64, u64),
}

fn one(vcpus: u32, mem: u64) -> Run {
    let g = guest_artifacts();
    let mut c = VmConfig::new(g.vmlinux, vcpus, mem);
    c.boot_source.initrd_path = Some(g.initramfs);
    c.serial.output = SerialOutput::None;
    let (base_rss, _) = rss_outside(&[]);
    let cap = Capture::default();
    let t0 = Instant::now();
    let vm = Vm::create_with_console(&c, Box::new(cap.clone())).expect("create");
    vm.start().expect("start");
    let mut run_init = None;
    let mut marker = None;
    while marker.is_none() && t0.elapsed() < Duration::from_secs(900) {
        let text = cap.text();
        if run_init.is_none() && text.contains("Run /init") {
            run_init = Some(t0.elapsed());
        }
        if text.contains("KESTREL_GUEST_READY") {
            marker = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let ranges = vm.guest_memory_host_ranges();
    let (outside, inside) = rss_outside(&ranges);
    let exit = vm.wait_timeout(Duration::from_secs(300));
    assert_eq!(exit, Some(VmExit::Reset), "console:\n{}", cap.text());
    let m = vm.metrics();
    Run {
        create_us: m.create_us,
        first_run_us: m.setup_to_first_run_us.unwrap_or(0),
        run_init_s: run_init.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN),
        marker_s: marker.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN),
        vmm_rss_kib: outside.saturating_sub(base_rss),
        guest_rss_kib: inside,
        assists: (m.assist_int3, m.assist_fwait, m.assist_ap_start),
        exits: (m.pio_exits, m.mmio_exits),
    }
}

fn main() {
    let vcpus = u32::try_from(cli_arg("--vcpus", 1)).expect("--vcpus: a vCPU count");
    let mem = cli_arg("--mem", 128);
    let runs = cli_arg("--runs", 1);
    println!("Kestrel boot bench: {vcpus} vCPU(s), {mem} MiB, {runs} run(s)");
    println!(
        "| run | create (ms) | create→first KVM_RUN (ms) | Run /init (s) | marker (s) | VMM RSS excl. guest (MiB) | guest RSS (MiB) | INT3 | FWAIT | AP start | PIO exits | MMIO exits |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for i in 0..runs {
        let r = one(vcpus, mem);
        println!(
            "| {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
            i + 1,
            r.create_us as f64 / 1000.0,
            r.first_run_us as f64 / 1000.0,
            r.run_init_s,
            r.marker_s,
            r.vmm_rss_kib as f64 / 1024.0,
            r.guest_rss_kib as f64 / 1024.0,
            r.assists.0,
            r.assists.1,
            r.assists.2,
            r.exits.0,
            r.exits.1
        );
    }
}
