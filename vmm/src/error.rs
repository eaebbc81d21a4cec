//! Errors of the VMM crate: [`VmmError`] wraps each subsystem's own error enum (boot, vCPUs,
//! devices, memory, event loop, seccomp, threads) and adds the VM-level ones. Subsystems never
//! import this module, so no import circle runs through it.

use std::io;

use kestrel_api::ConfigError;
use thiserror::Error;

use crate::boot::BootError;
use crate::device_manager::DeviceError;
use crate::evloop::EventLoopError;
use crate::memory::MemoryError;
use crate::seccomp::SeccompError;
use crate::snapshot::{SnapshotError, StateFileError};
use crate::threads::SpawnError;
use crate::vcpu::VcpuError;

/// Why creating, starting or controlling a VM failed.
#[derive(Debug, Error)]
pub enum VmmError {
    /// The configuration was rejected; nothing was created.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// The host KVM speaks another API version.
    #[error("KVM API version {0} is not the supported version 12")]
    KvmApiVersion(i32),
    /// The host KVM lacks a capability Kestrel needs.
    #[error("KVM lacks the capability {0}")]
    KvmCapability(&'static str),
    /// A KVM VM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// What Kestrel asked KVM to do.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest could not be loaded (kernel, initrd, command line, boot data).
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU could not be created, set up, started, plugged or parked.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A device could not be created, wired into the VM or changed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Guest memory could not be set up or changed.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// The event loop could not be set up or started.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// A seccomp filter could not be built or installed (the VM did not start).
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A thread could not be spawned.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// A snapshot could not be taken (a device that cannot be saved, KVM state, the memory
    /// file).
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    /// The state file could not be written or read.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    /// The request needs a paused VM ([`crate::Vm::pause`]).
    #[error("the VM is not paused")]
    NotPaused,
    /// An eventfd operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The serial console output file could not be opened.
    #[error("serial.path: cannot open {path}: {source}")]
    SerialOutput {
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// No device with that id.
    #[error("no device with id {0:?}")]
    NoSuchDevice(String),
    /// Panic injection into fs workers: the device serves no queue on worker threads (it is
    /// not an in-process virtio-fs share, or `worker_threads` is off).
    #[error("device {0:?} has no virtio-fs worker threads")]
    NoFsWorkers(String),
    /// `start` was called twice.
    #[error("the VM was already started")]
    AlreadyStarted,
    /// The VM has stopped; the request needs a running VM.
    #[error("the VM is not running")]
    NotRunning,
    /// Ctrl-Alt-Del could not be pressed on the i8042 keyboard.
    #[error("cannot send Ctrl-Alt-Del: {0}")]
    CtrlAltDel(#[source] kestrel_devices::legacy::I8042Error),
}

/// Shorthand for KVM errors.
pub(crate) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { op, source }
}

/// Shorthand for I/O errors.
pub(crate) fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> VmmError {
    move |source| VmmError::Io { what, source }
}
