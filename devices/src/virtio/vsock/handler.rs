//! The vsock device's queue handler: moves packets between the tx / rx queues and the
//! connection multiplexer on the event loop, and sends the transport-reset event a restored
//! device owes the guest.

use event_manager::EventOps;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryMmap};

use super::packet::{self, RxBuffer};
use super::{VsockDevice, EVENT_QUEUE, RX_BATCH, RX_QUEUE, TX_BATCH, TX_QUEUE};
use crate::virtio::device::{QueueHandler, Trigger, VirtioCore};
use crate::virtio::VirtioInterrupt;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the `id` of the only event the device sends.
const EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of `struct virtio_vsock_event` (one le32).
const EVENT_LEN: u32 = 4;

/// The next available chain of `queue`, or a ring error.
fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    what: &str,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, String> {
    match queue.iter(mem) {
        Ok(mut it) => Ok(it.next()),
        Err(e) => Err(format!("{what} queue: {e}")),
    }
}

/// Add a used entry, or a ring error.
fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    what: &str,
) -> Result<(), String> {
    queue
        .add_used(mem, head, len)
        .map_err(|e| format!("{what} queue: {e}"))
}

/// Raise the used-ring interrupt for `queue` if the driver wants it (or cannot tell).
fn notify(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &VirtioInterrupt, q: usize) {
    match queue.needs_notification(mem) {
        Ok(true) => interrupt.signal_used_queue(),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!("vsock: queue {q}: {e}");
            interrupt.signal_used_queue();
        }
    }
}

impl VsockDevice {
    /// Process both queues until neither makes progress or a queue used up its per-pass
    /// budget ([`TX_BATCH`], [`RX_BATCH`]); signal the guest once. A queue that used up its
    /// budget has its queue event re-armed: the loop comes back to it after the other events
    /// (and a stop request) had their turn.
    fn process_queues(&mut self, core: &mut VirtioCore, ops: &mut EventOps) {
        if core.is_failed() {
            return;
        }
        let Some(active) = core.active_mut() else {
            return;
        };
        let mem = active.mem.memory();
        let mut tx_budget = TX_BATCH;
        let mut rx_budget = RX_BATCH;
        let ring_error = loop {
            if let Err(e) = self.process_tx(&mem, &mut active.queues[TX_QUEUE], &mut tx_budget, ops)
            {
                break Some(e);
            }
            // The tx queue stops while the control backlog is full.
            let tx_held_back = self.muxer.ctrl_full();
            let rx_held = self.reset_event_pending || self.reset_ack_pending;
            let rx_used = if rx_held {
                0
            } else {
                match self.process_rx(&mem, &mut active.queues[RX_QUEUE], &mut rx_budget, ops) {
                    Ok(n) => n,
                    Err(e) => break Some(e),
                }
            };
            // Another round only if the rx side drained a backlog that held tx back.
            if !(tx_held_back && rx_used > 0) || tx_budget == 0 {
                break None;
            }
        };
        for (budget, max, q) in [
            (rx_budget, RX_BATCH, RX_QUEUE),
            (tx_budget, TX_BATCH, TX_QUEUE),
        ] {
            if budget < max {
                notify(&mut active.queues[q], &mem, &active.interrupt, q);
            }
        }
        drop(mem);
        match ring_error {
            Some(why) => {
                core.fail(&why);
            }
            None => {
                for (budget, q) in [(tx_budget, TX_QUEUE), (rx_budget, RX_QUEUE)] {
                    if budget == 0 {
                        core.rearm_queue(q);
                    }
                }
            }
        }
    }

