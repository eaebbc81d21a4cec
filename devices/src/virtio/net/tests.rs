//! virtio-net tests: a driver written here puts buffers on real split rings in guest memory
//! (laid out by hand, see [`SplitRing`]), the device runs in a real
//! `EventManager` pumped on the test thread, and its backend is a Unix datagram socket pair
//! (one datagram = one frame, non-blocking, `EAGAIN` when full) or a real TAP in a private
//! network namespace. No KVM.
//!
//! `Harness::pump` runs the loop until it has nothing left to do and fails after 1000 rounds:
//! every test that pumps also checks that the device never spins.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::bus::BusDevice;
use crate::rate_limiter::test_util::bucket;
use crate::tap::test_util::{self, PacketSocket};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::test_util::{
    assert_pass_bounded, on_event_loop, pump, with_refilling_guest, Ring as SplitRing,
    VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, WAIT,
};
use crate::virtio::{status, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_RING};
use crate::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};
use kestrel_api::NetConfig as ApiNetConfig;

const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = QUEUE_SIZE;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x1_0000;
const RX_BUFS: (u64, u64) = (0x10_0000, 0x80_0000);
const TX_BUFS: (u64, u64) = (0x80_0000, 0xf0_0000);
const OUTSIDE: u64 = 0x1_0000_0000;
const READ: u16 = 0;
const WRITE: u16 = VRING_DESC_F_WRITE;

fn bit(b: u32) -> u64 {
    1 << b
}

/// The basic features a modern driver takes, without offloads or mergeable buffers.
const BASIC: u64 = VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS;

/// An interface as the VM config has it: a slot without TAP unless changed.
fn slot(id: &str) -> ApiNetConfig {
    ApiNetConfig {
        iface_id: id.into(),
        ..ApiNetConfig::default()
    }
}

/// A device for a VM config's interface (through the device's own config type).
fn new_net(cfg: &ApiNetConfig) -> Result<Net, NetError> {
    Net::new(&NetConfig::try_from(cfg)?)
}

/// An Ethernet frame: broadcast, from 02:00:00:00:00:42, EtherType 0x88b5, `len` payload bytes
/// derived from `seed`.
fn eth(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x42, 0x88, 0xb5]);
    f.extend((0..len).map(|i| i.to_le_bytes()[0].wrapping_mul(7).wrapping_add(seed)));
    f
}

/// A virtio-net header with `flags` and `gso_type`.
fn hdr(flags: u32, gso: u32) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = flags.to_le_bytes()[0];
    h[1] = gso.to_le_bytes()[0];
    h
}

/// Header + frame, as the backend sees it.
fn wire(h: [u8; VNET_HDR_LEN], frame: &[u8]) -> Vec<u8> {
    let mut v = h.to_vec();
    v.extend_from_slice(frame);
    v
}

/// A backend over one end of a Unix `SOCK_SEQPACKET` socket pair: one message per frame, and
/// the peer closing shows up as a hang-up.
struct SockBackend(UnixDatagram);

impl AsRawFd for SockBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for SockBackend {
    fn name(&self) -> &str {
        "socketpair"
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }

    fn write_frame(&mut self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let mut v = Vec::new();
        for s in bufs {
            let mut t = vec![0u8; s.len()];
            s.copy_to(&mut t[..]);
            v.extend_from_slice(&t);
        }
        self.0.send(&v)
    }
}

/// A non-blocking `SOCK_SEQPACKET` pair (std's `UnixDatagram` works on it: send and recv on
/// a connected socket).
fn seqpacket_pair() -> (UnixDatagram, UnixDatagram) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned by nobody else.
    unsafe {
        (
            UnixDatagram::from_raw_fd(fds[0]),
            UnixDatagram::from_raw_fd(fds[1]),
        )
    }
}

/// A backend and the test's end of it.
fn socket_backend() -> (Box<dyn NetBackend>, UnixDatagram) {
    let (a, b) = seqpacket_pair();
    (Box::new(SockBackend(a)), b)
}

/// A backend whose send buffer holds only a few frames.
fn small_socket_backend() -> (Box<dyn NetBackend>, UnixDatagram) {
    let (a, b) = seqpacket_pair();
    let one: libc::c_int = 1;
    // SAFETY: SO_SNDBUF reads one int from the pointer, of the given size.
    let r = unsafe {
        libc::setsockopt(
            a.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&one as *const libc::c_int).cast(),
            u32::try_from(std::mem::size_of::<libc::c_int>()).unwrap(),
        )
    };
    assert_eq!(r, 0);
    (Box::new(SockBackend(a)), b)
}

/// The next datagram on the test's end, if any.
fn try_recv(peer: &UnixDatagram) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70_000];
    match peer.recv(&mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("recv: {e}"),
    }
}

/// A split ring as the driver sees it, with buffers for its chains.
struct Ring {
    split: SplitRing,
    next_desc: u16,
    buf_next: u64,
    bufs: (u64, u64),
    /// Descriptors of each published chain, by head.
    chains: HashMap<u16, Vec<(u64, u32)>>,
}

impl Ring {
    /// Rings at `base` (see [`SplitRing`]), buffers in `bufs`.
    fn new(mem: &GuestMemoryMmap, base: u64, bufs: (u64, u64), event_idx: bool) -> (Ring, Queue) {
        let (split, mut q) = SplitRing::new(mem, base, QSIZE);
        q.set_event_idx(event_idx);
        let r = Ring {
            split,
            next_desc: 0,
            buf_next: bufs.0,
            bufs,
            chains: HashMap::new(),
        };
        (r, q)
    }

    /// A buffer of `len` bytes in this ring's buffer area (reused round-robin).
    fn alloc(&mut self, len: u32) -> u64 {
        let len = u64::from(len).next_multiple_of(64);
        if self.buf_next + len > self.bufs.1 {
            self.buf_next = self.bufs.0;
        }
        let a = self.buf_next;
        self.buf_next += len;
        assert!(self.buf_next <= self.bufs.1, "buffer too large");
        a
    }

    /// Publish a chain of (address, length, flags) descriptors; returns its head.
    fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let id = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QSIZE;
            let last = i + 1 == descs.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT
            };
            self.split
                .set_desc(mem, id, addr, len, flags, self.next_desc);
        }
        self.chains.insert(
            head,
            descs.iter().map(|&(a, l, _)| (a, l)).collect::<Vec<_>>(),
        );
        self.split.publish(mem, head);
        head
    }

    /// The first `len` bytes written into chain `head`.
    fn read_chain(&self, mem: &GuestMemoryMmap, head: u16, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut left = len as usize;
        for &(addr, l) in &self.chains[&head] {
            let n = left.min(l as usize);
            let mut b = vec![0u8; n];
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            out.extend(b);
            left -= n;
        }
        assert_eq!(left, 0, "used length beyond the chain");
        out
    }

    /// Set `used_event` (EVENT_IDX).
    fn set_used_event(&self, mem: &GuestMemoryMmap, v: u16) {
        mem.write_obj(v, GuestAddress(self.avail + 4 + 2 * u64::from(QSIZE)))
            .unwrap();
    }
}

impl std::ops::Deref for Ring {
    type Target = SplitRing;

    fn deref(&self) -> &SplitRing {
        &self.split
    }
}

impl std::ops::DerefMut for Ring {
    fn deref_mut(&mut self) -> &mut SplitRing {
        &mut self.split
    }
}

/// The guest: a driver for both queues plus the device's event loop.
struct Harness {
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Net>>,
    em: EventManager<Arc<Mutex<Net>>>,
    evts: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
    rx: Ring,
    tx: Ring,
}

