//! `kestrel`: boot a microVM from a JSON config and stream its serial console.
//!
//! Exit status: 0 when the guest reboots or powers off (or the VM is stopped), 1 for a VMM or
//! guest failure (a contained panic of a vCPU or event-loop thread included), 2 for a
//! configuration error (`kestrel validate` included). Failures print one line on stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kestrel_api::{SeccompMode, VmConfig};
use kestrel_vmm::{Vm, VmExit, VmmError};

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
                  (cache: $KESTREL_CACHE, default /var/cache/kestrel)."
)]
struct Cli {
    /// VM configuration (JSON). `--config-file` is Firecracker's name for it: Firecracker's
    /// config files validate and boot unchanged (docs/firecracker-config.md).
    #[arg(long, visible_alias = "config-file", global = true)]
    config: Option<PathBuf>,
    /// Firecracker's flag to boot from `--config-file` without its API socket. Kestrel has no
    /// API socket yet, so this is what it always does; accepted for Firecracker's command lines.
    #[arg(long)]
    no_api: bool,
    /// Print the effective configuration and kernel command line on stderr before booting.
    #[arg(long)]
    verbose: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check a configuration without creating anything.
    Validate,
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

/// Debug builds only: `KESTREL_TEST_INJECT_PANIC=vcpu<N>|evloop|device:<id>|fs-worker:<id>`
/// makes that thread, device handler or virtio-fs worker panic right after start (tests of
/// panic containment).
#[cfg(debug_assertions)]
fn inject_test_panic(vm: &Vm) {
    use kestrel_vmm::ThreadClass;
    let Ok(what) = std::env::var("KESTREL_TEST_INJECT_PANIC") else {
        return;
    };
    let class = if what == "evloop" {
        ThreadClass::EventLoop
    } else if let Some(id) = what.strip_prefix("device:") {
        ThreadClass::Device(id.to_string())
    } else if let Some(id) = what.strip_prefix("fs-worker:") {
        ThreadClass::FsWorker(id.to_string())
    } else if let Some(n) = what.strip_prefix("vcpu").and_then(|n| n.parse().ok()) {
        ThreadClass::Vcpu(n)
    } else {
        eprintln!("kestrel: KESTREL_TEST_INJECT_PANIC={what:?} not understood");
        return;
    };
    if let Err(e) = vm.inject_panic(class) {
        eprintln!("kestrel: cannot inject a panic: {e}");
    }
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("kestrel: {msg}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KESTREL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    let mut config = match load_config(cli.config.as_ref()) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    // This process is only Kestrel: a thread that makes a call its filter forbids ends it
    // (unless the config says otherwise). The library's default is EPERM.
    config.kestrel.seccomp.get_or_insert(SeccompMode::Kill);
    if let Err(e) = config.validate_for_boot() {
        if cli.config.is_none() {
            return fail(
                2,
                format!("{e} (the default guest is built by resources/build-guest.sh)"),
            );
        }
        return fail(2, e);
    }
    if let Some(Command::Validate) = cli.command {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }

    let vm = match Vm::create(&config) {
        Ok(vm) => vm,
        Err(VmmError::Config(e)) => return fail(2, e),
        Err(e) => return fail(1, e),
    };
    if cli.verbose {
        eprintln!("kestrel: kernel command line: {}", vm.cmdline());
    }
    if let Err(e) = vm.start() {
        return fail(1, e);
    }
    #[cfg(debug_assertions)]
    inject_test_panic(&vm);
    let exit = vm.wait();
    let m = vm.metrics();
    tracing::info!("VM metrics: {m:?}");
    match exit {
        VmExit::Reset | VmExit::Shutdown | VmExit::Stopped => ExitCode::SUCCESS,
        other => fail(1, format!("guest stopped: {other}")),
    }
}
