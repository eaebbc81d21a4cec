//! virtio-fs (device id 26): a host directory the guest mounts with
//! `mount -t virtiofs <tag> <dir>`.
//!
//! Two backends, one guest interface (config space: `tag[36]`, NUL-padded UTF-8, then
//! `num_request_queues` as le32; queues: one high-priority queue, then `num_request_queues`
//! request queues):
//! - [`Fs`]: in-process. FUSE requests are served by fuse-backend-rs (`Server` over a `Vfs`
//!   with a `PassthroughFs` at `/`, behind [`server::SharePolicy`]), on the VM's event loop. See
//!   [`server`] for what keeps a hostile guest inside the shared directory.
//! - [`vhost_user::VhostUserFs`]: the queues are handed to an external vhost-user-fs daemon
//!   (virtiofsd) that maps guest memory (which must then be memfd-backed).
//!
//! Split of work in [`Fs`], as in the other devices: the device ([`FsDevice`], this module) on
//! the vCPU threads (config space; activation only stores the queues and wakes the loop) and
//! the queue handler ([`handler`]) on the event loop; [`request`] serves one chain.
//!
//! Request size: a chain with more than [`MAX_REQUEST_BYTES`] readable or writable bytes is
//! refused before the FUSE server sees it (an `ENOMEM` reply when its header and reply space
//! allow one, else used length 0; [`FsMetrics::oversized_chains`]). Descriptors may alias one
//! guest buffer, so without this a guest could make fuse-backend-rs allocate what the
//! descriptors add up to (FUSE_IOCTL copies `in_size` bytes: GiBs from a few KiB of memory).
//! FUSE_IOCTL itself is answered `ENOTTY` here ([`FsMetrics::refused_ioctls`]): the share
//! supports no ioctl, and the server would allocate its input before finding that out.
//!
//! Guest errors: a chain the FUSE transport cannot use (a buffer outside guest memory or across
//! regions, lengths that overflow) completes with used length 0 and is counted in
//! [`FsMetrics::malformed_chains`]; a FUSE message the server cannot decode completes with used
//! length 0 ([`FsMetrics::failed_requests`]); a well-formed request that fails gets a FUSE error
//! reply ([`FsMetrics::error_replies`]). Errors of the ring itself put the device into
//! `needs_reset`, as does a panic inside the FUSE server (caught, [`FsMetrics::panics`]).
//!
//! Snapshots: the FUSE session (the guest's open files and node ids) lives in the server or
//! the daemon and is not saved, so a share can only be saved before the guest mounted it. The
//! Linux driver activates the device (`DRIVER_OK`) at probe, long before a mount; FUSE_INIT,
//! sent at mount, is its first request. [`Virtio::snapshot_ready`] therefore saves an
//! activated share whose rings the guest never used (every available and used index still 0
//! in guest memory) with its queues as the driver set them up, and refuses one it used
//! ([`FsSnapshotError::Mounted`]). Restored, the device is activated again on those queues:
//! in-process, the worker threads start on them; vhost-user, the daemon gets the memory table
//! and the rings again.
//!
//! Blocking: file-system calls run on the event loop and block it while they run (like the
//! block device's file I/O). A slow host file system (an fsync, a cold read from a network
//! file system) delays the other devices of the VM for that long.

pub mod handler;
pub mod request;
pub mod server;
pub mod vhost_user;
mod worker;

pub use worker::{FsWorkerThread, FsWorkers};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fuse_backend_rs::api::server::MAX_BUFFER_SIZE;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory};

