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
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kestrel_api::{DriveConfig, SerialOutput, VmConfig};
use kestrel_sandbox::agent::{AgentClient, AgentError, ExecResult};
use kestrel_tests::guest::KillOnDrop;
use kestrel_tests::*;
use sha2::{Digest, Sha256};

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

fn logs(dir: &Path) -> String {
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_default();
    let console = read("console.log");
    format!(
        "kestrel stderr:\n{}\nconsole (last 3000 bytes):\n{}",
        read("kestrel.err"),
        &console[console.len().saturating_sub(3000)..]
    )
}

/// Byte offset of record `seq` in the drive.
fn offset(seq: u64) -> usize {
    usize::try_from(seq).expect("record numbers fit the address space") * RECORD
}

#[test]
fn kill_9_of_the_vmm_loses_no_acknowledged_record() {
    let run = Run::new();
    let t0 = Instant::now();
    let listener = UnixListener::bind(run.dir.join(format!("v.sock_{PORT}"))).unwrap();
    let mut vmm = run.start_kestrel();
    let agent = run.agent_after_boot(&mut vmm);
    let booted = t0.elapsed();

    // The writer runs until the VMM dies; its exec call returns only then (or if it ends).
    let writer = std::thread::spawn(move || start_writer(agent));
    let (conn, writer) = run.accept_writer(&listener, writer);
    let acks = run.read_acks_and_kill(conn, &mut vmm);
    let status = vmm.0.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    // Mid-stream: the writer never finished; its exec call fails with the VMM gone (or, had
    // it ended, would report a failure).
    assert!(acks.acked < COUNT);
    match writer.join().unwrap() {
        Err(_) => {}
        Ok(r) => assert!(!r.success(), "the writer completed: {r:?}"),
    }
    let found = check_acknowledged_records_intact(&run.disk, acks.acked);
    let write_time = acks.killed_at - acks.first_ack;
    eprintln!(
        "durability: booted in {booted:.0?}; {} records acknowledged ({KILL_AFTER} before \
         SIGKILL, {} in flight), {:.1} records/s; {found} intact records in the file; {:.0?} from \
         the start of kestrel",
        acks.acked,
        acks.acked - KILL_AFTER,
        KILL_AFTER as f64 / write_time.as_secs_f64().max(1e-9),
        t0.elapsed()
    );
}

/// One run's files: the scratch directory with the logs, the drive, the vsock socket.
struct Run {
    guest: GuestArtifacts,
    dir: PathBuf,
    disk: PathBuf,
    uds: PathBuf,
    bin: PathBuf,
}

/// The acknowledgements the host read.
struct Acks {
    /// How many, in order from 0.
    acked: u64,
    /// When the first arrived.
    first_ack: Instant,
    /// When the VMM got SIGKILL (after [`KILL_AFTER`] of them).
    killed_at: Instant,
}

/// In the guest: `kestrel-agent recwriter /dev/vda PORT COUNT`; returns when it ends or the
/// agent is gone.
fn start_writer(mut agent: AgentClient) -> Result<ExecResult, AgentError> {
    agent.exec(&[
        "/sbin/kestrel-agent",
        "recwriter",
        "/dev/vda",
        &PORT.to_string(),
        &COUNT.to_string(),
    ])
}

impl Run {
    /// The guest artifacts and the `kestrel` binary (built first), and a fresh scratch
    /// directory with an empty drive file of [`COUNT`] records.
    fn new() -> Run {
        let guest = guest_artifacts();
        let bin = kestrel_tests::guest::kestrel_binary();
        let dir = scratch_dir().join("durability");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("records.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(COUNT * RECORD as u64)
            .unwrap();
        let uds = dir.join("v.sock");
        Run {
            guest,
            dir,
            disk,
            uds,
            bin,
        }
    }

    /// Run `kestrel --config` on the real guest with the drive and the agent's vsock; the
    /// console goes to `console.log`, its stderr to `kestrel.err`.
    fn start_kestrel(&self) -> KillOnDrop {
        let mut c = VmConfig::new(&self.guest.vmlinux, 1, 128);
        c.boot_source.initrd_path = Some(self.guest.initramfs.clone());
        c.serial.output = SerialOutput::Stdout;
        c.kestrel.name = Some("durable".into());
        c.drives.push(DriveConfig {
            drive_id: "records".into(),
            path_on_host: Some(self.disk.clone()),
            ..DriveConfig::default()
        });
        c.vsock = agent_vsock(&self.uds);
        let cfg = self.dir.join("vm.json");
        std::fs::write(&cfg, serde_json::to_string_pretty(&c).unwrap()).unwrap();
        let log = |n: &str| std::fs::File::create(self.dir.join(n)).unwrap();
        KillOnDrop(
            Command::new(&self.bin)
                .arg("--config")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log("console.log"))
                .stderr(log("kestrel.err"))
                .spawn()
                .unwrap(),
        )
    }

