//! Real-guest tests: the Linux guest built by `resources/` on real KVM.
//!
//! All in one test binary on purpose: each guest has one or two vCPUs and a boot is CPU-bound
//! (the guest kernel is emulated on the CI machines, docs/nested-kvm.md), so `--test-threads=2`
//! runs two guests at once and keeps both host cores busy. Each test boots one guest and runs
//! many checks in it: the test body reads as the list of checks, each a function of its own
//! (`check_*`) whose doc line says what it proves.

mod boot;
mod devices;
mod durability;
mod firecracker_api;
mod fs;
mod hotplug;
mod net;
mod snapshot;
mod xstate;

use std::time::{Duration, Instant};

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;

use kestrel_agent_proto as proto;
use kestrel_sandbox::agent::AgentClient;
use kestrel_sandbox::Sandbox;
use kestrel_tests::guest::{connect_retry, send_stream, spawn_stream_sink, MIB};
use kestrel_tests::Capture;
use kestrel_vmm::VmExit;

/// Run a shell command in the guest: (exit code, stdout, stderr). A process killed by a
/// signal reports 128 + the signal number. Run once: a crash is the test's to see.
pub(crate) fn sh(agent: &mut AgentClient, script: &str) -> (i32, String, String) {
    let r = agent.exec(&["/bin/sh", "-c", script]).expect("exec");
    let code = r.exit_code.unwrap_or(128 + r.signal.unwrap_or(0));
    (
        code,
        r.stdout_str().into_owned(),
        r.stderr_str().into_owned(),
    )
}

/// [`sh`] with stdout and stderr in one string.
pub(crate) fn sh_merged(agent: &mut AgentClient, script: &str) -> (i32, String) {
    let (code, out, err) = sh(agent, script);
    (code, out + &err)
}

/// [`sh_merged`] that must succeed (exit code 0; the output is the failure message). Returns
/// the output.
pub(crate) fn sh_ok(agent: &mut AgentClient, script: &str) -> String {
    let (code, out) = sh_merged(agent, script);
    assert_eq!(code, 0, "{out}");
    out
}

/// A VM for `c` with its console captured.
pub(crate) fn create_captured(c: &kestrel_api::VmConfig) -> (kestrel_vmm::Vm, Capture) {
    let cap = Capture::default();
    let vm = kestrel_vmm::Vm::create_with_console(c, Box::new(cap.clone())).unwrap();
    (vm, cap)
}

/// Start `vm` and wait (up to 10 min) for its agent; on failure the panic shows the console.
pub(crate) fn sandbox(c: &kestrel_api::VmConfig, vm: kestrel_vmm::Vm, cap: &Capture) -> Sandbox {
    let t0 = Instant::now();
    match Sandbox::from_vm(c, vm, Duration::from_secs(600)) {
        Ok(s) => {
            eprintln!("agent up after {:?}", t0.elapsed());
            s
        }
        Err(e) => panic!("agent never answered: {e}\nconsole:\n{}", cap.text()),
    }
}

/// [`create_captured`] then [`sandbox`]: a booted guest with its agent, and its console.
pub(crate) fn boot(c: &kestrel_api::VmConfig) -> (Sandbox, Capture) {
    let (vm, cap) = create_captured(c);
    let sb = sandbox(c, vm, &cap);
    (sb, cap)
}

/// The guest shuts down cleanly when asked: the agent's shutdown ends in a reset within 2 min.
pub(crate) fn check_clean_shutdown(sb: &Sandbox) {
    assert_eq!(sb.shutdown(Duration::from_secs(120)), Some(VmExit::Reset));
}

/// Poll `f` every 200 ms until it holds or `timeout` passes.
pub(crate) fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// A guest text file's contents, trimmed (an error's text instead, so a poll just sees no
/// match).
pub(crate) fn read_trimmed(agent: &mut AgentClient, path: &str) -> String {
    agent
        .read_file(path)
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_else(|e| format!("error: {e}"))
}

/// A stream whose writing half can be closed alone (the reader sees the end of the stream).
pub(crate) trait CloseWrite: Write {
    /// `shutdown(SHUT_WR)`.
    fn close_write(&self) -> std::io::Result<()>;
}

impl CloseWrite for UnixStream {
    fn close_write(&self) -> std::io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl CloseWrite for TcpStream {
    fn close_write(&self) -> std::io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// `mib` MiB of the stream of `seed` sent by the host into the guest's `stream_sink` (started
/// with `sink`; the host connects with `connect`, retried for up to 60 s): the guest counts
/// and hashes exactly what the host sent. `what` names the path in the timing line.
pub(crate) fn check_stream_into_guest<S: CloseWrite>(
    sb: &Sandbox,
    sink: proto::StreamSink,
    connect: impl FnMut() -> std::io::Result<S>,
    (seed, mib): (u64, u64),
    what: &str,
) {
    let sink = spawn_stream_sink(sb, sink);
    let mut s = connect_retry(Duration::from_secs(60), connect).expect("connect to the sink");
    let t = Instant::now();
    let want = send_stream(&mut s, seed, mib).unwrap();
    s.close_write().unwrap();
    let r = sink.join().unwrap().expect("stream_sink");
    eprintln!("{what} {mib} MiB in {:?}", t.elapsed());
    assert_eq!(r.bytes, mib * MIB);
    assert_eq!(r.sha256, want);
}
