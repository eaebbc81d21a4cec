//! 8250 UART on COM1 (0x3f8, IRQ 4).

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// COM1 I/O port base.
pub const COM1_PORT_BASE: u64 = 0x3f8;
/// COM1 register window length.
pub const COM1_PORT_LEN: u64 = 8;
/// COM1 interrupt line (ISA IRQ / IOAPIC pin).
pub const COM1_IRQ: u32 = 4;

/// A vm-superio `Trigger` that writes to an `EventFd` (an irqfd, typically).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The serial port as a bus device. Output goes to any `Write` sink; write errors on the sink
/// (a closed pipe, a full disk) are counted and logged, never returned to the guest.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    out_errors: u64,
    tx_bytes: u64,
}

impl SerialDevice {
    /// A UART that raises `irq` and writes the guest's output to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            uart: Serial::new(EventFdTrigger(irq), out),
            out_errors: 0,
            tx_bytes: 0,
        }
    }

    /// Queue bytes for the guest to read. Returns how many were taken: the UART's FIFO holds
    /// 64 bytes, and the caller keeps the rest until [`SerialDevice::input_space`] grows.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(bytes).unwrap_or_else(|e| {
            tracing::warn!("serial input interrupt failed: {e:?}");
            0
        })
    }

    /// Free space in the receive FIFO.
    pub fn input_space(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Bytes the guest has written (transmitted).
    pub fn tx_bytes(&self) -> u64 {
        self.tx_bytes
    }

    /// Failed writes to the output sink.
    pub fn output_errors(&self) -> u64 {
        self.out_errors
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset >= COM1_PORT_LEN {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= COM1_PORT_LEN {
            return;
        }
        if offset == 0 {
            self.tx_bytes += 1;
        }
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            self.out_errors += 1;
            if self.out_errors == 1 {
                tracing::warn!("serial output failed (further errors are counted): {e:?}");
            }
        }
        // Console lines should reach files and pipes promptly.
        if offset == 0 && data[0] == b'\n' {
            let _ = self.uart.writer_mut().flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_sink_and_thr_empty_interrupt_fires() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        // Enable the THR-empty interrupt (IER bit 1), as Linux does for user-space writes.
        s.write(1, &[0x02]);
        for b in b"hello\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hello\n");
        assert!(irq.read().unwrap() >= 1);
        assert_eq!(s.tx_bytes(), 6);
    }

    #[test]
    fn input_is_bounded_by_fifo() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq, Box::new(io::sink()));
        let big = [b'x'; 100];
        assert_eq!(s.enqueue_input(&big), 64);
        assert_eq!(s.input_space(), 0);
        assert_eq!(s.enqueue_input(&big), 0);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'x');
        assert_eq!(s.input_space(), 1);
    }

    #[test]
    fn bad_accesses_and_sink_errors_do_not_panic() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq, Box::new(Broken));
        s.write(0, b"a");
        s.write(0, b"ab");
        s.write(9, b"a");
        let mut w = [0u8; 4];
        s.read(0, &mut w);
        assert_eq!(w, [0xff; 4]);
        assert_eq!(s.output_errors(), 1);
    }
}
