//! Snapshots of a VM's KVM state (issue 13: pause, snapshot/restore, templates).
//!
//! - [`vcpu`]: the state of one vCPU ([`VcpuState`]: registers, FPU/XSAVE/XCRs, every MSR of
//!   `KVM_GET_MSR_INDEX_LIST`, LAPIC, events, MP state, debug registers, CPUID), read from and
//!   written back to a KVM vCPU fd;
//! - [`vm`]: the state of the VM's in-kernel devices ([`VmState`]: PIC master and slave,
//!   IOAPIC, PIT, kvmclock), read from and written back to a KVM VM fd;
//! - [`file`]: the state file (magic, format version, body length, SHA-256, JSON body) and its
//!   typed refusals ([`StateFileError`]).
//!
//! [`SnapshotState`] ties them together with the format version. Devices, guest memory and the
//! hotplug state join it when `Vm::snapshot` exists; until then this module only saves and
//! restores what KVM holds.
//!
//! The save/restore order is the one a probe VMM proved on the nested KVM of the project's
//! machines (a booting Linux guest, saved and rebuilt in a new VM, finished its boot): vCPUs
//! get CPUID, MSRs, SREGS, REGS, FPU (then XSAVE and XCRs where saved), DEBUGREGS, LAPIC,
//! MP_STATE, VCPU_EVENTS; the VM gets PIT2, CLOCK, then the three irqchips.

pub mod file;
pub mod vcpu;
pub mod vm;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use file::{decode_state, encode_state, read_state_file, write_state_file, StateFileError};
pub use vcpu::{restore_vcpu, save_vcpu, FpuState, KvmSupport, VcpuState};
pub use vm::{restore_vm, save_vm, VmState};

/// The snapshot format this build writes and the only one it reads. Bump it on every change
/// of [`SnapshotState`] or of the types it contains.
pub const FORMAT_VERSION: u32 = 1;

/// Everything a snapshot holds about a VM (so far: the KVM state of the VM and its vCPUs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    /// The format version ([`FORMAT_VERSION`] when written by this build).
    pub version: u32,
    /// The VM's in-kernel devices and clock.
    pub vm: VmState,
    /// Every vCPU that exists, in index order.
    pub vcpus: Vec<VcpuState>,
}

impl SnapshotState {
    /// A state of the current [`FORMAT_VERSION`].
    pub fn new(vm: VmState, vcpus: Vec<VcpuState>) -> Self {
        SnapshotState {
            version: FORMAT_VERSION,
            vm,
            vcpus,
        }
    }
}

/// Why KVM state could not be saved or restored.
#[derive(Debug, Error)]
pub enum SnapshotError {
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
