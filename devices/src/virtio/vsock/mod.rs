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
//! Threads: [`Vsock::activate`] (vCPU thread) only stores the queues and kicks the event loop;
//! all queue and socket work happens in the [`MutEventSubscriber`] implementation on the VM's
//! event-loop thread. A driver reset ([`VirtioDevice::reset`]) drops every connection on the
//! next loop iteration.
//!
//! Wiring (VMM): register the three [`VirtioDevice::queue_events`] as ioeventfds on the
//! transport's QueueNotify register with datamatch 0, 1, 2; hand the same
//! `Arc<Mutex<Vsock>>` to the transport and to the event manager (`add_subscriber`).

pub mod connection;
pub mod muxer;
pub mod packet;
pub mod registry;

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use thiserror::Error;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    check_queue_count, ignore_config_write, new_eventfd, read_config_bytes, wake_event_loop,
    watch_events, ActivateError, Active, DeviceName, EventFdError, GuestMem, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use muxer::Muxer;
use packet::{RxBuffer, MAX_PKT_DATA};

/// `VIRTIO_ID_VSOCK`.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the rx queue (device → driver packets).
pub const RX_QUEUE: usize = 0;
/// Index of the tx queue (driver → device packets).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue (unused: the device sends no events).
pub const EVENT_QUEUE: usize = 2;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// Most tx chains handled per event-loop pass (each carries at most
/// [`packet::MAX_PKT_DATA`]); the rest waits for the next pass (the tx queue event is re-armed),
/// so a guest that keeps the tx queue full cannot keep the event loop to itself.
pub const TX_BATCH: usize = 64;
/// Most rx chains filled per event-loop pass (the rx queue event is re-armed for the rest).
pub const RX_BATCH: usize = 64;
/// How log lines name the device.
const LOG_NAME: DeviceName<'static> = DeviceName::new("vsock", "");

