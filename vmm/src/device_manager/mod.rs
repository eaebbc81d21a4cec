//! Wires virtio devices into a VM: an MMIO window and an IOAPIC pin each (vm-allocator), an
//! irqfd for the pin, KVM ioeventfds on QueueNotify for every queue, the transport on the MMIO
//! bus, the device on the event loop, and `virtio_mmio.device=` on the kernel command line.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kestrel_arch::layout;
use kestrel_devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use kestrel_devices::virtio::{status, VirtioDevice, VirtioInterrupt};
use kestrel_devices::{catch_panic, Bus, Panicked};
use kvm_ioctls::{IoEventAddress, VmFd};
use thiserror::Error;
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::evloop::Subscriber;
use crate::memory::GuestMem;
use crate::metrics::VmCounters;

/// First IOAPIC pin for virtio devices (0-4 are legacy: PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last IOAPIC pin.
pub const VIRTIO_IRQ_LAST: u32 = 23;
/// Size of the virtio-mmio area in the MMIO hole.
const VIRTIO_MMIO_AREA: u64 = 0x0100_0000;

/// Device wiring failures.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// All MMIO windows or IRQ pins are taken.
    #[error("device {id}: no free {what} (at most {max} virtio devices)")]
    Exhausted {
        /// Device id.
        id: String,
        /// "IRQ pin" or "MMIO window".
        what: &'static str,
        /// Limit.
        max: u32,
    },
    /// Allocator setup failed.
    #[error("resource allocator: {0}")]
    Allocator(String),
    /// An eventfd could not be created.
    #[error("device {id}: eventfd: {source}")]
    EventFd {
        /// Device id.
        id: String,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused an irqfd or ioeventfd.
    #[error("device {id}: {op}: {source}")]
    Kvm {
        /// Device id.
        id: String,
        /// Ioctl.
        op: &'static str,
        /// Error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The MMIO bus refused the window.
    #[error("device {id}: {source}")]
    Bus {
        /// Device id.
        id: String,
        /// Error.
        #[source]
        source: kestrel_devices::BusError,
    },
}

/// What the VM keeps of each virtio device (diagnostics, tests).
pub(crate) struct DeviceHandle {
    pub(crate) id: String,
    pub(crate) transport: Arc<Mutex<MmioTransport>>,
    /// Test-only: the device's next event handler call panics.
    pub(crate) inject_panic: Arc<AtomicBool>,
    /// A duplicate of the device's first queue event: signalling it makes the event loop
    /// call the device's handler.
    pub(crate) notify: Option<EventFd>,
}

/// Allocates and wires devices while the VM is being created.
pub(crate) struct DeviceManager {
    mmio_alloc: AddressAllocator,
    irq_alloc: IdAllocator,
    pub(crate) mmio_bus: Bus,
    pub(crate) subscribers: Vec<Subscriber>,
    pub(crate) cmdline: Vec<String>,
    pub(crate) handles: Vec<DeviceHandle>,
    counters: Arc<VmCounters>,
    mem: GuestMem,
}

impl DeviceManager {
    pub(crate) fn new(mem: GuestMem, counters: Arc<VmCounters>) -> Result<Self, DeviceError> {
        Ok(DeviceManager {
            mmio_alloc: AddressAllocator::new(layout::VIRTIO_MMIO_START, VIRTIO_MMIO_AREA)
                .map_err(|e| DeviceError::Allocator(e.to_string()))?,
            irq_alloc: IdAllocator::new(VIRTIO_IRQ_BASE, VIRTIO_IRQ_LAST)
                .map_err(|e| DeviceError::Allocator(e.to_string()))?,
            mmio_bus: Bus::new(),
            subscribers: Vec::new(),
            cmdline: Vec::new(),
            handles: Vec::new(),
            counters,
            mem,
        })
    }

    /// Wire `dev` (named `id` in errors and logs) into the VM.
    pub(crate) fn add_virtio<D>(
        &mut self,
        vm: &VmFd,
        id: &str,
        dev: Arc<Mutex<D>>,
    ) -> Result<(), DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let max = VIRTIO_IRQ_LAST - VIRTIO_IRQ_BASE + 1;
        let irq = self
            .irq_alloc
            .allocate_id()
            .map_err(|_| DeviceError::Exhausted {
                id: id.to_string(),
                what: "IRQ pin",
                max,
            })?;
        let range = self
            .mmio_alloc
            .allocate(MMIO_WINDOW_SIZE, MMIO_WINDOW_SIZE, AllocPolicy::FirstMatch)
            .map_err(|_| DeviceError::Exhausted {
                id: id.to_string(),
                what: "MMIO window",
                max,
            })?;
        let base = range.start();
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
            id: id.to_string(),
            source,
        })?;
        vm.register_irqfd(&evt, irq)
            .map_err(|source| DeviceError::Kvm {
                id: id.to_string(),
                op: "KVM_IRQFD",
                source,
            })?;
        let interrupt = Arc::new(VirtioInterrupt::new(evt));
        {
            let d = lock_dev(&dev);
            for (i, qevt) in d.queue_events().iter().enumerate() {
                vm.register_ioevent(
                    qevt,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    i as u32,
                )
                .map_err(|source| DeviceError::Kvm {
                    id: id.to_string(),
                    op: "KVM_IOEVENTFD",
                    source,
                })?;
            }
        }
        let as_virtio: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            as_virtio,
            interrupt,
            self.mem.clone(),
        )));
        self.mmio_bus
            .insert(transport.clone(), base, MMIO_WINDOW_SIZE)
            .map_err(|source| DeviceError::Bus {
                id: id.to_string(),
                source,
            })?;
        let notify = lock_dev(&dev)
            .queue_events()
            .first()
            .and_then(|e| e.try_clone().ok());
        let inject_panic = Arc::new(AtomicBool::new(false));
        let contained = Contained::new(
            id,
            dev,
            transport.clone(),
            self.counters.clone(),
            inject_panic.clone(),
        );
        self.subscribers.push(Arc::new(Mutex::new(contained)));
        self.handles.push(DeviceHandle {
            id: id.to_string(),
            transport,
            inject_panic,
            notify,
        });
        self.cmdline
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        tracing::info!("device {id}: virtio-mmio at {base:#x}, irq {irq}");
        Ok(())
    }
}

