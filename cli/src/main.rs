//! `kestrel`: boot a microVM from a JSON config and stream its serial console, or serve
//! Firecracker's REST API on a Unix socket (`--api-sock`) and boot what it configures.
//!
//! Exit status: 0 when the guest reboots or powers off (or the VM is stopped), 1 for a VMM or
//! guest failure (a contained panic of a vCPU or event-loop thread included), 2 for a
//! configuration error (`kestrel validate` included). Failures print one line on stderr.
//!
//! Modules: `http` (HTTP/1.1 parsing and responses), `server` (the API thread's poll loop),
//! `api` (Firecracker's routes, bodies and messages), `controller` (pre-boot/post-boot state
//! machine), `vmctl` (every call into the running VM), `logger` and `metrics` (Firecracker's
//! `logger` and `metrics`), `snapshot` (`--snapshot-on-ready` and `kestrel restore`).

mod api;
mod controller;
mod http;
mod logger;
mod metrics;
mod server;
mod snapshot;
mod vmctl;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use clap::{Parser, Subcommand};
use kestrel_api::{LogLevel, LoggerConfig, MetricsConfig, SeccompMode, ThreadNames, VmConfig};
use kestrel_vmm::{Vm, VmmError};

use crate::api::{ApiError, SnapshotLoad};
use crate::controller::{Controller, Launcher, DEFAULT_INSTANCE_ID};
use crate::logger::Logger;
use crate::metrics::{Metrics, FLUSH_PERIOD};
use crate::vmctl::{Machine, VmMachine};

/// The default guest config, built by `resources/build-guest.sh` into the cache.
const DEFAULT_CONFIG: &str = include_str!("../../resources/configs/default.json");

#[derive(Parser)]
#[command(
    name = "kestrel",
    version,
    about = "Kestrel: boot a Linux microVM from a Firecracker-style JSON config",
    long_about = "Boots the VM described by --config (Firecracker's --config-file shape plus \
                  Kestrel sections) and streams its serial console to stdout. Without --config \
                  it boots the default guest built by resources/build-guest.sh \
                  (cache: $KESTREL_CACHE, default /var/cache/kestrel). With --api-sock it serves \
                  Firecracker's REST API on that Unix socket (docs/firecracker-api.md). \
                  --snapshot-on-ready writes a snapshot once the guest agent answers; \
                  `kestrel restore` runs a VM from a snapshot."
)]
struct Cli {
    /// VM configuration (JSON), Firecracker's shape plus Kestrel sections
    /// (docs/firecracker-config.md).
    #[arg(long, global = true, conflicts_with = "config_file")]
    config: Option<PathBuf>,
    /// Firecracker's name for the configuration file: the same JSON, and Kestrel then names
    /// vCPU threads as Firecracker does (`fc_vcpu <N>`) unless `kestrel.thread_names` says
    /// otherwise.
    #[arg(long, global = true)]
    config_file: Option<PathBuf>,
    /// Serve Firecracker's REST API on this Unix socket (HTTP/1.1). With a configuration file
    /// (or `restore`) the VM starts at once and the API serves the running VM.
    #[arg(long, global = true, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Firecracker's flag: no API socket (the default unless --api-sock is given).
    #[arg(long, global = true)]
    no_api: bool,
    /// Firecracker's instance id: in `GET /`, log lines and metrics (`emit_id`).
    #[arg(long, global = true, default_value = DEFAULT_INSTANCE_ID)]
    id: String,
    /// Firecracker's logger flags: write Firecracker-style log lines to this file or FIFO.
    #[arg(long, global = true, value_name = "PATH")]
    log_path: Option<PathBuf>,
    /// Log level of --log-path (Error, Warning, Info, Debug, Trace, Off; any case).
    #[arg(long, global = true)]
    level: Option<String>,
    /// Only log from modules whose path starts with this.
    #[arg(long, global = true)]
    module: Option<String>,
    /// Show the level in each log line.
    #[arg(long, global = true)]
    show_level: bool,
    /// Show the source file and line in each log line.
    #[arg(long, global = true)]
    show_log_origin: bool,
    /// Firecracker's metrics flag: write metrics lines to this file or FIFO.
    #[arg(long, global = true, value_name = "PATH")]
    metrics_path: Option<PathBuf>,
    /// Largest API request body, in bytes (Firecracker's default: 51200).
    #[arg(long, global = true, default_value_t = http::DEFAULT_MAX_BODY)]
    http_api_max_payload_size: usize,
    /// Print the effective configuration and kernel command line on stderr before booting.
    #[arg(long, global = true)]
    verbose: bool,
    /// Boot, wait until the guest agent answers on the vsock (the configuration needs a
    /// `vsock` section), pause, write a snapshot into DIR (`state` and `memory`), stop the VM
    /// and print DIR.
    #[arg(long, value_name = "DIR", conflicts_with = "api_sock")]
    snapshot_on_ready: Option<PathBuf>,
    /// How long --snapshot-on-ready waits for the guest agent, in seconds.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 300,
        requires = "snapshot_on_ready"
    )]
    agent_timeout: u64,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check a configuration without creating anything.
    Validate,
    /// Run a VM from a snapshot (written by --snapshot-on-ready or `PUT /snapshot/create`),
    /// then behave as a normal run (--api-sock serves it running).
    Restore(snapshot::RestoreArgs),
}

