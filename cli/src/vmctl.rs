//! The one place the binary calls a running `kestrel_vmm::Vm`: the [`Machine`] trait the API
//! controller drives, and its implementation over `Vm` ([`VmMachine`]).
//!
//! Everything the API does to a booted VM goes through here, so a change of the library's VM
//! API (device handles, pause) is a change of this file only; and the controller is tested
//! against a fake [`Machine`] without KVM.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Arc;

use kestrel_api::{RateLimiterConfig, RestoreOverrides, VmConfig};
use kestrel_vmm::{ConsoleSink, SnapshotFiles, ThreadKind, VcpuRunState, Vm, VmExit, VmmError};
use serde::Serialize;
use thiserror::Error;

use crate::metrics::{Fields, MachineCounters};

/// Why an operation on the running VM failed.
#[derive(Debug, Error)]
pub enum MachineError {
    /// The library refused or failed it.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// A device refused or failed it.
    #[error(transparent)]
    Device(#[from] kestrel_vmm::DeviceError),
    /// The request asks for something impossible (the message says what).
    #[error("{0}")]
    Invalid(String),
}

/// A vCPU as `GET /kestrel/vcpus` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VcpuInfo {
    /// Index.
    pub id: u32,
    /// `running`, `parked` or `exited`.
    pub state: &'static str,
    /// Linux thread id, when the thread runs.
    pub tid: Option<i32>,
}

/// A thread as `GET /kestrel/threads` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ThreadEntry {
    /// Thread name (`fc_vcpu 0` or `kestrel-vm-vcpu0`, `kestrel-vm-evloop`, ...).
    pub name: String,
    /// Linux thread id.
    pub tid: i32,
    /// `vcpu`, `event_loop` or `fs_worker`.
    pub kind: &'static str,
    /// The vCPU index, for vCPU threads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u32>,
}

/// Hot-plugged memory, as `GET /kestrel/memory` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryInfo {
    /// Hot-plugged ranges.
    pub plugged: Vec<crate::api::MemoryRange>,
    /// The hotplug region (where ranges go), if memory hotplug is enabled.
    pub hotplug_region: Option<crate::api::MemoryRange>,
}

/// What the API does to a booted VM.
pub trait Machine: Send + Sync {
    /// Attach, swap or (with `None`) detach the image of drive `id`.
    fn swap_drive(
        &self,
        id: &str,
        path: Option<&Path>,
        read_only: bool,
    ) -> Result<(), MachineError>;
    /// Replace the rate limiter of drive `id`.
    fn update_drive_rate_limiter(
        &self,
        id: &str,
        rl: &RateLimiterConfig,
    ) -> Result<(), MachineError>;
    /// Replace the given rate limiters of interface `id`.
    fn update_net_rate_limiters(
        &self,
        id: &str,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), MachineError>;
    /// Stop the vCPUs.
    fn pause(&self) -> Result<(), MachineError>;
    /// Run them again.
    fn resume(&self) -> Result<(), MachineError>;
    /// Write the paused VM's snapshot into `files` (it stays paused).
    fn snapshot(&self, files: &SnapshotFiles) -> Result<(), MachineError>;
    /// Ctrl-Alt-Del on the i8042 keyboard.
    fn send_ctrl_alt_del(&self) -> Result<(), MachineError>;
    /// Run vCPUs `0..n` (creating or unparking them) and park the others.
    fn set_vcpu_count(&self, n: u32) -> Result<(), MachineError>;
    /// The vCPUs.
    fn vcpus(&self) -> Vec<VcpuInfo>;
    /// Plug `size` bytes of RAM in blocks of `block` bytes: the range plugged.
    fn plug_memory(&self, size: u64, block: u64) -> Result<crate::api::MemoryRange, MachineError>;
    /// Unplug a range [`Machine::plug_memory`] returned.
    fn unplug_memory(&self, addr: u64, size: u64) -> Result<(), MachineError>;
    /// Hot-plugged memory.
    fn memory(&self) -> MemoryInfo;
    /// The VM's threads.
    fn threads(&self) -> Vec<ThreadEntry>;
    /// Counters of the VM and of its devices (named as in `config`).
    fn counters(&self, config: &VmConfig) -> MachineCounters;
}

