//! Network and virtio-fs benchmark: TCP over virtio-net/TAP each way with the VMM's CPU time
//! per packet, and virtio-fs read/write MB/s and metadata ops/s, in-process (fuse-backend-rs)
//! vs vhost-user (virtiofsd), next to the host doing the same. Prints tables.
//!
//! `cargo run --release -p kestrel-tests --bin bench_net_fs` (root; needs virtiofsd: VIRTIOFSD)

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use kestrel_agent_proto as proto;
use kestrel_api::{FsConfig, NetConfig};
use kestrel_sandbox::agent::AgentClient;
use kestrel_sandbox::Sandbox;
use kestrel_tests::guest::{
    agent_guest, connect_retry, spawn_stream_sink, spawn_virtiofsd, MIB, MIB_BYTES,
};
use kestrel_tests::netns::Netns;
use kestrel_tests::*;
use kestrel_vmm::Vm;

/// Host baseline: TCP over loopback in the bench's namespace, MB/s.
fn host_loopback_mbps(size: u64) -> f64 {
    let _ = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let rd = std::thread::spawn(move || drain(l));
    let mut s = TcpStream::connect(addr).unwrap();
    let buf = vec![7u8; MIB_BYTES];
    let t = Instant::now();
    for _ in 0..size / MIB {
        s.write_all(&buf).unwrap();
    }
    drop(s);
    rd.join().unwrap();
    size as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// Accept one connection on `l` and read it to its end.
fn drain(l: TcpListener) {
    let (mut s, _) = l.accept().unwrap();
    let mut b = vec![0u8; 256 << 10];
    while s.read(&mut b).unwrap() > 0 {}
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

/// The event loop's CPU time so far and eth0's packets so far (sent by the guest when `tx`,
/// else received).
fn eth0_sample(vm: &Vm, tx: bool) -> (u64, u64) {
    let m = vm.device("eth0").and_then(|d| d.metrics().net()).unwrap();
    let packets = if tx { m.tx_packets } else { m.rx_packets };
    (vm_thread_cpu_ns(vm, false), packets)
}

/// What one direction of [`tcp_each_way`] measures.
struct Leg<'a> {
    mtu: u32,
    size: u64,
    host_mbps: f64,
    port: u16,
    vm: &'a Vm,
}

impl Leg<'_> {
    /// Time `transfer` and print its row with the event loop's CPU and eth0's packets.
    fn measure(&self, dir: &str, tx: bool, transfer: impl FnOnce()) {
        let (e0, p0) = eth0_sample(self.vm, tx);
        let t = Instant::now();
        transfer();
        let secs = t.elapsed().as_secs_f64();
        let (e1, p1) = eth0_sample(self.vm, tx);
        row(
            self.mtu,
            dir,
            self.size,
            secs,
            self.host_mbps,
            e1 - e0,
            p1 - p0,
        );
    }
}

/// `size` bytes of TCP guest→host, then host→guest, on ports `port` and `port + 1`.
fn tcp_each_way(sb: &Sandbox, a: &mut AgentClient, leg: &Leg) {
    let (port, size) = (leg.port, leg.size);
    let l = TcpListener::bind(("10.0.9.1", port)).unwrap();
    let rd = std::thread::spawn(move || drain(l));
    leg.measure("guest→host", true, || {
        a.request(proto::StreamSource {
            port: u32::from(port),
            bytes: size,
            seed: 0,
            tcp_host: Some("10.0.9.1".into()),
        })
        .expect("guest send");
        rd.join().unwrap();
    });

    let sink = proto::StreamSink {
        port: u32::from(port + 1),
        timeout_ms: None,
        tcp: true,
    };
    let sink = spawn_stream_sink(sb, sink);
    let connect = || TcpStream::connect(("10.0.9.2", port + 1));
    let mut s = connect_retry(Duration::from_secs(600), connect).expect("connect to the sink");
    leg.measure("host→guest", false, || {
        let buf = vec![9u8; MIB_BYTES];
        for _ in 0..size / MIB {
            s.write_all(&buf).unwrap();
        }
        drop(s);
        sink.join().unwrap().expect("guest receive");
    });
}