use self::server::{FuseServer, ShareOptions};
use super::device::{
    CoreSpec, DeviceModel, QueueState, RestoreError, Virtio, VirtioCore, VirtioState,
};
use super::{ActivateError, EventFdError, GuestMem, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// Length of the tag field of the config space.
pub const FS_TAG_LEN: usize = 36;
/// Length of the config space: the tag and `num_request_queues`.
pub const CONFIG_SPACE_LEN: usize = FS_TAG_LEN + 4;
/// Index of the high-priority queue (FORGET, INTERRUPT); request queues follow it.
pub const HIPRIO_QUEUE: usize = 0;
/// Most request queues a device may have.
pub const MAX_REQUEST_QUEUES: u16 = kestrel_api::MAX_FS_REQUEST_QUEUES;
/// Largest queue size.
pub const MAX_QUEUE_SIZE: u16 = kestrel_api::MAX_FS_QUEUE_SIZE;
/// `VIRTIO_RING_F_INDIRECT_DESC`: the guest may put a request's buffers in an indirect table.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Room for the headers of a FUSE request or reply next to its data: the request header
/// (40 bytes) and the largest per-opcode header (WRITE: 40 bytes), or a reply header (16) and
/// its fixed part, with room to spare. fuse-backend-rs allows the same (`BUFFER_HEADER_SIZE`).
pub const REQUEST_HEADER_ROOM: u32 = 4096;
/// Largest number of readable (request) or writable (reply) bytes in one chain: 1 MiB +
/// 4 KiB. FUSE_INIT negotiates `max_pages` = 256 (`MAX_REQ_PAGES`), so `max_write` and the
/// largest READ are 256 pages = 1 MiB (fuse-backend-rs's `MAX_BUFFER_SIZE`, which its server
/// also enforces on the header's `len`); SETXATTR values are at most 64 KiB and names 255
/// bytes. A Linux guest never sends a longer chain.
pub const MAX_REQUEST_BYTES: u32 = MAX_BUFFER_SIZE + REQUEST_HEADER_ROOM;

/// The guest-visible shape of a virtio-fs device, the same for both backends: the mount tag
/// in its config space and its queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsGeometry {
    /// The mount tag (1 to 36 bytes, no NUL).
    pub tag: String,
    /// Request queues (1 to [`MAX_REQUEST_QUEUES`]), after the high-priority queue.
    pub num_request_queues: u16,
    /// Size of every queue (a power of two up to [`MAX_QUEUE_SIZE`]).
    pub queue_size: u16,
}

impl FsGeometry {
    /// [`FsError::InvalidTag`] or [`FsError::InvalidQueues`] unless the tag and queues are
    /// usable.
    pub fn check(&self) -> Result<(), FsError> {
        check_geometry(&self.tag, self.num_request_queues, self.queue_size)
    }

    /// The geometry of a virtio-fs device's core.
    fn of(core: &VirtioCore) -> FsGeometry {
        let sizes = core.queue_max_sizes();
        FsGeometry {
            tag: core.id().to_string(),
            num_request_queues: u16::try_from(sizes.len().saturating_sub(1)).unwrap_or(u16::MAX),
            queue_size: sizes.first().copied().unwrap_or(0),
        }
    }

    /// The core of a virtio-fs device of this geometry (`kind` names it in logs).
    fn core(&self, kind: &'static str, avail_features: u64) -> Result<VirtioCore, EventFdError> {
        VirtioCore::new(CoreSpec {
            kind,
            id: &self.tag,
            device_type: VIRTIO_ID_FS,
            avail_features,
            queue_max_sizes: vec![self.queue_size; 1 + usize::from(self.num_request_queues)],
        })
    }

    /// The config space: the tag and `num_request_queues`.
    fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        config_space(&self.tag, self.num_request_queues)
    }
}

impl TryFrom<&kestrel_api::FsConfig> for FsGeometry {
    type Error = FsError;

    /// The share's `tag`, `num_queues` and `queue_size`, checked.
    fn try_from(c: &kestrel_api::FsConfig) -> Result<Self, FsError> {
        let g = FsGeometry {
            tag: c.tag.clone(),
            num_request_queues: c.num_queues,
            queue_size: c.queue_size,
        };
        g.check()?;
        Ok(g)
    }
}

