//! virtio-net over real TAP devices in a network namespace made by the test: ping, 64 MiB TCP
//! each way with checksums (jumbo frames), link down/up seen by the guest, a hot-attached slot
//! carrying traffic (MTU 1500), and a 1 MiB/s TX rate limit set at run time. One boot.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use kestrel_api::{NetConfig, RateLimiterConfig, SerialOutput, TokenBucketConfig, VmConfig};
use kestrel_tests::*;

use super::{agent_vsock, create_captured, hex, sandbox, sh_merged, wait_until};
use kestrel_sandbox::agent::AgentClient;
use kestrel_vmm::VmExit;
use serde_json::json;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        Netns(name.to_string())
    }

    /// Move the calling thread into the namespace (sockets and TAPs it creates live there).
    fn enter(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.0)).unwrap();
        // SAFETY: setns on a valid namespace fd; affects only this thread.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    }

    fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn carrier(agent: &mut AgentClient, iface: &str) -> String {
    agent
        .read_file(&format!("/sys/class/net/{iface}/carrier"))
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_else(|e| format!("error: {e}"))
}

/// Receive everything on one TCP connection; returns (bytes, sha256, first byte, last byte).
fn receive(l: TcpListener) -> (u64, String, Instant, Instant) {
    let (mut c, _) = l.accept().unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    let mut first = None;
    loop {
        let k = c.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        h.update(&buf[..k]);
        n += k as u64;
    }
    (
        n,
        hex(&h.finalize()),
        first.unwrap_or_else(Instant::now),
        Instant::now(),
    )
}

