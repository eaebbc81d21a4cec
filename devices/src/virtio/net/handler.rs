//! The network device's queue handler: runs the two data paths ([`super::rx`],
//! [`super::tx`]) on the event loop and keeps the loop's watch on the backend in line with what
//! the device waits for.

use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use super::rx::Rx;
use super::tx::{Tx, TxRun, TxStop};
use super::{NetDevice, RX_QUEUE, TX_QUEUE};
use crate::virtio::common::watch_events;
use crate::virtio::device::{own_events, own_events_raw, QueueHandler, Trigger, VirtioCore};

/// Token of the backend's descriptor.
const BACKEND: u32 = 0;
/// Token of the RX limiter's timer.
const RX_LIMITER: u32 = 1;
/// Token of the TX limiter's timer.
const TX_LIMITER: u32 = 2;

/// What one run of the data paths did.
#[derive(Debug, Default)]
struct Pass {
    /// Chains were used on the RX / TX queue.
    used: [bool; 2],
    /// A ring is broken: why.
    ring_error: Option<String>,
    /// The backend failed for good.
    backend_failed: bool,
    /// TX stopped at its batch limit: come back through the event loop.
    rearm_tx: bool,
}

impl NetDevice {
    /// Work the queues (TX first when both: it frees guest memory the driver may reuse for
    /// RX), then raise at most one used-ring interrupt.
    pub(super) fn run(&mut self, core: &mut VirtioCore, do_rx: bool, do_tx: bool) {
        if core.is_failed() {
            return;
        }
        let acked = core.acked_features();
        let Some(active) = core.active_mut() else {
            return;
        };
        let mem = active.mem.memory();
        let [rxq, txq] = active.queues.as_mut_slice() else {
            return;
        };
        let pass = self.work(&mem, rxq, txq, acked, (do_rx, do_tx));
        let mut notify = false;
        for (q, queue) in [(RX_QUEUE, &mut *rxq), (TX_QUEUE, &mut *txq)] {
            if pass.used[q] {
                // On an error, still tell the guest about what completed.
                notify |= queue.needs_notification(&*mem).unwrap_or(true);
            }
        }
        if notify {
            active.interrupt.signal_used_queue();
            self.metrics.interrupts += 1;
        }
        drop(mem);
        self.finish(core, pass);
    }

    /// Run the paths asked for (`(rx, tx)`), TX first; a ring error ends the pass.
    fn work(
        &mut self,
        mem: &GuestMemoryMmap,
        rxq: &mut Queue,
        txq: &mut Queue,
        acked: u64,
        (do_rx, do_tx): (bool, bool),
    ) -> Pass {
        let mut pass = Pass::default();
        let link = self.link_up;
        if do_tx && !self.tx_backend_full {
            let mut tx = Tx {
                mem,
                queue: txq,
                backend: self.backend.as_deref_mut().filter(|_| link),
                limiter: &mut self.tx_limiter,
                acked,
                metrics: &mut self.metrics,
            };
            match tx.run() {
                Ok(r) => self.tx_done(&r, &mut pass),
                Err(e) => {
                    pass.ring_error = Some(format!("tx queue: {e}"));
                    return pass;
                }
            }
        }
        if do_rx && link {
            let mut rx = Rx {
                mem,
                queue: rxq,
                backend: self.backend.as_deref_mut(),
                limiter: &mut self.rx_limiter,
                state: &mut self.rx,
                acked,
                metrics: &mut self.metrics,
            };
            match rx.run() {
                Ok(r) => (pass.used[RX_QUEUE], pass.backend_failed) = (r.used, r.backend_failed),
                Err(e) => pass.ring_error = Some(format!("rx queue: {e}")),
            }
        }
        pass
    }

    /// Where a TX run stopped: wait for the backend, or come back for the rest.
    fn tx_done(&mut self, r: &TxRun, pass: &mut Pass) {
        pass.used[TX_QUEUE] = r.used;
        match r.stop {
            TxStop::BackendFull => self.tx_backend_full = true,
            TxStop::BatchLimit => pass.rearm_tx = true,
            TxStop::Idle | TxStop::Throttled => {}
        }
    }

    /// What a pass leaves to do once guest memory is released: re-arm TX, fail the device on
    /// a ring error, detach a failed backend.
    fn finish(&mut self, core: &mut VirtioCore, pass: Pass) {
        if pass.rearm_tx {
            // Come back through the event loop, after other devices had a turn.
            core.rearm_queue(TX_QUEUE);
        }
        if let Some(why) = pass.ring_error {
            self.metrics.queue_errors += 1;
            if core.fail(&format!("malformed queue: {why}")) {
                self.metrics.config_changes += 1;
            }
        }
        if pass.backend_failed {
            self.backend_lost(core);
        }
    }

