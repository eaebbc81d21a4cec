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
//! Threads of one VM: one per vCPU (`kestrel-<vm>-vcpu<N>`) and one event loop
//! (`kestrel-<vm>-evloop`), each under its class's seccomp filter ([`seccomp`]; never the
//! caller's threads) and with `SIGPIPE` blocked (`kestrel_devices::sigpipe`: no write of
//! Kestrel's raises it, whatever the process's disposition). Dropping a [`Vm`] stops it and
//! joins every thread; its fds and guest memory are released with it.

// Moves to the sandbox crate (issue 10), which opts into the workspace lints there.
#[allow(clippy::cast_possible_truncation)]
pub mod agent;
mod boot;
mod builder;
mod device_manager;
mod error;
mod evloop;
mod exit;
mod memory;
mod metrics;
pub mod pvfpu;
pub mod sandbox;
pub mod seccomp;
mod threads;
mod vcpu;
mod vm;

pub use boot::{host_kvm_is_software, BootError, DEFAULT_BOOT_ARGS, SOFTWARE_KVM_ARGS};
pub use device_manager::{
    BlockControl, Device, DeviceError, DeviceKind, DeviceMetrics, FsControl, NetControl,
};
pub use error::VmmError;
pub use evloop::EventLoopError;
pub use exit::{ThreadClass, VcpuFault, VmExit};
pub use memory::{GuestMem, MemoryError, PluggedRange};
pub use metrics::VmMetrics;
pub use sandbox::{Sandbox, SandboxError};
pub use threads::{SpawnError, ThreadInfo, ThreadKind, STOP_JOIN_TIMEOUT};
pub use vcpu::control::VcpuRunState;
pub use vcpu::kick::{kick_signal, KICK_SIGNAL_OFFSET};
pub use vcpu::VcpuError;
pub use vm::{effective_max_vcpus, ConsoleSink, Vm};
