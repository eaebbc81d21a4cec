//! Snapshots from the command line.
//!
//! - `kestrel --config-file C --snapshot-on-ready DIR [--agent-timeout SECS]`: boot, wait until
//!   the guest agent answers a ping on the vsock, pause, write the snapshot into `DIR`
//!   (`state` and `memory`), stop the VM and print `DIR`.
//! - `kestrel restore --snapshot DIR [--overrides FILE.json] [--api-sock PATH]`: restore the
//!   snapshot with per-clone overrides (`kestrel_api::RestoreOverrides`), start it and run as
//!   a normal boot does (the API socket serves the running VM; the exit status is the guest's).
//!
//! Exit status as for a boot: 2 for bad input found before anything is created (no vsock, an
//! overrides file that does not parse, no snapshot in `DIR`, overrides that do not fit the
//! snapshot), 1 for a failure of the VM or the guest (the agent never answered included).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use kestrel_api::{RestoreOverrides, VmConfig};
use kestrel_sandbox::agent::AgentClient;
use kestrel_sandbox::proto::AGENT_PORT;
use kestrel_vmm::{SnapshotFiles, Vm, VmmError};

use crate::logger::Logger;
use crate::metrics::Metrics;
use crate::{fail, vmctl, Cli};

/// Longest single connection attempt while waiting for the agent: between attempts the VM is
/// checked, so a guest that died is reported at once rather than at the timeout.
const AGENT_ATTEMPT: Duration = Duration::from_secs(1);
/// Pause after an attempt that failed at once (a handshake the agent refused, ...).
const AGENT_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// `kestrel restore`'s arguments.
#[derive(Args)]
pub struct RestoreArgs {
    /// The snapshot directory (`state` and `memory`, as --snapshot-on-ready writes them).
    #[arg(long, value_name = "DIR")]
    snapshot: PathBuf,
    /// Per-clone overrides (JSON): `name`, `vsock_uds_path`, `network_interfaces`
    /// (`iface_id`, `host_dev_name`, `guest_mac`), `drives` (`drive_id`, `path_on_host`),
    /// `fs` (`tag`, `shared_dir`).
    #[arg(long, value_name = "FILE")]
    overrides: Option<PathBuf>,
}

/// `--snapshot-on-ready DIR`: the exit status.
pub fn snapshot_on_ready(cli: &Cli, dir: &Path, logger: &Logger, metrics: &Metrics) -> ExitCode {
    let config = match crate::prepared_config(cli) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(uds) = config.vsock.as_ref().map(|v| v.uds_path.clone()) else {
        return fail(
            2,
            "--snapshot-on-ready needs a `vsock` section: the guest agent is reached through it",
        );
    };
    if let Err(e) = std::fs::create_dir_all(dir) {
        return fail(
            2,
            format!(
                "--snapshot-on-ready {}: cannot create it: {e}",
                dir.display()
            ),
        );
    }
    if let Err(e) = crate::apply_sections(&config, logger, metrics) {
        return fail(2, e);
    }
    let vm = match crate::start_vm(cli, &config) {
        Ok(vm) => vm,
        Err(code) => return code,
    };
    let result =
        wait_for_agent(&vm, &uds, Duration::from_secs(cli.agent_timeout)).and_then(|version| {
            tracing::info!("guest agent {version} answered: taking the snapshot");
            vmctl::pause_and_snapshot(&vm, dir)
                .map_err(|e| format!("snapshot into {}: {e}", dir.display()))
        });
    let exit = vm.stop();
    tracing::info!("VM stopped: {exit}");
    match result {
        Ok(()) => {
            println!("{}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

/// Wait until the guest agent answers a ping through the vsock listener `uds`: its version.
/// Fails when the VM stops first or `timeout` passes.
fn wait_for_agent(vm: &Vm, uds: &Path, timeout: Duration) -> Result<String, String> {
    let t0 = Instant::now();
    let mut last = String::from("no attempt");
    loop {
        // The VM first: a guest that stopped is the better reason, even at the deadline.
        if let Some(exit) = vm.wait_timeout(Duration::ZERO) {
            return Err(format!(
                "the guest stopped before its agent answered: {exit}"
            ));
        }
        let left = timeout.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return Err(format!(
                "the guest agent did not answer within {} s: {last}",
                timeout.as_secs()
            ));
        }
        let attempt = AgentClient::connect(uds, AGENT_PORT, left.min(AGENT_ATTEMPT))
            .and_then(|mut agent| agent.ping());
        match attempt {
            Ok(version) => return Ok(version),
            Err(e) => {
                tracing::debug!("guest agent not ready yet: {e}");
                last = e.to_string();
            }
        }
        std::thread::sleep(AGENT_RETRY_PAUSE.min(timeout.saturating_sub(t0.elapsed())));
    }
}

/// `kestrel restore`: the exit status.
pub fn restore(
    cli: &Cli,
    args: &RestoreArgs,
    logger: &Logger,
    metrics: &Arc<Metrics>,
    started: Instant,
) -> ExitCode {
    if cli.config_path().is_some() {
        return fail(
            2,
            "restore takes the configuration from the snapshot: --config and --config-file \
             are not used with it (per-clone changes go into --overrides)",
        );
    }
    let inputs = snapshot_files(&args.snapshot)
        .and_then(|files| Ok((files, load_overrides(args.overrides.as_deref())?)));
    let (files, overrides) = match inputs {
        Ok(i) => i,
        Err(e) => return fail(2, e),
    };
    let launch = || restore_vm(cli, &files, &overrides);
    match cli.api_socket() {
        Some(sock) => crate::run_api(cli, sock, logger, metrics, started, || launch().map(Some)),
        None => match launch() {
            Ok((config, vm)) => crate::run_vm(&config, &vm, metrics),
            Err(code) => code,
        },
    }
}

/// The snapshot in `dir`, if both its files are there.
fn snapshot_files(dir: &Path) -> Result<SnapshotFiles, String> {
    let files = SnapshotFiles::in_dir(dir);
    for f in [&files.state, &files.memory] {
        if !f.is_file() {
            return Err(format!(
                "--snapshot {}: no snapshot there ({} is missing)",
                dir.display(),
                f.display()
            ));
        }
    }
    Ok(files)
}

/// The overrides file (none: no overrides). Errors name the file and serde's field.
fn load_overrides(path: Option<&Path>) -> Result<RestoreOverrides, String> {
    let Some(path) = path else {
        return Ok(RestoreOverrides::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--overrides {}: {e}", path.display()))?;
    RestoreOverrides::from_json(&text).map_err(|e| format!("--overrides {}: {e}", path.display()))
}

/// Restore and start the VM: its configuration and the VM, or the exit status (2 when the
/// overrides do not fit the snapshot, 1 otherwise).
fn restore_vm(
    cli: &Cli,
    files: &SnapshotFiles,
    overrides: &RestoreOverrides,
) -> Result<(VmConfig, Arc<Vm>), ExitCode> {
    let vm = vmctl::restore(files, overrides, None).map_err(|e| match e {
        VmmError::Config(e) => fail(2, e),
        e => fail(1, format!("restoring {}: {e}", files.state.display())),
    })?;
    if cli.verbose {
        eprintln!("kestrel: kernel command line: {}", vmctl::cmdline(&vm));
    }
    Ok((vm.config().clone(), vm))
}
