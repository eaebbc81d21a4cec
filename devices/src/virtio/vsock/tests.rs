//! Device tests: a scripted guest driver on real queues in guest memory (rings laid out by hand,
//! see [`Ring`]), the device in a real `EventManager` pumped on the test thread, and real
//! Unix sockets in a temporary directory. No KVM.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_manager::EventManager;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::connection::CONN_BUF_ALLOC;
use super::muxer::{ConnKey, LOCAL_PORT_BASE};
use super::packet::{op, Header, HDR_SIZE, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use crate::virtio::test_util::{
    assert_pass_bounded, on_event_loop, pump, with_refilling_guest, Ring, TmpDir,
    VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, WAIT,
};
use crate::virtio::{ActivateError, RestoreError, VirtioDevice, VirtioInterrupt};

const CID: u64 = 3;
const MEM_SIZE: usize = 24 << 20;
const QSIZE: u16 = 256;
const RX_BUF_BASE: u64 = 0x10_0000;
const RX_STRIDE: u64 = 0x2000;
const RX_DATA: u32 = 4096;
const TX_BUF_BASE: u64 = 0x40_0000;
const TX_STRIDE: u64 = 0x1_1000;
/// The receive buffer the test guest advertises (Linux's default).
const GUEST_BUF_ALLOC: u32 = 256 * 1024;

fn ghdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

type Pkt = (Header, Vec<u8>);

/// The guest: a driver for the three queues plus the device's event loop.
struct Guest {
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Vsock>>,
    em: EventManager<Arc<Mutex<Vsock>>>,
    evts: Vec<EventFd>,
    irq: EventFd,
    rx: Ring,
    tx: Ring,
    tx_free: Vec<u16>,
    rx_free: Vec<u16>,
    /// Re-post rx buffers as soon as their packets are read.
    rx_refill: bool,
    got: VecDeque<Pkt>,
    dir: TmpDir,
}

impl Guest {
    /// A device activated with `rx_bufs` rx buffers posted.
    fn new(rx_bufs: u16) -> Guest {
        Self::with_timeouts(rx_bufs, None)
    }

    fn with_timeouts(rx_bufs: u16, t: Option<muxer::Timeouts>) -> Guest {
        let dir = TmpDir::new("kvs");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut dev = Vsock::new(&VsockConfig::new(CID, &dir.0.join("v.sock"))).unwrap();
        if let Some(t) = t {
            dev.device.muxer.timeouts = t;
        }
        let (dev, em, evts) = on_event_loop(dev);
        let (rx, rxq) = Ring::new(&mem, 0, QSIZE);
        let (tx, txq) = Ring::new(&mem, 0x1_0000, QSIZE);
        let (_, evq) = Ring::new(&mem, 0x2_0000, QSIZE);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut g = Guest {
            mem,
            dev,
            em,
            evts,
            irq: irq.try_clone().unwrap(),
            rx,
            tx,
            tx_free: (0..QSIZE / 2).rev().collect(),
            rx_free: (0..QSIZE).rev().collect(),
            rx_refill: true,
            got: VecDeque::new(),
            dir,
        };
        g.activate(irq, vec![rxq, txq, evq]);
        g.post_rx(rx_bufs);
        g
    }

    fn activate(&mut self, irq: EventFd, queues: Vec<Queue>) {
        let gm = GuestMemoryAtomic::new(self.mem.clone());
        self.dev()
            .activate(gm, Arc::new(VirtioInterrupt::new(irq)), queues)
            .unwrap();
        self.pump();
    }

    fn dev(&self) -> MutexGuard<'_, Vsock> {
        self.dev.lock().unwrap()
    }

    fn uds(&self) -> PathBuf {
        self.dir.0.join("v.sock")
    }

    fn metrics(&self) -> VsockMetrics {
        self.dev().metrics()
    }

    /// Run the event loop until it is idle.
    fn pump(&mut self) {
        pump(&mut self.em);
    }

    /// Pump until `f` holds.
    fn pump_until(&mut self, what: &str, mut f: impl FnMut(&mut Guest) -> bool) {
        let end = Instant::now() + WAIT;
        loop {
            self.em.run_with_timeout(5).unwrap();
            self.collect();
            if f(self) {
                return;
            }
            assert!(Instant::now() < end, "timed out waiting for {what}");
        }
    }

    /// Post `n` rx buffers (single descriptor: header + RX_DATA) and notify.
    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let Some(id) = self.rx_free.pop() else {
                break;
            };
            let addr = RX_BUF_BASE + u64::from(id) * RX_STRIDE;
            self.rx.set_desc(
                &self.mem,
                id,
                addr,
                u32::try_from(HDR_SIZE).unwrap() + RX_DATA,
                VRING_DESC_F_WRITE,
                0,
            );
            self.rx.publish(&self.mem, id);
        }
        self.evts[RX_QUEUE].write(1).unwrap();
    }

    /// Read finished rx buffers into `got` (and re-post them when `rx_refill`).
    fn collect(&mut self) {
        self.tx_reclaim();
        let used = self.rx.take_used(&self.mem);
        if used.is_empty() {
            return;
        }
        for (id, len) in &used {
            let addr = RX_BUF_BASE + u64::from(*id) * RX_STRIDE;
            let mut hb = [0u8; HDR_SIZE];
            self.mem.read_slice(&mut hb, GuestAddress(addr)).unwrap();
            let h = Header::from_bytes(&hb);
            assert_eq!(
                *len as usize,
                HDR_SIZE + h.len as usize,
                "used length of {id}: {h:?}"
            );
            let mut data = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + HDR_SIZE as u64))
                .unwrap();
            self.got.push_back((h, data));
            self.rx_free.push(*id);
        }
        if self.rx_refill {
            self.post_rx(u16::try_from(used.len()).unwrap());
        }
    }

    fn tx_reclaim(&mut self) {
        for (id, len) in self.tx.take_used(&self.mem) {
            assert_eq!(len, 0);
            self.tx_free.push(id / 2);
        }
    }

    /// Queue a packet on the tx queue and notify.
    fn send(&mut self, mut h: Header, data: &[u8]) {
        h.len = u32::try_from(data.len()).unwrap();
        self.tx_reclaim();
        let slot = match self.tx_free.pop() {
            Some(s) => s,
            None => {
                self.pump();
                self.tx_reclaim();
                self.tx_free.pop().expect("tx ring full")
            }
        };
        let base = TX_BUF_BASE + u64::from(slot) * TX_STRIDE;
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(base))
            .unwrap();
        let (d0, d1) = (slot * 2, slot * 2 + 1);
        if data.is_empty() {
            self.tx
                .set_desc(&self.mem, d0, base, u32::try_from(HDR_SIZE).unwrap(), 0, 0);
        } else {
            self.mem
                .write_slice(data, GuestAddress(base + 0x100))
                .unwrap();
            self.tx.set_desc(
                &self.mem,
                d0,
                base,
                u32::try_from(HDR_SIZE).unwrap(),
                VRING_DESC_F_NEXT,
                d1,
            );
            self.tx.set_desc(
                &self.mem,
                d1,
                base + 0x100,
                u32::try_from(data.len()).unwrap(),
                0,
                0,
            );
        }
        self.tx.publish(&self.mem, d0);
        self.evts[TX_QUEUE].write(1).unwrap();
    }

    /// Queue a raw chain (descriptors as (addr, len, flags); NEXT links are added).
    fn send_raw(&mut self, descs: &[(u64, u32, u16)]) {
        self.tx_reclaim();
        let slot = self.tx_free.pop().expect("tx ring full");
        assert!(descs.len() <= 2);
        let ids = [slot * 2, slot * 2 + 1];
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if last {
                *flags
            } else {
                *flags | VRING_DESC_F_NEXT
            };
            self.tx
                .set_desc(&self.mem, ids[i], *addr, *len, flags, ids[(i + 1) % 2]);
        }
        self.tx.publish(&self.mem, ids[0]);
        self.evts[TX_QUEUE].write(1).unwrap();
    }

    /// The next packet for the guest.
    fn recv(&mut self) -> Pkt {
        self.pump_until("a packet from the device", |g| !g.got.is_empty());
        self.got.pop_front().unwrap()
    }

    /// The next packet, which must be `op`.
    fn expect(&mut self, op: u16) -> Pkt {
        let p = self.recv();
        assert_eq!(p.0.op, op, "unexpected packet {:?}", p.0);
        p
    }

    /// Host client: connect, send CONNECT, see the REQUEST, answer RESPONSE, read OK.
    /// Returns the client and the connection's host port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut c = UnixStream::connect(self.uds()).unwrap();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (req, _) = self.expect(op::REQUEST);
        assert_eq!(req.dst_port, port);
        let local = req.src_port;
        let mut resp = ghdr(op::RESPONSE, port, local);
        resp.buf_alloc = GUEST_BUF_ALLOC;
        self.send(resp, &[]);
        c.set_nonblocking(true).unwrap();
        let line = self.read_client(&mut c, format!("OK {local}\n").len());
        assert_eq!(line, format!("OK {local}\n").as_bytes());
        (c, local)
    }

    /// Read exactly `n` bytes from a non-blocking client, pumping the loop meanwhile.
    fn read_client(&mut self, c: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        let mut got = 0;
        self.pump_until("client data", |_| {
            while got < n {
                match c.read(&mut out[got..]) {
                    Ok(0) => panic!("client EOF after {got} of {n} bytes"),
                    Ok(k) => got += k,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("client read: {e}"),
                }
            }
            got == n
        });
        out
    }

    /// Pump until the client reads end of stream (no data allowed before it).
    fn expect_client_eof(&mut self, c: &mut UnixStream) {
        c.set_nonblocking(true).unwrap();
        self.pump_until("client EOF", |_| {
            let mut b = [0u8; 64];
            match c.read(&mut b) {
                Ok(0) => true,
                Ok(k) => panic!("unexpected {:?} before EOF", &b[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
                Err(e) => panic!("client read: {e}"),
            }
        });
    }

    /// Receive RW payload until `n` bytes arrived, acknowledging as a guest that consumes
    /// everything immediately (credit updates each time).
    fn guest_read(&mut self, local: u32, peer: u32, n: usize, fwd: &mut u32) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < n {
            let (h, d) = self.expect(op::RW);
            assert_eq!((h.src_port, h.dst_port), (local, peer));
            out.extend_from_slice(&d);
            *fwd = fwd.wrapping_add(u32::try_from(d.len()).unwrap());
            let mut cu = ghdr(op::CREDIT_UPDATE, peer, local);
            cu.fwd_cnt = *fwd;
            self.send(cu, &[]);
        }
        out
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn device_identity_config_and_features() {
    let dir = TmpDir::new("kvs");
    let mut v = Vsock::new(&VsockConfig::new(0x1234_5678, &dir.0.join("v.sock"))).unwrap();
    assert_eq!(v.device_type(), 19);
    assert_eq!(v.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(v.avail_features(), VIRTIO_F_VERSION_1);
    assert_eq!(v.queue_events().len(), 3);
    let mut cfg = [0xffu8; 8];
    v.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 0x1234_5678);
    let mut hi = [0xffu8; 4];
    v.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    let mut past = [0xffu8; 4];
    v.read_config(6, &mut past);
    assert_eq!(past, [0; 4]);
    v.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
    v.write_config(0, &[1, 2, 3]);
    v.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 0x1234_5678);
    v.set_acked_features(u64::MAX);
    assert!(!v.is_activated());
    // Wrong queue count.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let irq = Arc::new(VirtioInterrupt::new(EventFd::new(0).unwrap()));
    let err = v
        .activate(
            GuestMemoryAtomic::new(mem),
            irq,
            vec![Queue::new(256).unwrap()],
        )
        .unwrap_err();
    assert_eq!(
        err,
        ActivateError::QueueCount {
            expected: 3,
            got: 1
        }
    );
    assert!(!v.is_activated());
}

#[test]
fn creation_errors_and_drop_removes_socket() {
    let dir = TmpDir::new("kvs");
    let path = dir.0.join("v.sock");
    for bad in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        assert!(matches!(
            Vsock::new(&VsockConfig::new(bad, &path)),
            Err(VsockError::InvalidCid(_))
        ));
    }
    assert!(!path.exists());
    let v = Vsock::new(&VsockConfig::new(3, &path)).unwrap();
    assert!(path.exists(), "listener bound at creation");
    // A second device on the same path fails, and names it.
    let err = Vsock::new(&VsockConfig::new(4, &path)).unwrap_err();
    assert!(matches!(err, VsockError::Bind { .. }));
    assert!(err.to_string().contains("v.sock"), "{err}");
    assert!(path.exists(), "the failed device removed nothing");
    drop(v);
    assert!(!path.exists(), "socket file removed on drop");
    // Missing directory.
    assert!(matches!(
        Vsock::new(&VsockConfig::new(3, &dir.0.join("nope/v.sock"))),
        Err(VsockError::Bind { .. })
    ));
    // From the API config.
    let cfg = kestrel_api::VsockConfig {
        guest_cid: 7,
        uds_path: path.clone(),
        vsock_id: None,
    };
    let v = Vsock::new(&VsockConfig::try_from(&cfg).unwrap()).unwrap();
    assert_eq!(v.guest_cid(), 7);
    assert_eq!(v.uds_path(), path);
    let bad = kestrel_api::VsockConfig {
        guest_cid: 2,
        ..cfg
    };
    let e = VsockConfig::try_from(&bad).unwrap_err();
    assert!(e.to_string().starts_with("guest_cid 2"), "{e}");
}

