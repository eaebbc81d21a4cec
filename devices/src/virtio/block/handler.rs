//! The block device's queue handler: serves the request queue on the event loop (through the
//! rate limiter) and runs each request against the backing file.

use std::os::fd::AsRawFd;
use std::path::Path;

use event_manager::{EventOps, EventSet};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemory};

use super::io::DiskFile;
use super::request::{self, ParsedChain, Request, SectorRange, Segment};
use super::{
    BlockDevice, BlockError, BlockMetrics, MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS,
    QUEUE_SIZE, SECTOR_SHIFT, SECTOR_SIZE, SERIAL_LEN,
};
use crate::virtio::common::{len_u32, watch_events};
use crate::virtio::device::{own_events, QueueHandler, Trigger, VirtioCore};
use crate::virtio::{notify_used, serve_queue, Served};

/// Most chains handled per event before yielding the event loop to other work.
pub(super) const BATCH_LIMIT: usize = 4 * QUEUE_SIZE as usize;
/// Token of the rate limiter's timer.
const LIMITER: u32 = 0;

/// The status byte of a completed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Status {
    /// `VIRTIO_BLK_S_OK`.
    Ok = 0,
    /// `VIRTIO_BLK_S_IOERR`.
    IoErr = 1,
    /// `VIRTIO_BLK_S_UNSUPP`.
    Unsupp = 2,
}

/// What a request did: its status and the bytes it wrote to device-writable data.
type Outcome = (Status, u32);

/// An error status with nothing written.
const fn fail(status: Status) -> Outcome {
    (status, 0)
}

/// The backing file and what requests need besides the queue.
pub(super) struct Backend {
    pub(super) disk: Option<DiskFile>,
    /// Writes are refused (the slot is read-only, or its current file was opened read-only).
    pub(super) read_only: bool,
    serial: [u8; SERIAL_LEN],
    pub(super) metrics: BlockMetrics,
}

impl Backend {
    pub(super) fn new(disk: Option<DiskFile>, read_only: bool, serial: [u8; SERIAL_LEN]) -> Self {
        Backend {
            disk,
            read_only,
            serial,
            metrics: BlockMetrics::default(),
        }
    }

    pub(super) fn path(&self) -> Option<&Path> {
        self.disk.as_ref().map(DiskFile::path)
    }

    pub(super) fn capacity(&self) -> u64 {
        self.disk.as_ref().map_or(0, DiskFile::sectors)
    }

    /// Flush a writable current image before it is swapped out or detached.
    pub(super) fn flush_before_swap(&mut self) -> Result<(), BlockError> {
        if let Some(old) = self.disk.as_mut().filter(|d| !d.read_only()) {
            old.flush().map_err(|source| BlockError::Flush {
                path: old.path().to_path_buf(),
                source,
            })?;
            self.metrics.backing_flushes += 1;
        }
        Ok(())
    }

    /// Execute a parsed chain and write its status. Returns the used length.
    fn handle<M: GuestMemory>(&mut self, mem: &M, parsed: ParsedChain, acked: u64) -> u32 {
        self.metrics.requests += 1;
        let Some(status_addr) = parsed.status else {
            if let Err(e) = &parsed.request {
                tracing::debug!("virtio-blk: chain {} dropped: {e}", parsed.head_index);
            }
            self.metrics.malformed_chains += 1;
            return 0;
        };
        let (status, written) = match parsed.request {
            Ok(req) => self.execute(mem, &req, acked),
            Err(e) => {
                tracing::debug!("virtio-blk: chain {} refused: {e}", parsed.head_index);
                fail(if e.is_unsupported() {
                    Status::Unsupp
                } else {
                    Status::IoErr
                })
            }
        };
        match status {
            Status::Ok => {}
            Status::Unsupp => self.metrics.unsupported += 1,
            Status::IoErr => self.metrics.io_errors += 1,
        }
        // The status address was checked to be guest memory when parsing.
        if mem.write_obj(status as u8, status_addr).is_err() {
            self.metrics.malformed_chains += 1;
            return 0;
        }
        written.saturating_add(1)
    }