/// [`Machine`] over the library's `Vm`.
pub struct VmMachine(pub Arc<Vm>);

/// Create and start the VM `config` describes (validated again by the library).
pub fn boot(config: &VmConfig) -> Result<Arc<Vm>, VmmError> {
    let vm = Arc::new(Vm::create(config)?);
    tracing::info!("kernel command line: {}", vm.cmdline());
    vm.start()?;
    Ok(vm)
}

/// Restore the snapshot `files` with `overrides` and start it; the serial console appended to
/// `console` when given (else where the snapshot's configuration says).
///
/// # Errors
/// [`VmmError::Config`] for overrides that do not fit the snapshot (the field named);
/// [`VmmError::SerialOutput`] when `console` cannot be opened; any restore or start error.
pub fn restore(
    files: &SnapshotFiles,
    overrides: &RestoreOverrides,
    console: Option<&Path>,
) -> Result<Arc<Vm>, VmmError> {
    let sink = console.map(open_console).transpose()?;
    let vm = Arc::new(Vm::restore_files(files, overrides, sink)?);
    vm.start()?;
    tracing::info!(
        "VM {} restored from {}",
        vm.config().name(),
        files.state.display()
    );
    Ok(vm)
}

/// `path` opened for appending (created if missing), as the console of a restored VM.
fn open_console(path: &Path) -> Result<ConsoleSink, VmmError> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| VmmError::SerialOutput {
            path: path.display().to_string(),
            source,
        })?;
    Ok(Box::new(f))
}

/// Pause `vm` and write its snapshot into the directory `dir` (`state` and `memory`).
///
/// # Errors
/// What [`Vm::pause`] and [`Vm::snapshot`] return.
pub fn pause_and_snapshot(vm: &Vm, dir: &Path) -> Result<(), VmmError> {
    vm.pause()?;
    vm.snapshot(dir)
}

/// The kernel command line the guest got.
pub fn cmdline(vm: &Vm) -> &str {
    vm.cmdline()
}

/// Wait for the VM to stop, calling `tick` every `period` meanwhile (and once at the end).
pub fn wait(vm: &Vm, period: std::time::Duration, tick: impl Fn()) -> VmExit {
    loop {
        let exit = vm.wait_timeout(period);
        tick();
        if let Some(e) = exit {
            return e;
        }
    }
}

/// Whether the VM stopped the way a guest stops cleanly (reboot, power-off, stopped).
pub fn clean_exit(exit: &VmExit) -> bool {
    matches!(exit, VmExit::Reset | VmExit::Shutdown | VmExit::Stopped)
}

