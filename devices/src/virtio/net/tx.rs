//! The transmit queue: guest frames to the backend.
//!
//! A TX chain is driver-readable descriptors only: the 12-byte virtio-net header followed by
//! the Ethernet frame, split any way the driver likes. It is sent with one gathered write
//! straight from guest memory. What the device refuses (and completes with used length 0):
//! a writable descriptor, a chain shorter than the header or with an empty frame, a frame
//! longer than [`MAX_FRAME_LEN`], buffers outside guest memory, a header asking for an offload
//! the driver did not negotiate.
//!
//! When the backend is full (`EAGAIN`) the chain goes back to the ring and the device waits for
//! the backend to become writable; when the rate limiter refuses, it goes back too and the
//! device waits for the limiter's timer. Nothing spins and nothing is dropped for either.

use std::io;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, VolatileSlice};

use super::{NetBackend, NetMetrics, MAX_CHAIN_DESCS, MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::rate_limiter::{RateLimiter, TokenType};
use crate::tap::MAX_IOVECS;

/// Most chains handled per event before the loop gets a turn for other devices.
pub(super) const TX_BATCH: usize = 256;

/// Why a TX chain was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TxDrop {
    /// A device-writable descriptor.
    WrongDirection,
    /// Shorter than the virtio-net header.
    NoHeader,
    /// A header and no frame.
    Empty,
    /// Longer than header + [`MAX_FRAME_LEN`].
    Oversized,
    /// Buffers outside guest memory, or too many pieces.
    BadBuffer,
    /// The header asks for an offload that was not negotiated.
    BadHeader,
}

impl TxDrop {
    fn count(self, m: &mut NetMetrics) {
        match self {
            TxDrop::WrongDirection => m.tx_dropped_wrong_direction += 1,
            TxDrop::NoHeader => m.tx_dropped_no_header += 1,
            TxDrop::Empty => m.tx_dropped_empty += 1,
            TxDrop::Oversized => m.tx_dropped_oversized += 1,
            TxDrop::BadBuffer => m.tx_dropped_bad_buffer += 1,
            TxDrop::BadHeader => m.tx_dropped_bad_header += 1,
        }
    }
}

/// A TX chain that passed the structural checks: its buffers and total length (header
/// included).
#[derive(Debug)]
pub(super) struct TxFrame {
    pub segments: Vec<(GuestAddress, usize)>,
    pub len: usize,
}

/// Walk a TX chain: readable descriptors only, total length within bounds.
pub(super) fn parse<M>(chain: DescriptorChain<M>) -> Result<TxFrame, TxDrop>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut segments = Vec::new();
    let mut len = 0usize;
    for (i, desc) in chain.enumerate() {
        if i >= MAX_CHAIN_DESCS {
            return Err(TxDrop::BadBuffer);
        }
        if desc.is_write_only() {
            return Err(TxDrop::WrongDirection);
        }
        let n = desc.len() as usize;
        len = len.saturating_add(n);
        if len > VNET_HDR_LEN + MAX_FRAME_LEN {
            return Err(TxDrop::Oversized);
        }
        if n > 0 {
            segments.push((desc.addr(), n));
        }
    }
    match len {
        l if l < VNET_HDR_LEN => Err(TxDrop::NoHeader),
        VNET_HDR_LEN => Err(TxDrop::Empty),
        _ => Ok(TxFrame { segments, len }),
    }
}

/// The frame's guest memory as slices for one gathered write.
pub(super) fn slices<'m>(
    mem: &'m GuestMemoryMmap,
    frame: &TxFrame,
) -> Result<Vec<VolatileSlice<'m>>, TxDrop> {
    let mut out = Vec::with_capacity(frame.segments.len());
    for &(addr, len) in &frame.segments {
        for s in mem.get_slices(addr, len) {
            out.push(s.map_err(|_| TxDrop::BadBuffer)?);
            if out.len() > MAX_IOVECS {
                return Err(TxDrop::BadBuffer);
            }
        }
    }
    Ok(out)
}

/// Check the header (the first [`VNET_HDR_LEN`] bytes of `slices`) against the negotiated
/// host-side offloads.
pub(super) fn check_header(slices: &[VolatileSlice<'_>], acked: u64) -> Result<(), TxDrop> {
    let mut hdr = [0u8; VNET_HDR_LEN];
    let mut got = 0;
    for s in slices {
        if got == hdr.len() {
            break;
        }
        got += s.copy_to(&mut hdr[got..]);
    }
    if got < hdr.len() {
        return Err(TxDrop::NoHeader);
    }
    let has = |bit: u32| acked & (1 << bit) != 0;
    let flags = u32::from(hdr[0]);
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !has(VIRTIO_NET_F_CSUM) {
        return Err(TxDrop::BadHeader);
    }
    let gso = u32::from(hdr[1]);
    if gso & VIRTIO_NET_HDR_GSO_ECN != 0 && !has(VIRTIO_NET_F_HOST_ECN) {
        return Err(TxDrop::BadHeader);
    }
    let ok = match gso & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => gso == VIRTIO_NET_HDR_GSO_NONE,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6),
        // UDP fragmentation and USO are not offered.
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(TxDrop::BadHeader)
    }
}

