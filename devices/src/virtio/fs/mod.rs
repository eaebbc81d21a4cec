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
//! Split of work in [`Fs`], as in the other devices: [`VirtioDevice`] on the vCPU threads
//! (features, config space, activation, which only stores the queues and wakes the loop) and
//! [`MutEventSubscriber`] on the event loop (queue processing).
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
//! Blocking: file-system calls run on the event loop and block it while they run (like the
//! block device's file I/O). A slow host file system (an fsync, a cold read from a network
//! file system) delays the other devices of the VM for that long.

pub mod server;
pub mod vhost_user;
mod worker;

pub use worker::{FsWorkerThread, FsWorkers};

use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::server::MAX_BUFFER_SIZE;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use kestrel_api::FsConfig;
use thiserror::Error;
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{ByteValued, Bytes, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use self::server::{FuseServer, ShareOptions};
use super::{
    check_queue_count, drain_eventfd, ignore_config_write, new_eventfd, notify_used,
    numbered_events, serve_queue, wake_event_loop, warn_unexpected_set, watch_events,
    ActivateError, Active, DeviceName, EventFdError, GuestMem, Served, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

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
/// Most chains handled per queue notification before yielding the event loop.
const BATCH_LIMIT: usize = 256;

const ACTIVATE_EVENT: u32 = 0;
/// Queue `i` is watched with event data `QUEUE_EVENT_BASE + i`.
const QUEUE_EVENT_BASE: u32 = 1;

/// Errors creating a virtio-fs device.
#[derive(Debug, Error)]
pub enum FsError {
    /// The tag is empty, longer than 36 bytes or holds a NUL byte.
    #[error("tag {0:?} must be 1 to {FS_TAG_LEN} bytes of UTF-8 without NUL")]
    InvalidTag(String),
    /// The queue count or size is out of range.
    #[error(
        "{num_queues} request queues of {queue_size} entries: need 1 to {MAX_REQUEST_QUEUES} \
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

/// Copy `config[offset..]` into `data`; bytes beyond the config space read as zero.
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

/// How one chain ended.
enum Outcome {
    /// Used length to report.
    Done(u32),
    /// The FUSE server panicked; the chain is completed with length 0 and the device fails.
    Panicked,
}

/// Readable and writable bytes of `chain` (each descriptor counted as often as it appears).
fn chain_lengths(chain: &DescriptorChain<&GuestMemoryMmap>) -> (u64, u64) {
    chain.clone().fold((0, 0), |(r, w), d| {
        let len = u64::from(d.len());
        if d.is_write_only() {
            (r, w.saturating_add(len))
        } else {
            (r.saturating_add(len), w)
        }
    })
}

/// The request header at the start of the chain's readable bytes (it may span descriptors),
/// or `None` when they are too short or outside guest memory.
fn peek_header(
    mem: &GuestMemoryMmap,
    chain: &DescriptorChain<&GuestMemoryMmap>,
) -> Option<InHeader> {
    let mut h = InHeader::default();
    let buf = h.as_mut_slice();
    let mut got = 0;
    for d in chain.clone().readable() {
        if got == buf.len() {
            break;
        }
        let n = (d.len() as usize).min(buf.len() - got);
        mem.read_slice(&mut buf[got..got + n], d.addr()).ok()?;
        got += n;
    }
    (got == buf.len()).then_some(h)
}

/// Answer the request of `chain` with `errno` without the FUSE server: the reply header goes
/// to `reply_at` (the first writable descriptor, when it can hold one). FORGET and
/// BATCH_FORGET get no reply, nor does a chain without a readable header.
fn reply_error(
    mem: &GuestMemoryMmap,
    header: Option<&InHeader>,
    reply_at: Option<vm_memory::GuestAddress>,
    errno: i32,
    metrics: &mut FsMetrics,
) -> Outcome {
    let (Some(h), Some(at)) = (header, reply_at) else {
        return Outcome::Done(0);
    };
    if h.opcode == Opcode::Forget as u32 || h.opcode == Opcode::BatchForget as u32 {
        return Outcome::Done(0);
    }
    let len = std::mem::size_of::<OutHeader>() as u32;
    let out = OutHeader {
        len,
        error: -errno,
        unique: h.unique,
    };
    match mem.write_obj(out, at) {
        Ok(()) => {
            metrics.error_replies += 1;
            Outcome::Done(len)
        }
        Err(_) => Outcome::Done(0),
    }
}

/// Serve one chain with `server`. Returns the used length (the reply's length).
fn serve_chain(
    server: &FuseServer,
    metrics: &mut FsMetrics,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Outcome {
    // Where the reply's header goes, to count error replies.
    let reply_at = chain
        .clone()
        .writable()
        .next()
        .filter(|d| d.len() as usize >= std::mem::size_of::<OutHeader>())
        .map(|d| d.addr());
    let header = peek_header(mem, &chain);
    // Before anything sized by the chain is built or allocated.
    let (readable, writable) = chain_lengths(&chain);
    let max = u64::from(MAX_REQUEST_BYTES);
    if readable > max || writable > max {
        tracing::debug!(
            "virtio-fs: chain of {readable} readable and {writable} writable bytes refused \
             (limit {max})"
        );
        metrics.oversized_chains += 1;
        return reply_error(mem, header.as_ref(), reply_at, libc::ENOMEM, metrics);
    }
    if header.is_some_and(|h| h.opcode == Opcode::Ioctl as u32) {
        metrics.refused_ioctls += 1;
        return reply_error(mem, header.as_ref(), reply_at, libc::ENOTTY, metrics);
    }
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!("virtio-fs: unusable readable buffers: {e}");
            metrics.malformed_chains += 1;
            return Outcome::Done(0);
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain) {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!("virtio-fs: unusable writable buffers: {e}");
            metrics.malformed_chains += 1;
            return Outcome::Done(0);
        }
    };
    // A bug in the FUSE server must not take down the event loop (and every other device of
    // the VM with it): the device fails instead, and a driver reset rebuilds the server.
    let res = panic::catch_unwind(AssertUnwindSafe(|| {
        server.handle_message(reader, Writer::from(writer), None, None)
    }));
    match res {
        Ok(Ok(len)) => {
            if len >= std::mem::size_of::<OutHeader>() {
                if let Some(addr) = reply_at {
                    if let Ok(h) = mem.read_obj::<OutHeader>(addr) {
                        if h.error != 0 {
                            metrics.error_replies += 1;
                        }
                    }
                }
            }
            // A reply is at most the chain's writable length, below 4 GiB.
            Outcome::Done(u32::try_from(len).unwrap_or(u32::MAX))
        }
        Ok(Err(e)) => {
            tracing::debug!("virtio-fs: request not served: {e}");
            metrics.failed_requests += 1;
            Outcome::Done(0)
        }
        Err(_) => {
            metrics.panics += 1;
            Outcome::Panicked
        }
    }
}

impl FsMetrics {
    fn add(&mut self, o: &FsMetrics) {
        self.requests += o.requests;
        self.hiprio_requests += o.hiprio_requests;
        self.worker_requests += o.worker_requests;
        self.error_replies += o.error_replies;
        self.failed_requests += o.failed_requests;
        self.malformed_chains += o.malformed_chains;
        self.queue_errors += o.queue_errors;
        self.panics += o.panics;
        self.interrupts += o.interrupts;
        self.oversized_chains += o.oversized_chains;
        self.refused_ioctls += o.refused_ioctls;
    }
}

/// Serve the available chains of `queue` (at most `limit`), then notify the guest if it wants
/// to be. Returns `Err` with the reason when the ring is broken or the server panicked (the
/// device must then fail), `Ok(true)` when chains are left (the limit was reached).
fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    server: &FuseServer,
    interrupt: &VirtioInterrupt,
    metrics: &mut FsMetrics,
    hiprio: bool,
    limit: usize,
) -> Result<bool, String> {
    let pass = serve_queue(queue, mem, limit, |chain| {
        if hiprio {
            metrics.hiprio_requests += 1;
        } else {
            metrics.requests += 1;
        }
        match serve_chain(server, metrics, mem, chain) {
            Outcome::Done(len) => Served::Used(len),
            Outcome::Panicked => Served::UsedAndStop(0),
        }
    });
    if pass.used > 0 && notify_used(queue, mem, interrupt) {
        metrics.interrupts += 1;
    }
    let result = match pass.ring_error {
        Some(why) => Err(why),
        None if pass.stopped => Err("the FUSE server panicked".to_string()),
        None => Ok(pass.limit_reached),
    };
    if result.is_err() && metrics.panics == 0 {
        metrics.queue_errors += 1;
    }
    result
}

/// Tell `hook` of the panics counted in `m` (one pass's counters).
fn report_panics(m: &FsMetrics, hook: Option<&crate::DevicePanicHook>) {
    if let Some(hook) = hook {
        for _ in 0..m.panics {
            hook();
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

/// An in-process virtio-fs device serving a host directory.
pub struct Fs {
    tag: String,
    opts: ShareOptions,
    /// `None` after a reset whose rebuild failed (activation tries again).
    server: Option<Arc<FuseServer>>,
    /// The server has seen requests since it was built (a reset must rebuild it: the Vfs
    /// accepts one INIT per life and holds the guest's open files).
    server_used: bool,
    config: [u8; CONFIG_SPACE_LEN],
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    queue_events: Vec<EventFd>,
    activate_evt: EventFd,
    /// The queues: `None` for a request queue handed to a worker thread.
    active: Option<Active<Vec<Option<Queue>>>>,
    /// Set by the event loop or a worker when a queue breaks; cleared by reset.
    failed: Arc<AtomicBool>,
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
    /// The worker threads that run, as they list themselves.
    running_workers: FsWorkers,
}

impl Fs {
    /// An in-process device for `config` (which must have a `shared_dir`). The directory is
    /// opened now.
    pub fn new(config: &FsConfig) -> Result<Fs, FsError> {
        let Some(dir) = config
            .shared_dir
            .as_ref()
            .filter(|_| config.socket.is_none())
        else {
            return Err(FsError::NoSharedDir(config.tag.clone()));
        };
        check_geometry(&config.tag, config.num_queues, config.queue_size)?;
        let opts = ShareOptions {
            root: dir.clone(),
            read_only: config.read_only,
            cache: config.cache,
            xattr: config.xattr,
            max_open_handles: config.max_open_handles,
            allow_setid: config.allow_setid,
            allow_devices: config.allow_devices,
        };
        warn_if_above_fd_limit(&config.tag, config.max_open_handles);
        let server = server::build(&opts)?;
        let nq = 1 + usize::from(config.num_queues);
        Ok(Fs {
            tag: config.tag.clone(),
            opts,
            server: Some(Arc::new(server)),
            server_used: false,
            config: config_space(&config.tag, config.num_queues),
            avail_features: VIRTIO_F_VERSION_1
                | VIRTIO_RING_F_EVENT_IDX
                | VIRTIO_RING_F_INDIRECT_DESC,
            acked_features: 0,
            queue_sizes: vec![config.queue_size; nq],
            queue_events: (0..nq).map(|_| new_eventfd()).collect::<Result<_, _>>()?,
            activate_evt: new_eventfd()?,
            active: None,
            failed: Arc::new(AtomicBool::new(false)),
            metrics: Arc::new(Mutex::new(FsMetrics::default())),
            worker_threads: config.worker_threads,
            worker_name_prefix: "kestrel-fs".to_string(),
            worker_start_hook: None,
            panic_hook: None,
            inject_worker_panic: Arc::new(AtomicBool::new(false)),
            workers: (0..nq).map(|_| None).collect(),
            running_workers: FsWorkers::default(),
        })
    }

    /// The mount tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// How log lines name the device.
    fn log_name(&self) -> DeviceName<'_> {
        DeviceName::new("virtio-fs", &self.tag)
    }

    /// The shared directory.
    pub fn shared_dir(&self) -> &std::path::Path {
        &self.opts.root
    }

    /// Whether the share refuses changes.
    pub fn is_read_only(&self) -> bool {
        self.opts.read_only
    }

    /// A snapshot of the device's counters.
    pub fn metrics(&self) -> FsMetrics {
        *lock_metrics(&self.metrics)
    }

    /// Whether request queues are served on worker threads.
    pub fn uses_worker_threads(&self) -> bool {
        self.worker_threads
    }

    /// The `EventFd` the event loop watches for activation (registered in `init`).
    pub fn activate_event(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Handle everything on queue `index` now (0 is the high-priority queue). The event loop
    /// calls this on a queue notification; it is public for tests and the fuzz target. A queue
    /// served by a worker thread is handed to it instead.
    pub fn process_queue(&mut self, index: usize) {
        if self.failed.load(Ordering::SeqCst) {
            return;
        }
        if let Some(w) = self.workers.get(index).and_then(Option::as_ref) {
            w.wake();
            return;
        }
        let (Some(active), Some(server)) = (self.active.as_mut(), self.server.as_ref()) else {
            return;
        };
        let Some(Some(queue)) = active.queues.get_mut(index) else {
            return;
        };
        let mem = active.mem.memory();
        let mut m = FsMetrics::default();
        let r = drain_queue(
            queue,
            &mem,
            server,
            &active.interrupt,
            &mut m,
            index == HIPRIO_QUEUE,
            BATCH_LIMIT,
        );
        self.server_used |= m.requests + m.hiprio_requests > 0;
        lock_metrics(&self.metrics).add(&m);
        report_panics(&m, self.panic_hook.as_ref());
        match r {
            Ok(false) => {}
            Ok(true) => {
                // Come back through the event loop, after other devices had their turn.
                if let Err(e) = self.queue_events[index].write(1) {
                    tracing::warn!("virtio-fs {}: cannot re-arm queue {index}: {e}", self.tag);
                }
            }
            Err(why) => {
                tracing::warn!(
                    "virtio-fs {}: queue {index} failed, device needs a reset: {why}",
                    self.tag
                );
                self.failed.store(true, Ordering::SeqCst);
                active.interrupt.signal_config_change();
            }
        }
    }

    /// Start the worker threads (on the event loop, after activation).
    fn start_workers(&mut self) {
        if !self.worker_threads || self.failed.load(Ordering::SeqCst) {
            return;
        }
        let (Some(active), Some(server)) = (self.active.as_mut(), self.server.as_ref()) else {
            return;
        };
        for (i, slot) in active.queues.iter_mut().enumerate().skip(1) {
            if self.workers[i].is_some() {
                continue;
            }
            let Some(queue) = slot.take() else {
                continue;
            };
            let name = format!("{}-q{i}", self.worker_name_prefix);
            let ctx = worker::WorkerContext {
                tag: self.tag.clone(),
                index: i,
                queue,
                mem: active.mem.clone(),
                interrupt: active.interrupt.clone(),
                server: server.clone(),
                metrics: self.metrics.clone(),
                failed: self.failed.clone(),
                start_hook: self.worker_start_hook.clone(),
                panic_hook: self.panic_hook.clone(),
                inject_panic: self.inject_worker_panic.clone(),
            };
            match worker::Worker::spawn(name, ctx, self.running_workers.clone()) {
                Ok(w) => {
                    self.server_used = true;
                    // Chains that arrived before the thread existed.
                    w.wake();
                    self.workers[i] = Some(w);
                }
                Err((e, queue)) => {
                    tracing::warn!(
                        "virtio-fs {}: no worker thread for queue {i} ({e}); serving it on \
                         the event loop",
                        self.tag
                    );
                    *slot = queue;
                }
            }
        }
    }

    /// Stop and join the worker threads: after this, none of them touches guest memory.
    fn stop_workers(&mut self) {
        for w in self.workers.iter_mut() {
            if let Some(w) = w.take() {
                w.stop();
            }
        }
    }

    /// Thread ids of the worker threads the device started (0 for one that has not run yet;
    /// one that ended stays until the device joins it at reset or drop).
    pub fn worker_tids(&self) -> Vec<i32> {
        self.workers.iter().flatten().map(|w| w.tid()).collect()
    }

    /// The device's running worker threads, as a handle that stays valid for the device's life
    /// and is read without the device's lock (the VMM lists them in `Vm::threads` for cgroup
    /// placement, and stops them when the VM stops).
    pub fn worker_threads(&self) -> FsWorkers {
        self.running_workers.clone()
    }

    /// Name prefix of the worker threads (default `kestrel-fs`; threads are named
    /// `<prefix>-q<N>`, and Linux keeps 15 bytes of it: [`crate::os_thread_name`]).
    pub fn set_worker_name_prefix(&mut self, prefix: &str) {
        self.worker_name_prefix = prefix.to_string();
    }

    /// What each worker thread runs first, on itself (the VMM installs the worker's seccomp
    /// filter with it). When it fails the worker does no work and the device needs a reset.
    pub fn set_worker_start_hook(&mut self, hook: Option<crate::ThreadStartHook>) {
        self.worker_start_hook = hook;
    }

    /// What the device calls each time it contains a panic (the VMM counts device panics
    /// with it). Set before the device is activated.
    pub fn set_panic_hook(&mut self, hook: Option<crate::DevicePanicHook>) {
        self.panic_hook = hook;
    }

    /// Test-only fault injection: the next pass of one of this device's worker threads panics
    /// (once; a worker started later takes it if none runs yet), to prove a worker's panic is
    /// contained: the device needs a reset, the panic is counted, the VM runs on. `false` (and
    /// nothing armed) when the device serves its queues without workers.
    #[doc(hidden)]
    pub fn inject_worker_panic(&self) -> bool {
        if !self.worker_threads {
            return false;
        }
        self.inject_worker_panic.store(true, Ordering::SeqCst);
        for w in self.workers.iter().flatten() {
            w.wake();
        }
        true
    }

    /// Handle every queue (after activation: notifications may have arrived before it).
    pub fn process_all(&mut self) {
        for i in 0..self.queue_sizes.len() {
            self.process_queue(i);
        }
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The config space is read-only.
        ignore_config_write(self.log_name(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        check_queue_count(&queues, self.queue_sizes.len())?;
        if self.server.is_none() {
            // The rebuild at the last reset failed (the directory went away?): try again.
            let s = server::build(&self.opts).map_err(|e| ActivateError::Backend(e.to_string()))?;
            self.server = Some(Arc::new(s));
            self.server_used = false;
        }
        wake_event_loop(&self.activate_evt)?;
        let queues = queues.into_iter().map(Some).collect();
        self.active = Some(Active::new(mem, interrupt, queues));
        self.failed.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn reset(&mut self) {
        // Workers first: once they are joined nothing touches the driver's memory.
        self.stop_workers();
        self.active = None;
        self.failed.store(false, Ordering::SeqCst);
        self.acked_features = 0;
        if self.server_used {
            // A fresh server: the next INIT starts a new FUSE session; the guest's open files
            // and inode references of the old session are closed.
            self.server = match server::build(&self.opts) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    tracing::warn!(
                        "virtio-fs {}: cannot rebuild the FUSE server: {e}",
                        self.tag
                    );
                    None
                }
            };
            self.server_used = false;
        }
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn needs_reset(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        let activate = Events::with_data(&self.activate_evt, ACTIVATE_EVENT, EventSet::IN);
        let queues = numbered_events(&self.queue_events, QUEUE_EVENT_BASE);
        let events = std::iter::once(activate).chain(queues);
        watch_events(ops, events, self.log_name());
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        let (evt, queue, what) = match data {
            ACTIVATE_EVENT => (&self.activate_evt, None, "activation"),
            d => match self.queue_events.get((d - QUEUE_EVENT_BASE) as usize) {
                Some(e) => (e, Some((d - QUEUE_EVENT_BASE) as usize), "queue"),
                None => {
                    tracing::warn!("virtio-fs {}: unexpected event {d}", self.tag);
                    return;
                }
            },
        };
        warn_unexpected_set(&events, self.log_name());
        drain_eventfd(evt, self.log_name(), what);
        // Notifications before activation (or after a failure) are ignored.
        match queue {
            Some(i) => self.process_queue(i),
            None => {
                self.start_workers();
                self.process_all();
            }
        }
    }
}

#[cfg(test)]
mod tests;
