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
//!
//! The guest-agent client and the sandbox API (a VM plus its agent, with vCPU and memory
//! resizing) are in `kestrel-sandbox`; the `kestrel` binary is the `kestrel` package (`cli/`).

mod boot;
mod device_manager;
mod error;
mod evloop;
mod exit;
mod memory;
mod metrics;
pub mod pvfpu;
pub mod seccomp;
mod vcpu;
mod vm;

pub use boot::{host_kvm_is_software, DEFAULT_BOOT_ARGS, SOFTWARE_KVM_ARGS};
pub use device_manager::DeviceError;
pub use error::VmmError;
pub use exit::{ThreadClass, VcpuFault, VmExit};
pub use memory::{GuestMem, MemoryError, PluggedRange};
pub use metrics::VmMetrics;
pub use vcpu::{kick_signal, VcpuRunState, KICK_SIGNAL_OFFSET};
pub use vm::{effective_max_vcpus, ConsoleSink, ThreadInfo, ThreadKind, Vm, STOP_JOIN_TIMEOUT};
