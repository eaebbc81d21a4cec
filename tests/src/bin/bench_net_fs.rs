//! Network and virtio-fs benchmark: TCP over virtio-net/TAP each way with the VMM's CPU time
//! per packet, and virtio-fs read/write MB/s and metadata ops/s, in-process (fuse-backend-rs)
//! vs vhost-user (virtiofsd), next to the host doing the same. Prints tables.
//!
//! `cargo run --release -p kestrel-tests --bin bench_net_fs` (root; needs virtiofsd: VIRTIOFSD)

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kestrel_api::{FsCache, FsConfig, NetConfig, SerialOutput, VmConfig};
use kestrel_sandbox::Sandbox;
use kestrel_tests::*;
use kestrel_vmm::Vm;
use serde_json::json;

const MIB: u64 = 1 << 20;

fn fs_share(tag: &str, dir: &std::path::Path) -> FsConfig {
    FsConfig {
        tag: tag.into(),
        shared_dir: Some(dir.to_path_buf()),
        socket: None,
        read_only: false,
        cache: FsCache::Auto,
        xattr: false,
        num_queues: 1,
        queue_size: 256,
        worker_threads: false,
        max_open_handles: kestrel_api::DEFAULT_FS_MAX_OPEN_HANDLES,
        allow_setid: false,
        allow_devices: false,
    }
}

/// Host baseline: TCP over loopback in the bench's namespace, MB/s.
fn host_loopback_mbps(size: u64) -> f64 {
    let _ = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let rd = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut b = vec![0u8; 256 << 10];
        while s.read(&mut b).unwrap() > 0 {}
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let buf = vec![7u8; MIB as usize];
    let t = Instant::now();
    for _ in 0..size / MIB {
        s.write_all(&buf).unwrap();
    }
    drop(s);
    rd.join().unwrap();
    size as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// One table row: throughput and the VMM event loop's CPU per packet and per MiB.
fn row(mtu: u32, dir: &str, size: u64, secs: f64, host_mbps: f64, cpu_ns: u64, packets: u64) {
    let mbps = size as f64 / secs / 1e6;
    let pk = packets.max(1);
    println!(
        "| {mtu} | {dir} | {} | {mbps:.2} | {host_mbps:.0} | {:.4} | {:.1} µs | {:.2} ms | {pk} |",
        size / MIB,
        mbps / host_mbps,
        cpu_ns as f64 / pk as f64 / 1000.0,
        cpu_ns as f64 / (size / MIB) as f64 / 1e6,
    );
}

/// `size` bytes of TCP guest→host, then host→guest, on ports `port` and `port + 1`.
fn tcp_each_way(
    sb: &Sandbox,
    a: &mut kestrel_sandbox::agent::AgentClient,
    mtu: u32,
    size: u64,
    host_mbps: f64,
    port: u16,
) {
    let vm = sb.vm();
    let l = TcpListener::bind(("10.0.9.1", port)).unwrap();
    let rd = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut b = vec![0u8; 256 << 10];
        while s.read(&mut b).unwrap() > 0 {}
    });
    let (e0, p0) = (
        vm_thread_cpu_ns(vm, false),
        vm.device("eth0")
            .and_then(|d| d.metrics().net())
            .unwrap()
            .tx_packets,
    );
    let t = Instant::now();
    a.call(
        "stream_source",
        json!({"port": port, "bytes": size, "tcp_host": "10.0.9.1"}),
    )
    .expect("guest send");
    rd.join().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let (e1, p1) = (
        vm_thread_cpu_ns(vm, false),
        vm.device("eth0")
            .and_then(|d| d.metrics().net())
            .unwrap()
            .tx_packets,
    );
    row(mtu, "guest→host", size, secs, host_mbps, e1 - e0, p1 - p0);

    let mut a2 = sb.connect_agent(Duration::from_secs(30)).unwrap();
    a2.set_call_timeout(Some(Duration::from_secs(900)));
    let sink =
        std::thread::spawn(move || a2.call("stream_sink", json!({"port": port + 1, "tcp": true})));
    let mut s = loop {
        if let Ok(s) = TcpStream::connect(("10.0.9.2", port + 1)) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (e0, p0) = (
        vm_thread_cpu_ns(vm, false),
        vm.device("eth0")
            .and_then(|d| d.metrics().net())
            .unwrap()
            .rx_packets,
    );
    let buf = vec![9u8; MIB as usize];
    let t = Instant::now();
    for _ in 0..size / MIB {
        s.write_all(&buf).unwrap();
    }
    drop(s);
    sink.join().unwrap().expect("guest receive");
    let secs = t.elapsed().as_secs_f64();
    let (e1, p1) = (
        vm_thread_cpu_ns(vm, false),
        vm.device("eth0")
            .and_then(|d| d.metrics().net())
            .unwrap()
            .rx_packets,
    );
    row(mtu, "host→guest", size, secs, host_mbps, e1 - e0, p1 - p0);
}