    /// Whether `bytes` starting at `sector` lie inside the disk.
    fn in_range(&self, sector: u64, bytes: u64) -> bool {
        sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(bytes))
            .is_some_and(|end| end <= self.capacity() << SECTOR_SHIFT)
    }

    /// Execute a request.
    fn execute<M: GuestMemory>(&mut self, mem: &M, req: &Request, acked: u64) -> Outcome {
        match req {
            Request::In { sector, data } => {
                self.transfer(mem, *sector, data, req.data_len(), false)
            }
            Request::Out { sector, data } => {
                self.transfer(mem, *sector, data, req.data_len(), true)
            }
            Request::Flush => self.flush(),
            Request::GetId { data } => self.get_id(mem, data),
            Request::Discard(range) => self.discard_or_zero(range, false, acked),
            Request::WriteZeroes(range) => self.discard_or_zero(range, true, acked),
            Request::Unsupported(t) => {
                tracing::debug!("virtio-blk: unsupported request type {t}");
                fail(Status::Unsupp)
            }
        }
    }

    /// Move the data of a read (`write` false: disk to guest) or a write (guest to disk) of
    /// `total` bytes at `sector`.
    fn transfer<M: GuestMemory>(
        &mut self,
        mem: &M,
        sector: u64,
        data: &[Segment],
        total: u64,
        write: bool,
    ) -> Outcome {
        if (write && self.read_only) || !self.in_range(sector, total) {
            return fail(Status::IoErr);
        }
        let Some(disk) = &self.disk else {
            // Only a zero-length request reaches here on an empty slot.
            return (Status::Ok, 0);
        };
        let mut offset = sector << SECTOR_SHIFT;
        for s in data {
            let len = s.len as usize;
            let r = if write {
                disk.write_from(mem, s.addr, len, offset)
            } else {
                disk.read_to(mem, s.addr, len, offset)
            };
            if let Err(e) = r {
                let what = if write { "write" } else { "read" };
                tracing::warn!("virtio-blk: {what} at {offset} failed: {e}");
                return fail(Status::IoErr);
            }
            offset += u64::from(s.len);
        }
        if write {
            self.metrics.write_ops += 1;
            self.metrics.write_bytes += total;
            return (Status::Ok, 0);
        }
        self.metrics.read_ops += 1;
        self.metrics.read_bytes += total;
        // A chain holds less than 4 GiB (virtio-queue stops at 2^32 bytes).
        (Status::Ok, u32::try_from(total).unwrap_or(u32::MAX))
    }

    fn flush(&mut self) -> Outcome {
        if let Some(disk) = self.disk.as_mut().filter(|d| !d.read_only()) {
            if let Err(e) = disk.flush() {
                tracing::warn!("virtio-blk: flush failed: {e}");
                return fail(Status::IoErr);
            }
        }
        self.metrics.flush_ops += 1;
        (Status::Ok, 0)
    }

    fn get_id<M: GuestMemory>(&mut self, mem: &M, data: &[Segment]) -> Outcome {
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
                return fail(Status::IoErr);
            }
            written += n;
        }
        self.metrics.get_id_ops += 1;
        (Status::Ok, len_u32(written))
    }

    fn discard_or_zero(&mut self, range: &SectorRange, zero: bool, acked: u64) -> Outcome {
        let (feature, max) = if zero {
            (VIRTIO_BLK_F_WRITE_ZEROES, MAX_WRITE_ZEROES_SECTORS)
        } else {
            (VIRTIO_BLK_F_DISCARD, MAX_DISCARD_SECTORS)
        };
        // Not negotiated, or the unmap flag on a discard (virtio 1.2 §5.2.6.2): UNSUPP.
        if acked & (1 << feature) == 0 || (!zero && range.unmap) {
            return fail(Status::Unsupp);
        }
        let bytes = u64::from(range.num_sectors) << SECTOR_SHIFT;
        if self.read_only || range.num_sectors > max || !self.in_range(range.sector, bytes) {
            return fail(Status::IoErr);
        }
        let Some(disk) = self.disk.as_mut() else {
            return (Status::Ok, 0);
        };
        let offset = range.sector << SECTOR_SHIFT;
        let r = if zero {
            disk.write_zeroes(offset, bytes, range.unmap)
        } else {
            disk.discard(offset, bytes)
        };
        if let Err(e) = r {
            tracing::warn!("virtio-blk: discard/write-zeroes at {offset} failed: {e}");
            return fail(Status::IoErr);
        }
        if zero {
            self.metrics.write_zeroes_ops += 1;
        } else {
            self.metrics.discard_ops += 1;
        }
        (Status::Ok, 0)
    }
}