impl Harness {
    /// `net` on the loop, activated with `features` acked.
    fn new(net: Net, features: u64) -> Harness {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (dev, em, evts) = on_event_loop(net);
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        let (rx, rxq) = Ring::new(&mem, RX_RING, RX_BUFS, event_idx);
        let (tx, txq) = Ring::new(&mem, TX_RING, TX_BUFS, event_idx);
        let interrupt = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let mut h = Harness {
            mem,
            dev,
            em,
            evts,
            interrupt,
            rx,
            tx,
        };
        {
            let mut d = h.dev();
            d.set_acked_features(features);
            d.activate(
                GuestMemoryAtomic::new(h.mem.clone()),
                h.interrupt.clone(),
                vec![rxq, txq],
            )
            .unwrap();
        }
        h.pump();
        h.clear_irq();
        h
    }

    /// A device with a socket-pair backend; returns the test's end.
    fn with_socket(features: u64) -> (Harness, UnixDatagram) {
        Self::with_socket_config(slot("eth0"), features)
    }

    fn with_socket_config(cfg: ApiNetConfig, features: u64) -> (Harness, UnixDatagram) {
        let mut net = new_net(&cfg).unwrap();
        let (b, peer) = socket_backend();
        net.attach_backend(b).unwrap();
        (Harness::new(net, features), peer)
    }

    fn dev(&self) -> MutexGuard<'_, Net> {
        self.dev.lock().unwrap()
    }

    fn metrics(&self) -> NetMetrics {
        self.dev().metrics()
    }

    /// Run the event loop until it is idle (fails if it never is: a spinning device).
    fn pump(&mut self) {
        pump(&mut self.em);
    }

    /// Pump (waiting for events up to 5 ms at a time) until `f` holds.
    fn pump_until(&mut self, what: &str, mut f: impl FnMut(&mut Harness) -> bool) {
        let end = Instant::now() + WAIT;
        loop {
            self.em.run_with_timeout(5).unwrap();
            if f(self) {
                return;
            }
            assert!(Instant::now() < end, "timed out waiting for {what}");
        }
    }

    /// Interrupts signalled since the last call (0 if none).
    fn irqs(&self) -> u64 {
        self.interrupt.event().read().unwrap_or(0)
    }

    fn clear_irq(&self) {
        let _ = self.interrupt.event().read();
        self.interrupt.clear();
    }

    /// Post one RX chain of writable buffers of the given sizes (not notified).
    fn add_rx(&mut self, sizes: &[u32]) -> u16 {
        let descs: Vec<_> = sizes
            .iter()
            .map(|&s| (self.rx.alloc(s), s, WRITE))
            .collect();
        self.rx.add_chain(&self.mem, &descs)
    }

    /// Post `n` single-buffer RX chains of `size` bytes and notify.
    fn post_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            self.add_rx(&[size]);
        }
        self.notify(RX_QUEUE);
    }

    fn notify(&self, q: usize) {
        self.evts[q].write(1).unwrap();
    }

    /// Queue `bytes` (header + frame) on the TX ring, split at `cuts`, and notify.
    fn send_split(&mut self, bytes: &[u8], cuts: &[usize]) -> u16 {
        let mut descs = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain([&bytes.len()]) {
            let piece = &bytes[start..end];
            let a = self.tx.alloc(u32::try_from(piece.len().max(1)).unwrap());
            self.mem.write_slice(piece, GuestAddress(a)).unwrap();
            descs.push((a, u32::try_from(piece.len()).unwrap(), READ));
            start = end;
        }
        let head = self.tx.add_chain(&self.mem, &descs);
        self.notify(TX_QUEUE);
        head
    }

    /// Queue a frame with a plain header (header and frame in separate descriptors).
    fn send(&mut self, frame: &[u8]) -> u16 {
        self.send_split(&wire(hdr(0, 0), frame), &[VNET_HDR_LEN])
    }

    /// Queue a raw chain and notify.
    fn send_raw(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.tx.add_chain(&self.mem, descs);
        self.notify(TX_QUEUE);
        head
    }

    /// Completed RX chains with their contents.
    fn rx_used(&mut self) -> Vec<(u16, Vec<u8>)> {
        self.rx
            .take_used(&self.mem)
            .into_iter()
            .map(|(head, len)| (head, self.rx.read_chain(&self.mem, head, len)))
            .collect()
    }

    fn tx_used(&mut self) -> Vec<(u16, u32)> {
        self.tx.take_used(&self.mem)
    }
}

/// A frame as received in one buffer: header checks, then the frame.
fn split_rx(data: &[u8]) -> ([u8; VNET_HDR_LEN], Vec<u8>) {
    let mut h = [0u8; VNET_HDR_LEN];
    h.copy_from_slice(&data[..VNET_HDR_LEN]);
    (h, data[VNET_HDR_LEN..].to_vec())
}

fn num_buffers(h: &[u8; VNET_HDR_LEN]) -> u16 {
    u16::from_le_bytes([h[10], h[11]])
}

#[test]
fn features_and_config_space() {
    let mut cfg = slot("eth0");
    cfg.guest_mac = Some("06:00:ac:10:00:02".into());
    let mut net = new_net(&cfg).unwrap();
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    let f = net.avail_features();
    for b in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
    ] {
        assert_ne!(f & bit(b), 0, "feature {b}");
    }
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
    // No control queue, multiqueue, MTU or UFO.
    for b in [17, 22, 3, 10, 14] {
        assert_eq!(f & bit(b), 0, "feature {b}");
    }
    // Acked features are cut to what is offered.
    net.set_acked_features(u64::MAX);
    assert_eq!(net.acked_features(), f);

    // mac, then status (link down: no TAP).
    let mut c = [0xffu8; 12];
    net.read_config(0, &mut c);
    assert_eq!(c, [6, 0, 0xac, 0x10, 0, 2, 0, 0, 0, 0, 0, 0]);
    let mut s = [0u8; 2];
    net.read_config(6, &mut s);
    assert_eq!(s, [0, 0]);
    net.read_config(u64::MAX, &mut s);
    assert_eq!(s, [0, 0]);
    net.write_config(0, &[1, 2, 3, 4, 5, 6]);
    net.read_config(0, &mut c[..6]);
    assert_eq!(c[..6], [6, 0, 0xac, 0x10, 0, 2]);
    assert_eq!(net.mac(), [6, 0, 0xac, 0x10, 0, 2]);
    assert!(!net.link_up());
    assert_eq!(net.tap_name(), None);
    assert_eq!(net.iface_id(), "eth0");

    // Default MAC: derived from the id.
    let net = new_net(&slot("eth1")).unwrap();
    assert_eq!(net.mac(), kestrel_api::derived_mac("eth1"));
    // Bad MACs.
    for bad in ["01:00:00:00:00:01", "00:00:00:00:00:00", "zz"] {
        let mut cfg = slot("x");
        cfg.guest_mac = Some(bad.into());
        assert!(
            matches!(new_net(&cfg), Err(NetError::InvalidMac(m)) if m == bad),
            "{bad}"
        );
    }
    // A missing TAP.
    let mut cfg = slot("x");
    cfg.host_dev_name = Some("kt-no-such-tap".into());
    assert!(matches!(
        new_net(&cfg),
        Err(NetError::Tap(TapError::NotFound(_)))
    ));
}

