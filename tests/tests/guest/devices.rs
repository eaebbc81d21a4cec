//! Real-guest tests of virtio-blk and virtio-vsock through the guest agent: one boot, many
//! checks. A second boot checks an ext4 root drive.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kestrel_api::{DriveConfig, SerialOutput, VmConfig};
use kestrel_tests::*;

use super::{agent_vsock, create_captured, hex, sandbox, sh, wait_until};
use kestrel_sandbox::agent::AgentClient;
use kestrel_vmm::VmExit;
use serde_json::json;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

fn sha_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn sha_file(path: &Path, len: u64) -> String {
    let mut f = File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB) as usize;
        f.read_exact(&mut buf[..n]).unwrap();
        h.update(&buf[..n]);
        left -= n as u64;
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn random_file(path: &Path, size: u64, seed: u64) {
    let mut f = File::create(path).unwrap();
    let mut rng = XorShift::new(seed);
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
}

fn drive(id: &str, path: Option<&Path>, ro: bool) -> DriveConfig {
    DriveConfig {
        drive_id: id.into(),
        path_on_host: path.map(Path::to_path_buf),
        is_root_device: false,
        is_read_only: ro,
        serial: Some(format!("kestrel-{id}")),
        partuuid: None,
        rate_limiter: None,
        ..DriveConfig::default()
    }
}

/// Connect to a guest port through the hybrid vsock socket; Ok(stream) after "OK <port>".
fn hybrid_connect(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => return Err(std::io::Error::other("closed before OK")),
            _ if b[0] == b'\n' => break,
            _ => line.push(b[0]),
        }
    }
    let l = String::from_utf8_lossy(&line);
    if !l.starts_with("OK ") {
        return Err(std::io::Error::other(format!("unexpected reply {l}")));
    }
    Ok(s)
}

