//! virtio-blk (device id 2) over a raw image file or host block device.
//!
//! One request queue of [`QUEUE_SIZE`] entries. Offered features: `VERSION_1`, `FLUSH` (not
//! with Firecracker's `cache_type: Unsafe`, [`BlockConfig::no_flush`]),
//! `SEG_MAX`, `BLK_SIZE` (512), `RING_EVENT_IDX`, `RO` for read-only drives, and for writable
//! drives `DISCARD` + `WRITE_ZEROES` when the image can punch holes (probed on open; block
//! devices and empty slots always offer them, see [`io::DiskFile`]). Writes go to the file with
//! `pwrite` before the request completes; `FLUSH` is `fdatasync`.
//!
//! Hot-swap: a drive can start as an empty slot (no file, capacity 0) and get, lose or change its
//! file later with [`Block::swap_backing`]; the device bumps its config generation and, when
//! the driver is running, raises a config-change interrupt so the guest re-reads the capacity.
//! The negotiated features stay those of the slot.
//!
//! Split of work: this module is the device ([`BlockDevice`]: features, config space; the
//! [`crate::virtio::device`] core does activation and reset), [`handler`] serves the queue on
//! the event loop. Request parsing is in [`request`] and the file backend in [`io`].
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

pub mod handler;
pub mod io;
pub mod request;

use std::path::{Path, PathBuf};

use kestrel_api::RateLimiterConfig;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use self::handler::Backend;
use self::io::DiskFile;
use crate::rate_limiter::{self, RateLimiter, RateLimiterState};

use super::device::{CoreSpec, DeviceModel, RestoreError, Virtio, VirtioCore, VirtioState};
use super::{EventFdError, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
const SECTOR_SHIFT: u32 = 9;
/// The virtio-blk sector size.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// `blk_size` in the config space: the sector size.
const BLK_SIZE: u32 = 1 << SECTOR_SHIFT;
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

/// Length of the config space Kestrel exposes: up to `write_zeroes_may_unmap` and its padding.
pub const CONFIG_SPACE_LEN: usize =
    std::mem::offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// What a block device is built from (from a `drives[]` entry of the VM config with
/// `TryFrom<&kestrel_api::DriveConfig>`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockConfig {
    /// The drive's id (names the device in logs and the API).
    pub drive_id: String,
    /// The image file or block device; `None` (or an empty path) for an empty slot.
    pub path: Option<PathBuf>,
    /// Writes are refused and `VIRTIO_BLK_F_RO` is offered.
    pub read_only: bool,
    /// The GET_ID serial (checked printable ASCII); `None`: the first 20 bytes of `drive_id`.
    pub serial: Option<[u8; SERIAL_LEN]>,
    /// Limits on requests and bytes (no buckets: unlimited).
    pub rate_limiter: RateLimiterConfig,
    /// Firecracker's `cache_type: Unsafe`: `VIRTIO_BLK_F_FLUSH` is not offered, so the guest
    /// never asks for a flush and the host page cache decides when data reaches the disk.
    /// `false` (`Writeback`, Kestrel's default): flush offered and honoured (`fdatasync`).
    pub no_flush: bool,
}

impl BlockConfig {
    /// A writable drive `drive_id` over `path` (`None`: an empty slot), no serial, no limits.
    pub fn new(drive_id: &str, path: Option<&Path>) -> Self {
        BlockConfig {
            drive_id: drive_id.to_string(),
            path: path.map(Path::to_path_buf),
            ..BlockConfig::default()
        }
    }

    /// The serial GET_ID answers with.
    fn serial_bytes(&self) -> [u8; SERIAL_LEN] {
        self.serial.unwrap_or_else(|| {
            let mut out = [0u8; SERIAL_LEN];
            let id = self.drive_id.as_bytes();
            let n = id.len().min(SERIAL_LEN);
            out[..n].copy_from_slice(&id[..n]);
            out
        })
    }
}

impl TryFrom<&kestrel_api::DriveConfig> for BlockConfig {
    type Error = BlockError;

