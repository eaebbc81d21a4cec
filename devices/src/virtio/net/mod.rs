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
//! bumps the config generation and, when the driver is running, raises a
//! config-change interrupt (the guest sees carrier on/off). While the link is down transmitted
//! frames are dropped (counted) and nothing is read from the TAP. A TAP that disappears under
//! the device (the interface is deleted) is detached the same way.
//!
//! Rate limiting: [`RateLimiter`]s for each direction (bytes and packets). A refused frame
//! stays where it is (in the ring for TX, staged for RX) until the limiter's timerfd fires.
//!
//! Threads: the device half (this module: config space, activation, control calls) runs on
//! vCPU and API threads (activation only stores the queues and wakes the loop); all queue and
//! TAP work happens in the queue handler ([`handler`]) on the VM's event loop. The public control calls ([`Net::attach_tap`], [`Net::detach_tap`], [`Net::set_link`],
//! [`Net::update_rate_limiters`]) may come from any thread holding the device lock: they change
//! the device's state and wake the loop through an internal `EventFd`; the loop then updates
//! which descriptors it watches. A replaced TAP stays open until the loop has stopped watching
//! it, so its descriptor number cannot be reused under the loop.
//!
//! Wiring (VMM): register the two queue events (`VirtioDevice::queue_events`) as ioeventfds on the
//! transport's QueueNotify register with datamatch 0 (RX) and 1 (TX); hand the same
//! `Arc<Mutex<Net>>` to the transport and to the event manager (`add_subscriber`). The device
//! watches its own other descriptors (the TAP, its wake-up `EventFd` and the two limiters'
//! timerfds) from `init` on.

pub mod handler;
pub mod rx;
pub mod tx;

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use event_manager::EventSet;
use kestrel_api::RateLimiterConfig;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use vm_memory::VolatileSlice;

use self::rx::RxState;
use super::device::{CoreSpec, DeviceModel, RestoreError, Virtio, VirtioCore, VirtioState};
use super::{ActivateError, EventFdError, GuestMem, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::rate_limiter::{self, RateLimiter, RateLimiterState};
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
/// `VIRTIO_NET_S_LINK_UP` as the config space's le16 `status` holds it.
#[allow(clippy::cast_possible_truncation)] // The constant is 1.
const S_LINK_UP: u16 = VIRTIO_NET_S_LINK_UP as u16;
/// Most descriptors the device accepts in one chain (indirect tables can be long).
pub(crate) const MAX_CHAIN_DESCS: usize = 1024;

/// What a network device is built from (from a `network-interfaces[]` entry of the VM config
/// with `TryFrom<&kestrel_api::NetConfig>`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// The interface's id (names the device in logs and the API).
    pub iface_id: String,
    /// The TAP interface to open; `None`: no backend and the link down (a hot-attach slot).
    pub tap: Option<String>,
    /// Create the TAP when it does not exist.
    pub create_tap: bool,
    /// The guest's MAC address (unicast, not all zeros).
    pub mac: [u8; 6],
    /// Limits on received bytes and frames (no buckets: unlimited).
    pub rx_rate_limiter: RateLimiterConfig,
    /// Limits on transmitted bytes and frames.
    pub tx_rate_limiter: RateLimiterConfig,
}

impl NetConfig {
    /// A hot-attach slot `iface_id` (no TAP, link down) with the MAC derived from its id.
    pub fn slot(iface_id: &str) -> Self {
        NetConfig {
            iface_id: iface_id.to_string(),
            mac: kestrel_api::derived_mac(iface_id),
            ..NetConfig::default()
        }
    }
}

impl TryFrom<&kestrel_api::NetConfig> for NetConfig {
    type Error = NetError;

    /// The interface's settings; [`NetError::InvalidMac`] for a `guest_mac` that is not a
    /// unicast `aa:bb:cc:dd:ee:ff` address (absent: one derived from `iface_id`).
    fn try_from(n: &kestrel_api::NetConfig) -> Result<Self, NetError> {
        let mac = n
            .mac()
            .filter(is_unicast)
            .ok_or_else(|| NetError::InvalidMac(n.guest_mac.clone().unwrap_or_default()))?;
        Ok(NetConfig {
            iface_id: n.iface_id.clone(),
            tap: n.tap_name().map(str::to_string),
            create_tap: n.create_tap,
            mac,
            rx_rate_limiter: n.rx_rate_limiter.unwrap_or_default(),
            tx_rate_limiter: n.tx_rate_limiter.unwrap_or_default(),
        })
    }
}

