//! Kestrel: an embeddable virtual machine monitor.
//!
//! A container runtime links this crate and starts Linux microVMs inside its own process:
//!
//! ```no_run
//! use kestrel_api::VmConfig;
//! use kestrel_vmm::Vm;
//!
//! let config = VmConfig::new("/var/cache/kestrel/guest/current/vmlinux", 1, 256);
//! let vm = Vm::create(&config)?;       // validates, creates KVM VM, memory, devices, vCPUs
//! vm.start()?;                         // vCPU threads + event loop
//! for t in vm.threads() { println!("{} {}", t.name, t.tid); } // for cgroups
//! let why = vm.wait();                 // or vm.stop() from another thread
//! println!("guest stopped: {why}");
//! # Ok::<(), kestrel_vmm::VmmError>(())
//! ```
//!
//! Per-device operations go through the device's handle, found by id:
//!
//! ```no_run
//! # let vm: kestrel_vmm::Vm = unimplemented!();
//! let slot = vm.device("slot").expect("a drive with that id");
//! slot.block().expect("a block device").swap_backing(Some("/tmp/disk.img".as_ref()), false)?;
//! println!("{:?}, needs reset: {}", slot.metrics(), slot.needs_reset());
//! # Ok::<(), kestrel_vmm::DeviceError>(())
//! ```
//!
//! Modules (no import circles: subsystems never import [`VmmError`], which wraps their errors):
//! - `vm`: [`Vm`], the public API tying the parts together;
//! - `builder`: the create path as steps (host checks, KVM VM and memory, irqchip, legacy
//!   devices, kernel, one `attach_*` step per virtio device kind, vCPUs, boot data), shaped for
//!   a restore entry point;
//! - `device_manager`: virtio wiring (MMIO window, IRQ, irqfd, ioeventfds), the device
//!   registry and the [`Device`] handle, panic containment, legacy devices;
//! - `vcpu`: the `KVM_RUN` loop and assists; `vcpu::exits` (exit decisions, testable without
//!   KVM), `vcpu::control` (park handshake), `vcpu::kick` (kick signal), `vcpu::manager` (every
//!   vCPU and its thread: create, plug, park, pause);
//! - `evloop`: the event loop, console input; it waits for the vCPUs but never kicks them;
//! - `threads`: thread names/ids ([`ThreadInfo`]) and the common start of every VM thread;
//! - [`snapshot`]: the KVM state of vCPUs and the VM as serde types, saved from and restored
//!   into KVM fds, and the versioned, checksummed state file;
//! - `boot`, `memory`, `exit`, `metrics`, [`pvfpu`], [`seccomp`], `error`.
//!
//! Threads of one VM: one per vCPU (`kestrel-<vm>-vcpu<N>`, or Firecracker's `fc_vcpu <N>`
//! with `kestrel.thread_names` = `"firecracker"`) and one event loop
//! (`kestrel-<vm>-evloop`), each under its class's seccomp filter ([`seccomp`]; never the
//! caller's threads) and with `SIGPIPE` blocked (`kestrel_devices::sigpipe`: no write of
//! Kestrel's raises it, whatever the process's disposition). Dropping a [`Vm`] stops it and
//! joins every thread; its fds and guest memory are released with it.
//!
//! The guest-agent client and the sandbox API (a VM plus its agent, with vCPU and memory
//! resizing) are in `kestrel-sandbox`; the `kestrel` binary is the `kestrel` package (`cli/`).

mod boot;
mod builder;
mod device_manager;
mod error;
mod evloop;
mod exit;
mod memory;
mod metrics;
pub mod pvfpu;
pub mod seccomp;
pub mod snapshot;
mod threads;
mod vcpu;
mod vm;

pub use boot::{host_kvm_is_software, BootError, DEFAULT_BOOT_ARGS, SOFTWARE_KVM_ARGS};
pub use builder::{effective_max_vcpus, ConsoleSink};
pub use device_manager::{
    BlockControl, Device, DeviceError, DeviceKind, DeviceMetrics, FsControl, NetControl,
};
pub use error::VmmError;
pub use evloop::EventLoopError;
pub use exit::{ThreadClass, VcpuFault, VmExit};
pub use memory::{GuestMem, MemoryError, PluggedRange};
pub use metrics::VmMetrics;
pub use snapshot::SnapshotFiles;
pub use threads::{SpawnError, ThreadInfo, ThreadKind, STOP_JOIN_TIMEOUT};
pub use vcpu::control::VcpuRunState;
pub use vcpu::kick::{kick_signal, KICK_SIGNAL_OFFSET};
pub use vcpu::VcpuError;
pub use vm::Vm;
