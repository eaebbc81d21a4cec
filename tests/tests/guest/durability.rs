//! Durability across `kill -9` of the VMM: the `kestrel` binary runs the real guest with a
//! virtio-blk drive backed by a host file and a hybrid vsock; in the guest,
//! `kestrel-agent recwriter` (resources/agent/src/recwriter.rs, started through the agent's
//! `exec` op) writes numbered, checksummed 4 KiB records with `O_DIRECT | O_DSYNC` and
//! acknowledges each one over vsock (guest CID 2 port P -> host socket `<uds>_P`) only after
//! its write returned. After enough acknowledgements the test sends SIGKILL to `kestrel`, then
//! reads the host file: every acknowledged record must be there, intact. What this proves:
//! Kestrel completes a guest write only once the data is in the host file (a VMM crash loses
//! nothing the guest was told is written); power loss of the host is a different question
//! (flushes are `fdatasync`, see `block_flush.rs`).

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kestrel_api::{DriveConfig, SerialOutput, VmConfig};
use kestrel_sandbox::agent::AgentClient;
use kestrel_tests::*;
use sha2::{Digest, Sha256};

use super::agent_vsock;

/// Host port the guest's writer connects to.
const PORT: u32 = 5200;
/// Records the writer would write: far more than it gets to before the kill.
const COUNT: u64 = 1 << 16;
/// Acknowledgements received before SIGKILL.
const KILL_AFTER: u64 = 200;
const RECORD: usize = 4096;

/// Record `seq` as `recwriter` writes it.
fn record(seq: u64) -> Vec<u8> {
    let mut r = vec![0u8; RECORD];
    r[..8].copy_from_slice(b"KESTREC1");
    r[8..16].copy_from_slice(&seq.to_le_bytes());
    for (i, w) in r[16..RECORD - 32].chunks_mut(8).enumerate() {
        let v = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64;
        w.copy_from_slice(&v.to_le_bytes());
    }
    let digest = Sha256::digest(&r[..RECORD - 32]);
    r[RECORD - 32..].copy_from_slice(&digest);
    r
}

/// Whether `bytes` is an intact record `seq`: the checksum over what is there, and the
/// sequence number and payload it must carry.
fn intact(bytes: &[u8], seq: u64) -> bool {
    bytes.len() == RECORD
        && Sha256::digest(&bytes[..RECORD - 32]).as_slice() == &bytes[RECORD - 32..]
        && bytes == record(seq).as_slice()
}

/// The `kestrel` binary of this test's profile, built into the same target directory (a
/// no-op when it is up to date; the tests crate does not depend on the binary).
fn kestrel_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // <target>/<profile>/deps/guest-<hash>
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let target_dir = profile_dir.parent().unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root())
        .args(["build", "--quiet", "-p", "kestrel", "--bin", "kestrel"])
        .arg("--target-dir")
        .arg(target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build -p kestrel --bin kestrel");
    let bin = profile_dir.join("kestrel");
    assert!(bin.exists(), "{bin:?}");
    bin
}

/// The `kestrel` process; killed if the test fails before it does.
struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn logs(dir: &Path) -> String {
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_default();
    format!(
        "kestrel stderr:\n{}\nconsole (last 3000 bytes):\n{}",
        read("kestrel.err"),
        {
            let c = read("console.log");
            c[c.len().saturating_sub(3000)..].to_string()
        }
    )
}

