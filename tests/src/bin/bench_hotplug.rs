//! Hotplug latency: `Sandbox::resize_vcpus` 1→2→1 and `Sandbox::resize_memory`
//! +128 MiB / −128 MiB on a real guest, each split into VMM time and guest time (agent calls).
//! Prints a table.
//!
//! `cargo run --release -p kestrel-tests --bin bench_hotplug [-- --rounds N]`

use std::time::{Duration, Instant};

use kestrel_api::{SerialOutput, VmConfig};
use kestrel_sandbox::Sandbox;
use kestrel_tests::*;
use kestrel_vmm::Vm;

fn main() {
    let rounds = cli_arg("--rounds", 3);
    let g = guest_artifacts();
    let dir = scratch_dir().join("bench-hotplug");
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let mut c = VmConfig::new(g.vmlinux, 1, 256);
    c.boot_source.initrd_path = Some(g.initramfs);
    c.machine_config.max_vcpus = Some(2);
    c.machine_config.max_mem_size_mib = Some(1024);
    c.serial.output = SerialOutput::None;
    c.vsock = agent_vsock(&uds);
    let vm = Vm::create(&c).expect("create");
    let sb = Sandbox::from_vm(&c, vm, Duration::from_secs(900)).expect("boot");
    println!(
        "Kestrel hotplug bench (1 vCPU / 256 MiB, max 2 vCPUs / 1 GiB; guest kernel emulated here)"
    );
    println!();
    println!("| round | operation | total | VMM | guest | result |");
    println!("|---|---|---|---|---|---|");
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
    for r in 1..=rounds {
        for n in [2, 1] {
            let t = Instant::now();
            let v = sb.resize_vcpus(n).expect("resize_vcpus");
            println!(
                "| {r} | vCPUs → {n} | {} | {} | {} | online {} |",
                ms(t.elapsed()),
                ms(v.vmm_time),
                ms(v.guest_time),
                v.online
            );
        }
        for mib in [384, 256] {
            let t = Instant::now();
            let m = sb.resize_memory(mib).expect("resize_memory");
            println!(
                "| {r} | memory → {mib} MiB | {} | {} | {} | MemTotal {} MiB |",
                ms(t.elapsed()),
                ms(m.vmm_time),
                ms(m.guest_time),
                m.guest_mem_total_kb / 1024
            );
        }
    }
    let _ = sb.shutdown(Duration::from_secs(60));
}