#[test]
fn offload_flags_follow_the_guest_features() {
    assert_eq!(tap_offload_flags(0), 0);
    assert_eq!(
        tap_offload_flags(AVAIL_FEATURES & !bit(VIRTIO_NET_F_GUEST_CSUM)),
        0
    );
    assert_eq!(
        tap_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM)),
        offload::CSUM
    );
    assert_eq!(
        tap_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4)),
        offload::CSUM | offload::TSO4
    );
    assert_eq!(
        tap_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN)),
        offload::CSUM
    );
    assert_eq!(
        tap_offload_flags(AVAIL_FEATURES),
        offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN
    );
}

#[test]
fn tx_frames_reach_the_backend() {
    let (mut h, peer) = Harness::with_socket(BASIC);
    let f1 = eth(100, 1);
    let f2 = eth(1500, 2);
    let f3 = eth(46, 3);
    let h1 = h.send(&f1);
    // Header split over two descriptors, frame over three.
    let w2 = wire(hdr(0, 0), &f2);
    let h2 = h.send_split(&w2, &[5, 12, 20, 700]);
    // Header and frame in one descriptor.
    let w3 = wire(hdr(0, 0), &f3);
    let h3 = h.send_split(&w3, &[]);
    h.pump();
    assert_eq!(try_recv(&peer), Some(wire(hdr(0, 0), &f1)));
    assert_eq!(try_recv(&peer), Some(w2));
    assert_eq!(try_recv(&peer), Some(w3));
    assert_eq!(try_recv(&peer), None);
    let mut used = h.tx_used();
    used.sort();
    let mut want = vec![(h1, 0), (h2, 0), (h3, 0)];
    want.sort();
    assert_eq!(used, want);
    let m = h.metrics();
    assert_eq!(m.tx_packets, 3);
    assert_eq!(m.tx_bytes, (f1.len() + f2.len() + f3.len()) as u64);
    assert!(h.irqs() >= 1);
    assert_eq!(h.interrupt.status(), INTERRUPT_USED_RING);
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let (mut h, peer) = Harness::with_socket(BASIC);
    let a = h.tx.alloc(0x1_0100);
    let frame = wire(hdr(0, 0), &eth(64, 9));
    h.mem.write_slice(&frame, GuestAddress(a)).unwrap();
    let n = u32::try_from(frame.len()).unwrap();
    let mut heads = vec![
        // A device-writable descriptor.
        h.send_raw(&[(a, 12, READ), (a + 12, n - 12, WRITE)]),
        // Shorter than the header.
        h.send_raw(&[(a, 4, READ), (a + 4, 4, READ)]),
        // A header and nothing else (and a zero-length descriptor).
        h.send_raw(&[(a, 12, READ), (a + 12, 0, READ)]),
        // Longer than 12 + 65550 bytes.
        h.send_raw(&[(a, 12, READ), (a + 12, 65551, READ)]),
        // Outside guest memory.
        h.send_raw(&[(a, 12, READ), (OUTSIDE, 64, READ)]),
        // Crossing the end of guest memory.
        h.send_raw(&[(a, 12, READ), (MEM_SIZE as u64 - 10, 64, READ)]),
    ];
    // An offload the driver did not negotiate (no CSUM / HOST_TSO4 in BASIC).
    heads.push(h.send_split(&wire(hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0), &eth(64, 1)), &[]));
    heads.push(h.send_split(&wire(hdr(0, VIRTIO_NET_HDR_GSO_TCPV4), &eth(64, 1)), &[]));
    heads.push(h.send_split(&wire(hdr(0, 0x42), &eth(64, 1)), &[]));
    // The queue goes on: exactly 12 + 65550 bytes is fine.
    let big = eth(MAX_FRAME_LEN - 14, 5);
    assert_eq!(big.len(), MAX_FRAME_LEN);
    heads.push(h.send(&big));
    h.pump();
    assert_eq!(try_recv(&peer), Some(wire(hdr(0, 0), &big)));
    assert_eq!(try_recv(&peer), None);
    let used = h.tx_used();
    assert_eq!(used.len(), heads.len());
    for (head, len) in used {
        assert!(heads.contains(&head));
        assert_eq!(len, 0);
    }
    let m = h.metrics();
    assert_eq!(m.tx_dropped_wrong_direction, 1);
    assert_eq!(m.tx_dropped_no_header, 1);
    assert_eq!(m.tx_dropped_empty, 1);
    assert_eq!(m.tx_dropped_oversized, 1);
    assert_eq!(m.tx_dropped_bad_buffer, 2);
    assert_eq!(m.tx_dropped_bad_header, 3);
    assert_eq!(m.tx_packets, 1);
    assert_eq!(m.tx_bytes, MAX_FRAME_LEN as u64);
    assert!(!h.dev().needs_reset());
}

#[test]
fn host_offloads_pass_through_when_negotiated() {
    let features = BASIC | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4);
    let (mut h, peer) = Harness::with_socket(features);
    let mut hd = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4);
    hd[2..10].copy_from_slice(&[54, 0, 0xa8, 5, 34, 0, 16, 0]);
    let w = wire(hd, &eth(3000, 4));
    h.send_split(&w, &[12]);
    h.pump();
    // Passed on byte for byte.
    assert_eq!(try_recv(&peer), Some(w));
    assert_eq!(h.metrics().tx_dropped_bad_header, 0);
}

#[test]
fn tx_waits_for_a_full_backend_without_spinning() {
    let mut net = new_net(&slot("eth0")).unwrap();
    let (b, peer) = small_socket_backend();
    net.attach_backend(b).unwrap();
    let mut h = Harness::new(net, BASIC);
    // The socket's send buffer holds a few frames.
    let frames: Vec<_> = (0..40).map(|i| eth(200, i)).collect();
    for f in &frames {
        h.send(f);
    }
    h.pump();
    let m = h.metrics();
    assert!(m.tx_backend_full >= 1, "{m:?}");
    assert!(m.tx_packets < 40, "{m:?}");
    assert_eq!(
        h.tx_used().len() as u64,
        m.tx_packets,
        "only sent frames are used"
    );
    // Nothing was dropped; reading makes room and the rest follows, in order.
    let mut got = Vec::new();
    h.pump_until("all frames", |_| {
        while let Some(f) = try_recv(&peer) {
            got.push(f);
        }
        got.len() == frames.len()
    });
    for (g, f) in got.iter().zip(&frames) {
        assert_eq!(g, &wire(hdr(0, 0), f));
    }
    let m = h.metrics();
    assert_eq!(m.tx_packets, 40);
    assert_eq!(m.tx_dropped_no_link + m.tap_write_errors, 0);
    h.pump();
}

#[test]
fn link_down_drops_frames_waiting_for_a_full_backend() {
    let mut net = new_net(&slot("eth0")).unwrap();
    let (b, _peer) = small_socket_backend();
    net.attach_backend(b).unwrap();
    let mut h = Harness::new(net, BASIC);
    for i in 0..40 {
        h.send(&eth(200, i));
    }
    h.pump();
    let sent = h.metrics().tx_packets;
    assert!(sent < 40);
    h.dev().set_link(false);
    h.pump();
    let m = h.metrics();
    assert_eq!(m.tx_packets, sent);
    assert_eq!(m.tx_dropped_no_link, 40 - sent);
    assert_eq!(h.tx_used().len(), 40);
}

