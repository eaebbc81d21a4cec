//! Legacy PC devices: the 8250 serial port from `vm-superio`, the i8042 controller (reset, and
//! an AT keyboard for Ctrl-Alt-Del), adapted to the [`crate::bus::Bus`], and a minimal CMOS RTC.

mod cmos;
mod i8042;
mod serial;

pub use cmos::{Cmos, CMOS_PORT_BASE, CMOS_PORT_LEN};
pub use i8042::{I8042Error, I8042, I8042_KBD_IRQ, I8042_PORT_BASE, I8042_PORT_LEN};
pub use serial::{
    EventFdTrigger, NonBlockingWriter, SerialDevice, SerialOutput, SerialRegs, COM1_IRQ,
    COM1_PORT_BASE, COM1_PORT_LEN, SERIAL_DRAIN_BATCH, SERIAL_OUT_BUF, SERIAL_RETRY,
};
