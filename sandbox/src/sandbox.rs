//! The sandbox API a container runtime calls in-process: a booted VM plus its guest agent, with
//! vCPU and memory resizing done end to end (VMM side and guest side).
//!
//! Hotplug without ACPI (docs/design.md): the MP table lists `max_vcpus` CPUs and the guest
//! boots with `maxcpus=<vcpu_count>`; growing creates (or unparks) the KVM vCPU and has the
//! agent online it; shrinking has the agent offline the highest CPUs and parks their threads.
//! Memory grows by registering one KVM slot per memory block in the hotplug region and having
//! the agent write each block's address to `/sys/devices/system/memory/probe` and online it as
//! movable; it shrinks by offlining blocks in the guest, then deleting the slots and releasing
//! the host pages.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use kestrel_api::VmConfig;
use thiserror::Error;

use kestrel_vmm::{VcpuRunState, Vm, VmExit, VmmError};

use crate::agent::{AgentClient, AgentError, AGENT_PORT};
use crate::template::TemplateError;

/// Host entropy bytes [`Sandbox::refresh_guest`] gives the guest (512 bits, credited).
pub const REFRESH_ENTROPY_BYTES: usize = 64;

/// Sandbox failures.
#[derive(Debug, Error)]
pub enum SandboxError {
    /// The VM could not be created or changed.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The guest agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A sandbox needs the `vsock` section (its agent channel).
    #[error("vsock: a sandbox needs a vsock device for its guest agent")]
    NoVsock,
    /// Another resize is running.
    #[error("another resize is in progress")]
    ResizeInProgress,
    /// A template could not be created, opened or found (see [`TemplateError`]).
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// Fresh entropy could not be read from the host's `/dev/urandom` (for
    /// [`Sandbox::refresh_guest`]).
    #[error("reading host entropy from /dev/urandom: {0}")]
    HostEntropy(#[source] std::io::Error),
    /// The requested vCPU count is outside 1..=max_vcpus.
    #[error("cannot resize to {requested} vCPUs: allowed 1..={max}")]
    VcpuRange {
        /// Requested.
        requested: u32,
        /// The VM's maximum.
        max: u32,
    },
    /// Growing vCPUs failed; what was plugged has been rolled back.
    #[error(
        "vCPU resize to {requested} failed at vCPU {vcpu}: {reason}; guest online CPUs: {online}"
    )]
    VcpuResize {
        /// Requested count.
        requested: u32,
        /// The vCPU that failed.
        vcpu: u32,
        /// Why.
        reason: String,
        /// The guest's online set afterwards.
        online: String,
    },
    /// The requested memory size is outside boot..=max.
    #[error("cannot resize memory to {requested_mib} MiB: allowed {boot_mib}..={max_mib} MiB")]
    MemoryRange {
        /// Requested.
        requested_mib: u64,
        /// Boot RAM.
        boot_mib: u64,
        /// Maximum.
        max_mib: u64,
    },
    /// The guest could not offline a block (busy); nothing was forced.
    #[error("the guest could not offline memory at {addr:#x} ({size:#x} bytes): {reason}")]
    MemoryBusy {
        /// Block address.
        addr: u64,
        /// Size.
        size: u64,
        /// The guest's answer.
        reason: String,
    },
}

/// Outcome of [`Sandbox::resize_vcpus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuResize {
    /// vCPUs online now.
    pub count: u32,
    /// The guest's `/sys/devices/system/cpu/online`.
    pub online: String,
    /// Time spent in the VMM (creating/unparking/parking vCPUs).
    pub vmm_time: Duration,
    /// Time spent waiting for the guest (agent calls).
    pub guest_time: Duration,
}

/// Outcome of [`Sandbox::resize_memory`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryResize {
    /// Total guest RAM now (boot + plugged), MiB.
    pub total_mib: u64,
    /// The guest's MemTotal afterwards, KiB.
    pub guest_mem_total_kb: u64,
    /// Block size used, bytes.
    pub block_size: u64,
    /// Time spent in the VMM (slots, mappings).
    pub vmm_time: Duration,
    /// Time spent waiting for the guest.
    pub guest_time: Duration,
}

