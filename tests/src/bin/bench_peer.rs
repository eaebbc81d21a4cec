//! VMM-side costs of the `kestrel` binary next to QEMU (Debian's `qemu-system-x86`, `-M microvm`)
//! for the same kernel, initramfs, vCPUs and memory: time from `exec` until the VM exists, the
//! process's CPU time to get there, resident memory outside guest RAM, threads.
//!
//! QEMU 7.2 cannot boot a stock kernel on the CI machines' software KVM (it stops at the first
//! INT3, docs/nested-kvm.md), so it is measured paused (`-S`) once QMP answers: the VM, its
//! memory and devices exist and the kernel is loaded — the same point as Kestrel's "created" log
//! line. Kestrel is measured with its guest booting. Two adjustments for this KVM: `-cpu host`
//! aborts QEMU (this KVM refuses MSR 0x10a), so the CPU model is `qemu64`; and QEMU's `-kernel`
//! wants a PVH ELF note that the project's vmlinux does not carry, so QEMU's generic loader puts
//! the same vmlinux segments and initramfs bytes into guest memory (a paused VM does not care
//! about the boot protocol).
//!
//! `cargo run --release -p kestrel-tests --bin bench_peer [-- --mem MIB --vcpus N --runs R]`

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kestrel_tests::*;

/// (RSS outside guest RAM, RSS of guest RAM) in KiB: guest RAM is the mapping(s) of `mem_mib`
/// MiB (up to 4 MiB more for allocator alignment and guard pages).
fn rss_split(pid: u32, mem_mib: u64) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let lo = mem_mib << 20;
    let hi = lo + (4 << 20);
    smaps_rss_split(&smaps, |s, e| (lo..=hi).contains(&e.saturating_sub(s)))
}

/// CPU time of all of a process's threads so far, ms (`/proc/<pid>/task/*/schedstat`, ns).
fn cpu_ms(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return f64::NAN;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e6
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

struct Sample {
    ready_ms: f64,
    cpu_ms: f64,
    rss_kib: u64,
    guest_rss_kib: u64,
    threads: usize,
}

impl Sample {
    /// Process `pid` became ready after `ready`: its CPU time now, then (2 s later, once its
    /// threads run) its RSS outside and inside the `mem_mib` MiB of guest RAM and its threads.
    fn take(pid: u32, ready: Duration, mem_mib: u64) -> Sample {
        let cpu = cpu_ms(pid);
        std::thread::sleep(Duration::from_secs(2));
        let (rss, guest) = rss_split(pid, mem_mib);
        Sample {
            ready_ms: ready.as_secs_f64() * 1000.0,
            cpu_ms: cpu,
            rss_kib: rss,
            guest_rss_kib: guest,
            threads: threads(pid),
        }
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn kestrel(g: &GuestArtifacts, vcpus: u64, mem: u64, dir: &std::path::Path) -> Sample {
    let bin = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("kestrel")))
        .filter(|p| p.exists())
        .expect("build the kestrel binary (cargo build --release -p kestrel)");
    let cfg = dir.join("kestrel.json");
    let json = serde_json::json!({
        "boot-source": {"kernel_image_path": g.vmlinux, "initrd_path": g.initramfs},
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem},
        "serial": {"output": "none"},
    });
    std::fs::write(&cfg, json.to_string()).unwrap();
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .env("KESTREL_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let err = child.stderr.take().unwrap();
    let mut lines = BufReader::new(err).lines();
    let mut ready = None;
    for l in lines.by_ref() {
        let l = l.unwrap_or_default();
        if l.contains("created in") {
            ready = Some(t0.elapsed());
            break;
        }
    }
    let ready = ready.expect("kestrel never logged 'created'");
    // Let the vCPU threads and the event loop start, as for QEMU below.
    let s = Sample::take(pid, ready, mem);
    stop(child);
    s
}

fn qmp_line(r: &mut BufReader<UnixStream>) -> String {
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    l
}

fn qemu(g: &GuestArtifacts, vcpus: u64, mem: u64, dir: &std::path::Path) -> Option<Sample> {
    let sock = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&sock);
    let t0 = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on"])
        .args([
            "-enable-kvm",
            "-cpu",
            "qemu64",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-serial", "null", "-S"])
        .args(["-smp", &vcpus.to_string(), "-m", &format!("{mem}M")])
        .arg("-device")
        .arg(format!("loader,file={}", g.vmlinux.display()))
        .arg("-device")
        .arg(format!(
            "loader,file={},addr=0x4000000,force-raw=on",
            g.initramfs.display()
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let pid = child.id();
    let stream = loop {
        if let Ok(s) = UnixStream::connect(&sock) {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            stop(child);
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let greeting = qmp_line(&mut r);
    assert!(greeting.contains("QMP"), "{greeting}");
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .unwrap();
    let ok = qmp_line(&mut r);
    assert!(ok.contains("return"), "{ok}");
    let s = Sample::take(pid, t0.elapsed(), mem);
    let _ = w.write_all(b"{\"execute\":\"quit\"}\n");
    let mut rest = Vec::new();
    let _ = r.get_mut().set_read_timeout(Some(Duration::from_secs(5)));
    let _ = r.read_to_end(&mut rest);
    stop(child);
    Some(s)
}

fn main() {
    let vcpus = cli_arg("--vcpus", 1);
    let mem = cli_arg("--mem", 128);
    let runs = cli_arg("--runs", 3);
    let g = guest_artifacts();
    let dir = scratch_dir().join("bench-peer");
    std::fs::create_dir_all(&dir).unwrap();
    println!(
        "VMM-side costs, {vcpus} vCPU(s), {mem} MiB, same kernel + initramfs ({runs} runs each)"
    );
    println!();
    println!("| VMM | run | exec → VM created (ms) | CPU to get there (ms) | RSS outside guest RAM (MiB) | guest RAM RSS (MiB) | threads |");
    println!("|---|---|---|---|---|---|---|");
    let print = |name: &str, i: u64, s: &Sample| {
        println!(
            "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            i + 1,
            s.ready_ms,
            s.cpu_ms,
            s.rss_kib as f64 / 1024.0,
            s.guest_rss_kib as f64 / 1024.0,
            s.threads
        );
    };
    for i in 0..runs {
        print("kestrel", i, &kestrel(&g, vcpus, mem, &dir));
    }
    for i in 0..runs {
        match qemu(&g, vcpus, mem, &dir) {
            Some(s) => print("qemu microvm (paused)", i, &s),
            None => {
                println!("| qemu | - | not available (install qemu-system-x86) | | | | |");
                break;
            }
        }
    }
}