/// What an in-process virtio-fs device is built from (from an `fs[]` entry of the VM config
/// that has a `shared_dir`, with `TryFrom<&kestrel_api::FsConfig>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// Tag and queues.
    pub geometry: FsGeometry,
    /// The shared directory and what the guest may do in it.
    pub share: ShareOptions,
    /// Serve request queues on worker threads.
    pub worker_threads: bool,
}

impl TryFrom<&kestrel_api::FsConfig> for FsConfig {
    type Error = FsError;

    /// The share's settings: [`FsError::NoSharedDir`] without a `shared_dir` (or with a
    /// `socket`), else as [`FsGeometry`]'s.
    fn try_from(c: &kestrel_api::FsConfig) -> Result<Self, FsError> {
        let Some(dir) = c.shared_dir.as_ref().filter(|_| c.socket.is_none()) else {
            return Err(FsError::NoSharedDir(c.tag.clone()));
        };
        let share = ShareOptions {
            root: dir.clone(),
            read_only: c.read_only,
            cache: c.cache,
            xattr: c.xattr,
            max_open_handles: c.max_open_handles,
            allow_setid: c.allow_setid,
            allow_devices: c.allow_devices,
        };
        Ok(FsConfig {
            geometry: c.try_into()?,
            share,
            worker_threads: c.worker_threads,
        })
    }
}

/// Errors creating a virtio-fs device.
#[derive(Debug, Error)]
pub enum FsError {
    /// The `tag` is empty, longer than 36 bytes or holds a NUL byte.
    #[error("tag {0:?} must be 1 to {FS_TAG_LEN} bytes of UTF-8 without NUL")]
    InvalidTag(String),
    /// `num_queues` or `queue_size` is out of range.
    #[error(
        "num_queues {num_queues} / queue_size {queue_size}: need 1 to {MAX_REQUEST_QUEUES} \
         queues of a power-of-two size up to {MAX_QUEUE_SIZE}"
    )]
    InvalidQueues {
        /// Request queues asked for.
        num_queues: u16,
        /// Queue size asked for.
        queue_size: u16,
    },
    /// The configuration has no `shared_dir` (a `socket` share is a
    /// [`vhost_user::VhostUserFs`]).
    #[error("fs {0:?} has no shared_dir to serve in-process")]
    NoSharedDir(String),
    /// The configuration has no `socket` (a `shared_dir` share is an [`Fs`]).
    #[error("fs {0:?} has no vhost-user socket")]
    NoSocket(String),
    /// The shared directory's path is not UTF-8 or holds a NUL byte.
    #[error("shared directory {} must be a UTF-8 path without NUL bytes", .0.display())]
    InvalidSharedDir(PathBuf),
    /// The shared directory could not be opened.
    #[error("cannot open shared directory {}: {source}", path.display())]
    SharedDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The FUSE server could not be set up.
    #[error("FUSE server: {0}")]
    Server(String),
    /// An `EventFd` could not be created.
    #[error(transparent)]
    EventFd(#[from] EventFdError),
    /// A saved state does not fit the share.
    #[error("cannot restore: {0}")]
    Restore(#[from] RestoreError),
}

/// Counters of one virtio-fs device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FsMetrics {
    /// Chains taken from the request queues.
    pub requests: u64,
    /// Chains taken from the high-priority queue.
    pub hiprio_requests: u64,
    /// Of `requests`, those served on worker threads (`worker_threads`); the rest were served
    /// on the event loop (no workers, or a worker could not be started).
    pub worker_requests: u64,
    /// Requests answered with a FUSE error (`OutHeader.error != 0`: ENOENT, EROFS, ...).
    pub error_replies: u64,
    /// FUSE messages the server could not decode or answer (completed with used length 0).
    pub failed_requests: u64,
    /// Chains the FUSE transport could not use (completed with used length 0).
    pub malformed_chains: u64,
    /// Ring-level errors that put the device into `needs_reset`.
    pub queue_errors: u64,
    /// Panics the device contained: inside the FUSE server, or anywhere on a worker thread
    /// (the device then needs a reset). Each is also reported to the panic hook
    /// ([`Fs::set_panic_hook`]).
    pub panics: u64,
    /// Used-ring interrupts raised.
    pub interrupts: u64,
    /// Chains refused for more than [`MAX_REQUEST_BYTES`] readable or writable bytes.
    pub oversized_chains: u64,
    /// FUSE_IOCTL requests answered `ENOTTY` without reaching the server.
    pub refused_ioctls: u64,
}