impl BlockDevice {
    /// Serve the queue (at most [`BATCH_LIMIT`] chains; the rest on the next pass). Nothing
    /// happens before activation, after a failure or while the rate limiter waits (its timer
    /// resumes the queue).
    pub(super) fn process_queue(&mut self, core: &mut VirtioCore) {
        if core.is_failed() || self.limiter.is_blocked() {
            return;
        }
        let acked = core.acked_features();
        let Some(active) = core.active_mut() else {
            return;
        };
        let mem = active.mem.memory();
        let m = &*mem;
        let Some(queue) = active.queues.first_mut() else {
            return;
        };
        let backend = &mut self.backend;
        let limiter = &mut self.limiter;
        let pass = serve_queue(queue, m, BATCH_LIMIT, |chain| {
            let parsed = request::parse(chain);
            if !limiter.is_unlimited() && !limiter.consume(parsed.rate_cost()) {
                // Back to the ring; the limiter's timer resumes the queue. Notifications stay
                // off meanwhile: kicks would only wake the loop for nothing.
                return Served::Later;
            }
            Served::Used(backend.handle(m, parsed, acked))
        });
        if pass.used > 0 && notify_used(queue, m, &active.interrupt) {
            backend.metrics.interrupts += 1;
        }
        drop(mem);
        if pass.limit_reached {
            core.rearm_queue(0);
        }
        if let Some(why) = pass.ring_error {
            self.backend.metrics.queue_errors += 1;
            if core.fail(&format!("malformed queue: {why}")) {
                self.backend.metrics.config_changes += 1;
            }
        }
    }

    pub(super) fn on_limiter_timer(&mut self, core: &mut VirtioCore) {
        if self.limiter.on_timer() {
            self.process_queue(core);
        }
    }
}

impl QueueHandler for BlockDevice {
    fn init(&mut self, core: &mut VirtioCore, ops: &mut EventOps) {
        // Watched even without buckets: a run-time update may add some.
        if self.limiter.as_raw_fd() >= 0 {
            let timer = own_events(&self.limiter, LIMITER, EventSet::IN);
            watch_events(ops, [timer], core.name());
        }
    }

    fn handle(&mut self, core: &mut VirtioCore, trigger: Trigger, _ops: &mut EventOps) {
        match trigger {
            // Notifications before activation (or after a failure) are ignored.
            Trigger::Wake | Trigger::Queue(_) => self.process_queue(core),
            Trigger::Own { token: LIMITER, .. } => self.on_limiter_timer(core),
            Trigger::Own { token, .. } => {
                tracing::warn!("{}: unexpected event {token}", core.name());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};

    #[test]
    fn status_bytes_are_virtio_blks() {
        assert_eq!(u32::from(Status::Ok as u8), VIRTIO_BLK_S_OK);
        assert_eq!(u32::from(Status::IoErr as u8), VIRTIO_BLK_S_IOERR);
        assert_eq!(u32::from(Status::Unsupp as u8), VIRTIO_BLK_S_UNSUPP);
    }
}
