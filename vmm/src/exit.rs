//! How a VM stopped, and the shared state that records it.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

/// Why a vCPU stopped the VM with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuFault {
    /// KVM could not emulate an instruction and Kestrel has no assist for it.
    EmulationFailure {
        /// Guest RIP (linear address of the instruction).
        rip: u64,
        /// Up to 15 instruction bytes read from guest memory (empty if unreadable).
        bytes: Vec<u8>,
    },
    /// `KVM_EXIT_INTERNAL_ERROR` with another sub-error.
    InternalError {
        /// The sub-error code.
        suberror: u32,
    },
    /// `KVM_EXIT_FAIL_ENTRY`.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// `KVM_RUN` returned an error.
    Run {
        /// The errno.
        errno: i32,
    },
    /// An exit Kestrel does not handle.
    UnexpectedExit {
        /// Name of the exit.
        exit: String,
    },
    /// The guest's vCPU setup for an AP start failed.
    ApStart {
        /// What failed.
        what: String,
    },
}

/// How a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset (i8042 `0xfe`, or a KVM reset system event): the normal way a
    /// Linux guest without ACPI reboots or powers off with `reboot=k`.
    Reset,
    /// The guest powered off (a KVM shutdown system event).
    Shutdown,
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault,
    /// The VM was stopped through the API.
    Stopped,
    /// A vCPU or event-loop thread panicked (a Kestrel bug): the panic was contained at the
    /// thread's boundary and the VM was stopped.
    ThreadPanicked {
        /// The thread's full name (`kestrel-<vm>-vcpu<N>`, `kestrel-<vm>-evloop`).
        thread: String,
        /// The panic message.
        message: String,
    },
    /// A vCPU failed.
    Failed {
        /// Which vCPU.
        vcpu: u32,
        /// What happened.
        fault: VcpuFault,
    },
}

impl VmExit {
    /// Whether this is a clean guest-initiated stop or an API stop.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::Reset | VmExit::Shutdown | VmExit::Stopped)
    }
}

impl fmt::Display for VcpuFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VcpuFault::EmulationFailure { rip, bytes } => {
                write!(f, "emulation failure at RIP {rip:#x}, instruction bytes [")?;
                for (i, b) in bytes.iter().enumerate() {
                    if i > 0 {
                        write!(f, " ")?;
                    }
                    write!(f, "{b:02x}")?;
                }
                write!(f, "]")
            }
            VcpuFault::InternalError { suberror } => {
                write!(f, "KVM internal error, suberror {suberror}")
            }
            VcpuFault::FailEntry { reason } => {
                write!(f, "KVM entry failure, hardware reason {reason:#x}")
            }
            VcpuFault::Run { errno } => write!(
                f,
                "KVM_RUN failed: {}",
                std::io::Error::from_raw_os_error(*errno)
            ),
            VcpuFault::UnexpectedExit { exit } => write!(f, "unexpected exit {exit}"),
            VcpuFault::ApStart { what } => write!(f, "AP start assist failed: {what}"),
        }
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::Reset => write!(f, "guest reset"),
            VmExit::Shutdown => write!(f, "guest power-off"),
            VmExit::TripleFault => write!(f, "guest triple fault (KVM_EXIT_SHUTDOWN)"),
            VmExit::Stopped => write!(f, "stopped by the API"),
            VmExit::ThreadPanicked { thread, message } => {
                write!(f, "thread {thread} panicked: {message}")
            }
            VmExit::Failed { vcpu, fault } => write!(f, "vCPU {vcpu}: {fault}"),
        }
    }
}

/// Where [`crate::Vm::inject_panic`] raises a test panic.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThreadClass {
    /// The thread of vCPU `N`, between two `KVM_RUN`s.
    Vcpu(u32),
    /// The event-loop thread, outside any device handler.
    EventLoop,
    /// The event handler of the virtio device with this id (drive id, iface id, `vsock`,
    /// `fs<N>`), on the event-loop thread.
    Device(String),
    /// A worker thread of the in-process virtio-fs device `fs<N>` (one with
    /// `worker_threads`).
    FsWorker(String),
}

/// Test-only panic injection of one VM (per VM: no process-global state). Costs one relaxed
/// atomic load per vCPU loop pass and per control event.
#[derive(Debug)]
pub(crate) struct FaultInjector {
    /// vCPU index to panic, or -1.
    vcpu: AtomicI64,
    evloop: AtomicBool,
    /// Test-only: run once on the event-loop thread ([`crate::Vm::run_on_event_loop`]).
    evloop_task: Mutex<Option<EvloopTask>>,
}

/// Work handed to the event-loop thread by a test.
pub(crate) struct EvloopTask(pub(crate) Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for EvloopTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EvloopTask")
    }
}

