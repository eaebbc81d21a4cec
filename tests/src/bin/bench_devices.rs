//! Device benchmark: virtio-blk sequential 1 MiB and random 4 KiB I/O inside the guest vs the
//! same O_DIRECT operations on the host file, vsock host→guest throughput, and the VMM's CPU
//! time per request (event-loop thread, from /proc/self/task/<tid>/schedstat). Prints a table.
//!
//! `cargo run --release -p kestrel-tests --bin bench_devices`

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use kestrel_api::{DriveConfig, SerialOutput, VmConfig};
use kestrel_sandbox::Sandbox;
use kestrel_tests::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// The host doing the same O_DIRECT work (aligned buffer via a Vec over-allocation).
fn host_io(path: &std::path::Path, bs: usize, count: u64, random: bool, write: bool) -> f64 {
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let size = f.metadata().unwrap().len();
    let blocks = size / bs as u64;
    let mut raw = vec![0u8; bs + 4096];
    let off = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[off..off + bs];
    XorShift::new(99).fill(buf);
    let mut rng = XorShift::new(1);
    let mut pick = [0u8; 8];
    let t0 = Instant::now();
    for i in 0..count {
        let b = if random {
            rng.fill(&mut pick);
            u64::from_le_bytes(pick) % blocks
        } else {
            i % blocks
        };
        let o = (b * bs as u64) as i64;
        // SAFETY: `buf` is a valid, aligned buffer of `bs` bytes.
        let n = unsafe {
            if write {
                libc::pwrite(f.as_raw_fd(), buf.as_ptr().cast(), bs, o)
            } else {
                libc::pread(f.as_raw_fd(), buf.as_mut_ptr().cast(), bs, o)
            }
        };
        assert_eq!(n, bs as isize);
    }
    if write {
        f.sync_data().unwrap();
    }
    t0.elapsed().as_secs_f64()
}