    /// The drive's settings; [`BlockError::InvalidSerial`] for a `serial` that is not at most
    /// 20 bytes of printable ASCII.
    fn try_from(d: &kestrel_api::DriveConfig) -> Result<Self, BlockError> {
        let serial = match &d.serial {
            Some(s) => Some(serial_bytes(s).ok_or_else(|| BlockError::InvalidSerial(s.clone()))?),
            None => None,
        };
        Ok(BlockConfig {
            drive_id: d.drive_id.clone(),
            path: d.path_on_host.clone(),
            read_only: d.is_read_only,
            serial,
            rate_limiter: d.rate_limiter.unwrap_or_default(),
            no_flush: !d.offers_flush(),
        })
    }
}

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
    /// The `serial` field is longer than 20 bytes or not printable ASCII.
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
    /// A saved state does not fit the drive.
    #[error("cannot restore: {0}")]
    Restore(#[from] RestoreError),
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

/// The run-time state of a block device ([`Block::state`], [`Block::restore`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The virtio core.
    pub virtio: VirtioState,
    /// The drive's id.
    pub drive_id: String,
    /// The backing file at save time (it may have been swapped since creation): the config
    /// to restore with names it.
    pub path: Option<PathBuf>,
    /// The current file was opened read-only.
    pub read_only: bool,
    /// Capacity in sectors the guest knows; the restored file must have it.
    pub capacity: u64,
    /// The rate limiter's buckets (`None`: no limiter). Restored when the config to restore
    /// with has a limiter of the same shape; otherwise its buckets start full.
    #[serde(default)]
    pub limiter: Option<RateLimiterState>,
}

/// A virtio-blk device.
pub type Block = Virtio<BlockDevice>;

/// virtio-blk's own part of a [`Block`]: the slot's settings, the backing file and the rate
/// limiter.
pub struct BlockDevice {
    /// The slot was configured read-only (`VIRTIO_BLK_F_RO` offered).
    slot_read_only: bool,
    may_unmap: bool,
    backend: Backend,
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

/// The features a drive offers: discard and write-zeroes when holes can be punched (an empty
/// slot does not know its future file and offers them: a discard may be a no-op, zeros can be
/// written out), `RO` for a read-only drive, `FLUSH` unless `no_flush` (`cache_type: Unsafe`; a
/// flush the guest sends anyway is still honoured).
fn block_features(read_only: bool, can_unmap: bool, no_flush: bool) -> u64 {
    let mut features = VIRTIO_F_VERSION_1
        | VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE;
    if !no_flush {
        features |= 1 << VIRTIO_BLK_F_FLUSH;
    }
    if read_only {
        features |= 1 << VIRTIO_BLK_F_RO;
    } else if can_unmap {
        features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    }
    features
}

impl Block {
    /// A block device for `config`: its file opened (read-only if `read_only`), or an empty
    /// slot (capacity 0) when `path` is absent or empty.
    pub fn new(config: &BlockConfig) -> Result<Block, BlockError> {
        let read_only = config.read_only;
        let disk = open_backing(config.path.as_deref(), read_only)?;
        let can_unmap = disk.as_ref().is_none_or(DiskFile::supports_punch_hole);
        let core = VirtioCore::new(CoreSpec {
            kind: "block",
            id: &config.drive_id,
            device_type: VIRTIO_ID_BLOCK,
            avail_features: block_features(read_only, can_unmap, config.no_flush),
            queue_max_sizes: vec![QUEUE_SIZE],
        })?;
        let limiter = RateLimiter::new(&config.rate_limiter).map_err(BlockError::RateLimiter)?;
        let device = BlockDevice {
            slot_read_only: read_only,
            may_unmap: can_unmap && !read_only,
            backend: Backend::new(disk, read_only, config.serial_bytes()),
            limiter,
        };
        Ok(Virtio::from_parts(core, device))
    }

    /// A device for `config` (the drive as saved: [`BlockState::path`], or a replacement
    /// with the same capacity) with the run-time state `state`; the transport activates it
    /// again when it restores a running driver. The rate limiter's buckets come back when the
    /// config's limiter has the saved shape (else they start full, with a warning).
    pub fn restore(config: &BlockConfig, state: &BlockState) -> Result<Block, BlockError> {
        let mut block = Block::new(config)?;
        RestoreError::check("drive_id", state.drive_id.as_str(), block.drive_id())?;
        RestoreError::check("capacity", state.capacity, block.capacity())?;
        block.core.restore(&state.virtio)?;
        let name = block.core.name().to_string();
        rate_limiter::restore_or_warn(
            &mut block.device.limiter,
            state.limiter.as_ref(),
            name,
            "rate limiter",
        );
        Ok(block)
    }

