//! The receive queue: backend frames to the guest.
//!
//! Frames are read from the backend one at a time into a staging buffer that holds exactly one
//! frame (header + [`MAX_FRAME_LEN`]), then copied into guest RX buffers. Without
//! `VIRTIO_NET_F_MRG_RXBUF` a frame must fit one chain; with it, it may span several chains and
//! the header's `num_buffers` says how many.
//!
//! Guest buffers taken from the ring wait in a small reserve until a frame fills them, so a
//! frame that needs more buffers than the ring holds right now keeps the ones it has and waits
//! for the rest (the device asks for a notification). While a frame is staged nothing more is
//! read from the backend: the event loop stops watching it for input, and the backend's own
//! queue holds (and eventually drops) what arrives meanwhile. The host never buffers more than
//! one frame per device.
//!
//! Frames the device drops: shorter than the header, with an empty payload, longer than the
//! staging buffer, with offloads (partial checksum, GSO) the driver did not negotiate, or that
//! can never fit the guest's buffers (larger than a single chain without mergeable buffers, or
//! than all the ring's buffers together with them). Unusable guest buffers (device-readable
//! descriptors, smaller than the header, outside guest memory) are returned with length 0.

use std::collections::VecDeque;
use std::io;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::{NetBackend, NetMetrics, MAX_CHAIN_DESCS, MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::rate_limiter::RateLimiter;
use crate::virtio::len_u32;

/// Size of the staging buffer: one frame, plus one byte to recognise a frame that was longer.
pub(super) const STAGING_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN + 1;
/// Most frames delivered per event before the loop gets a turn for other devices.
pub(super) const RX_BATCH: usize = 256;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// A guest RX buffer taken from the ring.
#[derive(Debug)]
struct RxChain {
    head: u16,
    descs: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

impl RxChain {
    /// A usable RX chain: device-writable descriptors in guest memory, room for at least a
    /// header. `Err` is a chain to return unused.
    fn parse<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> Result<RxChain, ()>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let mut descs = Vec::new();
        let mut capacity = 0usize;
        for (i, d) in chain.enumerate() {
            if i >= MAX_CHAIN_DESCS || !d.is_write_only() {
                return Err(());
            }
            let len = d.len() as usize;
            if len == 0 {
                continue;
            }
            if !mem.check_range(d.addr(), len) {
                return Err(());
            }
            capacity += len;
            descs.push((d.addr(), len));
        }
        if capacity < VNET_HDR_LEN {
            return Err(());
        }
        Ok(RxChain {
            head,
            descs,
            capacity,
        })
    }
}

/// The staged frame and the reserved guest buffers.
pub(super) struct RxState {
    frame: Box<[u8]>,
    /// Length of the staged frame (header included); 0 when none is staged.
    len: usize,
    reserve: VecDeque<RxChain>,
    /// The queue's notifications are enabled (the device waits for buffers).
    notify_enabled: bool,
    /// The staged frame is waiting for guest buffers (counted once per wait).
    stalled: bool,
}

impl RxState {
    pub fn new() -> Self {
        RxState {
            frame: vec![0u8; STAGING_LEN].into_boxed_slice(),
            len: 0,
            reserve: VecDeque::new(),
            notify_enabled: true,
            stalled: false,
        }
    }

    /// Whether a frame is staged.
    pub fn has_frame(&self) -> bool {
        self.len != 0
    }

    /// Drop the staged frame and the reserved buffers (device reset).
    pub fn clear(&mut self) {
        self.len = 0;
        self.reserve.clear();
        self.notify_enabled = true;
        self.stalled = false;
    }

    /// Take a frame of `n` bytes just read into the staging buffer: check and adjust its
    /// header for what the driver negotiated. Returns whether it is kept.
    fn accept(&mut self, n: usize, acked: u64, metrics: &mut NetMetrics) -> bool {
        if n >= STAGING_LEN {
            metrics.rx_dropped_oversized += 1;
            return false;
        }
        if n <= VNET_HDR_LEN {
            metrics.rx_dropped_malformed += 1;
            return false;
        }
        let has = |bit: u32| acked & (1 << bit) != 0;
        let hdr = &mut self.frame[..VNET_HDR_LEN];
        if !has(VIRTIO_NET_F_GUEST_CSUM) {
            // The driver takes no checksum hints (virtio 1.2 §5.1.6.4.1: flags must be 0); a
            // partial checksum cannot be passed on at all.
            if u32::from(hdr[0]) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
                metrics.rx_dropped_malformed += 1;
                return false;
            }
            hdr[0] = 0;
        }
        let gso = u32::from(hdr[1]);
        let gso_ok = match gso & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => gso == VIRTIO_NET_HDR_GSO_NONE,
            VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_GUEST_TSO4),
            VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_GUEST_TSO6),
            _ => false,
        } && (gso & VIRTIO_NET_HDR_GSO_ECN == 0 || has(VIRTIO_NET_F_GUEST_ECN));
        if !gso_ok {
            metrics.rx_dropped_malformed += 1;
            return false;
        }
        self.len = n;
        true
    }
}

