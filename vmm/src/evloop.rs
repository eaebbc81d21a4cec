//! The VM's event loop: one thread running an `event-manager` loop for every device, console
//! input and control wake-ups. When the VM stops it also kicks the vCPU threads out of
//! `KVM_RUN` until every one has left its loop, so joins never race with kicks.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::timerfd::TimerFd;

use kestrel_devices::legacy::SerialDevice;

use crate::exit::ExitState;
use crate::vcpu::{kick_signal, VcpuShared};

/// pthreads of the vCPU threads whose loop may still run, by vCPU index. Each vCPU thread adds
/// itself when it starts and removes itself (under this lock) right before its thread body
/// returns, so every id in the list belongs to a live thread: kicks are sent under the lock
/// ([`kick_vcpus`]) and can never reach a finished or joined thread.
pub(crate) type VcpuThreads = Arc<Mutex<Vec<(u32, libc::pthread_t)>>>;

/// Send the kick signal to vCPU `only` (or to every vCPU thread): it leaves `KVM_RUN`.
pub(crate) fn kick_vcpus(threads: &Mutex<Vec<(u32, libc::pthread_t)>>, only: Option<u32>) {
    let threads = threads.lock().unwrap_or_else(|p| p.into_inner());
    for (id, t) in threads.iter() {
        if only.is_none_or(|o| o == *id) {
            // SAFETY: the thread is live: it removes itself from the list under this lock
            // before its body returns (see `VcpuThreads`).
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }
}

/// Subscribers are shared with the VM object (which may inspect them).
pub(crate) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

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
        } else {
            let mut buf = [0u8; 256];
            // SAFETY: `self.input` is a valid fd for the life of the subscriber; ManuallyDrop
            // keeps the File from closing it.
            let mut f = std::mem::ManuallyDrop::new(unsafe {
                <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(self.input)
            });
            match f.read(&mut buf) {
                Ok(0) => {
                    // End of input: stop watching it for good.
                    self.set_input_watch(ops, false);
                    return;
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::warn!("console input: {e}; no longer forwarding input");
                    self.set_input_watch(ops, false);
                    return;
                }
            }
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

/// The loop thread's body.
pub(crate) fn run(
    mut em: EventManager<Subscriber>,
    exit: Arc<ExitState>,
    vcpus: Arc<VcpuShared>,
    vcpu_threads: VcpuThreads,
) {
    loop {
        let timeout = if exit.stopping() { 2 } else { -1 };
        if let Err(e) = em.run_with_timeout(timeout) {
            tracing::error!("event loop: {e:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
        if exit.stopping() {
            if vcpus.running.load(Ordering::SeqCst) == 0 {
                break;
            }
            kick_vcpus(&vcpu_threads, None);
        }
    }
}

/// After the loop itself panicked (the VM is stopping): keep kicking the vCPU threads until
/// all have left their loops, as the loop would have, for at most `limit`.
pub(crate) fn kick_until_stopped(vcpus: &VcpuShared, vcpu_threads: &VcpuThreads, limit: Duration) {
    let end = std::time::Instant::now() + limit;
    while vcpus.running.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < end {
        kick_vcpus(vcpu_threads, None);
        std::thread::sleep(Duration::from_millis(2));
    }
}
