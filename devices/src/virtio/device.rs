//! The virtio device core: the state and plumbing every virtio device shares, written once.
//!
//! A device is a [`Virtio<D>`]: a [`VirtioCore`] (device type, offered and accepted features,
//! queue sizes, queue and wake-up `EventFd`s, the activation state, the failed flag and the
//! config generation) next to `D`, the device's own part. `D` comes in two halves, each in its
//! own file of the device's module:
//! - the *device* ([`DeviceModel`], `mod.rs`): its config space and what it adds to
//!   activation and reset. [`VirtioDevice`] is implemented once, here, for every `Virtio<D>`:
//!   feature pages, bounded config reads, queue-count checks, handing the queues over and
//!   resetting are the core's.
//! - the *queue handler* ([`QueueHandler`], `handler.rs`): the work on the VM's event loop.
//!   `MutEventSubscriber` is implemented once, here: the core watches the wake-up and queue
//!   events, drains them and passes the handler a [`Trigger`].
//!
//! One event-dispatch convention for every device: each watched descriptor carries a data
//! token. [`WAKE_TOKEN`] is the wake-up event (activation, reset, control calls), the queue
//! events follow it, and a device's own descriptors (backends, timers, connections) are
//! watched with [`own_events`] / [`own_events_raw`] under tokens of its choosing, which the
//! handler gets back as [`Trigger::Own`].
//!
//! Activation runs on the vCPU thread that wrote `DRIVER_OK` (under the device lock): the core
//! checks the queue count, asks the device ([`DeviceModel::activate`]), stores the queues and
//! wakes the event loop, where the handler takes over ([`Trigger::Wake`]).
//!
//! Save and restore: [`VirtioCore::state`] is the run-time state as a plain serde struct
//! ([`VirtioState`]); each device's own state struct embeds it. A device rebuilt from its
//! config and given the saved state ([`VirtioCore::restore`]) is activated again by the
//! transport with [`VirtioDevice::activate_restored`], which rebuilds the queues where they
//! were (including `next_avail` / `next_used`).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use super::common::{
    drain_eventfd, ignore_config_write, new_eventfd, warn_unexpected_set, watch_events, DeviceName,
    EventFdError,
};
use super::{read_config_bytes, ActivateError, GuestMem, VirtioDevice, VirtioInterrupt};

/// Event data of the device's wake-up `EventFd`.
pub const WAKE_TOKEN: u32 = 0;
/// Event data of queue 0's notification `EventFd`; queue `i` has `QUEUE_TOKEN_BASE + i`.
const QUEUE_TOKEN_BASE: u32 = 1;
/// Event data of a device's own descriptor with token `t`: `OWN_TOKEN_BASE + t` (queue tokens
/// stay below it: a device has at most `u16::MAX` queues).
const OWN_TOKEN_BASE: u32 = 1 << 16;

/// Why the event loop called a device's [`QueueHandler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The wake-up `EventFd` fired (drained by the core): after activation, a reset or a
    /// control call.
    Wake,
    /// Queue `i` was notified (its `EventFd` drained by the core).
    Queue(usize),
    /// One of the device's own descriptors, registered with [`own_events`] under `token`.
    Own {
        /// The token it was registered with.
        token: u32,
        /// The descriptor.
        fd: RawFd,
        /// What it is ready for.
        set: EventSet,
    },
}

impl Trigger {
    /// The trigger `events` stands for, or `None` for data no device registers.
    fn decode(events: &Events, queue_count: usize) -> Option<Trigger> {
        let data = events.data();
        if data == WAKE_TOKEN {
            return Some(Trigger::Wake);
        }
        if let Some(token) = data.checked_sub(OWN_TOKEN_BASE) {
            return Some(Trigger::Own {
                token,
                fd: events.fd(),
                set: events.event_set(),
            });
        }
        let i = usize::try_from(data - QUEUE_TOKEN_BASE).ok()?;
        (i < queue_count).then_some(Trigger::Queue(i))
    }
}

/// `Events` for one of the device's own descriptors (`source`), watched for `set` under
/// `token` ([`Trigger::Own`]).
pub fn own_events<T: AsRawFd>(source: &T, token: u32, set: EventSet) -> Events {
    own_events_raw(source.as_raw_fd(), token, set)
}

