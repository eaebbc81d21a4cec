//! i8042 keyboard controller: the CPU-reset command (0xfe on port 0x64), which is how a Linux
//! guest without ACPI reboots (`reboot=k`), and just enough of the controller and of an AT
//! keyboard behind it for the guest's i8042 and atkbd drivers to bind, so that
//! [`I8042::trigger_ctrl_alt_del`] can press Ctrl-Alt-Del (Firecracker's `SendCtrlAltDel`): the
//! scancodes are queued in the output buffer and IRQ 1 is raised for each key.
//!
//! The keyboard speaks scancode set 2 (the controller does not translate); commands sent to it
//! are acknowledged (`0xfa`), `GET ID` answers an MF2 keyboard and `RESET` passes its self
//! test. The controller has no AUX (mouse) port: its AUX interface test reports a stuck clock
//! line, so a guest's driver gives up on it at once instead of timing out.

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// First port (data, 0x60); the command/status port is 0x64.
pub const I8042_PORT_BASE: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;
/// The keyboard's interrupt line (ISA IRQ 1).
pub const I8042_KBD_IRQ: u32 = 1;

const DATA: u64 = 0;
const STATUS: u64 = 4;

/// Status register: output buffer full (a byte waits at port 0x60).
const ST_OUT_FULL: u8 = 0x01;
/// Status register: the last write to 0x60 is a controller command's parameter.
const ST_CMD_DATA: u8 = 0x08;
/// Status register: keyboard not inhibited.
const ST_KBD_UNLOCKED: u8 = 0x10;
/// Control register: keyboard interrupt enabled.
const CTR_KBD_INT: u8 = 0x01;
/// Control register: system flag (POST passed).
const CTR_SYSTEM: u8 = 0x04;

/// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

/// Keyboard commands and answers (port 0x60).
const KBD_GET_ID: u8 = 0xf2;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;
/// `GET ID` of an MF2 keyboard.
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// Set 2 make codes of Ctrl, Alt and Delete (Delete is an extended key: `0xe0 0x71`).
const CTRL_ALT_DEL: [&[u8]; 3] = [&[0x14], &[0x11], &[0xe0, 0x71]];

/// Bytes the output buffer holds.
const BUF_LEN: usize = 16;

/// Why Ctrl-Alt-Del could not be pressed.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    /// The controller has no keyboard interrupt ([`I8042::with_keyboard_irq`] was not called).
    #[error("the i8042 has no keyboard interrupt line")]
    NoKeyboardIrq,
    /// The guest has not read what is queued already.
    #[error("the i8042 output buffer is full")]
    BufferFull,
    /// Signalling IRQ 1 failed.
    #[error("cannot raise the keyboard interrupt: {0}")]
    Irq(#[source] std::io::Error),
}

/// The controller as a bus device; `T` is told when the guest asks for a CPU reset.
pub struct I8042<T: Trigger> {
    reset: T,
    /// Raises IRQ 1 (an irqfd), when the VMM wired one.
    kbd_irq: Option<EventFd>,
    status: u8,
    control: u8,
    outp: u8,
    /// The controller command waiting for its parameter at 0x60.
    pending_cmd: u8,
    buf: std::collections::VecDeque<u8>,
}

impl<T: Trigger> I8042<T> {
    /// A controller that calls `reset.trigger()` on the reset command.
    pub fn new(reset: T) -> Self {
        I8042 {
            reset,
            kbd_irq: None,
            status: ST_KBD_UNLOCKED,
            control: CTR_SYSTEM | CTR_KBD_INT,
            outp: 0,
            pending_cmd: 0,
            buf: std::collections::VecDeque::with_capacity(BUF_LEN),
        }
    }

    /// Raise the keyboard interrupt through `irq` (registered by the VMM as ISA IRQ 1).
    pub fn with_keyboard_irq(mut self, irq: EventFd) -> Self {
        self.kbd_irq = Some(irq);
        self
    }

