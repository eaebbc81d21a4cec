//! The VM's event loop: one thread running an `event-manager` loop for every device, console
//! input and control wake-ups.
//!
//! The loop knows nothing of vCPUs. When the VM stops it goes on serving devices (console
//! output, requests in flight) until the owner of the other threads says they have left
//! ([`Quiesce`]): the loop only asks, the vCPU manager decides and acts (it kicks its threads
//! out of `KVM_RUN`).

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use thiserror::Error;
use vmm_sys_util::timerfd::TimerFd;

use kestrel_devices::legacy::SerialDevice;

use crate::exit::{ExitState, VmExit};
use crate::seccomp::FilterClass;
use crate::threads::{self, Ready, SpawnError, ThreadEnv, ThreadKind, STOP_JOIN_TIMEOUT};

/// Subscribers are shared with the VM object (which may inspect them).
pub(crate) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Why the event loop could not start.
#[derive(Debug, Error)]
pub enum EventLoopError {
    /// The epoll instance could not be created.
    #[error("event loop: {0:?}")]
    EventManager(event_manager::Error),
    /// A timer or eventfd of the console could not be created.
    #[error("{what}: {source}")]
    Console {
        /// What was being created.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The loop's thread could not be spawned.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
}

/// The threads the loop waits for once the VM is stopping.
pub(crate) trait Quiesce: Send + Sync {
    /// Whether every thread the loop waits for has left; asked on every pass (about every
    /// 2 ms) once the VM is stopping. The implementer may act on each call (kick threads).
    fn quiesced(&self) -> bool;

    /// After the loop itself failed: do what the loop's passes would have done until the
    /// threads have left, for at most `limit`.
    fn wait_quiesced(&self, limit: Duration);
}

/// The loop's own wake-up event: drained; stopping is read from [`ExitState`].
pub(crate) struct Control {
    pub(crate) exit: Arc<ExitState>,
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.exit.wake, EventSet::IN)) {
            tracing::error!("event loop: cannot watch the control event: {e:?}");
        }
    }
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.exit.wake.read();
        self.exit.faults.run_evloop_task();
        self.exit.faults.check_evloop();
    }
}

/// Forwards a host fd (standard input) to the serial port, holding back what the UART's
/// 64-byte FIFO cannot take and retrying on a timer instead of spinning.
pub(crate) struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    input: RawFd,
    pending: Vec<u8>,
    timer: TimerFd,
    watching_input: bool,
}

impl ConsoleInput {
    /// Forward `input` (a readable fd that outlives the subscriber) to `serial`.
    pub(crate) fn new(serial: Arc<Mutex<SerialDevice>>, input: RawFd) -> std::io::Result<Self> {
        Ok(ConsoleInput {
            serial,
            input,
            pending: Vec::new(),
            timer: TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?,
            watching_input: false,
        })
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut s = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let n = s.enqueue_input(&self.pending);
        self.pending.drain(..n);
    }

    fn set_input_watch(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.watching_input {
            return;
        }
        let ev = Events::new_raw(self.input, EventSet::IN);
        let r = if on { ops.add(ev) } else { ops.remove(ev) };
        if let Err(e) = r {
            tracing::warn!("console input: cannot change watch: {e:?}");
        }
        self.watching_input = on;
    }

    /// Read what the input has into `pending`. False at its end or on an error: stop
    /// watching it for good.
    fn read_input(&mut self) -> bool {
        let mut buf = [0u8; 256];
        // SAFETY: `self.input` is a valid fd for the life of the subscriber; ManuallyDrop
        // keeps the File from closing it.
        let mut f = std::mem::ManuallyDrop::new(unsafe {
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(self.input)
        });
        match f.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            Err(e) => {
                tracing::warn!("console input: {e}; no longer forwarding input");
                false
            }
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        self.set_input_watch(ops, true);
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            tracing::warn!("console input: cannot watch the retry timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
        } else if !self.read_input() {
            self.set_input_watch(ops, false);
            return;
        }
        self.flush();
        if self.pending.is_empty() {
            self.set_input_watch(ops, true);
        } else {
            // FIFO full: stop reading input until the guest drains it.
            self.set_input_watch(ops, false);
            let _ = self.timer.reset(Duration::from_millis(10), None);
        }
    }
}

/// Holds the loop between two passes while the VM is paused: no device handler runs (no
/// queue processing, no TAP or vsock socket read, no rate-limiter timer), so guest memory and
/// the devices' state do not change under a snapshot. What a device had in flight completed
/// in the pass before; what arrives meanwhile (packets, connections) waits in the host kernel.
#[derive(Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    /// A pause asked the loop to stop between passes.
    closed: bool,
    /// The loop is held.
    held: bool,
}