/// The config space for `tag` and `num_request_queues`.
pub fn config_space(tag: &str, num_request_queues: u16) -> [u8; CONFIG_SPACE_LEN] {
    let mut c = [0u8; CONFIG_SPACE_LEN];
    let n = tag.len().min(FS_TAG_LEN);
    c[..n].copy_from_slice(&tag.as_bytes()[..n]);
    c[FS_TAG_LEN..].copy_from_slice(&u32::from(num_request_queues).to_le_bytes());
    c
}

fn lock_metrics(m: &Mutex<FsMetrics>) -> MutexGuard<'_, FsMetrics> {
    // Counters stay usable even if a holder panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Check the tag and queue geometry shared by both backends.
fn check_geometry(tag: &str, num_queues: u16, queue_size: u16) -> Result<(), FsError> {
    if tag.is_empty() || tag.len() > FS_TAG_LEN || tag.contains('\0') {
        return Err(FsError::InvalidTag(tag.to_string()));
    }
    if num_queues == 0
        || num_queues > MAX_REQUEST_QUEUES
        || !queue_size.is_power_of_two()
        || queue_size > MAX_QUEUE_SIZE
    {
        return Err(FsError::InvalidQueues {
            num_queues,
            queue_size,
        });
    }
    Ok(())
}

/// The run-time state of a virtio-fs device, in-process ([`Fs::state`]) or vhost-user
/// ([`vhost_user::VhostUserFs::state`]). The FUSE session (the guest's open files and node
/// ids) is not part of it: it lives in the server or the daemon, and a restored device starts
/// a new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    /// The virtio core.
    pub virtio: VirtioState,
    /// Tag and queues (a restored device must have them).
    pub geometry: FsGeometry,
}

impl FsState {
    /// Take the state over into `core` if it is of the same geometry.
    fn restore_into(&self, core: &mut VirtioCore) -> Result<(), RestoreError> {
        RestoreError::check("geometry", &self.geometry, &FsGeometry::of(core))?;
        core.restore(&self.virtio)
    }
}

/// Why a virtio-fs share cannot be saved now ([`Virtio::snapshot_ready`]).
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum FsSnapshotError {
    /// The guest put requests on queue `queue`: it has mounted the share, and the FUSE session
    /// that holds its open files and node ids cannot be saved.
    #[error("queue {queue}: {}", FsSnapshotError::MOUNTED)]
    Mounted {
        /// The first queue found in use.
        queue: usize,
    },
    /// The indices of queue `queue`'s rings are not in guest memory.
    #[error("queue {queue}: {}", FsSnapshotError::UNREADABLE)]
    RingUnreadable {
        /// The queue.
        queue: usize,
    },
}

impl FsSnapshotError {
    const MOUNTED: &'static str = "the guest has mounted the share (it sent requests); its \
                                   FUSE session (open files, node ids) cannot be saved";
    const UNREADABLE: &'static str = "the guest's ring indices are not in guest memory";

    /// Why, without the queue (for errors that carry a static reason).
    pub fn reason(&self) -> &'static str {
        match self {
            FsSnapshotError::Mounted { .. } => FsSnapshotError::MOUNTED,
            FsSnapshotError::RingUnreadable { .. } => FsSnapshotError::UNREADABLE,
        }
    }
}

/// Offset of the 16-bit index in a split ring's available and used rings (after `flags`).
const RING_IDX_OFFSET: u64 = 2;