/// What happened to the staged frame.
enum Delivery {
    Delivered,
    /// Dropped; go on with the next frame.
    Dropped,
    /// Waiting for guest buffers.
    NoBuffers,
    /// Waiting for the rate limiter's timer.
    Throttled,
}

/// What one RX run did.
#[derive(Debug, Default)]
pub(super) struct RxRun {
    /// Chains were added to the used ring.
    pub used: bool,
    /// The backend failed for good (not `WouldBlock`): it should be detached.
    pub backend_failed: bool,
}

/// Everything the RX path works with.
pub(super) struct Rx<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub queue: &'a mut Queue,
    /// `None`: nothing to read from (a staged frame is still delivered).
    pub backend: Option<&'a mut (dyn NetBackend + 'static)>,
    pub limiter: &'a mut RateLimiter,
    pub state: &'a mut RxState,
    pub acked: u64,
    pub metrics: &'a mut NetMetrics,
}

impl Rx<'_> {
    /// Deliver the staged frame, then read and deliver more until the backend is empty, the
    /// guest is out of buffers, the limiter refuses or the batch is done. `Err` is a ring
    /// error (the device needs a reset).
    pub fn run(&mut self) -> Result<RxRun, String> {
        let mut run = RxRun::default();
        if self.limiter.is_blocked() {
            // The limiter's timer resumes the queue.
            return Ok(run);
        }
        for _ in 0..RX_BATCH {
            if !self.state.has_frame() {
                let Some(backend) = self.backend.as_deref_mut() else {
                    break;
                };
                match backend.read_frame(&mut self.state.frame) {
                    Ok(n) => {
                        if !self.state.accept(n, self.acked, self.metrics) {
                            continue;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("virtio-net: backend read failed: {e}");
                        self.metrics.tap_read_errors += 1;
                        run.backend_failed = true;
                        break;
                    }
                }
            }
            match self.deliver(&mut run.used)? {
                Delivery::Delivered | Delivery::Dropped => {}
                Delivery::NoBuffers | Delivery::Throttled => break,
            }
        }
        Ok(run)
    }

    /// Whether the reserve holds enough room for `need` bytes.
    fn room(&self, need: usize, mrg: bool) -> bool {
        if mrg {
            self.state.reserve.iter().map(|c| c.capacity).sum::<usize>() >= need
        } else {
            self.state
                .reserve
                .front()
                .is_some_and(|c| c.capacity >= need)
        }
    }

    fn deliver(&mut self, used: &mut bool) -> Result<Delivery, String> {
        let mrg = self.acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let need = self.state.len;
        if self.state.notify_enabled {
            self.queue
                .disable_notification(self.mem)
                .map_err(|e| format!("cannot disable notifications: {e}"))?;
            self.state.notify_enabled = false;
        }
        if let Some(waiting) = self.reserve(need, mrg, used)? {
            return Ok(waiting);
        }
        self.state.stalled = false;
        let bytes = (need - VNET_HDR_LEN) as u64;
        if !self.limiter.consume(bytes) {
            self.metrics.rx_throttled += 1;
            return Ok(Delivery::Throttled);
        }
        let copied = self.write_frame(need, used)?;
        self.state.len = 0;
        if !copied {
            self.metrics.rx_bad_buffers += 1;
            return Ok(Delivery::Dropped);
        }
        self.metrics.rx_packets += 1;
        self.metrics.rx_bytes += bytes;
        Ok(Delivery::Delivered)
    }

    /// Reserve guest buffers until a frame of `need` bytes fits. `None` when it does; else
    /// what happened to the frame (dropped: it can never fit; waiting for buffers).
    fn reserve(
        &mut self,
        need: usize,
        mrg: bool,
        used: &mut bool,
    ) -> Result<Option<Delivery>, String> {
        let mut empty_pops = 0;
        while !self.room(need, mrg) {
            let never_fits = if mrg {
                self.state.reserve.len() >= usize::from(self.queue.size())
            } else {
                !self.state.reserve.is_empty()
            };
            if never_fits {
                // Larger than one buffer (or all of them): the buffers stay for the next frame.
                tracing::debug!("virtio-net: {need}-byte frame does not fit the rx buffers");
                self.metrics.rx_dropped_oversized += 1;
                self.state.len = 0;
                return Ok(Some(Delivery::Dropped));
            }
            let chain = match self.queue.iter(self.mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(format!("available ring: {e}")),
            };
            let Some(chain) = chain else {
                // Out of buffers: ask for a notification and look again (the driver may have
                // added some meanwhile).
                empty_pops += 1;
                if self.out_of_buffers(empty_pops)? {
                    continue;
                }
                return Ok(Some(Delivery::NoBuffers));
            };
            let head = chain.head_index();
            match RxChain::parse(chain, self.mem) {
                Ok(c) => self.state.reserve.push_back(c),
                Err(()) => {
                    tracing::debug!("virtio-net: rx chain {head} unusable, returned empty");
                    self.metrics.rx_bad_buffers += 1;
                    self.add_used(head, 0, used)?;
                }
            }
        }
        Ok(None)
    }

    /// The ring had no buffer (for the `pops`-th time in a row): turn notifications on.
    /// Returns whether to look again (the driver added buffers meanwhile).
    fn out_of_buffers(&mut self, pops: u32) -> Result<bool, String> {
        let more = self
            .queue
            .enable_notification(self.mem)
            .map_err(|e| format!("cannot enable notifications: {e}"))?;
        self.state.notify_enabled = true;
        if more && pops < 2 {
            return Ok(true);
        }
        if more {
            return Err("available ring entries cannot be read".into());
        }
        if !self.state.stalled {
            self.state.stalled = true;
            self.metrics.rx_no_buffer += 1;
        }
        Ok(false)
    }

    fn add_used(&mut self, head: u16, len: u32, used: &mut bool) -> Result<(), String> {
        self.queue
            .add_used(self.mem, head, len)
            .map_err(|e| format!("used ring (head {head}): {e}"))?;
        *used = true;
        Ok(())
    }

    /// Copy the staged frame (`need` bytes, header included) into the reserved chains it
    /// takes and return them used. Returns whether the frame was copied whole (a guest
    /// memory error returns its chains empty).
    fn write_frame(&mut self, need: usize, used: &mut bool) -> Result<bool, String> {
        let mut count = 0usize;
        let mut room = 0usize;
        for c in &self.state.reserve {
            count += 1;
            room += c.capacity;
            if room >= need {
                break;
            }
        }
        // At most the queue size.
        let num_buffers = u16::try_from(count).unwrap_or(u16::MAX);
        self.state.frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN]
            .copy_from_slice(&num_buffers.to_le_bytes());
        let mut offset = 0usize;
        let mut mem_error = false;
        for _ in 0..count {
            let Some(chain) = self.state.reserve.pop_front() else {
                break;
            };
            let mut written = 0usize;
            for &(addr, len) in &chain.descs {
                if offset == need || mem_error {
                    break;
                }
                let n = len.min(need - offset);
                let bytes = &self.state.frame[offset..offset + n];
                if let Err(e) = self.mem.write_slice(bytes, addr) {
                    tracing::warn!("virtio-net: rx buffer write failed: {e}");
                    mem_error = true;
                    break;
                }
                offset += n;
                written += n;
            }
            // Within the chain's capacity, which is below 4 GiB.
            let len = if mem_error { 0 } else { len_u32(written) };
            self.add_used(chain.head, len, used)?;
        }
        Ok(!mem_error)
    }
}