/// Why a vsock device could not be created.
#[derive(Debug, Error)]
pub enum VsockError {
    /// The guest CID is reserved (0, 1, 2 or `u32::MAX`) or above 32 bits.
    #[error("guest CID {0} is not usable: guest CIDs are 3 to 4294967294")]
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

/// The virtio-vsock device. See the module documentation.
pub struct Vsock {
    cid: u64,
    acked_features: u64,
    queue_evts: Vec<EventFd>,
    activate_evt: EventFd,
    active: Option<Active<Vec<Queue>>>,
    needs_reset: bool,
    teardown_pending: bool,
    muxer: Muxer,
    scratch: Box<[u8]>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.cid)
            .field("uds_path", &self.muxer.uds_path())
            .field("activated", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device for guest `cid` whose host side listens at `uds_path`. The listener is bound
    /// here, so a bad path fails before the VM starts; the socket file is removed when the
    /// device is dropped.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        if cid < 3 || cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(cid));
        }
        let queue_evts = vec![new_eventfd()?, new_eventfd()?, new_eventfd()?];
        let activate_evt = new_eventfd()?;
        let muxer = Muxer::new(cid, uds_path)?;
        Ok(Vsock {
            cid,
            acked_features: 0,
            queue_evts,
            activate_evt,
            active: None,
            needs_reset: false,
            teardown_pending: false,
            muxer,
            scratch: vec![0u8; MAX_PKT_DATA].into_boxed_slice(),
        })
    }

    /// A device from the API's `vsock` section.
    pub fn from_config(cfg: &kestrel_api::VsockConfig) -> Result<Vsock, VsockError> {
        Vsock::new(u64::from(cfg.guest_cid), &cfg.uds_path)
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.cid
    }

    /// Where the host listener is.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> VsockMetrics {
        self.muxer.metrics
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Guest payload held for Unix peers that have not read it yet (at most
    /// [`muxer::MAX_BUFFERED_BYTES`]).
    pub fn buffered_bytes(&self) -> usize {
        self.muxer.buffered_bytes()
    }

    /// Process both queues until neither makes progress or a queue used up its per-pass
    /// budget ([`TX_BATCH`], [`RX_BATCH`]); signal the guest once. A queue that used up its
    /// budget has its queue event re-armed: the loop comes back to it after the other events
    /// (and a stop request) had their turn.
    fn process_queues(&mut self, ops: &mut EventOps) {
        if self.needs_reset {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.memory();
        let mut tx_budget = TX_BATCH;
        let mut rx_budget = RX_BATCH;
        loop {
            Self::process_tx(
                &mem,
                active,
                &mut self.muxer,
                &mut self.scratch,
                self.cid,
                &mut self.needs_reset,
                &mut tx_budget,
                ops,
            );
            // The tx queue stops while the control backlog is full.
            let tx_held_back = self.muxer.ctrl_full();
            let rx_used = Self::process_rx(
                &mem,
                active,
                &mut self.muxer,
                &mut self.scratch,
                &mut self.needs_reset,
                &mut rx_budget,
                ops,
            );
            // Another round only if the rx side drained a backlog that held tx back.
            if !(tx_held_back && rx_used > 0) || self.needs_reset || tx_budget == 0 {
                break;
            }
        }
        for (budget, q) in [(tx_budget, TX_QUEUE), (rx_budget, RX_QUEUE)] {
            if budget == 0 && !self.needs_reset {
                if let Err(e) = self.queue_evts[q].write(1) {
                    tracing::warn!("vsock: cannot re-arm queue {q}: {e}");
                }
            }
        }
        let used = [
            (rx_budget < RX_BATCH, RX_QUEUE),
            (tx_budget < TX_BATCH, TX_QUEUE),
        ];
        for (used, q) in used {
            if !used {
                continue;
            }
            match active.queues[q].needs_notification(&*mem) {
                Ok(true) => active.interrupt.signal_used_queue(),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!("vsock: queue {q}: {e}");
                    active.interrupt.signal_used_queue();
                }
            }
        }
    }

    /// Consume the tx queue, at most `budget` chains (decremented per chain used). Returns
    /// how many chains were used.
    #[allow(clippy::too_many_arguments)]
    fn process_tx(
        mem: &GuestMemoryMmap,
        active: &mut Active<Vec<Queue>>,
        muxer: &mut Muxer,
        scratch: &mut [u8],
        cid: u64,
        needs_reset: &mut bool,
        budget: &mut usize,
        ops: &mut EventOps,
    ) -> usize {
        let queue = &mut active.queues[TX_QUEUE];
        let mut used = 0;
        while !muxer.ctrl_full() && *budget > 0 {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    tracing::warn!("vsock: tx queue: {e}; device needs reset");
                    *needs_reset = true;
                    break;
                }
            };
            let Some(mut chain) = chain else {
                break;
            };
            let head = chain.head_index();
            muxer.metrics.packets_from_guest += 1;
            match packet::read_tx(mem, &mut chain, cid, scratch) {
                Ok(hdr) => muxer.recv_pkt(&hdr, &scratch[..hdr.len as usize], ops),
                Err(e) => {
                    tracing::debug!("vsock: dropped a tx packet: {e}");
                    muxer.metrics.packets_dropped += 1;
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::warn!("vsock: tx queue: {e}; device needs reset");
                *needs_reset = true;
                break;
            }
            used += 1;
            *budget -= 1;
        }
        used
    }

    /// Fill rx buffers while packets are waiting, at most `budget` chains (decremented per
    /// chain used). Returns how many chains were used.
    fn process_rx(
        mem: &GuestMemoryMmap,
        active: &mut Active<Vec<Queue>>,
        muxer: &mut Muxer,
        scratch: &mut [u8],
        needs_reset: &mut bool,
        budget: &mut usize,
        ops: &mut EventOps,
    ) -> usize {
        let queue = &mut active.queues[RX_QUEUE];
        let mut used = 0;
        while muxer.has_rx() && *budget > 0 {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    tracing::warn!("vsock: rx queue: {e}; device needs reset");
                    *needs_reset = true;
                    break;
                }
            };
            // No buffer: the packets wait for the guest's next rx notification.
            let Some(mut chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let len = match RxBuffer::new(mem, &mut chain) {
                Ok(mut buf) => {
                    let cap = buf.capacity().min(scratch.len());
                    let Some(hdr) = muxer.next_rx(&mut scratch[..cap], ops) else {
                        // Nothing to send after all: give the buffer back for later.
                        queue.go_to_previous_position();
                        break;
                    };
                    let n = (hdr.len as usize).min(cap);
                    match buf.write(&hdr, &scratch[..n]) {
                        Ok(len) => {
                            muxer.metrics.packets_to_guest += 1;
                            len
                        }
                        Err(e) => {
                            tracing::warn!("vsock: lost a packet for the guest: {e}");
                            0
                        }
                    }
                }
                Err(e) => {
                    // Unusable buffer: return it empty.
                    tracing::debug!("vsock: dropped an rx buffer: {e}");
                    muxer.metrics.packets_dropped += 1;
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("vsock: rx queue: {e}; device needs reset");
                *needs_reset = true;
                break;
            }
            used += 1;
            *budget -= 1;
        }
        used
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The CID is read-only.
        ignore_config_write(LOG_NAME, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        check_queue_count(&queues, QUEUE_SIZES.len())?;
        wake_event_loop(&self.activate_evt)?;
        self.active = Some(Active::new(mem, interrupt, queues));
        self.needs_reset = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.needs_reset = false;
        self.acked_features = 0;
        // Connections hold fds in the event loop's epoll set: the loop drops them.
        self.teardown_pending = true;
        if let Err(e) = self.activate_evt.write(1) {
            tracing::warn!("vsock: cannot wake the event loop for a reset: {e}");
        }
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        let evts = self.queue_evts.iter().chain([&self.activate_evt]);
        let events = evts.map(|evt| Events::new(evt, EventSet::IN));
        watch_events(ops, events, LOG_NAME);
        self.muxer.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.teardown_pending {
            self.teardown_pending = false;
            self.muxer.teardown(ops);
        }
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
        } else if let Some(evt) = self.queue_evts.iter().find(|e| e.as_raw_fd() == fd) {
            // rx: new buffers; tx: new packets; event: buffers for events we never send.
            let _ = evt.read();
        } else if self.muxer.owns(fd) {
            let active = self.active.is_some() && !self.needs_reset;
            self.muxer.handle_event(fd, events.event_set(), ops, active);
        } else {
            tracing::debug!("vsock: event for unknown fd {fd}");
            let _ = ops.remove(Events::empty_raw(fd));
        }
        self.process_queues(ops);
        self.muxer.rearm_timer();
    }
}

#[cfg(test)]
mod tests;
