//! The park handshake between the API and one vCPU thread: the API asks, the thread parks at
//! the top of its loop (out of `KVM_RUN`) and reports its state.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use crate::exit::ExitState;

/// Work a parked vCPU thread runs with its vCPU fd (e.g. saving its state for a snapshot: the
/// fd belongs to the thread, and KVM state is read between two `KVM_RUN`s).
pub(crate) type ParkedTask = Box<dyn FnOnce(&VcpuFd) + Send>;

/// Whether a vCPU thread runs its guest or waits, parked (hot-removed vCPUs: KVM cannot
/// destroy one vCPU, so its thread waits until the vCPU is added again; and every vCPU of a
/// paused VM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuRunState {
    /// In (or about to enter) `KVM_RUN`.
    Running,
    /// Waiting, out of `KVM_RUN`.
    Parked,
    /// The thread has left its loop.
    Exited,
}

/// Why a vCPU should stay parked: each reason is set and cleared on its own.
#[derive(Debug, Default, Clone, Copy)]
struct ParkReasons {
    /// The guest offlined the CPU and the VMM parked it ([`crate::Vm::park_vcpu`]).
    unplugged: bool,
    /// The whole VM is paused ([`crate::Vm::pause`]).
    paused: bool,
}

impl ParkReasons {
    fn any(self) -> bool {
        self.unplugged || self.paused
    }
}

/// Park/unpark handshake between the API and one vCPU thread.
pub(crate) struct VcpuControl {
    wants: Mutex<ParkReasons>,
    state: Mutex<VcpuRunState>,
    /// Tasks for the thread while it is parked ([`VcpuControl::post_task`]).
    tasks: Mutex<Vec<ParkedTask>>,
    cv: Condvar,
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            wants: Mutex::default(),
            state: Mutex::new(VcpuRunState::Running),
            tasks: Mutex::default(),
            cv: Condvar::new(),
        }
    }
}

impl VcpuControl {
    /// Ask the thread to park (`true`: the vCPU was hot-removed) or to run again.
    pub(crate) fn request_unplugged(&self, unplugged: bool) {
        self.wants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unplugged = unplugged;
        self.cv.notify_all();
    }

    /// Ask the thread to park for a VM pause (`true`) or lift that request.
    pub(crate) fn request_paused(&self, paused: bool) {
        self.wants.lock().unwrap_or_else(|p| p.into_inner()).paused = paused;
        self.cv.notify_all();
    }

    /// Give the thread `task` to run with its vCPU fd while it is parked (at once if it is
    /// parked now, else at its next park). A task the thread never runs (it exits first) is
    /// dropped: a task that reports through a channel sees the sender gone.
    pub(crate) fn post_task(&self, task: ParkedTask) {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
        self.cv.notify_all();
    }

    /// Whether the vCPU is hot-removed (parked until it is plugged again).
    pub(crate) fn is_unplugged(&self) -> bool {
        self.wants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unplugged
    }

    /// Whether the vCPU is currently wanted parked for any reason.
    pub(crate) fn wants_parked(&self) -> bool {
        self.wants.lock().unwrap_or_else(|p| p.into_inner()).any()
    }

    /// Record the thread's state (from the vCPU thread).
    pub(crate) fn set_state(&self, s: VcpuRunState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
        self.cv.notify_all();
    }

    /// The thread's state.
    pub(crate) fn state(&self) -> VcpuRunState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until the thread reports `want` (or has exited), at most `timeout`. Returns the
    /// state it has then.
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

    /// On the vCPU thread: park here while asked to, running the posted tasks with `run`;
    /// returns false when the VM stops meanwhile.
    pub(crate) fn park_while_requested(
        &self,
        exit: &ExitState,
        run: &mut dyn FnMut(ParkedTask),
    ) -> bool {
        if !self.wants_parked() {
            return true;
        }
        self.set_state(VcpuRunState::Parked);
        let mut want = self.wants.lock().unwrap_or_else(|p| p.into_inner());
        while want.any() && !exit.stopping() {
            let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
            if !tasks.is_empty() {
                drop(want);
                tasks.into_iter().for_each(&mut *run);
                want = self.wants.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::exit::VmExit;

    /// A vCPU loop without KVM: parks when asked, counts passes, ends when the VM stops.
    fn fake_vcpu(ctl: Arc<VcpuControl>, exit: Arc<ExitState>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            while !exit.stopping() && ctl.park_while_requested(&exit, &mut |_| {}) {
                std::thread::sleep(Duration::from_millis(1));
            }
            ctl.set_state(VcpuRunState::Exited);
        })
    }

    #[test]
    fn unplug_and_pause_park_independently() {
        let (ctl, exit) = (
            Arc::new(VcpuControl::default()),
            Arc::new(ExitState::new().unwrap()),
        );
        let h = fake_vcpu(ctl.clone(), exit.clone());
        let t = Duration::from_secs(5);
        assert_eq!(ctl.state(), VcpuRunState::Running);
        ctl.request_unplugged(true);
        assert_eq!(
            ctl.wait_state(VcpuRunState::Parked, t),
            VcpuRunState::Parked
        );
        // Paused while unplugged, then resumed: still unplugged, so still parked.
        ctl.request_paused(true);
        ctl.request_paused(false);
        assert!(ctl.wants_parked());
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(ctl.state(), VcpuRunState::Parked);
        ctl.request_unplugged(false);
        assert_eq!(
            ctl.wait_state(VcpuRunState::Running, t),
            VcpuRunState::Running
        );
        // A pause alone parks it too.
        ctl.request_paused(true);
        assert_eq!(
            ctl.wait_state(VcpuRunState::Parked, t),
            VcpuRunState::Parked
        );
        // Stopping the VM releases a parked thread, which then exits.
        exit.report(VmExit::Stopped);
        assert_eq!(
            ctl.wait_state(VcpuRunState::Exited, t),
            VcpuRunState::Exited
        );
        h.join().unwrap();
    }

    #[test]
    fn a_parked_thread_runs_posted_tasks_and_stays_parked() {
        let (ctl, exit) = (
            Arc::new(VcpuControl::default()),
            Arc::new(ExitState::new().unwrap()),
        );
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = {
            let (ctl, exit, ran) = (ctl.clone(), exit.clone(), ran.clone());
            std::thread::spawn(move || {
                let mut run = |_task: ParkedTask| {
                    ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                };
                while !exit.stopping() && ctl.park_while_requested(&exit, &mut run) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                ctl.set_state(VcpuRunState::Exited);
            })
        };
        let t = Duration::from_secs(5);
        ctl.request_paused(true);
        assert_eq!(
            ctl.wait_state(VcpuRunState::Parked, t),
            VcpuRunState::Parked
        );
        ctl.post_task(Box::new(|_| {}));
        ctl.post_task(Box::new(|_| {}));
        let end = Instant::now() + t;
        while ran.load(std::sync::atomic::Ordering::SeqCst) < 2 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(ctl.state(), VcpuRunState::Parked);
        exit.report(VmExit::Stopped);
        h.join().unwrap();
    }

    #[test]
    fn wait_state_gives_up_after_the_timeout_and_reports_exited_at_once() {
        let ctl = VcpuControl::default();
        let t0 = Instant::now();
        assert_eq!(
            ctl.wait_state(VcpuRunState::Parked, Duration::from_millis(30)),
            VcpuRunState::Running
        );
        assert!(t0.elapsed() >= Duration::from_millis(30));
        ctl.set_state(VcpuRunState::Exited);
        assert_eq!(
            ctl.wait_state(VcpuRunState::Parked, Duration::from_secs(60)),
            VcpuRunState::Exited
        );
    }
}
