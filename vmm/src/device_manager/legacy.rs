//! Legacy devices on the port-I/O bus: the serial console (COM1, IRQ 4 through an irqfd),
//! the CMOS clock and the i8042 (whose reset line stops the VM; its keyboard raises IRQ 1
//! through an irqfd for Ctrl-Alt-Del).

use std::sync::{Arc, Mutex};

use kestrel_devices::legacy::{
    Cmos, SerialDevice, CMOS_PORT_BASE, CMOS_PORT_LEN, COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN,
    I8042, I8042_KBD_IRQ, I8042_PORT_BASE, I8042_PORT_LEN,
};
use kestrel_devices::{Bus, BusDevice};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceError, IrqAndIoEvents};
use crate::exit::{ExitState, ResetTrigger};

/// The legacy devices of a VM.
pub(crate) struct LegacyDevices {
    /// The port-I/O bus the vCPUs dispatch to.
    pub(crate) pio: Bus,
    /// The serial port (its output drainer and input go to the event loop).
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    /// Keeps the serial irqfd alive as long as KVM may signal through it.
    pub(crate) serial_irq: EventFd,
    /// The i8042 (its keyboard raises IRQ 1 through an irqfd): Ctrl-Alt-Del.
    pub(crate) i8042: Arc<Mutex<I8042<ResetTrigger>>>,
}

impl LegacyDevices {
    /// Serial port writing to `console`, CMOS, and an i8042 whose reset records
    /// [`crate::VmExit::Reset`] in `exit`.
    pub(crate) fn new(
        vm: &dyn IrqAndIoEvents,
        exit: &Arc<ExitState>,
        console: Box<dyn std::io::Write + Send>,
    ) -> Result<Self, DeviceError> {
        let eventfd_err = |source| DeviceError::EventFd {
            id: "serial".into(),
            source,
        };
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(eventfd_err)?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(|source| DeviceError::Kvm {
                id: "serial".into(),
                op: "KVM_IRQFD",
                source,
            })?;
        let irq = serial_irq.try_clone().map_err(eventfd_err)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(irq, console)));
        let mut pio = Bus::new();
        insert(
            &mut pio,
            "serial",
            serial.clone(),
            COM1_PORT_BASE,
            COM1_PORT_LEN,
        )?;
        let cmos = Arc::new(Mutex::new(Cmos::default()));
        insert(&mut pio, "cmos", cmos, CMOS_PORT_BASE, CMOS_PORT_LEN)?;
        let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
            id: "i8042".into(),
            source,
        })?;
        vm.register_irqfd(&kbd_irq, I8042_KBD_IRQ)
            .map_err(|source| DeviceError::Kvm {
                id: "i8042".into(),
                op: "KVM_IRQFD",
                source,
            })?;
        let i8042 = I8042::new(ResetTrigger(exit.clone())).with_keyboard_irq(kbd_irq);
        let i8042 = Arc::new(Mutex::new(i8042));
        insert(
            &mut pio,
            "i8042",
            i8042.clone(),
            I8042_PORT_BASE,
            I8042_PORT_LEN,
        )?;
        Ok(LegacyDevices {
            pio,
            serial,
            serial_irq,
            i8042,
        })
    }
}

fn insert(
    bus: &mut Bus,
    id: &str,
    dev: Arc<Mutex<dyn BusDevice>>,
    base: u64,
    len: u64,
) -> Result<(), DeviceError> {
    bus.insert(dev, base, len)
        .map_err(|source| DeviceError::Bus {
            id: id.to_string(),
            source,
        })
}
