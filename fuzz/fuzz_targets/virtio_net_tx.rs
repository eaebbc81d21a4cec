//! virtio-net transmit (and receive) processing on guest-controlled rings.
//!
//! The input is laid out in guest memory as one split virtqueue plus its buffers:
//!
//! | input bytes          | guest memory                                                     |
//! |----------------------|------------------------------------------------------------------|
//! | `[0]`                | control: queue size `1 << (b & 7 + 1)` (2..=256), bit 3 event    |
//! |                      | idx, bit 4 host offloads acked (CSUM, HOST_TSO4/6, HOST_ECN),    |
//! |                      | bit 5 a backend that is sometimes full (`EAGAIN`) or failing     |
//! |                      | (`EIO`), bit 6 no backend (link down), bit 7 run the rx path too |
//! | `[1]`                | rx control: bit 0 MRG_RXBUF, bit 1 guest offloads acked, bits    |
//! |                      | 2-7 the rx frame's length (`14 + 97 * (b >> 2)`)                 |
//! | next `16 * size`     | descriptor table at `DESC`, verbatim                             |
//! | next `6 + 2 * size`  | available ring at `AVAIL`, verbatim (flags, idx, ring, event)    |
//! | the rest             | buffers at `BUF` (headers, frames)                               |
//!
//! Guest memory is 128 KiB at 0 plus 2 MiB at `HIGH` (a hole between), holding a copy of the
//! buffers, so descriptors may point into either region, into the hole, across a region's end,
//! or at the rings (the RX and TX queues also share their descriptor table and avail ring).
//!
//! The TX queue uses that ring; with bit 7 the RX queue uses the same descriptor table and
//! available ring (with its own used ring), so the same chains are also parsed as receive
//! buffers, and the backend offers one frame (a header from the buffers' first bytes, then
//! payload) to receive. The backend is an in-memory sink behind an `EventFd`. The device runs in
//! a real event manager, as in the VMM, plus direct `process_tx`/`process_rx` calls. Nothing is
//! asserted beyond "no panic"; the sanitizer catches accesses outside guest memory.

#![no_main]

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use kestrel_api::NetConfig;
use kestrel_devices::virtio::net::{Net, NetBackend};
use kestrel_devices::virtio::{VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use kestrel_fuzz::{
    guest_memory, interrupt, queue, queue_size, run_until_idle, split_ring, write_parts,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestMemoryAtomic, VolatileSlice};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x2_0000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const TX_USED: u64 = 0x2000;
const RX_USED: u64 = 0x3000;
const BUF: u64 = 0x4000;
const HIGH: u64 = 0x10_0000;
const HIGH_SIZE: usize = 0x20_0000;

/// CSUM (0), HOST_TSO4 (11), HOST_TSO6 (12), HOST_ECN (13).
const HOST_OFFLOADS: u64 = 1 | (1 << 11) | (1 << 12) | (1 << 13);
/// GUEST_CSUM (1), GUEST_TSO4 (7), GUEST_TSO6 (8), GUEST_ECN (9).
const GUEST_OFFLOADS: u64 = (1 << 1) | (1 << 7) | (1 << 8) | (1 << 9);
/// MRG_RXBUF (15).
const MRG_RXBUF: u64 = 1 << 15;

/// A backend that takes every frame (reading it from guest memory) and offers at most one.
struct Sink {
    evt: EventFd,
    writes: u32,
    flaky: bool,
    rx: Option<Vec<u8>>,
    scratch: Vec<u8>,
}

impl AsRawFd for Sink {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl NetBackend for Sink {
    fn name(&self) -> &str {
        "fuzz-sink"
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.rx.take() {
            Some(f) => {
                let _ = self.evt.read();
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_frame(&mut self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        self.writes += 1;
        if self.flaky {
            match self.writes % 4 {
                1 => return Err(io::ErrorKind::WouldBlock.into()),
                3 => return Err(io::Error::from_raw_os_error(libc::EIO)),
                _ => {}
            }
        }
        let mut n = 0;
        for s in bufs {
            self.scratch.resize(s.len(), 0);
            n += s.copy_to(&mut self.scratch[..]);
        }
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    let [control, rx_control, rest @ ..] = data else {
        return;
    };
    let (control, rx_control) = (*control, *rx_control);
    let size = queue_size(control);
    let event_idx = control & 0x08 != 0;
    let host_offloads = control & 0x10 != 0;
    let flaky = control & 0x20 != 0;
    let no_backend = control & 0x40 != 0;
    let run_rx = control & 0x80 != 0;

    let mem = guest_memory(&[(0, MEM_SIZE), (HIGH, HIGH_SIZE)]);
    let (desc, avail, bufs) = split_ring(rest, size);
    let bufs = &bufs[..bufs.len().min(MEM_SIZE - BUF as usize)];
    write_parts(
        &mem,
        &[(desc, DESC), (avail, AVAIL), (bufs, BUF), (bufs, HIGH)],
    );

    let config = NetConfig {
        iface_id: "fuzz".into(),
        ..NetConfig::default()
    };
    let mut net = Net::new(&(&config).try_into().unwrap()).unwrap();
    let mut features = net.avail_features() & !(HOST_OFFLOADS | GUEST_OFFLOADS | MRG_RXBUF);
    if !event_idx {
        features &= !VIRTIO_RING_F_EVENT_IDX;
    }
    if host_offloads {
        features |= HOST_OFFLOADS;
    }
    if rx_control & 1 != 0 {
        features |= MRG_RXBUF;
    }
    if rx_control & 2 != 0 {
        features |= GUEST_OFFLOADS;
    }
    net.set_acked_features(features);
    if !no_backend {
        let rx = run_rx.then(|| {
            // A header from the first buffer bytes (offload flags and GSO types the driver may
            // not have negotiated included), then a payload.
            let len = 12 + 14 + 97 * usize::from(rx_control >> 2);
            let mut f: Vec<u8> = bufs.iter().copied().take(12).collect();
            f.resize(len, 0x5a);
            f
        });
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        if rx.is_some() {
            evt.write(1).unwrap();
        }
        let sink = Sink {
            evt,
            writes: 0,
            flaky,
            rx,
            scratch: Vec::new(),
        };
        net.attach_backend(Box::new(sink)).unwrap();
    }

    let queues = vec![
        queue(size, DESC, AVAIL, RX_USED, event_idx),
        queue(size, DESC, AVAIL, TX_USED, event_idx),
    ];
    let net = Arc::new(Mutex::new(net));
    let mut em = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    em.add_subscriber(net.clone());
    net.lock()
        .unwrap()
        .activate(GuestMemoryAtomic::new(mem), interrupt(), queues)
        .unwrap();
    // Activation wakes the loop; a flaky backend keeps it busy for a few rounds.
    run_until_idle(&mut em, 4);
    {
        let mut n = net.lock().unwrap();
        // A second notification on the same ring must be just as safe.
        n.process_tx();
        if run_rx {
            n.process_rx();
        }
        let _ = n.metrics();
    }
    run_until_idle(&mut em, 4);
});
