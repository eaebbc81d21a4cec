//! virtio-net (device id 1) over a TAP device, in-process.
//!
//! Queues: one receive queue ([`RX_QUEUE`]) and one transmit queue ([`TX_QUEUE`]) of
//! [`QUEUE_SIZE`] entries; no control queue, no multiqueue. Offered features: `VERSION_1`,
//! `RING_EVENT_IDX`, `MAC` (config space), `STATUS` (link state in config space), `MRG_RXBUF`,
//! `CSUM` + `HOST_TSO4/6` + `HOST_ECN` (the guest may send partially checksummed and TSO frames;
//! the TAP takes them as they are) and `GUEST_CSUM` + `GUEST_TSO4/6` + `GUEST_ECN` (the guest
//! accepts them; at activation the TAP is told with `TUNSETOFFLOAD` which of them the driver
//! negotiated, so the kernel only hands over frames the guest can take).
//!
//! The 12-byte `virtio_net_hdr_v1` is passed between the guest and the TAP unchanged (the TAP
//! has `IFF_VNET_HDR` with a 12-byte header), except that the device sets `num_buffers` on
//! receive and clears checksum hints the driver did not ask for. [`rx`] and [`tx`] describe the
//! two data paths, what they drop and how they wait (never by spinning).
//!
//! Link state and hot-attach: a device configured without `host_dev_name` starts without a
//! backend and with its link down. [`Net::attach_tap`] / [`Net::detach_tap`] swap the TAP at
//! run time and [`Net::set_link`] drives the link state alone; each change of the link state
//! bumps [`VirtioDevice::config_generation`] and, when the driver is running, raises a
//! config-change interrupt (the guest sees carrier on/off). While the link is down transmitted
//! frames are dropped (counted) and nothing is read from the TAP. A TAP that disappears under
//! the device (the interface is deleted) is detached the same way.
//!
//! Rate limiting: [`RateLimiter`]s for each direction (bytes and packets). A refused frame
//! stays where it is (in the ring for TX, staged for RX) until the limiter's timerfd fires.
//!
//! Threads: [`VirtioDevice`] runs on vCPU threads (activation only stores the queues and wakes
//! the loop); all queue and TAP work happens in the [`MutEventSubscriber`] on the VM's event
//! loop. The public control calls ([`Net::attach_tap`], [`Net::detach_tap`], [`Net::set_link`],
//! [`Net::update_rate_limiters`]) may come from any thread holding the device lock: they change
//! the device's state and wake the loop through an internal `EventFd`; the loop then updates
//! which descriptors it watches. A replaced TAP stays open until the loop has stopped watching
//! it, so its descriptor number cannot be reused under the loop.
//!
//! Wiring (VMM): register the two [`VirtioDevice::queue_events`] as ioeventfds on the
//! transport's QueueNotify register with datamatch 0 (RX) and 1 (TX); hand the same
//! `Arc<Mutex<Net>>` to the transport and to the event manager (`add_subscriber`). The device
//! watches its own other descriptors (the TAP, its wake-up `EventFd` and the two limiters'
//! timerfds) from `init` on.

pub mod rx;
pub mod tx;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kestrel_api::RateLimiterConfig;
use thiserror::Error;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, VolatileSlice};
use vmm_sys_util::eventfd::EventFd;