#[test]
fn rx_frames_reach_the_guest() {
    let (mut h, peer) = Harness::with_socket(BASIC);
    h.post_rx(4, 2048);
    h.pump();
    let frames = [eth(60, 1), eth(1500, 2), eth(1, 3)];
    for f in &frames {
        peer.send(&wire(hdr(0, 0), f)).unwrap();
    }
    h.pump();
    let used = h.rx_used();
    assert_eq!(used.len(), 3);
    for ((_, data), f) in used.iter().zip(&frames) {
        let (hd, frame) = split_rx(data);
        assert_eq!(&frame, f);
        assert_eq!(num_buffers(&hd), 1);
        assert_eq!(hd[..10], [0; 10]);
    }
    let m = h.metrics();
    assert_eq!(m.rx_packets, 3);
    assert_eq!(
        m.rx_bytes,
        frames.iter().map(|f| f.len() as u64).sum::<u64>()
    );
    assert_eq!(m.rx_no_buffer, 0);
    assert!(h.irqs() >= 1);
}

#[test]
fn rx_waits_for_guest_buffers_without_spinning() {
    let (mut h, peer) = Harness::with_socket(BASIC);
    let frames: Vec<_> = (0..3).map(|i| eth(100 + i, i.to_le_bytes()[0])).collect();
    for f in &frames {
        peer.send(&wire(hdr(0, 0), f)).unwrap();
    }
    // No buffers: one frame is staged, the loop goes idle (pump fails otherwise).
    h.pump();
    h.pump();
    let m = h.metrics();
    assert_eq!(m.rx_packets, 0);
    assert_eq!(m.rx_no_buffer, 1);
    assert_eq!(m.rx_dropped_oversized + m.rx_dropped_malformed, 0);
    // One buffer: exactly the first frame; the second is staged and waits.
    h.post_rx(1, 2048);
    h.pump();
    let used = h.rx_used();
    assert_eq!(used.len(), 1);
    assert_eq!(split_rx(&used[0].1).1, frames[0]);
    assert_eq!(h.metrics().rx_no_buffer, 2);
    // More buffers: the rest, in order.
    h.post_rx(5, 2048);
    h.pump();
    let used = h.rx_used();
    assert_eq!(used.len(), 2);
    assert_eq!(split_rx(&used[0].1).1, frames[1]);
    assert_eq!(split_rx(&used[1].1).1, frames[2]);
    // A frame arriving now goes straight in.
    peer.send(&wire(hdr(0, 0), &frames[0])).unwrap();
    h.pump();
    assert_eq!(h.rx_used().len(), 1);
    let m = h.metrics();
    assert_eq!(m.rx_packets, 4);
    assert_eq!(m.rx_no_buffer, 2);
}

#[test]
fn mergeable_buffers_span_several_chains() {
    let (mut h, peer) = Harness::with_socket(BASIC | bit(VIRTIO_NET_F_MRG_RXBUF));
    h.post_rx(5, 1024);
    let f = eth(3000 - 14, 7);
    peer.send(&wire(hdr(0, 0), &f)).unwrap();
    h.pump();
    let used = h.rx_used();
    let lens: Vec<_> = used.iter().map(|(_, d)| d.len()).collect();
    assert_eq!(lens, [1024, 1024, 12 + 3000 - 2048]);
    let (hd, _) = split_rx(&used[0].1);
    assert_eq!(num_buffers(&hd), 3);
    let all: Vec<u8> = used.iter().flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(all[12..], f[..]);

    // Two buffers left; a 3000-byte frame needs three: it keeps the two and waits.
    peer.send(&wire(hdr(0, 0), &f)).unwrap();
    h.pump();
    assert!(h.rx_used().is_empty());
    assert_eq!(h.metrics().rx_no_buffer, 1);
    h.post_rx(2, 1024);
    h.pump();
    let used = h.rx_used();
    assert_eq!(used.len(), 3);
    assert_eq!(num_buffers(&split_rx(&used[0].1).0), 3);
    let all: Vec<u8> = used.iter().flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(all[12..], f[..]);
    // The buffer left over takes the next small frame.
    let small = eth(10, 1);
    peer.send(&wire(hdr(0, 0), &small)).unwrap();
    h.pump();
    let used = h.rx_used();
    assert_eq!(used.len(), 1);
    let (hd, frame) = split_rx(&used[0].1);
    assert_eq!(num_buffers(&hd), 1);
    assert_eq!(frame, small);
    assert_eq!(h.metrics().rx_packets, 3);
}

#[test]
fn frames_that_never_fit_are_dropped() {
    // Without mergeable buffers a frame must fit one chain; the chain stays for the next.
    let (mut h, peer) = Harness::with_socket(BASIC);
    h.post_rx(2, 1000);
    peer.send(&wire(hdr(0, 0), &eth(1500, 1))).unwrap();
    let small = eth(500, 2);
    peer.send(&wire(hdr(0, 0), &small)).unwrap();
    h.pump();
    let used = h.rx_used();
    assert_eq!(used.len(), 1);
    assert_eq!(split_rx(&used[0].1).1, small);
    assert_eq!(h.metrics().rx_dropped_oversized, 1);

    // With them, a frame larger than the whole ring's buffers.
    let (mut h, peer) = Harness::with_socket(BASIC | bit(VIRTIO_NET_F_MRG_RXBUF));
    h.post_rx(usize::from(QSIZE), 16);
    peer.send(&wire(hdr(0, 0), &eth(5000, 1))).unwrap();
    let tiny = eth(2, 3);
    peer.send(&wire(hdr(0, 0), &tiny)).unwrap();
    h.pump();
    let used = h.rx_used();
    assert_eq!(used.len(), 2, "{used:?}");
    let (hd, frame) = split_rx(&[used[0].1.clone(), used[1].1.clone()].concat());
    assert_eq!(num_buffers(&hd), 2);
    assert_eq!(frame, tiny);
    let m = h.metrics();
    assert_eq!(m.rx_dropped_oversized, 1);
    assert_eq!(m.rx_packets, 1);

    // From the backend: longer than the staging buffer, or shorter than a header.
    let (mut h, peer) = Harness::with_socket(BASIC);
    h.post_rx(2, 2048);
    peer.send(&vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN + 1])
        .unwrap();
    peer.send(&[0u8; 5]).unwrap();
    peer.send(&[0u8; VNET_HDR_LEN]).unwrap();
    peer.send(&wire(hdr(0, 0), &small)).unwrap();
    h.pump();
    let used = h.rx_used();
    assert_eq!(used.len(), 1);
    assert_eq!(split_rx(&used[0].1).1, small);
    let m = h.metrics();
    assert_eq!(m.rx_dropped_oversized, 1);
    assert_eq!(m.rx_dropped_malformed, 2);
}

#[test]
fn unusable_rx_buffers_are_returned_empty() {
    let (mut h, peer) = Harness::with_socket(BASIC);
    let a = h.rx.alloc(4096);
    let bad = [
        h.rx.add_chain(&h.mem, &[(a, 2048, READ)]),
        h.rx.add_chain(&h.mem, &[(a, 12, WRITE), (a + 12, 100, READ)]),
        h.rx.add_chain(&h.mem, &[(a, 8, WRITE)]),
        h.rx.add_chain(
            &h.mem,
            &[(a, 4, WRITE), (a + 4, 4, WRITE), (a + 8, 0, WRITE)],
        ),
        h.rx.add_chain(&h.mem, &[(OUTSIDE, 2048, WRITE)]),
        h.rx.add_chain(&h.mem, &[(a, 12, WRITE), (MEM_SIZE as u64 - 8, 64, WRITE)]),
    ];
    // A good one split into a header buffer and a data buffer.
    let good = h.add_rx(&[12, 2048]);
    h.notify(RX_QUEUE);
    let f = eth(700, 1);
    peer.send(&wire(hdr(0, 0), &f)).unwrap();
    h.pump();
    let used = h.rx_used();
    assert_eq!(used.len(), bad.len() + 1);
    for (i, (head, data)) in used.iter().enumerate() {
        if i < bad.len() {
            assert_eq!(*head, bad[i]);
            assert!(data.is_empty());
        } else {
            assert_eq!(*head, good);
            assert_eq!(split_rx(data).1, f);
        }
    }
    let m = h.metrics();
    assert_eq!(m.rx_bad_buffers, bad.len() as u64);
    assert_eq!(m.rx_packets, 1);
    assert!(!h.dev().needs_reset());
}