fn main() {
    let fs_only = std::env::args().any(|a| a == "--fs-only");
    let net_only = std::env::args().any(|a| a == "--net-only");
    let g = guest_artifacts();
    let pid = std::process::id();
    let ns = format!("ktb{pid}");
    let _ = Command::new("ip").args(["netns", "add", &ns]).status();
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    let tap = format!("kt{pid}t");
    let dir = scratch_dir().join("bench-net-fs");
    let _ = std::fs::remove_dir_all(&dir);
    let (inproc, vhu) = (dir.join("inproc"), dir.join("vhu"));
    std::fs::create_dir_all(&inproc).unwrap();
    std::fs::create_dir_all(&vhu).unwrap();
    let sock = dir.join("vfsd.sock");
    let bin = std::env::var("VIRTIOFSD").unwrap_or_else(|_| "virtiofsd".into());
    let mut daemon = Command::new(bin)
        .arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--shared-dir={}", vhu.display()))
        .arg("--sandbox=chroot")
        .arg("--cache=auto")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("virtiofsd (set VIRTIOFSD)");
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = VmConfig::new(g.vmlinux, 1, 256);
    c.boot_source.initrd_path = Some(g.initramfs);
    c.boot_source.boot_args =
        Some("console=ttyS0 reboot=k panic=1 ip=10.0.9.2::10.0.9.1:255.255.255.0::eth0:off".into());
    c.serial.output = SerialOutput::None;
    if !fs_only {
        c.network_interfaces = vec![NetConfig {
            iface_id: "eth0".into(),
            host_dev_name: Some(tap.clone()),
            guest_mac: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            create_tap: true,
            ..NetConfig::default()
        }];
    }
    c.fs = vec![
        fs_share("inproc", &inproc),
        FsConfig {
            tag: "vhu".into(),
            shared_dir: None,
            socket: Some(sock.clone()),
            ..fs_share("x", &vhu)
        },
    ];
    c.vsock = agent_vsock(&dir.join("v.sock"));
    let vm = Vm::create(&c).expect("create");
    if !fs_only {
        for args in [
            vec!["addr", "add", "10.0.9.1/24", "dev", &tap],
            vec!["link", "set", &tap, "up"],
        ] {
            assert!(Command::new("ip").args(&args).status().unwrap().success());
        }
    }
    let sb = Sandbox::from_vm(&c, vm, Duration::from_secs(900)).expect("boot");
    let mut a = sb.agent();
    a.set_call_timeout(Some(Duration::from_secs(900)));

    if !fs_only {
        println!("Kestrel network bench (TAP in a namespace; guest kernel emulated here)");
        println!();
        println!("| MTU | direction | MiB | MB/s | host loopback MB/s | guest/host | VMM event-loop CPU per packet | per MiB | packets |");
        println!("|---|---|---|---|---|---|---|---|---|");
        let host_mbps = host_loopback_mbps(32 * MIB);
        // The event loop's CPU with the guest idle, for reference: the per-packet figures below
        // are all of the loop's CPU during a transfer divided by the packets in one direction.
        let e0 = vm_thread_cpu_ns(sb.vm(), false);
        std::thread::sleep(Duration::from_secs(10));
        let idle_ms_per_s = (vm_thread_cpu_ns(sb.vm(), false) - e0) as f64 / 1e6 / 10.0;
        // Default MTU, then jumbo frames (fewer, larger packets: the emulated guest kernel's
        // cost is per packet).
        for (port, mtu, size) in [(7001, 1500u32, 16 * MIB), (7011, 65520, 32 * MIB)] {
            let m = mtu.to_string();
            assert!(Command::new("ip")
                .args(["link", "set", &tap, "mtu", &m])
                .status()
                .unwrap()
                .success());
            let r = a
                .exec(&["ip", "link", "set", "eth0", "mtu", &m])
                .expect("guest ip");
            assert_eq!(r.exit_code, Some(0), "{}", r.stderr_str());
            tcp_each_way(&sb, &mut a, mtu, size, host_mbps, port);
        }
        println!();
        println!("Event loop CPU with the guest idle: {idle_ms_per_s:.3} ms per second.");
        if net_only {
            drop(a);
            let _ = sb.shutdown(Duration::from_secs(60));
            let _ = daemon.kill();
            let _ = daemon.wait();
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            return;
        }
    }
    println!();
    println!("Kestrel virtio-fs bench (16 MiB file, 1 MiB blocks; 200 create+stat+unlink rounds)");
    println!();
    println!("| backend | write MB/s | read MB/s | metadata rounds/s | host metadata rounds/s |");
    println!("|---|---|---|---|---|");
    let host_meta = {
        let t = Instant::now();
        for i in 0..200 {
            let p = dir.join(format!("m{i}"));
            std::fs::File::create(&p).unwrap();
            std::fs::metadata(&p).unwrap();
            std::fs::remove_file(&p).unwrap();
        }
        200.0 / t.elapsed().as_secs_f64()
    };
    for (tag, mnt) in [("inproc", "/mnt/inproc"), ("vhu", "/mnt/vhu")] {
        a.mount(tag, mnt, "virtiofs", None, &[]).expect("mount");
        let w = a
            .call(
                "exec",
                json!({"argv": ["/bin/sh", "-c", format!("dd if=/dev/zero of={mnt}/f bs=1M count=16 2>/dev/null && sync")]}),
            )
            .ok()
            .and_then(|v| v["duration_ms"].as_f64())
            .unwrap_or(f64::NAN);
        let r = a
            .call(
                "io_bench",
                json!({"path": format!("{mnt}/f"), "block_size": MIB, "count": 16}),
            )
            .ok()
            .and_then(|v| v["mb_per_s"].as_f64())
            .unwrap_or(f64::NAN);
        let m = a
            .call("meta_bench", json!({"dir": mnt, "count": 200}))
            .ok()
            .and_then(|v| v["rounds_per_s"].as_f64())
            .unwrap_or(f64::NAN);
        println!(
            "| {} | {:.1} | {r:.1} | {m:.0} | {host_meta:.0} |",
            if tag == "vhu" {
                "vhost-user (virtiofsd)"
            } else {
                "in-process (fuse-backend-rs)"
            },
            16.0 * MIB as f64 / (w / 1000.0) / 1e6
        );
    }
    drop(a);
    let _ = sb.shutdown(Duration::from_secs(60));
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
}