/// [`own_events`] for a raw descriptor.
pub fn own_events_raw(fd: RawFd, token: u32, set: EventSet) -> Events {
    Events::with_data_raw(fd, OWN_TOKEN_BASE.saturating_add(token), set)
}

/// What an activated device holds: guest memory, its interrupt line and its queues (one per
/// [`VirtioCore::queue_max_sizes`] entry, in order).
pub struct Active {
    /// Guest memory.
    pub mem: GuestMem,
    /// The device's interrupt line.
    pub interrupt: Arc<VirtioInterrupt>,
    /// The queues the driver set up.
    pub queues: Vec<Queue>,
}

/// What a device is, for [`VirtioCore::new`].
#[derive(Debug, Clone)]
pub struct CoreSpec<'a> {
    /// What log lines call the device kind (`block`, `net`, `vsock`, ...).
    pub kind: &'static str,
    /// The device's id (drive id, interface id, tag; empty when there is only one).
    pub id: &'a str,
    /// Virtio device id (`VIRTIO_ID_*`).
    pub device_type: u32,
    /// Features offered to the driver.
    pub avail_features: u64,
    /// Maximum size of each queue; the number of queues is its length.
    pub queue_max_sizes: Vec<u16>,
}

/// The state every virtio device has. See the module documentation.
pub struct VirtioCore {
    kind: &'static str,
    id: String,
    device_type: u32,
    avail_features: u64,
    acked_features: u64,
    queue_max_sizes: Vec<u16>,
    queue_events: Vec<EventFd>,
    wake_evt: EventFd,
    active: Option<Active>,
    /// Set when the device hits a guest error it cannot go on from (`DEVICE_NEEDS_RESET`);
    /// shared with threads a device runs (fs workers).
    failed: Arc<AtomicBool>,
    config_generation: u32,
    /// The queues of a restored state, for [`VirtioDevice::activate_restored`].
    restored_queues: Option<Vec<QueueState>>,
}

impl VirtioCore {
    /// A core for `spec`, with a fresh `EventFd` per queue and a wake-up `EventFd`.
    pub fn new(spec: CoreSpec<'_>) -> Result<VirtioCore, EventFdError> {
        let queue_events = spec
            .queue_max_sizes
            .iter()
            .map(|_| new_eventfd())
            .collect::<Result<_, _>>()?;
        Ok(VirtioCore {
            kind: spec.kind,
            id: spec.id.to_string(),
            device_type: spec.device_type,
            avail_features: spec.avail_features,
            acked_features: 0,
            queue_max_sizes: spec.queue_max_sizes,
            queue_events,
            wake_evt: new_eventfd()?,
            active: None,
            failed: Arc::new(AtomicBool::new(false)),
            config_generation: 0,
            restored_queues: None,
        })
    }