/// Debug builds only: `KESTREL_TEST_INJECT_PANIC=vcpu<N>|evloop|device:<id>|fs-worker:<id>`
/// makes that thread, device handler or virtio-fs worker panic right after start (tests of
/// panic containment).
#[cfg(debug_assertions)]
pub fn inject_test_panic(vm: &Vm) {
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

const MIB: u64 = 1 << 20;

fn mib_range(addr: u64, size: u64) -> crate::api::MemoryRange {
    crate::api::MemoryRange {
        addr,
        size_mib: size / MIB,
    }
}

impl Machine for VmMachine {
    fn swap_drive(
        &self,
        id: &str,
        path: Option<&Path>,
        read_only: bool,
    ) -> Result<(), MachineError> {
        Ok(self.block(id)?.swap_backing(path, read_only)?)
    }

    fn update_drive_rate_limiter(
        &self,
        id: &str,
        rl: &RateLimiterConfig,
    ) -> Result<(), MachineError> {
        Ok(self.block(id)?.update_rate_limiter(rl)?)
    }

    fn update_net_rate_limiters(
        &self,
        id: &str,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), MachineError> {
        let dev = self.device(id)?;
        let net = dev
            .net()
            .ok_or_else(|| MachineError::Invalid(format!("`{id}` is not a network interface")))?;
        Ok(net.update_rate_limiters(rx, tx)?)
    }

    fn pause(&self) -> Result<(), MachineError> {
        Ok(self.0.pause()?)
    }

    fn resume(&self) -> Result<(), MachineError> {
        Ok(self.0.resume()?)
    }

    fn snapshot(&self, files: &SnapshotFiles) -> Result<(), MachineError> {
        Ok(self.0.snapshot_files(files)?)
    }

    fn send_ctrl_alt_del(&self) -> Result<(), MachineError> {
        Ok(self.0.send_ctrl_alt_del()?)
    }

    fn set_vcpu_count(&self, n: u32) -> Result<(), MachineError> {
        if n == 0 || n > self.0.max_vcpus() {
            return Err(MachineError::Invalid(format!(
                "vcpu_count: {n} is outside 1..={} (machine-config.max_vcpus)",
                self.0.max_vcpus()
            )));
        }
        for id in 0..n {
            self.0.plug_vcpu(id)?;
        }
        for (id, state) in self.0.vcpu_states() {
            if id >= n && state == VcpuRunState::Running {
                self.0.park_vcpu(id)?;
            }
        }
        Ok(())
    }

    fn vcpus(&self) -> Vec<VcpuInfo> {
        let threads = self.0.threads();
        self.0
            .vcpu_states()
            .into_iter()
            .map(|(id, s)| VcpuInfo {
                id,
                state: match s {
                    VcpuRunState::Running => "running",
                    VcpuRunState::Parked => "parked",
                    VcpuRunState::Exited => "exited",
                },
                tid: threads
                    .iter()
                    .find(|t| t.kind == ThreadKind::Vcpu(id))
                    .map(|t| t.tid),
            })
            .collect()
    }

    fn plug_memory(&self, size: u64, block: u64) -> Result<crate::api::MemoryRange, MachineError> {
        let r = self.0.add_memory(size, block)?;
        Ok(mib_range(r.addr, r.size))
    }

    fn unplug_memory(&self, addr: u64, size: u64) -> Result<(), MachineError> {
        Ok(self.0.remove_memory(addr, size)?)
    }

    fn memory(&self) -> MemoryInfo {
        MemoryInfo {
            plugged: self
                .0
                .plugged_memory()
                .iter()
                .map(|r| mib_range(r.addr, r.size))
                .collect(),
            hotplug_region: self.0.hotplug_region().map(|(a, s)| mib_range(a, s)),
        }
    }

    fn threads(&self) -> Vec<ThreadEntry> {
        self.0
            .threads()
            .into_iter()
            .map(|t| {
                let (kind, vcpu) = match t.kind {
                    ThreadKind::Vcpu(i) => ("vcpu", Some(i)),
                    ThreadKind::EventLoop => ("event_loop", None),
                    ThreadKind::FsWorker { .. } => ("fs_worker", None),
                };
                ThreadEntry {
                    name: t.name,
                    tid: t.tid,
                    kind,
                    vcpu,
                }
            })
            .collect()
    }

    fn counters(&self, config: &VmConfig) -> MachineCounters {
        let vm = &self.0;
        let metrics = |id: &str| vm.device(id).map(|d| d.metrics());
        let blocks = config
            .drives
            .iter()
            .filter_map(|d| {
                let m = metrics(&d.drive_id)?.block()?;
                Some((d.drive_id.clone(), block_fields(&m)))
            })
            .collect();
        let nets = config
            .network_interfaces
            .iter()
            .filter_map(|n| {
                let m = metrics(&n.iface_id)?.net()?;
                Some((n.iface_id.clone(), net_fields(&m)))
            })
            .collect();
        let m = vm.metrics();
        MachineCounters {
            blocks,
            nets,
            vsock: metrics("vsock")
                .and_then(|d| d.vsock())
                .map(|v| vsock_fields(&v)),
            vcpu: vec![
                ("exit_io", m.pio_exits),
                ("exit_mmio", m.mmio_exits),
                ("unhandled_accesses", m.unhandled_accesses),
                ("run_interrupted", m.run_interrupted),
            ],
            uart: vec![
                ("write_bytes", m.serial_tx_bytes),
                ("dropped_bytes", m.serial_dropped_bytes),
            ],
            device_panics: m.device_panics,
        }
    }
}

impl VmMachine {
    fn device(&self, id: &str) -> Result<&kestrel_vmm::Device, MachineError> {
        self.0
            .device(id)
            .ok_or_else(|| MachineError::Invalid(format!("no device with id `{id}`")))
    }

    fn block(&self, id: &str) -> Result<kestrel_vmm::BlockControl<'_>, MachineError> {
        self.device(id)?
            .block()
            .ok_or_else(|| MachineError::Invalid(format!("`{id}` is not a drive")))
    }
}