#[test]
fn host_connect_request_response_ok_and_data_both_ways() {
    let mut g = Guest::new(64);
    let mut c = UnixStream::connect(g.uds()).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();
    let (req, d) = g.expect(op::REQUEST);
    assert!(d.is_empty());
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, CID));
    assert_eq!(req.dst_port, 52);
    assert!(req.src_port >= LOCAL_PORT_BASE);
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
    let local = req.src_port;
    // Nothing for the client before the guest answers.
    c.set_nonblocking(true).unwrap();
    g.pump();
    let mut b = [0u8; 8];
    assert_eq!(c.read(&mut b).unwrap_err().kind(), ErrorKind::WouldBlock);
    g.send(ghdr(op::RESPONSE, 52, local), &[]);
    let line = g.read_client(&mut c, format!("OK {local}\n").len());
    assert_eq!(line, format!("OK {local}\n").as_bytes());
    assert_eq!(g.metrics().conns_opened, 1);

    // Host -> guest, 100 KiB in guest-sized pieces.
    let msg = pattern(100 * 1024, 1);
    let mut sent = 0;
    let mut fwd = 0u32;
    let mut got = Vec::new();
    while got.len() < msg.len() {
        if sent < msg.len() {
            match c.write(&msg[sent..]) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        let chunk = g.guest_read(local, 52, 1, &mut fwd);
        assert!(chunk.len() <= RX_DATA as usize);
        got.extend(chunk);
    }
    assert_eq!(got, msg);

    // Guest -> host, in 16 KiB packets (within the 64 KiB credit: the client reads later).
    let msg = pattern(CONN_BUF_ALLOC as usize, 7);
    for chunk in msg.chunks(16 * 1024) {
        g.send(ghdr(op::RW, 52, local), chunk);
        g.pump();
    }
    let back = g.read_client(&mut c, msg.len());
    assert_eq!(back, msg);
    let m = g.metrics();
    assert_eq!(m.bytes_to_guest, 100 * 1024);
    assert_eq!(m.bytes_from_guest, u64::from(CONN_BUF_ALLOC));
    assert_eq!(m.packets_dropped, 0);
}