    /// How log lines name the device (`block rootfs`, `vsock`).
    pub fn name(&self) -> DeviceName<'_> {
        DeviceName::new(self.kind, &self.id)
    }

    /// The device's id (drive id, interface id, tag).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Features offered to the driver.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Features the driver accepted (0 before `FEATURES_OK` and after a reset).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Maximum size of each queue.
    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    /// One `EventFd` per queue, signalled when the guest notifies it.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The `EventFd` that wakes the device's handler on the event loop ([`Trigger::Wake`]).
    pub fn wake_event(&self) -> &EventFd {
        &self.wake_evt
    }

    /// Memory, interrupt and queues once the driver activated the device.
    pub fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }

    /// [`VirtioCore::active`], mutable.
    pub fn active_mut(&mut self) -> Option<&mut Active> {
        self.active.as_mut()
    }

    /// Whether the driver activated the device.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Whether the device failed and waits for a driver reset.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// The failed flag, for threads the device runs (they set it when their queue breaks).
    pub fn failed_flag(&self) -> Arc<AtomicBool> {
        self.failed.clone()
    }

    /// The device cannot go on (a broken ring, a dead backend): log `why`, report
    /// `DEVICE_NEEDS_RESET` until the driver resets the device, and tell the driver with a
    /// config-change interrupt. Returns whether the interrupt was raised (the device is active).
    pub fn fail(&self, why: &str) -> bool {
        tracing::warn!("{}: {why}; the device needs a reset", self.name());
        self.failed.store(true, Ordering::SeqCst);
        self.signal_config_change()
    }

    /// Raise a config-change interrupt if the device is active. Returns whether it was raised.
    pub fn signal_config_change(&self) -> bool {
        match &self.active {
            Some(a) => {
                a.interrupt.signal_config_change();
                true
            }
            None => false,
        }
    }

    /// The device changed its own config space: the ConfigGeneration register moves on.
    pub fn bump_config_generation(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    /// Wake the handler on the event loop ([`Trigger::Wake`]); a failure is logged.
    pub fn wake(&self) {
        if let Err(e) = self.wake_evt.write(1) {
            tracing::warn!("{}: cannot wake the event loop: {e}", self.name());
        }
    }

    /// Notify queue `i` again, so the event loop comes back to it after other devices had
    /// their turn (a pass that stopped at its batch limit).
    pub fn rearm_queue(&self, i: usize) {
        if let Some(evt) = self.queue_events.get(i) {
            if let Err(e) = evt.write(1) {
                tracing::warn!("{}: cannot re-arm queue {i}: {e}", self.name());
            }
        }
    }

    fn activate(&mut self, active: Active) -> Result<(), ActivateError> {
        self.wake_evt
            .write(1)
            .map_err(|e| ActivateError::Backend(format!("cannot wake the event loop: {e}")))?;
        self.active = Some(active);
        self.failed.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.failed.store(false, Ordering::SeqCst);
        self.acked_features = 0;
        self.restored_queues = None;
    }

    /// The run-time state to save (queues only when activated).
    pub fn state(&self) -> VirtioState {
        VirtioState {
            device_type: self.device_type,
            acked_features: self.acked_features,
            activated: self.active.is_some(),
            queues: self.active.as_ref().map_or_else(Vec::new, |a| {
                a.queues.iter().map(QueueState::from).collect()
            }),
            failed: self.is_failed(),
            config_generation: self.config_generation,
        }
    }

    /// Take over a saved state on a device just built from the same config (not activated):
    /// features, failed flag, config generation, and the queues for the transport's
    /// [`VirtioDevice::activate_restored`].
    pub fn restore(&mut self, state: &VirtioState) -> Result<(), RestoreError> {
        if state.device_type != self.device_type {
            return Err(RestoreError::DeviceType {
                saved: state.device_type,
                device: self.device_type,
            });
        }
        if state.acked_features & !self.avail_features != 0 {
            return Err(RestoreError::Features {
                acked: state.acked_features,
                offered: self.avail_features,
            });
        }
        if state.activated && state.queues.len() != self.queue_max_sizes.len() {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                device: self.queue_max_sizes.len(),
            });
        }
        self.acked_features = state.acked_features;
        self.failed.store(state.failed, Ordering::SeqCst);
        self.config_generation = state.config_generation;
        self.restored_queues = state.activated.then(|| state.queues.clone());
        Ok(())
    }
}

/// Split-ring element sizes, for checking that a whole ring lies in guest memory.
const DESC_SIZE: u64 = 16;
const AVAIL_RING_META: u64 = 6;
const AVAIL_ELEM: u64 = 2;
const USED_RING_META: u64 = 6;
const USED_ELEM: u64 = 8;

/// Whether `q`'s rings are usable in `mem`: aligned, inside it (`Queue::is_valid`) and every
/// byte of each ring backed by guest memory (a ring must not start in a hole). The ring sizes
/// include the event-index fields (`used_event` / `avail_event`).
pub(crate) fn queue_in_memory<M: GuestMemory>(q: &Queue, mem: &M) -> bool {
    if !q.is_valid(mem) {
        return false;
    }
    let n = u64::from(q.size());
    let rings = [
        (q.desc_table(), DESC_SIZE * n),
        (q.avail_ring(), AVAIL_RING_META + AVAIL_ELEM * n),
        (q.used_ring(), USED_RING_META + USED_ELEM * n),
    ];
    rings.into_iter().all(|(addr, len)| {
        usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len))
    })
}

/// One queue's run-time state: what the driver set up and where the device is in the rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver made the queue ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` is in use.
    pub event_idx: bool,
}

impl From<&Queue> for QueueState {
    fn from(q: &Queue) -> Self {
        QueueState {
            max_size: q.max_size(),
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
        }
    }
}

impl QueueState {
    /// The queue again, if the state is usable with `mem` (a saved state is checked like a
    /// driver's setup: sizes, alignment, rings inside guest memory).
    pub fn to_queue<M: GuestMemory>(&self, mem: &M) -> Option<Queue> {
        let q = Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .ok()?;
        queue_in_memory(&q, mem).then_some(q)
    }
}

