//! The block device's backend: a raw image (a regular file or a host block device), read and
//! written with `pread`/`pwrite` straight between the file and guest memory, without a host
//! copy and without a cache of our own: a write request completes once `pwrite` returned, and a
//! flush is an `fdatasync`.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryError, ReadVolatile, VolatileMemoryError,
    VolatileSlice, WriteVolatile,
};

use super::{BlockError, SECTOR_SIZE};

/// Why an I/O on the backing file failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Moving data between the file and guest memory failed (the file returned an error or
    /// ended early, or the guest range is not memory).
    #[error("transfer between the image and guest memory failed: {0}")]
    Transfer(#[from] GuestMemoryError),
    /// A file operation (sync, fallocate, zero fill) failed.
    #[error("image I/O failed: {0}")]
    Io(#[from] io::Error),
}

/// An open disk image.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    is_block_device: bool,
    /// `fallocate(PUNCH_HOLE)` works (probed on open; cleared if it later reports EOPNOTSUPP).
    punch_hole: bool,
    /// `fallocate(ZERO_RANGE)` is worth trying (cleared on the first EOPNOTSUPP).
    zero_range: bool,
    /// `fdatasync` calls made (requests, swaps, drop).
    flushes: u64,
    /// Tests: make the next flushes fail with this error.
    #[cfg(test)]
    pub(crate) fail_flush: Option<io::ErrorKind>,
}

impl DiskFile {
    /// Open `path` (read-only or read-write). It must be a regular file or a block device.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let file_type = file
            .metadata()
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?
            .file_type();
        let is_block_device = file_type.is_block_device();
        if !file_type.is_file() && !is_block_device {
            return Err(BlockError::NotADisk(path.to_path_buf()));
        }
        // Works for both: a block device's metadata length is 0.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_path_buf(),
                source,
            })?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            tracing::warn!(
                "{}: size {size} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not \
                 visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let punch_hole = !read_only && (is_block_device || probe_punch_hole(&file, size));
        Ok(DiskFile {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
            is_block_device,
            punch_hole,
            zero_range: !read_only,
            flushes: 0,
            #[cfg(test)]
            fail_flush: None,
        })
    }

    /// Where the image lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes when opened.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Size in whole 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Opened without write access.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// A host block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// Holes can be punched (discard deallocates; write-zeroes with unmap may use it).
    pub fn supports_punch_hole(&self) -> bool {
        self.punch_hole
    }

    /// Fill `len` bytes of guest memory at `addr` from the image at byte `offset`.
    pub fn read_to<M: GuestMemory>(
        &self,
        mem: &M,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> Result<(), DiskError> {
        let mut src = FileAt {
            file: &self.file,
            offset,
        };
        mem.read_exact_volatile_from(addr, &mut src, len)?;
        Ok(())
    }

    /// Write `len` bytes of guest memory at `addr` to the image at byte `offset`.
    pub fn write_from<M: GuestMemory>(
        &self,
        mem: &M,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> Result<(), DiskError> {
        let mut dst = FileAt {
            file: &self.file,
            offset,
        };
        mem.write_all_volatile_to(addr, &mut dst, len)?;
        Ok(())
    }

    /// Make completed writes durable (`fdatasync`).
    pub fn flush(&mut self) -> Result<(), DiskError> {
        self.flushes += 1;
        #[cfg(test)]
        if let Some(kind) = self.fail_flush {
            return Err(io::Error::from(kind).into());
        }
        Ok(self.file.sync_data()?)
    }

    /// `fdatasync` calls made so far.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }

    /// Deallocate `[offset, offset + len)` if the file system can; otherwise do nothing (a
    /// discard only allows the device to forget the data, it does not require it).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        if !self.punch_hole || len == 0 {
            return Ok(());
        }
        match fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => {
                tracing::info!(
                    "{}: punching holes is not supported: {e}",
                    self.path.display()
                );
                self.punch_hole = false;
                Ok(())
            }
            r => Ok(r?),
        }
    }

    /// Make `[offset, offset + len)` read as zeros: punch a hole when `may_unmap`, else (or when
    /// that is not supported) `ZERO_RANGE`, else write zeros.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), DiskError> {
        if len == 0 {
            return Ok(());
        }
        if may_unmap && self.punch_hole {
            match fallocate(
                &self.file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => self.punch_hole = false,
                Err(e) => return Err(e.into()),
            }
        }
        if self.zero_range {
            match fallocate(
                &self.file,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => {
                    tracing::info!(
                        "{}: ZERO_RANGE not supported ({e}); writing zeros instead",
                        self.path.display()
                    );
                    self.zero_range = false;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.write_zeros(offset, len)
    }

    fn write_zeros(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        const CHUNK: usize = 64 * 1024;
        let zeros = vec![0u8; usize::try_from(len).map_or(CHUNK, |l| l.min(CHUNK))];
        let mut done = 0;
        while done < len {
            // At most CHUNK, the buffer's length.
            let n = usize::try_from(len - done).map_or(CHUNK, |l| l.min(CHUNK));
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl Drop for DiskFile {
    /// A writable image is flushed before its file is closed, so what the guest wrote is on
    /// stable storage however the drive goes away (VM dropped, slot emptied or swapped). An error
    /// can only be logged here; [`super::Block::swap_backing`] flushes first and reports it.
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        if let Err(e) = self.flush() {
            tracing::warn!("{}: flush before close failed: {e}", self.path.display());
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENOTTY)
    )
}

/// Probe hole punching without touching data: punch one byte at the end of the file, which a
/// file system that supports it accepts as a no-op.
fn probe_punch_hole(file: &File, size: u64) -> bool {
    match fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        size,
        1,
    ) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("punch-hole probe failed: {e}");
            false
        }
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: fallocate takes no pointers; it acts on the open descriptor `file` owns, which
        // stays open for the duration of the call.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A file at a position, for vm-memory's volatile I/O: `pread`/`pwrite` at `offset`, which
/// advances by what was transferred (the file's own position is never used).
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn off(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::from(ErrorKind::InvalidInput)))
    }
}

