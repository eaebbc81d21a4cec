//! Real-guest tests of virtio-blk and virtio-vsock through the guest agent: one boot, many
//! checks. A second boot checks an ext4 root drive.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kestrel_agent_proto as proto;
use kestrel_api::{DriveConfig, RateLimiterConfig, SerialOutput, TokenBucketConfig, VmConfig};
use kestrel_sandbox::agent::AgentClient;
use kestrel_sandbox::Sandbox;
use kestrel_tests::guest::{
    agent_guest, hex, hybrid_connect, receive_all, send_stream, sha256_hex, MIB, MIB_BYTES,
};
use kestrel_tests::*;
use kestrel_vmm::VmExit;
use sha2::{Digest, Sha256};

use super::{boot, check_stream_into_guest, create_captured, read_trimmed, sh, wait_until};

/// SHA-256 (hex) of the first `len` bytes of the host file `path`.
fn sha_file(path: &Path, len: u64) -> String {
    let mut h = Sha256::new();
    let n = std::io::copy(&mut File::open(path).unwrap().take(len), &mut h).unwrap();
    assert_eq!(n, len, "{path:?} is shorter than {len} bytes");
    hex(&h.finalize())
}

/// A host file of `mib` MiB of the [`XorShift`] stream of `seed`.
fn random_file(path: &Path, mib: u64, seed: u64) {
    send_stream(&mut File::create(path).unwrap(), seed, mib).unwrap();
}

fn drive(id: &str, path: Option<&Path>, ro: bool) -> DriveConfig {
    DriveConfig {
        drive_id: id.into(),
        path_on_host: path.map(Path::to_path_buf),
        is_read_only: ro,
        serial: Some(format!("kestrel-{id}")),
        ..DriveConfig::default()
    }
}

/// The host files behind the drives of [`block_and_vsock_through_the_agent`], and the files
/// its empty slot gets later.
struct Disks {
    /// 80 MiB of zeroes, written by the guest.
    data: PathBuf,
    /// 64 MiB of pseudo-random data, read by the guest (read-only).
    src: PathBuf,
    /// 1 MiB, read-only.
    ro: PathBuf,
    /// 1 MiB and 3 MiB for the empty slot.
    swap: [PathBuf; 2],
}

impl Disks {
    fn create(dir: &Path) -> Disks {
        let data = dir.join("data.img");
        File::create(&data).unwrap().set_len(80 * MIB).unwrap();
        let [src, ro, swap1, swap2] =
            ["src", "ro", "swap1", "swap2"].map(|n| dir.join(format!("{n}.img")));
        for (path, mib, seed) in [(&src, 64, 7), (&ro, 1, 9), (&swap1, 1, 21), (&swap2, 3, 22)] {
            random_file(path, mib, seed);
        }
        Disks {
            data,
            src,
            ro,
            swap: [swap1, swap2],
        }
    }

    /// The drives: `data`, `src` and `ro` on the files, `slot` empty.
    fn drives(&self) -> Vec<DriveConfig> {
        vec![
            drive("data", Some(&self.data), false),
            drive("src", Some(&self.src), true),
            drive("ro", Some(&self.ro), true),
            drive("slot", None, false),
        ]
    }
}

/// A drive as the guest sees it.
struct GuestDrive {
    /// Block device name (`vdb`).
    name: String,
    /// Capacity in 512-byte sectors.
    sectors: u64,
    /// The guest's read-only flag.
    ro: u32,
}

#[test]
fn block_and_vsock_through_the_agent() {
    let mut guest = agent_guest("devices", 1, 256);
    guest.config.kestrel.name = Some("devs".into());
    let disks = Disks::create(&guest.dir);
    guest.config.drives = disks.drives();
    let (sb, _cap) = boot(&guest.config);
    let mut agent = sb.agent();
    assert!(agent.ping().is_ok());

    let dev = check_drives_found_by_serial(&mut agent);
    check_guest_disk_copy(&mut agent, &dev, &disks);
    check_block_rate_limit_at_run_time(&sb, &mut agent, &dev["data"].name);
    check_read_only_drive_refuses_writes(&mut agent, &dev["ro"].name, &disks.ro);
    check_slot_hot_swap(&sb, &mut agent, &dev["slot"].name, &disks.swap);
    let m = sb.vm().device("data").and_then(|d| d.metrics().block());
    let m = m.unwrap();
    assert!(m.write_bytes >= 64 * MIB, "{m:?}");
    drop(agent);

    check_vsock_host_to_guest(&sb, &guest.uds);
    check_vsock_guest_to_host(&sb, &guest.uds);
    check_vsock_without_listener_fails_cleanly(&sb, &guest.uds);
    check_vsock_concurrent_connections(&guest.uds);
    check_shutdown_leaves_nothing(sb, &guest.uds);
}