#[test]
fn tap_networking_in_a_namespace() {
    let g = guest_artifacts();
    let pid = std::process::id();
    let ns = Netns::new(&format!("ktn{pid}"));
    let (tap0, tap1) = (format!("kt{pid}a"), format!("kt{pid}b"));
    ns.enter();
    let dir = scratch_dir().join("net");
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let _ = std::fs::remove_file(&uds);

    let mut c = VmConfig::new(g.vmlinux, 1, 256);
    c.boot_source.initrd_path = Some(g.initramfs);
    c.boot_source.boot_args =
        Some("console=ttyS0 reboot=k panic=1 ip=10.0.2.2::10.0.2.1:255.255.255.0::eth0:off".into());
    c.serial.output = SerialOutput::None;
    c.kestrel.name = Some("net".into());
    c.network_interfaces = vec![
        NetConfig {
            iface_id: "eth0".into(),
            host_dev_name: Some(tap0.clone()),
            guest_mac: Some("06:00:0a:00:02:02".into()),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            create_tap: true,
            ..NetConfig::default()
        },
        NetConfig {
            iface_id: "hot".into(),
            host_dev_name: None,
            guest_mac: Some("06:00:0a:00:03:02".into()),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            create_tap: false,
            ..NetConfig::default()
        },
    ];
    c.vsock = agent_vsock(&uds);
    let (vm, cap) = create_captured(&c);
    // Host side of eth0, inside the namespace.
    let (ok, out) = ns.run(&["ip", "addr", "add", "10.0.2.1/24", "dev", &tap0]);
    assert!(ok, "{out}");
    let (ok, out) = ns.run(&["ip", "link", "set", &tap0, "up"]);
    assert!(ok, "{out}");
    let sb = sandbox(&c, vm, &cap);
    let mut a = sb.agent();
    a.set_call_timeout(Some(Duration::from_secs(900)));

    // Ping the guest from the host.
    let (ok, out) = ns.run(&["ping", "-c", "3", "-W", "10", "10.0.2.2"]);
    assert!(ok, "ping failed: {out}\nconsole:\n{}", cap.text());
    assert!(out.contains("3 received"), "{out}");

    // The bulk transfers use jumbo frames (MTU 65520 on both ends): the emulated guest kernel
    // on the CI machines spends milliseconds per packet, and at its low TCP rates Linux sizes
    // TSO bursts at two segments, so with MTU 1500 the guest moves ~0.2 MB/s; 64 KiB frames
    // carry ~20x more per packet. Ping and hot-attach above/below stay at the default MTU.
    let (ok, out) = ns.run(&["ip", "link", "set", &tap0, "mtu", "65520"]);
    assert!(ok, "{out}");
    let (code, out) = sh_merged(&mut a, "ip link set eth0 mtu 65520");
    assert_eq!(code, 0, "{out}");

    // Guest -> host: 64 MiB over TCP.
    let l = TcpListener::bind("10.0.2.1:5001").unwrap();
    let rx = std::thread::spawn(move || receive(l));
    let t = Instant::now();
    let r = a
        .call(
            "stream_source",
            json!({"port": 5001, "bytes": 64 * MIB, "seed": 31, "tcp_host": "10.0.2.1"}),
        )
        .expect("guest tcp send");
    let (n, sha, _, _) = rx.join().unwrap();
    eprintln!("TCP guest->host 64 MiB in {:?}", t.elapsed());
    assert_eq!(n, 64 * MIB);
    assert_eq!(r["sha256"], sha.as_str());

    // Host -> guest: 64 MiB over TCP.
    let mut a2 = sb.connect_agent(Duration::from_secs(30)).unwrap();
    a2.set_call_timeout(Some(Duration::from_secs(900)));
    let sink =
        std::thread::spawn(move || a2.call("stream_sink", json!({"port": 5002, "tcp": true})));
    let mut s = None;
    assert!(wait_until(Duration::from_secs(60), || {
        s = TcpStream::connect("10.0.2.2:5002").ok();
        s.is_some()
    }));
    let mut s = s.unwrap();
    let mut rng = XorShift::new(32);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    let t = Instant::now();
    for _ in 0..64 {
        rng.fill(&mut buf);
        s.write_all(&buf).unwrap();
        h.update(&buf);
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let r = sink.join().unwrap().expect("guest tcp receive");
    eprintln!("TCP host->guest 64 MiB in {:?}", t.elapsed());
    assert_eq!(r["bytes"], 64 * MIB);
    assert_eq!(r["sha256"], hex(&h.finalize()).as_str());

    // Link down / up through the API, seen in the guest.
    assert_eq!(carrier(&mut a, "eth0"), "1");
    let eth0 = sb.vm().device("eth0").and_then(|d| d.net()).expect("eth0");
    eth0.set_link(false);
    assert!(
        wait_until(Duration::from_secs(60), || carrier(&mut a, "eth0") == "0"),
        "carrier stayed up"
    );
    eth0.set_link(true);
    assert!(
        wait_until(Duration::from_secs(60), || carrier(&mut a, "eth0") == "1"),
        "carrier stayed down"
    );

    // Hot-attach: the slot has no TAP (link down) until the API attaches one. (carrier is
    // readable only on an interface that is administratively up.)
    let (code, out) = sh_merged(&mut a, "ip link set eth1 up");
    assert_eq!(code, 0, "{out}");
    assert_eq!(carrier(&mut a, "eth1"), "0");
    let hot = sb.vm().device("hot").and_then(|d| d.net()).expect("hot");
    hot.attach_tap(&tap1, true).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || carrier(&mut a, "eth1") == "1"),
        "hot link never came up"
    );
    let (ok, out) = ns.run(&["ip", "addr", "add", "10.0.3.1/24", "dev", &tap1]);
    assert!(ok, "{out}");
    let (ok, out) = ns.run(&["ip", "link", "set", &tap1, "up"]);
    assert!(ok, "{out}");
    let (code, out) = sh_merged(
        &mut a,
        "ip addr add 10.0.3.2/24 dev eth1 && ip link set eth1 up",
    );
    assert_eq!(code, 0, "{out}");
    let (ok, out) = ns.run(&["ping", "-c", "3", "-W", "10", "10.0.3.2"]);
    assert!(ok && out.contains("3 received"), "hot-attached slot: {out}");
    hot.detach_tap();
    assert!(wait_until(Duration::from_secs(60), || carrier(
        &mut a, "eth1"
    ) == "0"));

    // A 1 MiB/s TX limit, set at run time, holds within 20 % over a ~5 s transfer.
    const RATE: u64 = MIB;
    let limit = RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig {
            size: RATE,
            one_time_burst: None,
            refill_time: 1000,
        }),
        ops: None,
    };
    eth0.update_rate_limiters(None, Some(&limit)).unwrap();
    let l = TcpListener::bind("10.0.2.1:5003").unwrap();
    let rx = std::thread::spawn(move || receive(l));
    a.call(
        "stream_source",
        json!({"port": 5003, "bytes": 6 * RATE, "seed": 33, "tcp_host": "10.0.2.1"}),
    )
    .expect("rate-limited send");
    let (n, _, first, last) = rx.join().unwrap();
    assert_eq!(n, 6 * RATE);
    // The full bucket goes out at once; the rest at the refill rate.
    let secs = last.duration_since(first).as_secs_f64();
    let rate = (n - RATE) as f64 / secs / RATE as f64;
    eprintln!(
        "rate-limited TX: {n} bytes in {secs:.2} s -> {rate:.3} x the limit after the bucket"
    );
    assert!((0.8..=1.2).contains(&rate), "rate {rate:.3} x the limit");
    let m = sb
        .vm()
        .device("eth0")
        .and_then(|d| d.metrics().net())
        .unwrap();
    assert!(m.tx_throttled > 0, "{m:?}");
    eprintln!("eth0 metrics: {m:?}");
    eth0.update_rate_limiters(None, Some(&RateLimiterConfig::default()))
        .unwrap();
    drop(a);
    assert_eq!(sb.shutdown(Duration::from_secs(120)), Some(VmExit::Reset));
}
