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
use std::path::Path;
use std::time::{Duration, Instant};

use kestrel_agent_proto as proto;
use kestrel_api::DriveConfig;
use kestrel_sandbox::agent::AgentClient;
use kestrel_sandbox::Sandbox;
use kestrel_tests::guest::{
    agent_guest, connect_retry, hybrid_connect, send_stream, spawn_stream_sink, MIB, MIB_BYTES,
};
use kestrel_tests::*;
use kestrel_vmm::Vm;

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
        let o = libc::off_t::try_from(b * bs as u64).expect("offsets inside the image");
        // SAFETY: `buf` is a valid, aligned buffer of `bs` bytes.
        let n = unsafe {
            if write {
                libc::pwrite(f.as_raw_fd(), buf.as_ptr().cast(), bs, o)
            } else {
                libc::pread(f.as_raw_fd(), buf.as_mut_ptr().cast(), bs, o)
            }
        };
        assert_eq!(usize::try_from(n).ok(), Some(bs));
    }
    if write {
        f.sync_data().unwrap();
    }
    t0.elapsed().as_secs_f64()
}

/// Requests the bench drive has served so far.
fn block_requests(vm: &Vm) -> u64 {
    let m = vm.device("bench").and_then(|d| d.metrics().block());
    m.expect("the bench drive").requests
}

/// Packets the vsock device has put into the guest so far.
fn vsock_packets_to_guest(vm: &Vm) -> u64 {
    let m = vm.device("vsock").and_then(|d| d.metrics().vsock());
    m.expect("the vsock device").packets_to_guest
}

/// A 256 MiB image of pseudo-random data, synced.
fn make_image(img: &Path) {
    let mut f = File::create(img).unwrap();
    send_stream(&mut f, 5, 256).unwrap();
    f.sync_all().unwrap();
}

/// One row per block workload: the guest's `io_bench` next to the host's same work, and the
/// VMM's CPU per request.
fn block_rows(vm: &Vm, a: &mut AgentClient, img: &Path) {
    let cases: [(&str, usize, u64, bool, bool); 4] = [
        ("seq read 1 MiB", MIB_BYTES, 128, false, false),
        ("seq write 1 MiB", MIB_BYTES, 128, false, true),
        ("rand read 4 KiB", 4096, 2000, true, false),
        ("rand write 4 KiB", 4096, 2000, true, true),
    ];
    for (name, bs, count, random, write) in cases {
        let req0 = block_requests(vm);
        let (e0, v0) = (vm_thread_cpu_ns(vm, false), vm_thread_cpu_ns(vm, true));
        let r = a
            .request(proto::IoBench {
                path: "/dev/vda".into(),
                block_size: bs as u64,
                count,
                random,
                write,
                seed: 3,
                span: None,
            })
            .expect("io_bench");
        let (e1, v1) = (vm_thread_cpu_ns(vm, false), vm_thread_cpu_ns(vm, true));
        let reqs = (block_requests(vm) - req0).max(1);
        let guest_s = r.duration_ns as f64 / 1e9;
        let host_s = host_io(img, bs, count, random, write);
        let (gv, hv, unit) = if bs == MIB_BYTES {
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
}

/// MB/s of `size` bytes through a Unix socket pair on the host (the vsock row's peer).
fn host_socket_pair_mbps(size: u64) -> f64 {
    let (mut x, mut y) = UnixStream::pair().unwrap();
    let t = Instant::now();
    let rd = std::thread::spawn(move || {
        let mut b = vec![0u8; 256 << 10];
        let mut n = 0u64;
        while n < size {
            n += y.read(&mut b).unwrap() as u64;
        }
    });
    let buf = vec![0u8; MIB_BYTES];
    for _ in 0..size / MIB {
        x.write_all(&buf).unwrap();
    }
    rd.join().unwrap();
    size as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// The vsock row: 32 MiB host -> guest into the agent's `stream_sink`, the event loop's CPU
/// per packet, next to a Unix socket pair on the host.
fn vsock_row(sb: &Sandbox, uds: &Path) {
    let size = 32 * MIB;
    let vm = sb.vm();
    let sink = proto::StreamSink {
        port: 6000,
        ..Default::default()
    };
    let sink = spawn_stream_sink(sb, sink);
    let connect = || hybrid_connect(uds, 6000);
    let mut s = connect_retry(Duration::from_secs(600), connect).expect("connect to the sink");
    let e0 = vm_thread_cpu_ns(vm, false);
    let p0 = vsock_packets_to_guest(vm);
    let t0 = Instant::now();
    send_stream(&mut s, 4, size / MIB).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let res = sink.join().unwrap().expect("stream_sink");
    let secs = t0.elapsed().as_secs_f64();
    let pkts = (vsock_packets_to_guest(vm) - p0).max(1);
    let e1 = vm_thread_cpu_ns(vm, false);
    let host_mbps = host_socket_pair_mbps(size);
    let mbps = size as f64 / secs / 1e6;
    println!(
        "| vsock host→guest 32 MiB | {mbps:.1} MB/s | {host_mbps:.1} MB/s (Unix socket pair) | {:.4} | {:.1} µs per packet ({pkts} packets) | — |",
        mbps / host_mbps,
        (e1 - e0) as f64 / pkts as f64 / 1000.0
    );
    assert_eq!(res.bytes, size);
}

fn main() {
    let mut guest = agent_guest("bench-devices", 1, 256);
    let img = guest.dir.join("disk.img");
    make_image(&img);
    guest.config.drives = vec![DriveConfig {
        drive_id: "bench".into(),
        path_on_host: Some(img.clone()),
        serial: Some("bench".into()),
        ..DriveConfig::default()
    }];
    let sb = Sandbox::boot(&guest.config, Duration::from_secs(900)).expect("boot");
    let vm = sb.vm().clone();
    let mut a = sb.agent();
    a.set_call_timeout(Some(Duration::from_secs(900)));

    println!(
        "Kestrel device bench (guest kernel emulated on this machine: see docs/nested-kvm.md)"
    );
    println!();
    println!("| workload | guest | host (same file, O_DIRECT) | guest/host | VMM event-loop CPU per request | vCPU CPU per request |");
    println!("|---|---|---|---|---|---|");
    block_rows(&vm, &mut a, &img);
    drop(a);
    vsock_row(&sb, &guest.uds);
    let _ = sb.shutdown(Duration::from_secs(60));
}