/// Start `vm` unless it runs already.
fn start(vm: &Vm) -> Result<(), SandboxError> {
    match vm.start() {
        Ok(()) | Err(VmmError::AlreadyStarted) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Boot RAM and the most RAM hotplug can reach, MiB.
fn mem_bounds(mc: &kestrel_api::MachineConfig) -> (u64, u64) {
    (
        mc.mem_size_mib,
        mc.max_mem_size_mib.unwrap_or(mc.mem_size_mib),
    )
}

/// The vsock socket of a restored VM's configuration.
fn restored_uds(vm: &Vm) -> Result<PathBuf, SandboxError> {
    vm.config()
        .vsock
        .as_ref()
        .map(|v| v.uds_path.clone())
        .ok_or(SandboxError::NoVsock)
}

/// [`REFRESH_ENTROPY_BYTES`] bytes from the host's `/dev/urandom`.
fn host_entropy() -> Result<[u8; REFRESH_ENTROPY_BYTES], SandboxError> {
    let mut seed = [0u8; REFRESH_ENTROPY_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(SandboxError::HostEntropy)?;
    Ok(seed)
}

/// Take the one-resize-at-a-time lock, or refuse with [`SandboxError::ResizeInProgress`].
fn try_begin(lock: &Mutex<()>) -> Result<MutexGuard<'_, ()>, SandboxError> {
    match lock.try_lock() {
        Ok(g) => Ok(g),
        Err(TryLockError::WouldBlock) => Err(SandboxError::ResizeInProgress),
        Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
    }
}

/// A running VM with a connected guest agent.
pub struct Sandbox {
    vm: Arc<Vm>,
    agent: Mutex<AgentClient>,
    uds: PathBuf,
    resize: Mutex<()>,
    online_vcpus: Mutex<u32>,
    boot_mib: u64,
    max_mib: u64,
    block_size: Mutex<Option<u64>>,
}

impl Sandbox {
    /// Create and start the VM, then wait (up to `agent_timeout`) for its guest agent.
    pub fn boot(config: &VmConfig, agent_timeout: Duration) -> Result<Sandbox, SandboxError> {
        // Refused before any resource is created.
        if config.vsock.is_none() {
            return Err(SandboxError::NoVsock);
        }
        let vm = Vm::create(config)?;
        Self::from_vm(config, vm, agent_timeout)
    }

    /// Like [`Sandbox::boot`] for a VM created by the caller (e.g. with its own console sink).
    /// Starts it if it was not started.
    pub fn from_vm(
        config: &VmConfig,
        vm: Vm,
        agent_timeout: Duration,
    ) -> Result<Sandbox, SandboxError> {
        let uds = config
            .vsock
            .as_ref()
            .map(|v| v.uds_path.clone())
            .ok_or(SandboxError::NoVsock)?;
        start(&vm)?;
        let agent = AgentClient::connect(&uds, AGENT_PORT, agent_timeout)?;
        let mc = &config.machine_config;
        Ok(Self::assemble(
            vm,
            agent,
            uds,
            mc.vcpu_count,
            mem_bounds(mc),
        ))
    }

    /// A sandbox for a VM restored from a snapshot ([`Vm::restore`]): starts it if it was not
    /// started, then waits (up to `agent_timeout`) for the guest agent on the restored
    /// configuration's vsock socket ([`Vm::config`], i.e. the snapshot's with the overrides
    /// applied). The online vCPU count is the number of vCPUs running after start (vCPUs the
    /// guest had offlined before the snapshot stay parked). Does not refresh the guest: call
    /// [`Sandbox::refresh_guest`] before handing it out.
    ///
    /// # Errors
    /// [`SandboxError::NoVsock`] if the snapshot's VM has no vsock device; the VM's start
    /// error; the agent's connect error (e.g. [`AgentError::Timeout`]). The VM is stopped on
    /// error (dropped).
    pub fn from_restored(vm: Vm, agent_timeout: Duration) -> Result<Sandbox, SandboxError> {
        let uds = restored_uds(&vm)?;
        start(&vm)?;
        let agent = AgentClient::connect(&uds, AGENT_PORT, agent_timeout)?;
        Ok(Self::from_restored_agent(vm, agent, uds))
    }

    /// [`Sandbox::from_restored`] for a started VM whose agent is already connected through
    /// `uds`.
    pub(crate) fn from_restored_agent(vm: Vm, agent: AgentClient, uds: PathBuf) -> Sandbox {
        let running = vm
            .vcpu_states()
            .iter()
            .filter(|(_, s)| *s == VcpuRunState::Running)
            .count();
        let online = u32::try_from(running).unwrap_or(u32::MAX).max(1);
        let mem = mem_bounds(&vm.config().machine_config);
        Self::assemble(vm, agent, uds, online, mem)
    }

    fn assemble(
        vm: Vm,
        agent: AgentClient,
        uds: PathBuf,
        online_vcpus: u32,
        (boot_mib, max_mib): (u64, u64),
    ) -> Sandbox {
        Sandbox {
            vm: Arc::new(vm),
            agent: Mutex::new(agent),
            uds,
            resize: Mutex::new(()),
            online_vcpus: Mutex::new(online_vcpus),
            boot_mib,
            max_mib,
            block_size: Mutex::new(None),
        }
    }

    /// The hand-out step for a sandbox cloned from a template: mix
    /// [`REFRESH_ENTROPY_BYTES`] fresh bytes of host entropy into the guest's pool (credited,
    /// so the guest's RNG state no longer equals its siblings') and set the guest clock to the
    /// host's (it stood still since the snapshot). Two agent calls.
    ///
    /// # Errors
    /// [`SandboxError::HostEntropy`] if the host's `/dev/urandom` cannot be read; the agent's
    /// error for either call.
    pub fn refresh_guest(&self) -> Result<(), SandboxError> {
        let seed = host_entropy()?;
        let mut agent = self.agent();
        agent.add_entropy(&seed)?;
        agent.set_time_now()?;
        Ok(())
    }

    /// The host path of the VM's vsock socket (where the agent is reached).
    pub fn uds_path(&self) -> &Path {
        &self.uds
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The agent connection (calls on it are sequential).
    pub fn agent(&self) -> MutexGuard<'_, AgentClient> {
        self.agent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new, separate agent connection (for concurrent work).
    pub fn connect_agent(&self, timeout: Duration) -> Result<AgentClient, SandboxError> {
        Ok(AgentClient::connect(&self.uds, AGENT_PORT, timeout)?)
    }

    fn begin_resize(&self) -> Result<MutexGuard<'_, ()>, SandboxError> {
        try_begin(&self.resize)
    }

    /// vCPUs the guest has online (as tracked by the sandbox).
    pub fn vcpu_count(&self) -> u32 {
        *self.online_vcpus.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Grow or shrink the guest's online vCPUs to `n` (1..=max_vcpus). vCPU 0 is never
    /// removed; the highest-numbered CPUs go first. Only one resize runs at a time; a failed
    /// grow is rolled back. Returns when the guest reports the new online set.
    pub fn resize_vcpus(&self, n: u32) -> Result<VcpuResize, SandboxError> {
        let _g = self.begin_resize()?;
        let max = self.vm.max_vcpus();
        if n == 0 || n > max {
            return Err(SandboxError::VcpuRange { requested: n, max });
        }
        let mut online = self.online_vcpus.lock().unwrap_or_else(|p| p.into_inner());
        let (mut vmm_time, mut guest_time) = (Duration::ZERO, Duration::ZERO);
        let mut agent = self.agent();
        if n > *online {
            for id in *online..n {
                let t = Instant::now();
                let plugged = self.vm.plug_vcpu(id);
                vmm_time += t.elapsed();
                let t = Instant::now();
                let r = plugged
                    .map_err(|e| e.to_string())
                    .and_then(|()| agent.online_cpu(id, true).map_err(|e| e.to_string()));
                guest_time += t.elapsed();
                if let Err(reason) = r {
                    // Roll back everything this call added, highest first.
                    for back in (*online..=id).rev() {
                        let _ = agent.online_cpu(back, false);
                        let _ = self.vm.park_vcpu(back);
                    }
                    let now = agent.cpus().map(|c| c.online).unwrap_or_default();
                    return Err(SandboxError::VcpuResize {
                        requested: n,
                        vcpu: id,
                        reason,
                        online: now,
                    });
                }
            }
        } else {
            for id in (n..*online).rev() {
                let t = Instant::now();
                let r = agent.online_cpu(id, false);
                guest_time += t.elapsed();
                if let Err(e) = r {
                    *online = id + 1;
                    let now = agent.cpus().map(|c| c.online).unwrap_or_default();
                    return Err(SandboxError::VcpuResize {
                        requested: n,
                        vcpu: id,
                        reason: e.to_string(),
                        online: now,
                    });
                }
                let t = Instant::now();
                self.vm.park_vcpu(id)?;
                vmm_time += t.elapsed();
            }
        }
        *online = n;
        let t = Instant::now();
        let sets = agent.cpus()?;
        guest_time += t.elapsed();
        Ok(VcpuResize {
            count: n,
            online: sets.online,
            vmm_time,
            guest_time,
        })
    }

    fn block_size(&self, agent: &mut AgentClient) -> Result<u64, SandboxError> {
        let mut bs = self.block_size.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = *bs {
            return Ok(b);
        }
        let raw = agent.read_file("/sys/devices/system/memory/block_size_bytes")?;
        let text = String::from_utf8_lossy(&raw);
        let b = u64::from_str_radix(text.trim(), 16).map_err(|_| {
            AgentError::Protocol(format!("bad memory block size {:?}", text.trim()))
        })?;
        *bs = Some(b);
        Ok(b)
    }

    /// Total RAM now (boot + plugged), MiB.
    pub fn memory_mib(&self) -> u64 {
        let plugged: u64 = self.vm.plugged_memory().iter().map(|p| p.size).sum();
        self.boot_mib + (plugged >> 20)
    }

    /// Grow or shrink guest RAM to `mib` (rounded up to whole memory blocks above boot RAM,
    /// between boot size and `max_mem_size_mib`). Grows one KVM slot per block; shrinks by
    /// offlining the highest blocks in the guest first. A block the guest cannot offline is
    /// reported, never forced.
    pub fn resize_memory(&self, mib: u64) -> Result<MemoryResize, SandboxError> {
        let _g = self.begin_resize()?;
        let mut agent = self.agent();
        let t = Instant::now();
        let block = self.block_size(&mut agent)?;
        let mut guest_time = t.elapsed();
        let mut vmm_time = Duration::ZERO;
        let block_mib = block >> 20;
        let extra = mib.saturating_sub(self.boot_mib);
        let target = self.boot_mib + extra.div_ceil(block_mib.max(1)) * block_mib;
        if mib < self.boot_mib || target > self.max_mib {
            return Err(SandboxError::MemoryRange {
                requested_mib: mib,
                boot_mib: self.boot_mib,
                max_mib: self.max_mib,
            });
        }
        let mut current = self.memory_mib();
        let mut mem_total_kb = 0;
        while current < target {
            let t = Instant::now();
            let r = self.vm.add_memory(block, block)?;
            vmm_time += t.elapsed();
            let t = Instant::now();
            let probed = agent.probe_memory(r.addr, r.size);
            guest_time += t.elapsed();
            match probed {
                Ok(b) => mem_total_kb = b.mem_total_kb,
                Err(e) => {
                    let _ = self.vm.remove_memory(r.addr, r.size);
                    return Err(e.into());
                }
            }
            current += block_mib;
        }
        while current > target {
            let Some(top) = self.vm.plugged_memory().into_iter().next_back() else {
                break;
            };
            let t = Instant::now();
            let off = agent.offline_memory(top.addr, top.size);
            guest_time += t.elapsed();
            match off {
                Ok(b) => mem_total_kb = b.mem_total_kb,
                Err(e) => {
                    return Err(SandboxError::MemoryBusy {
                        addr: top.addr,
                        size: top.size,
                        reason: e.to_string(),
                    })
                }
            }
            let t = Instant::now();
            self.vm.remove_memory(top.addr, top.size)?;
            vmm_time += t.elapsed();
            current -= top.size >> 20;
        }
        if mem_total_kb == 0 {
            mem_total_kb = agent.meminfo()?.mem_total_kb;
        }
        Ok(MemoryResize {
            total_mib: current,
            guest_mem_total_kb: mem_total_kb,
            block_size: block,
            vmm_time,
            guest_time,
        })
    }

    /// Ask the guest to reboot and wait for the VM to stop.
    pub fn shutdown(&self, timeout: Duration) -> Option<VmExit> {
        let _ = self.agent().shutdown(false);
        self.vm.wait_timeout(timeout)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.vm.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resize_while_another_runs_is_refused() {
        let lock = Mutex::new(());
        let first = try_begin(&lock).unwrap();
        // Another caller (another thread) is refused while the first resize holds the lock.
        std::thread::scope(|s| {
            let r = s.spawn(|| try_begin(&lock).map(|_| ())).join().unwrap();
            assert!(matches!(r, Err(SandboxError::ResizeInProgress)));
        });
        drop(first);
        assert!(
            try_begin(&lock).is_ok(),
            "free again after the first resize ends"
        );
    }

    #[test]
    fn needs_vsock() {
        // Everything else valid (the test binary is an x86_64 ELF, as a kernel must be), no
        // vsock section: refused as such, before the VM is created.
        let kernel = std::env::current_exe().unwrap();
        let mut c = VmConfig::new(&kernel, 1, 64);
        c.serial.output = kestrel_api::SerialOutput::None;
        let e = Sandbox::boot(&c, Duration::from_millis(1)).err();
        assert!(matches!(e, Some(SandboxError::NoVsock)), "{e:?}");
        assert_eq!(
            e.unwrap().to_string(),
            "vsock: a sandbox needs a vsock device for its guest agent"
        );
    }

    #[test]
    fn resize_in_progress_message() {
        let e = SandboxError::ResizeInProgress.to_string();
        assert_eq!(e, "another resize is in progress");
    }
}