impl Cli {
    /// The API socket, unless --no-api.
    fn api_socket(&self) -> Option<&Path> {
        self.api_sock.as_deref().filter(|_| !self.no_api)
    }

    /// The configuration file, whichever flag named it.
    fn config_path(&self) -> Option<&PathBuf> {
        self.config.as_ref().or(self.config_file.as_ref())
    }
}

fn cache_dir() -> String {
    std::env::var("KESTREL_CACHE").unwrap_or_else(|_| "/var/cache/kestrel".to_string())
}

fn load_config(path: Option<&PathBuf>) -> Result<VmConfig, kestrel_api::ConfigError> {
    match path {
        Some(p) => VmConfig::from_file(p),
        None => {
            let mut c =
                VmConfig::from_json(&DEFAULT_CONFIG.replace("${KESTREL_CACHE}", &cache_dir()))?;
            // Interactive use: forward the terminal to the guest console.
            // SAFETY: isatty has no preconditions.
            c.serial.stdin = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
            Ok(c)
        }
    }
}

/// What the binary sets where the configuration is silent: seccomp filters that kill the
/// process (it is only Kestrel; the library's default is EPERM), and Firecracker's vCPU thread
/// names when driven through Firecracker's interfaces.
fn binary_defaults(config: &mut VmConfig, firecracker: bool) {
    config.kestrel.seccomp.get_or_insert(SeccompMode::Kill);
    if firecracker {
        config
            .kestrel
            .thread_names
            .get_or_insert(ThreadNames::Firecracker);
    }
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("kestrel: {msg}");
    ExitCode::from(code)
}

