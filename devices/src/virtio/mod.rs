//! Virtio devices over the virtio-mmio transport (virtio 1.x, MMIO version 2).
//!
//! Shape shared by every device (see docs/design.md, "Device model"):
//! - Every device is a [`device::Virtio<D>`]: the shared [`device::VirtioCore`] (features,
//!   queues, activation state, failed flag) plus the device's own part, split into the device
//!   ([`device::DeviceModel`]: config space, activation; the device module's `mod.rs`) and its
//!   queue handler ([`device::QueueHandler`]: the work on the event loop; `handler.rs`).
//!   [`VirtioDevice`] (what the transport needs) and `event_manager::MutEventSubscriber` are
//!   implemented once, for every `Virtio<D>`. The same `Arc<Mutex<Virtio<D>>>` is handed to
//!   the [`mmio::MmioTransport`] (driven by vCPU threads) and to the event loop.
//! - Queue notifications arrive on the device's own `EventFd`s ([`VirtioDevice::queue_events`]),
//!   which the VMM registers as KVM ioeventfds on the QueueNotify register; the core watches
//!   them from `init` on and the handler ignores them until activated. Every watched
//!   descriptor carries a data token ([`device::Trigger`]).
//! - Activation ([`VirtioDevice::activate`]) runs on the vCPU thread that wrote `DRIVER_OK`,
//!   with the device lock held: it only stores the queues, memory and interrupt and wakes the
//!   event loop through the device's own event; all queue processing happens on the loop.
//! - Each device's run-time state is a plain serde struct (`Block::state`, ...) with a
//!   matching `restore`; the transport's is [`mmio::MmioState`].
//! - Interrupts go through a [`VirtioInterrupt`] (ISR bits + an irqfd `EventFd`).
//! - A guest that hands the device malformed rings or chains puts it into a failed state
//!   ([`VirtioDevice::needs_reset`], reported as `DEVICE_NEEDS_RESET` in the status register);
//!   the VMM keeps running and a driver reset recovers the device.

pub mod block;
mod common;
pub mod device;
pub mod fs;
pub mod mmio;
pub mod net;
#[cfg(test)]
mod test_util;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::Queue;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub(crate) use self::common::{len_u32, new_eventfd, notify_used, serve_queue, Served};
pub use self::common::{DeviceName, EventFdError};
pub use self::device::{RestoreError, Virtio, VirtioCore, VirtioState};

/// Guest memory as devices see it: an atomically replaceable snapshot, so memory hotplug can
/// publish a new layout while devices run.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// `VIRTIO_F_VERSION_1`: every Kestrel device is a modern (1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device status bits (virtio 1.x §2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is done.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bits (ISR).
pub const INTERRUPT_USED_RING: u32 = 1;
/// Configuration-change interrupt bit.
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// A device's interrupt line: ISR bits read by the guest through the transport, and an
/// `EventFd` that the VMM wires to an IOAPIC pin with an irqfd.
#[derive(Debug)]
pub struct VirtioInterrupt {
    isr: AtomicU32,
    evt: EventFd,
}

impl VirtioInterrupt {
    /// An interrupt line that signals `evt`.
    pub fn new(evt: EventFd) -> Self {
        VirtioInterrupt {
            isr: AtomicU32::new(0),
            evt,
        }
    }

    /// Tell the guest a used ring has new entries.
    pub fn signal_used_queue(&self) {
        self.signal(INTERRUPT_USED_RING);
    }

    /// Tell the guest the configuration space changed.
    pub fn signal_config_change(&self) {
        self.signal(INTERRUPT_CONFIG_CHANGE);
    }

    fn signal(&self, bit: u32) {
        self.isr.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("virtio interrupt could not be raised: {e}");
        }
    }

    /// Current ISR bits.
    pub fn status(&self) -> u32 {
        self.isr.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.isr.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clear all bits (device reset).
    pub fn clear(&self) {
        self.isr.store(0, Ordering::SeqCst);
    }

    /// Set the ISR bits of a restored transport (no interrupt is raised).
    pub fn restore_status(&self, bits: u32) {
        self.isr.store(bits, Ordering::SeqCst);
    }

    /// The interrupt's `EventFd` (for the VMM's irqfd registration and for tests).
    pub fn event(&self) -> &EventFd {
        &self.evt
    }
}

/// Why a device refused activation.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ActivateError {
    /// The driver enabled a different number of queues than the device needs.
    #[error("expected {expected} queues, the driver set up {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues the driver made ready.
        got: usize,
    },
    /// A queue's addresses or size are not usable with this guest memory.
    #[error("queue {0} is not valid in guest memory")]
    InvalidQueue(usize),
    /// The device's backend could not be started.
    #[error("backend: {0}")]
    Backend(String),
    /// [`VirtioDevice::activate_restored`] without a restored state that was activated.
    #[error("no saved queues to activate the device with")]
    NoRestoredQueues,
}

/// Copy `data.len()` bytes of a device's config space starting at `offset`; bytes past the end
/// read as zero (the transport's contract for [`VirtioDevice::read_config`]).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// What the virtio-mmio transport needs from a device.
pub trait VirtioDevice: Send {
    /// Virtio device id (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of queues is the slice's length.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (must include [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// The driver accepted these features (a subset of `avail_features`), at `FEATURES_OK`.
    fn set_acked_features(&mut self, features: u64);
    /// Read `data.len()` bytes of the device-specific config space at `offset`. Out-of-range
    /// bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write the device-specific config space. Out-of-range or read-only bytes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set `DRIVER_OK`: take the queues (one per `queue_max_sizes` entry, in order,
    /// ready and validated by the transport), guest memory and the interrupt line.
    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// Activate again with the queues of a restored state (the transport does this when it
    /// restores a `DRIVER_OK` status), through the same path as [`VirtioDevice::activate`].
    fn activate_restored(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let _ = (mem, interrupt);
        Err(ActivateError::NoRestoredQueues)
    }
    /// The driver wrote 0 to the status register: drop queues and in-flight state and return
    /// to the pre-activation state (backends such as files or sockets stay attached).
    fn reset(&mut self);
    /// One `EventFd` per queue, signalled when the guest notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// Whether the device hit a guest error and needs a reset.
    fn needs_reset(&self) -> bool {
        false
    }
    /// Whether the device is activated.
    fn is_activated(&self) -> bool;
    /// A counter the device bumps whenever it changes its own config space (for example a
    /// block device whose backing file was swapped). The transport's ConfigGeneration register
    /// reads this plus its own counter, so drivers re-read a config that changed under them.
    fn config_generation(&self) -> u32 {
        0
    }
}