    /// The backend failed or went away: detach it and take the link down.
    fn backend_lost(&mut self, core: &mut VirtioCore) {
        if let Some(b) = self.backend.take() {
            tracing::warn!(
                "{}: backend {} failed or disappeared; detached",
                core.name(),
                b.name()
            );
            self.metrics.backends_lost += 1;
            self.retire(b);
        }
        self.tx_backend_full = false;
        self.set_link_state(core, false);
    }

    /// What the event loop should watch the backend for.
    pub(super) fn backend_interest(&self, core: &VirtioCore) -> EventSet {
        let mut set = EventSet::empty();
        if core.is_activated() && !core.is_failed() && self.link_up {
            if !self.rx.has_frame() && !self.rx_limiter.is_blocked() {
                set |= EventSet::IN;
            }
            if self.tx_backend_full {
                set |= EventSet::OUT;
            }
        }
        set
    }

    /// Bring the event loop's watch list in line with the device: unregister and drop retired
    /// backends, register or update the current one.
    fn sync_backend(&mut self, core: &VirtioCore, ops: &mut EventOps) {
        for old in self.retired.drain(..) {
            let fd = old.as_raw_fd();
            if self.registered.is_some_and(|(r, _)| r == fd) {
                if let Err(e) = ops.remove(Events::empty_raw(fd)) {
                    tracing::warn!("{}: cannot unwatch the old backend: {e:?}", core.name());
                }
                self.registered = None;
            }
        }
        let want = self
            .backend
            .as_ref()
            .map(|b| (b.as_raw_fd(), self.backend_interest(core)));
        match (self.registered, want) {
            (None, None) => {}
            (Some((fd, _)), None) => {
                // Not expected: a registered backend is current or retired.
                let _ = ops.remove(Events::empty_raw(fd));
                self.registered = None;
            }
            (None, Some((fd, set))) => self.watch_backend(core, ops, fd, set, false),
            (Some((old, old_set)), Some((fd, set))) => {
                if old != fd {
                    let _ = ops.remove(Events::empty_raw(old));
                    self.registered = None;
                    self.watch_backend(core, ops, fd, set, false);
                } else if old_set != set {
                    self.watch_backend(core, ops, fd, set, true);
                }
            }
        }
    }

    /// Watch backend descriptor `fd` for `set` (`modify`: it is watched already, for another
    /// set). On success it is the registered backend; on failure nothing changes.
    fn watch_backend(
        &mut self,
        core: &VirtioCore,
        ops: &mut EventOps,
        fd: RawFd,
        set: EventSet,
        modify: bool,
    ) {
        let events = own_events_raw(fd, BACKEND, set);
        let r = if modify {
            ops.modify(events)
        } else {
            ops.add(events)
        };
        match r {
            Ok(()) => self.registered = Some((fd, set)),
            Err(e) => tracing::error!("{}: cannot watch the backend: {e:?}", core.name()),
        }
    }

    /// Readiness of the backend `fd`: which paths to run.
    fn backend_ready(&mut self, core: &mut VirtioCore, fd: RawFd, set: EventSet) -> (bool, bool) {
        let current = self.backend.as_ref().map(|b| b.as_raw_fd());
        // Events of a retired backend: the sync after the event unregisters it.
        if current != Some(fd) {
            return (false, false);
        }
        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            self.backend_lost(core);
            return (false, false);
        }
        let writable = set.contains(EventSet::OUT);
        if writable {
            self.tx_backend_full = false;
        }
        (set.contains(EventSet::IN), writable)
    }
}

impl QueueHandler for NetDevice {
    fn init(&mut self, core: &mut VirtioCore, ops: &mut EventOps) {
        self.in_event_loop = true;
        let limiters = [
            (&self.rx_limiter, RX_LIMITER),
            (&self.tx_limiter, TX_LIMITER),
        ];
        let events = limiters
            .into_iter()
            .filter(|(rl, _)| rl.as_raw_fd() >= 0)
            .map(|(rl, token)| own_events(rl, token, EventSet::IN));
        watch_events(ops, events, core.name());
        self.sync_backend(core, ops);
    }

    fn handle(&mut self, core: &mut VirtioCore, trigger: Trigger, ops: &mut EventOps) {
        let (do_rx, do_tx) = match trigger {
            Trigger::Wake => (true, true),
            Trigger::Queue(q) => (q == RX_QUEUE, q == TX_QUEUE),
            Trigger::Own {
                token: BACKEND,
                fd,
                set,
            } => self.backend_ready(core, fd, set),
            Trigger::Own {
                token: RX_LIMITER, ..
            } => (self.rx_limiter.on_timer(), false),
            Trigger::Own {
                token: TX_LIMITER, ..
            } => (false, self.tx_limiter.on_timer()),
            Trigger::Own { token, .. } => {
                tracing::warn!("{}: unexpected event {token}", core.name());
                (false, false)
            }
        };
        self.run(core, do_rx, do_tx);
        self.sync_backend(core, ops);
    }
}