/// Firecracker's `--log-path`/`--level`/... and `--metrics-path` flags.
fn apply_flags(cli: &Cli, logger: &Logger, metrics: &Metrics) -> Result<(), String> {
    if cli.log_path.is_some() || cli.level.is_some() {
        let level: Option<LogLevel> = cli
            .level
            .as_ref()
            .map(|l| serde_json::from_value(serde_json::Value::String(l.clone())))
            .transpose()
            .map_err(|e| format!("--level: {e}"))?;
        let cfg = LoggerConfig {
            log_path: cli.log_path.clone(),
            level,
            show_level: Some(cli.show_level),
            show_log_origin: Some(cli.show_log_origin),
            module: cli.module.clone(),
        };
        cfg.validate().map_err(|e| e.to_string())?;
        logger.apply(&cfg).map_err(|e| format!("--log-path: {e}"))?;
    }
    if let Some(p) = &cli.metrics_path {
        let cfg = MetricsConfig {
            metrics_path: p.clone(),
            emit_id: false,
            properties: None,
        };
        cfg.validate().map_err(|e| e.to_string())?;
        metrics.init(&cfg).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The `logger` and `metrics` sections of a configuration file.
fn apply_sections(config: &VmConfig, logger: &Logger, metrics: &Metrics) -> Result<(), String> {
    if let Some(l) = &config.logger {
        logger
            .apply(l)
            .map_err(|e| format!("logger.log_path: {e}"))?;
    }
    if let Some(m) = &config.metrics {
        metrics.init(m).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    let logger = logger::init(&cli.id);
    let metrics = Metrics::new(&cli.id);
    if let Err(e) = apply_flags(&cli, &logger, &metrics) {
        return fail(2, e);
    }
    match &cli.command {
        Some(Command::Validate) => return validate(&cli),
        Some(Command::Restore(args)) => {
            return snapshot::restore(&cli, args, &logger, &metrics, started)
        }
        None => {}
    }
    if let Some(dir) = &cli.snapshot_on_ready {
        return snapshot::snapshot_on_ready(&cli, dir, &logger, &metrics);
    }
    match cli.api_socket() {
        Some(sock) => {
            let launch = || match cli.config_path() {
                Some(_) => boot_config_file(&cli, &logger, &metrics).map(Some),
                None => Ok(None),
            };
            run_api(&cli, sock, &logger, &metrics, started, launch)
        }
        None => run_config(&cli, &logger, &metrics),
    }
}

/// `kestrel validate`.
fn validate(cli: &Cli) -> ExitCode {
    let mut config = match load_config(cli.config_path()) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    binary_defaults(&mut config, cli.config_file.is_some());
    match config.validate_for_boot() {
        Ok(()) => {
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Err(e) => fail(2, e),
    }
}

/// Load, check and complete the configuration file (or the default guest's): exit status 2
/// on error.
fn prepared_config(cli: &Cli) -> Result<VmConfig, ExitCode> {
    let mut config = load_config(cli.config_path()).map_err(|e| fail(2, e))?;
    binary_defaults(
        &mut config,
        cli.config_file.is_some() || cli.api_sock.is_some(),
    );
    if let Err(e) = config.validate_for_boot() {
        if cli.config_path().is_none() {
            return Err(fail(
                2,
                format!("{e} (the default guest is built by resources/build-guest.sh)"),
            ));
        }
        return Err(fail(2, e));
    }
    Ok(config)
}

/// Create and start `config`'s VM: exit status 2 for a configuration error, 1 otherwise.
fn start_vm(cli: &Cli, config: &VmConfig) -> Result<Arc<Vm>, ExitCode> {
    let vm = match vmctl::boot(config) {
        Ok(vm) => vm,
        Err(VmmError::Config(e)) => return Err(fail(2, e)),
        Err(e) => return Err(fail(1, e)),
    };
    if cli.verbose {
        eprintln!("kestrel: kernel command line: {}", vmctl::cmdline(&vm));
    }
    #[cfg(debug_assertions)]
    vmctl::inject_test_panic(&vm);
    Ok(vm)
}

/// Wait for the VM, writing metrics every minute and at the end; the exit status.
fn finish(vm: &Vm, metrics: &Metrics) -> ExitCode {
    let exit = vmctl::wait(vm, FLUSH_PERIOD, || metrics.flush());
    tracing::info!("VM stopped: {exit}");
    if vmctl::clean_exit(&exit) {
        ExitCode::SUCCESS
    } else {
        fail(1, format!("guest stopped: {exit}"))
    }
}

/// The configuration file (or the default guest's) loaded and checked, its logger and metrics
/// sections applied, its VM booted; the exit status on failure.
fn boot_config_file(
    cli: &Cli,
    logger: &Logger,
    metrics: &Metrics,
) -> Result<(VmConfig, Arc<Vm>), ExitCode> {
    let config = prepared_config(cli)?;
    apply_sections(&config, logger, metrics).map_err(|e| fail(2, e))?;
    let vm = start_vm(cli, &config)?;
    Ok((config, vm))
}

/// Boot from the configuration file (or the default guest) without an API socket.
fn run_config(cli: &Cli, logger: &Logger, metrics: &Metrics) -> ExitCode {
    match boot_config_file(cli, logger, metrics) {
        Ok((config, vm)) => run_vm(&config, &vm, metrics),
        Err(code) => code,
    }
}

/// Run the started `vm` (without an API socket) until it stops: the exit status.
fn run_vm(config: &VmConfig, vm: &Arc<Vm>, metrics: &Metrics) -> ExitCode {
    let machine: Arc<dyn Machine> = Arc::new(VmMachine(vm.clone()));
    let cfg = config.clone();
    metrics.set_source(Box::new(move || machine.counters(&cfg)));
    finish(vm, metrics)
}

/// Serve the API on `sock`. `launch` runs once the socket is bound: it starts the VM the API
/// then serves (from a configuration file, from a snapshot), or returns `None` for a
/// pre-boot API; its `Err` is the exit status.
fn run_api(
    cli: &Cli,
    sock: &Path,
    logger: &Logger,
    metrics: &Arc<Metrics>,
    started: Instant,
    launch: impl FnOnce() -> Result<Option<(VmConfig, Arc<Vm>)>, ExitCode>,
) -> ExitCode {
    let listener = match UnixListener::bind(sock) {
        Ok(l) => l,
        Err(e) => {
            return fail(
                1,
                format!("cannot bind the API socket {}: {e}", sock.display()),
            )
        }
    };
    let _cleanup = RemoveOnDrop(sock.to_path_buf());
    let (tx, rx) = mpsc::channel::<Arc<Vm>>();
    let controller = match launch() {
        Err(code) => return code,
        Ok(Some((config, vm))) => {
            let _ = tx.send(vm.clone());
            let machine = Arc::new(VmMachine(vm));
            Controller::running(&cli.id, logger.clone(), metrics.clone(), config, machine)
        }
        Ok(None) => Controller::new(
            &cli.id,
            logger.clone(),
            metrics.clone(),
            Box::new(ApiLauncher(tx)),
        ),
    };
    let server = match server::Server::new(listener, controller, cli.http_api_max_payload_size) {
        Ok(s) => s,
        Err(e) => return fail(1, format!("API socket {}: {e}", sock.display())),
    };
    record_startup(metrics, started);
    let spawned = std::thread::Builder::new()
        .name("fc_api".into())
        .spawn(move || server.run());
    if let Err(e) = spawned {
        return fail(1, format!("cannot start the API thread: {e}"));
    }
    tracing::info!("API socket {} listening", sock.display());
    // The API thread sends the VM once InstanceStart or a snapshot load started it; it never
    // ends.
    match rx.recv() {
        Ok(vm) => finish(&vm, metrics),
        Err(_) => fail(1, "the API thread ended"),
    }
}

/// The API's [`Launcher`]: boots or restores the VM and hands it to the main thread, which
/// waits for it to stop.
struct ApiLauncher(mpsc::Sender<Arc<Vm>>);

impl ApiLauncher {
    fn started(&self, vm: Arc<Vm>) -> Arc<dyn Machine> {
        let _ = self.0.send(vm.clone());
        Arc::new(VmMachine(vm))
    }
}

/// A library error as the API reports it: a configuration error names the field.
fn api_error(e: VmmError) -> ApiError {
    match e {
        VmmError::Config(e) => ApiError::Config(e),
        e => ApiError::Machine(e.into()),
    }
}

impl Launcher for ApiLauncher {
    fn boot(&mut self, config: &mut VmConfig) -> Result<Arc<dyn Machine>, ApiError> {
        binary_defaults(config, true);
        config.validate_for_boot()?;
        let vm = vmctl::boot(config).map_err(api_error)?;
        Ok(self.started(vm))
    }

    fn restore(
        &mut self,
        load: &SnapshotLoad,
        console: Option<&Path>,
    ) -> Result<(VmConfig, Arc<dyn Machine>), ApiError> {
        let vm = vmctl::restore(&load.files, &load.overrides, console).map_err(api_error)?;
        Ok((vm.config().clone(), self.started(vm)))
    }
}

/// Firecracker's `api_server.process_startup_time_us` and `_cpu_us`: from `main` to the API
/// socket listening.
fn record_startup(metrics: &Metrics, started: Instant) {
    let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    metrics.store("api_server", "process_startup_time_us", us);
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
        let cpu_us = u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
            + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1000;
        metrics.store("api_server", "process_startup_time_cpu_us", cpu_us);
    }
}

/// Removes the API socket when the process is done with it.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
