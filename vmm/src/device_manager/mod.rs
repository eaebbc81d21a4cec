//! The VM's devices.
//!
//! - this module wires virtio devices into a VM: an MMIO window and an IOAPIC pin each
//!   (vm-allocator), an irqfd for the pin, KVM ioeventfds on QueueNotify for every queue, the
//!   transport on the MMIO bus, the device on the event loop (panics contained:
//!   [`contained`]), and `virtio_mmio.device=` on the kernel command line;
//! - [`registry`]: the devices by id and the [`Device`] handle the API hands out;
//! - [`legacy`]: serial port, CMOS and i8042 on the port-I/O bus.

pub(crate) mod contained;
pub(crate) mod legacy;
pub(crate) mod registry;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use kestrel_api::ConfigError;
use kestrel_arch::layout;
use kestrel_devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use kestrel_devices::virtio::VirtioInterrupt;
use kestrel_devices::Bus;
use kvm_ioctls::{IoEventAddress, VmFd};
use thiserror::Error;
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vmm_sys_util::eventfd::EventFd;

use crate::evloop::Subscriber;
use crate::memory::GuestMem;
use crate::metrics::VmCounters;
use contained::Contained;
pub use registry::{BlockControl, Device, DeviceKind, DeviceMetrics, FsControl, NetControl};
use registry::{DeviceRegistry, Model};

/// First IOAPIC pin for virtio devices (0-4 are legacy: PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last IOAPIC pin.
pub const VIRTIO_IRQ_LAST: u32 = 23;
/// Size of the virtio-mmio area in the MMIO hole.
const VIRTIO_MMIO_AREA: u64 = 0x0100_0000;

/// Why a device could not be created, wired into the VM or changed.
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
    /// Two devices of the VM would have the same id (ids are shared by every kind: drive ids,
    /// iface ids, `vsock`, `fs<N>`).
    #[error("device {id}: the id is taken by a {kind:?} device")]
    DuplicateId {
        /// The id.
        id: String,
        /// The kind of the device that has it.
        kind: DeviceKind,
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
    /// A bus refused the device's range.
    #[error("device {id}: {source}")]
    Bus {
        /// Device id.
        id: String,
        /// Error.
        #[source]
        source: kestrel_devices::BusError,
    },
    /// A request's configuration was rejected (e.g. a rate limiter); nothing changed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A block device could not be created or changed.
    #[error("drives[{drive_id}]: {source}")]
    Block {
        /// The drive.
        drive_id: String,
        /// Why.
        #[source]
        source: kestrel_devices::virtio::block::BlockError,
    },
    /// A network interface could not be created or changed.
    #[error("network-interfaces[{iface_id}]: {source}")]
    Net {
        /// The interface.
        iface_id: String,
        /// Why.
        #[source]
        source: kestrel_devices::virtio::net::NetError,
    },
    /// The vsock device could not be created.
    #[error("vsock: {0}")]
    Vsock(#[source] kestrel_devices::virtio::vsock::VsockError),
    /// An in-process virtio-fs share could not be created.
    #[error("fs[{tag}]: {source}")]
    Fs {
        /// The share's tag.
        tag: String,
        /// Why.
        #[source]
        source: kestrel_devices::virtio::fs::FsError,
    },
    /// A vhost-user-fs backend could not be connected.
    #[error("fs[{tag}]: vhost-user: {source}")]
    VhostUserFs {
        /// The share's tag.
        tag: String,
        /// Why.
        #[source]
        source: kestrel_devices::virtio::fs::vhost_user::VhostUserFsError,
    },
}

/// The KVM calls that wire a device's interrupt and queue notifications: implemented by the
/// VM fd; a trait so the wiring can be tested without `/dev/kvm`.
pub(crate) trait IrqAndIoEvents {
    /// Signal guest interrupt `gsi` when `evt` is written (`KVM_IRQFD`).
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
    /// Write `evt` when the guest writes `value` to MMIO address `addr` (`KVM_IOEVENTFD`).
    fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        value: u32,
    ) -> Result<(), kvm_ioctls::Error>;
}

impl IrqAndIoEvents for VmFd {
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        VmFd::register_irqfd(self, evt, gsi)
    }

    fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        value: u32,
    ) -> Result<(), kvm_ioctls::Error> {
        self.register_ioevent(evt, &IoEventAddress::Mmio(addr), value)
    }
}

fn lock_dev<D: ?Sized>(dev: &Mutex<D>) -> std::sync::MutexGuard<'_, D> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

/// Allocates and wires devices while the VM is being built; what it wired is handed to the
/// VM with [`DeviceManager::finish`].
pub(crate) struct DeviceManager {
    mmio_alloc: AddressAllocator,
    irq_alloc: IdAllocator,
    mmio_bus: Bus,
    subscribers: Vec<Subscriber>,
    cmdline: Vec<String>,
    registry: DeviceRegistry,
    counters: Arc<VmCounters>,
    mem: GuestMem,
}

