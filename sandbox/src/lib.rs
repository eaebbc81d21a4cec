//! Kestrel's sandbox API, what a container runtime calls in-process: a VM of `kestrel-vmm`
//! plus a connection to its guest agent.
//!
//! - [`agent`]: [`AgentClient`](agent::AgentClient), the host side of the guest-agent
//!   protocol (`kestrel-agent-proto`, `docs/agent-protocol.md`) over the VM's hybrid vsock.
//! - [`Sandbox`]: a started [`Vm`](kestrel_vmm::Vm) with a connected agent, and vCPU and
//!   memory resizing done end to end (VMM side and guest side).
//!
//! ```no_run
//! use std::time::Duration;
//! use kestrel_api::{VmConfig, VsockConfig};
//! use kestrel_sandbox::Sandbox;
//!
//! let mut config = VmConfig::new("/var/cache/kestrel/guest/current/vmlinux", 1, 256);
//! config.vsock = Some(VsockConfig {
//!     guest_cid: 3,
//!     uds_path: "/run/vm0/vsock.sock".into(),
//!     vsock_id: None,
//! });
//! let sb = Sandbox::boot(&config, Duration::from_secs(300))?;
//! let out = sb.agent().exec(&["uname", "-r"])?;
//! println!("{}", out.stdout_str());
//! sb.resize_vcpus(1)?;
//! # Ok::<(), kestrel_sandbox::SandboxError>(())
//! ```

pub mod agent;
mod sandbox;

pub use kestrel_agent_proto as proto;
pub use sandbox::{MemoryResize, Sandbox, SandboxError, VcpuResize};
