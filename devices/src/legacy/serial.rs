//! 8250 UART on COM1 (0x3f8, IRQ 4).
//!
//! Output never blocks the vCPU: what the guest transmits goes into a bounded in-memory queue
//! ([`SERIAL_OUT_BUF`] bytes; beyond it bytes are dropped and counted in
//! [`SerialDevice::output_dropped`]) that the event loop drains into the sink
//! ([`SerialOutput`], a subscriber the VMM adds to the loop). The sink must not block the loop
//! either: [`NonBlockingWriter`] turns a file descriptor such as standard output into a writer
//! that returns `WouldBlock` instead; the drainer then retries on a timer and the queue absorbs
//! (then drops) what the guest writes meanwhile.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::bus::BusDevice;

/// COM1 I/O port base.
pub const COM1_PORT_BASE: u64 = 0x3f8;
/// COM1 register window length.
pub const COM1_PORT_LEN: u64 = 8;
/// COM1 interrupt line (ISA IRQ / IOAPIC pin).
pub const COM1_IRQ: u32 = 4;
/// Most guest output held for a sink that does not keep up (a full pipe, a stuck terminal).
/// 64 KiB holds a whole kernel oops or a burst of boot log; beyond it output is dropped.
pub const SERIAL_OUT_BUF: usize = 64 * 1024;
/// Most bytes the drainer writes per event-loop pass.
pub const SERIAL_DRAIN_BATCH: usize = SERIAL_OUT_BUF;
/// How long the drainer waits before retrying a sink that would block.
pub const SERIAL_RETRY: Duration = Duration::from_millis(10);