    /// The run-time state to save.
    pub fn state(&self) -> BlockState {
        BlockState {
            virtio: self.core.state(),
            drive_id: self.drive_id().to_string(),
            path: self.path().map(Path::to_path_buf),
            read_only: self.is_read_only(),
            capacity: self.capacity(),
            limiter: rate_limiter::saved_state(&self.device.limiter),
        }
    }

    /// The drive's id.
    pub fn drive_id(&self) -> &str {
        self.core.id()
    }

    /// The current backing file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.device.backend.path()
    }

    /// Capacity in 512-byte sectors (0 for an empty slot).
    pub fn capacity(&self) -> u64 {
        self.device.backend.capacity()
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.device.backend.read_only
    }

    /// A snapshot of the device's counters.
    pub fn metrics(&self) -> BlockMetrics {
        BlockMetrics {
            rate_limited: self.device.limiter.throttled_events,
            ..self.device.backend.metrics
        }
    }

    /// Replace the rate limiter's buckets (a config without buckets removes the limits).
    /// Unchanged buckets keep their state; a waiting queue is retried at once.
    pub fn update_rate_limiter(&mut self, cfg: &RateLimiterConfig) {
        self.device.limiter.update(cfg);
    }

    /// The rate limiter (tests).
    #[cfg(test)]
    pub(crate) fn rate_limiter(&self) -> &RateLimiter {
        &self.device.limiter
    }

    /// Replace the rate limiter (tests: a limiter on a fake clock).
    #[cfg(test)]
    pub(crate) fn set_rate_limiter(&mut self, limiter: RateLimiter) {
        self.device.limiter = limiter;
    }

    /// The limiter's timer fired (or, in tests, the fake clock moved on): resume the queue if
    /// it was waiting.
    pub fn on_rate_limiter_timer(&mut self) {
        self.device.on_limiter_timer(&mut self.core);
    }

    /// Handle everything on the queue now. The event loop calls this on a queue notification;
    /// it is public for tests and the fuzz target.
    pub fn process_queue(&mut self) {
        self.device.process_queue(&mut self.core);
    }

    /// Replace the backing file with `path` (or remove it: `None`, an empty slot), opened
    /// read-only when `read_only` or when the slot is read-only. On error the old file stays.
    /// The capacity changes, the device's config generation moves on and, if the driver is
    /// running, a config-change interrupt tells the guest to re-read the capacity. The
    /// features stay those negotiated for the slot: a read-only file in a read-write slot fails
    /// writes with `VIRTIO_BLK_S_IOERR`.
    ///
    /// A writable current image is flushed (`fdatasync`) before it is replaced or detached;
    /// when that fails the swap is refused with [`BlockError::Flush`] and the image stays (the
    /// image is flushed again when it is finally closed, see [`io::DiskFile`]'s `Drop`).
    pub fn swap_backing(&mut self, path: Option<&Path>, read_only: bool) -> Result<(), BlockError> {
        let read_only = read_only || self.device.slot_read_only;
        let disk = open_backing(path, read_only)?;
        let backend = &mut self.device.backend;
        backend.flush_before_swap()?;
        tracing::info!(
            "{}: backing {} -> {} ({} sectors{})",
            self.core.name(),
            backend
                .path()
                .map_or("(empty)".into(), |p| p.display().to_string()),
            disk.as_ref()
                .map_or("(empty)".into(), |d| d.path().display().to_string()),
            disk.as_ref().map_or(0, DiskFile::sectors),
            if read_only { ", read-only" } else { "" }
        );
        backend.disk = disk;
        backend.read_only = read_only;
        self.core.bump_config_generation();
        if self.core.signal_config_change() {
            backend.metrics.config_changes += 1;
        }
        Ok(())
    }
}

/// Put `bytes` at `offset` of the config space `c`.
fn put(c: &mut [u8], offset: usize, bytes: &[u8]) {
    c[offset..offset + bytes.len()].copy_from_slice(bytes);
}