/// How often a held loop looks whether the VM is stopping.
const GATE_POLL: Duration = Duration::from_millis(50);

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// On the loop's thread, between passes: wait while the gate is closed (and the VM is not
    /// stopping).
    fn hold(&self, exit: &ExitState) {
        let mut g = self.lock();
        if !g.closed || exit.stopping() {
            return;
        }
        g.held = true;
        self.cv.notify_all();
        while g.closed && !exit.stopping() {
            g = self
                .cv
                .wait_timeout(g, GATE_POLL)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
        g.held = false;
        self.cv.notify_all();
    }

    /// Close the gate and wake the loop (`wake` is its control event); returns whether the
    /// loop is held within `timeout` (it ends its current pass first).
    pub(crate) fn close(&self, wake: &vmm_sys_util::eventfd::EventFd, timeout: Duration) -> bool {
        let mut g = self.lock();
        g.closed = true;
        if g.held {
            return true;
        }
        if let Err(e) = wake.write(1) {
            tracing::warn!("event loop: cannot wake it to pause: {e}");
        }
        let deadline = Instant::now() + timeout;
        while !g.held {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
        true
    }

    /// Open the gate: the loop goes on with its next pass.
    pub(crate) fn open(&self) {
        self.lock().closed = false;
        self.cv.notify_all();
    }
}

/// The loop thread's body: serve events until the VM stops and `others` have left; between
/// passes wait while `gate` is closed.
pub(crate) fn run(
    mut em: EventManager<Subscriber>,
    exit: &ExitState,
    others: &dyn Quiesce,
    gate: &Gate,
) {
    loop {
        gate.hold(exit);
        let timeout = if exit.stopping() { 2 } else { -1 };
        if let Err(e) = em.run_with_timeout(timeout) {
            tracing::error!("event loop: {e:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
        if exit.stopping() && others.quiesced() {
            break;
        }
    }
}

/// The serial console as the loop serves it: its output always, standard input when
/// forwarded.
pub(crate) struct Console {
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) forward_stdin: bool,
}

/// The event loop of one VM: the subscribers it will serve, then its thread.
pub(crate) struct EventLoop {
    subscribers: Mutex<Vec<Subscriber>>,
    /// Held closed while the VM is paused.
    pub(crate) gate: Arc<Gate>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl EventLoop {
    /// A loop that will serve `subscribers` (the devices) once started.
    pub(crate) fn new(subscribers: Vec<Subscriber>) -> Self {
        EventLoop {
            subscribers: Mutex::new(subscribers),
            gate: Arc::default(),
            handle: Mutex::new(None),
        }
    }

    /// Build the loop (control event, devices, console) and start its thread. The thread
    /// reports its seccomp filter on `ready`. When the loop itself panics the VM stops with
    /// [`VmExit::ThreadPanicked`] and the thread goes on with `others` as its passes would.
    pub(crate) fn start(
        &self,
        exit: &Arc<ExitState>,
        console: &Console,
        others: Arc<dyn Quiesce>,
        env: &Arc<ThreadEnv>,
        ready: Ready,
    ) -> Result<(), EventLoopError> {
        let em = self.build(exit, console)?;
        let name = env.thread_name("evloop");
        let exit = exit.clone();
        let gate = self.gate.clone();
        let body = move |filtered: bool| {
            if !filtered {
                // start() fails and stops the VM.
                return;
            }
            let r = kestrel_devices::catch_panic(|| run(em, &exit, others.as_ref(), &gate));
            if let Err(panic) = r {
                exit.report(VmExit::ThreadPanicked {
                    thread: name,
                    message: panic.0,
                });
                others.wait_quiesced(STOP_JOIN_TIMEOUT);
            }
        };
        let h = threads::spawn(
            env,
            "evloop",
            ThreadKind::EventLoop,
            FilterClass::EventLoop,
            ready,
            body,
        )?;
        *self.handle.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        Ok(())
    }

    fn build(
        &self,
        exit: &Arc<ExitState>,
        console: &Console,
    ) -> Result<EventManager<Subscriber>, EventLoopError> {
        let mut em = EventManager::<Subscriber>::new().map_err(EventLoopError::EventManager)?;
        em.add_subscriber(Arc::new(Mutex::new(Control { exit: exit.clone() })));
        let subscribers =
            std::mem::take(&mut *self.subscribers.lock().unwrap_or_else(|p| p.into_inner()));
        for sub in subscribers {
            em.add_subscriber(sub);
        }
        // Serial output is queued by the vCPUs and written to the console by the loop.
        let out = console
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_output()
            .map_err(|source| EventLoopError::Console {
                what: "creating the serial output drainer",
                source,
            })?;
        if let Some(out) = out {
            em.add_subscriber(Arc::new(Mutex::new(out)));
        }
        if console.forward_stdin {
            let input = ConsoleInput::new(console.serial.clone(), libc::STDIN_FILENO).map_err(
                |source| EventLoopError::Console {
                    what: "creating the console input timer",
                    source,
                },
            )?;
            em.add_subscriber(Arc::new(Mutex::new(input)));
        }
        Ok(em)
    }

    /// Whether the loop's thread has finished (or never started).
    pub(crate) fn finished(&self) -> bool {
        self.handle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_none_or(|h| h.is_finished())
    }

    /// Join the loop's thread if it finished; otherwise detach it and log.
    pub(crate) fn join_or_detach(&self, vm: &str, waited: Duration) {
        if let Some(h) = self.handle.lock().unwrap_or_else(|p| p.into_inner()).take() {
            threads::join_or_detach(h, vm, "event-loop", waited);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use kestrel_devices::BusDevice;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    fn pipe() -> (OwnedFd, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid out-array of two ints.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just created and are owned here.
        unsafe {
            (
                OwnedFd::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }

    fn serial() -> Arc<Mutex<SerialDevice>> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Arc::new(Mutex::new(SerialDevice::new(
            irq,
            Box::new(std::io::sink()),
        )))
    }

    /// What the guest reads from the UART's receive buffer, `n` bytes.
    fn guest_reads(serial: &Mutex<SerialDevice>, n: usize) -> Vec<u8> {
        let mut s = serial.lock().unwrap();
        (0..n)
            .map(|_| {
                let mut b = [0u8];
                s.read(0, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn console_input_fills_the_fifo_holds_the_rest_and_retries_on_its_timer() {
        use std::io::Write;
        let (read_end, mut write_end) = pipe();
        let serial = serial();
        let input = ConsoleInput::new(serial.clone(), read_end.as_raw_fd()).unwrap();
        let mut em = EventManager::<Subscriber>::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(input)));
        let space = || serial.lock().unwrap().input_space();
        assert_eq!(space(), 64);

        write_end.write_all(b"0123456789").unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(space(), 54);
        assert_eq!(guest_reads(&serial, 10), b"0123456789");

        // 100 bytes: 64 fit, 36 wait for the guest (input is not read meanwhile).
        let msg: Vec<u8> = (0..100u8).collect();
        write_end.write_all(&msg).unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(space(), 0);
        write_end.write_all(b"later").unwrap();
        assert_eq!(guest_reads(&serial, 64), &msg[..64]);
        // The retry timer (10 ms) moves the rest; then the input is watched again.
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(space(), 64 - 36);
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(guest_reads(&serial, 41), [&msg[64..], b"later"].concat());

        // End of input: no longer watched, so the loop does not spin on it.
        drop(write_end);
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(em.run_with_timeout(50).unwrap(), 0);
        assert_eq!(space(), 64);
    }

    /// Counts how often it was asked; quiesced from the third time on.
    #[derive(Default)]
    struct Others(AtomicUsize);

    impl Quiesce for Others {
        fn quiesced(&self) -> bool {
            self.0.fetch_add(1, Ordering::SeqCst) >= 2
        }
        fn wait_quiesced(&self, _: Duration) {}
    }

    #[test]
    fn the_loop_ends_only_once_stopping_and_the_others_have_left() {
        let exit = Arc::new(ExitState::new().unwrap());
        let mut em = EventManager::<Subscriber>::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(Control { exit: exit.clone() })));
        let others = Arc::new(Others::default());
        let (e, o) = (exit.clone(), others.clone());
        let h = std::thread::spawn(move || run(em, &e, o.as_ref(), &Gate::default()));
        // A wake-up without a stop is served, and the others are not asked.
        exit.wake.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!h.is_finished());
        assert_eq!(others.0.load(Ordering::SeqCst), 0);
        exit.report(VmExit::Stopped);
        h.join().unwrap();
        assert_eq!(others.0.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_task_handed_to_the_loop_runs_on_its_next_pass() {
        let exit = Arc::new(ExitState::new().unwrap());
        let c = Control { exit: exit.clone() };
        let mut em = EventManager::<Subscriber>::new().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        exit.faults
            .set_evloop_task(crate::exit::EvloopTask(Box::new(move || {
                tx.send(7).unwrap()
            })));
        exit.wake.write(1).unwrap();
        em.add_subscriber(Arc::new(Mutex::new(c)));
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(rx.try_recv(), Ok(7));
        assert!(exit.wake.read().is_err(), "the wake-up was drained");
    }
}