/// Firecracker's `block` fields from the drive's counters.
fn block_fields(b: &kestrel_devices_metrics::BlockMetrics) -> Fields {
    vec![
        ("read_bytes", b.read_bytes),
        ("write_bytes", b.write_bytes),
        ("read_count", b.read_ops),
        ("write_count", b.write_ops),
        ("flush_count", b.flush_ops),
        ("invalid_reqs_count", b.unsupported + b.malformed_chains),
        ("execute_fails", b.io_errors),
        ("event_fails", b.queue_errors),
        ("rate_limiter_throttled_events", b.rate_limited),
        ("update_count", b.config_changes),
    ]
}

/// Firecracker's `net` fields from the interface's counters.
fn net_fields(n: &kestrel_devices_metrics::NetMetrics) -> Fields {
    let tx_malformed = n.tx_dropped_wrong_direction
        + n.tx_dropped_no_header
        + n.tx_dropped_empty
        + n.tx_dropped_oversized
        + n.tx_dropped_bad_buffer
        + n.tx_dropped_bad_header;
    vec![
        ("rx_bytes_count", n.rx_bytes),
        ("rx_packets_count", n.rx_packets),
        (
            "rx_fails",
            n.rx_dropped_oversized + n.rx_dropped_malformed + n.rx_bad_buffers,
        ),
        ("no_rx_avail_buffer", n.rx_no_buffer),
        ("rx_rate_limiter_throttled", n.rx_throttled),
        ("tx_bytes_count", n.tx_bytes),
        ("tx_packets_count", n.tx_packets),
        ("tx_malformed_frames", tx_malformed),
        ("tx_fails", n.tx_dropped_no_link),
        ("tx_rate_limiter_throttled", n.tx_throttled),
        ("tap_read_fails", n.tap_read_errors),
        ("tap_write_fails", n.tap_write_errors),
        ("event_fails", n.queue_errors),
    ]
}

/// Firecracker's `vsock` fields from the device's counters.
fn vsock_fields(v: &kestrel_devices_metrics::VsockMetrics) -> Fields {
    vec![
        ("rx_bytes_count", v.bytes_to_guest),
        ("tx_bytes_count", v.bytes_from_guest),
        ("rx_packets_count", v.packets_to_guest),
        ("tx_packets_count", v.packets_from_guest),
        ("conns_added", v.conns_opened),
        ("conns_removed", v.conns_closed),
        ("conns_killed", v.credit_violations),
        ("conns_refused", v.conns_refused),
        ("packets_dropped", v.packets_dropped),
    ]
}

/// The device counter types, as the VM returns them.
mod kestrel_devices_metrics {
    pub use kestrel_devices::virtio::block::BlockMetrics;
    pub use kestrel_devices::virtio::net::NetMetrics;
    pub use kestrel_devices::virtio::vsock::VsockMetrics;
}
