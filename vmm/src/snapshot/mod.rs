//! Snapshots of a VM's KVM state (issue 13: pause, snapshot/restore, templates).
//!
//! - [`vcpu`]: the state of one vCPU ([`VcpuState`]: registers, FPU/XSAVE/XCRs, every MSR of
//!   `KVM_GET_MSR_INDEX_LIST`, LAPIC, events, MP state, debug registers, CPUID), read from and
//!   written back to a KVM vCPU fd;
//! - [`vm`]: the state of the VM's in-kernel devices ([`VmState`]: PIC master and slave,
//!   IOAPIC, PIT, kvmclock), read from and written back to a KVM VM fd;
//! - [`file`]: the state file (magic, format version, body length, SHA-256, JSON body) and its
//!   typed refusals ([`StateFileError`]);
//! - [`memory`]: the guest memory file ([`MemoryRange`]s: every region, page-aligned).
//!
//! [`SnapshotState`] ties them together with the format version, every device's state
//! ([`DeviceSnapshot`]) and the memory layout. [`crate::Vm::snapshot`] writes a paused VM's
//! snapshot directory ([`STATE_FILE`], [`MEMORY_FILE`]); restore is still to come.
//!
//! The save/restore order is the one a probe VMM proved on the nested KVM of the project's
//! machines (a booting Linux guest, saved and rebuilt in a new VM, finished its boot): vCPUs
//! get CPUID, MSRs, SREGS, REGS, FPU (then XSAVE and XCRs where saved), DEBUGREGS, LAPIC,
//! MP_STATE, VCPU_EVENTS; the VM gets PIT2, CLOCK, then the three irqchips.

pub mod file;
pub mod memory;
pub mod vcpu;
pub mod vm;

use kestrel_devices::virtio::block::BlockState;
use kestrel_devices::virtio::fs::FsState;
use kestrel_devices::virtio::mmio::MmioState;
use kestrel_devices::virtio::net::NetState;
use kestrel_devices::virtio::vsock::VsockState;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use file::{decode_state, encode_state, read_state_file, write_state_file, StateFileError};
pub use memory::{map_memory_file, write_memory_file, MemoryRange};
pub use vcpu::{restore_vcpu, save_vcpu, FpuState, KvmSupport, VcpuState};
pub use vm::{restore_vm, save_vm, VmState};

/// The snapshot format this build writes and the only one it reads. Bump it on every change
/// of [`SnapshotState`] or of the types it contains.
pub const FORMAT_VERSION: u32 = 1;

/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// Name of the guest memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Where a snapshot's two files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// The state file.
    pub state: std::path::PathBuf,
    /// The guest memory file.
    pub memory: std::path::PathBuf,
}

impl SnapshotFiles {
    /// [`STATE_FILE`] and [`MEMORY_FILE`] in `dir`.
    pub fn in_dir(dir: &std::path::Path) -> Self {
        SnapshotFiles {
            state: dir.join(STATE_FILE),
            memory: dir.join(MEMORY_FILE),
        }
    }
}

/// Everything a snapshot holds about a VM except the guest memory's contents (those are in the
/// memory file, laid out as [`SnapshotState::memory`] says).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    /// The format version ([`FORMAT_VERSION`] when written by this build).
    pub version: u32,
    /// The VM's in-kernel devices and clock.
    pub vm: VmState,
    /// Every vCPU that exists (plugged or hot-removed), in index order.
    pub vcpus: Vec<VcpuState>,
    /// Every virtio device, in the order the guest sees them.
    pub devices: Vec<DeviceSnapshot>,
    /// Every guest memory region (boot RAM and hot-plugged blocks) and where its bytes are in
    /// the memory file.
    pub memory: Vec<MemoryRange>,
    /// Hot-removed vCPUs and hot-plugged memory.
    pub hotplug: HotplugState,
    /// The guest's kernel command line (a restore must keep what it decided, e.g. the
    /// paravirtual extended-state switch).
    pub cmdline: String,
    /// The vCPUs serve the paravirtual extended-state switch ports (`pvfpu`).
    pub pvfpu: bool,
    /// The configuration the VM was built from (a restore applies its overrides to it).
    pub config: Option<kestrel_api::VmConfig>,
    /// The serial port's registers.
    pub serial: kestrel_devices::legacy::SerialRegs,
}

/// What CPU and memory hotplug changed since boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotplugState {
    /// vCPUs that exist but are hot-removed (their threads stay parked until a plug).
    pub unplugged_vcpus: Vec<u32>,
    /// Hot-plugged memory ranges, in address order.
    pub plugged_memory: Vec<PluggedMemory>,
}

/// One hot-plugged memory range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluggedMemory {
    /// Guest-physical address.
    pub addr: u64,
    /// Bytes.
    pub size: u64,
}

impl SnapshotState {
    /// A state of the current [`FORMAT_VERSION`] with only KVM state (no devices, memory,
    /// hotplug state or command line).
    pub fn new(vm: VmState, vcpus: Vec<VcpuState>) -> Self {
        SnapshotState {
            version: FORMAT_VERSION,
            vm,
            vcpus,
            devices: Vec::new(),
            memory: Vec::new(),
            hotplug: HotplugState::default(),
            cmdline: String::new(),
            pvfpu: false,
            config: None,
            serial: kestrel_devices::legacy::SerialRegs::default(),
        }
    }
}

