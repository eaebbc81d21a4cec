//! vhost-user-fs frontend: the guest's virtio-fs queues are served by an external daemon
//! (virtiofsd) over a vhost-user Unix socket.
//!
//! - [`VhostUserFs::new`] connects, takes ownership of the session (`SET_OWNER`) and
//!   negotiates the vhost-user protocol features (`MQ`, `REPLY_ACK`); the features offered to
//!   the guest are the daemon's, limited to what Kestrel's transport handles.
//! - The config space (tag, `num_request_queues`) is served locally.
//! - Activation only stores the queues and wakes the event loop; the loop then sends
//!   `SET_FEATURES`, `SET_MEM_TABLE` (every guest memory region with its memfd and offset: guest
//!   memory must be memfd-backed `MAP_SHARED`, which activation checks) and per queue
//!   `SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE`.
//! - Kicks: the queue `EventFd`s (`VirtioDevice::queue_events`, registered by the VMM as KVM
//!   ioeventfds) are passed to the daemon as the kick descriptors, so a guest notification goes
//!   straight to it; this device never reads them.
//! - Interrupts: the daemon signals per-queue call `EventFd`s that the queue handler
//!   ([`handler`]) watches on the event loop and turns into used-ring interrupts, so the ISR
//!   bit the guest reads stays right.
//! - Reset: `SET_VRING_ENABLE 0` and `GET_VRING_BASE` stop every ring before the driver
//!   reuses its memory (on the vCPU thread that wrote the status, bounded by the socket
//!   timeout).
//!
//! Memory hotplug: after activation the daemon only knows the regions of the last
//! `SET_MEM_TABLE`. The VMM must call [`VhostUserFs::update_memory`] after it publishes a new
//! layout (it resends the whole table); until then buffers in new memory fail in the daemon.
//! A daemon that exits or breaks the protocol puts the device into `needs_reset`; Kestrel does
//! not reconnect (a later activation fails while the daemon is gone).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{FsError, FsGeometry, FsState, CONFIG_SPACE_LEN, VIRTIO_RING_F_INDIRECT_DESC};
use crate::virtio::device::{DeviceModel, RestoreError, Virtio, VirtioCore};
use crate::virtio::{
    new_eventfd, ActivateError, EventFdError, GuestMem, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

pub mod handler;

/// How long one vhost-user message may take before the daemon counts as dead.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

/// Guest features Kestrel passes through from the daemon (its transport handles these).
const GUEST_FEATURE_MASK: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;

/// `size_of::<libc::timeval>()` as `setsockopt` takes it (16 bytes).
#[allow(clippy::cast_possible_truncation)] // 16 fits any socklen_t.
const TIMEVAL_LEN: libc::socklen_t = std::mem::size_of::<libc::timeval>() as libc::socklen_t;

/// What a vhost-user-fs device is built from (from an `fs[]` entry of the VM config that has
/// a `socket`, with `TryFrom<&kestrel_api::FsConfig>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserFsConfig {
    /// Tag and queues.
    pub geometry: FsGeometry,
    /// The daemon's vhost-user socket.
    pub socket: PathBuf,
}

impl TryFrom<&kestrel_api::FsConfig> for VhostUserFsConfig {
    type Error = FsError;

    /// The share's settings: [`FsError::NoSocket`] without a `socket`, else as
    /// [`FsGeometry`]'s.
    fn try_from(c: &kestrel_api::FsConfig) -> Result<Self, FsError> {
        let Some(socket) = c.socket.as_ref() else {
            return Err(FsError::NoSocket(c.tag.clone()));
        };
        Ok(VhostUserFsConfig {
            geometry: c.try_into()?,
            socket: socket.clone(),
        })
    }
}