fn main() {
    let g = guest_artifacts();
    let dir = scratch_dir().join("bench-devices");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    {
        let mut f = File::create(&img).unwrap();
        let mut buf = vec![0u8; MIB as usize];
        let mut r = XorShift::new(5);
        for _ in 0..256 {
            r.fill(&mut buf);
            f.write_all(&buf).unwrap();
        }
        f.sync_all().unwrap();
    }
    let uds = dir.join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let mut c = VmConfig::new(g.vmlinux, 1, 256);
    c.boot_source.initrd_path = Some(g.initramfs);
    c.serial.output = SerialOutput::None;
    c.drives = vec![DriveConfig {
        drive_id: "bench".into(),
        path_on_host: Some(img.clone()),
        is_root_device: false,
        is_read_only: false,
        serial: Some("bench".into()),
        partuuid: None,
        rate_limiter: None,
        ..DriveConfig::default()
    }];
    c.vsock = agent_vsock(&uds);
    let sb = Sandbox::boot(&c, Duration::from_secs(900)).expect("boot");
    let vm = sb.vm().clone();
    let mut a = sb.agent();
    a.set_call_timeout(Some(Duration::from_secs(900)));

    println!(
        "Kestrel device bench (guest kernel emulated on this machine: see docs/nested-kvm.md)"
    );
    println!();
    println!("| workload | guest | host (same file, O_DIRECT) | guest/host | VMM event-loop CPU per request | vCPU CPU per request |");
    println!("|---|---|---|---|---|---|");
    let cases: [(&str, usize, u64, bool, bool); 4] = [
        ("seq read 1 MiB", MIB as usize, 128, false, false),
        ("seq write 1 MiB", MIB as usize, 128, false, true),
        ("rand read 4 KiB", 4096, 2000, true, false),
        ("rand write 4 KiB", 4096, 2000, true, true),
    ];
    for (name, bs, count, random, write) in cases {
        let req0 = vm
            .device("bench")
            .and_then(|d| d.metrics().block())
            .unwrap()
            .requests;
        let (e0, v0) = (vm_thread_cpu_ns(&vm, false), vm_thread_cpu_ns(&vm, true));
        let r: Value = a
            .call(
                "io_bench",
                json!({"path": "/dev/vda", "block_size": bs, "count": count,
                       "random": random, "write": write, "seed": 3}),
            )
            .expect("io_bench");
        let (e1, v1) = (vm_thread_cpu_ns(&vm, false), vm_thread_cpu_ns(&vm, true));
        let reqs = (vm
            .device("bench")
            .and_then(|d| d.metrics().block())
            .unwrap()
            .requests
            - req0)
            .max(1);
        let guest_s = r["duration_ns"].as_f64().unwrap_or(0.0) / 1e9;
        let host_s = host_io(&img, bs, count, random, write);
        let (gv, hv, unit) = if bs as u64 == MIB {
            (
                count as f64 * bs as f64 / guest_s / 1e6,
                count as f64 * bs as f64 / host_s / 1e6,
                "MB/s",
            )
        } else {
            (count as f64 / guest_s, count as f64 / host_s, "IOPS")
        };
        println!(
            "| {name} | {gv:.1} {unit} | {hv:.1} {unit} | {:.3} | {:.1} µs ({reqs} requests) | {:.1} µs |",
            gv / hv,
            (e1 - e0) as f64 / reqs as f64 / 1000.0,
            (v1 - v0) as f64 / reqs as f64 / 1000.0,
        );
    }

    // vsock host -> guest.
    let size = 32 * MIB;
    let mut a2 = sb.connect_agent(Duration::from_secs(30)).unwrap();
    a2.set_call_timeout(Some(Duration::from_secs(900)));
    let sink = std::thread::spawn(move || a2.call("stream_sink", json!({"port": 6000})));
    let mut s = loop {
        let mut s = UnixStream::connect(&uds).unwrap();
        s.write_all(b"CONNECT 6000\n").unwrap();
        let mut b = [0u8; 32];
        let n = s.read(&mut b).unwrap_or(0);
        if n > 0 && b.starts_with(b"OK") {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let e0 = vm_thread_cpu_ns(&vm, false);
    let p0 = vm
        .device("vsock")
        .and_then(|d| d.metrics().vsock())
        .unwrap()
        .packets_to_guest;
    let t0 = Instant::now();
    let mut buf = vec![0u8; MIB as usize];
    let mut r = XorShift::new(4);
    for _ in 0..size / MIB {
        r.fill(&mut buf);
        s.write_all(&buf).unwrap();
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let res = sink.join().unwrap().expect("stream_sink");
    let secs = t0.elapsed().as_secs_f64();
    let pkts = (vm
        .device("vsock")
        .and_then(|d| d.metrics().vsock())
        .unwrap()
        .packets_to_guest
        - p0)
        .max(1);
    let e1 = vm_thread_cpu_ns(&vm, false);
    // The host doing the same: 32 MiB through a Unix socket pair.
    let (mut x, mut y) = UnixStream::pair().unwrap();
    let t = Instant::now();
    let rd = std::thread::spawn(move || {
        let mut b = vec![0u8; 256 << 10];
        let mut n = 0u64;
        while n < size {
            n += y.read(&mut b).unwrap() as u64;
        }
    });
    for _ in 0..size / MIB {
        x.write_all(&buf).unwrap();
    }
    rd.join().unwrap();
    let host_secs = t.elapsed().as_secs_f64();
    println!(
        "| vsock host→guest 32 MiB | {:.1} MB/s | {:.1} MB/s (Unix socket pair) | {:.4} | {:.1} µs per packet ({pkts} packets) | — |",
        size as f64 / secs / 1e6,
        size as f64 / host_secs / 1e6,
        host_secs / secs,
        (e1 - e0) as f64 / pkts as f64 / 1000.0
    );
    assert_eq!(res["bytes"], size);
    drop(a);
    let _ = sb.shutdown(Duration::from_secs(60));
}