/// One virtio device's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSnapshot {
    /// The device id (drive id, iface id, `vsock`, `fs<N>`).
    pub id: String,
    /// The virtio-mmio transport's registers.
    pub transport: MmioState,
    /// The device's own state.
    pub state: DeviceState,
}

/// A device's own saved state, by kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// virtio-blk.
    Block(BlockState),
    /// virtio-net.
    Net(NetState),
    /// virtio-vsock.
    Vsock(VsockState),
    /// virtio-fs (in-process or vhost-user), only while the guest has not mounted it.
    Fs(FsState),
}

/// Why a snapshot could not be taken, or KVM state saved or restored.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// A device is in a state a snapshot cannot hold.
    #[error("device {device:?} cannot be snapshotted: {reason}")]
    Unsupported {
        /// The device id.
        device: String,
        /// Why.
        reason: &'static str,
    },
    /// A saved device does not fit the device the configuration makes.
    #[error("device {device:?}: {reason}")]
    DeviceMismatch {
        /// The device id.
        device: String,
        /// Why.
        reason: String,
    },
    /// A device's transport refused its saved registers.
    #[error("device {device:?}: cannot restore its transport: {source}")]
    DeviceRestore {
        /// The device id.
        device: String,
        /// Why.
        #[source]
        source: kestrel_devices::virtio::RestoreError,
    },
    /// The serial port's saved registers could not be restored.
    #[error("serial port: cannot restore its registers: {0}")]
    Serial(#[source] std::io::Error),
    /// The snapshot has more vCPUs than this VM can have.
    #[error("the snapshot has {saved} vCPUs; this host and configuration allow {max}")]
    VcpuCount {
        /// vCPUs in the snapshot.
        saved: usize,
        /// The VM's `max_vcpus`.
        max: u32,
    },
    /// The memory file could not be created or written.
    #[error("memory file {path}: {source}")]
    MemoryFile {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The memory file's size is not the one the state's memory layout needs.
    #[error("memory file {path}: {found} bytes, the snapshot's memory layout needs {expected}")]
    MemoryFileSize {
        /// The file.
        path: std::path::PathBuf,
        /// Bytes the layout needs.
        expected: u64,
        /// Bytes in the file.
        found: u64,
    },
    /// A memory range of the state cannot be mapped (unaligned, empty or overflowing).
    #[error("memory range {0:?} of the state cannot be mapped")]
    MemoryLayout(MemoryRange),
    /// Guest memory could not be copied to the memory file.
    #[error("memory file {path}: copying guest memory at {addr:#x} failed: {source}")]
    GuestMemory {
        /// The file.
        path: std::path::PathBuf,
        /// The region's guest-physical address.
        addr: u64,
        /// The error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A vCPU ioctl failed.
    #[error("vCPU {vcpu}: KVM {op} failed: {source}")]
    VcpuKvm {
        /// vCPU index.
        vcpu: u32,
        /// The ioctl.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A VM or system ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_MSRS` stopped at an MSR the host refuses.
    #[error("vCPU {vcpu}: KVM_SET_MSRS refused MSR {index:#x} ({done} of {total} were set)")]
    MsrRefused {
        /// vCPU index.
        vcpu: u32,
        /// The refused MSR.
        index: u32,
        /// How many MSRs of the batch KVM set before it.
        done: usize,
        /// How many were in the batch.
        total: usize,
    },
    /// A saved list (MSRs or CPUID entries) is longer than KVM takes.
    #[error("vCPU {vcpu}: {what} has {found} entries, more than KVM's {max}")]
    TooManyEntries {
        /// vCPU index.
        vcpu: u32,
        /// Which list.
        what: &'static str,
        /// Its length.
        found: usize,
        /// KVM's limit.
        max: usize,
    },
    /// The saved XSAVE area is not the size of `struct kvm_xsave`.
    #[error("vCPU {vcpu}: the saved XSAVE area has {found} words, not {expected}")]
    XsaveSize {
        /// vCPU index.
        vcpu: u32,
        /// Words in the saved area.
        found: usize,
        /// Words of `struct kvm_xsave`.
        expected: usize,
    },
    /// The saved state needs a KVM capability this host lacks (e.g. XSAVE state saved on a
    /// host with XSAVE, restored on one without).
    #[error("vCPU {vcpu}: the saved state needs {cap}, which this host's KVM lacks")]
    MissingCapability {
        /// vCPU index.
        vcpu: u32,
        /// The capability.
        cap: &'static str,
    },
}

/// A new KVM VM with the irqchip and PIT a Kestrel VM has (builder step 3).
#[cfg(test)]
pub(crate) fn test_vm() -> (kvm_ioctls::Kvm, kvm_ioctls::VmFd) {
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    crate::builder::setup_irqchip(&vm).expect("irqchip and PIT");
    (kvm, vm)
}
