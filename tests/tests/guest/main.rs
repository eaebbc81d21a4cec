//! Real-guest tests: the Linux guest built by `resources/` on real KVM.
//!
//! All in one test binary on purpose: each guest has one or two vCPUs and a boot is CPU-bound
//! (the guest kernel is emulated on the CI machines, docs/nested-kvm.md), so `--test-threads=2`
//! runs two guests at once and keeps both host cores busy. Each test boots one guest and runs
//! many checks in it.

mod boot;
mod devices;
mod durability;
mod firecracker_api;
mod fs;
mod hotplug;
mod net;
mod xstate;

use std::time::{Duration, Instant};

use kestrel_sandbox::agent::AgentClient;

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

pub(crate) use kestrel_tests::agent_vsock;

/// A VM for `c` with its console captured.
pub(crate) fn create_captured(
    c: &kestrel_api::VmConfig,
) -> (kestrel_vmm::Vm, kestrel_tests::Capture) {
    let cap = kestrel_tests::Capture::default();
    let vm = kestrel_vmm::Vm::create_with_console(c, Box::new(cap.clone())).unwrap();
    (vm, cap)
}

/// Start `vm` and wait (up to 10 min) for its agent; on failure the panic shows the console.
pub(crate) fn sandbox(
    c: &kestrel_api::VmConfig,
    vm: kestrel_vmm::Vm,
    cap: &kestrel_tests::Capture,
) -> kestrel_sandbox::Sandbox {
    match kestrel_sandbox::Sandbox::from_vm(c, vm, Duration::from_secs(600)) {
        Ok(s) => s,
        Err(e) => panic!("agent never answered: {e}\nconsole:\n{}", cap.text()),
    }
}

/// Lowercase hex.
pub(crate) fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
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