/// The run-time state of a [`VirtioCore`] (each device's state struct embeds it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// Virtio device id, checked on restore.
    pub device_type: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The driver had activated the device.
    pub activated: bool,
    /// The queues, when activated.
    pub queues: Vec<QueueState>,
    /// The device had failed (`DEVICE_NEEDS_RESET`).
    pub failed: bool,
    /// The device's own config-generation counter.
    pub config_generation: u32,
}

/// Why a saved state does not fit the device rebuilt for it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RestoreError {
    /// The state is of another kind of device.
    #[error("saved state of device type {saved}, the device is type {device}")]
    DeviceType {
        /// Type in the state.
        saved: u32,
        /// Type of the device.
        device: u32,
    },
    /// The state accepted features the device does not offer (a different config).
    #[error("saved features {acked:#x} are not a subset of the offered {offered:#x}")]
    Features {
        /// Features in the state.
        acked: u64,
        /// Features the device offers.
        offered: u64,
    },
    /// The state has another number of queues.
    #[error("saved state has {saved} queues, the device has {device}")]
    QueueCount {
        /// Queues in the state.
        saved: usize,
        /// Queues of the device.
        device: usize,
    },
    /// A device-specific value of the state differs from the device's config.
    #[error("saved {field} is {saved}, the device has {device}")]
    Mismatch {
        /// The field.
        field: &'static str,
        /// The saved value.
        saved: String,
        /// The device's value.
        device: String,
    },
    /// The number of queue registers in a transport state differs from the device's queues.
    #[error("saved transport state has {saved} queues, the device has {device}")]
    TransportQueues {
        /// Queues in the state.
        saved: usize,
        /// Queues of the device.
        device: usize,
    },
}

impl RestoreError {
    /// [`RestoreError::Mismatch`] unless `saved == device`.
    pub fn check<T: PartialEq + std::fmt::Debug>(
        field: &'static str,
        saved: T,
        device: T,
    ) -> Result<(), RestoreError> {
        if saved == device {
            return Ok(());
        }
        Err(RestoreError::Mismatch {
            field,
            saved: format!("{saved:?}"),
            device: format!("{device:?}"),
        })
    }
}

/// A device's own part, next to its [`VirtioCore`]: config space and activation hooks.
pub trait DeviceModel: Send + 'static {
    /// The config space's bytes (an array for each device).
    type ConfigSpace: AsRef<[u8]>;

    /// The device-specific config space as the driver reads it now.
    fn config_space(&self, core: &VirtioCore) -> Self::ConfigSpace;

    /// The driver wrote the config space. Kestrel's devices have nothing writable: ignored.
    fn write_config(&mut self, core: &mut VirtioCore, offset: u64, data: &[u8]) {
        ignore_config_write(core.name(), offset, data);
    }

    /// `DRIVER_OK`, before the queues are stored: device-specific checks and setup (the
    /// number of queues is checked already). An error refuses activation.
    fn activate(&mut self, core: &VirtioCore, mem: &GuestMem) -> Result<(), ActivateError> {
        let _ = (core, mem);
        Ok(())
    }

    /// A driver reset, before the core drops the queues and accepted features: stop what runs
    /// on them and drop in-flight state (backends stay attached).
    fn reset(&mut self, core: &mut VirtioCore) {
        let _ = core;
    }
}

/// The event-loop half of a device: serves its queues and its own descriptors.
pub trait QueueHandler: DeviceModel {
    /// Whether the core watches the queue events for the handler (a vhost-user device leaves
    /// them to its daemon).
    const WATCHES_QUEUES: bool = true;

    /// Register the device's own descriptors ([`own_events`]); the core has registered the
    /// wake-up and queue events already.
    fn init(&mut self, core: &mut VirtioCore, ops: &mut EventOps) {
        let _ = (core, ops);
    }

    /// Do the work `trigger` asks for. Notifications before activation or after a failure
    /// reach the handler too (it ignores them).
    fn handle(&mut self, core: &mut VirtioCore, trigger: Trigger, ops: &mut EventOps);
}

/// A virtio device: the shared [`VirtioCore`] and the device's own part `D`. Each device
/// module names its instance (`Block = Virtio<BlockDevice>`); the VMM hands the same
/// `Arc<Mutex<Virtio<D>>>` to the transport and to the event loop.
pub struct Virtio<D> {
    pub(crate) core: VirtioCore,
    pub(crate) device: D,
}

