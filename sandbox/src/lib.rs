//! Kestrel's sandbox API, what a container runtime calls in-process: a VM of `kestrel-vmm`
//! plus a connection to its guest agent.
//!
//! - [`agent`]: [`AgentClient`](agent::AgentClient), the host side of the guest-agent
//!   protocol (`kestrel-agent-proto`, `docs/agent-protocol.md`) over the VM's hybrid vsock.
//! - [`Sandbox`]: a started [`Vm`](kestrel_vmm::Vm) with a connected agent, and vCPU and
//!   memory resizing done end to end (VMM side and guest side).
//! - [`Template`]: a VM booted until its agent answers, paused and snapshotted into a
//!   directory; [`Template::clone_sandbox`] restores ready sandboxes from it (kata's VM
//!   factory), [`Template::ensure`] keeps one per configuration under a root directory.
//! - [`Pool`]: clones of one template kept ready by a background thread and handed out by
//!   [`Pool::take`] (kata's VMCache, in-process). See docs/templates.md.
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
mod pool;
mod sandbox;
mod template;

pub use kestrel_agent_proto as proto;
pub use pool::{
    OverridesFn, Pool, PoolError, PoolStats, FILL_BACKOFF_MAX, FILL_BACKOFF_MIN, TAKE_PING_MIN,
};
pub use sandbox::{MemoryResize, Sandbox, SandboxError, VcpuResize, REFRESH_ENTROPY_BYTES};
pub use template::{template_key, Template, TemplateError, TEMPLATE_FILE, TEMPLATE_FORMAT};