#[test]
fn kill_9_of_the_vmm_loses_no_acknowledged_record() {
    let g = guest_artifacts();
    let bin = kestrel_binary();
    let t0 = Instant::now();
    let dir = scratch_dir().join("durability");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("records.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(COUNT * RECORD as u64)
        .unwrap();
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(dir.join(format!("v.sock_{PORT}"))).unwrap();

    let mut c = VmConfig::new(g.vmlinux, 1, 128);
    c.boot_source.initrd_path = Some(g.initramfs);
    c.serial.output = SerialOutput::Stdout;
    c.kestrel.name = Some("durable".into());
    c.drives.push(DriveConfig {
        drive_id: "records".into(),
        path_on_host: Some(disk.clone()),
        ..DriveConfig::default()
    });
    c.vsock = agent_vsock(&uds);
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    let mut vmm = Vmm(Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("console.log")).unwrap())
        .stderr(std::fs::File::create(dir.join("kestrel.err")).unwrap())
        .spawn()
        .unwrap());

    // Boot: the agent answers on vsock port 1024.
    let end = Instant::now() + Duration::from_secs(600);
    let mut agent = loop {
        if let Some(st) = vmm.0.try_wait().unwrap() {
            panic!("kestrel exited during boot: {st}\n{}", logs(&dir));
        }
        match AgentClient::connect(&uds, 1024, Duration::from_secs(5)) {
            Ok(a) => break a,
            Err(e) if Instant::now() > end => panic!("no agent: {e}\n{}", logs(&dir)),
            Err(_) => {}
        }
    };
    let booted = t0.elapsed();
    agent.set_call_timeout(None);

    // The writer runs until the VMM dies; its exec call returns only then (or if it ends).
    let writer = std::thread::spawn(move || {
        agent.exec(&[
            "/sbin/kestrel-agent",
            "recwriter",
            "/dev/vda",
            &PORT.to_string(),
            &COUNT.to_string(),
        ])
    });
    listener.set_nonblocking(true).unwrap();
    let end = Instant::now() + Duration::from_secs(120);
    let conn = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if writer.is_finished() {
                    panic!(
                        "the writer ended before connecting: {:?}\n{}",
                        writer.join().unwrap(),
                        logs(&dir)
                    );
                }
                assert!(Instant::now() < end, "no writer connection\n{}", logs(&dir));
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();

    // Acknowledgements, in order; SIGKILL right after the KILL_AFTER-th. Those the guest sent
    // before it died are still read from the socket afterwards.
    let mut acked = 0u64;
    let mut killed_at = None;
    let mut first_ack = None;
    for line in BufReader::new(conn).lines() {
        let line = match line {
            Ok(l) => l,
            Err(e) if killed_at.is_some() => {
                eprintln!("after the kill: {e}");
                break;
            }
            Err(e) => panic!("reading acknowledgements: {e}\n{}", logs(&dir)),
        };
        assert_ne!(
            line,
            format!("done {COUNT}"),
            "the writer finished: the kill came too late"
        );
        assert_eq!(
            line,
            format!("ack {acked}"),
            "acknowledgements out of order"
        );
        first_ack.get_or_insert_with(Instant::now);
        acked += 1;
        if acked == KILL_AFTER {
            vmm.0.kill().unwrap(); // SIGKILL
            killed_at = Some(Instant::now());
        }
    }
    let killed_at = killed_at.unwrap_or_else(|| {
        panic!(
            "stream ended after {acked} acknowledgements, before the kill\n{}",
            logs(&dir)
        )
    });
    let status = vmm.0.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    let write_time = killed_at - first_ack.unwrap();
    // Mid-stream: the writer never finished; its exec call fails with the VMM gone (or, had
    // it ended, would report a failure).
    assert!(acked < COUNT);
    match writer.join().unwrap() {
        Err(_) => {}
        Ok(r) => assert!(!r.success(), "the writer completed: {r:?}"),
    }

    // Every acknowledged record is in the host file, intact; at most the one being written
    // at the kill follows, and no torn record after that.
    let window = (acked + 16).min(COUNT) as usize * RECORD;
    let mut data = vec![0u8; window];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&disk).unwrap(), &mut data, 0)
        .unwrap();
    for seq in 0..acked {
        let at = seq as usize * RECORD;
        assert!(
            intact(&data[at..at + RECORD], seq),
            "acknowledged record {seq} is missing or damaged"
        );
    }
    let found = data
        .chunks(RECORD)
        .enumerate()
        .take_while(|(s, r)| intact(r, *s as u64))
        .count() as u64;
    assert!(
        found == acked || found == acked + 1,
        "{found} records for {acked} acks"
    );
    assert!(
        data[found as usize * RECORD..].iter().all(|&b| b == 0),
        "a torn record after record {found}"
    );
    eprintln!(
        "durability: booted in {booted:.0?}; {acked} records acknowledged ({KILL_AFTER} before \
         SIGKILL, {} in flight), {:.1} records/s; {found} intact records in the file; {:.0?} from \
         the start of kestrel",
        acked - KILL_AFTER,
        KILL_AFTER as f64 / write_time.as_secs_f64().max(1e-9),
        t0.elapsed()
    );
}