/// Each drive shows up in the guest under its virtio-blk serial (GET_ID) with its capacity
/// and read-only flag; the empty slot has capacity 0. Returns the drives by id.
fn check_drives_found_by_serial(agent: &mut AgentClient) -> HashMap<String, GuestDrive> {
    let (code, out, err) = sh(
        agent,
        "for d in /sys/block/vd*; do echo ${d##*/} $(cat $d/serial) $(cat $d/size) $(cat $d/ro); done",
    );
    assert_eq!(code, 0, "{err}");
    let mut dev = HashMap::new();
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 4 {
            let d = GuestDrive {
                name: f[0].to_string(),
                sectors: f[2].parse().unwrap(),
                ro: f[3].parse().unwrap(),
            };
            dev.insert(f[1].trim_start_matches("kestrel-").to_string(), d);
        }
    }
    assert_eq!(dev.len(), 4, "{out}");
    assert_eq!(dev["data"].sectors, 80 * 2048, "capacity in sectors");
    assert_eq!(dev["src"].ro, 1, "read-only drive is ro in the guest");
    assert_eq!(dev["slot"].sectors, 0, "empty slot has capacity 0");
    dev
}

/// 64 MiB of pseudo-random data copied by the guest from one drive to another with O_DIRECT
/// and synced arrive intact in the host file.
fn check_guest_disk_copy(agent: &mut AgentClient, dev: &HashMap<String, GuestDrive>, d: &Disks) {
    let t = Instant::now();
    let (code, _, err) = sh(
        agent,
        &format!(
            "dd if=/dev/{} of=/dev/{} bs=1M count=64 iflag=direct oflag=direct 2>&1 && sync",
            dev["src"].name, dev["data"].name
        ),
    );
    assert_eq!(code, 0, "dd failed: {err}");
    eprintln!("guest copied 64 MiB disk to disk in {:?}", t.elapsed());
    assert_eq!(sha_file(&d.data, 64 * MIB), sha_file(&d.src, 64 * MIB));
}

/// The guest reads 1.5 MiB of `/dev/<name>` with O_DIRECT in 64 KiB requests: (seconds on the
/// host's clock, seconds by the guest's clock).
fn timed_read(agent: &mut AgentClient, name: &str) -> (f64, f64) {
    let t = Instant::now();
    let r = agent
        .request(proto::IoBench {
            path: format!("/dev/{name}"),
            block_size: 64 << 10,
            count: 24,
            ..Default::default()
        })
        .expect("io_bench");
    let guest_s = Duration::from_nanos(r.duration_ns).as_secs_f64();
    (t.elapsed().as_secs_f64(), guest_s)
}

/// A bandwidth limit set at run time holds within 20 %; a bad limit is refused naming the
/// field; lifting the limit stops the waits.
fn check_block_rate_limit_at_run_time(sb: &Sandbox, agent: &mut AgentClient, name: &str) {
    // 256 KiB/s (64 KiB every 250 ms), well below what the guest reads unthrottled here
    // (> 1 MiB/s even with another guest running).
    const LIMIT: u64 = 256 << 10;
    let limit = RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig {
            size: LIMIT / 4,
            one_time_burst: None,
            refill_time: 250,
        }),
        ops: None,
    };
    let vm = sb.vm();
    let data = vm.device("data").expect("drive data");
    let data_blk = data.block().expect("a block device");
    data_blk.update_rate_limiter(&limit).unwrap();
    let before = data.metrics().block().unwrap();
    let (host_s, guest_s) = timed_read(agent, name);
    let after = data.metrics().block().unwrap();
    // The full bucket (one request) goes at once; the other 23 requests at the refill rate.
    let rate = (24 - 1) as f64 * 65536.0 / host_s / LIMIT as f64;
    eprintln!(
        "block read under a 256 KiB/s limit: {rate:.3} x the limit, {host_s:.2} s on the host, \
         {guest_s:.2} s by the guest's clock, {} waits",
        after.rate_limited - before.rate_limited
    );
    assert!((0.8..=1.2).contains(&rate), "{rate:.3} x the limit");
    assert_eq!(after.read_bytes - before.read_bytes, 24 * 65536);
    assert!(after.rate_limited > before.rate_limited);
    let mut bad = limit;
    bad.bandwidth.as_mut().unwrap().refill_time = 0;
    let e = data_blk.update_rate_limiter(&bad).unwrap_err();
    assert!(
        e.to_string().contains("rate_limiter.bandwidth.refill_time"),
        "{e}"
    );
    assert!(vm.device("nope").is_none());
    data_blk.update_rate_limiter(&Default::default()).unwrap();
    let (free_s, _) = timed_read(agent, name);
    eprintln!("block read without a limit: {:.3} MiB/s", 1.5 / free_s);
    let m = data.metrics().block().unwrap();
    assert_eq!(m.rate_limited, after.rate_limited);
}