#[test]
fn rx_headers_follow_the_negotiated_offloads() {
    let (mut h, peer) = Harness::with_socket(BASIC);
    h.post_rx(8, 4096);
    let f = eth(300, 1);
    // DATA_VALID is cleared for a driver without GUEST_CSUM.
    peer.send(&wire(hdr(VIRTIO_NET_HDR_F_DATA_VALID, 0), &f))
        .unwrap();
    // A partial checksum or a GSO frame cannot be passed on.
    peer.send(&wire(hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0), &f))
        .unwrap();
    peer.send(&wire(hdr(0, VIRTIO_NET_HDR_GSO_TCPV4), &f))
        .unwrap();
    h.pump();
    let used = h.rx_used();
    assert_eq!(used.len(), 1);
    let (hd, frame) = split_rx(&used[0].1);
    assert_eq!(hd[0], 0);
    assert_eq!(frame, f);
    assert_eq!(h.metrics().rx_dropped_malformed, 2);

    // With GUEST_CSUM + GUEST_TSO4 they are.
    let features = BASIC | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4);
    let (mut h, peer) = Harness::with_socket(features);
    h.post_rx(8, 4096);
    let mut hd = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4);
    hd[4..6].copy_from_slice(&1448u16.to_le_bytes());
    peer.send(&wire(hd, &f)).unwrap();
    h.pump();
    let used = h.rx_used();
    assert_eq!(used.len(), 1);
    let (got, frame) = split_rx(&used[0].1);
    assert_eq!(got[..10], hd[..10]);
    assert_eq!(num_buffers(&got), 1);
    assert_eq!(frame, f);
}

fn ops_limiter(size: u64, refill_ms: u64) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: None,
        ops: Some(bucket(size, None, refill_ms)),
    }
}

