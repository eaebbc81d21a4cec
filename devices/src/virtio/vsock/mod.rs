//! virtio-vsock (device id 19) with Firecracker-compatible hybrid vsock over Unix sockets.
//!
//! The guest sees an ordinary virtio-vsock device (rx, tx and event queues; config space =
//! its CID). The host side is a Unix socket at `uds_path`:
//! - host → guest: a host program connects to `uds_path` and writes `CONNECT <port>\n`; the
//!   device asks the guest for a connection to `<port>` from a fresh host port (from
//!   [`muxer::LOCAL_PORT_BASE`] up). When the guest accepts, the program reads
//!   `OK <hostport>\n` and the stream is relayed both ways; when nobody listens in the guest
//!   (or the program's line is malformed, too long or late) the stream is closed without `OK`.
//! - guest → host: a guest connection to CID 2 port `P` is forwarded to a Unix listener at
//!   `<uds_path>_P`; without one the guest's connect fails (RST). A target that is a vsock
//!   listener of this process (another VM's `uds_path`) is refused too, and a `uds_path` that
//!   collides with another listener through this rule is refused at creation ([`registry`]).
//!
//! Flow control follows virtio 1.2 §5.10.6.3 per connection ([`connection`]): the guest never
//! gets more than its advertised credit and a Unix peer that writes faster than the guest reads
//! is simply not read; guest payload is buffered up to [`connection::CONN_BUF_ALLOC`] per
//! connection for a Unix peer that reads slowly, and a guest that exceeds its credit is reset.
//! Per VM: at most [`muxer::MAX_CONNECTIONS`] connections and [`muxer::MAX_BUFFERED_BYTES`]
//! buffered; per event-loop pass at most [`TX_BATCH`] / [`RX_BATCH`] chains.
//!
//! Threads: activation (vCPU thread) only stores the queues and kicks the event loop; all queue
//! and socket work happens in the queue handler ([`handler`]) on the VM's event-loop thread. A
//! driver reset drops every connection on the next loop iteration.
//!
//! Save and restore ([`Vsock::state`], [`Vsock::restore`]): only the guest CID and the virtio
//! core survive; connections do not. As in Firecracker, a restored device that the driver had
//! running sends `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue, so the guest drops
//! its connections and listens afresh.
//!
//! Wiring (VMM): register the three queue events (`VirtioDevice::queue_events`) as ioeventfds on the
//! transport's QueueNotify register with datamatch 0, 1, 2; hand the same
//! `Arc<Mutex<Vsock>>` to the transport and to the event manager (`add_subscriber`).

pub mod connection;
pub mod handler;
pub mod muxer;
pub mod packet;
pub mod registry;

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::device::{CoreSpec, DeviceModel, RestoreError, Virtio, VirtioCore, VirtioState};
use super::{EventFdError, VIRTIO_F_VERSION_1};
use muxer::Muxer;
use packet::MAX_PKT_DATA;

/// `VIRTIO_ID_VSOCK`.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the rx queue (device → driver packets).
pub const RX_QUEUE: usize = 0;
/// Index of the tx queue (driver → device packets).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue (the device sends one event: the transport reset after a
/// restore).
pub const EVENT_QUEUE: usize = 2;
/// Most tx chains handled per event-loop pass (each carries at most
/// [`packet::MAX_PKT_DATA`]); the rest waits for the next pass (the tx queue event is re-armed),
/// so a guest that keeps the tx queue full cannot keep the event loop to itself.
pub const TX_BATCH: usize = 64;
/// Most rx chains filled per event-loop pass (the rx queue event is re-armed for the rest).
pub const RX_BATCH: usize = 64;

/// What a vsock device is built from (from the `vsock` section of the VM config with
/// `TryFrom<&kestrel_api::VsockConfig>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 to `u32::MAX - 1`).
    pub guest_cid: u64,
    /// Where the host-side Unix listener is bound (it must not exist).
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// A device for guest `guest_cid` listening at `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Self {
        VsockConfig {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
        }
    }
}

impl TryFrom<&kestrel_api::VsockConfig> for VsockConfig {
    type Error = VsockError;

    /// The section's settings; [`VsockError::InvalidCid`] for a reserved `guest_cid`.
    fn try_from(v: &kestrel_api::VsockConfig) -> Result<Self, VsockError> {
        let config = VsockConfig::new(u64::from(v.guest_cid), &v.uds_path);
        check_cid(config.guest_cid)?;
        Ok(config)
    }
}

/// [`VsockError::InvalidCid`] unless `cid` is a guest CID (3 to `u32::MAX - 1`).
fn check_cid(cid: u64) -> Result<(), VsockError> {
    if cid < 3 || cid >= u64::from(u32::MAX) {
        return Err(VsockError::InvalidCid(cid));
    }
    Ok(())
}