impl ReadVolatile for FileAt<'_> {
    /// Reads until `buf` is full or the file ends (a short count means end of file).
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        let base = guard.as_ptr();
        let len = buf.len();
        let mut done = 0usize;
        while done < len {
            let off = self.off()?;
            // SAFETY: `base..base + len` is the guest memory `buf` describes, valid for writes for
            // as long as `guard` lives; `done < len`, so `base + done` and the `len - done` bytes
            // after it stay inside it. The descriptor is owned by `self.file`, open for the call.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    base.add(done).cast::<libc::c_void>(),
                    len - done,
                    off,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                // Part of the buffer may have been written.
                buf.bitmap().mark_dirty(0, len);
                return Err(VolatileMemoryError::IOError(e));
            }
            if n == 0 {
                break;
            }
            // 0 < n <= len - done.
            let n = n.unsigned_abs();
            done += n;
            self.offset += n as u64;
        }
        buf.bitmap().mark_dirty(0, done);
        Ok(done)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard();
        let off = self.off()?;
        loop {
            // SAFETY: `guard.as_ptr()..+buf.len()` is the guest memory `buf` describes, valid for
            // reads while `guard` lives. The descriptor is owned by `self.file`.
            let n = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    guard.as_ptr().cast::<libc::c_void>(),
                    buf.len(),
                    off,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(VolatileMemoryError::IOError(e));
            }
            // 0 <= n <= buf.len().
            let n = n.unsigned_abs();
            self.offset += n as u64;
            return Ok(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestMemoryMmap};
    use vmm_sys_util::tempfile::TempFile;

    fn image(bytes: &[u8]) -> TempFile {
        let t = TempFile::new().unwrap();
        t.as_file().write_all(bytes).unwrap();
        t
    }

    #[test]
    fn read_write_cross_regions() {
        // Two regions with a buffer straddling their boundary.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let data: Vec<u8> = (0..2048u32).map(|i| i.to_le_bytes()[0]).collect();
        let t = image(&data);
        let disk = DiskFile::open(t.as_path(), false).unwrap();
        assert_eq!(disk.sectors(), 4);
        disk.read_to(&mem, GuestAddress(0xe00), 1024, 512).unwrap();
        let mut back = [0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(0xe00)).unwrap();
        assert_eq!(&back[..], &data[512..1536]);
        // Write it back one sector further.
        disk.write_from(&mem, GuestAddress(0xe00), 1024, 1024)
            .unwrap();
        let mut file = vec![0u8; 2048];
        t.as_file().read_exact_at(&mut file, 0).unwrap();
        assert_eq!(&file[1024..], &data[512..1536]);
        // Past the end of the file: an error, not a short success.
        assert!(disk.read_to(&mem, GuestAddress(0), 1024, 1536).is_err());
        // Outside guest memory.
        assert!(disk.read_to(&mem, GuestAddress(0x1f00), 512, 0).is_err());
    }

    #[test]
    fn write_zeroes_and_discard() {
        let t = image(&[0xaau8; 8192]);
        let mut disk = DiskFile::open(t.as_path(), false).unwrap();
        disk.write_zeroes(512, 1024, false).unwrap();
        disk.write_zeroes(4096, 512, true).unwrap();
        disk.discard(0, 512).unwrap();
        let mut file = vec![0u8; 8192];
        t.as_file().read_exact_at(&mut file, 0).unwrap();
        assert!(file[512..1536].iter().all(|&b| b == 0));
        assert!(file[4096..4608].iter().all(|&b| b == 0));
        assert!(file[1536..4096].iter().all(|&b| b == 0xaa));
        // Writing zeros by hand gives the same result.
        disk.write_zeros(6000, 100).unwrap();
        t.as_file().read_exact_at(&mut file, 0).unwrap();
        assert!(file[6000..6100].iter().all(|&b| b == 0));
        assert_eq!(file[6100], 0xaa);
        assert_eq!(t.as_file().metadata().unwrap().len(), 8192);
    }

    #[test]
    fn fallbacks_without_fallocate() {
        let t = image(&[0x55u8; 4096]);
        let mut disk = DiskFile::open(t.as_path(), false).unwrap();
        // As on a file system without PUNCH_HOLE / ZERO_RANGE.
        disk.punch_hole = false;
        disk.zero_range = false;
        disk.write_zeroes(1000, 2000, true).unwrap();
        // Discard is then a no-op: the data may stay.
        disk.discard(0, 512).unwrap();
        let mut file = vec![0u8; 4096];
        t.as_file().read_exact_at(&mut file, 0).unwrap();
        assert!(file[..1000].iter().all(|&b| b == 0x55));
        assert!(file[1000..3000].iter().all(|&b| b == 0));
        assert!(file[3000..].iter().all(|&b| b == 0x55));
        // Read-only: no fallocate probing, flush still works.
        let mut ro = DiskFile::open(t.as_path(), true).unwrap();
        assert!(!ro.supports_punch_hole() && !ro.is_block_device());
        ro.flush().unwrap();
        assert_eq!(ro.flushes(), 1);
        // A flush that fails when the image is closed is logged, never a panic.
        disk.fail_flush = Some(ErrorKind::Other);
        drop(disk);
    }

    #[test]
    fn open_errors() {
        assert!(matches!(
            DiskFile::open(Path::new("/nonexistent/disk.img"), true),
            Err(BlockError::Open { .. })
        ));
        assert!(matches!(
            DiskFile::open(Path::new("/tmp"), true),
            Err(BlockError::NotADisk(_))
        ));
        let t = image(&[0u8; 1000]);
        let disk = DiskFile::open(t.as_path(), true).unwrap();
        assert_eq!(disk.sectors(), 1);
        assert!(disk.read_only());
        assert!(!disk.supports_punch_hole());
    }
}
