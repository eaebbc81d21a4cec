//! Wires virtio devices into a VM: an MMIO window and an IOAPIC pin each (vm-allocator), an
//! irqfd for the pin, KVM ioeventfds on QueueNotify for every queue, the transport on the MMIO
//! bus, the device on the event loop, and `virtio_mmio.device=` on the kernel command line.

use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kestrel_arch::layout;
use kestrel_devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use kestrel_devices::virtio::{VirtioDevice, VirtioInterrupt};
use kestrel_devices::Bus;
use kvm_ioctls::{IoEventAddress, VmFd};
use thiserror::Error;
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vmm_sys_util::eventfd::EventFd;

use crate::evloop::Subscriber;
use crate::memory::GuestMem;

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

/// Allocates and wires devices while the VM is being created.
pub(crate) struct DeviceManager {
    mmio_alloc: AddressAllocator,
    irq_alloc: IdAllocator,
    pub(crate) mmio_bus: Bus,
    pub(crate) subscribers: Vec<Subscriber>,
    pub(crate) cmdline: Vec<String>,
    mem: GuestMem,
}

impl DeviceManager {
    pub(crate) fn new(mem: GuestMem) -> Result<Self, DeviceError> {
        Ok(DeviceManager {
            mmio_alloc: AddressAllocator::new(layout::VIRTIO_MMIO_START, VIRTIO_MMIO_AREA)
                .map_err(|e| DeviceError::Allocator(e.to_string()))?,
            irq_alloc: IdAllocator::new(VIRTIO_IRQ_BASE, VIRTIO_IRQ_LAST)
                .map_err(|e| DeviceError::Allocator(e.to_string()))?,
            mmio_bus: Bus::new(),
            subscribers: Vec::new(),
            cmdline: Vec::new(),
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
            let d = dev.lock().unwrap_or_else(|p| p.into_inner());
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
        let sub: Subscriber = dev;
        self.subscribers.push(sub);
        self.cmdline
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        tracing::info!("device {id}: virtio-mmio at {base:#x}, irq {irq}");
        Ok(())
    }
}
