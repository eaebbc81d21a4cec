//! The vhost-user-fs device's queue handler: on the event loop it hands the rings to the
//! daemon after activation and forwards the daemon's call `EventFd`s as used-ring interrupts.
//! The queue events themselves are the daemon's kick descriptors: the core does not watch
//! them ([`QueueHandler::WATCHES_QUEUES`]).

use event_manager::{EventOps, EventSet};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use super::{host_range, memory_table, req, VhostUserFsDevice, VhostUserFsError};
use crate::virtio::common::{drain_eventfd, watch_events};
use crate::virtio::device::{own_events, QueueHandler, Trigger, VirtioCore};

/// Split-ring part sizes with the event-index fields, per entry and fixed.
const DESC_LEN: usize = 16;
const AVAIL_FIXED: usize = 6;
const AVAIL_ENTRY: usize = 2;
const USED_FIXED: usize = 6;
const USED_ENTRY: usize = 8;

/// The daemon's view of ring `q`: host addresses of its three parts, or `None` when one does
/// not lie in a single guest memory region.
fn vring_config(mem: &GuestMemoryMmap, q: &Queue, max_size: u16) -> Option<VringConfigData> {
    let n = usize::from(q.size());
    Some(VringConfigData {
        queue_max_size: max_size,
        queue_size: q.size(),
        flags: 0,
        desc_table_addr: host_range(mem, q.desc_table(), DESC_LEN * n)?,
        used_ring_addr: host_range(mem, q.used_ring(), USED_FIXED + USED_ENTRY * n)?,
        avail_ring_addr: host_range(mem, q.avail_ring(), AVAIL_FIXED + AVAIL_ENTRY * n)?,
        log_addr: None,
    })
}

impl VhostUserFsDevice {
    /// Hand the rings to the daemon. A failure puts the device into `needs_reset`.
    pub(super) fn start(&mut self, core: &mut VirtioCore) {
        if core.is_failed() || self.started || !core.is_activated() {
            return;
        }
        match self.do_start(core) {
            Ok(()) => {
                self.metrics.activations += 1;
                self.started = true;
                tracing::info!("{}: rings handed to the daemon", core.name());
            }
            Err(e) => {
                self.metrics.backend_errors += 1;
                core.fail(&format!("activation failed: {e}"));
            }
        }
    }

    fn do_start(&mut self, core: &VirtioCore) -> Result<(), VhostUserFsError> {
        let Some(active) = core.active() else {
            return Err(VhostUserFsError::NotActive);
        };
        let mem = active.mem.memory();
        let regions = memory_table(&mem)?;
        let mut features = core.acked_features();
        if self.protocol_features {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        let f = &mut self.frontend;
        f.set_features(features).map_err(req("SET_FEATURES"))?;
        f.set_mem_table(&regions).map_err(req("SET_MEM_TABLE"))?;
        let max_sizes = core.queue_max_sizes();
        for (i, (q, &max)) in active.queues.iter().zip(max_sizes).enumerate() {
            let addrs = vring_config(&mem, q, max).ok_or(VhostUserFsError::RingAddress(i))?;
            f.set_vring_num(i, q.size()).map_err(req("SET_VRING_NUM"))?;
            f.set_vring_addr(i, &addrs).map_err(req("SET_VRING_ADDR"))?;
            f.set_vring_base(i, q.next_avail())
                .map_err(req("SET_VRING_BASE"))?;
            f.set_vring_call(i, &self.call_events[i])
                .map_err(req("SET_VRING_CALL"))?;
            f.set_vring_kick(i, &core.queue_events()[i])
                .map_err(req("SET_VRING_KICK"))?;
            if self.protocol_features {
                f.set_vring_enable(i, true)
                    .map_err(req("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stop every ring in the daemon (reset).
    pub(super) fn stop(&mut self, queues: usize) -> Result<(), VhostUserFsError> {
        for i in 0..queues {
            if self.protocol_features {
                self.frontend
                    .set_vring_enable(i, false)
                    .map_err(req("SET_VRING_ENABLE"))?;
            }
            self.frontend
                .get_vring_base(i)
                .map_err(req("GET_VRING_BASE"))?;
        }
        Ok(())
    }

    fn forward_interrupt(&mut self, core: &VirtioCore, queue: usize) {
        let Some(evt) = self.call_events.get(queue) else {
            return;
        };
        if !drain_eventfd(evt, core.name(), "call") {
            return;
        }
        if let Some(a) = core.active() {
            a.interrupt.signal_used_queue();
            self.metrics.interrupts += 1;
        }
    }
}

impl QueueHandler for VhostUserFsDevice {
    // The queue events are the daemon's kick descriptors: reading them here would steal its
    // notifications.
    const WATCHES_QUEUES: bool = false;

    fn init(&mut self, core: &mut VirtioCore, ops: &mut EventOps) {
        // Call event `i` is watched with token `i`.
        let calls = (0..)
            .zip(&self.call_events)
            .map(|(token, evt)| own_events(evt, token, EventSet::IN));
        watch_events(ops, calls, core.name());
    }

    fn handle(&mut self, core: &mut VirtioCore, trigger: Trigger, _ops: &mut EventOps) {
        match trigger {
            Trigger::Wake => self.start(core),
            Trigger::Own { token, .. } => match usize::try_from(token) {
                Ok(queue) => self.forward_interrupt(core, queue),
                Err(_) => tracing::warn!("{}: unexpected event {token}", core.name()),
            },
            Trigger::Queue(_) => {}
        }
    }
}