/// Whether the guest never used the rings of queue `q` (`queue` is its index, for errors):
/// the available index (requests the driver published) and the used index (requests the
/// device completed) in guest memory are 0, and so is where the device is in them. A queue
/// the driver did not make ready is never used.
fn check_unused<M: GuestMemory>(
    mem: &M,
    queue: usize,
    q: &QueueState,
) -> Result<(), FsSnapshotError> {
    if !q.ready {
        return Ok(());
    }
    let idx = |ring: u64| {
        let addr = GuestAddress(ring).checked_add(RING_IDX_OFFSET)?;
        mem.read_obj::<[u8; 2]>(addr).ok().map(u16::from_le_bytes)
    };
    match (idx(q.avail_ring), idx(q.used_ring)) {
        (Some(0), Some(0)) if q.next_avail == 0 && q.next_used == 0 => Ok(()),
        (Some(_), Some(_)) => Err(FsSnapshotError::Mounted { queue }),
        _ => Err(FsSnapshotError::RingUnreadable { queue }),
    }
}

/// The own part of either virtio-fs device ([`FsDevice`], [`vhost_user::VhostUserFsDevice`]):
/// what makes [`Virtio::state`], [`Virtio::snapshot_ready`] and [`Virtio::tag`] theirs.
pub trait FsModel: DeviceModel {
    /// The activated queues (empty when not activated): each as the core holds it, or, for
    /// one the device handed to a worker thread, as it was when the worker took it.
    fn queue_states(&self, core: &VirtioCore) -> Vec<QueueState> {
        core.active().map_or_else(Vec::new, |a| {
            a.queues.iter().map(QueueState::from).collect()
        })
    }
}

impl FsModel for FsDevice {
    fn queue_states(&self, core: &VirtioCore) -> Vec<QueueState> {
        let Some(active) = core.active() else {
            return Vec::new();
        };
        active
            .queues
            .iter()
            .zip(self.handed_over.iter().chain(std::iter::repeat(&None)))
            .map(|(q, handed)| handed.unwrap_or_else(|| QueueState::from(q)))
            .collect()
    }
}

impl FsModel for vhost_user::VhostUserFsDevice {}

impl<D: FsModel> Virtio<D> {
    /// The run-time state. A queue served by a worker thread is saved as it was when the
    /// worker took it over (where the worker is in it is not known here):
    /// [`Virtio::snapshot_ready`] is what a snapshot saves.
    pub fn state(&self) -> FsState {
        let mut virtio = self.core.state();
        if virtio.activated {
            virtio.queues = self.device.queue_states(&self.core);
        }
        FsState {
            virtio,
            geometry: FsGeometry::of(&self.core),
        }
    }

    /// The state to save in a snapshot, if the share can be saved: when the driver has not
    /// activated the device, or has activated it but never used its rings (the guest has not
    /// mounted the share). The state then holds the queues as the driver set them up, and
    /// the restored device is activated on them ([`VirtioDevice::activate_restored`]).
    ///
    /// # Errors
    /// [`FsSnapshotError::Mounted`] when the guest sent a request on any queue (read from the
    /// rings in guest memory: FUSE_INIT, sent at mount, is the first); a ring whose indices
    /// are outside guest memory is [`FsSnapshotError::RingUnreadable`].
    ///
    /// [`VirtioDevice::activate_restored`]: super::VirtioDevice::activate_restored
    pub fn snapshot_ready(&self) -> Result<FsState, FsSnapshotError> {
        let state = self.state();
        let Some(active) = self.core.active() else {
            return Ok(state);
        };
        let mem = active.mem.memory();
        for (i, q) in state.virtio.queues.iter().enumerate() {
            check_unused(&*mem, i, q)?;
        }
        Ok(state)
    }

    /// The mount tag.
    pub fn tag(&self) -> &str {
        self.core.id()
    }
}

/// An in-process virtio-fs device serving a host directory.
pub type Fs = Virtio<FsDevice>;

