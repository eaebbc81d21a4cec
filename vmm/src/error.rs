//! Errors of the VMM crate.

use std::io;

use kestrel_api::ConfigError;
use thiserror::Error;

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
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// What Kestrel asked KVM to do.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A file named in the configuration could not be opened or read.
    #[error("{field}: cannot read {path}: {source}")]
    File {
        /// The configuration field.
        field: &'static str,
        /// The path.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The kernel image is neither a loadable ELF nor a bzImage.
    #[error("boot-source.kernel_image_path: cannot load {path}: {source}")]
    KernelLoad {
        /// The path.
        path: String,
        /// linux-loader's reason.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd does not fit in guest memory.
    #[error("boot-source.initrd_path: {0}")]
    Initrd(#[source] kestrel_arch::boot::BootError),
    /// The kernel command line could not be built.
    #[error("boot-source.boot_args: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line could not be written into guest memory.
    #[error("cannot write the kernel command line into guest memory: {0}")]
    CmdlineLoad(#[source] linux_loader::loader::Error),
    /// Boot parameters could not be written.
    #[error("cannot write boot parameters: {0}")]
    BootParams(#[source] kestrel_arch::boot::BootError),
    /// The MP table could not be written.
    #[error("cannot write the MP table: {0}")]
    MpTable(#[source] kestrel_arch::mptable::MpTableError),
    /// vCPU register setup failed.
    #[error("vCPU {vcpu}: register setup failed: {source}")]
    Regs {
        /// vCPU index.
        vcpu: u32,
        /// The failure.
        #[source]
        source: kestrel_arch::regs::RegsError,
    },
    /// vCPU CPUID setup failed.
    #[error("vCPU {vcpu}: CPUID setup failed: {source}")]
    Cpuid {
        /// vCPU index.
        vcpu: u32,
        /// The failure.
        #[source]
        source: kestrel_arch::cpuid::CpuidError,
    },
    /// A device could not be placed on a bus.
    #[error("device {device}: {source}")]
    Bus {
        /// Device name.
        device: &'static str,
        /// The bus error.
        #[source]
        source: kestrel_devices::BusError,
    },
    /// An eventfd, timerfd or epoll operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The event loop could not be set up.
    #[error("event loop: {0:?}")]
    EventManager(event_manager::Error),
    /// A seccomp filter could not be built or installed (the VM did not start).
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// A thread could not be spawned.
    #[error("cannot spawn thread {name}: {source}")]
    Spawn {
        /// Thread name.
        name: String,
        /// The error.
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
    /// Guest memory could not be set up or changed.
    #[error("guest memory: {0}")]
    Memory(#[source] crate::memory::MemoryError),
    /// A vCPU index that cannot be plugged or parked.
    #[error("vCPU {id}: not a vCPU that can be changed (next new index {next}, max_vcpus {max}; vCPU 0 stays)")]
    VcpuIndex {
        /// Requested index.
        id: u32,
        /// The next index a new vCPU would get.
        next: u32,
        /// The VM's maximum.
        max: u32,
    },
    /// A virtio device could not be wired into the VM.
    #[error(transparent)]
    Device(#[from] crate::device_manager::DeviceError),
    /// A block device could not be created or changed.
    #[error("drives[{drive_id}]: {source}")]
    Block {
        /// The drive.
        drive_id: String,
        /// Why.
        #[source]
        source: kestrel_devices::virtio::block::BlockError,
    },
    /// The vsock device could not be created.
    #[error("vsock: {0}")]
    Vsock(#[source] kestrel_devices::virtio::vsock::VsockError),
    /// An in-process virtio-fs share could not be created.
    #[error("fs[{tag}]: {source}")]
    Fs {
        /// The share's tag.
        tag: String,
        /// Why.
        #[source]
        source: kestrel_devices::virtio::fs::FsError,
    },
    /// A vhost-user-fs backend could not be connected.
    #[error("fs[{tag}]: vhost-user: {source}")]
    VhostUserFs {
        /// The share's tag.
        tag: String,
        /// Why.
        #[source]
        source: kestrel_devices::virtio::fs::vhost_user::VhostUserFsError,
    },
    /// A network interface could not be created or changed.
    #[error("network-interfaces[{iface_id}]: {source}")]
    Net {
        /// The interface.
        iface_id: String,
        /// Why.
        #[source]
        source: kestrel_devices::virtio::net::NetError,
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
    /// The vCPU kick signal (`SIGRTMIN+offset`) already has a disposition the embedding process
    /// set; Kestrel does not replace it. Keep that signal free for Kestrel.
    #[error(
        "the vCPU kick signal SIGRTMIN+{offset} ({signal}) already has {current} installed by \
         this process; Kestrel will not replace it (leave that signal to Kestrel)"
    )]
    KickSignalInUse {
        /// The signal number.
        signal: i32,
        /// Its offset from `SIGRTMIN` ([`crate::KICK_SIGNAL_OFFSET`]).
        offset: i32,
        /// What is installed: `SIG_IGN` or `a handler`.
        current: &'static str,
    },
    /// The VM has stopped; the request needs a running VM.
    #[error("the VM is not running")]
    NotRunning,
}

/// Shorthand for KVM errors.
pub(crate) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { op, source }
}

/// Shorthand for I/O errors.
pub(crate) fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> VmmError {
    move |source| VmmError::Io { what, source }
}