/// Whether `mac` is usable for a guest: unicast and not all zeros.
fn is_unicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 0 && *mac != [0; 6]
}

/// Errors creating a network device or attaching its TAP.
#[derive(Debug, Error)]
pub enum NetError {
    /// The TAP device could not be opened or configured.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// `guest_mac` is not a unicast `aa:bb:cc:dd:ee:ff` address.
    #[error("guest_mac {0:?} is not a unicast MAC address")]
    InvalidMac(String),
    /// A saved state does not fit the interface.
    #[error("cannot restore: {0}")]
    Restore(#[from] RestoreError),
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

/// The run-time state of a network device ([`Net::state`], [`Net::restore`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The virtio core.
    pub virtio: VirtioState,
    /// The interface's id.
    pub iface_id: String,
    /// The MAC the guest knows (the config to restore with normally keeps it).
    pub mac: [u8; 6],
    /// The link state the guest saw.
    pub link_up: bool,
    /// The TAP attached at save time, if any.
    pub tap: Option<String>,
    /// The receive offloads (`TUNSETOFFLOAD` flags) the driver's features asked for.
    pub offloads: u32,
    /// The RX rate limiter's buckets (`None`: no limiter). Restored when the config to
    /// restore with has an RX limiter of the same shape; otherwise its buckets start full.
    #[serde(default)]
    pub rx_limiter: Option<RateLimiterState>,
    /// The TX rate limiter's buckets, as `rx_limiter`.
    #[serde(default)]
    pub tx_limiter: Option<RateLimiterState>,
}

/// A virtio-net device. See the module documentation.
pub type Net = Virtio<NetDevice>;

/// virtio-net's own part of a [`Net`]: MAC, link, backend, in-flight RX state and the
/// limiters.
pub struct NetDevice {
    mac: [u8; 6],
    link_up: bool,
    backend: Option<Box<dyn NetBackend>>,
    /// Replaced backends still registered with the event loop; it unregisters and drops them.
    retired: Vec<Box<dyn NetBackend>>,
    /// The backend descriptor the event loop watches, and for what.
    registered: Option<(RawFd, EventSet)>,
    /// `init` ran: the device is an event-loop subscriber.
    in_event_loop: bool,
    rx: RxState,
    /// The TX queue waits for the backend to become writable.
    tx_backend_full: bool,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    metrics: NetMetrics,
}

impl std::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice")
            .field("mac", &kestrel_api::format_mac(&self.mac))
            .field("backend", &self.backend.as_deref().map(NetBackend::name))
            .field("link_up", &self.link_up)
            .finish_non_exhaustive()
    }
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
    /// and it does not exist), or no backend and the link down when `tap` is `None`.
    pub fn new(config: &NetConfig) -> Result<Net, NetError> {
        if !is_unicast(&config.mac) {
            return Err(NetError::InvalidMac(kestrel_api::format_mac(&config.mac)));
        }
        let backend: Option<Box<dyn NetBackend>> = match &config.tap {
            Some(name) => Some(Box::new(open_tap(name, config.create_tap)?)),
            None => None,
        };
        let limiter = |cfg| RateLimiter::new(cfg).map_err(NetError::RateLimiter);
        let device = NetDevice {
            mac: config.mac,
            link_up: backend.is_some(),
            backend,
            retired: Vec::new(),
            registered: None,
            in_event_loop: false,
            rx: RxState::new(),
            tx_backend_full: false,
            rx_limiter: limiter(&config.rx_rate_limiter)?,
            tx_limiter: limiter(&config.tx_rate_limiter)?,
            metrics: NetMetrics::default(),
        };
        let core = VirtioCore::new(CoreSpec {
            kind: "net",
            id: &config.iface_id,
            device_type: VIRTIO_ID_NET,
            avail_features: AVAIL_FEATURES,
            queue_max_sizes: vec![QUEUE_SIZE; 2],
        })?;
        Ok(Virtio::from_parts(core, device))
    }

    /// A device for `config` with the run-time state `state` (the link comes back up only
    /// when the config has a TAP); the transport activates it again when it restores a
    /// running driver. Each rate limiter's buckets come back when the config's limiter has
    /// the saved shape (else they start full, with a warning).
    pub fn restore(config: &NetConfig, state: &NetState) -> Result<Net, NetError> {
        let mut net = Net::new(config)?;
        RestoreError::check("iface_id", state.iface_id.as_str(), net.iface_id())?;
        net.core.restore(&state.virtio)?;
        net.device.link_up = state.link_up && net.device.backend.is_some();
        let name = net.core.name().to_string();
        let dev = &mut net.device;
        let saved = [
            (&mut dev.rx_limiter, &state.rx_limiter, "RX rate limiter"),
            (&mut dev.tx_limiter, &state.tx_limiter, "TX rate limiter"),
        ];
        for (limiter, saved, what) in saved {
            rate_limiter::restore_or_warn(limiter, saved.as_ref(), &name, what);
        }
        Ok(net)
    }

    /// The run-time state to save.
    pub fn state(&self) -> NetState {
        NetState {
            virtio: self.core.state(),
            iface_id: self.iface_id().to_string(),
            mac: self.device.mac,
            link_up: self.device.link_up,
            tap: self.tap_name().map(str::to_string),
            offloads: tap_offload_flags(self.core.acked_features()),
            rx_limiter: rate_limiter::saved_state(&self.device.rx_limiter),
            tx_limiter: rate_limiter::saved_state(&self.device.tx_limiter),
        }
    }

    /// The interface's id.
    pub fn iface_id(&self) -> &str {
        self.core.id()
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.device.mac
    }

    /// The attached TAP's interface name, if a TAP is attached.
    pub fn tap_name(&self) -> Option<&str> {
        self.device
            .backend
            .as_deref()
            .and_then(NetBackend::tap_name)
    }

    /// The attached backend's name (a TAP's interface name), if any.
    pub fn backend_name(&self) -> Option<&str> {
        self.device.backend.as_deref().map(NetBackend::name)
    }

    /// Whether the guest sees its link up.
    pub fn link_up(&self) -> bool {
        self.device.link_up
    }

    /// A snapshot of the device's counters.
    pub fn metrics(&self) -> NetMetrics {
        self.device.metrics
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.core.acked_features()
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
        let retired = &mut self.device.retired;
        if let Some(i) = retired.iter().position(|b| b.tap_name() == Some(name)) {
            // Still open (and maybe watched): a second attach would fail with EBUSY.
            let tap = retired.swap_remove(i);
            return self.attach_backend(tap);
        }
        let tap = open_tap(name, create)?;
        self.attach_backend(Box::new(tap))
    }

    /// Attach any backend (see [`NetBackend`]; tests and fuzzing use stand-ins), replacing
    /// the current one, and bring the link up. On error nothing changes.
    pub fn attach_backend(&mut self, mut backend: Box<dyn NetBackend>) -> Result<(), NetError> {
        let (core, dev) = (&mut self.core, &mut self.device);
        let flags = match core.is_activated() {
            true => tap_offload_flags(core.acked_features()),
            false => 0,
        };
        backend.set_offload(flags)?;
        tracing::info!(
            "{}: backend {} -> {}",
            core.name(),
            dev.backend.as_deref().map_or("(none)", NetBackend::name),
            backend.name()
        );
        if let Some(old) = dev.backend.replace(backend) {
            dev.retire(old);
        }
        dev.tx_backend_full = false;
        dev.set_link_state(core, true);
        core.wake();
        Ok(())
    }

    /// Detach the backend (a TAP this device created goes away) and take the link down.
    pub fn detach_tap(&mut self) {
        let (core, dev) = (&mut self.core, &mut self.device);
        if let Some(old) = dev.backend.take() {
            tracing::info!("{}: backend {} detached", core.name(), old.name());
            dev.retire(old);
        }
        dev.tx_backend_full = false;
        dev.set_link_state(core, false);
        core.wake();
    }

    /// Set the link state the guest sees, keeping the backend. While the link is down,
    /// transmitted frames are dropped and nothing is received.
    pub fn set_link(&mut self, up: bool) {
        self.device.set_link_state(&mut self.core, up);
        self.core.wake();
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
            self.device.rx_limiter.update(cfg);
        }
        if let Some(cfg) = tx {
            self.device.tx_limiter.update(cfg);
        }
        self.core.wake();
    }

    /// Run the transmit queue now. The event loop calls this on a TX notification; it is
    /// public for tests and the fuzz target (outside the loop the backend's watch set is only
    /// updated on the loop's next event).
    pub fn process_tx(&mut self) {
        self.device.run(&mut self.core, false, true);
    }

    /// Run the receive path now (deliver the staged frame, read more). See
    /// [`Net::process_tx`].
    pub fn process_rx(&mut self) {
        self.device.run(&mut self.core, true, false);
    }
}

