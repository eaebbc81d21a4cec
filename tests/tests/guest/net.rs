//! virtio-net over real TAP devices in a network namespace made by the test: ping, 64 MiB TCP
//! each way with checksums (jumbo frames), link down/up seen by the guest, a hot-attached slot
//! carrying traffic (MTU 1500), and a 1 MiB/s TX rate limit set at run time. One boot.

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use kestrel_agent_proto as proto;
use kestrel_api::{NetConfig, RateLimiterConfig, TokenBucketConfig};
use kestrel_sandbox::agent::AgentClient;
use kestrel_sandbox::Sandbox;
use kestrel_tests::guest::{agent_guest, receive_all, Received, MIB};
use kestrel_tests::netns::Netns;
use kestrel_tests::Capture;

use super::{
    check_clean_shutdown, check_stream_into_guest, create_captured, read_trimmed, sandbox, sh_ok,
    wait_until,
};

/// The host's TAP devices: `eth0`'s (10.0.2.1, made by the VM) and the one hot-attached to
/// the slot `hot` (10.0.3.1).
struct Taps {
    eth0: String,
    hot: String,
}

fn carrier(agent: &mut AgentClient, iface: &str) -> String {
    read_trimmed(agent, &format!("/sys/class/net/{iface}/carrier"))
}

/// Wait up to 60 s for `iface`'s carrier to read `want` in the guest.
fn carrier_becomes(agent: &mut AgentClient, iface: &str, want: &str) -> bool {
    wait_until(Duration::from_secs(60), || carrier(agent, iface) == want)
}

/// The guest's `stream_source` sends `bytes` of stream `seed` over TCP to the host's
/// 10.0.2.1:`port`; what the host received, and the guest's account of what it sent.
fn guest_tcp_send(
    a: &mut AgentClient,
    port: u32,
    bytes: u64,
    seed: u64,
) -> (Received, proto::StreamStats) {
    let l = TcpListener::bind(format!("10.0.2.1:{port}")).unwrap();
    let rx = std::thread::spawn(move || receive_all(l.accept().unwrap().0));
    let sent = a.request(proto::StreamSource {
        port,
        bytes,
        seed,
        tcp_host: Some("10.0.2.1".into()),
    });
    let sent = sent.expect("guest tcp send");
    (rx.join().unwrap(), sent)
}

#[test]
fn tap_networking_in_a_namespace() {
    let mut guest = agent_guest("net", 1, 256);
    let pid = std::process::id();
    let ns = Netns::new(&format!("ktn{pid}"));
    let taps = Taps {
        eth0: format!("kt{pid}a"),
        hot: format!("kt{pid}b"),
    };
    ns.enter();
    guest.config.boot_source.boot_args =
        Some("console=ttyS0 reboot=k panic=1 ip=10.0.2.2::10.0.2.1:255.255.255.0::eth0:off".into());
    guest.config.network_interfaces = vec![
        NetConfig {
            iface_id: "eth0".into(),
            host_dev_name: Some(taps.eth0.clone()),
            guest_mac: Some("06:00:0a:00:02:02".into()),
            create_tap: true,
            ..NetConfig::default()
        },
        NetConfig {
            iface_id: "hot".into(),
            guest_mac: Some("06:00:0a:00:03:02".into()),
            ..NetConfig::default()
        },
    ];
    let (vm, cap) = create_captured(&guest.config);
    // Host side of eth0, inside the namespace.
    ns.ip(&["addr", "add", "10.0.2.1/24", "dev", &taps.eth0]);
    ns.ip(&["link", "set", &taps.eth0, "up"]);
    let sb = sandbox(&guest.config, vm, &cap);
    let mut a = sb.agent();
    a.set_call_timeout(Some(Duration::from_secs(900)));

    check_ping_from_host(&ns, &cap);
    check_tcp_guest_to_host_jumbo(&ns, &taps, &mut a);
    check_tcp_host_to_guest(&sb);
    check_link_down_up_seen_by_guest(&sb, &mut a);
    check_hot_attached_tap_carries_traffic(&sb, &ns, &taps, &mut a);
    check_tx_rate_limit_at_run_time(&sb, &mut a);
    drop(a);
    check_clean_shutdown(&sb);
}

/// The host pings the guest through its TAP.
fn check_ping_from_host(ns: &Netns, cap: &Capture) {
    let (ok, out) = ns.exec(&["ping", "-c", "3", "-W", "10", "10.0.2.2"]);
    assert!(ok, "ping failed: {out}\nconsole:\n{}", cap.text());
    assert!(out.contains("3 received"), "{out}");
}