/// A read-only drive rejects the guest's writes and its host file stays unchanged.
fn check_read_only_drive_refuses_writes(agent: &mut AgentClient, name: &str, file: &Path) {
    let before = sha_file(file, MIB);
    let (code, _, _) = sh(
        agent,
        &format!("dd if=/dev/zero of=/dev/{name} bs=4096 count=1 oflag=direct"),
    );
    assert_ne!(code, 0, "write to a read-only drive succeeded");
    assert_eq!(sha_file(file, MIB), before);
}

/// Give the slot `backing` (None: detach) and wait up to 60 s for the guest to see
/// `sectors`; whether it did.
fn swap_slot(
    sb: &Sandbox,
    agent: &mut AgentClient,
    name: &str,
    backing: Option<&Path>,
    sectors: &str,
) -> bool {
    let slot = sb.vm().device("slot").and_then(|d| d.block());
    slot.expect("slot")
        .swap_backing(backing, backing.is_some())
        .unwrap();
    let size_path = format!("/sys/block/{name}/size");
    wait_until(Duration::from_secs(60), || {
        read_trimmed(agent, &size_path) == sectors
    })
}

/// Attaching a file to the empty slot at run time: the guest sees its size and content;
/// swapping to a larger file shows the new size and content; detaching goes back to 0.
fn check_slot_hot_swap(sb: &Sandbox, agent: &mut AgentClient, name: &str, swap: &[PathBuf; 2]) {
    let seen = swap_slot(sb, agent, name, Some(&swap[0]), "2048");
    assert!(seen, "guest never saw the attached file's capacity");
    let dev = format!("/dev/{name}");
    let d = agent.sha256_file_range(&dev, 0, Some(MIB)).unwrap();
    assert_eq!(d.sha256, sha_file(&swap[0], MIB));
    // Swap to a larger file.
    let seen = swap_slot(sb, agent, name, Some(&swap[1]), "6144");
    assert!(seen, "guest never saw the larger file");
    let d = agent.sha256_file_range(&dev, 2 * MIB, Some(MIB)).unwrap();
    let mut tail = vec![0u8; MIB_BYTES];
    File::open(&swap[1])
        .unwrap()
        .read_exact_at(&mut tail, 2 * MIB)
        .unwrap();
    assert_eq!(d.sha256, sha256_hex(&tail));
    // Detach: back to capacity 0.
    assert!(swap_slot(sb, agent, name, None, "0"));
}

/// 32 MiB host -> guest over hybrid vsock: the guest's `stream_sink` counts and hashes
/// exactly what the host sent.
fn check_vsock_host_to_guest(sb: &Sandbox, uds: &Path) {
    let sink = proto::StreamSink {
        port: 5000,
        ..Default::default()
    };
    let connect = || hybrid_connect(uds, 5000);
    check_stream_into_guest(sb, sink, connect, (11, 32), "vsock host->guest");
}