    /// The agent, once it answers on vsock port 1024 (within 10 min, while `kestrel` runs).
    fn agent_after_boot(&self, vmm: &mut KillOnDrop) -> AgentClient {
        let end = Instant::now() + Duration::from_secs(600);
        let mut agent = loop {
            if let Some(st) = vmm.0.try_wait().unwrap() {
                panic!("kestrel exited during boot: {st}\n{}", logs(&self.dir));
            }
            match AgentClient::connect(&self.uds, 1024, Duration::from_secs(5)) {
                Ok(a) => break a,
                Err(e) if Instant::now() > end => panic!("no agent: {e}\n{}", logs(&self.dir)),
                Err(_) => {}
            }
        };
        agent.set_call_timeout(None);
        agent
    }

    /// The writer's connection to the host port (within 2 min, while the writer runs).
    fn accept_writer<T: std::fmt::Debug>(
        &self,
        listener: &UnixListener,
        writer: std::thread::JoinHandle<T>,
    ) -> (UnixStream, std::thread::JoinHandle<T>) {
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
                            logs(&self.dir)
                        );
                    }
                    assert!(
                        Instant::now() < end,
                        "no writer connection\n{}",
                        logs(&self.dir)
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        (conn, writer)
    }

    /// Read the acknowledgements, checking their order, and SIGKILL the VMM right after the
    /// [`KILL_AFTER`]-th. Those the guest sent before it died are still read from the socket
    /// afterwards.
    fn read_acks_and_kill(&self, conn: UnixStream, vmm: &mut KillOnDrop) -> Acks {
        let (mut acked, mut killed_at, mut first_ack) = (0u64, None, None);
        for line in BufReader::new(conn).lines() {
            let line = match line {
                Ok(l) => l,
                Err(e) if killed_at.is_some() => {
                    eprintln!("after the kill: {e}");
                    break;
                }
                Err(e) => panic!("reading acknowledgements: {e}\n{}", logs(&self.dir)),
            };
            let done = format!("done {COUNT}");
            assert_ne!(line, done, "the writer finished: the kill came too late");
            let want = format!("ack {acked}");
            assert_eq!(line, want, "acknowledgements out of order");
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
                logs(&self.dir)
            )
        });
        Acks {
            acked,
            first_ack: first_ack.unwrap(),
            killed_at,
        }
    }
}

/// Every acknowledged record is in the host file, intact; at most the one being written at
/// the kill follows, and no torn record after that. Returns the intact records found.
fn check_acknowledged_records_intact(disk: &Path, acked: u64) -> u64 {
    let mut data = vec![0u8; offset((acked + 16).min(COUNT))];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(disk).unwrap(), &mut data, 0)
        .unwrap();
    for seq in 0..acked {
        let at = offset(seq);
        assert!(
            intact(&data[at..at + RECORD], seq),
            "acknowledged record {seq} is missing or damaged"
        );
    }
    let found = (0..)
        .zip(data.chunks(RECORD))
        .take_while(|&(s, r)| intact(r, s))
        .count() as u64;
    assert!(
        found == acked || found == acked + 1,
        "{found} records for {acked} acks"
    );
    assert!(
        data[offset(found)..].iter().all(|&b| b == 0),
        "a torn record after record {found}"
    );
    found
}