#[test]
fn guest_rst_closes_client_without_ok() {
    let mut g = Guest::new(8);
    let mut c = UnixStream::connect(g.uds()).unwrap();
    c.write_all(b"CONNECT 9999\n").unwrap();
    let (req, _) = g.expect(op::REQUEST);
    g.send(ghdr(op::RST, 9999, req.src_port), &[]);
    g.expect_client_eof(&mut c);
    assert_eq!(g.dev().connection_count(), 0);
    let m = g.metrics();
    assert_eq!((m.conns_refused, m.conns_opened), (1, 0));
    // The device does not answer an RST.
    g.pump();
    assert!(g.got.is_empty());
}

#[test]
fn bad_connect_lines_and_silent_clients_are_closed() {
    let t = muxer::Timeouts {
        handshake: Duration::from_millis(100),
        ..Default::default()
    };
    let mut g = Guest::with_timeouts(8, Some(t));
    let mut silent = UnixStream::connect(g.uds()).unwrap();
    let mut bad = UnixStream::connect(g.uds()).unwrap();
    bad.write_all(b"HELLO 5\n").unwrap();
    let mut long = UnixStream::connect(g.uds()).unwrap();
    long.write_all(&[b'7'; 64]).unwrap();
    let mut port = UnixStream::connect(g.uds()).unwrap();
    port.write_all(b"CONNECT 99999999999\n").unwrap();
    let start = Instant::now();
    g.expect_client_eof(&mut bad);
    g.expect_client_eof(&mut long);
    g.expect_client_eof(&mut port);
    g.expect_client_eof(&mut silent);
    assert!(start.elapsed() >= Duration::from_millis(90));
    assert_eq!(g.metrics().conns_refused, 4);
    // None of them reached the guest.
    assert!(g.got.is_empty());
}

#[test]
fn host_connect_times_out_when_guest_is_silent() {
    let mut t = muxer::Timeouts::default();
    t.conn.connect = Duration::from_millis(100);
    let mut g = Guest::with_timeouts(8, Some(t));
    let mut c = UnixStream::connect(g.uds()).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = g.expect(op::REQUEST);
    g.expect_client_eof(&mut c);
    // The guest is told to forget the request.
    let (rst, _) = g.expect(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 52));
    assert_eq!(g.metrics().conns_refused, 1);
}

#[test]
fn guest_connect_to_listening_port_and_to_missing_port() {
    let mut g = Guest::new(16);
    let l = UnixListener::bind(muxer::port_path(&g.uds(), 1234)).unwrap();
    let mut req = ghdr(op::REQUEST, 5000, 1234);
    req.buf_alloc = 64 * 1024;
    g.send(req, &[]);
    let (resp, _) = g.expect(op::RESPONSE);
    assert_eq!((resp.src_cid, resp.dst_cid), (HOST_CID, CID));
    assert_eq!((resp.src_port, resp.dst_port), (1234, 5000));
    let (mut s, _) = l.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    g.send(ghdr(op::RW, 5000, 1234), b"ping");
    assert_eq!(g.read_client(&mut s, 4), b"ping");
    s.write_all(b"pong").unwrap();
    let mut fwd = 0;
    assert_eq!(g.guest_read(1234, 5000, 4, &mut fwd), b"pong");
    assert_eq!(g.metrics().conns_opened, 1);

    // Nobody at <uds>_4321: RST back.
    g.send(ghdr(op::REQUEST, 5001, 4321), &[]);
    let (rst, _) = g.expect(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (4321, 5001));
    assert_eq!(rst.dst_cid, CID);
    assert_eq!(g.metrics().conns_refused, 1);
    // Packets for unknown connections get an RST too (but an RST gets nothing).
    g.send(ghdr(op::RW, 6000, 7000), b"x");
    let (rst, _) = g.expect(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (7000, 6000));
    g.send(ghdr(op::RST, 6000, 7000), &[]);
    g.pump();
    assert!(g.got.is_empty());
}