use self::rx::{Rx, RxState};
use self::tx::{Tx, TxStop};
use super::{
    drain_eventfd, ignore_config_write, new_eventfd, take_queues, wake_event_loop, watch_events,
    ActivateError, Active, DeviceName, EventFdError, GuestMem, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::rate_limiter::RateLimiter;
use crate::tap::{offload, Tap, TapError};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (device → driver).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (driver → device).
pub const TX_QUEUE: usize = 1;
/// Size of `virtio_net_hdr_v1`, in front of every frame both ways.
pub const VNET_HDR_LEN: usize = crate::tap::VNET_HDR_LEN_V1;
/// Largest frame (without the header) the device moves: a 64 KiB TSO frame with its headers.
pub const MAX_FRAME_LEN: usize = 65550;
/// Length of the config space: `mac` and `status` (no multiqueue, no MTU).
pub const CONFIG_SPACE_LEN: usize = 8;
/// Most descriptors the device accepts in one chain (indirect tables can be long).
pub(crate) const MAX_CHAIN_DESCS: usize = 1024;

/// `Net::new` takes an interface as configured (`network-interfaces[]` in the VM config).
pub type NetConfig = kestrel_api::NetConfig;

const RX_QUEUE_EVENT: u32 = 0;
const TX_QUEUE_EVENT: u32 = 1;
const WAKE_EVENT: u32 = 2;
const BACKEND_EVENT: u32 = 3;
const RX_LIMITER_EVENT: u32 = 4;
const TX_LIMITER_EVENT: u32 = 5;

/// Errors creating a network device or attaching its TAP.
#[derive(Debug, Error)]
pub enum NetError {
    /// The TAP device could not be opened or configured.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// `guest_mac` is not a unicast `aa:bb:cc:dd:ee:ff` address.
    #[error("invalid guest MAC address {0:?}")]
    InvalidMac(String),
    /// An `EventFd` could not be created.
    #[error(transparent)]
    EventFd(#[from] EventFdError),
    /// A rate limiter's timer could not be created.
    #[error("cannot create a rate limiter: {0}")]
    RateLimiter(#[source] io::Error),
}

/// Counters of one network device. Bytes count frames without the virtio-net header.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames from the backend too long for the staging buffer or for the guest's buffers.
    pub rx_dropped_oversized: u64,
    /// Frames from the backend shorter than the header, empty, or with offloads the driver
    /// did not negotiate.
    pub rx_dropped_malformed: u64,
    /// Guest RX chains that could not be used (device-readable descriptors, smaller than the
    /// header, outside guest memory), returned with length 0.
    pub rx_bad_buffers: u64,
    /// Times a frame had to wait because the guest had no (or not enough) RX buffers.
    pub rx_no_buffer: u64,
    /// Times the RX rate limiter made a frame wait.
    pub rx_throttled: u64,
    /// Frames sent to the backend.
    pub tx_packets: u64,
    /// Bytes sent to the backend.
    pub tx_bytes: u64,
    /// TX chains with a device-writable descriptor.
    pub tx_dropped_wrong_direction: u64,
    /// TX chains shorter than the virtio-net header.
    pub tx_dropped_no_header: u64,
    /// TX chains with a header and no frame.
    pub tx_dropped_empty: u64,
    /// TX frames longer than [`MAX_FRAME_LEN`].
    pub tx_dropped_oversized: u64,
    /// TX chains outside guest memory or in too many pieces.
    pub tx_dropped_bad_buffer: u64,
    /// TX headers asking for offloads the driver did not negotiate.
    pub tx_dropped_bad_header: u64,
    /// TX frames dropped because there is no backend or the link is down.
    pub tx_dropped_no_link: u64,
    /// Times the TX rate limiter made a frame wait.
    pub tx_throttled: u64,
    /// Times the backend was full and the TX queue waited for it.
    pub tx_backend_full: u64,
    /// Backend reads that failed (other than "nothing to read").
    pub tap_read_errors: u64,
    /// Backend writes that failed (the frame is dropped), e.g. while the TAP is down.
    pub tap_write_errors: u64,
    /// Backends detached because they failed or disappeared (the interface was deleted).
    pub backends_lost: u64,
    /// Ring-level errors that put the device into `needs_reset`.
    pub queue_errors: u64,
    /// Used-ring interrupts raised.
    pub interrupts: u64,
    /// Config-change interrupts raised (link changes, device failure).
    pub config_changes: u64,
}

/// The host side of a virtio-net device: a [`Tap`] in production; tests and fuzzing plug in
/// stand-ins. Every call moves one whole frame with its virtio-net header in front.
pub trait NetBackend: AsRawFd + Send {
    /// A name for logs (the TAP interface's).
    fn name(&self) -> &str;
    /// The TAP interface's name when the backend is a TAP.
    fn tap_name(&self) -> Option<&str> {
        None
    }
    /// Read one frame into `buf`; `WouldBlock` when none is waiting. The descriptor from
    /// `as_raw_fd` is watched for input.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write one frame gathered from guest memory; `WouldBlock` when the backend is full (the
    /// device retries when the descriptor is writable).
    fn write_frame(&mut self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize>;
    /// Offloads ([`offload`] flags) the device accepts from `read_frame`.
    fn set_offload(&mut self, flags: u32) -> Result<(), TapError> {
        let _ = flags;
        Ok(())
    }
}

impl NetBackend for Tap {
    fn name(&self) -> &str {
        Tap::name(self)
    }

    fn tap_name(&self) -> Option<&str> {
        Some(Tap::name(self))
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }

    fn write_frame(&mut self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        self.write_volatile(bufs)
    }

    fn set_offload(&mut self, flags: u32) -> Result<(), TapError> {
        Tap::set_offload(self, flags)
    }
}

/// The features offered by every network device.
pub const AVAIL_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_STATUS
    | 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN;

/// The `TUNSETOFFLOAD` flags for the guest-side offloads in `acked` (each only with what it
/// depends on: TSO needs checksum offload, ECN needs TSO).
pub fn tap_offload_flags(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= offload::CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= offload::TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= offload::TSO6;
        }
        if flags & (offload::TSO4 | offload::TSO6) != 0 && has(VIRTIO_NET_F_GUEST_ECN) {
            flags |= offload::TSO_ECN;
        }
    }
    flags
}

/// A virtio-net device. See the module documentation.
pub struct Net {
    iface_id: String,
    mac: [u8; 6],
    acked_features: u64,
    link_up: bool,
    config_generation: u32,
    backend: Option<Box<dyn NetBackend>>,
    /// Replaced backends still registered with the event loop; it unregisters and drops them.
    retired: Vec<Box<dyn NetBackend>>,
    /// The backend descriptor the event loop watches, and for what.
    registered: Option<(RawFd, EventSet)>,
    /// `init` ran: the device is an event-loop subscriber.
    in_event_loop: bool,
    queue_sizes: [u16; 2],
    queue_events: [EventFd; 2],
    wake_evt: EventFd,
    active: Option<Active<[Queue; 2]>>,
    failed: bool,
    rx: RxState,
    /// The TX queue waits for the backend to become writable.
    tx_backend_full: bool,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    metrics: NetMetrics,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("iface_id", &self.iface_id)
            .field("mac", &kestrel_api::format_mac(&self.mac))
            .field("backend", &self.backend_name())
            .field("link_up", &self.link_up)
            .field("activated", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

/// A rate limiter for `cfg` (no buckets when absent).
fn new_limiter(cfg: Option<&RateLimiterConfig>) -> Result<RateLimiter, NetError> {
    RateLimiter::new(&cfg.copied().unwrap_or_default()).map_err(NetError::RateLimiter)
}

/// Open (or create) TAP `name` with the 12-byte header and no offloads yet.
fn open_tap(name: &str, create: bool) -> Result<Tap, TapError> {
    let tap = if create {
        Tap::create(name)?
    } else {
        Tap::open(name)?
    };
    tap.set_vnet_hdr_size(VNET_HDR_LEN)?;
    tap.set_offload(0)?;
    Ok(tap)
}

impl Net {
    /// A network device for `config`: its TAP opened (created first when `create_tap` is set
    /// and it does not exist), or no backend and the link down when `host_dev_name` is absent
    /// or empty. The MAC is `guest_mac` or one derived from `iface_id`.
    pub fn new(config: &NetConfig) -> Result<Net, NetError> {
        let mac = config
            .mac()
            .filter(|m| m[0] & 1 == 0 && *m != [0; 6])
            .ok_or_else(|| NetError::InvalidMac(config.guest_mac.clone().unwrap_or_default()))?;
        let backend: Option<Box<dyn NetBackend>> = match config.tap_name() {
            Some(name) => Some(Box::new(open_tap(name, config.create_tap)?)),
            None => None,
        };
        Ok(Net {
            iface_id: config.iface_id.clone(),
            mac,
            acked_features: 0,
            link_up: backend.is_some(),
            config_generation: 0,
            backend,
            retired: Vec::new(),
            registered: None,
            in_event_loop: false,
            queue_sizes: [QUEUE_SIZE; 2],
            queue_events: [new_eventfd()?, new_eventfd()?],
            wake_evt: new_eventfd()?,
            active: None,
            failed: false,
            rx: RxState::new(),
            tx_backend_full: false,
            rx_limiter: new_limiter(config.rx_rate_limiter.as_ref())?,
            tx_limiter: new_limiter(config.tx_rate_limiter.as_ref())?,
            metrics: NetMetrics::default(),
        })
    }

    /// The interface's id.
    pub fn iface_id(&self) -> &str {
        &self.iface_id
    }

    /// How log lines name the device.
    fn log_name(&self) -> DeviceName<'_> {
        DeviceName::new("net", &self.iface_id)
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The attached TAP's interface name, if a TAP is attached.
    pub fn tap_name(&self) -> Option<&str> {
        self.backend.as_deref().and_then(NetBackend::tap_name)
    }

    /// The attached backend's name (a TAP's interface name), if any.
    pub fn backend_name(&self) -> Option<&str> {
        self.backend.as_deref().map(NetBackend::name)
    }

    /// Whether the guest sees its link up.
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// A snapshot of the device's counters.
    pub fn metrics(&self) -> NetMetrics {
        self.metrics
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The `EventFd` the device wakes its event loop with (registered in `init`).
    pub fn wake_event(&self) -> &EventFd {
        &self.wake_evt
    }

    /// Attach TAP `name` (created first if `create` and it does not exist), replacing the
    /// current backend, and bring the link up. On error nothing changes. Attaching the TAP that
    /// is attached already only brings the link up; re-attaching one detached so recently that
    /// the event loop has not released it yet takes it back as it is.
    pub fn attach_tap(&mut self, name: &str, create: bool) -> Result<(), NetError> {
        if self.tap_name() == Some(name) {
            self.set_link(true);
            return Ok(());
        }
        if let Some(i) = self.retired.iter().position(|b| b.tap_name() == Some(name)) {
            // Still open (and maybe watched): a second attach would fail with EBUSY.
            let tap = self.retired.swap_remove(i);
            return self.attach_backend(tap);
        }
        let tap = open_tap(name, create)?;
        self.attach_backend(Box::new(tap))
    }

    /// Attach any backend (see [`NetBackend`]; tests and fuzzing use stand-ins), replacing
    /// the current one, and bring the link up. On error nothing changes.
    pub fn attach_backend(&mut self, mut backend: Box<dyn NetBackend>) -> Result<(), NetError> {
        backend.set_offload(self.offload_flags())?;
        tracing::info!(
            "net {}: backend {} -> {}",
            self.iface_id,
            self.backend_name().unwrap_or("(none)"),
            backend.name()
        );
        if let Some(old) = self.backend.replace(backend) {
            self.retire(old);
        }
        self.tx_backend_full = false;
        self.set_link_state(true);
        self.wake();
        Ok(())
    }

    /// Detach the backend (a TAP this device created goes away) and take the link down.
    pub fn detach_tap(&mut self) {
        if let Some(old) = self.backend.take() {
            tracing::info!("net {}: backend {} detached", self.iface_id, old.name());
            self.retire(old);
        }
        self.tx_backend_full = false;
        self.set_link_state(false);
        self.wake();
    }

    /// Set the link state the guest sees, keeping the backend. While the link is down,
    /// transmitted frames are dropped and nothing is received.
    pub fn set_link(&mut self, up: bool) {
        self.set_link_state(up);
        self.wake();
    }

    /// Replace the rate limiters' buckets: `None` leaves a direction as it is; a config
    /// without buckets (`RateLimiterConfig::default()`) removes its limits. Unchanged buckets
    /// keep their state; a waiting queue retries at once.
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) {
        if let Some(cfg) = rx {
            self.rx_limiter.update(cfg);
        }
        if let Some(cfg) = tx {
            self.tx_limiter.update(cfg);
        }
        self.wake();
    }

    /// Run the transmit queue now. The event loop calls this on a TX notification; it is
    /// public for tests and the fuzz target (outside the loop the backend's watch set is only
    /// updated on the loop's next event).
    pub fn process_tx(&mut self) {
        self.run(false, true);
    }

    /// Run the receive path now (deliver the staged frame, read more). See
    /// [`Net::process_tx`].
    pub fn process_rx(&mut self) {
        self.run(true, false);
    }

    fn wake(&self) {
        if let Err(e) = self.wake_evt.write(1) {
            tracing::warn!("net {}: cannot wake the event loop: {e}", self.iface_id);
        }
    }

    fn offload_flags(&self) -> u32 {
        if self.active.is_some() {
            tap_offload_flags(self.acked_features)
        } else {
            0
        }
    }

    /// Hand a replaced backend to the event loop to unregister, or drop it if the device is
    /// not on a loop.
    fn retire(&mut self, backend: Box<dyn NetBackend>) {
        if self.in_event_loop {
            self.retired.push(backend);
        }
    }

    fn set_link_state(&mut self, up: bool) {
        if self.link_up == up {
            return;
        }
        tracing::info!(
            "net {}: link {}",
            self.iface_id,
            if up { "up" } else { "down" }
        );
        self.link_up = up;
        if !up {
            // Frames waiting for a full backend are dropped like the rest.
            self.tx_backend_full = false;
        }
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Some(a) = &self.active {
            a.interrupt.signal_config_change();
            self.metrics.config_changes += 1;
        }
    }

    /// The backend failed or went away: detach it and take the link down.
    fn backend_lost(&mut self) {
        if let Some(b) = self.backend.take() {
            tracing::warn!(
                "net {}: backend {} failed or disappeared; detached",
                self.iface_id,
                b.name()
            );
            self.metrics.backends_lost += 1;
            self.retire(b);
        }
        self.tx_backend_full = false;
        self.set_link_state(false);
    }

    /// Work the queues (TX first when both: it frees guest memory the driver may reuse for
    /// RX), then raise at most one used-ring interrupt.
    fn run(&mut self, do_rx: bool, do_tx: bool) {
        if self.failed {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.memory();
        let [rxq, txq] = &mut active.queues;
        let link = self.link_up;
        let mut used = [false; 2];
        let mut ring_error = None;
        let mut backend_failed = false;
        if do_tx && !self.tx_backend_full {
            let mut tx = Tx {
                mem: &mem,
                queue: txq,
                backend: self.backend.as_deref_mut().filter(|_| link),
                limiter: &mut self.tx_limiter,
                acked: self.acked_features,
                metrics: &mut self.metrics,
            };
            match tx.run() {
                Ok(r) => {
                    used[TX_QUEUE] = r.used;
                    match r.stop {
                        TxStop::BackendFull => self.tx_backend_full = true,
                        TxStop::BatchLimit => {
                            // Come back through the event loop, after other devices had a turn.
                            if let Err(e) = self.queue_events[TX_QUEUE].write(1) {
                                tracing::warn!("net {}: cannot re-arm tx: {e}", self.iface_id);
                            }
                        }
                        TxStop::Idle | TxStop::Throttled => {}
                    }
                }
                Err(e) => ring_error = Some(format!("tx queue: {e}")),
            }
        }
        if do_rx && link && ring_error.is_none() {
            let mut rx = Rx {
                mem: &mem,
                queue: rxq,
                backend: self.backend.as_deref_mut(),
                limiter: &mut self.rx_limiter,
                state: &mut self.rx,
                acked: self.acked_features,
                metrics: &mut self.metrics,
            };
            match rx.run() {
                Ok(r) => {
                    used[RX_QUEUE] = r.used;
                    backend_failed = r.backend_failed;
                }
                Err(e) => ring_error = Some(format!("rx queue: {e}")),
            }
        }
        let mut notify = false;
        for (q, queue) in [(RX_QUEUE, &mut *rxq), (TX_QUEUE, &mut *txq)] {
            if used[q] {
                // On an error, still tell the guest about what completed.
                notify |= queue.needs_notification(&*mem).unwrap_or(true);
            }
        }
        if notify {
            active.interrupt.signal_used_queue();
            self.metrics.interrupts += 1;
        }
        if let Some(why) = ring_error {
            tracing::warn!(
                "net {}: malformed queue, device needs a reset: {why}",
                self.iface_id
            );
            self.failed = true;
            self.metrics.queue_errors += 1;
            self.metrics.config_changes += 1;
            active.interrupt.signal_config_change();
        }
        drop(mem);
        if backend_failed {
            self.backend_lost();
        }
    }

    /// What the event loop should watch the backend for.
    fn backend_interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.active.is_some() && !self.failed && self.link_up {
            if !self.rx.has_frame() && !self.rx_limiter.is_blocked() {
                set |= EventSet::IN;
            }
            if self.tx_backend_full {
                set |= EventSet::OUT;
            }
        }
        set
    }

    /// Bring the event loop's watch list in line with the device: unregister and drop retired
    /// backends, register or update the current one.
    fn sync_backend(&mut self, ops: &mut EventOps) {
        for old in self.retired.drain(..) {
            let fd = old.as_raw_fd();
            if self.registered.is_some_and(|(r, _)| r == fd) {
                if let Err(e) = ops.remove(Events::empty_raw(fd)) {
                    tracing::warn!(
                        "net {}: cannot unwatch the old backend: {e:?}",
                        self.iface_id
                    );
                }
                self.registered = None;
            }
        }
        let want = self
            .backend
            .as_ref()
            .map(|b| (b.as_raw_fd(), self.backend_interest()));
        match (self.registered, want) {
            (None, None) => {}
            (Some((fd, _)), None) => {
                // Not expected: a registered backend is current or retired.
                let _ = ops.remove(Events::empty_raw(fd));
                self.registered = None;
            }
            (None, Some((fd, set))) => self.watch_backend(ops, fd, set, false),
            (Some((old, old_set)), Some((fd, set))) => {
                if old != fd {
                    let _ = ops.remove(Events::empty_raw(old));
                    self.registered = None;
                    self.watch_backend(ops, fd, set, false);
                } else if old_set != set {
                    self.watch_backend(ops, fd, set, true);
                }
            }
        }
    }

    /// Watch backend descriptor `fd` for `set` (`modify`: it is watched already, for another
    /// set). On success it is the registered backend; on failure nothing changes.
    fn watch_backend(&mut self, ops: &mut EventOps, fd: RawFd, set: EventSet, modify: bool) {
        let events = Events::with_data_raw(fd, BACKEND_EVENT, set);
        let r = if modify {
            ops.modify(events)
        } else {
            ops.add(events)
        };
        match r {
            Ok(()) => self.registered = Some((fd, set)),
            Err(e) => tracing::error!("{}: cannot watch the backend: {e:?}", self.log_name()),
        }
    }

    fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut c = [0u8; CONFIG_SPACE_LEN];
        c[..6].copy_from_slice(&self.mac);
        let status = if self.link_up {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & AVAIL_FEATURES;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only for legacy drivers.
        ignore_config_write(self.log_name(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let queues = take_queues(queues)?;
        let flags = tap_offload_flags(self.acked_features);
        if let Some(b) = self.backend.as_mut() {
            if let Err(e) = b.set_offload(flags) {
                // The guest then gets complete frames only, which it always takes.
                tracing::warn!("net {}: {e}; receive offloads off", self.iface_id);
                b.set_offload(0)
                    .map_err(|e| ActivateError::Backend(e.to_string()))?;
            }
        }
        wake_event_loop(&self.wake_evt)?;
        self.active = Some(Active::new(mem, interrupt, queues));
        self.failed = false;
        self.rx.clear();
        self.tx_backend_full = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.failed = false;
        self.acked_features = 0;
        self.rx.clear();
        self.tx_backend_full = false;
        // The loop stops watching the backend for input.
        self.wake();
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn needs_reset(&self) -> bool {
        self.failed
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn config_generation(&self) -> u32 {
        self.config_generation
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.in_event_loop = true;
        let mut events = vec![
            Events::with_data(&self.queue_events[RX_QUEUE], RX_QUEUE_EVENT, EventSet::IN),
            Events::with_data(&self.queue_events[TX_QUEUE], TX_QUEUE_EVENT, EventSet::IN),
            Events::with_data(&self.wake_evt, WAKE_EVENT, EventSet::IN),
        ];
        for (rl, data) in [
            (&self.rx_limiter, RX_LIMITER_EVENT),
            (&self.tx_limiter, TX_LIMITER_EVENT),
        ] {
            if rl.as_raw_fd() >= 0 {
                events.push(Events::with_data(rl, data, EventSet::IN));
            }
        }
        watch_events(ops, events, self.log_name());
        self.sync_backend(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let set = events.event_set();
        let (mut do_rx, mut do_tx) = (false, false);
        match events.data() {
            RX_QUEUE_EVENT => {
                drain_eventfd(&self.queue_events[RX_QUEUE], self.log_name(), "rx queue");
                do_rx = true;
            }
            TX_QUEUE_EVENT => {
                drain_eventfd(&self.queue_events[TX_QUEUE], self.log_name(), "tx queue");
                do_tx = true;
            }
            WAKE_EVENT => {
                drain_eventfd(&self.wake_evt, self.log_name(), "wake-up");
                (do_rx, do_tx) = (true, true);
            }
            BACKEND_EVENT => {
                let current = self.backend.as_ref().map(|b| b.as_raw_fd());
                // Events of a retired backend: the sync below unregisters it.
                if current == Some(events.fd()) {
                    if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                        self.backend_lost();
                    } else {
                        do_rx = set.contains(EventSet::IN);
                        if set.contains(EventSet::OUT) {
                            self.tx_backend_full = false;
                            do_tx = true;
                        }
                    }
                }
            }
            RX_LIMITER_EVENT => do_rx = self.rx_limiter.on_timer(),
            TX_LIMITER_EVENT => do_tx = self.tx_limiter.on_timer(),
            other => tracing::warn!("net {}: unexpected event {other}", self.iface_id),
        }
        self.run(do_rx, do_tx);
        self.sync_backend(ops);
    }
}

#[cfg(test)]
mod tests;