/// What the VM keeps of the device manager once built.
pub(crate) struct WiredDevices {
    /// The transports, for the vCPUs.
    pub(crate) mmio_bus: Bus,
    /// The devices' event handlers, for the event loop.
    pub(crate) subscribers: Vec<Subscriber>,
    /// The devices by id.
    pub(crate) registry: DeviceRegistry,
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
            registry: DeviceRegistry::default(),
            counters,
            mem,
        })
    }

    /// How many devices were wired so far (the next one's position in the guest's probe
    /// order).
    pub(crate) fn count(&self) -> usize {
        self.registry.iter().len()
    }

    /// `virtio_mmio.device=` for every device wired so far, in order.
    pub(crate) fn cmdline(&self) -> &[String] {
        &self.cmdline
    }

    /// Hand what was wired to the VM.
    pub(crate) fn finish(self) -> WiredDevices {
        WiredDevices {
            mmio_bus: self.mmio_bus,
            subscribers: self.subscribers,
            registry: self.registry,
        }
    }

    /// An IOAPIC pin and an MMIO window for device `id`.
    fn allocate(&mut self, id: &str) -> Result<(u32, u64), DeviceError> {
        let max = VIRTIO_IRQ_LAST - VIRTIO_IRQ_BASE + 1;
        let exhausted = |what| DeviceError::Exhausted {
            id: id.to_string(),
            what,
            max,
        };
        let irq = self
            .irq_alloc
            .allocate_id()
            .map_err(|_| exhausted("IRQ pin"))?;
        let range = self
            .mmio_alloc
            .allocate(MMIO_WINDOW_SIZE, MMIO_WINDOW_SIZE, AllocPolicy::FirstMatch)
            .map_err(|_| exhausted("MMIO window"))?;
        Ok((irq, range.start()))
    }

    /// Wire device `model` as `id` into the VM: interrupt, queue notifications, transport on
    /// the MMIO bus, handler on the event loop, registry entry and command-line entry.
    pub(crate) fn add_virtio(
        &mut self,
        vm: &dyn IrqAndIoEvents,
        id: &str,
        model: Model,
    ) -> Result<&Device, DeviceError> {
        self.registry.check_free(id)?;
        let (irq, base) = self.allocate(id)?;
        let kvm_err = |op| {
            let id = id.to_string();
            move |source| DeviceError::Kvm { id, op, source }
        };
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
            id: id.to_string(),
            source,
        })?;
        vm.register_irqfd(&evt, irq).map_err(kvm_err("KVM_IRQFD"))?;
        let virtio = model.virtio();
        let notify = {
            let d = lock_dev(&virtio);
            for (i, qevt) in d.queue_events().iter().enumerate() {
                // A device has a handful of queues.
                let queue = u32::try_from(i).unwrap_or(u32::MAX);
                vm.register_mmio_ioevent(qevt, base + QUEUE_NOTIFY_OFFSET, queue)
                    .map_err(kvm_err("KVM_IOEVENTFD"))?;
            }
            d.queue_events().first().and_then(|e| e.try_clone().ok())
        };
        let interrupt = Arc::new(VirtioInterrupt::new(evt));
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            virtio,
            interrupt,
            self.mem.clone(),
        )));
        self.mmio_bus
            .insert(transport.clone(), base, MMIO_WINDOW_SIZE)
            .map_err(|source| DeviceError::Bus {
                id: id.to_string(),
                source,
            })?;
        let inject_panic = Arc::new(AtomicBool::new(false));
        let contained = Contained::new(
            id,
            model.subscriber(),
            transport.clone(),
            self.counters.clone(),
            inject_panic.clone(),
        );
        self.subscribers.push(Arc::new(Mutex::new(contained)));
        self.cmdline
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        tracing::info!("device {id}: virtio-mmio at {base:#x}, irq {irq}");
        let device = Device::new(id, model, transport, inject_panic, notify);
        self.registry.insert(device)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use kestrel_api::DriveConfig;
    use kestrel_devices::virtio::block::Block;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;

    /// Records what KVM would be asked; fails the irqfd after `irqfd_budget` calls.
    #[derive(Default)]
    struct FakeKvm {
        irqfds: Mutex<Vec<u32>>,
        ioevents: Mutex<Vec<(u64, u32)>>,
        irqfd_budget: Option<AtomicU32>,
    }

    impl IrqAndIoEvents for FakeKvm {
        fn register_irqfd(&self, _: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
            if let Some(b) = &self.irqfd_budget {
                if b.fetch_sub(1, Ordering::SeqCst) == 0 {
                    return Err(kvm_ioctls::Error::new(libc::EBUSY));
                }
            }
            self.irqfds.lock().unwrap().push(gsi);
            Ok(())
        }
        fn register_mmio_ioevent(
            &self,
            _: &EventFd,
            addr: u64,
            value: u32,
        ) -> Result<(), kvm_ioctls::Error> {
            self.ioevents.lock().unwrap().push((addr, value));
            Ok(())
        }
    }

    fn manager_counting(counters: Arc<VmCounters>) -> DeviceManager {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        DeviceManager::new(GuestMemoryAtomic::new(mem), counters).unwrap()
    }

    fn manager() -> DeviceManager {
        manager_counting(Arc::default())
    }

    /// An empty block slot: a real device model that needs no file.
    fn slot(id: &str) -> Model {
        let cfg = DriveConfig {
            drive_id: id.into(),
            ..DriveConfig::default()
        };
        let cfg = kestrel_devices::virtio::block::BlockConfig::try_from(&cfg).unwrap();
        Model::Block(Arc::new(Mutex::new(Block::new(&cfg).unwrap())))
    }

    #[test]
    fn devices_get_consecutive_windows_and_pins_and_are_announced_in_order() {
        let (kvm, mut dm) = (FakeKvm::default(), manager());
        for id in ["a", "b"] {
            let d = dm.add_virtio(&kvm, id, slot(id)).unwrap();
            assert_eq!((d.id(), d.kind()), (id, DeviceKind::Block));
            assert!(!d.needs_reset());
        }
        let base = layout::VIRTIO_MMIO_START;
        assert_eq!(
            dm.cmdline(),
            [
                format!("virtio_mmio.device=4K@{base:#x}:5"),
                format!("virtio_mmio.device=4K@{:#x}:6", base + MMIO_WINDOW_SIZE),
            ]
        );
        assert_eq!(*kvm.irqfds.lock().unwrap(), [5, 6]);
        // One queue each, notified at its window's QueueNotify register.
        assert_eq!(
            *kvm.ioevents.lock().unwrap(),
            [
                (base + QUEUE_NOTIFY_OFFSET, 0),
                (base + MMIO_WINDOW_SIZE + QUEUE_NOTIFY_OFFSET, 0)
            ]
        );
        let wired = dm.finish();
        assert_eq!(wired.subscribers.len(), 2);
        let ids: Vec<&str> = wired.registry.iter().map(Device::id).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(wired.registry.get("b").unwrap().block().is_some());
        assert!(wired.registry.get("b").unwrap().net().is_none());
        assert!(wired.registry.get("c").is_none());
        // The transport answers on the bus: the magic value "virt".
        let mut magic = [0u8; 4];
        assert!(wired.mmio_bus.read(base, &mut magic));
        assert_eq!(&magic, b"virt");
    }

    #[test]
    fn ids_are_unique_across_kinds_and_a_refused_id_costs_nothing() {
        let (kvm, mut dm) = (FakeKvm::default(), manager());
        dm.add_virtio(&kvm, "x", slot("x")).unwrap();
        let e = dm.add_virtio(&kvm, "x", slot("x")).unwrap_err();
        assert!(
            matches!(&e, DeviceError::DuplicateId { id, kind: DeviceKind::Block } if id == "x"),
            "{e}"
        );
        // The next device still gets the second pin.
        dm.add_virtio(&kvm, "y", slot("y")).unwrap();
        assert_eq!(*kvm.irqfds.lock().unwrap(), [5, 6]);
    }

    #[test]
    fn at_most_nineteen_virtio_devices_and_kvm_errors_name_the_device() {
        let (kvm, mut dm) = (FakeKvm::default(), manager());
        for i in 0..19 {
            let id = format!("d{i}");
            dm.add_virtio(&kvm, &id, slot(&id)).unwrap();
        }
        let e = dm.add_virtio(&kvm, "d19", slot("d19")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device d19: no free IRQ pin (at most 19 virtio devices)"
        );
        let kvm = FakeKvm {
            irqfd_budget: Some(AtomicU32::new(0)),
            ..FakeKvm::default()
        };
        let e = manager().add_virtio(&kvm, "z", slot("z")).unwrap_err();
        assert!(e.to_string().starts_with("device z: KVM_IRQFD: "), "{e}");
    }

    #[test]
    fn injected_handler_panic_fails_only_that_device_until_reset() {
        use event_manager::{EventManager, SubscriberOps};
        let counters = Arc::new(VmCounters::default());
        let (kvm, mut dm) = (FakeKvm::default(), manager_counting(counters.clone()));
        dm.add_virtio(&kvm, "p", slot("p")).unwrap();
        dm.add_virtio(&kvm, "q", slot("q")).unwrap();
        let wired = dm.finish();
        let mut em = EventManager::<Subscriber>::new().unwrap();
        for s in wired.subscribers {
            em.add_subscriber(s);
        }
        let p = wired.registry.get("p").unwrap();
        p.inject_handler_panic().unwrap();
        em.run_with_timeout(1000).unwrap();
        assert!(p.needs_reset());
        assert!(!wired.registry.get("q").unwrap().needs_reset());
        assert_eq!(counters.device_panics.load(Ordering::Relaxed), 1);
    }
}