/// 32 MiB guest -> host, guest-initiated to the host socket `<uds>_5001`: the host receives
/// exactly what the guest's `stream_source` reports it sent.
fn check_vsock_guest_to_host(sb: &Sandbox, uds: &Path) {
    let listen_path = PathBuf::from(format!("{}_5001", uds.display()));
    let _ = std::fs::remove_file(&listen_path);
    let l = UnixListener::bind(&listen_path).unwrap();
    let recv = std::thread::spawn(move || receive_all(l.accept().unwrap().0));
    let mut agent = sb.agent();
    agent.set_call_timeout(Some(Duration::from_secs(900)));
    let t = Instant::now();
    let r = agent.request(proto::StreamSource {
        port: 5001,
        bytes: 32 * MIB,
        seed: 13,
        tcp_host: None,
    });
    eprintln!(
        "vsock metrics after guest->host: {:?}",
        sb.vm().device("vsock").and_then(|d| d.metrics().vsock())
    );
    let r = r.expect("stream_source");
    let got = recv.join().unwrap();
    eprintln!("vsock guest->host 32 MiB in {:?}", t.elapsed());
    assert_eq!(got.bytes, 32 * MIB);
    assert_eq!(r.sha256, got.sha256);
    let _ = std::fs::remove_file(&listen_path);
}

/// Without a listener, connections fail cleanly on both sides: the host's CONNECT to a guest
/// port nobody listens on is closed, the guest's connect to a host port without a socket is
/// an error.
fn check_vsock_without_listener_fails_cleanly(sb: &Sandbox, uds: &Path) {
    let err = hybrid_connect(uds, 5999).expect_err("no guest listener on 5999");
    assert!(err.to_string().contains("closed before OK"), "{err}");
    let e = sb
        .agent()
        .request(proto::StreamSource {
            port: 5998,
            bytes: 10,
            ..Default::default()
        })
        .expect_err("no host listener on 5998");
    assert!(e.to_string().contains("connect"), "{e}");
}

/// 16 concurrent agent connections, each moving its own data (one agent thread per
/// connection): every write and read back is intact.
fn check_vsock_concurrent_connections(uds: &Path) {
    let handles: Vec<_> = (0..16u32)
        .map(|i| {
            let u = uds.to_path_buf();
            std::thread::spawn(move || {
                let mut a = AgentClient::connect(&u, 1024, Duration::from_secs(60)).unwrap();
                a.ping().unwrap();
                // The low byte of k * 7 + i.
                let payload: Vec<u8> = (0..64 * 1024u32)
                    .map(|k| (k * 7 + i).to_le_bytes()[0])
                    .collect();
                let path = format!("/tmp/conn-{i}");
                let w = a.write_file(&path, &payload, None).unwrap();
                assert_eq!(w.sha256, sha256_hex(&payload));
                assert_eq!(a.read_file(&path).unwrap(), payload);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// The guest shuts down cleanly; the VM's threads are joined once it stopped and its vsock
/// socket is removed with it.
fn check_shutdown_leaves_nothing(sb: Sandbox, uds: &Path) {
    let vsock = sb.vm().device("vsock").and_then(|d| d.metrics().vsock());
    eprintln!("vsock metrics: {:?}", vsock.unwrap());
    assert_eq!(sb.shutdown(Duration::from_secs(120)), Some(VmExit::Reset));
    assert!(
        sb.vm().threads().is_empty(),
        "threads are joined once the VM stopped"
    );
    drop(sb);
    assert!(!uds.exists(), "the vsock socket is removed with the VM");
}

#[test]
fn ext4_root_drive_mounts_as_root() {
    let g = guest_artifacts();
    let dir = scratch_dir().join("rootfs");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tree")).unwrap();
    // The root file system: the initramfs contents in an ext4 image made by mkfs.ext4.
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && cpio -idm --quiet < {} && mkfs.ext4 -q -F -L kestrel-root -d . {} 64M",
            dir.join("tree").display(),
            g.initramfs.display(),
            dir.join("root.img").display()
        ))
        .status()
        .unwrap();
    assert!(st.success(), "building the ext4 image failed");
    let mut c = VmConfig::new(g.vmlinux, 1, 128);
    c.boot_source.boot_args = Some("console=ttyS0 reboot=k panic=1 init=/init".into());
    c.serial.output = SerialOutput::None;
    let mut root = drive("rootfs", Some(&dir.join("root.img")), false);
    root.is_root_device = true;
    c.drives = vec![root];
    let (vm, cap) = create_captured(&c);
    assert!(
        vm.cmdline().contains("root=/dev/vda rw"),
        "{}",
        vm.cmdline()
    );
    vm.start().unwrap();
    let exit = vm.wait_timeout(Duration::from_secs(900));
    let text = cap.text();
    assert_eq!(exit, Some(VmExit::Reset), "{text}");
    assert!(
        text.contains("VFS: Mounted root (ext4 filesystem)"),
        "{text}"
    );
    assert!(text.contains("KESTREL_GUEST_READY"), "{text}");
}
