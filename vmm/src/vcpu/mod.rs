//! vCPUs: creation, per-vCPU setup and the `KVM_RUN` exit loop with the emulation assists that
//! a software (nested) KVM needs (docs/nested-kvm.md).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::memory::GuestMem;
use kvm_bindings::{
    kvm_mp_state, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::signal::SIGRTMIN;

use kestrel_devices::Bus;

use crate::error::{kvm_err, VmmError};
use crate::exit::{ExitState, VcpuFault, VmExit};
use crate::metrics::VmCounters;
use crate::pvfpu;

/// Offset from `SIGRTMIN` of the signal that kicks vCPU threads out of `KVM_RUN`.
pub const KICK_SIGNAL_OFFSET: i32 = 2;

/// The kick signal number.
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone makes KVM_RUN return EINTR.
}

/// Install the (empty) kick handler, checked on every [`crate::Vm::start`]: the process-wide
/// disposition of the kick signal must be the default (then Kestrel installs its handler) or
/// Kestrel's own handler. A handler (or `SIG_IGN`) the embedding process installed is never
/// replaced: the start fails with [`VmmError::KickSignalInUse`]. Nothing is cached, so a failed
/// install is reported again on the next call, never as success.
pub(crate) fn install_kick_handler() -> Result<(), VmmError> {
    // Serialises check-and-install between VMs started concurrently.
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let sig = kick_signal();
    let ours = kick_handler as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
        as libc::sighandler_t;
    let sys_err = |what| VmmError::Io {
        what,
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: an all-zero `sigaction` is a valid value of the plain C struct.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a query (null new action) of a valid signal number into a valid out-pointer.
    if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
        return Err(sys_err("reading the vCPU kick signal's disposition"));
    }
    if old.sa_sigaction == ours {
        return Ok(());
    }
    if old.sa_sigaction != libc::SIG_DFL {
        return Err(VmmError::KickSignalInUse {
            signal: sig,
            offset: KICK_SIGNAL_OFFSET,
            current: if old.sa_sigaction == libc::SIG_IGN {
                "SIG_IGN"
            } else {
                "a handler"
            },
        });
    }
    // SAFETY: an all-zero `sigaction` is a valid value of the plain C struct.
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = ours;
    // No SA_RESTART: the point of the kick is that KVM_RUN returns EINTR.
    new.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `new.sa_mask` is a valid sigset_t to initialise.
    unsafe { libc::sigemptyset(&mut new.sa_mask) };
    // SAFETY: installs an async-signal-safe handler (it does nothing) for a real-time signal
    // whose disposition was just checked to be the default.
    if unsafe { libc::sigaction(sig, &new, std::ptr::null_mut()) } != 0 {
        return Err(sys_err("installing the vCPU kick signal handler"));
    }
    Ok(())
}

/// What every vCPU thread shares.
pub(crate) struct VcpuShared {
    pub(crate) mem: GuestMem,
    pub(crate) pio: Bus,
    pub(crate) mmio: Bus,
    pub(crate) exit: Arc<ExitState>,
    pub(crate) counters: Arc<VmCounters>,
    /// vCPU threads still inside their loop.
    pub(crate) running: AtomicUsize,
    /// Set by the boot vCPU right before its first `KVM_RUN`.
    pub(crate) first_run: std::sync::OnceLock<Instant>,
    /// Serve the paravirtual extended-state switch ports (`pvfpu`, software KVM only).
    pub(crate) pvfpu: bool,
}

/// Whether a vCPU thread runs its guest or waits, parked (hot-removed vCPUs: KVM cannot
/// destroy one vCPU, so its thread waits until the vCPU is added again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuRunState {
    /// In (or about to enter) `KVM_RUN`.
    Running,
    /// Waiting, out of `KVM_RUN`.
    Parked,
    /// The thread has left its loop.
    Exited,
}

/// Park/unpark handshake between the API and one vCPU thread.
pub(crate) struct VcpuControl {
    want_parked: Mutex<bool>,
    state: Mutex<VcpuRunState>,
    cv: Condvar,
}

impl VcpuControl {
    pub(crate) fn new(parked: bool) -> Self {
        VcpuControl {
            want_parked: Mutex::new(parked),
            state: Mutex::new(VcpuRunState::Running),
            cv: Condvar::new(),
        }
    }