impl Default for FaultInjector {
    fn default() -> Self {
        FaultInjector {
            vcpu: AtomicI64::new(-1),
            evloop: AtomicBool::new(false),
            evloop_task: Mutex::new(None),
        }
    }
}

impl FaultInjector {
    pub(crate) fn arm_vcpu(&self, id: u32) {
        self.vcpu.store(i64::from(id), Ordering::SeqCst);
    }

    pub(crate) fn arm_evloop(&self) {
        self.evloop.store(true, Ordering::SeqCst);
    }

    /// Panic on vCPU `id` if armed for it (once).
    pub(crate) fn check_vcpu(&self, id: u32) {
        if self.vcpu.load(Ordering::Relaxed) == i64::from(id)
            && self
                .vcpu
                .compare_exchange(i64::from(id), -1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            panic!("injected panic on vCPU {id}");
        }
    }

    pub(crate) fn set_evloop_task(&self, task: EvloopTask) {
        *self.evloop_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    /// Run the test task handed to the event loop, if any (on the event-loop thread).
    pub(crate) fn run_evloop_task(&self) {
        let task = self
            .evloop_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task {
            (task.0)();
        }
    }

    /// Panic on the event loop if armed (once).
    pub(crate) fn check_evloop(&self) {
        if self.evloop.load(Ordering::Relaxed) && self.evloop.swap(false, Ordering::SeqCst) {
            panic!("injected panic on the event loop");
        }
    }
}

/// The first exit reason wins; everyone who waits sees it. Setting it also raises `stop` and
/// wakes the event loop, which kicks the vCPU threads out of `KVM_RUN`.
pub(crate) struct ExitState {
    reason: Mutex<Option<VmExit>>,
    cv: Condvar,
    stop: AtomicBool,
    /// Wakes the event-loop thread.
    pub(crate) wake: EventFd,
    /// Test-only panic injection ([`crate::Vm::inject_panic`]).
    pub(crate) faults: FaultInjector,
}

impl ExitState {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(ExitState {
            reason: Mutex::new(None),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            faults: FaultInjector::default(),
        })
    }

    /// Record `exit` unless a reason is already recorded; start stopping the VM.
    pub(crate) fn report(&self, exit: VmExit) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            tracing::info!("VM exit: {exit}");
            *r = Some(exit);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.cv.notify_all();
        drop(r);
        // The event loop kicks the vCPUs; a failed write only means the loop is gone already.
        let _ = self.wake.write(1);
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub(crate) fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Block until a reason is recorded, at most `timeout` if given.
    pub(crate) fn wait(&self, timeout: Option<Duration>) -> Option<VmExit> {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        while r.is_none() {
            match deadline {
                None => r = self.cv.wait(r).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return None;
                    }
                    r = self
                        .cv
                        .wait_timeout(r, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        r.clone()
    }
}

/// The i8042's reset line: records [`VmExit::Reset`].
pub(crate) struct ResetTrigger(pub(crate) std::sync::Arc<ExitState>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.report(VmExit::Reset);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let e = ExitState::new().unwrap();
        assert_eq!(e.wait(Some(Duration::from_millis(1))), None);
        assert!(!e.stopping());
        e.report(VmExit::Reset);
        e.report(VmExit::Stopped);
        assert_eq!(e.wait(None), Some(VmExit::Reset));
        assert!(e.stopping());
        assert_eq!(e.wake.read().unwrap(), 2);
    }

    #[test]
    fn thread_panic_is_not_clean_and_names_thread_and_message() {
        let x = VmExit::ThreadPanicked {
            thread: "kestrel-vm-evloop".into(),
            message: "boom".into(),
        };
        assert!(!x.is_clean());
        assert_eq!(x.to_string(), "thread kestrel-vm-evloop panicked: boom");
    }

    #[test]
    fn injected_panics_fire_once_where_armed() {
        let f = FaultInjector::default();
        f.check_vcpu(0);
        f.check_evloop();
        f.arm_vcpu(1);
        f.check_vcpu(0);
        let r = std::panic::catch_unwind(|| f.check_vcpu(1));
        assert!(r.is_err());
        f.check_vcpu(1);
        f.arm_evloop();
        assert!(std::panic::catch_unwind(|| f.check_evloop()).is_err());
        f.check_evloop();
    }

    #[test]
    fn fault_display_names_rip_and_bytes() {
        let x = VmExit::Failed {
            vcpu: 1,
            fault: VcpuFault::EmulationFailure {
                rip: 0x100000,
                bytes: vec![0x0f, 0x01, 0xca],
            },
        };
        assert_eq!(
            x.to_string(),
            "vCPU 1: emulation failure at RIP 0x100000, instruction bytes [0f 01 ca]"
        );
    }
}