impl NetDevice {
    /// Hand a replaced backend to the event loop to unregister, or drop it if the device is
    /// not on a loop.
    fn retire(&mut self, backend: Box<dyn NetBackend>) {
        if self.in_event_loop {
            self.retired.push(backend);
        }
    }

    /// Set the link state; a change moves the config generation on and, when the driver is
    /// running, raises a config-change interrupt.
    fn set_link_state(&mut self, core: &mut VirtioCore, up: bool) {
        if self.link_up == up {
            return;
        }
        let state = if up { "up" } else { "down" };
        tracing::info!("{}: link {state}", core.name());
        self.link_up = up;
        if !up {
            // Frames waiting for a full backend are dropped like the rest.
            self.tx_backend_full = false;
        }
        core.bump_config_generation();
        if core.signal_config_change() {
            self.metrics.config_changes += 1;
        }
    }
}

impl DeviceModel for NetDevice {
    type ConfigSpace = [u8; CONFIG_SPACE_LEN];

    fn config_space(&self, _core: &VirtioCore) -> [u8; CONFIG_SPACE_LEN] {
        let mut c = [0u8; CONFIG_SPACE_LEN];
        c[..6].copy_from_slice(&self.mac);
        let status = if self.link_up { S_LINK_UP } else { 0 };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c
    }

