//! Helpers the device core ([`super::device`]) and the devices share: creating `EventFd`s,
//! registering events with the event loop and draining `EventFd` counters on it; and the
//! request loop of the devices that answer each chain in turn ([`serve_queue`],
//! [`notify_used`]).
//!
//! Log lines name the device with a [`DeviceName`] (`block rootfs`, `vsock`), so every device
//! reports the same failures in the same words.

use std::fmt;
use std::io;

use event_manager::{EventOps, EventSet, Events};
use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use super::VirtioInterrupt;

/// An `EventFd` could not be created (the devices' error types wrap it as their `EventFd`
/// variant).
#[derive(Debug, Error)]
#[error("cannot create an EventFd: {0}")]
pub struct EventFdError(#[source] pub io::Error);

/// A non-blocking `EventFd`, as every device uses for its queue and wake-up events.
pub fn new_eventfd() -> Result<EventFd, EventFdError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(EventFdError)
}

/// A length inside one descriptor chain as the `u32` the used ring takes. virtio-queue stops a
/// chain before 2^32 bytes, so it fits; a larger value (a bug) saturates instead of wrapping.
pub fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// A device as its log lines name it: its kind, then its id when it has one.
#[derive(Debug, Clone, Copy)]
pub struct DeviceName<'a> {
    kind: &'static str,
    id: &'a str,
}

impl<'a> DeviceName<'a> {
    /// `kind id` (`id` may be empty: then just `kind`).
    pub const fn new(kind: &'static str, id: &'a str) -> Self {
        DeviceName { kind, id }
    }
}

impl fmt::Display for DeviceName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.id.is_empty() {
            f.write_str(self.kind)
        } else {
            write!(f, "{} {}", self.kind, self.id)
        }
    }
}

/// Register `events` with the event loop (from `MutEventSubscriber::init`); an event that
/// cannot be added is logged and the others are still added.
pub fn watch_events(
    ops: &mut EventOps,
    events: impl IntoIterator<Item = Events>,
    device: DeviceName<'_>,
) {
    for e in events {
        if let Err(err) = ops.add(e) {
            tracing::error!("{device}: cannot watch an event: {err:?}");
        }
    }
}

/// Warn when an `EventFd` the device watches for input reports anything else.
pub fn warn_unexpected_set(events: &Events, device: DeviceName<'_>) {
    if events.event_set() != EventSet::IN {
        tracing::warn!("{device}: unexpected event set {:?}", events.event_set());
    }
}

/// Read (reset) an `EventFd` counter. `WouldBlock` just means another wake-up already drained
/// it; other errors are logged, naming the event as `what`. Returns whether a count was read.
pub fn drain_eventfd(evt: &EventFd, device: DeviceName<'_>, what: &str) -> bool {
    match evt.read() {
        Ok(_) => true,
        Err(e) => {
            if e.kind() != io::ErrorKind::WouldBlock {
                tracing::warn!("{device}: cannot read the {what} event: {e}");
            }
            false
        }
    }
}

/// Log (at debug level) a config-space write the device ignores.
pub fn ignore_config_write(device: DeviceName<'_>, offset: u64, data: &[u8]) {
    tracing::debug!(
        "{device}: config write of {} bytes at {offset:#x} ignored",
        data.len()
    );
}

/// What a device did with a chain [`serve_queue`] handed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Add it to the used ring with this length and go on.
    Used(u32),
    /// Add it to the used ring with this length, then stop: the device cannot go on.
    UsedAndStop(u32),
    /// Not now: put it back on the available ring and stop, with guest notifications left off
    /// (the device resumes the queue itself, e.g. from a rate limiter's timer).
    Later,
}

/// How a [`serve_queue`] pass ended.
#[derive(Debug, Default)]
pub struct QueuePass {
    /// Chains added to the used ring.
    pub used: usize,
    /// The limit was reached with chains maybe left: the device comes back to the queue later.
    pub limit_reached: bool,
    /// The device stopped the pass ([`Served::UsedAndStop`]).
    pub stopped: bool,
    /// The ring itself is broken (the device then needs a reset): what went wrong.
    pub ring_error: Option<String>,
}

