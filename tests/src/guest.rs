//! Helpers for the real Linux guest, shared by the real-guest tests (`tests/tests/guest`) and
//! the benches: a VM config that boots to the guest agent, daemons that end with the test,
//! hybrid vsock connections, and data streams hashed on the way.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kestrel_agent_proto as proto;
use kestrel_api::{SerialOutput, VmConfig};
use kestrel_sandbox::agent::AgentError;
use kestrel_sandbox::Sandbox;
use sha2::{Digest, Sha256};

use crate::{agent_vsock, guest_artifacts, scratch_dir, XorShift};

/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One MiB as a buffer length.
pub const MIB_BYTES: usize = 1 << 20;

/// A real-guest VM config with the agent's vsock, and where its files go.
pub struct AgentGuest {
    /// The guest built by `resources/` (kernel + initramfs), console off, named after the
    /// scratch directory, vsock for the agent on [`Self::uds`].
    pub config: VmConfig,
    /// A scratch directory of its own (`<scratch>/<name>`), created.
    pub dir: PathBuf,
    /// The hybrid vsock socket (`<dir>/v.sock`); a stale one is removed.
    pub uds: PathBuf,
}

/// The config of a real guest named `name` with `vcpus` vCPUs and `mem_mib` MiB that boots to
/// its agent (see [`AgentGuest`]). Builds (or finds) the guest artifacts first.
pub fn agent_guest(name: &str, vcpus: u32, mem_mib: u64) -> AgentGuest {
    let g = guest_artifacts();
    let dir = scratch_dir().join(name);
    std::fs::create_dir_all(&dir).expect("create the guest's scratch dir");
    let uds = dir.join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let mut config = VmConfig::new(g.vmlinux, vcpus, mem_mib);
    config.boot_source.initrd_path = Some(g.initramfs);
    config.serial.output = SerialOutput::None;
    config.kestrel.name = Some(name.into());
    config.vsock = agent_vsock(&uds);
    AgentGuest { config, dir, uds }
}

/// Lowercase hex of `d`.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex SHA-256 of `d` (what the agent reports).
pub fn sha256_hex(d: &[u8]) -> String {
    hex(&Sha256::digest(d))
}

/// A child process killed and reaped when the guard goes (a daemon the test started:
/// virtiofsd, the `kestrel` binary), so a failing test leaves none behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start virtiofsd `bin` serving `shared_dir` on `sock` (`--sandbox=chroot`, `--cache=<cache>`)
/// and wait up to `timeout` for its socket. Panics if it does not appear.
pub fn spawn_virtiofsd(
    bin: &Path,
    sock: &Path,
    shared_dir: &Path,
    cache: &str,
    timeout: Duration,
) -> KillOnDrop {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(bin)
        .arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--shared-dir={}", shared_dir.display()))
        .arg("--sandbox=chroot")
        .arg(format!("--cache={cache}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn virtiofsd {bin:?}: {e}"));
    let daemon = KillOnDrop(child);
    let end = Instant::now() + timeout;
    while !sock.exists() {
        assert!(Instant::now() < end, "virtiofsd never created {sock:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    daemon
}

/// Connect to guest port `port` through the hybrid vsock socket `uds` (`CONNECT <port>`);
/// the stream once the device answered `OK <host port>`.
///
/// # Errors
/// The socket's error, `closed before OK` when the device closes the connection (no guest
/// listener), or `unexpected reply` for any other answer.
pub fn hybrid_connect(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
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

/// Call `connect` every 100 ms until it succeeds or `timeout` passes: its result, or None.
pub fn connect_retry<T>(
    timeout: Duration,
    mut connect: impl FnMut() -> std::io::Result<T>,
) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        match connect() {
            Ok(s) => return Some(s),
            Err(_) if Instant::now() >= end => return None,
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Run the guest's `stream_sink` with `args` on a second agent connection of `sb` (the call
/// returns only when the stream ends, so it gets a thread and a 15 min limit).
pub fn spawn_stream_sink(
    sb: &Sandbox,
    args: proto::StreamSink,
) -> std::thread::JoinHandle<Result<proto::StreamStats, AgentError>> {
    let mut a = sb
        .connect_agent(Duration::from_secs(30))
        .expect("a second agent connection");
    a.set_call_timeout(Some(Duration::from_secs(900)));
    std::thread::spawn(move || a.request(args))
}

/// Write `mib` MiB of the [`XorShift`] stream of `seed` to `w`; its SHA-256 (hex).
///
/// # Errors
/// The first write that failed.
pub fn send_stream(w: &mut impl Write, seed: u64, mib: u64) -> std::io::Result<String> {
    let mut rng = XorShift::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB_BYTES];
    for _ in 0..mib {
        rng.fill(&mut buf);
        w.write_all(&buf)?;
        h.update(&buf);
    }
    Ok(hex(&h.finalize()))
}

/// What [`receive_all`] read.
#[derive(Debug)]
pub struct Received {
    /// Bytes until end of stream.
    pub bytes: u64,
    /// Their SHA-256, hex.
    pub sha256: String,
    /// When the first bytes arrived (the end, if none did).
    pub first: Instant,
    /// When the stream ended.
    pub last: Instant,
}

/// Read `r` to its end, hashing. Panics on a read error.
pub fn receive_all(mut r: impl Read) -> Received {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let (mut bytes, mut first) = (0u64, None);
    loop {
        let k = r.read(&mut buf).expect("read the stream");
        if k == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        h.update(&buf[..k]);
        bytes += k as u64;
    }
    let last = Instant::now();
    Received {
        bytes,
        sha256: hex(&h.finalize()),
        first: first.unwrap_or(last),
        last,
    }
}

/// Run the bash script `script` (relative to the repository root) and return its stdout.
/// Panics with its stderr when it fails: what the script provides is a prerequisite.
pub fn run_repo_script(script: &str) -> String {
    let out = Command::new("bash")
        .arg(crate::repo_root().join(script))
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `kestrel` binary of the running test's profile, built into the same target directory (a
/// no-op when it is up to date; the tests crate does not depend on the binary).
pub fn kestrel_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // <target>/<profile>/deps/guest-<hash>
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let target_dir = profile_dir.parent().unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate::repo_root())
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
