//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2).
//!
//! [`MmioTransport`] is the register file a guest driver sees in a 4 KiB MMIO window. It runs on
//! the vCPU threads (through the [`crate::bus::Bus`]), negotiates features, collects the queue
//! layout and, at `DRIVER_OK`, hands validated [`Queue`]s to the device's
//! [`VirtioDevice::activate`]. Everything the guest can write is checked here: illegal status
//! transitions, queue writes after `DRIVER_OK`, features that were not offered and accesses of
//! the wrong width are ignored (and logged at debug level), never a panic.
//!
//! Wiring (done by the VMM): map the transport at a 4 KiB-aligned base with
//! [`MMIO_WINDOW_SIZE`], register `device.queue_events()[i]` as a KVM ioeventfd on
//! `base + QUEUE_NOTIFY_OFFSET` (4 bytes, datamatch `i`), and the interrupt's
//! [`VirtioInterrupt::event`] as the irqfd of the device's IOAPIC pin. A QueueNotify write that
//! reaches the transport anyway (no ioeventfd) signals the same `EventFd`.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use super::device::{queue_in_memory, RestoreError};
use super::{
    status, ActivateError, GuestMem, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::bus::BusDevice;

/// Size of one virtio-mmio window (registers + device config space).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register: where the VMM puts the queues' ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device-specific configuration space in the window.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;
/// `MagicValue`: "virt" in little-endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// `Version`: the modern (non-legacy) virtio-mmio interface.
pub const MMIO_VERSION: u32 = 2;
/// `VendorID` Kestrel reports ("KSTR").
pub const MMIO_VENDOR_ID: u32 = 0x4b53_5452;

/// Register offsets (virtio 1.2 §4.2.2, table "MMIO Device Register Layout"), for drivers in
/// tests, fuzz targets and tiny guests.
pub mod reg {
    /// `MagicValue` (R): `0x74726976`, "virt".
    pub const MAGIC_VALUE: u64 = 0x000;
    /// `Version` (R): 2 for this modern transport.
    pub const VERSION: u64 = 0x004;
    /// `DeviceID` (R): the virtio device type.
    pub const DEVICE_ID: u64 = 0x008;
    /// `VendorID` (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// `DeviceFeatures` (R): the 32 offered feature bits of the page `DeviceFeaturesSel` selects.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// `DeviceFeaturesSel` (W): which 32-bit page `DeviceFeatures` shows.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// `DriverFeatures` (W): the accepted feature bits of the page `DriverFeaturesSel` selects.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// `DriverFeaturesSel` (W): which 32-bit page `DriverFeatures` sets.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// `QueueSel` (W): the queue the `Queue*` registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// `QueueNumMax` (R): the selected queue's largest size (0: no such queue).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// `QueueNum` (W): the selected queue's size.
    pub const QUEUE_NUM: u64 = 0x038;
    /// `QueueReady` (RW): the selected queue is set up (1) or not (0).
    pub const QUEUE_READY: u64 = 0x044;
    /// `QueueNotify` (W): the queue with this index has new buffers.
    pub const QUEUE_NOTIFY: u64 = super::QUEUE_NOTIFY_OFFSET;
    /// `InterruptStatus` (R): pending interrupt reasons (used ring, config change).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// `InterruptAck` (W): clear these `InterruptStatus` bits.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// `Status` (RW): the device status bits ([`super::status`]); writing 0 resets.
    pub const STATUS: u64 = 0x070;
    /// `QueueDescLow` (W): low 32 bits of the descriptor table's guest address.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// `QueueDescHigh` (W): high 32 bits of the descriptor table's address.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// `QueueDriverLow` (W): low 32 bits of the available ring's address.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// `QueueDriverHigh` (W): high 32 bits of the available ring's address.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// `QueueDeviceLow` (W): low 32 bits of the used ring's address.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// `QueueDeviceHigh` (W): high 32 bits of the used ring's address.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// `SHMLenLow` (R): no shared memory regions, so all ones.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// `SHMLenHigh` (R): all ones.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// `SHMBaseLow` (R): all ones.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// `SHMBaseHigh` (R): all ones.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// `ConfigGeneration` (R): changes whenever the config space did.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// What the driver wrote for one queue. Kept raw: the values are only checked at `DRIVER_OK`,
/// so that a bad size or address refuses activation instead of being silently replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    /// QueueNumMax: the device's largest size (not writable; checked on restore).
    pub max_size: u16,
    /// QueueNum as written.
    pub size: u32,
    /// QueueReady.
    pub ready: bool,
    /// QueueDescLow/High.
    pub desc: u64,
    /// QueueDriverLow/High (the available ring).
    pub driver: u64,
    /// QueueDeviceLow/High (the used ring).
    pub device: u64,
}

/// The run-time state of a transport: every register the driver wrote, the ISR bits and the
/// transport's own failure flag ([`MmioTransport::state`], [`MmioTransport::restore`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// The status register (without the device's `DEVICE_NEEDS_RESET`).
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Driver feature pages 0 and 1.
    pub driver_features: u64,
    /// The driver wrote a non-zero value to a feature page above 1.
    pub driver_features_beyond: bool,
    /// QueueSel.
    pub queue_sel: u32,
    /// Each queue's registers.
    pub queues: Vec<QueueRegs>,
    /// Activation had failed (or the event loop reported a device panic).
    pub needs_reset: bool,
    /// The transport's config-generation counter.
    pub config_generation: u32,
    /// InterruptStatus (the ISR bits not yet acknowledged).
    pub interrupt_status: u32,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// Feature page `page` (0: bits 0-31, 1: bits 32-63, above: none) of `features`.
fn feature_page(features: u64, page: u32) -> u32 {
    let [a, b, c, d, e, f, g, h] = features.to_le_bytes();
    match page {
        0 => u32::from_le_bytes([a, b, c, d]),
        1 => u32::from_le_bytes([e, f, g, h]),
        _ => 0,
    }
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// The virtio-mmio register file of one device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<VirtioInterrupt>,
    mem: GuestMem,
    device_type: u32,
    /// Duplicates of the device's queue `EventFd`s, so a QueueNotify write that reaches the
    /// transport does not wait for the device lock (held by the event loop while it works).
    /// `None` where duplicating failed: that queue is notified under the lock.
    notify_evts: Vec<Option<EventFd>>,
    device_features_sel: u32,
    driver_features_sel: u32,
    /// Driver feature pages 0 and 1.
    driver_features: u64,
    /// The driver wrote a non-zero value to a feature page above 1 (nothing is offered there).
    driver_features_beyond: bool,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    status: u32,
    /// Activation failed: `DEVICE_NEEDS_RESET` until the driver resets the device.
    needs_reset: bool,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device`, raising `interrupt`, with queues in `mem`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<VirtioInterrupt>,
        mem: GuestMem,
    ) -> Self {
        let (device_type, queues, notify_evts) = {
            let d = lock(&device);
            let queues = d
                .queue_max_sizes()
                .iter()
                .map(|&m| QueueRegs::new(m))
                .collect();
            let evts = d
                .queue_events()
                .iter()
                .map(|e| {
                    e.try_clone()
                        .map_err(|err| {
                            tracing::warn!("virtio-mmio: cannot dup a queue event: {err}")
                        })
                        .ok()
                })
                .collect();
            (d.device_type(), queues, evts)
        };
        MmioTransport {
            device,
            interrupt,
            mem,
            device_type,
            notify_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_beyond: false,
            queue_sel: 0,
            queues,
            status: 0,
            needs_reset: false,
            config_generation: 0,
        }
    }

    /// The device behind this transport (the same `Arc` the event loop holds).
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The device's interrupt line (its `event()` is the irqfd to register).
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// Tell the driver the device config space changed under it: the next ConfigGeneration
    /// read differs. Devices can also report changes themselves through
    /// [`VirtioDevice::config_generation`]; the register shows the sum of both counters.
    pub fn bump_config_generation(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    /// The device failed outside the transport (its event handler panicked, caught by the
    /// VMM): `DEVICE_NEEDS_RESET` until the driver resets the device, told with a
    /// config-change interrupt.
    pub fn set_needs_reset(&mut self) {
        self.needs_reset = true;
        self.interrupt.signal_config_change();
    }

    /// The run-time state to save (the device's own is saved by the device).
    pub fn state(&self) -> MmioState {
        MmioState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            driver_features_beyond: self.driver_features_beyond,
            queue_sel: self.queue_sel,
            queues: self.queues.clone(),
            needs_reset: self.needs_reset,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
        }
    }

    /// Take over a saved state on a transport just created for the restored device: the
    /// registers and ISR bits come back, and if the driver had the device running
    /// (`DRIVER_OK`) the device is activated again with its restored queues
    /// ([`VirtioDevice::activate_restored`]); if that fails the device reports
    /// `DEVICE_NEEDS_RESET`, as a failed activation does. Refused (nothing changed) when the
    /// queues do not match the device's.
    pub fn restore(&mut self, state: &MmioState) -> Result<(), RestoreError> {
        if state.queues.len() != self.queues.len() {
            return Err(RestoreError::TransportQueues {
                saved: state.queues.len(),
                device: self.queues.len(),
            });
        }
        for (saved, q) in state.queues.iter().zip(&self.queues) {
            RestoreError::check("queue max size", saved.max_size, q.max_size)?;
        }
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.driver_features_beyond = state.driver_features_beyond;
        self.queue_sel = state.queue_sel;
        self.queues.clone_from(&state.queues);
        self.needs_reset = state.needs_reset;
        self.config_generation = state.config_generation;
        self.interrupt.restore_status(state.interrupt_status);
        let running = self.status & (status::DRIVER_OK | status::FAILED) == status::DRIVER_OK;
        if running && !self.needs_reset {
            let r = lock(&self.device).activate_restored(self.mem.clone(), self.interrupt.clone());
            if let Err(e) = r {
                self.activation_failed(&e);
            }
        }
        Ok(())
    }

    /// The status register as the driver reads it.
    pub fn status(&self) -> u32 {
        let mut s = self.status;
        if self.needs_reset || lock(&self.device).needs_reset() {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    fn selected_queue(&self) -> Option<&QueueRegs> {
        self.queues.get(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let features = lock(&self.device).avail_features();
                feature_page(features, self.device_features_sel)
            }
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            // No shared memory regions: a non-existent region has length (and base) -1.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self
                .config_generation
                .wrapping_add(lock(&self.device).config_generation()),
            _ => {
                tracing::debug!("virtio-mmio: read of unknown or write-only register {offset:#x}");
                0
            }
        }
    }

    /// Queue registers take writes only before `DRIVER_OK`, and a ready queue's layout is frozen.
    fn queue_regs_mut(&mut self, offset: u64, layout: bool) -> Option<&mut QueueRegs> {
        if self.status & (status::DRIVER_OK | status::FAILED) != 0 || self.needs_reset {
            tracing::debug!(
                "virtio-mmio: queue register {offset:#x} written in status {:#x}; ignored",
                self.status
            );
            return None;
        }
        let sel = self.queue_sel;
        match self.queues.get_mut(sel as usize) {
            None => {
                tracing::debug!("virtio-mmio: write to {offset:#x} for missing queue {sel}");
                None
            }
            Some(q) if layout && q.ready => {
                tracing::debug!("virtio-mmio: write to {offset:#x} for ready queue {sel}");
                None
            }
            Some(q) => Some(q),
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.queue_regs_mut(offset, true) {
                    q.size = v;
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.queue_regs_mut(offset, false) {
                    q.ready = v == 1;
                }
            }
            reg::QUEUE_DESC_LOW => {
                if let Some(q) = self.queue_regs_mut(offset, true) {
                    set_low(&mut q.desc, v);
                }
            }
            reg::QUEUE_DESC_HIGH => {
                if let Some(q) = self.queue_regs_mut(offset, true) {
                    set_high(&mut q.desc, v);
                }
            }
            reg::QUEUE_DRIVER_LOW => {
                if let Some(q) = self.queue_regs_mut(offset, true) {
                    set_low(&mut q.driver, v);
                }
            }
            reg::QUEUE_DRIVER_HIGH => {
                if let Some(q) = self.queue_regs_mut(offset, true) {
                    set_high(&mut q.driver, v);
                }
            }
            reg::QUEUE_DEVICE_LOW => {
                if let Some(q) = self.queue_regs_mut(offset, true) {
                    set_low(&mut q.device, v);
                }
            }
            reg::QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.queue_regs_mut(offset, true) {
                    set_high(&mut q.device, v);
                }
            }
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            _ => {
                tracing::debug!("virtio-mmio: write of {v:#x} to read-only or unknown {offset:#x}")
            }
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        // Features are accepted between DRIVER and FEATURES_OK only.
        if self.status & (status::DRIVER | status::FEATURES_OK | status::FAILED) != status::DRIVER
            || self.needs_reset
        {
            tracing::debug!(
                "virtio-mmio: driver features written in status {:#x}; ignored",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.driver_features, v),
            1 => set_high(&mut self.driver_features, v),
            sel => {
                if v != 0 {
                    tracing::debug!("virtio-mmio: driver set features {v:#x} in page {sel}");
                    self.driver_features_beyond = true;
                }
            }
        }
    }

    fn notify(&self, v: u32) {
        let r = match self.notify_evts.get(v as usize) {
            Some(Some(evt)) => evt.write(1),
            Some(None) => match lock(&self.device).queue_events().get(v as usize) {
                Some(evt) => evt.write(1),
                None => Ok(()),
            },
            None => {
                tracing::debug!("virtio-mmio: notification for missing queue {v}");
                Ok(())
            }
        };
        if let Err(e) = r {
            tracing::warn!("virtio-mmio: queue {v} notification failed: {e}");
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver reads DEVICE_NEEDS_RESET and may write it back; it is the device's bit.
        let v = v & !status::DEVICE_NEEDS_RESET;
        if v & self.status != self.status {
            tracing::debug!(
                "virtio-mmio: status {v:#x} clears bits of {:#x}; only a reset can",
                self.status
            );
            return;
        }
        let added = v & !self.status;
        if added & status::FAILED != 0 {
            tracing::debug!("virtio-mmio: the driver set FAILED");
            self.status |= status::FAILED;
        }
        if self.status & status::FAILED != 0 || self.needs_reset {
            if added & !status::FAILED != 0 {
                tracing::debug!("virtio-mmio: status {v:#x} after a failure; ignored");
            }
            return;
        }
        for bit in [
            status::ACKNOWLEDGE,
            status::DRIVER,
            status::FEATURES_OK,
            status::DRIVER_OK,
        ] {
            if added & bit == 0 {
                continue;
            }
            let accepted = match bit {
                status::ACKNOWLEDGE => true,
                status::DRIVER => self.status & status::ACKNOWLEDGE != 0,
                status::FEATURES_OK => self.status & status::DRIVER != 0 && self.negotiate(),
                _ => {
                    if self.status & status::FEATURES_OK == 0 {
                        false
                    } else {
                        self.driver_ok();
                        true
                    }
                }
            };
            if !accepted {
                tracing::debug!(
                    "virtio-mmio: status bit {bit:#x} refused in status {:#x}",
                    self.status
                );
                return;
            }
            self.status |= bit;
        }
        let unknown = added
            & !(status::ACKNOWLEDGE
                | status::DRIVER
                | status::FEATURES_OK
                | status::DRIVER_OK
                | status::FAILED);
        if unknown != 0 {
            tracing::debug!("virtio-mmio: unknown status bits {unknown:#x} ignored");
        }
    }

    /// FEATURES_OK: accept the driver's features if they are a subset of the offer and include
    /// VERSION_1 (this is a modern-only transport).
    fn negotiate(&mut self) -> bool {
        let mut dev = lock(&self.device);
        let offered = dev.avail_features();
        let wanted = self.driver_features;
        if self.driver_features_beyond || wanted & !offered != 0 {
            tracing::debug!(
                "virtio-mmio: driver features {wanted:#x} not a subset of {offered:#x}"
            );
            return false;
        }
        if wanted & VIRTIO_F_VERSION_1 == 0 {
            tracing::debug!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
            return false;
        }
        dev.set_acked_features(wanted);
        true
    }

    /// DRIVER_OK: build and validate the queues and activate the device. A failure leaves the
    /// device inactive with DEVICE_NEEDS_RESET set, and tells the driver with a config interrupt.
    fn driver_ok(&mut self) {
        if let Err(e) = self.activate() {
            self.activation_failed(&e);
        }
    }

    /// Activation failed: `DEVICE_NEEDS_RESET`, told with a config interrupt.
    fn activation_failed(&mut self, e: &ActivateError) {
        tracing::warn!(
            "virtio-mmio: activation of device type {} failed: {e}",
            self.device_type
        );
        self.needs_reset = true;
        self.interrupt.signal_config_change();
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        let ready = self.queues.iter().filter(|q| q.ready).count();
        if ready != self.queues.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queues.len(),
                got: ready,
            });
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mem = self.mem.memory();
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, regs) in self.queues.iter().enumerate() {
            let q = build_queue(regs, event_idx, &*mem).ok_or(ActivateError::InvalidQueue(i))?;
            queues.push(q);
        }
        drop(mem);
        lock(&self.device).activate(self.mem.clone(), self.interrupt.clone(), queues)
    }

    /// Status 0: back to the initial state, device included (its backend stays attached).
    fn reset(&mut self) {
        lock(&self.device).reset();
        self.status = 0;
        self.needs_reset = false;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_beyond = false;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.interrupt.clear();
    }
}

/// A ready queue from the driver's values, or `None` if any of them is unusable: size zero,
/// not a power of two or above the maximum, misaligned rings, or rings outside guest memory.
fn build_queue<M: GuestMemory>(regs: &QueueRegs, event_idx: bool, mem: &M) -> Option<Queue> {
    let size = u16::try_from(regs.size).ok()?;
    if size == 0 || size > regs.max_size || !size.is_power_of_two() {
        return None;
    }
    let mut q = Queue::new(regs.max_size).ok()?;
    q.try_set_size(size).ok()?;
    q.try_set_desc_table_address(GuestAddress(regs.desc)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(regs.driver))
        .ok()?;
    q.try_set_used_ring_address(GuestAddress(regs.device))
        .ok()?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    queue_in_memory(&q, mem).then_some(q)
}

fn lock<'a>(
    dev: &'a Mutex<dyn VirtioDevice + 'static>,
) -> MutexGuard<'a, dyn VirtioDevice + 'static> {
    // A device that panicked keeps its registers readable; never take the vCPU down with it.
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            data.fill(0);
            let ok_width = matches!(data.len(), 1 | 2 | 4 | 8);
            let in_window = offset
                .checked_add(data.len() as u64)
                .is_some_and(|end| end <= MMIO_WINDOW_SIZE);
            if ok_width && in_window {
                lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                tracing::debug!(
                    "virtio-mmio: config read of {} bytes at {offset:#x} ignored",
                    data.len()
                );
            }
            return;
        }
        if data.len() != 4 {
            tracing::debug!(
                "virtio-mmio: {}-byte register read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            let ok_width = matches!(data.len(), 1 | 2 | 4 | 8);
            let in_window = offset
                .checked_add(data.len() as u64)
                .is_some_and(|end| end <= MMIO_WINDOW_SIZE);
            if ok_width && in_window {
                lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                tracing::debug!(
                    "virtio-mmio: config write of {} bytes at {offset:#x} ignored",
                    data.len()
                );
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "virtio-mmio: {}-byte register write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_RING};
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    const FEATURE_A: u64 = 1 << 3;
    const FEATURE_HIGH: u64 = 1 << 40;
    const MEM_SIZE: usize = 0x10000;

    struct Dummy {
        features: u64,
        acked: Option<u64>,
        config: Vec<u8>,
        config_writes: Vec<(u64, Vec<u8>)>,
        max_sizes: Vec<u16>,
        evts: Vec<EventFd>,
        queues: Option<Vec<Queue>>,
        resets: usize,
        refuse: bool,
        broken: bool,
        generation: u32,
    }

    impl Dummy {
        fn new() -> Self {
            Dummy {
                features: VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | FEATURE_A | FEATURE_HIGH,
                acked: None,
                config: (0u8..16).collect(),
                config_writes: Vec::new(),
                max_sizes: vec![16, 8],
                evts: (0..2)
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                    .collect(),
                queues: None,
                resets: 0,
                refuse: false,
                broken: false,
                generation: 0,
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn avail_features(&self) -> u64 {
            self.features
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.config_writes.push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: GuestMem,
            _interrupt: Arc<VirtioInterrupt>,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            if self.refuse {
                return Err(ActivateError::Backend("refused".into()));
            }
            self.queues = Some(queues);
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.queues = None;
            self.acked = None;
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn needs_reset(&self) -> bool {
            self.broken
        }
        fn is_activated(&self) -> bool {
            self.queues.is_some()
        }
        fn config_generation(&self) -> u32 {
            self.generation
        }
    }

    struct Fixture {
        t: MmioTransport,
        dev: Arc<Mutex<Dummy>>,
        irq: Arc<VirtioInterrupt>,
    }

    impl Fixture {
        fn new() -> Self {
            let dev = Arc::new(Mutex::new(Dummy::new()));
            let irq = Arc::new(VirtioInterrupt::new(
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ));
            let mem = GuestMemoryAtomic::new(
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
            );
            let t = MmioTransport::new(dev.clone(), irq.clone(), mem);
            Fixture { t, dev, irq }
        }
        fn r(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.t.read(offset, &mut b);
            u32::from_le_bytes(b)
        }
        fn w(&mut self, offset: u64, v: u32) {
            self.t.write(offset, &v.to_le_bytes());
        }
        fn status(&mut self) -> u32 {
            self.r(reg::STATUS)
        }
        fn add_status(&mut self, bit: u32) {
            let s = self.status();
            self.w(reg::STATUS, s | bit);
        }
        fn set_driver_features(&mut self, f: u64) {
            self.w(reg::DRIVER_FEATURES_SEL, 0);
            self.w(reg::DRIVER_FEATURES, feature_page(f, 0));
            self.w(reg::DRIVER_FEATURES_SEL, 1);
            self.w(reg::DRIVER_FEATURES, feature_page(f, 1));
        }
        /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
        fn negotiate(&mut self, f: u64) {
            self.add_status(status::ACKNOWLEDGE);
            self.add_status(status::DRIVER);
            self.set_driver_features(f);
            self.add_status(status::FEATURES_OK);
        }
        /// Make queue `idx` not ready and set it up again.
        fn redo_queue(&mut self, idx: u32, size: u32, base: u64) {
            self.w(reg::QUEUE_SEL, idx);
            self.w(reg::QUEUE_READY, 0);
            self.setup_queue(idx, size, base);
        }
        fn setup_queue(&mut self, idx: u32, size: u32, base: u64) {
            self.w(reg::QUEUE_SEL, idx);
            self.w(reg::QUEUE_NUM, size);
            self.w(reg::QUEUE_DESC_LOW, feature_page(base, 0));
            self.w(reg::QUEUE_DESC_HIGH, feature_page(base, 1));
            self.w(reg::QUEUE_DRIVER_LOW, feature_page(base + 0x1000, 0));
            self.w(reg::QUEUE_DRIVER_HIGH, feature_page(base + 0x1000, 1));
            self.w(reg::QUEUE_DEVICE_LOW, feature_page(base + 0x2000, 0));
            self.w(reg::QUEUE_DEVICE_HIGH, feature_page(base + 0x2000, 1));
            self.w(reg::QUEUE_READY, 1);
        }
        /// A fully set up device, up to (not including) DRIVER_OK.
        fn ready(&mut self) {
            self.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
            self.setup_queue(0, 16, 0x1000);
            self.setup_queue(1, 8, 0x4000);
        }
        fn activated(&self) -> bool {
            self.dev.lock().unwrap().is_activated()
        }
    }

    const FULL: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identification_registers() {
        let mut f = Fixture::new();
        assert_eq!(f.r(reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(f.r(reg::VERSION), 2);
        assert_eq!(f.r(reg::DEVICE_ID), 42);
        assert_eq!(f.r(reg::VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(f.r(reg::CONFIG_GENERATION), 0);
        assert_eq!(f.r(reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(f.r(reg::SHM_LEN_HIGH), u32::MAX);
        // Write-only registers read 0; writes to read-only ones change nothing.
        assert_eq!(f.r(reg::QUEUE_NOTIFY), 0);
        assert_eq!(f.r(reg::DRIVER_FEATURES), 0);
        f.w(reg::MAGIC_VALUE, 0);
        f.w(reg::DEVICE_ID, 7);
        assert_eq!(f.r(reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(f.r(reg::DEVICE_ID), 42);
        assert_eq!(f.t.device().lock().unwrap().device_type(), 42);
        assert!(Arc::ptr_eq(f.t.interrupt(), &f.irq));
    }

    #[test]
    fn feature_pages() {
        let mut f = Fixture::new();
        let offered = f.dev.lock().unwrap().features;
        f.w(reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(f.r(reg::DEVICE_FEATURES), feature_page(offered, 0));
        f.w(reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(f.r(reg::DEVICE_FEATURES), feature_page(offered, 1));
        f.w(reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(f.r(reg::DEVICE_FEATURES), 0);
        f.w(reg::DEVICE_FEATURES_SEL, u32::MAX);
        assert_eq!(f.r(reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn features_accepted_from_both_pages() {
        let mut f = Fixture::new();
        let wanted = VIRTIO_F_VERSION_1 | FEATURE_A | FEATURE_HIGH;
        f.negotiate(wanted);
        assert_eq!(
            f.status(),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
        );
        assert_eq!(f.dev.lock().unwrap().acked, Some(wanted));
    }

    #[test]
    fn unoffered_features_rejected() {
        let mut f = Fixture::new();
        f.negotiate(VIRTIO_F_VERSION_1 | 1 << 5);
        assert_eq!(f.status(), status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!(f.dev.lock().unwrap().acked, None);
        // A bit in a page above 1 (nothing is offered there) is also refused.
        let mut f = Fixture::new();
        f.add_status(status::ACKNOWLEDGE);
        f.add_status(status::DRIVER);
        f.set_driver_features(VIRTIO_F_VERSION_1);
        f.w(reg::DRIVER_FEATURES_SEL, 2);
        f.w(reg::DRIVER_FEATURES, 1);
        f.add_status(status::FEATURES_OK);
        assert_eq!(f.status() & status::FEATURES_OK, 0);
        // The driver can correct its choice and try again.
        let mut f = Fixture::new();
        f.negotiate(VIRTIO_F_VERSION_1 | 1 << 5);
        f.set_driver_features(VIRTIO_F_VERSION_1);
        f.add_status(status::FEATURES_OK);
        assert_ne!(f.status() & status::FEATURES_OK, 0);
    }

    #[test]
    fn version_1_required() {
        let mut f = Fixture::new();
        f.negotiate(FEATURE_A);
        assert_eq!(f.status() & status::FEATURES_OK, 0);
        assert_eq!(f.dev.lock().unwrap().acked, None);
    }

    #[test]
    fn driver_features_only_between_driver_and_features_ok() {
        let mut f = Fixture::new();
        // Before DRIVER: ignored, so negotiation later lacks VERSION_1 ... unless rewritten.
        f.set_driver_features(VIRTIO_F_VERSION_1);
        f.add_status(status::ACKNOWLEDGE);
        f.add_status(status::DRIVER);
        f.add_status(status::FEATURES_OK);
        assert_eq!(f.status() & status::FEATURES_OK, 0);
        let mut f = Fixture::new();
        f.negotiate(VIRTIO_F_VERSION_1);
        // After FEATURES_OK: ignored.
        f.set_driver_features(VIRTIO_F_VERSION_1 | FEATURE_A);
        f.setup_queue(0, 16, 0x1000);
        f.setup_queue(1, 8, 0x4000);
        f.add_status(status::DRIVER_OK);
        assert_eq!(f.status(), FULL);
        assert_eq!(f.dev.lock().unwrap().acked, Some(VIRTIO_F_VERSION_1));
    }

    #[test]
    fn activation_hands_over_validated_queues() {
        let mut f = Fixture::new();
        f.ready();
        f.w(reg::QUEUE_SEL, 0);
        assert_eq!(f.r(reg::QUEUE_READY), 1);
        f.add_status(status::DRIVER_OK);
        assert_eq!(f.status(), FULL);
        let d = f.dev.lock().unwrap();
        let q = d.queues.as_ref().unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].size(), 16);
        assert_eq!(q[0].desc_table(), 0x1000);
        assert_eq!(q[0].avail_ring(), 0x2000);
        assert_eq!(q[0].used_ring(), 0x3000);
        assert!(q[0].ready() && q[0].event_idx_enabled());
        assert_eq!(q[1].size(), 8);
        assert_eq!(q[1].desc_table(), 0x4000);
    }

    #[test]
    fn queue_num_max_and_missing_queues() {
        let mut f = Fixture::new();
        f.w(reg::QUEUE_SEL, 0);
        assert_eq!(f.r(reg::QUEUE_NUM_MAX), 16);
        f.w(reg::QUEUE_SEL, 1);
        assert_eq!(f.r(reg::QUEUE_NUM_MAX), 8);
        f.w(reg::QUEUE_SEL, 2);
        assert_eq!(f.r(reg::QUEUE_NUM_MAX), 0);
        assert_eq!(f.r(reg::QUEUE_READY), 0);
        // Writes for a missing queue are ignored (no panic).
        f.negotiate(VIRTIO_F_VERSION_1);
        f.setup_queue(7, 16, 0x1000);
        f.w(reg::QUEUE_SEL, 7);
        assert_eq!(f.r(reg::QUEUE_READY), 0);
    }

    /// Each broken queue setup refuses activation with DEVICE_NEEDS_RESET and a config
    /// interrupt.
    #[test]
    fn queue_setup_errors_refuse_activation() {
        type Breaker = fn(&mut Fixture);
        let cases: &[(&str, Breaker)] = &[
            ("size 0", |f| {
                f.w(reg::QUEUE_SEL, 0);
                f.w(reg::QUEUE_READY, 0);
                f.w(reg::QUEUE_NUM, 0);
                f.w(reg::QUEUE_READY, 1);
            }),
            ("size not a power of two", |f| f.redo_queue(0, 12, 0x1000)),
            ("size above max", |f| f.redo_queue(1, 16, 0x4000)),
            ("size above u16", |f| f.redo_queue(0, 0x1_0010, 0x1000)),
            ("queue not ready", |f| {
                f.w(reg::QUEUE_SEL, 1);
                f.w(reg::QUEUE_READY, 0);
            }),
            ("rings outside memory", |f| {
                f.redo_queue(0, 16, 0x1_0000_0000)
            }),
            ("rings past the end of memory", |f| {
                f.redo_queue(1, 8, MEM_SIZE as u64 - 0x1800)
            }),
            ("misaligned descriptor table", |f| {
                f.w(reg::QUEUE_SEL, 0);
                f.w(reg::QUEUE_READY, 0);
                f.w(reg::QUEUE_DESC_LOW, 0x1008);
                f.w(reg::QUEUE_READY, 1);
            }),
            ("device refuses", |f| f.dev.lock().unwrap().refuse = true),
        ];
        for (what, breaker) in cases {
            let mut f = Fixture::new();
            f.ready();
            breaker(&mut f);
            while f.irq.event().read().is_ok() {}
            f.add_status(status::DRIVER_OK);
            assert!(!f.activated(), "{what}: activated");
            assert_eq!(
                f.status(),
                FULL | status::DEVICE_NEEDS_RESET,
                "{what}: status"
            );
            assert_ne!(
                f.r(reg::INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE,
                0,
                "{what}"
            );
            assert!(f.irq.event().read().is_ok(), "{what}: no interrupt");
            // Nothing but a reset gets the device out of this.
            let s = f.status();
            f.w(reg::STATUS, s);
            assert!(!f.activated(), "{what}");
            f.w(reg::STATUS, 0);
            assert_eq!(f.status(), 0, "{what}");
            f.dev.lock().unwrap().refuse = false;
            f.ready();
            f.add_status(status::DRIVER_OK);
            assert!(f.activated(), "{what}: not recovered by reset");
        }
    }

    #[test]
    fn queue_writes_after_driver_ok_or_to_ready_queue_ignored() {
        let mut f = Fixture::new();
        f.ready();
        // The queue is ready: its layout is frozen, but it can be made not-ready.
        f.w(reg::QUEUE_SEL, 0);
        f.w(reg::QUEUE_NUM, 4);
        f.w(reg::QUEUE_DESC_LOW, 0x8000);
        f.w(reg::QUEUE_READY, 0);
        assert_eq!(f.r(reg::QUEUE_READY), 0);
        f.w(reg::QUEUE_READY, 1);
        f.add_status(status::DRIVER_OK);
        assert!(f.activated());
        {
            let d = f.dev.lock().unwrap();
            let q = &d.queues.as_ref().unwrap()[0];
            assert_eq!(q.size(), 16);
            assert_eq!(q.desc_table(), 0x1000);
        }
        // After DRIVER_OK nothing about queues changes.
        f.w(reg::QUEUE_SEL, 1);
        f.w(reg::QUEUE_READY, 0);
        assert_eq!(f.r(reg::QUEUE_READY), 1);
        f.w(reg::QUEUE_NUM, 2);
        f.w(reg::QUEUE_DESC_LOW, 0x9000);
        assert_eq!(f.t.queues[1].size, 8);
        assert_eq!(f.t.queues[1].desc, 0x4000);
    }

    #[test]
    fn reset_from_every_state() {
        type Step = fn(&mut Fixture);
        let steps: &[(&str, Step)] = &[
            ("initial", |_| {}),
            ("acknowledge", |f| f.add_status(status::ACKNOWLEDGE)),
            ("driver", |f| {
                f.add_status(status::ACKNOWLEDGE);
                f.add_status(status::DRIVER);
                f.set_driver_features(VIRTIO_F_VERSION_1);
            }),
            ("features_ok", |f| f.negotiate(VIRTIO_F_VERSION_1)),
            ("queues set up", |f| f.ready()),
            ("driver_ok", |f| {
                f.ready();
                f.add_status(status::DRIVER_OK);
            }),
            ("failed", |f| {
                f.ready();
                f.add_status(status::FAILED);
            }),
            ("needs reset", |f| {
                f.ready();
                f.w(reg::QUEUE_SEL, 1);
                f.w(reg::QUEUE_READY, 0);
                f.add_status(status::DRIVER_OK);
            }),
            ("device broken", |f| {
                f.ready();
                f.add_status(status::DRIVER_OK);
                f.dev.lock().unwrap().broken = true;
            }),
        ];
        for (what, step) in steps {
            let mut f = Fixture::new();
            step(&mut f);
            f.irq.signal_used_queue();
            f.w(reg::QUEUE_SEL, 1);
            f.w(reg::DEVICE_FEATURES_SEL, 1);
            f.w(reg::STATUS, 0);
            f.dev.lock().unwrap().broken = false;
            assert_eq!(f.status(), 0, "{what}");
            assert_eq!(f.dev.lock().unwrap().resets, 1, "{what}");
            assert!(!f.activated(), "{what}");
            assert_eq!(f.r(reg::INTERRUPT_STATUS), 0, "{what}");
            assert_eq!(f.t.queue_sel, 0, "{what}");
            assert_eq!(f.t.device_features_sel, 0, "{what}");
            for (i, q) in f.t.queues.iter().enumerate() {
                assert_eq!(*q, QueueRegs::new(q.max_size), "{what}: queue {i}");
            }
            // Driver features were cleared: FEATURES_OK without writing them fails.
            f.add_status(status::ACKNOWLEDGE);
            f.add_status(status::DRIVER);
            f.add_status(status::FEATURES_OK);
            assert_eq!(f.status() & status::FEATURES_OK, 0, "{what}");
            // And the device works again after a reset.
            f.w(reg::STATUS, 0);
            f.ready();
            f.add_status(status::DRIVER_OK);
            assert!(f.activated(), "{what}");
        }
    }

    #[test]
    fn illegal_transitions_ignored() {
        let mut f = Fixture::new();
        // DRIVER before ACKNOWLEDGE.
        f.w(reg::STATUS, status::DRIVER);
        assert_eq!(f.status(), 0);
        // FEATURES_OK / DRIVER_OK out of order.
        f.w(reg::STATUS, status::ACKNOWLEDGE | status::FEATURES_OK);
        assert_eq!(f.status(), status::ACKNOWLEDGE);
        f.w(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(f.status(), status::ACKNOWLEDGE | status::DRIVER);
        assert!(!f.activated());
        // Clearing a bit without a reset.
        f.w(reg::STATUS, status::DRIVER);
        assert_eq!(f.status(), status::ACKNOWLEDGE | status::DRIVER);
        // Several steps in one write are taken in order.
        let mut g = Fixture::new();
        g.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!(g.status(), status::ACKNOWLEDGE | status::DRIVER);
        // The driver cannot set DEVICE_NEEDS_RESET; writing it back is harmless.
        g.w(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DEVICE_NEEDS_RESET,
        );
        assert_eq!(g.status(), status::ACKNOWLEDGE | status::DRIVER);
    }

    #[test]
    fn failed_is_honoured() {
        let mut f = Fixture::new();
        f.ready();
        f.add_status(status::FAILED);
        assert_ne!(f.status() & status::FAILED, 0);
        f.add_status(status::DRIVER_OK);
        assert!(!f.activated());
        assert_eq!(f.status() & status::DRIVER_OK, 0);
        f.w(reg::STATUS, 0);
        assert_eq!(f.status(), 0);
    }

    #[test]
    fn device_needs_reset_reported() {
        let mut f = Fixture::new();
        f.ready();
        f.add_status(status::DRIVER_OK);
        assert_eq!(f.status(), FULL);
        f.dev.lock().unwrap().broken = true;
        assert_eq!(f.status(), FULL | status::DEVICE_NEEDS_RESET);
    }

    #[test]
    fn config_space_widths_and_bounds() {
        let mut f = Fixture::new();
        let mut b1 = [0u8; 1];
        f.t.read(0x100 + 3, &mut b1);
        assert_eq!(b1, [3]);
        let mut b2 = [0u8; 2];
        f.t.read(0x102, &mut b2);
        assert_eq!(b2, [2, 3]);
        let mut b4 = [0u8; 4];
        f.t.read(0x104, &mut b4);
        assert_eq!(b4, [4, 5, 6, 7]);
        let mut b8 = [0u8; 8];
        f.t.read(0x108, &mut b8);
        assert_eq!(b8, [8, 9, 10, 11, 12, 13, 14, 15]);
        // Beyond the device's config: zeros (the device pads).
        let mut b4 = [0xffu8; 4];
        f.t.read(0x10e, &mut b4);
        assert_eq!(b4, [14, 15, 0, 0]);
        let mut b8 = [0xffu8; 8];
        f.t.read(0x800, &mut b8);
        assert_eq!(b8, [0; 8]);
        // Odd widths and accesses past the window: zeros, not forwarded.
        let mut b3 = [0xffu8; 3];
        f.t.read(0x100, &mut b3);
        assert_eq!(b3, [0; 3]);
        let mut b8 = [0xffu8; 8];
        f.t.read(MMIO_WINDOW_SIZE - 4, &mut b8);
        assert_eq!(b8, [0; 8]);
        let mut b4 = [0xffu8; 4];
        f.t.read(u64::MAX - 1, &mut b4);
        assert_eq!(b4, [0; 4]);
        // Writes of the allowed widths are forwarded with the config-relative offset.
        f.t.write(0x101, &[1]);
        f.t.write(0x102, &[1, 2]);
        f.t.write(0x104, &[1, 2, 3, 4]);
        f.t.write(0x108, &[0; 8]);
        f.t.write(0x100, &[0; 3]);
        f.t.write(MMIO_WINDOW_SIZE - 2, &[0; 4]);
        let writes = &f.dev.lock().unwrap().config_writes;
        let offsets: Vec<u64> = writes.iter().map(|w| w.0).collect();
        assert_eq!(offsets, vec![1, 2, 4, 8]);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let mut f = Fixture::new();
        assert_eq!(f.r(reg::INTERRUPT_STATUS), 0);
        f.irq.signal_used_queue();
        f.irq.signal_config_change();
        assert_eq!(
            f.r(reg::INTERRUPT_STATUS),
            INTERRUPT_USED_RING | INTERRUPT_CONFIG_CHANGE
        );
        f.w(reg::INTERRUPT_ACK, INTERRUPT_USED_RING);
        assert_eq!(f.r(reg::INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
        f.w(reg::INTERRUPT_ACK, INTERRUPT_CONFIG_CHANGE);
        assert_eq!(f.r(reg::INTERRUPT_STATUS), 0);
        // Writing the status register does not touch the ISR.
        f.irq.signal_used_queue();
        f.w(reg::INTERRUPT_STATUS, 0);
        assert_eq!(f.r(reg::INTERRUPT_STATUS), INTERRUPT_USED_RING);
    }

    #[test]
    fn queue_notify_signals_the_right_eventfd() {
        let mut f = Fixture::new();
        f.w(reg::QUEUE_NOTIFY, 1);
        {
            let d = f.dev.lock().unwrap();
            assert_eq!(d.evts[1].read().unwrap(), 1);
            assert!(d.evts[0].read().is_err());
        }
        f.w(reg::QUEUE_NOTIFY, 0);
        f.w(reg::QUEUE_NOTIFY, 0);
        assert_eq!(f.dev.lock().unwrap().evts[0].read().unwrap(), 2);
        // The device lock is not needed (the event loop may hold it for a while).
        {
            let d = f.dev.lock().unwrap();
            f.t.write(reg::QUEUE_NOTIFY, &1u32.to_le_bytes());
            assert_eq!(d.evts[1].read().unwrap(), 1);
        }
        // A queue that does not exist: nothing happens.
        f.w(reg::QUEUE_NOTIFY, 2);
        f.w(reg::QUEUE_NOTIFY, u32::MAX);
        let d = f.dev.lock().unwrap();
        assert!(d.evts[0].read().is_err() && d.evts[1].read().is_err());
    }

    #[test]
    fn wrong_width_register_accesses_ignored() {
        let mut f = Fixture::new();
        for width in [1usize, 2, 3, 8] {
            let mut b = vec![0xffu8; width];
            f.t.read(reg::MAGIC_VALUE, &mut b);
            assert!(b.iter().all(|&x| x == 0), "read width {width}");
        }
        f.t.write(reg::STATUS, &[status::ACKNOWLEDGE.to_le_bytes()[0]]);
        f.t.write(reg::STATUS, &[1, 0]);
        f.t.write(reg::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f.status(), 0);
        f.t.write(reg::QUEUE_NOTIFY, &[0]);
        assert!(f.dev.lock().unwrap().evts[0].read().is_err());
        // Unaligned 4-byte accesses hit no register.
        f.t.write(reg::STATUS + 1, &1u32.to_le_bytes());
        assert_eq!(f.status(), 0);
        let mut b = [0xffu8; 4];
        f.t.read(reg::MAGIC_VALUE + 1, &mut b);
        assert_eq!(b, [0; 4]);
    }

    /// Registers a driver reads (some through the queue selector, which they move).
    fn driver_view(f: &mut Fixture) -> Vec<u32> {
        let mut v: Vec<u32> = [
            reg::DEVICE_FEATURES,
            reg::INTERRUPT_STATUS,
            reg::STATUS,
            reg::CONFIG_GENERATION,
        ]
        .into_iter()
        .map(|o| f.r(o))
        .collect();
        for q in 0..2 {
            f.w(reg::QUEUE_SEL, q);
            v.extend([f.r(reg::QUEUE_NUM_MAX), f.r(reg::QUEUE_READY)]);
        }
        v
    }

    #[test]
    fn restored_transport_reports_the_same_registers() {
        let mut f = Fixture::new();
        f.ready();
        f.w(reg::QUEUE_SEL, 1);
        f.w(reg::DEVICE_FEATURES_SEL, 1);
        f.irq.signal_used_queue();
        f.t.bump_config_generation();
        let state = f.t.state();
        let json = serde_json::to_string(&state).unwrap();
        let before = driver_view(&mut f);

        let mut g = Fixture::new();
        g.t.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(g.t.state(), state);
        assert_eq!(driver_view(&mut g), before);
        // The driver goes on where it was: DRIVER_OK activates the device.
        g.add_status(status::DRIVER_OK);
        assert!(g.activated());
        assert_eq!(g.dev.lock().unwrap().queues.as_ref().unwrap()[1].size(), 8);

        // A saved DRIVER_OK needs the device's restored queues; this device has none, so the
        // transport reports DEVICE_NEEDS_RESET, as for a failed activation.
        let running = g.t.state();
        let mut h = Fixture::new();
        h.t.restore(&running).unwrap();
        assert!(!h.activated());
        assert_eq!(h.status(), FULL | status::DEVICE_NEEDS_RESET);
        // A state for other queues is refused and changes nothing.
        let mut other = running.clone();
        other.queues[0].max_size = 32;
        let mut k = Fixture::new();
        assert!(k.t.restore(&other).is_err());
        assert_eq!(k.t.state(), Fixture::new().t.state());
    }

    #[test]
    fn config_generation_counts_both_sides() {
        let mut f = Fixture::new();
        assert_eq!(f.r(reg::CONFIG_GENERATION), 0);
        f.t.bump_config_generation();
        assert_eq!(f.r(reg::CONFIG_GENERATION), 1);
        f.dev.lock().unwrap().generation = u32::MAX;
        assert_eq!(f.r(reg::CONFIG_GENERATION), 0);
        f.t.bump_config_generation();
        assert_eq!(f.r(reg::CONFIG_GENERATION), 1);
        // A reset keeps the counter moving forward (a driver never sees an old value again).
        f.w(reg::STATUS, 0);
        assert_eq!(f.r(reg::CONFIG_GENERATION), 1);
    }
}