/// Why the TX queue stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TxStop {
    /// The ring is empty (notifications are on again).
    Idle,
    /// The rate limiter refused: wait for its timer.
    Throttled,
    /// The backend is full: wait until it is writable.
    BackendFull,
    /// Handled [`TX_BATCH`] chains: come back through the event loop.
    BatchLimit,
}

/// What one TX run did.
#[derive(Debug)]
pub(super) struct TxRun {
    /// Chains were added to the used ring.
    pub used: bool,
    pub stop: TxStop,
}

/// Everything the TX path works with.
pub(super) struct Tx<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub queue: &'a mut Queue,
    /// `None`: no backend or the link is down; frames are dropped.
    pub backend: Option<&'a mut (dyn NetBackend + 'static)>,
    pub limiter: &'a mut RateLimiter,
    pub acked: u64,
    pub metrics: &'a mut NetMetrics,
}

impl Tx<'_> {
    /// Send what the ring holds. `Err` is a ring error (the device needs a reset).
    pub fn run(&mut self) -> Result<TxRun, String> {
        let mut used = false;
        if self.limiter.is_blocked() {
            return Ok(TxRun {
                used,
                stop: TxStop::Throttled,
            });
        }
        let mut handled = 0usize;
        loop {
            self.queue
                .disable_notification(self.mem)
                .map_err(|e| format!("cannot disable notifications: {e}"))?;
            loop {
                if handled == TX_BATCH {
                    return Ok(TxRun {
                        used,
                        stop: TxStop::BatchLimit,
                    });
                }
                let chain = match self.queue.iter(self.mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => return Err(format!("available ring: {e}")),
                };
                let Some(chain) = chain else {
                    break;
                };
                handled += 1;
                let head = chain.head_index();
                match self.send(chain) {
                    Ok(()) => {}
                    Err(stop) => {
                        self.queue.go_to_previous_position();
                        return Ok(TxRun { used, stop });
                    }
                }
                self.queue
                    .add_used(self.mem, head, 0)
                    .map_err(|e| format!("used ring (head {head}): {e}"))?;
                used = true;
            }
            match self.queue.enable_notification(self.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => return Err(format!("cannot enable notifications: {e}")),
            }
        }
        Ok(TxRun {
            used,
            stop: TxStop::Idle,
        })
    }

    /// Send (or drop) one chain. `Err` means: put the chain back and stop.
    fn send(&mut self, chain: DescriptorChain<&GuestMemoryMmap>) -> Result<(), TxStop> {
        let head = chain.head_index();
        let frame = match parse(chain) {
            Ok(f) => f,
            Err(why) => {
                tracing::debug!("virtio-net: tx chain {head} dropped: {why:?}");
                why.count(self.metrics);
                return Ok(());
            }
        };
        let Some(backend) = self.backend.as_deref_mut() else {
            self.metrics.tx_dropped_no_link += 1;
            return Ok(());
        };
        let slices = match slices(self.mem, &frame).and_then(|s| {
            check_header(&s, self.acked)?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(why) => {
                tracing::debug!("virtio-net: tx chain {head} dropped: {why:?}");
                why.count(self.metrics);
                return Ok(());
            }
        };
        let bytes = (frame.len - VNET_HDR_LEN) as u64;
        if !self.limiter.consume(bytes) {
            self.metrics.tx_throttled += 1;
            return Err(TxStop::Throttled);
        }
        match backend.write_frame(&slices) {
            Ok(_) => {
                self.metrics.tx_packets += 1;
                self.metrics.tx_bytes += bytes;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Not sent: give the tokens back and retry when the backend has room.
                self.limiter.manual_replenish(bytes, TokenType::Bytes);
                self.limiter.manual_replenish(1, TokenType::Ops);
                self.metrics.tx_backend_full += 1;
                Err(TxStop::BackendFull)
            }
            Err(e) => {
                tracing::debug!("virtio-net: backend write failed: {e}");
                self.metrics.tap_write_errors += 1;
                Ok(())
            }
        }
    }
}