    /// Press Ctrl-Alt-Del: queue the three keys' make codes and raise IRQ 1 for each. A guest
    /// with the i8042 and AT keyboard drivers (and a VT keyboard handler) reboots, or signals
    /// its init.
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if self.kbd_irq.is_none() {
            return Err(I8042Error::NoKeyboardIrq);
        }
        let len: usize = CTRL_ALT_DEL.iter().map(|k| k.len()).sum();
        if BUF_LEN - self.buf.len() < len {
            return Err(I8042Error::BufferFull);
        }
        for key in CTRL_ALT_DEL {
            key.iter().for_each(|b| self.push(*b));
            self.kbd_interrupt()?;
        }
        Ok(())
    }

    fn push(&mut self, b: u8) {
        if self.buf.len() < BUF_LEN {
            self.buf.push_back(b);
        }
        self.status |= ST_OUT_FULL;
    }

    fn pop(&mut self) -> u8 {
        let b = self.buf.pop_front().unwrap_or(0);
        if self.buf.is_empty() {
            self.status &= !ST_OUT_FULL;
        }
        b
    }

    /// Answer a controller command with `bytes` (what was queued is dropped).
    fn reply(&mut self, bytes: &[u8]) {
        self.buf.clear();
        bytes.iter().for_each(|b| self.push(*b));
    }

    /// Raise IRQ 1 if the guest has the keyboard interrupt enabled.
    fn kbd_interrupt(&self) -> Result<(), I8042Error> {
        match &self.kbd_irq {
            Some(irq) if self.control & CTR_KBD_INT != 0 => irq.write(1).map_err(I8042Error::Irq),
            _ => Ok(()),
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_RESET_CPU => {
                if let Err(e) = self.reset.trigger() {
                    tracing::error!("i8042 reset notification failed: {e:?}");
                }
            }
            CMD_READ_CTR => self.reply(&[self.control]),
            CMD_READ_OUTP => self.reply(&[self.outp]),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => {
                self.buf.clear();
                self.status &= !ST_OUT_FULL;
                self.status |= ST_CMD_DATA;
                self.pending_cmd = cmd;
            }
            CMD_SELF_TEST => self.reply(&[0x55]),
            CMD_KBD_TEST => self.reply(&[0x00]),
            // No AUX port: "clock line stuck low".
            CMD_AUX_TEST => self.reply(&[0x01]),
            _ => {}
        }
    }

    /// A byte for the keyboard itself: acknowledged (with the answer `GET ID` and `RESET`
    /// expect), and IRQ 1 raised.
    fn keyboard(&mut self, b: u8) {
        match b {
            KBD_GET_ID => self.reply(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            KBD_RESET => self.reply(&[KBD_ACK, KBD_BAT_OK]),
            _ => self.reply(&[KBD_ACK]),
        }
        if let Err(e) = self.kbd_interrupt() {
            tracing::warn!("i8042: {e}");
        }
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            _ if data.len() != 1 => 0xff,
            STATUS => self.status,
            DATA => {
                let b = self.pop();
                // More queued: tell the guest to read again.
                if !self.buf.is_empty() {
                    if let Err(e) = self.kbd_interrupt() {
                        tracing::warn!("i8042: {e}");
                    }
                }
                b
            }
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [b] = data else {
            return;
        };
        match offset {
            STATUS => self.command(*b),
            DATA if self.status & ST_CMD_DATA != 0 => {
                match self.pending_cmd {
                    CMD_WRITE_CTR => self.control = *b,
                    CMD_WRITE_OUTP => self.outp = *b,
                    _ => {}
                }
                self.status &= !ST_CMD_DATA;
            }
            DATA => self.keyboard(*b),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::EventFdTrigger;

    fn device() -> (I8042<EventFdTrigger>, EventFd, EventFd) {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d = I8042::new(EventFdTrigger(reset.try_clone().unwrap()))
            .with_keyboard_irq(irq.try_clone().unwrap());
        (d, reset, irq)
    }

    fn inb(d: &mut I8042<EventFdTrigger>, offset: u64) -> u8 {
        let mut b = [0u8];
        d.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_triggers() {
        let (mut d, evt, _) = device();
        d.write(0, &[0xfe]); // data port: a keyboard byte, not a command
        assert!(evt.read().is_err());
        d.write(4, &[0xad]); // another command
        assert!(evt.read().is_err());
        d.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        d.write(4, &[0xfe, 0xfe]); // wrong width: ignored
        assert!(evt.read().is_err());
    }

    #[test]
    fn control_register_round_trip_as_linux_probes_it() {
        let (mut d, _, _) = device();
        assert_eq!(inb(&mut d, 4) & ST_OUT_FULL, 0, "nothing to flush");
        d.write(4, &[CMD_READ_CTR]);
        assert_ne!(inb(&mut d, 4) & ST_OUT_FULL, 0);
        assert_eq!(inb(&mut d, 0), CTR_SYSTEM | CTR_KBD_INT);
        assert_eq!(inb(&mut d, 4) & ST_OUT_FULL, 0);
        d.write(4, &[CMD_WRITE_CTR]);
        assert_ne!(inb(&mut d, 4) & ST_CMD_DATA, 0);
        d.write(0, &[0x47]);
        d.write(4, &[CMD_READ_CTR]);
        assert_eq!(inb(&mut d, 0), 0x47);
        d.write(4, &[CMD_WRITE_OUTP]);
        d.write(0, &[0x03]);
        d.write(4, &[CMD_READ_OUTP]);
        assert_eq!(inb(&mut d, 0), 0x03);
        d.write(4, &[CMD_AUX_TEST]);
        assert_eq!(inb(&mut d, 0), 0x01, "no AUX port");
        d.write(4, &[CMD_SELF_TEST]);
        assert_eq!(inb(&mut d, 0), 0x55);
    }

    #[test]
    fn keyboard_commands_are_acknowledged_with_an_interrupt() {
        let (mut d, _, irq) = device();
        d.write(0, &[KBD_GET_ID]);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(inb(&mut d, 0), KBD_ACK);
        assert_eq!(irq.read().unwrap(), 1, "more to read: interrupt again");
        assert_eq!(inb(&mut d, 0), 0xab);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(inb(&mut d, 0), 0x83);
        assert!(irq.read().is_err(), "nothing left: no interrupt");
        assert_eq!(inb(&mut d, 0), 0, "empty reads 0");
        d.write(0, &[0xed]); // SET LEDS, then its parameter
        d.write(0, &[0x00]);
        assert_eq!(inb(&mut d, 0), KBD_ACK);
    }

    #[test]
    fn ctrl_alt_del_queues_set2_make_codes_and_raises_irq1() {
        let (mut d, reset, irq) = device();
        d.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irq.read().unwrap(), 3, "one interrupt per key");
        let codes: Vec<u8> = (0..4).map(|_| inb(&mut d, 0)).collect();
        assert_eq!(codes, [0x14, 0x11, 0xe0, 0x71]);
        assert_eq!(inb(&mut d, 4) & ST_OUT_FULL, 0);
        assert!(reset.read().is_err());
        // A guest that does not read: the buffer fills and the press is refused, not lost
        // halfway.
        for _ in 0..4 {
            d.trigger_ctrl_alt_del().unwrap();
        }
        assert!(matches!(
            d.trigger_ctrl_alt_del(),
            Err(I8042Error::BufferFull)
        ));
        // Interrupt disabled by the guest: the keys are queued, no IRQ.
        let (mut d, _, irq) = device();
        d.write(4, &[CMD_WRITE_CTR]);
        d.write(0, &[CTR_SYSTEM]);
        d.trigger_ctrl_alt_del().unwrap();
        assert!(irq.read().is_err());
        // Without an interrupt line there is no keyboard.
        let mut bare = I8042::new(EventFdTrigger(EventFd::new(0).unwrap()));
        assert!(matches!(
            bare.trigger_ctrl_alt_del(),
            Err(I8042Error::NoKeyboardIrq)
        ));
    }
}