#[test]
fn device_never_exceeds_guest_credit_and_slow_guest_throttles_host_writer() {
    let mut g = Guest::new(64);
    let (mut c, local) = g.host_connect(52);
    // The guest shrinks its buffer to 10000 bytes (it has consumed nothing).
    let mut cu = ghdr(op::CREDIT_UPDATE, 52, local);
    cu.buf_alloc = 10_000;
    g.send(cu, &[]);
    g.pump();
    // The host writes as much as it can: the device stops reading, so the socket fills.
    let big = pattern(64 * 1024, 3);
    let mut written = 0usize;
    loop {
        g.pump();
        match c.write(&big) {
            Ok(k) => written += k,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
        assert!(written < 16 << 20, "the device never throttled the writer");
    }
    g.pump();
    g.collect();
    let mut payload = 0usize;
    let mut credit_requests = 0;
    while let Some((h, d)) = g.got.pop_front() {
        match h.op {
            op::RW => payload += d.len(),
            op::CREDIT_REQUEST => credit_requests += 1,
            o => panic!("unexpected op {o}"),
        }
    }
    assert_eq!(payload, 10_000, "exactly the credit, never more");
    assert_eq!(credit_requests, 1);
    // The guest consumes 4000 bytes: 4000 more may come, no more.
    let mut cu = ghdr(op::CREDIT_UPDATE, 52, local);
    cu.buf_alloc = 10_000;
    cu.fwd_cnt = 4000;
    g.send(cu, &[]);
    g.pump();
    g.collect();
    let more: usize = g
        .got
        .drain(..)
        .filter(|(h, _)| h.op == op::RW)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(more, 4000);
    // Now a normal guest drains everything that was written, in order.
    let mut fwd = 4000u32;
    let mut cu = ghdr(op::CREDIT_UPDATE, 52, local);
    cu.fwd_cnt = 14_000;
    g.send(cu, &[]);
    fwd = fwd.wrapping_add(10_000);
    let rest = g.guest_read(local, 52, written - 14_000, &mut fwd);
    assert_eq!(rest.len(), written - 14_000);
    assert!(usize::try_from(g.metrics().bytes_to_guest).unwrap() == written);
}

#[test]
fn guest_exceeding_credit_is_reset() {
    let mut g = Guest::new(16);
    let (mut c, local) = g.host_connect(52);
    // The client never reads; the guest ignores the device's credit.
    let chunk = vec![0x5au8; 64 * 1024];
    let mut sent = 0usize;
    let mut reset = false;
    while sent < 8 << 20 {
        g.send(ghdr(op::RW, 52, local), &chunk);
        sent += chunk.len();
        g.pump();
        g.collect();
        if g.got.iter().any(|(h, _)| h.op == op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "no RST after {sent} bytes");
    let m = g.metrics();
    assert_eq!(m.credit_violations, 1);
    assert_eq!(g.dev().connection_count(), 0);
    // The client gets what was forwarded, then EOF.
    c.set_nonblocking(true).unwrap();
    let mut total = 0usize;
    g.pump_until("client EOF", |_| {
        let mut b = vec![0u8; 64 * 1024];
        loop {
            match c.read(&mut b) {
                Ok(0) => return true,
                Ok(k) => total += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) => panic!("{e}"),
            }
        }
    });
    // Everything accepted from the guest fit in the socket plus our buffer.
    assert!(sent - total <= CONN_BUF_ALLOC as usize + chunk.len());
}

#[test]
fn well_behaved_guest_is_throttled_by_slow_unix_reader() {
    let mut g = Guest::new(16);
    let (mut c, local) = g.host_connect(52);
    // The guest sends as its credit allows, tracking the device's buf_alloc / fwd_cnt.
    let msg = pattern(2 << 20, 9);
    let (mut tx_cnt, mut peer_fwd, mut peer_buf) = (0u32, 0u32, CONN_BUF_ALLOC);
    let mut off = 0usize;
    let mut received = Vec::new();
    let mut stalls = 0;
    let mut rounds = 0;
    while received.len() < msg.len() {
        // Guest side: send within credit.
        let credit = peer_buf.saturating_sub(tx_cnt.wrapping_sub(peer_fwd)) as usize;
        let n = credit.min(32 * 1024).min(msg.len() - off);
        if n > 0 {
            g.send(ghdr(op::RW, 52, local), &msg[off..off + n]);
            off += n;
            tx_cnt = tx_cnt.wrapping_add(u32::try_from(n).unwrap());
        } else if off < msg.len() {
            stalls += 1;
        }
        g.pump();
        g.collect();
        for (h, _) in g.got.drain(..) {
            assert_ne!(h.op, op::RST);
            peer_fwd = h.fwd_cnt;
            peer_buf = h.buf_alloc;
        }
        // Host side: a slow reader, 8 KiB per round.
        let mut b = vec![0u8; 8 * 1024];
        match c.read(&mut b) {
            Ok(k) => received.extend_from_slice(&b[..k]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        rounds += 1;
        assert!(
            rounds < 200_000,
            "no progress: {} of {} bytes",
            received.len(),
            msg.len()
        );
    }
    assert_eq!(received, msg);
    assert!(stalls > 0, "the guest should have run out of credit");
    assert_eq!(g.metrics().credit_violations, 0);
}

#[test]
fn credit_request_is_answered() {
    let mut g = Guest::new(8);
    let (_c, local) = g.host_connect(52);
    g.send(ghdr(op::CREDIT_REQUEST, 52, local), &[]);
    let (h, _) = g.expect(op::CREDIT_UPDATE);
    assert_eq!((h.src_port, h.dst_port), (local, 52));
    assert_eq!((h.buf_alloc, h.fwd_cnt), (CONN_BUF_ALLOC, 0));
}

#[test]
fn malformed_packets_are_dropped_and_counted() {
    let mut g = Guest::new(8);
    let base = TX_BUF_BASE + 200 * TX_STRIDE;
    let put = |g: &mut Guest, h: Header| {
        g.mem
            .write_slice(&h.to_bytes(), GuestAddress(base))
            .unwrap();
    };
    let good = ghdr(op::CREDIT_REQUEST, 1, 2);
    // Wrong type, source CID, destination CID, unknown op, control op with payload.
    for h in [
        Header { type_: 2, ..good },
        Header { src_cid: 9, ..good },
        Header { dst_cid: 1, ..good },
        Header { op: 42, ..good },
        Header { op: 0, ..good },
    ] {
        put(&mut g, h);
        g.send_raw(&[(base, u32::try_from(HDR_SIZE).unwrap(), 0)]);
        g.pump();
    }
    let mut h = good;
    h.op = op::SHUTDOWN;
    h.len = 8;
    put(&mut g, h);
    g.send_raw(&[
        (base, u32::try_from(HDR_SIZE).unwrap(), 0),
        (base + 0x100, 8, 0),
    ]);
    // RW whose len is larger than its buffer; larger than 64 KiB.
    let mut h = good;
    h.op = op::RW;
    h.len = 100;
    put(&mut g, h);
    g.send_raw(&[
        (base, u32::try_from(HDR_SIZE).unwrap(), 0),
        (base + 0x100, 10, 0),
    ]);
    g.pump();
    h.len = 1 << 20;
    put(&mut g, h);
    g.send_raw(&[
        (base, u32::try_from(HDR_SIZE).unwrap(), 0),
        (base + 0x100, 1 << 20, 0),
    ]);
    g.pump();
    // Header descriptor too short; write-only; outside guest memory; data write-only.
    g.send_raw(&[(base, 10, 0)]);
    g.send_raw(&[(base, u32::try_from(HDR_SIZE).unwrap(), VRING_DESC_F_WRITE)]);
    g.send_raw(&[(
        MEM_SIZE as u64 + 0x1000,
        u32::try_from(HDR_SIZE).unwrap(),
        0,
    )]);
    h.len = 8;
    put(&mut g, h);
    g.send_raw(&[
        (base, u32::try_from(HDR_SIZE).unwrap(), 0),
        (base + 0x100, 8, VRING_DESC_F_WRITE),
    ]);
    g.pump();
    let m = g.metrics();
    assert_eq!(m.packets_dropped, 12);
    assert_eq!(m.packets_from_guest, 12);
    // Every chain came back; nothing was answered; the device still works.
    g.collect();
    assert_eq!(g.tx_free.len(), usize::from(QSIZE / 2));
    assert!(g.got.is_empty());
    assert!(!g.dev().needs_reset());
    g.send(good, &[]);
    let (rst, _) = g.expect(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (2, 1));
}

#[test]
fn unusable_rx_buffers_are_returned_empty() {
    let mut g = Guest::new(0);
    // Read-only rx buffer; header-sized buffer without room for payload.
    g.rx.set_desc(&g.mem, 0, RX_BUF_BASE, 4096, 0, 0);
    g.rx.publish(&g.mem, 0);
    g.rx.set_desc(
        &g.mem,
        1,
        RX_BUF_BASE + RX_STRIDE,
        u32::try_from(HDR_SIZE).unwrap(),
        VRING_DESC_F_WRITE,
        0,
    );
    g.rx.publish(&g.mem, 1);
    g.rx_free.retain(|&i| i > 1);
    g.send(ghdr(op::RW, 1, 2), b"x"); // unknown connection: an RST is owed
    g.pump();
    let used = g.rx.take_used(&g.mem);
    assert_eq!(used, vec![(0, 0), (1, 0)]);
    assert_eq!(g.metrics().packets_dropped, 2);
    g.rx_free.extend([0, 1]);
    g.post_rx(1);
    let (rst, _) = g.expect(op::RST);
    assert_eq!(rst.dst_port, 1);
}

#[test]
fn packets_wait_for_rx_buffers_without_spinning() {
    let mut g = Guest::new(0);
    g.rx_refill = false;
    // An established guest-initiated connection needs a RESPONSE; an RST is owed too.
    let l = UnixListener::bind(muxer::port_path(&g.uds(), 77)).unwrap();
    g.send(ghdr(op::REQUEST, 800, 77), &[]);
    g.send(ghdr(op::REQUEST, 801, 78), &[]);
    g.pump();
    let (mut s, _) = l.accept().unwrap();
    s.write_all(b"early data").unwrap();
    // No rx buffers: nothing delivered, and the loop is idle (no busy polling).
    for _ in 0..5 {
        assert_eq!(g.em.run_with_timeout(20).unwrap(), 0);
    }
    assert!(g.rx.take_used(&g.mem).is_empty());
    // One buffer at a time: the RST first (control backlog), then the RESPONSE, then data.
    g.post_rx(1);
    let (p, _) = g.expect(op::RST);
    assert_eq!(p.src_port, 78);
    for _ in 0..3 {
        assert_eq!(g.em.run_with_timeout(20).unwrap(), 0);
    }
    g.post_rx(1);
    g.expect(op::RESPONSE);
    g.post_rx(1);
    let (h, d) = g.expect(op::RW);
    assert_eq!((h.src_port, h.dst_port), (77, 800));
    assert_eq!(d, b"early data");
    for _ in 0..3 {
        assert_eq!(g.em.run_with_timeout(20).unwrap(), 0);
    }
}

#[test]
fn sixteen_plus_concurrent_connections() {
    const N: u32 = 20;
    let mut g = Guest::new(256);
    let mut clients = Vec::new();
    for i in 0..N {
        let (c, local) = g.host_connect(100 + i);
        clients.push((c, local, 100 + i));
    }
    // Guest-initiated ones too, to one host listener.
    let l = UnixListener::bind(muxer::port_path(&g.uds(), 52)).unwrap();
    l.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    for i in 0..N {
        g.send(ghdr(op::REQUEST, 3000 + i, 52), &[]);
        let (h, _) = g.expect(op::RESPONSE);
        assert_eq!(h.dst_port, 3000 + i);
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        accepted.push(s);
    }
    assert_eq!(g.dev().connection_count(), 2 * N as usize);
    let locals: std::collections::HashSet<u32> = clients.iter().map(|c| c.1).collect();
    assert_eq!(locals.len(), N as usize, "host ports are unique");
    // Every host client sends its own message; the guest sees each on its connection.
    for (c, _, port) in clients.iter_mut() {
        c.write_all(format!("hello from {port}").as_bytes())
            .unwrap();
    }
    let mut seen = std::collections::HashMap::new();
    g.pump_until("all messages", |g| {
        while let Some((h, d)) = g.got.pop_front() {
            assert_eq!(h.op, op::RW);
            seen.entry(h.dst_port)
                .or_insert_with(Vec::new)
                .extend_from_slice(&d);
        }
        seen.len() == N as usize
            && seen
                .iter()
                .all(|(p, d)| d == format!("hello from {p}").as_bytes())
    });
    // The guest answers each host client, and writes to each accepted stream.
    for (_, local, port) in &clients {
        g.send(
            ghdr(op::RW, *port, *local),
            format!("reply {port}").as_bytes(),
        );
    }
    for i in 0..N {
        g.send(ghdr(op::RW, 3000 + i, 52), format!("guest {i}").as_bytes());
    }
    g.pump();
    for (c, _, port) in clients.iter_mut() {
        let want = format!("reply {port}");
        assert_eq!(g.read_client(c, want.len()), want.as_bytes());
    }
    // Accept order is connect order.
    for (i, s) in accepted.iter_mut().enumerate() {
        let want = format!("guest {i}");
        assert_eq!(g.read_client(s, want.len()), want.as_bytes());
    }
    assert_eq!(g.metrics().conns_opened, 2 * u64::from(N));
}

#[test]
fn half_close_then_clean_teardown() {
    let mut g = Guest::new(16);
    let (mut c, local) = g.host_connect(52);
    c.write_all(b"last words").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut fwd = 0;
    assert_eq!(g.guest_read(local, 52, 10, &mut fwd), b"last words");
    let (h, _) = g.expect(op::SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_SEND);
    // The guest can still talk to the half-closed host client.
    g.send(ghdr(op::RW, 52, local), b"still here");
    assert_eq!(g.read_client(&mut c, 10), b"still here");
    // The guest closes: SHUTDOWN both, answered by RST; the client reads EOF.
    let mut s = ghdr(op::SHUTDOWN, 52, local);
    s.flags = SHUTDOWN_BOTH;
    g.send(s, &[]);
    let (rst, _) = g.expect(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (local, 52));
    g.expect_client_eof(&mut c);
    assert_eq!(g.dev().connection_count(), 0);
    let m = g.metrics();
    assert_eq!((m.conns_opened, m.conns_closed), (1, 1));
}

#[test]
fn guest_half_close_reaches_unix_peer() {
    let mut g = Guest::new(16);
    let (mut c, local) = g.host_connect(52);
    g.send(ghdr(op::RW, 52, local), b"done");
    let mut s = ghdr(op::SHUTDOWN, 52, local);
    s.flags = SHUTDOWN_SEND;
    g.send(s, &[]);
    assert_eq!(g.read_client(&mut c, 4), b"done");
    g.expect_client_eof(&mut c);
    // The host client can still answer.
    c.write_all(b"ack").unwrap();
    let mut fwd = 0;
    assert_eq!(g.guest_read(local, 52, 3, &mut fwd), b"ack");
}

#[test]
fn unix_close_is_shutdown_both_then_guest_rst() {
    let mut g = Guest::new(16);
    let (mut c, local) = g.host_connect(52);
    c.write_all(b"bye").unwrap();
    drop(c);
    let mut fwd = 0;
    assert_eq!(g.guest_read(local, 52, 3, &mut fwd), b"bye");
    let (h, _) = g.expect(op::SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_BOTH);
    assert_eq!(g.dev().connection_count(), 1);
    g.send(ghdr(op::RST, 52, local), &[]);
    g.pump();
    assert_eq!(g.dev().connection_count(), 0);
    assert_eq!(g.metrics().conns_closed, 1);
}

#[test]
fn unix_close_without_guest_rst_times_out() {
    let mut t = muxer::Timeouts::default();
    t.conn.close = Duration::from_millis(100);
    let mut g = Guest::with_timeouts(16, Some(t));
    let (c, local) = g.host_connect(52);
    drop(c);
    let (h, _) = g.expect(op::SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_BOTH);
    let (rst, _) = g.expect(op::RST);
    assert_eq!(rst.src_port, local);
    assert_eq!(g.dev().connection_count(), 0);
}

#[test]
fn driver_reset_drops_connections_and_reactivation_works() {
    let mut g = Guest::new(16);
    let (mut c, _local) = g.host_connect(52);
    let key_count = g.dev().connection_count();
    assert_eq!(key_count, 1);
    g.dev().reset();
    assert!(!g.dev().is_activated());
    g.pump();
    assert_eq!(g.dev().connection_count(), 0);
    g.expect_client_eof(&mut c);
    // CONNECTs are refused while the driver is down.
    let mut c2 = UnixStream::connect(g.uds()).unwrap();
    c2.write_all(b"CONNECT 52\n").unwrap();
    g.expect_client_eof(&mut c2);
    // A fresh activation (new rings) works again.
    let (rx, rxq) = Ring::new(&g.mem, 0x3_0000, QSIZE);
    let (tx, txq) = Ring::new(&g.mem, 0x4_0000, QSIZE);
    let (_, evq) = Ring::new(&g.mem, 0x5_0000, QSIZE);
    g.rx = rx;
    g.tx = tx;
    g.rx_free = (0..QSIZE).rev().collect();
    g.tx_free = (0..QSIZE / 2).rev().collect();
    g.got.clear();
    let irq = g.irq.try_clone().unwrap();
    g.activate(irq, vec![rxq, txq, evq]);
    g.post_rx(16);
    let (mut c3, local) = g.host_connect(53);
    g.send(ghdr(op::RW, 53, local), b"again");
    assert_eq!(g.read_client(&mut c3, 5), b"again");
}

#[test]
fn interrupts_are_raised_for_used_buffers() {
    let mut g = Guest::new(8);
    while g.irq.read().is_ok() {}
    g.send(ghdr(op::REQUEST, 1, 424242), &[]);
    let _ = g.expect(op::RST);
    assert!(g.irq.read().unwrap() >= 1);
    assert_ne!(
        g.dev().core().active().unwrap().interrupt.status() & crate::virtio::INTERRUPT_USED_RING,
        0
    );
}

#[test]
fn broken_avail_ring_needs_reset() {
    let mut g = Guest::new(8);
    // The driver claims more new entries than the ring holds.
    g.mem
        .write_obj(QSIZE + 10, GuestAddress(g.tx.avail + 2))
        .unwrap();
    g.evts[TX_QUEUE].write(1).unwrap();
    g.pump();
    assert!(g.dev().needs_reset());
    // A reset recovers.
    g.dev().reset();
    g.pump();
    assert!(!g.dev().needs_reset());
}

#[test]
fn duplicate_request_resets_the_connection() {
    let mut g = Guest::new(8);
    let _l = UnixListener::bind(muxer::port_path(&g.uds(), 60)).unwrap();
    g.send(ghdr(op::REQUEST, 900, 60), &[]);
    g.expect(op::RESPONSE);
    let key = ConnKey {
        local_port: 60,
        peer_port: 900,
    };
    assert!(g.dev().device.muxer.conn_state(key).is_some());
    g.send(ghdr(op::REQUEST, 900, 60), &[]);
    g.expect(op::RST);
    assert!(g.dev().device.muxer.conn_state(key).is_none());
}

#[test]
fn tx_queue_kept_full_is_served_in_bounded_passes() {
    let mut g = Guest::new(0);
    g.pump();
    // RSTs for unknown connections: consumed and ignored, so nothing else runs.
    for i in 0..100 {
        g.send(ghdr(op::RST, 5000 + i, 52), &[]);
    }
    let (em, mem, kick) = (&mut g.em, &g.mem, &g.evts[TX_QUEUE]);
    assert_pass_bounded(TX_BATCH, || {
        while kick.read().is_ok() {}
        kick.write(1).unwrap();
        let used = with_refilling_guest(mem, 0x1_0000, QSIZE, 50 * TX_BATCH, || {
            // One pass: only the tx kick is pending.
            assert_eq!(em.run_with_timeout(0).unwrap(), 1);
        });
        (used, kick.read().is_ok())
    });
    // The rest is served on later passes.
    g.evts[TX_QUEUE].write(1).unwrap();
    g.pump();
    assert!(g.metrics().packets_from_guest > TX_BATCH as u64);
}

#[test]
fn connection_cap_refuses_with_rst_and_buffered_bytes_stay_bounded() {
    let mut g = Guest::new(64);
    g.dev().device.muxer.limits = muxer::Limits {
        connections: 4,
        handshakes: 2,
    };
    let _l = UnixListener::bind(muxer::port_path(&g.uds(), 60)).unwrap();
    // Four guest connections whose Unix peers never read (never even accepted).
    for p in 0..4 {
        g.send(ghdr(op::REQUEST, 1000 + p, 60), &[]);
        g.expect(op::RESPONSE);
    }
    // The fifth is refused with RST, and so is a host client.
    g.send(ghdr(op::REQUEST, 1004, 60), &[]);
    let (rst, _) = g.expect(op::RST);
    assert_eq!(rst.dst_port, 1004);
    let mut c = UnixStream::connect(g.uds()).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();
    g.expect_client_eof(&mut c);
    assert_eq!(g.metrics().conns_refused, 2);

    // The guest fills every connection: the socket takes what it can, the device holds at
    // most CONN_BUF_ALLOC more per connection.
    let chunk = vec![0x5a; 16 * 1024];
    for p in 0..4 {
        let before = g.dev().buffered_bytes();
        loop {
            let mine = g.dev().buffered_bytes() - before;
            if mine + chunk.len() > CONN_BUF_ALLOC as usize {
                break;
            }
            g.send(ghdr(op::RW, 1000 + p, 60), &chunk);
            g.pump();
            g.collect();
            // Credit updates only (the socket took the first bytes): no reset.
            while let Some((h, _)) = g.got.pop_front() {
                assert_eq!(h.op, op::CREDIT_UPDATE, "{h:?}");
            }
        }
    }
    let total = g.dev().buffered_bytes();
    assert!(total <= 4 * CONN_BUF_ALLOC as usize, "{total}");
    assert!(
        total > 4 * (CONN_BUF_ALLOC as usize - chunk.len()),
        "{total}"
    );
    // Beyond its credit a connection is reset and its buffer freed.
    g.send(ghdr(op::RW, 1000, 60), &chunk);
    let (rst, _) = g.expect(op::RST);
    assert_eq!(rst.dst_port, 1000);
    assert_eq!(g.metrics().credit_violations, 1);
    assert!(g.dev().buffered_bytes() <= 3 * CONN_BUF_ALLOC as usize);
    // A slot is free again.
    g.send(ghdr(op::REQUEST, 1005, 60), &[]);
    g.expect(op::RESPONSE);
    // The per-VM bound the defaults give.
    assert!(muxer::MAX_CONNECTIONS * CONN_BUF_ALLOC as usize <= muxer::MAX_BUFFERED_BYTES);
}

#[test]
fn pending_handshakes_are_bounded_in_number_and_time() {
    let t = muxer::Timeouts {
        handshake: Duration::from_millis(300),
        ..Default::default()
    };
    let mut g = Guest::with_timeouts(8, Some(t));
    g.dev().device.muxer.limits.handshakes = 2;
    let start = Instant::now();
    let mut silent = UnixStream::connect(g.uds()).unwrap();
    // A client trickling its line byte by byte gets no more time.
    let mut slow = UnixStream::connect(g.uds()).unwrap();
    slow.write_all(b"CONN").unwrap();
    g.pump();
    // A third pending handshake is closed at once.
    let mut third = UnixStream::connect(g.uds()).unwrap();
    g.expect_client_eof(&mut third);
    assert!(start.elapsed() < Duration::from_millis(250));
    assert_eq!(g.metrics().conns_refused, 1);
    slow.set_nonblocking(true).unwrap();
    let mut tail = b"ECT 52".iter();
    g.pump_until("the handshake deadline", |g| {
        if let Some(b) = tail.next() {
            let _ = slow.write(std::slice::from_ref(b));
        }
        std::thread::sleep(Duration::from_millis(20));
        g.metrics().conns_refused == 3
    });
    assert!(start.elapsed() >= Duration::from_millis(290));
    g.expect_client_eof(&mut silent);
    g.expect_client_eof(&mut slow);
    // The slots are free again.
    let (_c, _) = g.host_connect(52);
}

#[test]
fn uds_path_prefix_collisions_are_refused() {
    let dir = TmpDir::new("kvs");
    let a = Vsock::new(&VsockConfig::new(3, &dir.0.join("a.vsock"))).unwrap();
    // Another VM at <a>_<port>: a's guest could reach its main socket.
    let err = Vsock::new(&VsockConfig::new(4, &dir.0.join("a.vsock_52"))).unwrap_err();
    assert!(matches!(err, VsockError::PathCollision { .. }), "{err}");
    assert!(err.to_string().contains("a.vsock"), "{err}");
    assert!(!dir.0.join("a.vsock_52").exists());
    // Same directory spelled differently.
    let err = Vsock::new(&VsockConfig::new(4, &dir.0.join(".").join("a.vsock_7"))).unwrap_err();
    assert!(matches!(err, VsockError::PathCollision { .. }), "{err}");
    // The other order: a device whose <path>_<port> is an existing listener.
    let b = Vsock::new(&VsockConfig::new(5, &dir.0.join("b.vsock_52"))).unwrap();
    let err = Vsock::new(&VsockConfig::new(6, &dir.0.join("b.vsock"))).unwrap_err();
    assert!(matches!(err, VsockError::PathCollision { .. }), "{err}");
    // Not a port suffix: fine.
    let c = Vsock::new(&VsockConfig::new(7, &dir.0.join("a.vsock2"))).unwrap();
    let d = Vsock::new(&VsockConfig::new(8, &dir.0.join("a.vsock_x"))).unwrap();
    // Once a device is gone its name is free.
    drop(a);
    let e = Vsock::new(&VsockConfig::new(9, &dir.0.join("a.vsock_52"))).unwrap();
    drop((b, c, d, e));
}

#[test]
fn guest_cannot_reach_another_vsock_listener() {
    let mut g = Guest::new(8);
    let other_dir = TmpDir::new("kvs");
    let other_path = other_dir.0.join("other.sock");
    let _other = Vsock::new(&VsockConfig::new(4, &other_path)).unwrap();
    // <uds>_53 leads to the other VM's listener (a symlink, or a hard link, placed there).
    std::os::unix::fs::symlink(&other_path, muxer::port_path(&g.uds(), 53)).unwrap();
    g.send(ghdr(op::REQUEST, 2000, 53), &[]);
    let (rst, _) = g.expect(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (53, 2000));
    assert_eq!(g.metrics().conns_refused, 1);
    assert_eq!(g.metrics().conns_opened, 0);
    // Nor its own listener.
    std::os::unix::fs::symlink(g.uds(), muxer::port_path(&g.uds(), 54)).unwrap();
    g.send(ghdr(op::REQUEST, 2001, 54), &[]);
    g.expect(op::RST);
    assert_eq!(g.dev().connection_count(), 0);
    // An ordinary listener at <uds>_55 still works.
    let _l = UnixListener::bind(muxer::port_path(&g.uds(), 55)).unwrap();
    g.send(ghdr(op::REQUEST, 2002, 55), &[]);
    g.expect(op::RESPONSE);
}

#[test]
fn rx_kept_busy_is_served_in_bounded_passes() {
    let mut g = Guest::new(QSIZE);
    let l = UnixListener::bind(muxer::port_path(&g.uds(), 61)).unwrap();
    let mut req = ghdr(op::REQUEST, 3000, 61);
    req.buf_alloc = u32::MAX;
    g.send(req, &[]);
    g.expect(op::RESPONSE);
    let (s, _) = l.accept().unwrap();
    // A Unix peer that writes as fast as it can until the connection goes away.
    let writer = std::thread::spawn(move || {
        let mut s = s;
        let buf = vec![7u8; 64 * 1024];
        while s.write_all(&buf).is_ok() {}
    });
    std::thread::sleep(Duration::from_millis(50));
    let (em, mem, evts) = (&mut g.em, &g.mem, &g.evts);
    assert_pass_bounded(RX_BATCH, || {
        for e in evts {
            while e.read().is_ok() {}
        }
        let used = with_refilling_guest(mem, 0, QSIZE, 50 * RX_BATCH, || {
            em.run_with_timeout(0).unwrap();
        });
        (used, evts[RX_QUEUE].read().is_ok())
    });
    drop(g);
    writer.join().unwrap();
}

/// A restored vsock device keeps the guest's CID and nothing of its connections, and tells the
/// guest so: once activated again from the saved queues it puts
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` in the first event buffer the driver posts (once), and
/// holds packets for the guest back until the guest has handled it.
#[test]
fn restored_device_sends_a_transport_reset_event() {
    let mut g = Guest::new(4);
    let state = g.dev().state();
    assert!(state.virtio.activated);
    assert_eq!(state.guest_cid, CID);
    let json = serde_json::to_string(&state).unwrap();
    // A clone restores with its own listener path, never with another CID.
    let other = VsockConfig::new(CID + 1, &g.dir.0.join("x.sock"));
    assert!(matches!(
        Vsock::restore(&other, &state),
        Err(VsockError::Restore(RestoreError::Mismatch {
            field: "guest_cid",
            ..
        }))
    ));
    let cfg = VsockConfig::new(CID, &g.dir.0.join("r.sock"));
    let restored = Vsock::restore(&cfg, &serde_json::from_str(&json).unwrap()).unwrap();
    assert_eq!(restored.connection_count(), 0);
    let (dev, mut em, kicks) = on_event_loop(restored);
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
    let gm = GuestMemoryAtomic::new(g.mem.clone());
    dev.lock()
        .unwrap()
        .activate_restored(gm, interrupt)
        .unwrap();
    pump(&mut em);
    // The event ring was never used: the same layout, driven by a fresh view.
    let (mut events, _) = Ring::new(&g.mem, 0x2_0000, QSIZE);
    const EVENT_BUF: u64 = 0x2_8000;
    g.mem.write_obj(u32::MAX, GuestAddress(EVENT_BUF)).unwrap();
    events.set_desc(&g.mem, 0, EVENT_BUF, 8, VRING_DESC_F_WRITE, 0);
    events.publish(&g.mem, 0);
    kicks[EVENT_QUEUE].write(1).unwrap();
    pump(&mut em);
    assert_eq!(events.take_used(&g.mem), [(0, 4)]);
    let id: u32 = g.mem.read_obj(GuestAddress(EVENT_BUF)).unwrap();
    assert_eq!(id, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    assert!(irq.read().is_ok());
    // Until the guest has handled the reset (it posts the event buffer again and kicks),
    // nothing reaches its rx queue: a connection made now would be reset by the late event.
    let mut c = UnixStream::connect(g.dir.0.join("r.sock")).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();
    pump(&mut em);
    assert!(
        g.rx.take_used(&g.mem).is_empty(),
        "rx held until the reset is handled"
    );
    events.publish(&g.mem, 0);
    kicks[EVENT_QUEUE].write(1).unwrap();
    pump(&mut em);
    assert!(events.take_used(&g.mem).is_empty(), "sent once");
    assert_eq!(
        g.rx.take_used(&g.mem).len(),
        1,
        "then the connection request reaches it"
    );
}
