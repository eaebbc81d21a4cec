//! i8042 keyboard controller: only its CPU-reset command (0xfe on port 0x64), which is how a
//! Linux guest without ACPI reboots (`reboot=k`).

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;

/// First port (data, 0x60); the command/status port is 0x64.
pub const I8042_PORT_BASE: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;

/// The controller as a bus device; `T` is told when the guest asks for a CPU reset.
pub struct I8042<T: Trigger> {
    dev: I8042Device<T>,
}

impl<T: Trigger> I8042<T> {
    /// A controller that calls `reset.trigger()` on the reset command.
    pub fn new(reset: T) -> Self {
        I8042 {
            dev: I8042Device::new(reset),
        }
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match u8::try_from(offset) {
            Ok(port) if offset < I8042_PORT_LEN => self.dev.read(port),
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(port) = u8::try_from(offset) else {
            return;
        };
        if data.len() != 1 || offset >= I8042_PORT_LEN {
            return;
        }
        if let Err(e) = self.dev.write(port, data[0]) {
            tracing::error!("i8042 reset notification failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::EventFdTrigger;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn reset_command_triggers() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut d = I8042::new(EventFdTrigger(evt.try_clone().unwrap()));
        d.write(0, &[0xfe]); // data port: not a command
        assert!(evt.read().is_err());
        d.write(4, &[0xaa]); // another command
        assert!(evt.read().is_err());
        d.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        d.write(4, &[0xfe, 0xfe]); // wrong width: ignored
        assert!(evt.read().is_err());
    }
}
