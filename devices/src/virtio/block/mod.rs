//! virtio-blk (device id 2) over a raw image file or host block device.
//!
//! One request queue of [`QUEUE_SIZE`] entries. Offered features: `VERSION_1`, `FLUSH`,
//! `SEG_MAX`, `BLK_SIZE` (512), `RING_EVENT_IDX`, `RO` for read-only drives, and for writable
//! drives `DISCARD` + `WRITE_ZEROES` when the image can punch holes (probed on open; block
//! devices and empty slots always offer them, see [`io::DiskFile`]). Writes go to the file with
//! `pwrite` before the request completes; `FLUSH` is `fdatasync`.
//!
//! Hot-swap: a drive can start as an empty slot (no file, capacity 0) and get, lose or change its
//! file later with [`Block::swap_backing`]; the device bumps its
//! [`VirtioDevice::config_generation`] and, when the driver is running, raises a config-change
//! interrupt so the guest re-reads the capacity. The negotiated features stay those of the slot.
//!
//! Split of work: [`VirtioDevice`] (transport side, vCPU threads: features, config space,
//! activation) and [`MutEventSubscriber`] (event-loop side: queue processing). Request parsing is
//! in [`request`] and the file backend in [`io`].
//!
//! Rate limiting: an optional [`RateLimiter`] (`drives[].rate_limiter`) is paid before each
//! request — one operation, plus the data bytes of reads and writes. A refused request goes back
//! to the available ring (`go_to_previous_position`) with guest notifications left off, and the
//! queue resumes when the limiter's timerfd fires on the event loop; nothing polls.
//! [`Block::update_rate_limiter`] changes the buckets at run time.
//!
//! Guest errors: a malformed request completes with `VIRTIO_BLK_S_IOERR` (or `UNSUPP`) when it
//! has a usable status byte, and with a used length of 0 when it has not (counted in
//! [`BlockMetrics::malformed_chains`]). Errors of the ring itself (an available index more than a
//! queue ahead, a head index beyond the queue, ring memory that cannot be accessed) put the
//! device in the `needs_reset` state: the queue is left alone until the driver resets the device.

pub mod io;
pub mod request;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kestrel_api::RateLimiterConfig;
use thiserror::Error;
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use self::io::DiskFile;
use self::request::{ParsedChain, Request, SectorRange};
use crate::rate_limiter::RateLimiter;