/// The in-process virtio-fs device's own part of an [`Fs`]: the FUSE server and the worker
/// threads.
pub struct FsDevice {
    opts: ShareOptions,
    /// `None` after a reset whose rebuild failed (activation tries again).
    server: Option<Arc<FuseServer>>,
    /// The server has seen requests since it was built (a reset must rebuild it: the Vfs
    /// accepts one INIT per life and holds the guest's open files).
    server_used: bool,
    config: [u8; CONFIG_SPACE_LEN],
    metrics: Arc<Mutex<FsMetrics>>,
    /// Serve request queues on worker threads.
    worker_threads: bool,
    worker_name_prefix: String,
    /// Run first on each worker thread.
    worker_start_hook: Option<crate::ThreadStartHook>,
    /// Told of every panic the device contains.
    panic_hook: Option<crate::DevicePanicHook>,
    /// Test-only: the next pass of a worker thread panics ([`Fs::inject_worker_panic`]).
    inject_worker_panic: Arc<AtomicBool>,
    /// One slot per queue (the high-priority queue always stays on the event loop).
    workers: Vec<Option<worker::Worker>>,
    /// For each queue handed to a worker thread, its state when the worker took it (for
    /// [`Virtio::state`]: the core's slot is empty then).
    handed_over: Vec<Option<QueueState>>,
    /// The worker threads that run, as they list themselves.
    running_workers: FsWorkers,
}

impl Fs {
    /// An in-process device for `config`. The directory is opened now.
    pub fn new(config: &FsConfig) -> Result<Fs, FsError> {
        let geometry = &config.geometry;
        geometry.check()?;
        warn_if_above_fd_limit(&geometry.tag, config.share.max_open_handles);
        let server = server::build(&config.share)?;
        let features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;
        let core = geometry.core("virtio-fs", features)?;
        let device = FsDevice {
            opts: config.share.clone(),
            server: Some(Arc::new(server)),
            server_used: false,
            config: geometry.config_space(),
            metrics: Arc::new(Mutex::new(FsMetrics::default())),
            worker_threads: config.worker_threads,
            worker_name_prefix: "kestrel-fs".to_string(),
            worker_start_hook: None,
            panic_hook: None,
            inject_worker_panic: Arc::new(AtomicBool::new(false)),
            workers: core.queue_max_sizes().iter().map(|_| None).collect(),
            handed_over: core.queue_max_sizes().iter().map(|_| None).collect(),
            running_workers: FsWorkers::default(),
        };
        Ok(Virtio::from_parts(core, device))
    }

    /// A device for `config` (the same tag and queues; the directory may differ) with the
    /// run-time state `state`. The guest's FUSE session is not restored: a driver that was
    /// running finds its open files gone.
    pub fn restore(config: &FsConfig, state: &FsState) -> Result<Fs, FsError> {
        let mut fs = Fs::new(config)?;
        state.restore_into(&mut fs.core)?;
        Ok(fs)
    }

    /// The shared directory.
    pub fn shared_dir(&self) -> &Path {
        &self.device.opts.root
    }

    /// Whether the share refuses changes.
    pub fn is_read_only(&self) -> bool {
        self.device.opts.read_only
    }

    /// A snapshot of the device's counters.
    pub fn metrics(&self) -> FsMetrics {
        *lock_metrics(&self.device.metrics)
    }

    /// Whether request queues are served on worker threads.
    pub fn uses_worker_threads(&self) -> bool {
        self.device.worker_threads
    }

    /// Handle everything on queue `index` now (0 is the high-priority queue). The event loop
    /// calls this on a queue notification; it is public for tests and the fuzz target. A queue
    /// served by a worker thread is handed to it instead.
    pub fn process_queue(&mut self, index: usize) {
        self.device.process_queue(&mut self.core, index);
    }

    /// Handle every queue (after activation: notifications may have arrived before it).
    pub fn process_all(&mut self) {
        self.device.process_all(&mut self.core);
    }

    /// Thread ids of the worker threads the device started (0 for one that has not run yet;
    /// one that ended stays until the device joins it at reset or drop).
    pub fn worker_tids(&self) -> Vec<i32> {
        self.device
            .workers
            .iter()
            .flatten()
            .map(|w| w.tid())
            .collect()
    }