    fn activate(&mut self, core: &VirtioCore, _mem: &GuestMem) -> Result<(), ActivateError> {
        let flags = tap_offload_flags(core.acked_features());
        if let Some(b) = self.backend.as_mut() {
            if let Err(e) = b.set_offload(flags) {
                // The guest then gets complete frames only, which it always takes.
                tracing::warn!("{}: {e}; receive offloads off", core.name());
                b.set_offload(0)
                    .map_err(|e| ActivateError::Backend(e.to_string()))?;
            }
        }
        self.rx.clear();
        self.tx_backend_full = false;
        Ok(())
    }

    fn reset(&mut self, core: &mut VirtioCore) {
        self.rx.clear();
        self.tx_backend_full = false;
        // The loop stops watching the backend for input.
        core.wake();
    }
}

#[cfg(test)]
mod tests;

/// The rate limiters' buckets in the saved state.
#[cfg(test)]
mod limiter_state_tests {
    use super::*;
    use crate::rate_limiter::test_util::bucket;

    /// A slot whose RX limiter allows `rx` packets and TX `tx` packets per 1000 s.
    fn slot(rx: Option<u64>, tx: u64) -> NetConfig {
        let ops = |n| RateLimiterConfig {
            bandwidth: None,
            ops: Some(bucket(n, None, 1_000_000)),
        };
        NetConfig {
            rx_rate_limiter: rx.map(ops).unwrap_or_default(),
            tx_rate_limiter: ops(tx),
            ..NetConfig::slot("eth0")
        }
    }

    #[test]
    fn drained_limiters_are_restored_per_direction() {
        let mut n = Net::new(&slot(Some(4), 8)).unwrap();
        for _ in 0..4 {
            assert!(n.device.rx_limiter.consume(0));
        }
        assert!(n.device.tx_limiter.consume(0));
        let state: NetState =
            serde_json::from_str(&serde_json::to_string(&n.state()).unwrap()).unwrap();
        let budget = |s: &Option<RateLimiterState>| s.unwrap().ops.unwrap().budget;
        assert_eq!(
            (budget(&state.rx_limiter), budget(&state.tx_limiter)),
            (0, 7)
        );

        let mut back = Net::restore(&slot(Some(4), 8), &state).unwrap();
        assert!(!back.device.rx_limiter.consume(0), "RX still drained");
        assert_eq!(budget(&back.state().tx_limiter), 7);
        // Another RX shape: RX starts unlimited as configured, TX is still restored.
        let other = Net::restore(&slot(None, 8), &state).unwrap();
        assert!(other.device.rx_limiter.is_unlimited());
        assert_eq!(other.state().rx_limiter, None);
        assert_eq!(budget(&other.state().tx_limiter), 7);
    }
}