impl<D: DeviceModel> Virtio<D> {
    /// A device of `core` and `device`.
    pub fn from_parts(core: VirtioCore, device: D) -> Self {
        Virtio { core, device }
    }

    /// The shared core (features, queues, activation state).
    pub fn core(&self) -> &VirtioCore {
        &self.core
    }

    /// The `EventFd` that wakes the device on the event loop (activation, control calls).
    pub fn wake_event(&self) -> &EventFd {
        self.core.wake_event()
    }
}

impl<D: std::fmt::Debug> std::fmt::Debug for Virtio<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Virtio")
            .field("name", &self.core.name().to_string())
            .field("activated", &self.core.is_activated())
            .field("failed", &self.core.is_failed())
            .field("device", &self.device)
            .finish()
    }
}

impl<D: DeviceModel> VirtioDevice for Virtio<D> {
    fn device_type(&self) -> u32 {
        self.core.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.core.queue_max_sizes
    }

    fn avail_features(&self) -> u64 {
        self.core.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.core.acked_features = features & self.core.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.device.config_space(&self.core).as_ref(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.device.write_config(&mut self.core, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let expected = self.core.queue_max_sizes.len();
        if queues.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: queues.len(),
            });
        }
        self.device.activate(&self.core, &mem)?;
        self.core.activate(Active {
            mem,
            interrupt,
            queues,
        })
    }

    fn activate_restored(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let states = self
            .core
            .restored_queues
            .take()
            .ok_or(ActivateError::NoRestoredQueues)?;
        let queues = {
            let m = mem.memory();
            let build = |(i, s): (usize, &QueueState)| {
                s.to_queue(&*m).ok_or(ActivateError::InvalidQueue(i))
            };
            states
                .iter()
                .enumerate()
                .map(build)
                .collect::<Result<Vec<_>, _>>()?
        };
        let failed = self.core.is_failed();
        self.activate(mem, interrupt, queues)?;
        self.core.failed.store(failed, Ordering::SeqCst);
        Ok(())
    }

    fn reset(&mut self) {
        self.device.reset(&mut self.core);
        self.core.reset();
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.core.queue_events
    }

    fn needs_reset(&self) -> bool {
        self.core.is_failed()
    }

    fn is_activated(&self) -> bool {
        self.core.is_activated()
    }

    fn config_generation(&self) -> u32 {
        self.core.config_generation
    }
}