    /// The device's running worker threads, as a handle that stays valid for the device's life
    /// and is read without the device's lock (the VMM lists them in `Vm::threads` for cgroup
    /// placement, and stops them when the VM stops).
    pub fn worker_threads(&self) -> FsWorkers {
        self.device.running_workers.clone()
    }

    /// Name prefix of the worker threads (default `kestrel-fs`; threads are named
    /// `<prefix>-q<N>`, and Linux keeps 15 bytes of it: [`crate::os_thread_name`]).
    pub fn set_worker_name_prefix(&mut self, prefix: &str) {
        self.device.worker_name_prefix = prefix.to_string();
    }

    /// What each worker thread runs first, on itself (the VMM installs the worker's seccomp
    /// filter with it). When it fails the worker does no work and the device needs a reset.
    pub fn set_worker_start_hook(&mut self, hook: Option<crate::ThreadStartHook>) {
        self.device.worker_start_hook = hook;
    }

    /// What the device calls each time it contains a panic (the VMM counts device panics
    /// with it). Set before the device is activated.
    pub fn set_panic_hook(&mut self, hook: Option<crate::DevicePanicHook>) {
        self.device.panic_hook = hook;
    }

    /// Test-only fault injection: the next pass of one of this device's worker threads panics
    /// (once; a worker started later takes it if none runs yet), to prove a worker's panic is
    /// contained: the device needs a reset, the panic is counted, the VM runs on. `false` (and
    /// nothing armed) when the device serves its queues without workers.
    #[doc(hidden)]
    pub fn inject_worker_panic(&self) -> bool {
        let dev = &self.device;
        if !dev.worker_threads {
            return false;
        }
        dev.inject_worker_panic.store(true, Ordering::SeqCst);
        for w in dev.workers.iter().flatten() {
            w.wake();
        }
        true
    }
}

impl FsDevice {
    /// A fresh FUSE server for the share, or why not.
    fn rebuild_server(&mut self) -> Result<(), FsError> {
        self.server = Some(Arc::new(server::build(&self.opts)?));
        self.server_used = false;
        Ok(())
    }
}

impl Drop for FsDevice {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

impl DeviceModel for FsDevice {
    type ConfigSpace = [u8; CONFIG_SPACE_LEN];

    fn config_space(&self, _core: &VirtioCore) -> [u8; CONFIG_SPACE_LEN] {
        self.config
    }

    fn activate(&mut self, _core: &VirtioCore, _mem: &GuestMem) -> Result<(), ActivateError> {
        if self.server.is_none() {
            // The rebuild at the last reset failed (the directory went away?): try again.
            self.rebuild_server()
                .map_err(|e| ActivateError::Backend(e.to_string()))?;
        }
        Ok(())
    }

    fn reset(&mut self, core: &mut VirtioCore) {
        // Workers first: once they are joined nothing touches the driver's memory.
        self.stop_workers();
        if self.server_used {
            // A fresh server: the next INIT starts a new FUSE session; the guest's open files
            // and inode references of the old session are closed.
            if let Err(e) = self.rebuild_server() {
                tracing::warn!("{}: cannot rebuild the FUSE server: {e}", core.name());
                self.server = None;
            }
        }
    }
}

/// Log a warning when one share may hold as many descriptors as the process may open at all
/// (`RLIMIT_NOFILE`, soft): the cap would not protect the rest of the process.
fn warn_if_above_fd_limit(tag: &str, max_open_handles: u32) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit; getrlimit writes only it.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if u64::from(max_open_handles) >= lim.rlim_cur {
        tracing::warn!(
            "virtio-fs {tag}: max_open_handles {max_open_handles} is not below the process's \
             RLIMIT_NOFILE ({}): the guest could use up every descriptor",
            lim.rlim_cur
        );
    }
}

#[cfg(test)]
mod tests;
