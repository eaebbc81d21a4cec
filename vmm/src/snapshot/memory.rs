//! The guest memory file: every region's bytes, one region after the other, as
//! [`MemoryRange`]s say. A restore maps it `MAP_PRIVATE` (clones share the pages they do not
//! write), so each range starts at a page-aligned offset.

use std::fs::File;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::SnapshotError;

/// One guest memory region in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRange {
    /// Guest-physical address of the region.
    pub guest_addr: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Where its bytes start in the memory file.
    pub file_offset: u64,
}

/// Write every region of `mem` to a new file at `path` (replacing one that exists) and sync
/// it. Returns where each region went. Regions are multiples of the page size, so every
/// offset stays page-aligned. Pages that are all zero are not written: the file is sparse
/// (holes read back as zeros, so a `MAP_PRIVATE` mapping of it is the same memory), which
/// makes a snapshot of a guest that touched little of its RAM small and fast to write.
///
/// # Errors
/// [`SnapshotError::MemoryFile`] naming the file; [`SnapshotError::GuestMemory`] naming the
/// region that could not be copied.
pub fn write_memory_file(
    path: &Path,
    mem: &GuestMemoryMmap,
) -> Result<Vec<MemoryRange>, SnapshotError> {
    let file_err = |source| SnapshotError::MemoryFile {
        path: path.to_path_buf(),
        source,
    };
    let file = File::create(path).map_err(file_err)?;
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    let mut chunk = vec![0u8; CHUNK];
    for region in mem.iter() {
        let guest_addr = region.start_addr();
        let size = region.len();
        let mut done = 0u64;
        while done < size {
            // At most CHUNK bytes: fits usize.
            let n = usize::try_from((size - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let at = GuestAddress(guest_addr.0 + done);
            mem.read_slice(&mut chunk[..n], at)
                .map_err(|source| SnapshotError::GuestMemory {
                    path: path.to_path_buf(),
                    addr: at.0,
                    source,
                })?;
            write_nonzero_pages(&file, &chunk[..n], offset + done).map_err(file_err)?;
            done += n as u64;
        }
        ranges.push(MemoryRange {
            guest_addr: guest_addr.0,
            size,
            file_offset: offset,
        });
        offset = offset.saturating_add(size);
    }
    file.set_len(offset).map_err(file_err)?;
    file.sync_all().map_err(file_err)?;
    Ok(ranges)
}

/// Bytes of guest memory copied per step.
const CHUNK: usize = 1 << 20;

/// Write the pages of `buf` (at file offset `at`) that hold a non-zero byte, each run of them
/// with one write.
fn write_nonzero_pages(file: &File, buf: &[u8], at: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const PAGE_LEN: usize = 4096;
    let page = PAGE_LEN;
    let mut run: Option<usize> = None;
    for (i, p) in buf.chunks(page).enumerate() {
        let zero = p.iter().all(|b| *b == 0);
        match (zero, run) {
            (false, None) => run = Some(i * page),
            (true, Some(start)) => {
                file.write_all_at(&buf[start..i * page], at + start as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        file.write_all_at(&buf[start..], at + start as u64)?;
    }
    Ok(())
}

/// Page size the memory file's offsets are aligned to.
const PAGE: u64 = 4096;

/// Map the memory file at `path` as guest memory regions laid out as `ranges` say, each
/// `MAP_PRIVATE` (copy-on-write: the file never changes, and every mapping of it shares the
/// pages it does not write) and `MAP_NORESERVE`. The file must be exactly as long as the
/// ranges need.
///
/// # Errors
/// [`SnapshotError::MemoryFile`] if the file cannot be opened or mapped;
/// [`SnapshotError::MemoryFileSize`] if its size is not the one `ranges` need;
/// [`SnapshotError::MemoryLayout`] for a range with an unaligned offset or size, or one that
/// overflows.
pub fn map_memory_file(
    path: &Path,
    ranges: &[MemoryRange],
) -> Result<Vec<GuestRegionMmap>, SnapshotError> {
    let file_err = |source| SnapshotError::MemoryFile {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(file_err)?;
    let found = file.metadata().map_err(file_err)?.len();
    let mut expected = 0u64;
    for r in ranges {
        let end = r.file_offset.checked_add(r.size);
        match end {
            Some(end)
                if r.file_offset.is_multiple_of(PAGE)
                    && r.size.is_multiple_of(PAGE)
                    && r.size > 0 =>
            {
                expected = expected.max(end);
            }
            _ => return Err(SnapshotError::MemoryLayout(*r)),
        }
    }
    if found != expected {
        return Err(SnapshotError::MemoryFileSize {
            path: path.to_path_buf(),
            expected,
            found,
        });
    }
    ranges.iter().map(|r| map_range(path, &file, r)).collect()
}

/// One range of the memory file, mapped private.
fn map_range(path: &Path, file: &File, r: &MemoryRange) -> Result<GuestRegionMmap, SnapshotError> {
    let map_err = |what: String| SnapshotError::MemoryFile {
        path: path.to_path_buf(),
        source: std::io::Error::other(what),
    };
    let len = usize::try_from(r.size).map_err(|_| SnapshotError::MemoryLayout(*r))?;
    let dup = file
        .try_clone()
        .map_err(|e| map_err(format!("duplicating the fd: {e}")))?;
    let mapping = MmapRegionBuilder::new(len)
        .with_file_offset(FileOffset::new(dup, r.file_offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| map_err(format!("mapping {:#x}+{:#x}: {e}", r.file_offset, r.size)))?;
    GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or(SnapshotError::MemoryLayout(*r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn every_region_is_written_in_order() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x2000),
            (GuestAddress(0x10_0000), 0x1000),
        ])
        .expect("memory");
        mem.write_obj(0xabu8, GuestAddress(0x1fff)).expect("write");
        mem.write_obj(0xcdu8, GuestAddress(0x10_0000))
            .expect("write");
        let path = std::env::temp_dir().join(format!("kestrel-mem-{}", std::process::id()));
        let ranges = write_memory_file(&path, &mem).expect("memory file");
        assert_eq!(
            ranges,
            [
                MemoryRange {
                    guest_addr: 0,
                    size: 0x2000,
                    file_offset: 0
                },
                MemoryRange {
                    guest_addr: 0x10_0000,
                    size: 0x1000,
                    file_offset: 0x2000
                }
            ]
        );
        // The all-zero first page is a hole: two of the three pages are allocated.
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&path).expect("stat").blocks() * 512;
        assert!(allocated < 0x3000, "sparse: {allocated} bytes allocated");
        let bytes = std::fs::read(&path).expect("read back");
        std::fs::remove_file(&path).expect("clean up");
        assert_eq!(bytes.len(), 0x3000);
        assert_eq!(
            (bytes[0x1fff], bytes[0x2000], bytes[0x2001]),
            (0xab, 0xcd, 0)
        );
    }
}
