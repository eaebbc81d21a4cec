//! Kicking vCPU threads out of `KVM_RUN`: the kick signal, its (empty) handler, and the list of
//! vCPU threads a kick may reach.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::SIGRTMIN;

use super::VcpuError;
use crate::evloop::Quiesce;

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
/// replaced: the start fails with [`VcpuError::KickSignalInUse`]. Nothing is cached, so a
/// failed install is reported again on the next call, never as success.
pub(crate) fn install_kick_handler() -> Result<(), VcpuError> {
    // Serialises check-and-install between VMs started concurrently.
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let sig = kick_signal();
    let ours = kick_handler as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
        as libc::sighandler_t;
    let sys_err = |what| VcpuError::Signal {
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
        return Err(VcpuError::KickSignalInUse {
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

/// The vCPU threads of one VM as kicks see them.
///
/// `running` counts threads still inside their loop (incremented before a thread is spawned,
/// decremented when it leaves its loop). `pthreads` holds the threads whose loop may still
/// run, by vCPU index: each vCPU thread adds itself when it starts and removes itself (under
/// this lock) right before its thread body returns, so every id in the list belongs to a live
/// thread. Kicks are sent under the lock and can never reach a finished or joined thread.
#[derive(Default)]
pub(crate) struct VcpuThreads {
    running: AtomicUsize,
    pthreads: Mutex<Vec<(u32, libc::pthread_t)>>,
}

impl VcpuThreads {
    /// A thread for vCPU `id` is about to be spawned (it counts as running from now on).
    pub(crate) fn starting(&self) {
        self.running.fetch_add(1, Ordering::SeqCst);
    }

    /// A thread counted by [`VcpuThreads::starting`] left its loop, or never started.
    pub(crate) fn left_loop(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
    }

    /// vCPU threads still inside their loop.
    pub(crate) fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Called on the vCPU thread itself: kicks for vCPU `id` reach this thread from now on.
    pub(crate) fn register_current(&self, id: u32) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().push((id, me));
    }

    /// Called on the vCPU thread itself, last thing: no kick may target it from now on.
    pub(crate) fn unregister(&self, id: u32) {
        self.lock().retain(|(i, _)| *i != id);
    }

    /// Send the kick signal to vCPU `only` (or to every vCPU thread): it leaves `KVM_RUN`.
    pub(crate) fn kick(&self, only: Option<u32>) {
        let threads = self.lock();
        for (id, t) in threads.iter() {
            if only.is_none_or(|o| o == *id) {
                // SAFETY: the thread is live: it removes itself from the list under this lock
                // before its body returns (see `VcpuThreads`).
                unsafe { libc::pthread_kill(*t, kick_signal()) };
            }
        }
    }

    /// Kick every vCPU thread until all have left their loops, for at most `limit`.
    pub(crate) fn kick_until_stopped(&self, limit: Duration) {
        let end = Instant::now() + limit;
        while self.running() > 0 && Instant::now() < end {
            self.kick(None);
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u32, libc::pthread_t)>> {
        self.pthreads.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The event loop serves devices until the vCPUs have left; each time it asks, threads still
/// in `KVM_RUN` are kicked (a kick can land just before a thread enters `KVM_RUN`, so it is
/// repeated until the count drops).
impl Quiesce for VcpuThreads {
    fn quiesced(&self) -> bool {
        if self.running() == 0 {
            return true;
        }
        self.kick(None);
        false
    }

    fn wait_quiesced(&self, limit: Duration) {
        self.kick_until_stopped(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kick_disposition() -> libc::sighandler_t {
        // SAFETY: an all-zero `sigaction` is a valid value of the plain C struct.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a query (null new action) into a valid out-pointer.
        let r = unsafe { libc::sigaction(kick_signal(), std::ptr::null(), &mut old) };
        assert_eq!(r, 0);
        old.sa_sigaction
    }

    fn set_kick_disposition(h: libc::sighandler_t) {
        // SAFETY: sets the disposition of a real-time signal nothing else in this test binary
        // uses (no test here starts a VM); `h` is SIG_DFL, SIG_IGN or a valid handler.
        unsafe { libc::signal(kick_signal(), h) };
    }

    /// Process-global: the only test of this binary that touches the kick signal's
    /// disposition (the kick test below only sends it to a thread that blocks it).
    #[test]
    fn kick_handler_never_replaces_the_embedders_and_a_failure_is_reported_every_time() {
        extern "C" fn embedders_handler(_: libc::c_int) {}
        let embedders = embedders_handler as extern "C" fn(libc::c_int) as libc::sighandler_t;
        set_kick_disposition(embedders);
        for _ in 0..3 {
            match install_kick_handler() {
                Err(e @ VcpuError::KickSignalInUse { .. }) => {
                    let VcpuError::KickSignalInUse {
                        signal, current, ..
                    } = &e
                    else {
                        unreachable!()
                    };
                    assert_eq!((*signal, *current), (kick_signal(), "a handler"));
                    assert!(e.to_string().contains("SIGRTMIN+2"), "{e}");
                }
                other => panic!("expected KickSignalInUse, got {other:?}"),
            }
            assert_eq!(
                kick_disposition(),
                embedders,
                "the embedder's handler stays"
            );
        }
        set_kick_disposition(libc::SIG_IGN);
        assert!(matches!(
            install_kick_handler(),
            Err(VcpuError::KickSignalInUse {
                current: "SIG_IGN",
                ..
            })
        ));
        assert_eq!(kick_disposition(), libc::SIG_IGN);
        // Free again: installed, and installing again is a no-op success.
        set_kick_disposition(libc::SIG_DFL);
        install_kick_handler().unwrap();
        let ours = kick_disposition();
        assert_ne!(ours, libc::SIG_DFL);
        install_kick_handler().unwrap();
        assert_eq!(kick_disposition(), ours);
        set_kick_disposition(libc::SIG_DFL);
    }

    #[test]
    fn kicks_reach_registered_threads_only_and_quiesce_follows_the_running_count() {
        let threads = std::sync::Arc::new(VcpuThreads::default());
        assert!(threads.quiesced(), "no thread: quiesced at once");
        threads.starting();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = threads.clone();
        let h = std::thread::spawn(move || {
            // Block the kick here: a pending signal proves the kick arrived, and no handler
            // (process-global) is needed for it.
            let mut set: libc::sigset_t =
                // SAFETY: an all-zero sigset_t is a valid value to initialise.
                unsafe { std::mem::zeroed() };
            // SAFETY: valid sigset_t pointers; blocks a real-time signal on this thread only.
            unsafe {
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, kick_signal());
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            t.register_current(7);
            tx.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let pending = loop {
                // SAFETY: an all-zero sigset_t is a valid out-value.
                let mut p: libc::sigset_t = unsafe { std::mem::zeroed() };
                // SAFETY: valid out-pointer.
                unsafe { libc::sigpending(&mut p) };
                // SAFETY: `p` was filled by sigpending.
                if unsafe { libc::sigismember(&p, kick_signal()) } == 1 {
                    break true;
                }
                if Instant::now() > deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            t.unregister(7);
            t.left_loop();
            pending
        });
        rx.recv().unwrap();
        threads.kick(Some(8)); // nobody
        assert!(!threads.quiesced(), "one thread runs: kicked, not quiesced");
        assert!(h.join().unwrap(), "the kick reached vCPU 7's thread");
        assert_eq!(threads.running(), 0);
        assert!(threads.quiesced());
        threads.kick(None); // the list is empty: no signal goes anywhere
    }
}