use super::{
    drain_eventfd, ignore_config_write, new_eventfd, notify_used, serve_queue, take_queues,
    wake_event_loop, warn_unexpected_set, watch_events, ActivateError, Active, DeviceName,
    EventFdError, GuestMem, Served, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The virtio-blk sector size.
pub const SECTOR_SIZE: u64 = 512;
const SECTOR_SHIFT: u32 = 9;
/// Length of the GET_ID serial.
pub const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// `seg_max`: a chain holds a header and a status besides its data buffers.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest discard, in sectors (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Largest write-zeroes, in sectors (32 MiB; may be written out as zeros on the event loop).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 16;
/// `discard_sector_alignment`, in sectors (4 KiB, the usual file-system block).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// Most chains handled per event before yielding the event loop to other work.
const BATCH_LIMIT: usize = 4 * QUEUE_SIZE as usize;

/// Length of the config space Kestrel exposes: up to `write_zeroes_may_unmap` and its padding.
pub const CONFIG_SPACE_LEN: usize =
    std::mem::offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// `Block::new` takes a drive as configured (`drives[]` in the VM config).
pub type BlockConfig = kestrel_api::DriveConfig;

const QUEUE_EVENT: u32 = 0;
const ACTIVATE_EVENT: u32 = 1;
const LIMITER_EVENT: u32 = 2;

/// Errors creating a block device or swapping its backing file.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The image could not be opened (or inspected).
    #[error("cannot open disk image {}: {source}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{} is neither a regular file nor a block device", .0.display())]
    NotADisk(PathBuf),
    /// The size of the image could not be determined.
    #[error("cannot get the size of {}: {source}", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The serial is longer than 20 bytes or not printable ASCII.
    #[error("serial {0:?} must be at most {SERIAL_LEN} bytes of printable ASCII")]
    InvalidSerial(String),
    /// The current image could not be flushed before it was swapped out or detached; it stays
    /// attached.
    #[error("cannot flush disk image {} before replacing it: {source}", path.display())]
    Flush {
        /// The image.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::DiskError,
    },
    /// An `EventFd` could not be created.
    #[error(transparent)]
    EventFd(#[from] EventFdError),
    /// The rate limiter's timer could not be created.
    #[error("cannot create a rate limiter: {0}")]
    RateLimiter(#[source] std::io::Error),
}

/// Counters of one block device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockMetrics {
    /// Chains taken from the queue.
    pub requests: u64,
    /// Successful reads.
    pub read_ops: u64,
    /// Successful writes.
    pub write_ops: u64,
    /// Successful flushes.
    pub flush_ops: u64,
    /// Successful discards.
    pub discard_ops: u64,
    /// Successful write-zeroes.
    pub write_zeroes_ops: u64,
    /// Successful GET_ID requests.
    pub get_id_ops: u64,
    /// Bytes read from the image into the guest.
    pub read_bytes: u64,
    /// Bytes written from the guest to the image.
    pub write_bytes: u64,
    /// Requests completed with `VIRTIO_BLK_S_IOERR` (malformed, out of range, read-only,
    /// backend I/O errors).
    pub io_errors: u64,
    /// Requests completed with `VIRTIO_BLK_S_UNSUPP`.
    pub unsupported: u64,
    /// Chains without a usable status byte, returned with used length 0.
    pub malformed_chains: u64,
    /// Ring-level errors that put the device into `needs_reset`.
    pub queue_errors: u64,
    /// Used-ring interrupts raised.
    pub interrupts: u64,
    /// Config-change interrupts raised (backing swapped, device failed).
    pub config_changes: u64,
    /// Times the rate limiter made a request wait.
    pub rate_limited: u64,
    /// Images flushed (`fdatasync`) before being swapped out or detached.
    pub backing_flushes: u64,
}

/// The device state the request handler works on (separate from the queue).
struct Backend {
    disk: Option<DiskFile>,
    /// Writes are refused (the slot is read-only, or its current file was opened read-only).
    read_only: bool,
    serial: [u8; SERIAL_LEN],
    acked_features: u64,
    metrics: BlockMetrics,
}

/// A virtio-blk device.
pub struct Block {
    drive_id: String,
    backend: Backend,
    /// The slot was configured read-only (`VIRTIO_BLK_F_RO` offered).
    slot_read_only: bool,
    avail_features: u64,
    may_unmap: bool,
    queue_sizes: [u16; 1],
    queue_events: [EventFd; 1],
    activate_evt: EventFd,
    active: Option<Active<[Queue; 1]>>,
    failed: bool,
    config_generation: u32,
    limiter: RateLimiter,
}

fn open_backing(path: Option<&Path>, read_only: bool) -> Result<Option<DiskFile>, BlockError> {
    match path {
        Some(p) if !p.as_os_str().is_empty() => Ok(Some(DiskFile::open(p, read_only)?)),
        _ => Ok(None),
    }
}

fn serial_bytes(s: &str) -> Option<[u8; SERIAL_LEN]> {
    if s.len() > SERIAL_LEN || !s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return None;
    }
    let mut out = [0u8; SERIAL_LEN];
    out[..s.len()].copy_from_slice(s.as_bytes());
    Some(out)
}

impl Block {
    /// A block device for `config`: its file opened (read-only if `is_read_only`), or an empty
    /// slot (capacity 0) when `path_on_host` is absent or empty. The GET_ID serial is
    /// `serial`, or else the first 20 bytes of `drive_id`.
    pub fn new(config: &BlockConfig) -> Result<Block, BlockError> {
        let read_only = config.is_read_only;
        let disk = open_backing(config.path_on_host.as_deref(), read_only)?;
        let serial = match &config.serial {
            Some(s) => serial_bytes(s).ok_or_else(|| BlockError::InvalidSerial(s.clone()))?,
            None => {
                let mut out = [0u8; SERIAL_LEN];
                let id = config.drive_id.as_bytes();
                let n = id.len().min(SERIAL_LEN);
                out[..n].copy_from_slice(&id[..n]);
                out
            }
        };
        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        // Discard and write-zeroes when holes can be punched; an empty slot does not know its
        // future file and offers them (a discard may be a no-op, zeros can be written out).
        let can_unmap = disk.as_ref().is_none_or(DiskFile::supports_punch_hole);
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        } else if can_unmap {
            avail_features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        Ok(Block {
            drive_id: config.drive_id.clone(),
            backend: Backend {
                disk,
                read_only,
                serial,
                acked_features: 0,
                metrics: BlockMetrics::default(),
            },
            slot_read_only: read_only,
            avail_features,
            may_unmap: can_unmap && !read_only,
            queue_sizes: [QUEUE_SIZE],
            queue_events: [new_eventfd()?],
            activate_evt: new_eventfd()?,
            active: None,
            failed: false,
            config_generation: 0,
            limiter: RateLimiter::new(&config.rate_limiter.unwrap_or_default())
                .map_err(BlockError::RateLimiter)?,
        })
    }