/// 64 MiB guest -> host over TCP with jumbo frames arrive intact.
///
/// The bulk transfers use jumbo frames (MTU 65520 on both ends): the emulated guest kernel
/// on the CI machines spends milliseconds per packet, and at its low TCP rates Linux sizes
/// TSO bursts at two segments, so with MTU 1500 the guest moves ~0.2 MB/s; 64 KiB frames
/// carry ~20x more per packet. Ping and hot-attach stay at the default MTU.
fn check_tcp_guest_to_host_jumbo(ns: &Netns, taps: &Taps, a: &mut AgentClient) {
    ns.ip(&["link", "set", &taps.eth0, "mtu", "65520"]);
    sh_ok(a, "ip link set eth0 mtu 65520");
    let t = Instant::now();
    let (got, sent) = guest_tcp_send(a, 5001, 64 * MIB, 31);
    eprintln!("TCP guest->host 64 MiB in {:?}", t.elapsed());
    assert_eq!(got.bytes, 64 * MIB);
    assert_eq!(sent.sha256, got.sha256);
}

/// 64 MiB host -> guest over TCP: the guest's `stream_sink` counts and hashes exactly what
/// the host sent.
fn check_tcp_host_to_guest(sb: &Sandbox) {
    let sink = proto::StreamSink {
        port: 5002,
        timeout_ms: None,
        tcp: true,
    };
    let connect = || TcpStream::connect("10.0.2.2:5002");
    check_stream_into_guest(sb, sink, connect, (32, 64), "TCP host->guest");
}

/// Link down and up through the API are seen by the guest as its carrier.
fn check_link_down_up_seen_by_guest(sb: &Sandbox, a: &mut AgentClient) {
    assert_eq!(carrier(a, "eth0"), "1");
    let eth0 = sb.vm().device("eth0").and_then(|d| d.net()).expect("eth0");
    eth0.set_link(false);
    assert!(carrier_becomes(a, "eth0", "0"), "carrier stayed up");
    eth0.set_link(true);
    assert!(carrier_becomes(a, "eth0", "1"), "carrier stayed down");
}

/// The slot has no TAP (link down) until the API attaches one; then its link comes up and
/// carries a ping; detaching takes the link down again. (carrier is readable only on an
/// interface that is administratively up.)
fn check_hot_attached_tap_carries_traffic(
    sb: &Sandbox,
    ns: &Netns,
    taps: &Taps,
    a: &mut AgentClient,
) {
    sh_ok(a, "ip link set eth1 up");
    assert_eq!(carrier(a, "eth1"), "0");
    let hot = sb.vm().device("hot").and_then(|d| d.net()).expect("hot");
    hot.attach_tap(&taps.hot, true).unwrap();
    assert!(carrier_becomes(a, "eth1", "1"), "hot link never came up");
    ns.ip(&["addr", "add", "10.0.3.1/24", "dev", &taps.hot]);
    ns.ip(&["link", "set", &taps.hot, "up"]);
    sh_ok(a, "ip addr add 10.0.3.2/24 dev eth1 && ip link set eth1 up");
    let (ok, out) = ns.exec(&["ping", "-c", "3", "-W", "10", "10.0.3.2"]);
    assert!(ok && out.contains("3 received"), "hot-attached slot: {out}");
    hot.detach_tap();
    assert!(carrier_becomes(a, "eth1", "0"));
}

/// A 1 MiB/s TX limit set at run time holds within 20 % over a ~5 s transfer (after the full
/// bucket, which goes at once) and counts throttled packets.
fn check_tx_rate_limit_at_run_time(sb: &Sandbox, a: &mut AgentClient) {
    const RATE: u64 = MIB;
    let limit = RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig {
            size: RATE,
            one_time_burst: None,
            refill_time: 1000,
        }),
        ops: None,
    };
    let eth0 = sb.vm().device("eth0").and_then(|d| d.net()).expect("eth0");
    eth0.update_rate_limiters(None, Some(&limit)).unwrap();
    let (got, _) = guest_tcp_send(a, 5003, 6 * RATE, 33);
    let n = got.bytes;
    assert_eq!(n, 6 * RATE);
    let secs = got.last.duration_since(got.first).as_secs_f64();
    let rate = (n - RATE) as f64 / secs / RATE as f64;
    eprintln!(
        "rate-limited TX: {n} bytes in {secs:.2} s -> {rate:.3} x the limit after the bucket"
    );
    assert!((0.8..=1.2).contains(&rate), "rate {rate:.3} x the limit");
    let m = sb.vm().device("eth0").and_then(|d| d.metrics().net());
    let m = m.unwrap();
    assert!(m.tx_throttled > 0, "{m:?}");
    eprintln!("eth0 metrics: {m:?}");
    eth0.update_rate_limiters(None, Some(&RateLimiterConfig::default()))
        .unwrap();
}