/// Errors of the vhost-user-fs frontend.
#[derive(Debug, Error)]
pub enum VhostUserFsError {
    /// Tag or queue geometry rejected.
    #[error(transparent)]
    Config(#[from] FsError),
    /// The daemon's socket could not be reached.
    #[error("cannot connect to the vhost-user-fs daemon at {}: {source}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: vhost::Error,
    },
    /// A vhost-user request failed.
    #[error("vhost-user {request} failed: {source}")]
    Request {
        /// The request (e.g. `SET_MEM_TABLE`).
        request: &'static str,
        /// The error.
        #[source]
        source: vhost::Error,
    },
    /// The socket timeouts could not be set.
    #[error("cannot set the vhost-user socket timeout: {0}")]
    SocketTimeout(#[source] std::io::Error),
    /// The daemon does not offer a feature Kestrel needs.
    #[error("the vhost-user-fs daemon does not offer {0}")]
    MissingFeature(&'static str),
    /// The daemon has fewer queues than the device needs.
    #[error("the vhost-user-fs daemon has {has} queues, the device needs {needs}")]
    TooFewQueues {
        /// Queues the daemon supports.
        has: u64,
        /// Queues the device needs (1 + request queues).
        needs: usize,
    },
    /// A guest memory region is not backed by a file (memfd), so the daemon cannot map it.
    #[error(
        "guest memory region at {addr:#x} is not memfd-backed: vhost-user needs shared guest \
         memory (MemoryManager with shared = true)"
    )]
    MemoryNotShared {
        /// The region's guest-physical address.
        addr: u64,
    },
    /// A ring does not lie inside one guest memory region.
    #[error("queue {0}: a ring is not inside one guest memory region")]
    RingAddress(usize),
    /// The device is not running (for [`VhostUserFs::update_memory`]).
    #[error("the device is not activated")]
    NotActive,
    /// A saved state does not fit the share.
    #[error("cannot restore: {0}")]
    Restore(#[from] RestoreError),
}

impl From<EventFdError> for VhostUserFsError {
    /// Like the in-process device's: [`FsError::EventFd`].
    fn from(e: EventFdError) -> Self {
        VhostUserFsError::Config(e.into())
    }
}

fn req(request: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserFsError {
    move |source| VhostUserFsError::Request { request, source }
}

/// Counters of one vhost-user-fs device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VhostUserFsMetrics {
    /// Times the rings were handed to the daemon.
    pub activations: u64,
    /// Used-ring interrupts forwarded from the daemon's call `EventFd`s.
    pub interrupts: u64,
    /// vhost-user conversations that failed (activation, reset, memory update).
    pub backend_errors: u64,
}

/// A virtio-fs device whose requests an external vhost-user daemon serves.
pub type VhostUserFs = Virtio<VhostUserFsDevice>;

/// The vhost-user-fs device's own part of a [`VhostUserFs`]: the session with the daemon.
pub struct VhostUserFsDevice {
    socket: PathBuf,
    frontend: Frontend,
    /// `VHOST_USER_F_PROTOCOL_FEATURES` was offered (and is acked with the guest's features).
    protocol_features: bool,
    config: [u8; CONFIG_SPACE_LEN],
    call_events: Vec<EventFd>,
    /// The rings were handed to the daemon.
    started: bool,
    metrics: VhostUserFsMetrics,
}

/// The host-virtual address of `len` bytes at guest address `addr`, if they lie in one region.
fn host_range(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Option<u64> {
    let slice = mem.get_slice(GuestAddress(addr), len).ok()?;
    Some(slice.ptr_guard().as_ptr() as u64)
}

/// The vhost-user memory table of `mem`; every region must be file-backed.
fn memory_table(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserFsError> {
    mem.iter()
        .map(|r| {
            VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| {
                VhostUserFsError::MemoryNotShared {
                    addr: vm_memory::GuestMemoryRegion::start_addr(r).0,
                }
            })
        })
        .collect()
}

fn set_socket_timeout(fd: i32, timeout: Duration) -> Result<(), VhostUserFsError> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: `tv` is a valid timeval that outlives the call and the length matches it;
        // `fd` is the frontend's socket, which it keeps open.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                TIMEVAL_LEN,
            )
        };
        if r != 0 {
            return Err(VhostUserFsError::SocketTimeout(
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// Connect to the daemon at `socket`, take the session (`SET_OWNER`) and agree on the
/// protocol features. Returns the frontend, the daemon's virtio features and whether it
/// speaks the protocol features.
fn connect(socket: &Path, queues: usize) -> Result<(Frontend, u64, bool), VhostUserFsError> {
    // The vhost crate sends through vmm-sys-util's `send_with_fds` (`sendmsg` with
    // `MSG_NOSIGNAL`): a daemon that went away is an error, never a SIGPIPE, on the caller's
    // threads (create, memory hotplug) as on a vCPU (activation).
    let queue_count = u64::try_from(queues).unwrap_or(u64::MAX);
    let mut frontend =
        Frontend::connect(socket, queue_count).map_err(|source| VhostUserFsError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    set_socket_timeout(frontend.as_raw_fd(), SOCKET_TIMEOUT)?;
    frontend.set_owner().map_err(req("SET_OWNER"))?;
    let features = frontend.get_features().map_err(req("GET_FEATURES"))?;
    if features & VIRTIO_F_VERSION_1 == 0 {
        return Err(VhostUserFsError::MissingFeature("VIRTIO_F_VERSION_1"));
    }
    let protocol_features = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
    if protocol_features {
        let offered = frontend
            .get_protocol_features()
            .map_err(req("GET_PROTOCOL_FEATURES"))?;
        let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        frontend
            .set_protocol_features(offered & wanted)
            .map_err(req("SET_PROTOCOL_FEATURES"))?;
        if offered.contains(VhostUserProtocolFeatures::MQ) {
            let has = frontend.get_queue_num().map_err(req("GET_QUEUE_NUM"))?;
            if has < queue_count {
                return Err(VhostUserFsError::TooFewQueues { has, needs: queues });
            }
        }
    }
    Ok((frontend, features, protocol_features))
}

impl VhostUserFs {
    /// Connect to the daemon listening on `config.socket` and set up the session for a device
    /// with mount tag `config.tag` and its request queues.
    pub fn new(config: &VhostUserFsConfig) -> Result<VhostUserFs, VhostUserFsError> {
        let geometry = &config.geometry;
        geometry.check()?;
        let (tag, queues) = (&geometry.tag, 1 + usize::from(geometry.num_request_queues));
        let (frontend, features, protocol_features) = connect(&config.socket, queues)?;
        let call_events = (0..queues)
            .map(|_| new_eventfd())
            .collect::<Result<_, _>>()?;
        tracing::info!(
            "vhost-user-fs {tag}: connected to {} (features {features:#x})",
            config.socket.display()
        );
        let core = geometry.core("vhost-user-fs", features & GUEST_FEATURE_MASK)?;
        let device = VhostUserFsDevice {
            socket: config.socket.clone(),
            frontend,
            protocol_features,
            config: geometry.config_space(),
            call_events,
            started: false,
            metrics: VhostUserFsMetrics::default(),
        };
        Ok(Virtio::from_parts(core, device))
    }

    /// A device for `config` (the same tag and queues, a daemon that offers the saved
    /// features) with the run-time state `state`. The daemon starts a new FUSE session; the
    /// rings it gets on activation start where the saved ones were.
    pub fn restore(
        config: &VhostUserFsConfig,
        state: &FsState,
    ) -> Result<VhostUserFs, VhostUserFsError> {
        let mut fs = VhostUserFs::new(config)?;
        state.restore_into(&mut fs.core)?;
        Ok(fs)
    }

    /// The daemon's socket.
    pub fn socket(&self) -> &Path {
        &self.device.socket
    }

    /// A snapshot of the device's counters.
    pub fn metrics(&self) -> VhostUserFsMetrics {
        self.device.metrics
    }

    /// Whether the rings are with the daemon.
    pub fn is_started(&self) -> bool {
        self.device.started
    }

    /// Hand the rings to the daemon (the event loop does this after activation; public for
    /// tests). A failure puts the device into `needs_reset`.
    pub fn start(&mut self) {
        self.device.start(&mut self.core);
    }

    /// Send the current guest memory layout to the daemon (after memory hotplug). A no-op
    /// before the rings are started (activation sends the layout of that moment).
    pub fn update_memory(&mut self) -> Result<(), VhostUserFsError> {
        let dev = &mut self.device;
        let Some(active) = self.core.active().filter(|_| dev.started) else {
            return Ok(());
        };
        let regions = memory_table(&active.mem.memory())?;
        dev.frontend
            .set_mem_table(&regions)
            .map_err(req("SET_MEM_TABLE"))
            .inspect_err(|_| dev.metrics.backend_errors += 1)
    }
}

impl DeviceModel for VhostUserFsDevice {
    type ConfigSpace = [u8; CONFIG_SPACE_LEN];

    fn config_space(&self, _core: &VirtioCore) -> [u8; CONFIG_SPACE_LEN] {
        self.config
    }

    fn activate(&mut self, _core: &VirtioCore, mem: &GuestMem) -> Result<(), ActivateError> {
        // Checked here (no I/O) so the error reaches the transport: the daemon cannot map
        // anonymous memory.
        memory_table(&mem.memory()).map_err(|e| ActivateError::Backend(e.to_string()))?;
        Ok(())
    }

    fn reset(&mut self, core: &mut VirtioCore) {
        if self.started {
            if let Err(e) = self.stop(core.queue_max_sizes().len()) {
                tracing::warn!("{}: cannot stop the rings: {e}", core.name());
                self.metrics.backend_errors += 1;
            }
        }
        self.started = false;
    }
}