impl<D: QueueHandler> MutEventSubscriber for Virtio<D> {
    fn init(&mut self, ops: &mut EventOps) {
        let core = &self.core;
        let wake = Events::with_data(&core.wake_evt, WAKE_TOKEN, EventSet::IN);
        let queues = (QUEUE_TOKEN_BASE..)
            .zip(&core.queue_events)
            .filter(|_| D::WATCHES_QUEUES)
            .map(|(data, evt)| Events::with_data(evt, data, EventSet::IN));
        watch_events(ops, std::iter::once(wake).chain(queues), core.name());
        self.device.init(&mut self.core, ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let core = &self.core;
        let Some(trigger) = Trigger::decode(&events, core.queue_events.len()) else {
            tracing::warn!("{}: unexpected event {}", core.name(), events.data());
            return;
        };
        let (evt, what) = match trigger {
            Trigger::Wake => (&core.wake_evt, "wake-up"),
            Trigger::Queue(i) => (&core.queue_events[i], "queue"),
            Trigger::Own { .. } => {
                self.device.handle(&mut self.core, trigger, ops);
                return;
            }
        };
        warn_unexpected_set(&events, core.name());
        drain_eventfd(evt, core.name(), what);
        self.device.handle(&mut self.core, trigger, ops);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;
    use crate::virtio::test_util::Ring;

    #[test]
    fn tokens_round_trip() {
        let evt = new_eventfd().unwrap();
        let q = |data| Events::with_data(&evt, data, EventSet::IN);
        assert_eq!(Trigger::decode(&q(WAKE_TOKEN), 2), Some(Trigger::Wake));
        assert_eq!(Trigger::decode(&q(1), 2), Some(Trigger::Queue(0)));
        assert_eq!(Trigger::decode(&q(2), 2), Some(Trigger::Queue(1)));
        assert_eq!(Trigger::decode(&q(3), 2), None);
        let own = own_events(&evt, 7, EventSet::OUT);
        assert_eq!(
            Trigger::decode(&own, 2),
            Some(Trigger::Own {
                token: 7,
                fd: evt.as_raw_fd(),
                set: EventSet::OUT
            })
        );
    }

    /// A device that records what the core asks of it.
    #[derive(Default)]
    struct Probe {
        refuse: bool,
        resets: usize,
        active_at_reset: bool,
        triggers: Vec<Trigger>,
    }

    impl DeviceModel for Probe {
        type ConfigSpace = [u8; 4];
        fn config_space(&self, _core: &VirtioCore) -> [u8; 4] {
            [1, 2, 3, 4]
        }
        fn activate(&mut self, _core: &VirtioCore, _mem: &GuestMem) -> Result<(), ActivateError> {
            if self.refuse {
                return Err(ActivateError::Backend("refused".into()));
            }
            Ok(())
        }
        fn reset(&mut self, core: &mut VirtioCore) {
            self.resets += 1;
            self.active_at_reset = core.is_activated();
        }
    }

    impl QueueHandler for Probe {
        fn handle(&mut self, _core: &mut VirtioCore, trigger: Trigger, _ops: &mut EventOps) {
            self.triggers.push(trigger);
        }
    }

    fn probe() -> Virtio<Probe> {
        let core = VirtioCore::new(CoreSpec {
            kind: "probe",
            id: "p0",
            device_type: 42,
            avail_features: 0b1010,
            queue_max_sizes: vec![16, 16],
        })
        .unwrap();
        Virtio::from_parts(core, Probe::default())
    }

    /// The `VirtioDevice` every device gets from the core: features, config bounds, queue
    /// count, the device's activation hook, reset order, the wake-up on activation.
    #[test]
    fn activation_and_reset_through_the_core() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (_, q0) = Ring::new(&mem, 0, 16);
        let (_, q1) = Ring::new(&mem, 0x4000, 16);
        let mem = GuestMemoryAtomic::new(mem);
        let irq = Arc::new(VirtioInterrupt::new(new_eventfd().unwrap()));
        let mut d = probe();
        assert_eq!(d.core().name().to_string(), "probe p0");
        d.set_acked_features(u64::MAX);
        assert_eq!(d.core().acked_features(), 0b1010);
        let mut c = [0xffu8; 8];
        d.read_config(2, &mut c);
        assert_eq!(c, [3, 4, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            d.activate(mem.clone(), irq.clone(), vec![]),
            Err(ActivateError::QueueCount {
                expected: 2,
                got: 0
            })
        );
        d.device.refuse = true;
        let two = || vec![Queue::new(16).unwrap(), Queue::new(16).unwrap()];
        assert!(d.activate(mem.clone(), irq.clone(), two()).is_err());
        assert!(!d.is_activated() && d.wake_event().read().is_err());
        d.device.refuse = false;
        d.activate(mem.clone(), irq.clone(), vec![q0, q1]).unwrap();
        assert!(d.is_activated());
        assert_eq!(d.wake_event().read().unwrap(), 1);
        assert!(d.core.fail("test"));
        assert!(d.needs_reset());
        assert_eq!(irq.status(), crate::virtio::INTERRUPT_CONFIG_CHANGE);
        d.reset();
        assert_eq!((d.device.resets, d.device.active_at_reset), (1, true));
        assert!(!d.is_activated() && !d.needs_reset());
        assert_eq!(d.core().acked_features(), 0);
        assert_eq!(
            d.activate_restored(mem, irq),
            Err(ActivateError::NoRestoredQueues)
        );
    }

    /// Wake-up and queue events reach the handler as triggers, drained.
    #[test]
    fn events_reach_the_handler_as_triggers() {
        let d = Arc::new(Mutex::new(probe()));
        let mut em = EventManager::<Arc<Mutex<Virtio<Probe>>>>::new().unwrap();
        em.add_subscriber(d.clone());
        d.lock().unwrap().core().queue_events()[1].write(3).unwrap();
        em.run_with_timeout(100).unwrap();
        d.lock().unwrap().core().wake();
        em.run_with_timeout(100).unwrap();
        let dev = d.lock().unwrap();
        assert_eq!(dev.device.triggers, [Trigger::Queue(1), Trigger::Wake]);
        assert!(dev.core().queue_events()[1].read().is_err(), "drained");
    }
}
