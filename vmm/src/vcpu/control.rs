//! The park handshake between the API and one vCPU thread: the API asks, the thread parks at
//! the top of its loop (out of `KVM_RUN`) and reports its state.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::exit::ExitState;

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
    cv: Condvar,
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            wants: Mutex::default(),
            state: Mutex::new(VcpuRunState::Running),
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

    /// On the vCPU thread: park here while asked to; returns false when the VM stops
    /// meanwhile.
    pub(crate) fn park_while_requested(&self, exit: &ExitState) -> bool {
        if !self.wants_parked() {
            return true;
        }
        self.set_state(VcpuRunState::Parked);
        let mut want = self.wants.lock().unwrap_or_else(|p| p.into_inner());
        while want.any() && !exit.stopping() {
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
            while !exit.stopping() && ctl.park_while_requested(&exit) {
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