    /// The drive's id.
    pub fn drive_id(&self) -> &str {
        &self.drive_id
    }

    /// How log lines name the device.
    fn log_name(&self) -> DeviceName<'_> {
        DeviceName::new("block", &self.drive_id)
    }

    /// The current backing file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.backend.disk.as_ref().map(DiskFile::path)
    }

    /// Capacity in 512-byte sectors (0 for an empty slot).
    pub fn capacity(&self) -> u64 {
        self.backend.capacity()
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.backend.read_only
    }

    /// A snapshot of the device's counters.
    pub fn metrics(&self) -> BlockMetrics {
        BlockMetrics {
            rate_limited: self.limiter.throttled_events,
            ..self.backend.metrics
        }
    }

    /// Replace the rate limiter's buckets (a config without buckets removes the limits).
    /// Unchanged buckets keep their state; a waiting queue is retried at once.
    pub fn update_rate_limiter(&mut self, cfg: &RateLimiterConfig) {
        self.limiter.update(cfg);
    }

    /// The rate limiter (tests).
    #[cfg(test)]
    pub(crate) fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Replace the rate limiter (tests: a limiter on a fake clock).
    #[cfg(test)]
    pub(crate) fn set_rate_limiter(&mut self, limiter: RateLimiter) {
        self.limiter = limiter;
    }

    /// The limiter's timer fired (or, in tests, the fake clock moved on): resume the queue if
    /// it was waiting.
    pub fn on_rate_limiter_timer(&mut self) {
        if self.limiter.on_timer() {
            self.process_queue();
        }
    }

    /// Replace the backing file with `path` (or remove it: `None`, an empty slot), opened
    /// read-only when `read_only` or when the slot is read-only. On error the old file stays.
    /// The capacity changes, the device's [`VirtioDevice::config_generation`] moves on and, if the
    /// driver is running, a config-change interrupt tells the guest to re-read the capacity. The
    /// features stay those negotiated for the slot: a read-only file in a read-write slot fails
    /// writes with `VIRTIO_BLK_S_IOERR`.
    ///
    /// A writable current image is flushed (`fdatasync`) before it is replaced or detached;
    /// when that fails the swap is refused with [`BlockError::Flush`] and the image stays (the
    /// image is flushed again when it is finally closed, see [`io::DiskFile`]'s `Drop`).
    pub fn swap_backing(&mut self, path: Option<&Path>, read_only: bool) -> Result<(), BlockError> {
        let read_only = read_only || self.slot_read_only;
        let disk = open_backing(path, read_only)?;
        if let Some(old) = self.backend.disk.as_mut().filter(|d| !d.read_only()) {
            old.flush().map_err(|source| BlockError::Flush {
                path: old.path().to_path_buf(),
                source,
            })?;
            self.backend.metrics.backing_flushes += 1;
        }
        tracing::info!(
            "block {}: backing {} -> {} ({} sectors{})",
            self.drive_id,
            self.path()
                .map_or("(empty)".into(), |p| p.display().to_string()),
            disk.as_ref()
                .map_or("(empty)".into(), |d| d.path().display().to_string()),
            disk.as_ref().map_or(0, DiskFile::sectors),
            if read_only { ", read-only" } else { "" }
        );
        self.backend.disk = disk;
        self.backend.read_only = read_only;
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Some(a) = &self.active {
            a.interrupt.signal_config_change();
            self.backend.metrics.config_changes += 1;
        }
        Ok(())
    }

    /// The `EventFd` the event loop watches for activation (registered in `init`).
    pub fn activate_event(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Handle everything on the queue now. The event loop calls this on a queue notification;
    /// it is public for tests and the fuzz target.
    pub fn process_queue(&mut self) {
        if self.failed || self.limiter.is_blocked() {
            // A waiting limiter resumes the queue from its timer.
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.memory();
        let m = &*mem;
        let [queue] = &mut active.queues;
        let backend = &mut self.backend;
        let limiter = &mut self.limiter;
        let pass = serve_queue(queue, m, BATCH_LIMIT, |chain| {
            let parsed = request::parse(chain);
            if !limiter.is_unlimited() && !limiter.consume(parsed.rate_cost()) {
                // Back to the ring; the limiter's timer resumes the queue. Notifications stay
                // off meanwhile: kicks would only wake the loop for nothing.
                return Served::Later;
            }
            Served::Used(backend.handle(m, parsed))
        });
        if pass.limit_reached {
            // Come back through the event loop, after other devices had their turn.
            if let Err(e) = self.queue_events[0].write(1) {
                tracing::warn!("block {}: cannot re-arm the queue: {e}", self.drive_id);
            }
        }
        if pass.used > 0 && notify_used(queue, m, &active.interrupt) {
            backend.metrics.interrupts += 1;
        }
        if let Some(why) = pass.ring_error {
            tracing::warn!(
                "block {}: malformed queue, device needs a reset: {why}",
                self.drive_id
            );
            self.failed = true;
            backend.metrics.queue_errors += 1;
            backend.metrics.config_changes += 1;
            active.interrupt.signal_config_change();
        }
    }
}

impl Backend {
    fn capacity(&self) -> u64 {
        self.disk.as_ref().map_or(0, DiskFile::sectors)
    }

    /// Execute a parsed chain and write its status. Returns the used length.
    fn handle<M: GuestMemory>(&mut self, mem: &M, parsed: ParsedChain) -> u32 {
        self.metrics.requests += 1;
        let Some(status_addr) = parsed.status else {
            if let Err(e) = &parsed.request {
                tracing::debug!("virtio-blk: chain {} dropped: {e}", parsed.head_index);
            }
            self.metrics.malformed_chains += 1;
            return 0;
        };
        let (status, written) = match parsed.request {
            Ok(req) => self.execute(mem, &req),
            Err(e) => {
                tracing::debug!("virtio-blk: chain {} refused: {e}", parsed.head_index);
                let s = if e.is_unsupported() {
                    VIRTIO_BLK_S_UNSUPP
                } else {
                    VIRTIO_BLK_S_IOERR
                };
                (s, 0)
            }
        };
        match status {
            VIRTIO_BLK_S_OK => {}
            VIRTIO_BLK_S_UNSUPP => self.metrics.unsupported += 1,
            _ => self.metrics.io_errors += 1,
        }
        // The status address was checked to be guest memory when parsing.
        if mem.write_obj(status as u8, status_addr).is_err() {
            self.metrics.malformed_chains += 1;
            return 0;
        }
        written.saturating_add(1)
    }

    /// Whether `sectors` starting at `sector` lie inside the disk.
    fn in_range(&self, sector: u64, bytes: u64) -> bool {
        sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(bytes))
            .is_some_and(|end| end <= self.capacity() << SECTOR_SHIFT)
    }

    /// Execute a request. Returns the status and the bytes written to device-writable data.
    fn execute<M: GuestMemory>(&mut self, mem: &M, req: &Request) -> (u32, u32) {
        match req {
            Request::In { sector, data } => {
                let total = req.data_len();
                if !self.in_range(*sector, total) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let Some(disk) = &self.disk else {
                    // Only a zero-length read reaches here on an empty slot.
                    return (VIRTIO_BLK_S_OK, 0);
                };
                let mut offset = sector << SECTOR_SHIFT;
                for s in data {
                    if let Err(e) = disk.read_to(mem, s.addr, s.len as usize, offset) {
                        tracing::warn!("virtio-blk: read at {offset} failed: {e}");
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    offset += u64::from(s.len);
                }
                self.metrics.read_ops += 1;
                self.metrics.read_bytes += total;
                // A chain holds less than 4 GiB (virtio-queue stops at 2^32 bytes).
                (VIRTIO_BLK_S_OK, u32::try_from(total).unwrap_or(u32::MAX))
            }
            Request::Out { sector, data } => {
                let total = req.data_len();
                if self.read_only || !self.in_range(*sector, total) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let Some(disk) = &self.disk else {
                    return (VIRTIO_BLK_S_OK, 0);
                };
                let mut offset = sector << SECTOR_SHIFT;
                for s in data {
                    if let Err(e) = disk.write_from(mem, s.addr, s.len as usize, offset) {
                        tracing::warn!("virtio-blk: write at {offset} failed: {e}");
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    offset += u64::from(s.len);
                }
                self.metrics.write_ops += 1;
                self.metrics.write_bytes += total;
                (VIRTIO_BLK_S_OK, 0)
            }
            Request::Flush => {
                if let Some(disk) = self.disk.as_mut() {
                    if !disk.read_only() {
                        if let Err(e) = disk.flush() {
                            tracing::warn!("virtio-blk: flush failed: {e}");
                            return (VIRTIO_BLK_S_IOERR, 0);
                        }
                    }
                }
                self.metrics.flush_ops += 1;
                (VIRTIO_BLK_S_OK, 0)
            }
            Request::GetId { data } => {
                let mut written = 0usize;
                for s in data {
                    let n = (s.len as usize).min(SERIAL_LEN - written);
                    if n == 0 {
                        break;
                    }
                    if mem
                        .write_slice(&self.serial[written..written + n], s.addr)
                        .is_err()
                    {
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    written += n;
                }
                self.metrics.get_id_ops += 1;
                // At most SERIAL_LEN.
                (VIRTIO_BLK_S_OK, written as u32)
            }
            Request::Discard(range) => self.discard_or_zero(range, false),
            Request::WriteZeroes(range) => self.discard_or_zero(range, true),
            Request::Unsupported(t) => {
                tracing::debug!("virtio-blk: unsupported request type {t}");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }

    fn discard_or_zero(&mut self, range: &SectorRange, zero: bool) -> (u32, u32) {
        let (feature, max) = if zero {
            (VIRTIO_BLK_F_WRITE_ZEROES, MAX_WRITE_ZEROES_SECTORS)
        } else {
            (VIRTIO_BLK_F_DISCARD, MAX_DISCARD_SECTORS)
        };
        // Not negotiated, or the unmap flag on a discard (virtio 1.2 §5.2.6.2): UNSUPP.
        if self.acked_features & (1 << feature) == 0 || (!zero && range.unmap) {
            return (VIRTIO_BLK_S_UNSUPP, 0);
        }
        let bytes = u64::from(range.num_sectors) << SECTOR_SHIFT;
        if self.read_only || range.num_sectors > max || !self.in_range(range.sector, bytes) {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let Some(disk) = self.disk.as_mut() else {
            return (VIRTIO_BLK_S_OK, 0);
        };
        let offset = range.sector << SECTOR_SHIFT;
        let r = if zero {
            disk.write_zeroes(offset, bytes, range.unmap)
        } else {
            disk.discard(offset, bytes)
        };
        match r {
            Ok(()) => {
                if zero {
                    self.metrics.write_zeroes_ops += 1;
                } else {
                    self.metrics.discard_ops += 1;
                }
                (VIRTIO_BLK_S_OK, 0)
            }
            Err(e) => {
                tracing::warn!("virtio-blk: discard/write-zeroes at {offset} failed: {e}");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
    }
}

impl Block {
    fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        use std::mem::offset_of;
        let mut c = [0u8; CONFIG_SPACE_LEN];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(
            offset_of!(virtio_blk_config, capacity),
            &self.capacity().to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &SEG_MAX.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &(SECTOR_SIZE as u32).to_le_bytes(),
        );
        if self.avail_features & (1 << VIRTIO_BLK_F_DISCARD) != 0 {
            put(
                offset_of!(virtio_blk_config, max_discard_sectors),
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, max_discard_seg),
                &1u32.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, discard_sector_alignment),
                &DISCARD_SECTOR_ALIGNMENT.to_le_bytes(),
            );
        }
        if self.avail_features & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0 {
            put(
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                &MAX_WRITE_ZEROES_SECTORS.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                &1u32.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, write_zeroes_may_unmap),
                &[u8::from(self.may_unmap)],
            );
        }
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.backend.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing is writable without VIRTIO_BLK_F_CONFIG_WCE.
        ignore_config_write(self.log_name(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let queues = take_queues(queues)?;
        wake_event_loop(&self.activate_evt)?;
        self.active = Some(Active::new(mem, interrupt, queues));
        self.failed = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.failed = false;
        self.backend.acked_features = 0;
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

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        let mut events = vec![
            Events::with_data(&self.queue_events[0], QUEUE_EVENT, EventSet::IN),
            Events::with_data(&self.activate_evt, ACTIVATE_EVENT, EventSet::IN),
        ];
        // Watched even without buckets: a run-time update may add some.
        if self.limiter.as_raw_fd() >= 0 {
            events.push(Events::with_data(
                &self.limiter,
                LIMITER_EVENT,
                EventSet::IN,
            ));
        }
        watch_events(ops, events, self.log_name());
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let (evt, what) = match events.data() {
            QUEUE_EVENT => (&self.queue_events[0], "queue"),
            ACTIVATE_EVENT => (&self.activate_evt, "activation"),
            LIMITER_EVENT => {
                self.on_rate_limiter_timer();
                return;
            }
            other => {
                tracing::warn!("block {}: unexpected event {other}", self.drive_id);
                return;
            }
        };
        warn_unexpected_set(&events, self.log_name());
        drain_eventfd(evt, self.log_name(), what);
        // Notifications before activation (or after a failure) are ignored.
        self.process_queue();
    }
}

#[cfg(test)]
mod tests;