    pub(crate) fn request(&self, parked: bool) {
        *self.want_parked.lock().unwrap_or_else(|p| p.into_inner()) = parked;
        self.cv.notify_all();
    }

    fn wants_parked(&self) -> bool {
        *self.want_parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_state(&self, s: VcpuRunState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
        self.cv.notify_all();
    }

    pub(crate) fn state(&self) -> VcpuRunState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until the thread reaches `want` (or exits), at most `timeout`.
    pub(crate) fn wait_state(&self, want: VcpuRunState, timeout: Duration) -> VcpuRunState {
        let end = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while *st != want && *st != VcpuRunState::Exited {
            let now = Instant::now();
            if now >= end {
                break;
            }
            st = self
                .cv
                .wait_timeout(st, (end - now).min(Duration::from_millis(10)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *st
    }

    /// Park here while asked to; returns false when the VM stops meanwhile.
    fn park_while_requested(&self, exit: &ExitState) -> bool {
        if !self.wants_parked() {
            return true;
        }
        self.set_state(VcpuRunState::Parked);
        let mut want = self.want_parked.lock().unwrap_or_else(|p| p.into_inner());
        while *want && !exit.stopping() {
            want = self
                .cv
                .wait_timeout(want, Duration::from_millis(20))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(want);
        self.set_state(VcpuRunState::Running);
        !exit.stopping()
    }
}

/// Create vCPU `id` and apply the setup every vCPU needs (CPUID, MSRs, FPU, LAPIC LINTs).
pub(crate) fn create_vcpu(
    kvm: &Kvm,
    vm: &VmFd,
    id: u32,
    max_vcpus: u32,
) -> Result<VcpuFd, VmmError> {
    let fd = vm
        .create_vcpu(u64::from(id))
        .map_err(kvm_err("KVM_CREATE_VCPU"))?;
    // MAX_SUPPORTED_VCPUS (254) keeps both in u8.
    let (id8, max8) = (id as u8, max_vcpus as u8);
    kestrel_arch::cpuid::setup_cpuid(kvm, &fd, id8, max8)
        .map_err(|source| VmmError::Cpuid { vcpu: id, source })?;
    let regs_err = |source| VmmError::Regs { vcpu: id, source };
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
) -> Result<(), VmmError> {
    let regs_err = |source| VmmError::Regs { vcpu: 0, source };
    kestrel_arch::regs::setup_sregs(mem, fd).map_err(regs_err)?;
    kestrel_arch::regs::setup_regs(fd, entry).map_err(regs_err)?;
    Ok(())
}

/// Next step after one exit.
enum Step {
    Continue,
    Exit(VmExit),
    InternalError,
    Again,
    XState(pvfpu::Request),
}

/// One vCPU and its loop.
pub(crate) struct Vcpu {
    pub(crate) id: u32,
    pub(crate) fd: VcpuFd,
    pub(crate) shared: Arc<VcpuShared>,
    pub(crate) ctl: Arc<VcpuControl>,
}

impl Vcpu {
    /// The thread body: run until the VM stops. Never panics on guest behaviour.
    pub(crate) fn run_loop(mut self) {
        // Threads inherit the creator's mask; the kick must get through.
        let _ = vmm_sys_util::signal::unblock_signal(kick_signal());
        let counters = self.shared.counters.clone();
        let shared = self.shared.clone();
        let id = self.id;
        loop {
            if self.shared.exit.stopping() {
                break;
            }
            if !self.ctl.park_while_requested(&self.shared.exit) {
                break;
            }
            self.shared.exit.faults.check_vcpu(self.id);
            if self.id == 0 {
                let _ = self.shared.first_run.set(Instant::now());
            }
            let step = match self.fd.run() {
                Ok(exit) => handle_exit(&shared, id, exit),
                Err(e) if e.errno() == libc::EINTR => {
                    VmCounters::bump(&counters.run_interrupted);
                    Step::Continue
                }
                Err(e) if e.errno() == libc::EAGAIN => Step::Again,
                Err(e) => Step::Exit(VmExit::Failed {
                    vcpu: self.id,
                    fault: VcpuFault::Run { errno: e.errno() },
                }),
            };
            let step = match step {
                Step::InternalError => self.internal_error(),
                Step::Again => self.ap_start_assist(),
                Step::XState(req) => self.xstate_assist(req),
                s => s,
            };
            match step {
                Step::Exit(x) => {
                    self.shared.exit.report(x);
                    break;
                }
                _ => continue,
            }
        }
        self.ctl.set_state(VcpuRunState::Exited);
        self.shared.running.fetch_sub(1, Ordering::SeqCst);
        // Wake the event loop so it sees the count drop.
        let _ = self.shared.exit.wake.write(1);
    }

    /// `KVM_EXIT_INTERNAL_ERROR`: emulation failures of INT3 and FWAIT are assisted
    /// (docs/nested-kvm.md §3); anything else stops the VM naming RIP and the bytes.
    fn internal_error(&mut self) -> Step {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the `internal` member of the
        // kvm_run union is the one KVM filled in.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        if suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            return Step::Exit(VmExit::Failed {
                vcpu: self.id,
                fault: VcpuFault::InternalError { suberror },
            });
        }
        let (rip, bytes) = match self.instruction_bytes() {
            Ok(x) => x,
            Err(fault) => {
                return Step::Exit(VmExit::Failed {
                    vcpu: self.id,
                    fault,
                })
            }
        };
        let fail = |bytes: Vec<u8>| {
            Step::Exit(VmExit::Failed {
                vcpu: self.id,
                fault: VcpuFault::EmulationFailure { rip, bytes },
            })
        };
        match bytes.first() {
            Some(0xcc) => {
                // INT3: skip it and deliver #BP as the CPU would have.
                if self.advance_rip(1).is_err() {
                    return fail(bytes);
                }
                let mut events = match self.fd.get_vcpu_events() {
                    Ok(e) => e,
                    Err(_) => return fail(bytes),
                };
                events.exception.injected = 1;
                events.exception.nr = 3;
                events.exception.has_error_code = 0;
                events.exception.error_code = 0;
                if self.fd.set_vcpu_events(&events).is_err() {
                    return fail(bytes);
                }
                VmCounters::bump(&self.shared.counters.assist_int3);
                Step::Continue
            }
            Some(0x9b) => {
                // FWAIT with no pending x87 exception is a no-op.
                if self.advance_rip(1).is_err() {
                    return fail(bytes);
                }
                VmCounters::bump(&self.shared.counters.assist_fwait);
                Step::Continue
            }
            _ => fail(bytes),
        }
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
        let regs = self
            .fd
            .get_regs()
            .map_err(|e| VcpuFault::Run { errno: e.errno() })?;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(|e| VcpuFault::Run { errno: e.errno() })?;
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
    /// SIPI (docs/nested-kvm.md §6). Start it at the warm-reset vector Linux wrote at 0x467
    /// (offset) / 0x469 (segment) before sending INIT. On hardware KVM the SIPI has already made
    /// the vCPU runnable and this does nothing.
    fn ap_start_assist(&mut self) -> Step {
        let mp = match self.fd.get_mp_state() {
            Ok(m) => m,
            Err(e) => {
                return Step::Exit(VmExit::Failed {
                    vcpu: self.id,
                    fault: VcpuFault::Run { errno: e.errno() },
                })
            }
        };
        if mp.mp_state != KVM_MP_STATE_INIT_RECEIVED {
            return Step::Continue;
        }
        let mem = self.shared.mem.memory();
        let offset = mem.read_obj::<u16>(GuestAddress(0x467));
        let segment = mem.read_obj::<u16>(GuestAddress(0x469));
        let (offset, segment) = match (offset, segment) {
            (Ok(o), Ok(s)) if (o, s) != (0, 0) => (o, s),
            // No vector yet: the guest did not ask for a start; wait for the next event.
            _ => return Step::Continue,
        };
        let fault = |what: &str| {
            Step::Exit(VmExit::Failed {
                vcpu: self.id,
                fault: VcpuFault::ApStart {
                    what: what.to_string(),
                },
            })
        };
        let mut sregs = match self.fd.get_sregs() {
            Ok(s) => s,
            Err(_) => return fault("KVM_GET_SREGS"),
        };
        sregs.cs.selector = segment;
        sregs.cs.base = u64::from(segment) << 4;
        sregs.cs.limit = 0xffff;
        if self.fd.set_sregs(&sregs).is_err() {
            return fault("KVM_SET_SREGS");
        }
        let mut regs = match self.fd.get_regs() {
            Ok(r) => r,
            Err(_) => return fault("KVM_GET_REGS"),
        };
        regs.rip = u64::from(offset);
        if self.fd.set_regs(&regs).is_err() {
            return fault("KVM_SET_REGS");
        }
        if self
            .fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .is_err()
        {
            return fault("KVM_SET_MP_STATE");
        }
        VmCounters::bump(&self.shared.counters.assist_ap_start);
        tracing::debug!("vCPU {} started at {segment:04x}:{offset:04x}", self.id);
        Step::Continue
    }
}

fn handle_exit(s: &VcpuShared, id: u32, exit: VcpuExit<'_>) -> Step {
    match exit {
        VcpuExit::IoIn(port, data) => {
            VmCounters::bump(&s.counters.pio_exits);
            if !s.pio.read(u64::from(port), data) {
                VmCounters::bump(&s.counters.unhandled_accesses);
                tracing::trace!("unhandled port read {port:#x}");
                data.fill(0xff);
            }
            Step::Continue
        }
        VcpuExit::IoOut(port, data) => {
            VmCounters::bump(&s.counters.pio_exits);
            if s.pvfpu {
                if let Some(req) = pvfpu::decode(port, data) {
                    return Step::XState(req);
                }
            }
            if !s.pio.write(u64::from(port), data) {
                VmCounters::bump(&s.counters.unhandled_accesses);
                tracing::trace!("unhandled port write {port:#x}");
            }
            Step::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            VmCounters::bump(&s.counters.mmio_exits);
            if !s.mmio.read(addr, data) {
                VmCounters::bump(&s.counters.unhandled_accesses);
                tracing::trace!("unhandled MMIO read {addr:#x}");
                data.fill(0xff);
            }
            Step::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            VmCounters::bump(&s.counters.mmio_exits);
            if !s.mmio.write(addr, data) {
                VmCounters::bump(&s.counters.unhandled_accesses);
                tracing::trace!("unhandled MMIO write {addr:#x}");
            }
            Step::Continue
        }
        VcpuExit::Intr => {
            VmCounters::bump(&s.counters.run_interrupted);
            Step::Continue
        }
        VcpuExit::Shutdown => Step::Exit(VmExit::TripleFault),
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_RESET => Step::Exit(VmExit::Reset),
            KVM_SYSTEM_EVENT_SHUTDOWN => Step::Exit(VmExit::Shutdown),
            other => Step::Exit(VmExit::Failed {
                vcpu: id,
                fault: VcpuFault::UnexpectedExit {
                    exit: format!("KVM_EXIT_SYSTEM_EVENT type {other}"),
                },
            }),
        },
        VcpuExit::InternalError => Step::InternalError,
        VcpuExit::FailEntry(reason, _) => Step::Exit(VmExit::Failed {
            vcpu: id,
            fault: VcpuFault::FailEntry { reason },
        }),
        other => Step::Exit(VmExit::Failed {
            vcpu: id,
            fault: VcpuFault::UnexpectedExit {
                exit: exit_name(&other),
            },
        }),
    }
}

fn exit_name(exit: &VcpuExit<'_>) -> String {
    match exit {
        VcpuExit::Unknown => "KVM_EXIT_UNKNOWN".into(),
        VcpuExit::Exception => "KVM_EXIT_EXCEPTION".into(),
        VcpuExit::Hypercall(_) => "KVM_EXIT_HYPERCALL".into(),
        VcpuExit::Debug(_) => "KVM_EXIT_DEBUG".into(),
        VcpuExit::Hlt => "KVM_EXIT_HLT".into(),
        VcpuExit::IrqWindowOpen => "KVM_EXIT_IRQ_WINDOW_OPEN".into(),
        VcpuExit::Nmi => "KVM_EXIT_NMI".into(),
        VcpuExit::Unsupported(n) => format!("exit reason {n}"),
        _ => "an unhandled KVM exit".into(),
    }
}