#[test]
fn block_and_vsock_through_the_agent() {
    let g = guest_artifacts();
    let dir = scratch_dir().join("devices");
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data.img");
    File::create(&data).unwrap().set_len(80 * MIB).unwrap();
    let src = dir.join("src.img");
    random_file(&src, 64 * MIB, 7);
    let ro = dir.join("ro.img");
    random_file(&ro, MIB, 9);
    let swap1 = dir.join("swap1.img");
    random_file(&swap1, MIB, 21);
    let swap2 = dir.join("swap2.img");
    random_file(&swap2, 3 * MIB, 22);
    let uds = dir.join("v.sock");
    let _ = std::fs::remove_file(&uds);

    let mut c = VmConfig::new(g.vmlinux, 1, 256);
    c.boot_source.initrd_path = Some(g.initramfs);
    c.serial.output = SerialOutput::None;
    c.kestrel.name = Some("devs".into());
    c.drives = vec![
        drive("data", Some(&data), false),
        drive("src", Some(&src), true),
        drive("ro", Some(&ro), true),
        drive("slot", None, false),
    ];
    c.vsock = agent_vsock(&uds);
    let (vm, cap) = create_captured(&c);
    let t0 = Instant::now();
    let sb = sandbox(&c, vm, &cap);
    eprintln!("agent up after {:?}", t0.elapsed());
    let mut agent = sb.agent();
    assert!(agent.ping().is_ok());

    // Which /dev/vdX is which drive (by virtio-blk serial, GET_ID).
    let (code, out, err) = sh(
        &mut agent,
        "for d in /sys/block/vd*; do echo ${d##*/} $(cat $d/serial) $(cat $d/size) $(cat $d/ro); done",
    );
    assert_eq!(code, 0, "{err}");
    let mut dev: HashMap<String, (String, u64, u32)> = HashMap::new();
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 4 {
            dev.insert(
                f[1].trim_start_matches("kestrel-").to_string(),
                (
                    f[0].to_string(),
                    f[2].parse().unwrap(),
                    f[3].parse().unwrap(),
                ),
            );
        }
    }
    assert_eq!(dev.len(), 4, "{out}");
    assert_eq!(dev["data"].1, 80 * 2048, "capacity in sectors");
    assert_eq!(dev["src"].2, 1, "read-only drive is ro in the guest");
    assert_eq!(dev["slot"].1, 0, "empty slot has capacity 0");

    // 64 MiB of pseudo-random data written by the guest, synced, checked on the host.
    let t = Instant::now();
    let (code, _, err) = sh(
        &mut agent,
        &format!(
            "dd if=/dev/{} of=/dev/{} bs=1M count=64 iflag=direct oflag=direct 2>&1 && sync",
            dev["src"].0, dev["data"].0
        ),
    );
    assert_eq!(code, 0, "dd failed: {err}");
    eprintln!("guest copied 64 MiB disk to disk in {:?}", t.elapsed());
    assert_eq!(sha_file(&data, 64 * MIB), sha_file(&src, 64 * MIB));

    // Rate limit set at run time: 256 KiB/s (64 KiB every 250 ms) on the data drive, well
    // below what the guest reads unthrottled here (> 1 MiB/s even with another guest running).
    // The guest reads 1.5 MiB with O_DIRECT in 64 KiB requests; timed on the host.
    const LIMIT: u64 = 256 << 10;
    let limit = kestrel_api::RateLimiterConfig {
        bandwidth: Some(kestrel_api::TokenBucketConfig {
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
    let read = |agent: &mut AgentClient| {
        let t = Instant::now();
        let r = agent
            .call(
                "io_bench",
                json!({"path": format!("/dev/{}", dev["data"].0), "block_size": 64 << 10,
                       "count": 24}),
            )
            .expect("io_bench");
        let guest_s = r["duration_ns"].as_u64().unwrap() as f64 / 1e9;
        (t.elapsed().as_secs_f64(), guest_s)
    };
    let (host_s, guest_s) = read(&mut agent);
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
    // Bad limits are refused naming the field; lifting the limit stops the waits.
    let mut bad = limit;
    bad.bandwidth.as_mut().unwrap().refill_time = 0;
    let e = data_blk.update_rate_limiter(&bad).unwrap_err();
    assert!(
        e.to_string().contains("rate_limiter.bandwidth.refill_time"),
        "{e}"
    );
    assert!(vm.device("nope").is_none());
    data_blk.update_rate_limiter(&Default::default()).unwrap();
    let (free_s, _) = read(&mut agent);
    eprintln!("block read without a limit: {:.3} MiB/s", 1.5 / free_s);
    assert_eq!(
        data.metrics().block().unwrap().rate_limited,
        after.rate_limited
    );

    // A read-only drive rejects writes and stays unchanged.
    let before = sha_file(&ro, MIB);
    let (code, _, _) = sh(
        &mut agent,
        &format!(
            "dd if=/dev/zero of=/dev/{} bs=4096 count=1 oflag=direct",
            dev["ro"].0
        ),
    );
    assert_ne!(code, 0, "write to a read-only drive succeeded");
    assert_eq!(sha_file(&ro, MIB), before);

    // Hot-swap: attach a file to the empty slot, the guest sees the size and the content.
    let slot = dev["slot"].0.clone();
    sb.vm()
        .device("slot")
        .and_then(|d| d.block())
        .expect("slot")
        .swap_backing(Some(&swap1), true)
        .unwrap();
    let size_path = format!("/sys/block/{slot}/size");
    let seen = wait_until(Duration::from_secs(60), || {
        agent
            .read_file(&size_path)
            .map(|b| String::from_utf8_lossy(&b).trim() == "2048")
            .unwrap_or(false)
    });
    assert!(seen, "guest never saw the attached file's capacity");
    let d = agent
        .sha256_file_range(&format!("/dev/{slot}"), 0, Some(MIB))
        .unwrap();
    assert_eq!(d.sha256, sha_file(&swap1, MIB));
    // Swap to a larger file.
    sb.vm()
        .device("slot")
        .and_then(|d| d.block())
        .expect("slot")
        .swap_backing(Some(&swap2), true)
        .unwrap();
    let seen = wait_until(Duration::from_secs(60), || {
        agent
            .read_file(&size_path)
            .map(|b| String::from_utf8_lossy(&b).trim() == "6144")
            .unwrap_or(false)
    });
    assert!(seen, "guest never saw the larger file");
    let d = agent
        .sha256_file_range(&format!("/dev/{slot}"), 2 * MIB, Some(MIB))
        .unwrap();
    let mut tail = vec![0u8; MIB as usize];
    let mut f = File::open(&swap2).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(2 * MIB)).unwrap();
    f.read_exact(&mut tail).unwrap();
    assert_eq!(d.sha256, sha_hex(&tail));
    // Detach: back to capacity 0.
    sb.vm()
        .device("slot")
        .and_then(|d| d.block())
        .expect("slot")
        .swap_backing(None, false)
        .unwrap();
    assert!(wait_until(Duration::from_secs(60), || {
        agent
            .read_file(&size_path)
            .map(|b| String::from_utf8_lossy(&b).trim() == "0")
            .unwrap_or(false)
    }));
    let m = sb
        .vm()
        .device("data")
        .and_then(|d| d.metrics().block())
        .unwrap();
    assert!(m.write_bytes >= 64 * MIB, "{m:?}");
    drop(agent);

    // vsock host -> guest, 32 MiB.
    let mut a2 = sb.connect_agent(Duration::from_secs(30)).unwrap();
    a2.set_call_timeout(Some(Duration::from_secs(900)));
    let sink = std::thread::spawn(move || a2.call("stream_sink", json!({"port": 5000})));
    let mut s = None;
    assert!(wait_until(Duration::from_secs(60), || {
        s = hybrid_connect(&uds, 5000).ok();
        s.is_some()
    }));
    let mut s = s.unwrap();
    let mut rng = XorShift::new(11);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    let t = Instant::now();
    for _ in 0..32 {
        rng.fill(&mut buf);
        s.write_all(&buf).unwrap();
        h.update(&buf);
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let r = sink.join().unwrap().expect("stream_sink");
    let host_to_guest = t.elapsed();
    let want: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(r["bytes"], 32 * MIB);
    assert_eq!(r["sha256"], want.as_str());
    eprintln!("vsock host->guest 32 MiB in {host_to_guest:?}");

    // vsock guest -> host, 32 MiB, guest-initiated to <uds>_5001.
    let listen_path = PathBuf::from(format!("{}_5001", uds.display()));
    let _ = std::fs::remove_file(&listen_path);
    let l = UnixListener::bind(&listen_path).unwrap();
    let recv = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut n = 0u64;
        loop {
            let k = c.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k as u64;
        }
        drop(c);
        (
            n,
            h.finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
        )
    });
    let mut agent = sb.agent();
    agent.set_call_timeout(Some(Duration::from_secs(900)));
    let t = Instant::now();
    let r = agent.call(
        "stream_source",
        json!({"port": 5001, "bytes": 32 * MIB, "seed": 13}),
    );
    eprintln!(
        "vsock metrics after guest->host: {:?}",
        sb.vm().device("vsock").and_then(|d| d.metrics().vsock())
    );
    let r = r.expect("stream_source");
    let (n, got) = recv.join().unwrap();
    eprintln!("vsock guest->host 32 MiB in {:?}", t.elapsed());
    assert_eq!(n, 32 * MIB);
    assert_eq!(r["sha256"], got.as_str());
    let _ = std::fs::remove_file(&listen_path);

    // No listener: clean failure on both sides.
    let err = hybrid_connect(&uds, 5999).expect_err("no guest listener on 5999");
    assert!(err.to_string().contains("closed before OK"), "{err}");
    let e = agent
        .call("stream_source", json!({"port": 5998, "bytes": 10}))
        .expect_err("no host listener on 5998");
    assert!(e.to_string().contains("connect"), "{e}");
    drop(agent);

    // 16 concurrent connections, each moving its own data through the agent (one agent thread
    // per connection).
    let uds2 = uds.clone();
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let u = uds2.clone();
            std::thread::spawn(move || {
                let mut a = AgentClient::connect(&u, 1024, Duration::from_secs(60)).unwrap();
                a.ping().unwrap();
                let payload: Vec<u8> = (0..64 * 1024u32).map(|k| (k * 7 + i) as u8).collect();
                let path = format!("/tmp/conn-{i}");
                let w = a.write_file(&path, &payload, None).unwrap();
                assert_eq!(w.sha256, sha_hex(&payload));
                assert_eq!(a.read_file(&path).unwrap(), payload);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let vm_metrics = sb
        .vm()
        .device("vsock")
        .and_then(|d| d.metrics().vsock())
        .unwrap();
    eprintln!("vsock metrics: {vm_metrics:?}");

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