/// Why a vsock device could not be created.
#[derive(Debug, Error)]
pub enum VsockError {
    /// The `guest_cid` is reserved (0, 1, 2 or `u32::MAX`) or above 32 bits.
    #[error("guest_cid {0} is not usable: guest CIDs are 3 to 4294967294")]
    InvalidCid(u64),
    /// The Unix listener could not be created at the path.
    #[error("cannot listen on {}: {source}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error from bind / setup.
        #[source]
        source: io::Error,
    },
    /// The path is `<other>_<digits>` of another vsock device's listener in this process, or
    /// that listener is `<path>_<digits>`: one guest could reach the other's host socket.
    #[error(
        "vsock uds_path {} collides with the listener {} of another vsock device: a guest \
         connecting to host port P reaches <uds_path>_P",
        path.display(),
        other.display()
    )]
    PathCollision {
        /// The path asked for.
        path: PathBuf,
        /// The registered listener it collides with.
        other: PathBuf,
    },
    /// An `EventFd` could not be created.
    #[error(transparent)]
    EventFd(#[from] EventFdError),
    /// The timer could not be created.
    #[error("cannot create the timer: {0}")]
    Timer(#[source] io::Error),
    /// A saved state does not fit the device.
    #[error("cannot restore: {0}")]
    Restore(#[from] RestoreError),
}

/// The device's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockMetrics {
    /// Connections that got established (either direction).
    pub conns_opened: u64,
    /// Established connections that have ended.
    pub conns_closed: u64,
    /// Connections that never got established: guest connects without a host listener,
    /// host `CONNECT`s the guest reset or did not answer, malformed or late `CONNECT` lines,
    /// table full.
    pub conns_refused: u64,
    /// Payload bytes delivered to the guest.
    pub bytes_to_guest: u64,
    /// Payload bytes accepted from the guest.
    pub bytes_from_guest: u64,
    /// Packets written to the rx queue.
    pub packets_to_guest: u64,
    /// Packets read from the tx queue (valid or not).
    pub packets_from_guest: u64,
    /// Malformed guest packets (and unusable rx buffers) that were dropped.
    pub packets_dropped: u64,
    /// Connections reset because the guest sent beyond its credit.
    pub credit_violations: u64,
    /// Control packets (resets) dropped because the rx backlog was full.
    pub rx_ctrl_dropped: u64,
}

/// The run-time state of a vsock device ([`Vsock::state`], [`Vsock::restore`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The virtio core.
    pub virtio: VirtioState,
    /// The guest's CID (a restored device must have it: the guest knows it).
    pub guest_cid: u64,
}

/// The virtio-vsock device. See the module documentation.
pub type Vsock = Virtio<VsockDevice>;

/// virtio-vsock's own part of a [`Vsock`]: the CID and the connection multiplexer.
pub struct VsockDevice {
    cid: u64,
    /// A driver reset happened: the loop drops the connections (their fds are in its set).
    teardown_pending: bool,
    /// A restored device owes the guest a transport-reset event.
    reset_event_pending: bool,
    /// The reset event was sent and the guest has not handled it yet (it posts the event
    /// buffer again and kicks the event queue when it has): packets for the guest wait, since
    /// the guest would reset a connection it accepted before handling the event.
    reset_ack_pending: bool,
    muxer: Muxer,
    scratch: Box<[u8]>,
}

impl std::fmt::Debug for VsockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockDevice")
            .field("cid", &self.cid)
            .field("uds_path", &self.muxer.uds_path())
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device for `config`. The listener is bound here, so a bad path fails before the VM
    /// starts; the socket file is removed when the device is dropped.
    pub fn new(config: &VsockConfig) -> Result<Vsock, VsockError> {
        let cid = config.guest_cid;
        check_cid(cid)?;
        let core = VirtioCore::new(CoreSpec {
            kind: "vsock",
            id: "",
            device_type: VIRTIO_ID_VSOCK,
            avail_features: VIRTIO_F_VERSION_1,
            queue_max_sizes: vec![QUEUE_SIZE; 3],
        })?;
        let device = VsockDevice {
            cid,
            teardown_pending: false,
            reset_event_pending: false,
            reset_ack_pending: false,
            muxer: Muxer::new(cid, &config.uds_path)?,
            scratch: vec![0u8; MAX_PKT_DATA].into_boxed_slice(),
        };
        Ok(Virtio::from_parts(core, device))
    }

    /// A device for `config` (the same CID; the listener path may differ) with the run-time
    /// state `state`. It has no connections; once the transport has activated it again it
    /// tells the guest so with a transport-reset event.
    pub fn restore(config: &VsockConfig, state: &VsockState) -> Result<Vsock, VsockError> {
        let mut vsock = Vsock::new(config)?;
        RestoreError::check("guest_cid", state.guest_cid, vsock.guest_cid())?;
        vsock.core.restore(&state.virtio)?;
        vsock.device.reset_event_pending = state.virtio.activated;
        Ok(vsock)
    }

    /// The run-time state to save.
    pub fn state(&self) -> VsockState {
        VsockState {
            virtio: self.core.state(),
            guest_cid: self.device.cid,
        }
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.device.cid
    }

    /// Where the host listener is.
    pub fn uds_path(&self) -> &Path {
        self.device.muxer.uds_path()
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> VsockMetrics {
        self.device.muxer.metrics
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.device.muxer.connection_count()
    }

    /// Guest payload held for Unix peers that have not read it yet (at most
    /// [`muxer::MAX_BUFFERED_BYTES`]).
    pub fn buffered_bytes(&self) -> usize {
        self.device.muxer.buffered_bytes()
    }
}

impl DeviceModel for VsockDevice {
    type ConfigSpace = [u8; 8];

    fn config_space(&self, _core: &VirtioCore) -> [u8; 8] {
        self.cid.to_le_bytes()
    }

    fn reset(&mut self, core: &mut VirtioCore) {
        // Connections hold fds in the event loop's epoll set: the loop drops them.
        self.teardown_pending = true;
        self.reset_event_pending = false;
        self.reset_ack_pending = false;
        core.wake();
    }
}

#[cfg(test)]
mod tests;