fn lock_dev<D: ?Sized>(dev: &Mutex<D>) -> std::sync::MutexGuard<'_, D> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

/// How often a failed device checks whether the driver has reset it.
const RESET_POLL: Duration = Duration::from_millis(50);

/// A device's event handler as the event loop sees it: every call into the device (`init`,
/// `process`) runs under [`catch_panic`]. A panic fails the device, not the VM: the transport
/// reports `DEVICE_NEEDS_RESET` (with a config-change interrupt), `device_panics` is counted,
/// and the device's handler is not called again until the driver resets the device. Meanwhile
/// each of its fds that fires is taken off the loop ("parked"; the loop is level-triggered, so
/// an undrained fd would spin it), and a timer polls the transport every [`RESET_POLL`]; once
/// the driver has reset the device its parked fds are watched again (for input, which is what
/// every device's queue, wake-up, timer and backend fds are watched for).
pub(crate) struct Contained {
    id: String,
    dev: Subscriber,
    transport: Arc<Mutex<MmioTransport>>,
    counters: Arc<VmCounters>,
    inject_panic: Arc<AtomicBool>,
    failed: bool,
    parked: Vec<(RawFd, u32)>,
    timer: Option<TimerFd>,
}

impl Contained {
    pub(crate) fn new(
        id: &str,
        dev: Subscriber,
        transport: Arc<Mutex<MmioTransport>>,
        counters: Arc<VmCounters>,
        inject_panic: Arc<AtomicBool>,
    ) -> Self {
        let timer = TimerFd::new()
            .map_err(|e| {
                tracing::warn!("device {id}: no reset timer ({e}); a panic fails it for good")
            })
            .ok();
        Contained {
            id: id.to_string(),
            dev,
            transport,
            counters,
            inject_panic,
            failed: false,
            parked: Vec::new(),
            timer,
        }
    }

    /// Call into the device, containing a panic. Returns false if it panicked.
    fn call(&mut self, f: impl FnOnce(&mut (dyn MutEventSubscriber + Send))) -> bool {
        let (dev, inject, id) = (&self.dev, &self.inject_panic, &self.id);
        let r = catch_panic(|| {
            let mut d = lock_dev(dev);
            if inject.swap(false, Ordering::SeqCst) {
                panic!("injected panic in the event handler of device {id}");
            }
            f(&mut *d)
        });
        match r {
            Ok(()) => true,
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    fn fail(&mut self, e: Panicked) {
        tracing::error!(
            "device {}: event handler {e}; the device needs a reset",
            self.id
        );
        VmCounters::bump(&self.counters.device_panics);
        self.failed = true;
        lock_dev(&self.transport).set_needs_reset();
        if let Some(t) = self.timer.as_mut() {
            if let Err(e) = t.reset(RESET_POLL, Some(RESET_POLL)) {
                tracing::warn!("device {}: cannot arm the reset timer: {e}", self.id);
            }
        }
    }

    fn park(&mut self, events: Events, ops: &mut EventOps) {
        // It may be gone already (the device removed it before panicking).
        let _ = ops.remove(events);
        if !self.parked.contains(&(events.fd(), events.data())) {
            self.parked.push((events.fd(), events.data()));
        }
    }

    /// Timer tick while failed: resume once the driver has reset the device.
    fn check_reset(&mut self, ops: &mut EventOps) {
        if let Some(t) = self.timer.as_mut() {
            let _ = t.wait();
        }
        if !self.failed {
            return;
        }
        let needs_reset = lock_dev(&self.transport).status() & status::DEVICE_NEEDS_RESET != 0;
        if needs_reset {
            return;
        }
        for (fd, data) in self.parked.drain(..) {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                tracing::debug!("device {}: fd {fd} not watched again: {e:?}", self.id);
            }
        }
        self.failed = false;
        if let Some(t) = self.timer.as_mut() {
            let _ = t.clear();
        }
        tracing::info!("device {}: reset by the driver, serving it again", self.id);
    }
}

impl MutEventSubscriber for Contained {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(t) = &self.timer {
            if let Err(e) = ops.add(Events::new(t, EventSet::IN)) {
                tracing::warn!("device {}: cannot watch the reset timer: {e:?}", self.id);
            }
        }
        self.call(|d| d.init(ops));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self
            .timer
            .as_ref()
            .is_some_and(|t| t.as_raw_fd() == events.fd())
        {
            self.check_reset(ops);
            return;
        }
        if self.failed || !self.call(|d| d.process(events, ops)) {
            self.park(events, ops);
        }
    }
}
