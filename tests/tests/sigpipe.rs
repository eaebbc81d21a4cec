//! No write Kestrel makes raises `SIGPIPE` in the process that embeds it.
//!
//! The embedding process may have `SIGPIPE` at its default action (terminate). This test
//! binary runs itself again as a child with `SIGPIPE` reset to `SIG_DFL` (Rust's runtime
//! ignores it, which would hide the bug) and unblocked; there a VM's serial console writes to a
//! FIFO (the process's standard output, `serial.output = "stdout"`) whose reader closes while
//! the guest keeps writing, and a vsock host peer stops reading while the guest sends to it.
//! The child must survive (not be killed by signal 13), the serial output written after the
//! close must be counted as dropped, and the vsock connection must end with a reset.

use std::io::Read;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kestrel_api::{SerialOutput, VmConfig, VsockConfig};
use kestrel_devices::virtio::vsock::packet::{op, Header, HDR_SIZE, HOST_CID, TYPE_STREAM};
use kestrel_tests::*;
use kestrel_vmm::{Vm, VmExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CHILD_ENV: &str = "KESTREL_TEST_SIGPIPE_CHILD";
const TEST_NAME: &str = "no_write_of_kestrel_raises_sigpipe_in_the_embedding_process";

#[test]
fn no_write_of_kestrel_raises_sigpipe_in_the_embedding_process() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let child = Command::new(exe)
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("re-run the test binary");
    let child_pid = libc::pid_t::try_from(child.id()).expect("pids fit pid_t");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out.expect("wait for the child"),
        Err(_) => {
            // SAFETY: kill takes no pointers; `child_pid` is the child this test started, not yet
            // reaped (its waiter is still blocked).
            unsafe { libc::kill(child_pid, libc::SIGKILL) };
            panic!("the child did not finish within 120 s");
        }
    };
    let text = format!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "SIGPIPE killed the embedding process\n{text}"
    );
    assert!(
        out.status.success(),
        "child failed: {:?}\n{text}",
        out.status
    );
    assert!(text.contains("1 passed"), "the child ran no test\n{text}");
}

/// The embedder's `SIGPIPE` setup that makes the bug fatal: default action, not blocked.
fn sigpipe_default_and_unblocked() {
    // SAFETY: resets a disposition to the default (no handler code); this child process runs
    // only this test.
    let old = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    assert_ne!(old, libc::SIG_ERR);
    // SAFETY: an all-zero sigset_t is valid; the calls only touch `set`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        assert_eq!(
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()),
            0
        );
    }
}

fn child() {
    sigpipe_default_and_unblocked();
    let t0 = Instant::now();
    serial_reader_closes();
    eprintln!("serial part: {:?}", t0.elapsed());
    let t1 = Instant::now();
    vsock_peer_closes();
    eprintln!("vsock part: {:?}", t1.elapsed());
}

/// Code: write `x` to COM1 forever.
fn serial_flood() -> Vec<u8> {
    vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'x', // mov al, 'x'
        0xee, // out dx, al
        0xeb, 0xfd, // jmp back to the out
    ]
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out after {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether thread `tid` of this process blocks SIGPIPE (`SigBlk` in its status).
fn blocks_sigpipe(tid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .expect("SigBlk line");
    mask & (1 << (libc::SIGPIPE - 1)) != 0
}

/// Create a VM whose `serial.output = "stdout"` while this process's standard output is
/// `fd` (it is restored afterwards; Kestrel keeps its own descriptor of the FIFO).
fn create_with_stdout(config: &VmConfig, fd: &OwnedFd) -> Vm {
    // SAFETY: dup/dup2/close on descriptors this process owns; only this test runs here, and
    // nothing prints while fd 1 is swapped.
    unsafe {
        let saved = libc::dup(1);
        assert!(saved >= 0);
        assert_eq!(libc::dup2(fd.as_raw_fd(), 1), 1);
        let vm = Vm::create(config);
        assert_eq!(libc::dup2(saved, 1), 1);
        libc::close(saved);
        vm.expect("create the VM")
    }
}

/// A fresh FIFO in the scratch directory, opened: (reader, non-blocking; writer).
fn open_fifo() -> (std::fs::File, OwnedFd) {
    let fifo = scratch_dir().join("serial.fifo");
    let _ = std::fs::remove_file(&fifo);
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `path` is NUL-terminated; the opens return new descriptors owned below.
    unsafe {
        assert_eq!(libc::mkfifo(path.as_ptr(), 0o600), 0, "mkfifo");
        let r = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK);
        assert!(r >= 0, "open the FIFO for reading");
        let w = libc::open(path.as_ptr(), libc::O_WRONLY);
        assert!(w >= 0, "open the FIFO for writing");
        (std::fs::File::from_raw_fd(r), OwnedFd::from_raw_fd(w))
    }
}