/// A vm-superio `Trigger` that writes to an `EventFd` (an irqfd, typically).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// What the vCPU side (the UART) and the drainer share.
#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<VecDeque<u8>>,
    /// Set once a drainer exists: written when the queue stops being empty.
    wake: OnceLock<EventFd>,
    dropped: AtomicU64,
    errors: AtomicU64,
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<u8>> {
        // A byte queue cannot be left inconsistent by a panicking holder.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The UART's writer: appends to the bounded queue, never blocks, never fails (dropped bytes
/// are counted; the guest is not told).
struct QueueWriter(Arc<Shared>);

impl Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut q = self.0.queue();
        let was_empty = q.is_empty();
        let n = buf.len().min(SERIAL_OUT_BUF.saturating_sub(q.len()));
        q.extend(&buf[..n]);
        drop(q);
        if n < buf.len() {
            self.0
                .dropped
                .fetch_add((buf.len() - n) as u64, Ordering::Relaxed);
        }
        if was_empty && n > 0 {
            if let Some(w) = self.0.wake.get() {
                // A full counter still wakes the loop.
                let _ = w.write(1);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A UART's registers and receive FIFO as a snapshot keeps them (vm-superio's
/// `SerialState`, which has no serde support).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialRegs {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Receive FIFO (at most 64 bytes).
    pub in_buffer: Vec<u8>,
}

/// The serial port as a bus device. Output is queued for the event loop (see the module
/// documentation); sink errors (a closed pipe, a full disk) are counted and logged, never
/// returned to the guest.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, QueueWriter>,
    shared: Arc<Shared>,
    sink: Option<Box<dyn Write + Send>>,
    tx_bytes: u64,
}

impl SerialDevice {
    /// A UART that raises `irq`; the guest's output goes to `out` through the drainer
    /// ([`SerialDevice::take_output`]). `out` should return `WouldBlock` rather than block
    /// (see [`NonBlockingWriter`]).
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        let shared = Arc::new(Shared::default());
        SerialDevice {
            uart: Serial::new(EventFdTrigger(irq), QueueWriter(shared.clone())),
            shared,
            sink: Some(out),
            tx_bytes: 0,
        }
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialRegs {
        let s = self.uart.state();
        SerialRegs {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Take over saved registers (on a device just created for a restored VM); an interrupt
    /// the saved state had pending is raised again.
    ///
    /// # Errors
    /// The saved FIFO holds more than the UART's 64 bytes, or the interrupt eventfd could not
    /// be duplicated or signalled.
    pub fn restore(&mut self, regs: &SerialRegs) -> io::Result<()> {
        let state = SerialState {
            baud_divisor_low: regs.baud_divisor_low,
            baud_divisor_high: regs.baud_divisor_high,
            interrupt_enable: regs.interrupt_enable,
            interrupt_identification: regs.interrupt_identification,
            line_control: regs.line_control,
            line_status: regs.line_status,
            modem_control: regs.modem_control,
            modem_status: regs.modem_status,
            scratch: regs.scratch,
            in_buffer: regs.in_buffer.clone(),
        };
        let irq = self.uart.interrupt_evt().0.try_clone()?;
        let out = QueueWriter(self.shared.clone());
        self.uart = Serial::from_state(&state, EventFdTrigger(irq), NoEvents, out)
            .map_err(|e| io::Error::other(format!("serial state: {e:?}")))?;
        Ok(())
    }

    /// The event-loop side of the output: a subscriber that drains the queue into the sink.
    /// `None` when it was taken already.
    pub fn take_output(&mut self) -> io::Result<Option<SerialOutput>> {
        if self.sink.is_none() {
            return Ok(None);
        }
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let wake_loop = wake.try_clone()?;
        let timer = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        crate::set_nonblocking(timer.as_raw_fd())?;
        let Some(sink) = self.sink.take() else {
            return Ok(None);
        };
        // Only this call sets it, once (the sink was still here).
        let _ = self.shared.wake.set(wake);
        if !self.shared.queue().is_empty() {
            let _ = wake_loop.write(1);
        }
        Ok(Some(SerialOutput {
            shared: self.shared.clone(),
            sink,
            wake: wake_loop,
            timer,
            pending: Vec::new(),
            retry_armed: false,
            error_logged: false,
        }))
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

    /// Bytes the guest has written (transmitted), dropped ones included.
    pub fn tx_bytes(&self) -> u64 {
        self.tx_bytes
    }

    /// Output bytes dropped because the queue was full (the sink did not keep up).
    pub fn output_dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Output bytes waiting for the sink.
    pub fn output_pending(&self) -> usize {
        self.shared.queue().len()
    }

    /// Failed writes to the output sink.
    pub fn output_errors(&self) -> u64 {
        self.shared.errors.load(Ordering::Relaxed)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match u8::try_from(offset) {
            Ok(port) if data.len() == 1 && offset < COM1_PORT_LEN => {
                data[0] = self.uart.read(port);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(port) = u8::try_from(offset) else {
            return;
        };
        if data.len() != 1 || offset >= COM1_PORT_LEN {
            return;
        }
        if offset == 0 {
            self.tx_bytes += 1;
        }
        // The queue writer never fails; only the interrupt can.
        if let Err(e) = self.uart.write(port, data[0]) {
            tracing::debug!("serial: {e:?}");
        }
    }
}

/// Drains the serial output queue into the sink on the event loop: when the queue stops being
/// empty, and on a retry timer while the sink would block. Writes at most
/// [`SERIAL_DRAIN_BATCH`] bytes per pass.
pub struct SerialOutput {
    shared: Arc<Shared>,
    sink: Box<dyn Write + Send>,
    wake: EventFd,
    timer: TimerFd,
    /// Taken from the queue, not yet accepted by the sink (written first, in order).
    pending: Vec<u8>,
    retry_armed: bool,
    error_logged: bool,
}

impl SerialOutput {
    /// Write what is queued, without blocking (as far as the sink allows). Returns whether
    /// output is left for later (the sink would block or the batch is done).
    pub fn drain(&mut self) -> bool {
        let mut budget = SERIAL_DRAIN_BATCH;
        loop {
            if self.pending.is_empty() {
                let mut q = self.shared.queue();
                let n = q.len().min(budget).min(16 * 1024);
                self.pending.extend(q.drain(..n));
            }
            if self.pending.is_empty() {
                let _ = self.sink.flush();
                return false;
            }
            match self.sink.write(&self.pending) {
                Ok(0) => self.sink_error(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    let n = n.min(self.pending.len());
                    self.pending.drain(..n);
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => self.sink_error(e),
            }
        }
    }

    fn sink_error(&mut self, e: io::Error) {
        // What could not be written is lost: count it as dropped.
        self.shared
            .dropped
            .fetch_add(self.pending.len() as u64, Ordering::Relaxed);
        self.pending.clear();
        self.shared.errors.fetch_add(1, Ordering::Relaxed);
        if !self.error_logged {
            self.error_logged = true;
            tracing::warn!("serial output failed (further errors are counted): {e}");
        }
    }

    fn pass(&mut self) {
        let more = self.drain();
        if more && !self.retry_armed {
            match self.timer.reset(SERIAL_RETRY, None) {
                Ok(()) => self.retry_armed = true,
                Err(e) => tracing::warn!("serial output: cannot arm the retry timer: {e}"),
            }
        }
    }
}

impl MutEventSubscriber for SerialOutput {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, what) in [
            (self.wake.as_raw_fd(), "wake-up"),
            (self.timer.as_raw_fd(), "timer"),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("serial output: cannot watch the {what}: {e:?}");
            }
        }
        // Output queued before the loop started.
        self.pass();
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            self.retry_armed = false;
        } else {
            let _ = self.wake.read();
        }
        self.pass();
    }
}

impl Drop for SerialOutput {
    fn drop(&mut self) {
        // Last chance for what is queued; never blocks on a non-blocking sink.
        self.drain();
    }
}

/// A writer to whatever a file descriptor refers to (standard output, typically) that returns
/// `WouldBlock` instead of blocking, without changing the flags of the descriptor it was made
/// from (they belong to the embedding process):
/// - a pipe, FIFO or terminal is opened again through `/proc/self/fd/<fd>` with `O_NONBLOCK`
///   (a new open file description of the same object);
/// - a socket is written with `send(MSG_DONTWAIT | MSG_NOSIGNAL)`;
/// - anything else (a regular file) is written through a duplicate descriptor.
///
/// A reader that went away is an error (`EPIPE`, counted by the drainer as dropped output),
/// never a `SIGPIPE` for the process: pipes and FIFOs are written under
/// [`crate::sigpipe::without_sigpipe`], sockets with `MSG_NOSIGNAL`.
#[derive(Debug)]
pub struct NonBlockingWriter {
    fd: OwnedFd,
    kind: libc::mode_t,
}

impl NonBlockingWriter {
    /// A writer for `fd` (see the type documentation).
    pub fn new(fd: BorrowedFd<'_>) -> io::Result<Self> {
        // SAFETY: `libc::stat` is plain old data, for which all-zero bytes are a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is a valid descriptor for the call and `st` a valid out-pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFIFO || kind == libc::S_IFCHR {
            let path = format!("/proc/self/fd/{}\0", fd.as_raw_fd());
            // SAFETY: `path` is NUL-terminated and lives across the call; the result is
            // checked.
            let new = unsafe {
                libc::open(
                    path.as_ptr().cast(),
                    libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
                )
            };
            if new >= 0 {
                return Ok(NonBlockingWriter {
                    // SAFETY: `new` was just opened here and nothing else owns it.
                    fd: unsafe { OwnedFd::from_raw_fd(new) },
                    kind,
                });
            }
            tracing::debug!(
                "serial output: cannot reopen fd {} non-blocking: {}",
                fd.as_raw_fd(),
                io::Error::last_os_error()
            );
        }
        Ok(NonBlockingWriter {
            fd: fd.try_clone_to_owned()?,
            kind,
        })
    }

    /// A writer for this process's standard output.
    pub fn stdout() -> io::Result<Self> {
        Self::new(io::stdout().as_fd())
    }
}

impl AsRawFd for NonBlockingWriter {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Write for NonBlockingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        let write = || {
            // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the call; `fd` is owned
            // by `self`.
            let r = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
            crate::syscall_len(r)
        };
        match self.kind {
            libc::S_IFSOCK => crate::sigpipe::send(fd, buf, libc::MSG_DONTWAIT),
            libc::S_IFIFO => crate::sigpipe::without_sigpipe(write),
            _ => write(),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

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

    fn irq() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    fn put(s: &mut SerialDevice, bytes: &[u8]) {
        for b in bytes {
            s.write(0, &[*b]);
        }
    }

    /// A pipe (both ends blocking, as an embedder's stdout pipe would be): (read, write).
    fn pipe() -> (std::fs::File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are new and owned by nobody else.
        unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
            )
        }
    }

    #[test]
    fn saved_registers_come_back_on_a_new_device_with_their_pending_interrupt() {
        let mut a = SerialDevice::new(irq(), Box::new(Sink::default()));
        a.write(3, &[0x03]); // LCR: 8N1
        a.write(7, &[0x5a]); // scratch
        a.write(1, &[0x03]); // IER: RDA + THR empty
        assert_eq!(a.enqueue_input(b"hi"), 2);
        let saved = a.state();
        assert_eq!(saved.in_buffer, b"hi");
        assert_eq!(saved.scratch, 0x5a);
        let json = serde_json::to_string(&saved).unwrap();
        let back: SerialRegs = serde_json::from_str(&json).unwrap();
        let evt = irq();
        let probe = evt.try_clone().unwrap();
        let mut b = SerialDevice::new(evt, Box::new(Sink::default()));
        b.restore(&back).unwrap();
        assert_eq!(b.state(), saved);
        assert!(
            probe.read().unwrap() >= 1,
            "the pending interrupt is raised again"
        );
        let mut got = [0u8; 1];
        b.read(0, &mut got);
        assert_eq!(&got, b"h");
        let too_long = SerialRegs {
            in_buffer: vec![0; 65],
            ..saved
        };
        assert!(b.restore(&too_long).is_err());
    }

    #[test]
    fn output_reaches_sink_through_the_drainer_and_thr_empty_interrupt_fires() {
        let irq = irq();
        let sink = Sink::default();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        // Enable the THR-empty interrupt (IER bit 1), as Linux does for user-space writes.
        s.write(1, &[0x02]);
        put(&mut s, b"early ");
        let mut out = s.take_output().unwrap().unwrap();
        assert!(s.take_output().unwrap().is_none());
        // Queued before the drainer existed: it is woken at once.
        assert_eq!(out.wake.read().unwrap(), 1);
        assert!(!out.drain());
        assert_eq!(&*sink.0.lock().unwrap(), b"early ");
        put(&mut s, b"hello\n");
        assert_eq!(
            out.wake.read().unwrap(),
            1,
            "woken when the queue stopped being empty"
        );
        assert_eq!(
            &*sink.0.lock().unwrap(),
            b"early ",
            "nothing written on the vCPU path"
        );
        assert!(!out.drain());
        assert_eq!(&*sink.0.lock().unwrap(), b"early hello\n");
        assert!(irq.read().unwrap() >= 1);
        assert_eq!(s.tx_bytes(), 12);
        assert_eq!((s.output_dropped(), s.output_pending()), (0, 0));
    }

    #[test]
    fn stuck_reader_never_blocks_writes_drops_are_counted_and_order_is_kept() {
        let (mut reader, w) = pipe();
        let mut s = SerialDevice::new(irq(), Box::new(NonBlockingWriter::new(w.as_fd()).unwrap()));
        let mut out = s.take_output().unwrap().unwrap();
        // Far more than the pipe (64 KiB) and the queue hold; the reader reads nothing.
        let lines: Vec<String> = (0..40_000).map(|i| format!("line {i}\n")).collect();
        let total: usize = lines.iter().map(String::len).sum();
        let start = std::time::Instant::now();
        for (i, l) in lines.iter().enumerate() {
            put(&mut s, l.as_bytes());
            if i % 1000 == 0 {
                // The event loop's passes: they must not block either.
                out.drain();
            }
        }
        assert!(out.drain(), "output left for later: the pipe is full");
        assert!(start.elapsed() < Duration::from_secs(10));
        let dropped = usize::try_from(s.output_dropped()).unwrap();
        assert!(dropped > 0);
        assert!(s.output_pending() <= SERIAL_OUT_BUF);
        assert_eq!(s.output_errors(), 0);
        // The reader reads now: what was not dropped arrives, in order.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            out.drain();
            if s.output_pending() == 0 && out.pending.is_empty() {
                drop(out);
                break;
            }
            let n = reader.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        drop(s);
        drop(w);
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got.len() + dropped, total);
        // Dropped bytes leave a gap at most: what arrived is the output in order.
        let mut it = lines.iter().flat_map(|l| l.bytes());
        for b in &got {
            assert!(it.any(|x| x == *b), "output out of order");
        }
        assert!(String::from_utf8_lossy(&got).starts_with("line 0\nline 1\n"));
    }

    #[test]
    fn writes_without_a_drainer_stay_bounded() {
        let mut s = SerialDevice::new(irq(), Box::new(io::sink()));
        put(&mut s, &vec![b'x'; SERIAL_OUT_BUF + 100]);
        assert_eq!(s.output_pending(), SERIAL_OUT_BUF);
        assert_eq!(s.output_dropped(), 100);
        assert_eq!(s.tx_bytes(), SERIAL_OUT_BUF as u64 + 100);
    }

    #[test]
    fn non_blocking_writer_leaves_the_original_descriptor_alone() {
        let (_reader, w) = pipe();
        let flags = |fd: RawFd| {
            // SAFETY: F_GETFL takes no pointer.
            unsafe { libc::fcntl(fd, libc::F_GETFL) }
        };
        let before = flags(w.as_raw_fd());
        let mut nb = NonBlockingWriter::new(w.as_fd()).unwrap();
        assert_eq!(flags(w.as_raw_fd()), before);
        assert_eq!(before & libc::O_NONBLOCK, 0);
        assert_ne!(flags(nb.as_raw_fd()) & libc::O_NONBLOCK, 0);
        let chunk = vec![0u8; 4096];
        let mut would_block = false;
        for _ in 0..1000 {
            match nb.write(&chunk) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    would_block = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(would_block);
        // A regular file works through a duplicate.
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let mut nb = NonBlockingWriter::new(f.as_file().as_fd()).unwrap();
        nb.write_all(b"abc").unwrap();
        assert_eq!(std::fs::read(f.as_path()).unwrap(), b"abc");
    }

    #[test]
    fn input_is_bounded_by_fifo() {
        let mut s = SerialDevice::new(irq(), Box::new(io::sink()));
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
        let mut s = SerialDevice::new(irq(), Box::new(Broken));
        let mut out = s.take_output().unwrap().unwrap();
        s.write(0, b"a");
        s.write(0, b"ab");
        s.write(9, b"a");
        let mut w = [0u8; 4];
        s.read(0, &mut w);
        assert_eq!(w, [0xff; 4]);
        assert!(!out.drain());
        assert_eq!(s.output_errors(), 1);
        assert_eq!(s.output_dropped(), 1);
    }
}