    /// Consume the tx queue, at most `budget` chains (decremented per chain used). `Err` is a
    /// ring error.
    fn process_tx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        budget: &mut usize,
        ops: &mut EventOps,
    ) -> Result<(), String> {
        while !self.muxer.ctrl_full() && *budget > 0 {
            let Some(mut chain) = next_chain(queue, mem, "tx")? else {
                break;
            };
            let head = chain.head_index();
            self.muxer.metrics.packets_from_guest += 1;
            match packet::read_tx(mem, &mut chain, self.cid, &mut self.scratch) {
                Ok(hdr) => {
                    let data = self.scratch.get(..hdr.len as usize).unwrap_or_default();
                    self.muxer.recv_pkt(&hdr, data, ops);
                }
                Err(e) => {
                    tracing::debug!("vsock: dropped a tx packet: {e}");
                    self.muxer.metrics.packets_dropped += 1;
                }
            }
            add_used(queue, mem, head, 0, "tx")?;
            *budget -= 1;
        }
        Ok(())
    }

    /// Fill rx buffers while packets are waiting, at most `budget` chains (decremented per
    /// chain used). Returns how many chains were used, or a ring error.
    fn process_rx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        budget: &mut usize,
        ops: &mut EventOps,
    ) -> Result<usize, String> {
        let mut used = 0;
        while self.muxer.has_rx() && *budget > 0 {
            // No buffer: the packets wait for the guest's next rx notification.
            let Some(mut chain) = next_chain(queue, mem, "rx")? else {
                break;
            };
            let head = chain.head_index();
            let Some(len) = self.fill_rx_buffer(mem, &mut chain, ops) else {
                // Nothing to send after all: give the buffer back for later.
                queue.go_to_previous_position();
                break;
            };
            add_used(queue, mem, head, len, "rx")?;
            used += 1;
            *budget -= 1;
        }
        Ok(used)
    }

    /// Write the next packet for the guest into an rx chain. Returns the used length (0 for
    /// an unusable buffer or a lost packet), or `None` when nothing is to be sent after all.
    fn fill_rx_buffer(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &mut DescriptorChain<&GuestMemoryMmap>,
        ops: &mut EventOps,
    ) -> Option<u32> {
        let mut buf = match RxBuffer::new(mem, chain) {
            Ok(buf) => buf,
            Err(e) => {
                // Unusable buffer: return it empty.
                tracing::debug!("vsock: dropped an rx buffer: {e}");
                self.muxer.metrics.packets_dropped += 1;
                return Some(0);
            }
        };
        let cap = buf.capacity().min(self.scratch.len());
        let hdr = self.muxer.next_rx(&mut self.scratch[..cap], ops)?;
        let n = (hdr.len as usize).min(cap);
        match buf.write(&hdr, &self.scratch[..n]) {
            Ok(len) => {
                self.muxer.metrics.packets_to_guest += 1;
                Some(len)
            }
            Err(e) => {
                tracing::warn!("vsock: lost a packet for the guest: {e}");
                Some(0)
            }
        }
    }

    /// Send the transport-reset event a restored device owes the guest, once the driver has
    /// posted an event buffer.
    fn send_reset_event(&mut self, core: &mut VirtioCore) {
        if !self.reset_event_pending || core.is_failed() {
            return;
        }
        let Some(active) = core.active_mut() else {
            return;
        };
        let mem = active.mem.memory();
        let queue = &mut active.queues[EVENT_QUEUE];
        let chain = match next_chain(queue, &mem, "event") {
            Ok(Some(chain)) => chain,
            Ok(None) => return,
            Err(why) => {
                drop(mem);
                core.fail(&why);
                return;
            }
        };
        let head = chain.head_index();
        let slot = chain
            .writable()
            .next()
            .filter(|d| d.len() >= EVENT_LEN)
            .map(|d| d.addr());
        let len = match slot.map(|at| mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), at)) {
            Some(Ok(())) => EVENT_LEN,
            _ => {
                tracing::warn!("vsock: unusable event buffer; transport reset not sent");
                0
            }
        };
        self.reset_event_pending = false;
        self.reset_ack_pending = len == EVENT_LEN;
        if let Err(why) = add_used(queue, &mem, head, len, "event") {
            drop(mem);
            core.fail(&why);
            return;
        }
        notify(queue, &mem, &active.interrupt, EVENT_QUEUE);
        tracing::info!("vsock: transport reset sent to the guest");
    }
}

impl QueueHandler for VsockDevice {
    fn init(&mut self, _core: &mut VirtioCore, ops: &mut EventOps) {
        self.muxer.init(ops);
    }

    fn handle(&mut self, core: &mut VirtioCore, trigger: Trigger, ops: &mut EventOps) {
        if self.teardown_pending {
            self.teardown_pending = false;
            self.muxer.teardown(ops);
        }
        // Wake-ups and queue notifications (rx: new buffers; tx: new packets; event: buffers
        // for the reset event) just lead to the pass below.
        if let Trigger::Own { token, fd, set } = trigger {
            let active = core.is_activated() && !core.is_failed();
            self.muxer.handle_event(token, fd, set, ops, active);
        }
        // The guest posts event buffers again after handling the reset event.
        if trigger == Trigger::Queue(EVENT_QUEUE) && self.reset_ack_pending {
            self.reset_ack_pending = false;
            tracing::info!("vsock: the guest handled the transport reset");
        }
        self.send_reset_event(core);
        self.process_queues(core, ops);
        self.muxer.rearm_timer();
    }
}