/// Every thread of the VM blocks SIGPIPE; the test's own thread does not.
fn check_vm_threads_block_sigpipe(vm: &Vm) {
    let threads = vm.threads();
    assert_eq!(threads.len(), 2, "{threads:?}");
    for t in &threads {
        assert!(blocks_sigpipe(t.tid), "{} does not block SIGPIPE", t.name);
    }
    // SAFETY: gettid has no preconditions.
    assert!(!blocks_sigpipe(unsafe { libc::gettid() }));
}

fn serial_reader_closes() {
    let (mut reader, writer) = open_fifo();
    let mut c = VmConfig::new(write_tiny_guest("flood.elf", &serial_flood()), 1, 32);
    c.kestrel.name = Some("sigpipe-serial".into());
    c.serial.output = SerialOutput::Stdout;
    let vm = create_with_stdout(&c, &writer);
    drop(writer);
    vm.start().unwrap();

    // Output arrives through the FIFO...
    let mut got = 0usize;
    let mut buf = [0u8; 4096];
    wait_until(
        "4 KiB of serial output in the FIFO",
        Duration::from_secs(20),
        || {
            match reader.read(&mut buf) {
                Ok(n) => {
                    assert!(buf[..n].iter().all(|&b| b == b'x'));
                    got += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read the FIFO: {e}"),
            }
            got >= 4096
        },
    );
    // ...until its reader goes away while the guest keeps writing: every write from now on
    // fails with EPIPE (and, unless Kestrel prevents it, raises SIGPIPE).
    drop(reader);
    let closed_at = vm.metrics();
    wait_until(
        "serial output after the close counted as dropped",
        Duration::from_secs(20),
        || vm.metrics().serial_dropped_bytes >= closed_at.serial_dropped_bytes + 4096,
    );
    let m = vm.metrics();
    assert!(m.serial_tx_bytes > closed_at.serial_tx_bytes, "{m:?}");
    check_vm_threads_block_sigpipe(&vm);
    assert_eq!(
        vm.wait_timeout(Duration::from_millis(100)),
        None,
        "still runs"
    );
    assert_eq!(vm.stop(), VmExit::Stopped);
}

/// Guest memory of the vsock part.
const RX_RING: u64 = 0x30_0000;
const TX_RING: u64 = 0x31_0000;
const EV_RING: u64 = 0x32_0000;
const RX_BUFS: u64 = 0x40_0000;
const TX_BUFS: u64 = 0x50_0000;
const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1234;
const HOST_PORT: u32 = 5000;

fn header(op: u16, len: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: GUEST_PORT,
        dst_port: HOST_PORT,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

/// A tiny guest with the vsock device on `uds` that brings the device up, then notifies rx
/// and tx every few milliseconds; the test plays the rest of the driver on guest memory.
fn vsock_guest(uds: &Path) -> VmConfig {
    let rings = [RX_RING, TX_RING, EV_RING].map(|base| RingLayout::at(base, 16));
    let notify = [0, 1].map(|q| virtio_mmio_notify(VIRTIO_MMIO_BASE, q));
    let code = mmio_writer(
        &virtio_mmio_bring_up(VIRTIO_MMIO_BASE, 0, &rings),
        &notify,
        20_000,
    );
    let mut c = VmConfig::new(write_tiny_guest("vsock-driver.elf", &code), 1, 32);
    c.kestrel.name = Some("sigpipe-vsock".into());
    c.serial.output = SerialOutput::None;
    c.vsock = Some(VsockConfig {
        guest_cid: u32::try_from(GUEST_CID).expect("a small CID"),
        uds_path: uds.to_path_buf(),
        vsock_id: None,
    });
    c
}

/// The test's side of the guest's vsock driver: 8 receive buffers, the transmit ring.
struct VsockDriver {
    mem: Arc<GuestMemoryMmap>,
    rx: HostDriverRing,
    tx: HostDriverRing,
}

impl VsockDriver {
    /// The rings set up (before the guest starts) with 8 receive buffers posted.
    fn new(mem: Arc<GuestMemoryMmap>) -> VsockDriver {
        let mut rx = HostDriverRing::new(&mem, RingLayout::at(RX_RING, 16));
        let tx = HostDriverRing::new(&mem, RingLayout::at(TX_RING, 16));
        HostDriverRing::new(&mem, RingLayout::at(EV_RING, 16));
        for i in 0..8 {
            let b = RX_BUFS + i * 0x2000;
            let chain = [
                (b, desc_len(HDR_SIZE), DESC_WRITE),
                (b + 0x1000, 0x1000, DESC_WRITE),
            ];
            rx.push(&mem, &chain);
        }
        VsockDriver { mem, rx, tx }
    }

    /// Send packet `op` from the `slot`-th transmit buffer, with `payload` after the header.
    fn send(&mut self, slot: u64, op: u16, payload: &[u8]) {
        let h = TX_BUFS + 0x1000 * slot;
        let hdr = header(op, desc_len(payload.len())).to_bytes();
        self.mem.write_slice(&hdr, GuestAddress(h)).unwrap();
        let mut chain = vec![(h, desc_len(HDR_SIZE), 0)];
        if !payload.is_empty() {
            self.mem
                .write_slice(payload, GuestAddress(h + 0x800))
                .unwrap();
            chain.push((h + 0x800, desc_len(payload.len()), 0));
        }
        self.tx.push(&self.mem, &chain);
    }

    /// Whether a received packet is a reset of the guest's connection.
    fn got_rst(&self) -> bool {
        (0..self.rx.used_idx(&self.mem)).any(|i| {
            let (id, _) = self.rx.used(&self.mem, i);
            let at = RX_BUFS + u64::from(id / 2) * 0x2000;
            let mut b = [0u8; HDR_SIZE];
            self.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
            let h = Header::from_bytes(&b);
            h.op == op::RST && h.dst_port == GUEST_PORT
        })
    }
}

/// The vsock device's counters.
fn vsock_metrics(vm: &Vm) -> kestrel_devices::virtio::vsock::VsockMetrics {
    let m = vm.device("vsock").and_then(|d| d.metrics().vsock());
    m.expect("the vsock device")
}

fn vsock_peer_closes() {
    let dir = scratch_dir();
    let uds = dir.join("sigpipe-v.sock");
    let port_path = dir.join(format!("sigpipe-v.sock_{HOST_PORT}"));
    for p in [&uds, &port_path] {
        let _ = std::fs::remove_file(p);
    }
    let listener = UnixListener::bind(&port_path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let vm = Vm::create(&vsock_guest(&uds)).unwrap();
    let mut driver = VsockDriver::new(vm.guest_memory());
    // The guest connects to host port 5000 (the listener above).
    driver.send(0, op::REQUEST, &[]);
    vm.start().unwrap();

    let mut peer = None;
    wait_until(
        "the guest's connection reaches the listener",
        Duration::from_secs(20),
        || {
            match listener.accept() {
                Ok((s, _)) => peer = Some(s),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
            peer.is_some()
        },
    );
    let peer = peer.unwrap();
    wait_until(
        "the RESPONSE reaches the guest",
        Duration::from_secs(20),
        || driver.rx.used_idx(&driver.mem) >= 1,
    );
    assert_eq!(vsock_metrics(&vm).conns_opened, 1);

    // The host peer stops reading: the device's next write to it fails with EPIPE.
    peer.shutdown(Shutdown::Read).unwrap();
    for i in 0..4u64 {
        driver.send(i + 1, op::RW, &[b'v'; 16]);
    }
    wait_until("the connection ends", Duration::from_secs(20), || {
        vsock_metrics(&vm).conns_closed >= 1
    });
    // The guest is told with a reset.
    assert!(driver.got_rst(), "the guest got no RST");
    // And the peer's last close changes nothing either.
    drop(peer);
    assert_eq!(
        vm.wait_timeout(Duration::from_millis(200)),
        None,
        "still runs"
    );
    assert_eq!(vm.stop(), VmExit::Stopped);
}
