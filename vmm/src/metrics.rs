//! Counters a runtime can read while the VM runs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one VM (relaxed atomics: cheap to bump from vCPU threads).
#[derive(Debug, Default)]
pub struct VmCounters {
    /// Port-I/O exits.
    pub pio_exits: AtomicU64,
    /// MMIO exits.
    pub mmio_exits: AtomicU64,
    /// Accesses no device claimed.
    pub unhandled_accesses: AtomicU64,
    /// INT3 emulation assists (NESTED-KVM §3).
    pub assist_int3: AtomicU64,
    /// FWAIT emulation assists (NESTED-KVM §3).
    pub assist_fwait: AtomicU64,
    /// AP start (INIT without working SIPI) assists (NESTED-KVM §6).
    pub assist_ap_start: AtomicU64,
    /// `KVM_RUN` interruptions (signals, EINTR).
    pub run_interrupted: AtomicU64,
    /// Extended-state saves for the guest's task switches (NESTED-KVM §10).
    pub assist_xstate_save: AtomicU64,
    /// Extended-state loads for the guest's task switches (NESTED-KVM §10).
    pub assist_xstate_load: AtomicU64,
    /// Extended-state requests refused (bad address or state from the guest).
    pub assist_xstate_errors: AtomicU64,
    /// Panics devices contained (each device then needs a reset).
    pub device_panics: AtomicU64,
}

/// A copy of the VM's live counters at one moment, plus timings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmMetrics {
    /// Port-I/O exits.
    pub pio_exits: u64,
    /// MMIO exits.
    pub mmio_exits: u64,
    /// Accesses no device claimed.
    pub unhandled_accesses: u64,
    /// INT3 assists.
    pub assist_int3: u64,
    /// FWAIT assists.
    pub assist_fwait: u64,
    /// AP start assists.
    pub assist_ap_start: u64,
    /// `KVM_RUN` interruptions.
    pub run_interrupted: u64,
    /// Extended-state saves (paravirtual task-switch assist).
    pub assist_xstate_save: u64,
    /// Extended-state loads (paravirtual task-switch assist).
    pub assist_xstate_load: u64,
    /// Extended-state requests refused.
    pub assist_xstate_errors: u64,
    /// Panics contained in a device — in its event handler, inside its backend (the FUSE
    /// server) or on one of its worker threads (virtio-fs): the device went to
    /// `DEVICE_NEEDS_RESET`, the VM kept running.
    pub device_panics: u64,
    /// Bytes the guest wrote to the serial console.
    pub serial_tx_bytes: u64,
    /// Serial console bytes dropped because the console sink did not keep up (or failed).
    pub serial_dropped_bytes: u64,
    /// Microseconds from the start of `Vm::create` to the end of it.
    pub create_us: u64,
    /// Microseconds from the start of `Vm::create` to the boot vCPU's first `KVM_RUN`.
    pub setup_to_first_run_us: Option<u64>,
}

impl VmMetrics {
    /// All emulation assists together.
    pub fn assists(&self) -> u64 {
        self.assist_int3 + self.assist_fwait + self.assist_ap_start
    }
}

impl VmCounters {
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> VmMetrics {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VmMetrics {
            pio_exits: g(&self.pio_exits),
            mmio_exits: g(&self.mmio_exits),
            unhandled_accesses: g(&self.unhandled_accesses),
            assist_int3: g(&self.assist_int3),
            assist_fwait: g(&self.assist_fwait),
            assist_ap_start: g(&self.assist_ap_start),
            run_interrupted: g(&self.run_interrupted),
            assist_xstate_save: g(&self.assist_xstate_save),
            assist_xstate_load: g(&self.assist_xstate_load),
            assist_xstate_errors: g(&self.assist_xstate_errors),
            device_panics: g(&self.device_panics),
            ..Default::default()
        }
    }
}