/// The network table: TCP each way at MTU 1500 and 65520 next to the host's loopback, and
/// the event loop's CPU with the guest idle.
fn net_table(sb: &Sandbox, a: &mut AgentClient, ns: &Netns, tap: &str) {
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
        ns.ip(&["link", "set", tap, "mtu", &m]);
        let r = a
            .exec(&["ip", "link", "set", "eth0", "mtu", &m])
            .expect("guest ip");
        assert_eq!(r.exit_code, Some(0), "{}", r.stderr_str());
        let vm = sb.vm();
        let leg = Leg {
            mtu,
            size,
            host_mbps,
            port,
            vm,
        };
        tcp_each_way(sb, a, &leg);
    }
    println!();
    println!("Event loop CPU with the guest idle: {idle_ms_per_s:.3} ms per second.");
}

/// Host baseline: 200 create + stat + unlink rounds in `dir`, per second.
fn host_meta_rounds_per_s(dir: &Path) -> f64 {
    let t = Instant::now();
    for i in 0..200 {
        let p = dir.join(format!("m{i}"));
        std::fs::File::create(&p).unwrap();
        std::fs::metadata(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
    }
    200.0 / t.elapsed().as_secs_f64()
}

/// The virtio-fs table: write and read MB/s and metadata rounds per second on each share.
fn fs_table(a: &mut AgentClient, dir: &Path) {
    println!("Kestrel virtio-fs bench (16 MiB file, 1 MiB blocks; 200 create+stat+unlink rounds)");
    println!();
    println!("| backend | write MB/s | read MB/s | metadata rounds/s | host metadata rounds/s |");
    println!("|---|---|---|---|---|");
    let host_meta = host_meta_rounds_per_s(dir);
    for (tag, mnt) in [("inproc", "/mnt/inproc"), ("vhu", "/mnt/vhu")] {
        a.mount(tag, mnt, "virtiofs", None, &[]).expect("mount");
        let dd = format!("dd if=/dev/zero of={mnt}/f bs=1M count=16 2>/dev/null && sync");
        let exec = proto::Exec {
            argv: vec!["/bin/sh".into(), "-c".into(), dd],
            ..Default::default()
        };
        let w = a.request(exec).map_or(f64::NAN, |r| r.duration_ms as f64);
        let read = proto::IoBench {
            path: format!("{mnt}/f"),
            block_size: MIB,
            count: 16,
            ..Default::default()
        };
        let r = a.request(read).map_or(f64::NAN, |r| r.mb_per_s);
        let meta = proto::MetaBench {
            dir: mnt.into(),
            count: 200,
        };
        let m = a.request(meta).map_or(f64::NAN, |r| r.rounds_per_s);
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
}

fn main() {
    let fs_only = std::env::args().any(|a| a == "--fs-only");
    let net_only = std::env::args().any(|a| a == "--net-only");
    let mut guest = agent_guest("bench-net-fs", 1, 256);
    let pid = std::process::id();
    let ns = Netns::new(&format!("ktb{pid}"));
    ns.enter();
    let tap = format!("kt{pid}t");
    let (inproc, vhu) = (guest.dir.join("inproc"), guest.dir.join("vhu"));
    for d in [&inproc, &vhu] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d).unwrap();
    }
    let sock = guest.dir.join("vfsd.sock");
    let bin = std::env::var("VIRTIOFSD").unwrap_or_else(|_| "virtiofsd".into());
    let timeout = Duration::from_secs(20);
    let _daemon = spawn_virtiofsd(Path::new(&bin), &sock, &vhu, "auto", timeout);
    let c = &mut guest.config;
    c.boot_source.boot_args =
        Some("console=ttyS0 reboot=k panic=1 ip=10.0.9.2::10.0.9.1:255.255.255.0::eth0:off".into());
    if !fs_only {
        c.network_interfaces = vec![NetConfig {
            iface_id: "eth0".into(),
            host_dev_name: Some(tap.clone()),
            create_tap: true,
            ..NetConfig::default()
        }];
    }
    c.fs = vec![
        FsConfig::shared_dir("inproc", &inproc),
        FsConfig::vhost_user("vhu", &sock),
    ];
    let vm = Vm::create(&guest.config).expect("create");
    if !fs_only {
        ns.ip(&["addr", "add", "10.0.9.1/24", "dev", &tap]);
        ns.ip(&["link", "set", &tap, "up"]);
    }
    let sb = Sandbox::from_vm(&guest.config, vm, Duration::from_secs(900)).expect("boot");
    let mut a = sb.agent();
    a.set_call_timeout(Some(Duration::from_secs(900)));
    if !fs_only {
        net_table(&sb, &mut a, &ns, &tap);
    }
    if !net_only {
        println!();
        fs_table(&mut a, &guest.dir);
    }
    drop(a);
    let _ = sb.shutdown(Duration::from_secs(60));
}