impl DeviceModel for BlockDevice {
    type ConfigSpace = [u8; CONFIG_SPACE_LEN];

    fn config_space(&self, core: &VirtioCore) -> [u8; CONFIG_SPACE_LEN] {
        use std::mem::offset_of;
        let mut c = [0u8; CONFIG_SPACE_LEN];
        let capacity = self.backend.capacity().to_le_bytes();
        put(&mut c, offset_of!(virtio_blk_config, capacity), &capacity);
        put(
            &mut c,
            offset_of!(virtio_blk_config, seg_max),
            &SEG_MAX.to_le_bytes(),
        );
        put(
            &mut c,
            offset_of!(virtio_blk_config, blk_size),
            &BLK_SIZE.to_le_bytes(),
        );
        let offered = |bit: u32| core.avail_features() & (1 << bit) != 0;
        if offered(VIRTIO_BLK_F_DISCARD) {
            let fields = [
                (
                    offset_of!(virtio_blk_config, max_discard_sectors),
                    MAX_DISCARD_SECTORS,
                ),
                (offset_of!(virtio_blk_config, max_discard_seg), 1),
                (
                    offset_of!(virtio_blk_config, discard_sector_alignment),
                    DISCARD_SECTOR_ALIGNMENT,
                ),
            ];
            for (off, v) in fields {
                put(&mut c, off, &v.to_le_bytes());
            }
        }
        if offered(VIRTIO_BLK_F_WRITE_ZEROES) {
            let fields = [
                (
                    offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                    MAX_WRITE_ZEROES_SECTORS,
                ),
                (offset_of!(virtio_blk_config, max_write_zeroes_seg), 1),
            ];
            for (off, v) in fields {
                put(&mut c, off, &v.to_le_bytes());
            }
            let unmap = [u8::from(self.may_unmap)];
            put(
                &mut c,
                offset_of!(virtio_blk_config, write_zeroes_may_unmap),
                &unmap,
            );
        }
        c
    }
}

#[cfg(test)]
mod tests;

/// The rate limiter's buckets in the saved state.
#[cfg(test)]
mod limiter_state_tests {
    use super::*;
    use crate::rate_limiter::test_util::bucket;

    /// An empty slot limited to 1000 bytes and 10 operations per 1000 s (nothing refills
    /// while the test runs).
    fn slot(bw: u64) -> BlockConfig {
        BlockConfig {
            drive_id: "disk0".into(),
            rate_limiter: RateLimiterConfig {
                bandwidth: Some(bucket(bw, None, 1_000_000)),
                ops: Some(bucket(10, None, 1_000_000)),
            },
            ..BlockConfig::default()
        }
    }

    #[test]
    fn drained_limiter_is_restored_drained_and_another_shape_starts_full() {
        let mut b = Block::new(&slot(1000)).unwrap();
        assert!(b.device.limiter.consume(1000));
        let state = b.state();
        let saved = state.limiter.unwrap();
        assert_eq!(saved.bandwidth.unwrap().budget, 0);
        assert_eq!(saved.ops.unwrap().budget, 9);
        let state: BlockState =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();

        let mut back = Block::restore(&slot(1000), &state).unwrap();
        assert_eq!(back.state().limiter, Some(saved));
        assert!(!back.device.limiter.consume(1), "still drained");

        let other = Block::restore(&slot(2000), &state).unwrap();
        assert_eq!(other.rate_limiter().bandwidth().unwrap().budget(), 2000);
        // A state without limiter (or from before limiters were saved) restores too.
        let mut json = serde_json::to_value(&state).unwrap();
        json.as_object_mut().unwrap().remove("limiter");
        let old: BlockState = serde_json::from_value(json).unwrap();
        assert_eq!(old.limiter, None);
        let full = Block::restore(&slot(1000), &old).unwrap();
        assert_eq!(full.rate_limiter().bandwidth().unwrap().budget(), 1000);
        let unlimited = BlockConfig {
            rate_limiter: RateLimiterConfig::default(),
            ..slot(1000)
        };
        assert_eq!(Block::new(&unlimited).unwrap().state().limiter, None);
    }
}
