//! vCPUs: creation, per-vCPU setup and the `KVM_RUN` exit loop with the emulation assists that
//! a software (nested) KVM needs (docs/nested-kvm.md).
//!
//! - [`exits`]: what to do after each exit (testable without KVM);
//! - [`control`]: the park handshake between the API and a vCPU thread;
//! - [`kick`]: the kick signal and the list of vCPU threads it reaches;
//! - [`manager`]: every vCPU of a VM, their threads, plug, park, pause.

pub(crate) mod control;
pub(crate) mod exits;
pub(crate) mod kick;
pub(crate) mod manager;

use std::sync::Arc;
use std::time::Instant;

use kestrel_devices::Bus;
use kvm_bindings::{kvm_mp_state, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};

use crate::exit::{ExitState, VcpuFault, VmExit};
use crate::memory::GuestMem;
use crate::metrics::VmCounters;
use crate::pvfpu;
use crate::seccomp::SeccompError;
use crate::threads::SpawnError;
use control::VcpuControl;
use exits::{Assist, Step};
use kick::kick_signal;

/// Why a vCPU could not be created, set up, started or changed.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {vcpu}: KVM {op} failed: {source}")]
    Kvm {
        /// vCPU index.
        vcpu: u32,
        /// What Kestrel asked KVM to do.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
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
    /// A vCPU index that cannot be plugged or parked.
    #[error("vCPU {id}: not a vCPU that can be changed (next new index {next}, max_vcpus {max}; vCPU 0 stays)")]
    Index {
        /// Requested index.
        id: u32,
        /// The next index a new vCPU would get.
        next: u32,
        /// The VM's maximum.
        max: u32,
    },
    /// The vCPU's thread did not reach the requested state: the VM stopped meanwhile.
    #[error("the VM is not running")]
    NotRunning,
    /// The request needs a paused VM ([`crate::Vm::pause`]).
    #[error("the VM is not paused")]
    NotPaused,
    /// A vCPU's KVM state could not be saved.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// The vCPU kick signal (`SIGRTMIN+offset`) already has a disposition the embedding
    /// process set; Kestrel does not replace it. Keep that signal free for Kestrel.
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
    /// A vCPU thread could not be spawned.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// A vCPU thread could not install its seccomp filter (it never ran the guest).
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// The kick signal's disposition could not be read or set.
    #[error("{what}: {source}")]
    Signal {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What every vCPU thread of a VM shares.
pub(crate) struct VcpuShared {
    pub(crate) mem: GuestMem,
    pub(crate) pio: Bus,
    pub(crate) mmio: Bus,
    pub(crate) exit: Arc<ExitState>,
    pub(crate) counters: Arc<VmCounters>,
    /// Set by the boot vCPU right before its first `KVM_RUN`.
    pub(crate) first_run: std::sync::OnceLock<Instant>,
    /// Serve the paravirtual extended-state switch ports (`pvfpu`, software KVM only).
    pub(crate) pvfpu: bool,
}

/// Create vCPU `id` and apply the setup every vCPU needs (CPUID, MSRs, FPU, LAPIC LINTs).
pub(crate) fn create_vcpu(
    kvm: &Kvm,
    vm: &VmFd,
    id: u32,
    max_vcpus: u32,
) -> Result<VcpuFd, VcpuError> {
    let fd = vm
        .create_vcpu(u64::from(id))
        .map_err(|source| VcpuError::Kvm {
            vcpu: id,
            op: "KVM_CREATE_VCPU",
            source,
        })?;
    // MAX_SUPPORTED_VCPUS (254) keeps both in u8; the manager never creates more.
    let as_u8 = |n: u32| u8::try_from(n).unwrap_or(u8::MAX);
    kestrel_arch::cpuid::setup_cpuid(kvm, &fd, as_u8(id), as_u8(max_vcpus))
        .map_err(|source| VcpuError::Cpuid { vcpu: id, source })?;
    let regs_err = |source| VcpuError::Regs { vcpu: id, source };
    kestrel_arch::regs::setup_msrs(&fd).map_err(regs_err)?;
    kestrel_arch::regs::setup_fpu(&fd).map_err(regs_err)?;
    kestrel_arch::regs::set_lint(&fd).map_err(regs_err)?;
    Ok(fd)
}

/// Registers of the boot vCPU: 64-bit entry at `entry`.
pub(crate) fn setup_boot_vcpu(
    fd: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: u64,
) -> Result<(), VcpuError> {
    let regs_err = |source| VcpuError::Regs { vcpu: 0, source };
    kestrel_arch::regs::setup_sregs(mem, fd).map_err(regs_err)?;
    kestrel_arch::regs::setup_regs(fd, entry).map_err(regs_err)?;
    Ok(())
}

/// One vCPU and its loop.
pub(crate) struct Vcpu {
    pub(crate) id: u32,
    pub(crate) fd: VcpuFd,
    pub(crate) shared: Arc<VcpuShared>,
    pub(crate) ctl: Arc<VcpuControl>,
}

impl Vcpu {
    /// The thread body: run until the VM stops (or this vCPU stops it). Never panics on guest
    /// behaviour. The caller records that the thread left its loop.
    pub(crate) fn run_loop(mut self) {
        // Threads inherit the creator's mask; the kick must get through.
        let _ = vmm_sys_util::signal::unblock_signal(kick_signal());
        let shared = self.shared.clone();
        let id = self.id;
        while !shared.exit.stopping() && self.park_while_requested() {
            shared.exit.faults.check_vcpu(id);
            if id == 0 {
                let _ = shared.first_run.set(Instant::now());
            }
            let step = match self.fd.run() {
                Ok(exit) => exits::handle_exit(&shared, id, exit),
                Err(e) => exits::run_error(&shared.counters, id, e.errno()),
            };
            let step = match step {
                Step::InternalError => self.internal_error(),
                Step::Again => self.ap_start_assist(),
                Step::XState(req) => self.xstate_assist(req),
                s => s,
            };
            if let Step::Exit(x) = step {
                shared.exit.report(x);
                break;
            }
        }
    }

    /// Park while asked to, running posted tasks with this vCPU's fd; false when the VM stops.
    fn park_while_requested(&self) -> bool {
        let fd = &self.fd;
        self.ctl
            .park_while_requested(&self.shared.exit, &mut |task| task(fd))
    }

    fn failed(&self, fault: VcpuFault) -> Step {
        Step::Exit(VmExit::Failed {
            vcpu: self.id,
            fault,
        })
    }

    /// `KVM_EXIT_INTERNAL_ERROR`: emulation failures of INT3 and FWAIT are assisted
    /// (docs/nested-kvm.md §3); anything else stops the VM naming RIP and the bytes.
    fn internal_error(&mut self) -> Step {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the `internal` member of the
        // kvm_run union is the one KVM filled in.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        if let Some(x) = exits::internal_error(self.id, suberror) {
            return Step::Exit(x);
        }
        let (rip, bytes) = match self.instruction_bytes() {
            Ok(x) => x,
            Err(fault) => return self.failed(fault),
        };
        let counters = self.shared.counters.clone();
        let counter = match exits::emulation_assist(&bytes) {
            Some(Assist::Int3) if self.assist_int3() => &counters.assist_int3,
            Some(Assist::Fwait) if self.advance_rip(1).is_ok() => &counters.assist_fwait,
            _ => return self.failed(VcpuFault::EmulationFailure { rip, bytes }),
        };
        VmCounters::bump(counter);
        Step::Continue
    }

    /// INT3: skip it and deliver #BP as the CPU would have. False if KVM refused a step.
    fn assist_int3(&mut self) -> bool {
        if self.advance_rip(1).is_err() {
            return false;
        }
        let Ok(mut events) = self.fd.get_vcpu_events() else {
            return false;
        };
        events.exception.injected = 1;
        events.exception.nr = 3;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        self.fd.set_vcpu_events(&events).is_ok()
    }

    /// The guest kernel's task switch asks to save or load a task's extended (AVX) state
    /// (docs/nested-kvm.md §10). A refused request (bad address or state) is counted; the guest
    /// only hurts itself, so the VM goes on.
    fn xstate_assist(&mut self, req: pvfpu::Request) -> Step {
        let counters = &self.shared.counters;
        match pvfpu::serve(&self.fd, &self.shared.mem.memory(), req) {
            Ok(()) => VmCounters::bump(match req {
                pvfpu::Request::Save(_) => &counters.assist_xstate_save,
                pvfpu::Request::Load(_) => &counters.assist_xstate_load,
            }),
            Err(e) => {
                VmCounters::bump(&counters.assist_xstate_errors);
                tracing::debug!("vCPU {}: extended-state assist refused: {e}", self.id);
            }
        }
        Step::Continue
    }

    /// Linear RIP and up to 15 bytes at it (fewer at the end of guest memory).
    fn instruction_bytes(&self) -> Result<(u64, Vec<u8>), VcpuFault> {
        let run_fault = |e: kvm_ioctls::Error| VcpuFault::Run { errno: e.errno() };
        let regs = self.fd.get_regs().map_err(run_fault)?;
        let sregs = self.fd.get_sregs().map_err(run_fault)?;
        let linear = sregs.cs.base.wrapping_add(regs.rip);
        let mut bytes = Vec::new();
        let t = match self.fd.translate_gva(linear) {
            Ok(t) if t.valid != 0 => t,
            _ => return Ok((linear, bytes)),
        };
        let mut pa = t.physical_address;
        for _ in 0..15 {
            // Byte by byte: the instruction may cross a page (only the first page is
            // translated; that is enough to recognise the one-byte instructions we assist).
            match self.shared.mem.memory().read_obj::<u8>(GuestAddress(pa)) {
                Ok(b) => bytes.push(b),
                Err(_) => break,
            }
            pa += 1;
            if pa & 0xfff == 0 {
                break;
            }
        }
        Ok((linear, bytes))
    }

    fn advance_rip(&self, n: u64) -> Result<(), kvm_ioctls::Error> {
        let mut regs = self.fd.get_regs()?;
        regs.rip = regs.rip.wrapping_add(n);
        self.fd.set_regs(&regs)
    }

    /// `KVM_RUN` returned EAGAIN: on this software KVM an AP that received INIT never wakes on
    /// SIPI (docs/nested-kvm.md §6). Start it at the warm-reset vector Linux wrote before
    /// sending INIT ([`exits::ap_start_vector`]). On hardware KVM the SIPI has already made the
    /// vCPU runnable and this does nothing.
    fn ap_start_assist(&mut self) -> Step {
        let mp = match self.fd.get_mp_state() {
            Ok(m) => m,
            Err(e) => return self.failed(VcpuFault::Run { errno: e.errno() }),
        };
        let mem = self.shared.mem.memory();
        let offset = mem.read_obj::<u16>(GuestAddress(0x467)).ok();
        let segment = mem.read_obj::<u16>(GuestAddress(0x469)).ok();
        let Some((segment, offset)) = exits::ap_start_vector(mp.mp_state, offset, segment) else {
            return Step::Continue;
        };
        if let Err(what) = self.start_ap_at(segment, offset) {
            return self.failed(VcpuFault::ApStart {
                what: what.to_string(),
            });
        }
        VmCounters::bump(&self.shared.counters.assist_ap_start);
        tracing::debug!("vCPU {} started at {segment:04x}:{offset:04x}", self.id);
        Step::Continue
    }

    /// Real-mode start at `segment:offset`, runnable. Errors name the ioctl that failed.
    fn start_ap_at(&self, segment: u16, offset: u16) -> Result<(), &'static str> {
        let mut sregs = self.fd.get_sregs().map_err(|_| "KVM_GET_SREGS")?;
        sregs.cs.selector = segment;
        sregs.cs.base = u64::from(segment) << 4;
        sregs.cs.limit = 0xffff;
        self.fd.set_sregs(&sregs).map_err(|_| "KVM_SET_SREGS")?;
        let mut regs = self.fd.get_regs().map_err(|_| "KVM_GET_REGS")?;
        regs.rip = u64::from(offset);
        self.fd.set_regs(&regs).map_err(|_| "KVM_SET_REGS")?;
        let runnable = kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        };
        self.fd
            .set_mp_state(runnable)
            .map_err(|_| "KVM_SET_MP_STATE")
    }
}
