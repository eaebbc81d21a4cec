//! Hotplug latency: `Sandbox::resize_vcpus` 1→2→1 and `Sandbox::resize_memory`
//! +128 MiB / −128 MiB on a real guest, each split into VMM time and guest time (agent calls).
//! Prints a table.
//!
//! `cargo run --release -p kestrel-tests --bin bench_hotplug [-- --rounds N]`

use std::time::{Duration, Instant};

use kestrel_sandbox::Sandbox;
use kestrel_tests::cli_arg;
use kestrel_tests::guest::agent_guest;
use kestrel_vmm::Vm;

/// One table row: round, operation, total time, VMM time, guest time, what the guest reports.
fn row(round: u64, op: &str, t: Instant, vmm: Duration, guest: Duration, result: &str) {
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
    println!(
        "| {round} | {op} | {} | {} | {} | {result} |",
        ms(t.elapsed()),
        ms(vmm),
        ms(guest)
    );
}

fn main() {
    let rounds = cli_arg("--rounds", 3);
    let mut guest = agent_guest("bench-hotplug", 1, 256);
    guest.config.machine_config.max_vcpus = Some(2);
    guest.config.machine_config.max_mem_size_mib = Some(1024);
    let vm = Vm::create(&guest.config).expect("create");
    let sb = Sandbox::from_vm(&guest.config, vm, Duration::from_secs(900)).expect("boot");
    println!(
        "Kestrel hotplug bench (1 vCPU / 256 MiB, max 2 vCPUs / 1 GiB; guest kernel emulated here)"
    );
    println!();
    println!("| round | operation | total | VMM | guest | result |");
    println!("|---|---|---|---|---|---|");
    for r in 1..=rounds {
        for n in [2, 1] {
            let t = Instant::now();
            let v = sb.resize_vcpus(n).expect("resize_vcpus");
            let result = format!("online {}", v.online);
            row(
                r,
                &format!("vCPUs → {n}"),
                t,
                v.vmm_time,
                v.guest_time,
                &result,
            );
        }
        for mib in [384, 256] {
            let t = Instant::now();
            let m = sb.resize_memory(mib).expect("resize_memory");
            let result = format!("MemTotal {} MiB", m.guest_mem_total_kb / 1024);
            let op = format!("memory → {mib} MiB");
            row(r, &op, t, m.vmm_time, m.guest_time, &result);
        }
    }
    let _ = sb.shutdown(Duration::from_secs(60));
}