#[test]
fn tx_rate_limiter_blocks_and_resumes_on_its_timer() {
    let mut cfg = slot("eth0");
    cfg.tx_rate_limiter = Some(ops_limiter(2, 100));
    let (mut h, peer) = Harness::with_socket_config(cfg, BASIC);
    let start = Instant::now();
    for i in 0..5 {
        h.send(&eth(100, i));
    }
    // The bucket holds two packets; the third waits for the timer and the loop is idle.
    h.pump();
    let m = h.metrics();
    assert_eq!(m.tx_packets, 2);
    assert_eq!(m.tx_throttled, 1);
    assert_eq!(h.tx_used().len(), 2);
    assert_eq!(try_recv(&peer).map(|v| v.len()), Some(12 + 114));
    // The timer resumes the queue: 2 packets per 100 ms.
    let mut got = 1;
    h.pump_until("all five packets", |_| {
        while try_recv(&peer).is_some() {
            got += 1;
        }
        got == 5
    });
    assert!(
        start.elapsed() >= Duration::from_millis(100),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(h.metrics().tx_packets, 5);
    assert!(h.metrics().tx_throttled >= 2);
    h.pump();
}

#[test]
fn rx_rate_limiter_blocks_and_resumes_on_its_timer() {
    let mut cfg = slot("eth0");
    cfg.rx_rate_limiter = Some(RateLimiterConfig {
        bandwidth: Some(bucket(1000, None, 100)),
        ops: None,
    });
    let (mut h, peer) = Harness::with_socket_config(cfg, BASIC);
    h.post_rx(8, 2048);
    let start = Instant::now();
    for i in 0..3 {
        peer.send(&wire(hdr(0, 0), &eth(900 - 14, i))).unwrap();
    }
    h.pump();
    assert_eq!(h.rx_used().len(), 1);
    assert_eq!(h.metrics().rx_throttled, 1);
    let mut got = 1;
    h.pump_until("all three frames", |h| {
        got += h.rx_used().len();
        got == 3
    });
    assert!(
        start.elapsed() >= Duration::from_millis(100),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(h.metrics().rx_packets, 3);
    h.pump();
}

#[test]
fn rate_limiters_can_be_lifted_at_run_time() {
    let mut cfg = slot("eth0");
    // One packet a minute.
    cfg.tx_rate_limiter = Some(ops_limiter(1, 60_000));
    let (mut h, peer) = Harness::with_socket_config(cfg, BASIC);
    for i in 0..3 {
        h.send(&eth(100, i));
    }
    h.pump();
    assert_eq!(h.metrics().tx_packets, 1);
    // Unchanged RX, unlimited TX.
    h.dev()
        .update_rate_limiters(None, Some(&RateLimiterConfig::default()));
    h.pump_until("the rest", |h| h.metrics().tx_packets == 3);
    let mut n = 0;
    while try_recv(&peer).is_some() {
        n += 1;
    }
    assert_eq!(n, 3);
}

#[test]
fn link_state_changes_bump_the_generation_and_interrupt() {
    let mut h = Harness::new(new_net(&slot("eth0")).unwrap(), BASIC);
    let gen = |h: &Harness| h.dev().config_generation();
    let status = |h: &Harness| {
        let mut s = [0u8; 2];
        h.dev().read_config(6, &mut s);
        u16::from_le_bytes(s)
    };
    assert_eq!(gen(&h), 0);
    assert_eq!(status(&h), 0);
    // Link up without a backend: frames are dropped, counted.
    h.dev().set_link(true);
    assert_eq!(gen(&h), 1);
    assert_eq!(status(&h), 1);
    assert_eq!(h.irqs(), 1);
    assert_eq!(h.interrupt.status(), INTERRUPT_CONFIG_CHANGE);
    h.clear_irq();
    h.dev().set_link(true);
    assert_eq!(gen(&h), 1, "no change, no bump");
    assert_eq!(h.irqs(), 0);
    h.send(&eth(50, 1));
    h.pump();
    assert_eq!(h.tx_used().len(), 1);
    assert_eq!(h.metrics().tx_dropped_no_link, 1);

    // A backend, then the link down while it stays attached.
    let (b, peer) = socket_backend();
    h.dev().attach_backend(b).unwrap();
    assert_eq!(gen(&h), 1, "already up");
    h.dev().set_link(false);
    assert_eq!(gen(&h), 2);
    assert_eq!(status(&h), 0);
    h.post_rx(2, 2048);
    peer.send(&wire(hdr(0, 0), &eth(80, 2))).unwrap();
    h.send(&eth(60, 3));
    h.pump();
    // Link down: nothing received, transmits dropped.
    assert!(h.rx_used().is_empty());
    assert_eq!(h.metrics().tx_dropped_no_link, 2);
    assert_eq!(try_recv(&peer), None);
    // Link up: the waiting frame arrives.
    h.dev().set_link(true);
    assert_eq!(gen(&h), 3);
    h.pump();
    let used = h.rx_used();
    assert_eq!(used.len(), 1);
    assert_eq!(split_rx(&used[0].1).1, eth(80, 2));
    assert_eq!(h.metrics().config_changes, 3);
}

#[test]
fn attach_and_detach_swap_the_backend() {
    let mut h = Harness::new(new_net(&slot("eth0")).unwrap(), BASIC);
    h.post_rx(8, 2048);
    let (b1, p1) = socket_backend();
    h.dev().attach_backend(b1).unwrap();
    assert!(h.dev().link_up());
    assert_eq!(h.dev().config_generation(), 1);
    h.pump();
    p1.send(&wire(hdr(0, 0), &eth(40, 1))).unwrap();
    h.send(&eth(41, 2));
    h.pump();
    assert_eq!(h.rx_used().len(), 1);
    assert_eq!(try_recv(&p1), Some(wire(hdr(0, 0), &eth(41, 2))));

    // Swap: the old backend is no longer read or written; the link stays up.
    let (b2, p2) = socket_backend();
    h.dev().attach_backend(b2).unwrap();
    assert_eq!(h.dev().config_generation(), 1);
    h.pump();
    p2.send(&wire(hdr(0, 0), &eth(43, 4))).unwrap();
    h.send(&eth(44, 5));
    h.pump();
    let used = h.rx_used();
    assert_eq!(used.len(), 1);
    assert_eq!(split_rx(&used[0].1).1, eth(43, 4));
    assert_eq!(try_recv(&p2), Some(wire(hdr(0, 0), &eth(44, 5))));
    // The old backend was dropped: its peer sees the socket closed.
    assert!(matches!(p1.send(&[0u8; 20]), Err(e) if e.kind() != io::ErrorKind::WouldBlock));

    // Detach: link down, transmits dropped, nothing read.
    h.dev().detach_tap();
    assert!(!h.dev().link_up());
    assert_eq!(h.dev().config_generation(), 2);
    assert_eq!(h.dev().tap_name(), None);
    h.pump();
    assert!(p2.send(&wire(hdr(0, 0), &eth(45, 6))).is_err());
    h.send(&eth(46, 7));
    h.pump();
    assert!(h.rx_used().is_empty());
    assert_eq!(h.metrics().tx_dropped_no_link, 1);
    // Detaching again changes nothing.
    h.dev().detach_tap();
    assert_eq!(h.dev().config_generation(), 2);
    h.pump();
}

#[test]
fn a_backend_that_goes_away_is_detached() {
    let (mut h, peer) = Harness::with_socket(BASIC);
    h.post_rx(2, 2048);
    h.pump();
    h.clear_irq();
    drop(peer);
    h.pump();
    let m = h.metrics();
    assert_eq!(m.backends_lost, 1);
    assert!(!h.dev().link_up());
    assert_eq!(h.dev().tap_name(), None);
    assert_eq!(h.interrupt.status(), INTERRUPT_CONFIG_CHANGE);
}

#[test]
fn ring_errors_need_a_reset() {
    let (mut h, _peer) = Harness::with_socket(BASIC);
    // An available index more than a queue ahead.
    h.mem
        .write_obj(QSIZE + 5, GuestAddress(h.tx.avail + 2))
        .unwrap();
    h.notify(TX_QUEUE);
    h.pump();
    assert!(h.dev().needs_reset());
    let m = h.metrics();
    assert_eq!(m.queue_errors, 1);
    assert_eq!(
        h.interrupt.status() & INTERRUPT_CONFIG_CHANGE,
        INTERRUPT_CONFIG_CHANGE
    );
    // Nothing more happens until a reset.
    h.notify(RX_QUEUE);
    h.notify(TX_QUEUE);
    h.pump();
    assert_eq!(h.metrics().queue_errors, 1);
    h.dev().reset();
    assert!(!h.dev().needs_reset());
    assert!(!h.dev().is_activated());
    h.pump();

    // An RX head beyond the queue: add_used fails.
    let (mut h, peer) = Harness::with_socket(BASIC);
    h.mem
        .write_obj(QSIZE + 3, GuestAddress(h.rx.avail + 4))
        .unwrap();
    h.mem.write_obj(1u16, GuestAddress(h.rx.avail + 2)).unwrap();
    h.notify(RX_QUEUE);
    peer.send(&wire(hdr(0, 0), &eth(40, 1))).unwrap();
    h.pump();
    assert!(h.dev().needs_reset());
    assert_eq!(h.metrics().queue_errors, 1);
}

#[test]
fn activation_checks_and_reset_drops_in_flight_state() {
    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
    );
    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let mut net = new_net(&slot("eth0")).unwrap();
    let e = net
        .activate(mem.clone(), irq.clone(), vec![Queue::new(256).unwrap()])
        .unwrap_err();
    assert_eq!(
        e,
        ActivateError::QueueCount {
            expected: 2,
            got: 1
        }
    );
    assert!(!net.is_activated());

    // A staged frame does not survive a reset.
    let (mut h, peer) = Harness::with_socket(BASIC);
    peer.send(&wire(hdr(0, 0), &eth(40, 1))).unwrap();
    h.pump();
    assert_eq!(h.metrics().rx_no_buffer, 1);
    h.dev().reset();
    h.pump();
    let (rx, rxq) = Ring::new(&h.mem, RX_RING, RX_BUFS, false);
    let (tx, txq) = Ring::new(&h.mem, TX_RING, TX_BUFS, false);
    h.rx = rx;
    h.tx = tx;
    h.dev().set_acked_features(BASIC);
    h.dev()
        .activate(
            GuestMemoryAtomic::new(h.mem.clone()),
            h.interrupt.clone(),
            vec![rxq, txq],
        )
        .unwrap();
    h.pump();
    h.post_rx(2, 2048);
    peer.send(&wire(hdr(0, 0), &eth(41, 2))).unwrap();
    h.pump();
    let used = h.rx_used();
    assert_eq!(used.len(), 1);
    assert_eq!(split_rx(&used[0].1).1, eth(41, 2));
}

#[test]
fn event_idx_suppresses_interrupts() {
    let (mut h, peer) = Harness::with_socket(BASIC | VIRTIO_RING_F_EVENT_IDX);
    // The driver wants an interrupt after the 3rd used TX entry only.
    h.tx.set_used_event(&h.mem, 2);
    h.rx.set_used_event(&h.mem, 100);
    h.send(&eth(10, 1));
    h.pump();
    assert_eq!(h.irqs(), 0);
    h.send(&eth(10, 2));
    h.send(&eth(10, 3));
    h.pump();
    assert_eq!(h.irqs(), 1);
    assert_eq!(h.tx_used().len(), 3);
    while try_recv(&peer).is_some() {}
    // RX with used_event far ahead: no interrupt.
    h.post_rx(2, 2048);
    peer.send(&wire(hdr(0, 0), &eth(40, 1))).unwrap();
    h.pump();
    assert_eq!(h.rx_used().len(), 1);
    assert_eq!(h.irqs(), 0);
}

#[test]
fn through_the_mmio_transport() {
    let (b, peer) = socket_backend();
    let mut net = new_net(&slot("eth0")).unwrap();
    net.attach_backend(b).unwrap();
    let net = Arc::new(Mutex::new(net));
    let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mem = GuestMemoryAtomic::new(gm.clone());
    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let mut transport = MmioTransport::new(net.clone(), irq.clone(), mem);
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(net.clone());
    let (mut rx, _) = Ring::new(&gm, RX_RING, RX_BUFS, false);
    let (mut tx, _) = Ring::new(&gm, TX_RING, TX_BUFS, false);

    let mut w = |off: u64, v: u32| transport.write(off, &v.to_le_bytes());
    w(0x70, status::ACKNOWLEDGE | status::DRIVER);
    w(0x24, 0);
    w(
        0x20,
        u32::try_from((BASIC | bit(VIRTIO_NET_F_MRG_RXBUF)) & 0xffff_ffff).unwrap(),
    );
    w(0x24, 1);
    w(0x20, 1); // VERSION_1
    w(
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    for (q, r) in [(0u32, &rx), (1, &tx)] {
        w(0x30, q);
        w(0x38, u32::from(QSIZE));
        w(0x80, u32::try_from(r.desc).unwrap());
        w(0x90, u32::try_from(r.avail).unwrap());
        w(0xa0, u32::try_from(r.used).unwrap());
        w(0x44, 1);
    }
    w(
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(net.lock().unwrap().is_activated());
    assert_eq!(
        net.lock().unwrap().acked_features(),
        BASIC | bit(VIRTIO_NET_F_MRG_RXBUF)
    );
    em.run_with_timeout(100).unwrap();
    // A frame each way, notified through QueueNotify.
    let a = rx.alloc(2048);
    rx.add_chain(&gm, &[(a, 2048, WRITE)]);
    w(0x50, 0);
    let f = wire(hdr(0, 0), &eth(64, 1));
    let b = tx.alloc(256);
    gm.write_slice(&f, GuestAddress(b)).unwrap();
    tx.add_chain(&gm, &[(b, u32::try_from(f.len()).unwrap(), READ)]);
    w(0x50, 1);
    peer.send(&wire(hdr(0, 0), &eth(65, 2))).unwrap();
    let end = Instant::now() + WAIT;
    while rx.take_used(&gm).is_empty() {
        em.run_with_timeout(5).unwrap();
        assert!(Instant::now() < end);
    }
    assert_eq!(try_recv(&peer), Some(f));
    assert_eq!(tx.take_used(&gm).len(), 1);
    assert_ne!(irq.status() & INTERRUPT_USED_RING, 0);
    // Link changes show in ConfigGeneration and the config space.
    let r = |t: &mut MmioTransport, off: u64| {
        let mut v = [0u8; 4];
        t.read(off, &mut v);
        u32::from_le_bytes(v)
    };
    let gen0 = r(&mut transport, 0xfc);
    // mac[4], mac[5], status.
    assert_eq!(r(&mut transport, 0x104) >> 16, VIRTIO_NET_S_LINK_UP);
    net.lock().unwrap().set_link(false);
    assert_eq!(r(&mut transport, 0xfc), gen0.wrapping_add(1));
    assert_eq!(r(&mut transport, 0x104) >> 16, 0);
    assert_ne!(irq.status() & INTERRUPT_CONFIG_CHANGE, 0);
    em.run_with_timeout(10).unwrap();
}

/// Real TAP tests: the device's backend is a TAP in a private network namespace, the "wire"
/// an AF_PACKET socket on it.
mod real_tap {
    use super::*;

    fn tap_frame(payload: &str) -> Vec<u8> {
        let mut f = eth(0, 0);
        f.extend_from_slice(payload.as_bytes());
        f
    }

    /// Frames of interest carry EtherType 0x88b5.
    fn ours(f: &[u8]) -> bool {
        f.len() > 14 && f[12..14] == [0x88, 0xb5]
    }

    /// Guest -> wire and wire -> guest through the device.
    fn both_ways(h: &mut Harness, name: &str, tag: &str) {
        test_util::up(name);
        let sock = PacketSocket::bind(name);
        let out = tap_frame(&format!("guest to host {tag}"));
        h.send(&out);
        let got = sock.recv_matching(|f| f == &out[..], || h.pump());
        assert_eq!(got, out);
        h.post_rx(4, 2048);
        let inb = tap_frame(&format!("host to guest {tag}"));
        sock.send(&inb);
        let mut frames = Vec::new();
        h.pump_until("the frame in the guest", |h| {
            frames.extend(h.rx_used());
            frames.iter().any(|(_, d)| split_rx(d).1 == inb)
        });
        for (_, d) in &frames {
            let (hd, f) = split_rx(d);
            assert_eq!(num_buffers(&hd), 1);
            assert!(!ours(&f) || f == inb);
        }
    }

    #[test]
    fn hot_attach_and_detach_a_real_tap() {
        if !test_util::tun_available("hot_attach_and_detach_a_real_tap") {
            return;
        }
        test_util::private_netns();
        let mut h = Harness::new(new_net(&slot("eth0")).unwrap(), BASIC);
        let name = test_util::tap_name();
        // Missing and not to be created: refused, nothing changes.
        let e = h.dev().attach_tap(&name, false).unwrap_err();
        assert!(matches!(e, NetError::Tap(TapError::NotFound(_))), "{e}");
        assert!(!h.dev().link_up());
        assert_eq!(h.dev().config_generation(), 0);
        // Created on attach: link up, generation bumped, config interrupt.
        h.dev().attach_tap(&name, true).unwrap();
        assert!(test_util::exists(&name));
        assert_eq!(h.dev().tap_name(), Some(name.as_str()));
        assert!(h.dev().link_up());
        assert_eq!(h.dev().config_generation(), 1);
        assert_eq!(h.interrupt.status(), INTERRUPT_CONFIG_CHANGE);
        h.pump();
        both_ways(&mut h, &name, "1");
        // Detach: the loop drops the TAP, and a TAP we created goes away with it.
        h.dev().detach_tap();
        assert!(!h.dev().link_up());
        assert_eq!(h.dev().config_generation(), 2);
        h.pump();
        assert!(test_util::gone(&name), "{name} still exists");
        h.send(&tap_frame("dropped"));
        h.pump();
        assert_eq!(h.metrics().tx_dropped_no_link, 1);
        // And again.
        h.dev().attach_tap(&name, true).unwrap();
        h.pump();
        both_ways(&mut h, &name, "2");
        // Attaching it again is a no-op.
        h.dev().attach_tap(&name, false).unwrap();
        assert_eq!(h.dev().config_generation(), 3);
        // Detach and re-attach before the loop released it: the same TAP comes back.
        h.dev().detach_tap();
        h.dev().attach_tap(&name, false).unwrap();
        assert_eq!(h.dev().tap_name(), Some(name.as_str()));
        assert_eq!(h.dev().config_generation(), 5);
        h.pump();
        both_ways(&mut h, &name, "3");
        assert_eq!(h.metrics().tap_write_errors, 0);
    }

    #[test]
    fn an_existing_tap_from_the_config() {
        if !test_util::tun_available("an_existing_tap_from_the_config") {
            return;
        }
        test_util::private_netns();
        let name = test_util::tap_name();
        test_util::ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        let mut cfg = slot("eth0");
        cfg.host_dev_name = Some(name.clone());
        let net = new_net(&cfg).unwrap();
        assert!(net.link_up());
        let features = BASIC
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_MRG_RXBUF);
        let mut h = Harness::new(net, features);
        both_ways(&mut h, &name, "existing");
        drop(h);
        // Not ours: it stays.
        assert!(test_util::exists(&name));
        test_util::ip(&["link", "del", "dev", &name]);
    }

    #[test]
    fn a_deleted_tap_is_detached_without_spinning() {
        if !test_util::tun_available("a_deleted_tap_is_detached_without_spinning") {
            return;
        }
        test_util::private_netns();
        let name = test_util::tap_name();
        let mut cfg = slot("eth0");
        cfg.host_dev_name = Some(name.clone());
        cfg.create_tap = true;
        let mut h = Harness::new(new_net(&cfg).unwrap(), BASIC);
        test_util::up(&name);
        h.post_rx(4, 2048);
        h.pump();
        test_util::ip(&["link", "del", "dev", &name]);
        h.pump_until("the backend to be detached", |h| {
            h.metrics().backends_lost == 1
        });
        assert!(!h.dev().link_up());
        h.pump();
        h.send(&tap_frame("nowhere"));
        h.pump();
        assert_eq!(h.metrics().tx_dropped_no_link, 1);
    }

    /// CPU time of the calling thread.
    fn thread_cpu() -> Duration {
        // SAFETY: clock_gettime writes one timespec into `t`.
        let mut t: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the clock id is valid.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        Duration::new(
            u64::try_from(t.tv_sec).unwrap(),
            u32::try_from(t.tv_nsec).unwrap(),
        )
    }

    /// The device's own CPU per frame on a real TAP, without a guest: only the event-loop work
    /// (`pump`) is timed — ioeventfd read, ring walk, TAP readv/writev, used ring, interrupt
    /// eventfd. `cargo test -p kestrel-devices --release measure_frame_cost -- --ignored
    /// --nocapture` (root).
    #[test]
    #[ignore]
    fn measure_frame_cost() {
        if !test_util::tun_available("measure_frame_cost") {
            return;
        }
        test_util::private_netns();
        let name = test_util::tap_name();
        let mut h = Harness::new(new_net(&slot("eth0")).unwrap(), BASIC);
        h.dev().attach_tap(&name, true).unwrap();
        h.pump();
        test_util::ip(&["link", "set", &name, "mtu", "65520"]);
        test_util::up(&name);
        let sock = PacketSocket::bind(&name);
        const N: u32 = 2000;
        for len in [60usize, 1514, 65_000] {
            // TX: guest -> TAP.
            let frame = tap_frame(&"x".repeat(len - 14));
            let mut busy = Duration::ZERO;
            for _ in 0..N {
                h.send(&frame);
                let t = thread_cpu();
                h.pump();
                busy += thread_cpu() - t;
                h.tx_used();
                let _ = h.irqs();
            }
            let tx = busy / N;
            // RX: TAP -> guest, one posted buffer per frame.
            let mut busy = Duration::ZERO;
            let mut got = 0u32;
            for _ in 0..N {
                h.post_rx(1, u32::try_from(len + 64).unwrap());
                sock.send(&frame);
                let t = thread_cpu();
                h.pump();
                busy += thread_cpu() - t;
                got += u32::try_from(h.rx_used().len()).unwrap();
                let _ = h.irqs();
            }
            // Frames the host stack sent on its own (IPv6 router solicitations) also count.
            assert!(got >= N, "{got} frames reached the guest");
            eprintln!(
                "{len:>6}-byte frame: TX {:>6.2} µs, RX {:>6.2} µs of event-loop CPU",
                tx.as_secs_f64() * 1e6,
                (busy / got).as_secs_f64() * 1e6
            );
        }
    }
}

/// A backend that always has a frame to read and takes every frame written (its descriptor,
/// an `EventFd` with a count, is always readable).
struct EndlessBackend(EventFd);

impl AsRawFd for EndlessBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for EndlessBackend {
    fn name(&self) -> &str {
        "endless"
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let f = wire(hdr(0, 0), &eth(50, 1));
        buf[..f.len()].copy_from_slice(&f);
        Ok(f.len())
    }

    fn write_frame(&mut self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        Ok(bufs.iter().map(|s| s.len()).sum())
    }
}

#[test]
fn tx_queue_kept_full_is_served_in_bounded_passes() {
    // No backend: frames are dropped, which is the cheapest way through the queue.
    let mut h = Harness::new(new_net(&slot("eth0")).unwrap(), BASIC);
    for i in 0..100 {
        h.send(&eth(50, i));
    }
    let (dev, mem, kick) = (&h.dev, &h.mem, &h.evts[TX_QUEUE]);
    assert_pass_bounded(tx::TX_BATCH, || {
        while kick.read().is_ok() {}
        let used = with_refilling_guest(mem, TX_RING, QSIZE, 20 * tx::TX_BATCH, || {
            dev.lock().unwrap().process_tx()
        });
        (used, kick.read().is_ok())
    });
}

#[test]
fn rx_from_an_endless_backend_is_served_in_bounded_passes() {
    let mut net = new_net(&slot("eth0")).unwrap();
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    evt.write(1).unwrap();
    net.attach_backend(Box::new(EndlessBackend(evt))).unwrap();
    let mut h = Harness::new(net, BASIC);
    for _ in 0..100 {
        h.add_rx(&[2048]);
    }
    let (dev, mem) = (&h.dev, &h.mem);
    assert_pass_bounded(rx::RX_BATCH, || {
        let used = with_refilling_guest(mem, RX_RING, QSIZE, 20 * rx::RX_BATCH, || {
            dev.lock().unwrap().process_rx()
        });
        // The loop comes back for the rest: the backend stays readable and watched
        // (level-triggered), no re-arm needed.
        let watched = {
            let d = dev.lock().unwrap();
            d.device.backend_interest(&d.core).contains(EventSet::IN)
        };
        (used, watched)
    });
}

/// A running device saved and rebuilt from its state keeps the driver's features and link,
/// and transmits the next frame from the restored TX queue where the old device stopped.
#[test]
fn saved_state_restores_a_running_device() {
    let features = BASIC | bit(VIRTIO_NET_F_GUEST_CSUM);
    let (mut h, peer) = Harness::with_socket(features);
    h.send(&eth(60, 1));
    h.pump();
    assert_eq!(h.tx_used().len(), 1);
    assert!(try_recv(&peer).is_some());
    let state = h.dev().state();
    assert!(state.link_up && state.virtio.activated);
    assert_eq!(state.offloads, offload::CSUM);
    assert_eq!(state.virtio.queues[TX_QUEUE].next_avail, 1);
    assert_eq!(state.mac, kestrel_api::derived_mac("eth0"));
    let state: NetState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    let cfg = NetConfig::try_from(&slot("eth0")).unwrap();
    assert!(matches!(
        Net::restore(&NetConfig::slot("eth1"), &state),
        Err(NetError::Restore(_))
    ));

    // Restored into a slot without TAP: the link stays down until one is attached.
    let mut net = Net::restore(&cfg, &state).unwrap();
    assert_eq!(net.acked_features(), features);
    assert!(!net.link_up());
    let (backend, peer) = socket_backend();
    net.attach_backend(backend).unwrap();
    let (dev, mut em, kicks) = on_event_loop(net);
    let gm = GuestMemoryAtomic::new(h.mem.clone());
    dev.lock()
        .unwrap()
        .activate_restored(gm, h.interrupt.clone())
        .unwrap();
    assert_eq!(
        dev.lock().unwrap().state().virtio.queues,
        state.virtio.queues
    );
    pump(&mut em);
    // The next frame, on the old rings, without waking the old device.
    let frame = wire(hdr(0, 0), &eth(60, 2));
    let a = h.tx.alloc(u32::try_from(frame.len()).unwrap());
    h.mem.write_slice(&frame, GuestAddress(a)).unwrap();
    let head =
        h.tx.add_chain(&h.mem, &[(a, u32::try_from(frame.len()).unwrap(), READ)]);
    kicks[TX_QUEUE].write(1).unwrap();
    pump(&mut em);
    assert_eq!(h.tx_used(), [(head, 0)]);
    assert_eq!(try_recv(&peer), Some(frame));
}