/// Serve the available chains of `queue`, at most `limit` of them, with `serve`. Guest
/// notifications are off meanwhile; they are turned back on when the ring is empty, and chains
/// that arrived in between are served too. Call [`notify_used`] afterwards when chains were used.
pub fn serve_queue<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    limit: usize,
    mut serve: impl FnMut(DescriptorChain<&M>) -> Served,
) -> QueuePass {
    let mut pass = QueuePass::default();
    'outer: loop {
        if let Err(e) = queue.disable_notification(mem) {
            pass.ring_error = Some(format!("cannot disable notifications: {e}"));
            break;
        }
        loop {
            if pass.used == limit {
                pass.limit_reached = true;
                break 'outer;
            }
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    pass.ring_error = Some(format!("available ring: {e}"));
                    break 'outer;
                }
            };
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let (len, stop) = match serve(chain) {
                Served::Used(len) => (len, false),
                Served::UsedAndStop(len) => (len, true),
                Served::Later => {
                    queue.go_to_previous_position();
                    break 'outer;
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                pass.ring_error = Some(format!("used ring (head {head}): {e}"));
                break 'outer;
            }
            pass.used += 1;
            if stop {
                pass.stopped = true;
                break 'outer;
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                pass.ring_error = Some(format!("cannot enable notifications: {e}"));
                break;
            }
        }
    }
    pass
}

/// Raise the used-ring interrupt after chains were used, if the driver wants it. Returns
/// whether it was raised because the driver asked (devices count those); when that cannot be
/// told, the guest is still told about what completed and `false` is returned.
pub fn notify_used<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    interrupt: &VirtioInterrupt,
) -> bool {
    match queue.needs_notification(mem) {
        Ok(true) => {
            interrupt.signal_used_queue();
            true
        }
        Ok(false) => false,
        Err(_) => {
            interrupt.signal_used_queue();
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::virtio::test_util::{Ring, VRING_DESC_F_WRITE};

    #[test]
    fn device_names() {
        assert_eq!(
            DeviceName::new("block", "rootfs").to_string(),
            "block rootfs"
        );
        assert_eq!(DeviceName::new("vsock", "").to_string(), "vsock");
    }

    #[test]
    fn serve_queue_limits_defers_and_stops() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (mut ring, mut q) = Ring::new(&mem, 0, 16);
        for i in 0..5u16 {
            let buf = 0x8000 + 0x100 * u64::from(i);
            ring.set_desc(&mem, i, buf, 0x100, VRING_DESC_F_WRITE, 0);
            ring.publish(&mem, i);
        }
        let pass = serve_queue(&mut q, &mem, 2, |c| Served::Used(u32::from(c.head_index())));
        assert_eq!(
            (pass.used, pass.limit_reached, pass.stopped),
            (2, true, false)
        );
        assert_eq!(pass.ring_error, None);
        // Deferred: the chain goes back to the ring.
        let pass = serve_queue(&mut q, &mem, usize::MAX, |_| Served::Later);
        assert_eq!(
            (pass.used, pass.limit_reached, pass.stopped),
            (0, false, false)
        );
        let pass = serve_queue(&mut q, &mem, usize::MAX, |_| Served::UsedAndStop(7));
        assert_eq!(
            (pass.used, pass.limit_reached, pass.stopped),
            (1, false, true)
        );
        let pass = serve_queue(&mut q, &mem, usize::MAX, |_| Served::Used(1));
        assert_eq!(
            (pass.used, pass.limit_reached, pass.stopped),
            (2, false, false)
        );
        assert_eq!(
            ring.take_used(&mem),
            [(0, 0), (1, 1), (2, 7), (3, 1), (4, 1)]
        );
        // Without EVENT_IDX the driver wants every interrupt.
        let irq = VirtioInterrupt::new(new_eventfd().unwrap());
        assert!(notify_used(&mut q, &mem, &irq));
        assert_eq!(irq.event().read().unwrap(), 1);
        // An available index more than a queue ahead breaks the ring.
        mem.write_obj(0x8000u16, GuestAddress(ring.avail + 2))
            .unwrap();
        let pass = serve_queue(&mut q, &mem, usize::MAX, |_| Served::Used(0));
        assert_eq!(pass.used, 0);
        assert!(pass.ring_error.unwrap().starts_with("available ring"));
    }

    #[test]
    fn drain() {
        let evt = new_eventfd().unwrap();
        let name = DeviceName::new("test", "");
        assert!(!drain_eventfd(&evt, name, "wake-up"));
        evt.write(1).unwrap();
        evt.write(1).unwrap();
        assert!(drain_eventfd(&evt, name, "wake-up"));
        assert!(!drain_eventfd(&evt, name, "wake-up"));
    }
}
