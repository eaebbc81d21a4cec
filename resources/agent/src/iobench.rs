//! `io_bench`: sequential or random O_DIRECT reads/writes on a file or block device, timed in
//! the guest — the disk benchmark without a process per I/O (see docs/agent-protocol.md).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Instant;

use kestrel_agent_proto::{
    AllocTouch, AllocTouchStats, IoBench, IoBenchStats, MetaBench, MetaBenchStats, XorShift,
};

use crate::ops::{len_u64, millis, nanos};
use crate::proto::{OpError, OpResult};

/// Page-aligned buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> OpResult<Self> {
        let mut p: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: posix_memalign writes a pointer to a fresh allocation into `p`.
        let r = unsafe { libc::posix_memalign(&mut p, 4096, len.max(1)) };
        if r != 0 || p.is_null() {
            return Err(OpError::os(
                "posix_memalign",
                io::Error::from_raw_os_error(r),
            ));
        }
        Ok(Aligned { ptr: p.cast(), len })
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from posix_memalign and is freed once.
        unsafe { libc::free(self.ptr.cast()) };
    }
}

/// Largest `io_bench` block.
const MAX_BLOCK: usize = 16 << 20;

/// The `io_bench` op.
pub fn io_bench(a: IoBench) -> OpResult<IoBenchStats> {
    let len = usize::try_from(a.block_size)
        .ok()
        .filter(|&l| l != 0 && l.is_multiple_of(512) && l <= MAX_BLOCK)
        .ok_or_else(|| {
            OpError::bad_request("block_size must be a multiple of 512, at most 16 MiB")
        })?;
    let f = OpenOptions::new()
        .read(true)
        .write(a.write)
        .custom_flags(libc::O_DIRECT)
        .open(&a.path)
        .map_err(|e| OpError::os(&a.path, e))?;
    // SAFETY: lseek on our own fd.
    let end = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
    let size = a.span.unwrap_or(u64::try_from(end).unwrap_or(0));
    let blocks = size / a.block_size;
    if blocks == 0 {
        return Err(OpError::bad_request("device smaller than one block"));
    }
    let buf = Aligned::new(len)?;
    // SAFETY: `buf` owns `len` bytes.
    let slice = unsafe { std::slice::from_raw_parts_mut(buf.ptr, buf.len) };
    XorShift::new(a.seed ^ 0x5eed).fill(slice);
    let mut rng = XorShift::new(a.seed);
    let t0 = Instant::now();
    for i in 0..a.count {
        let blk = if a.random {
            rng.next_u64() % blocks
        } else {
            i % blocks
        };
        // blk < size / block_size: no overflow; a `span` beyond off_t is refused.
        let off = libc::off_t::try_from(blk * a.block_size)
            .map_err(|_| OpError::bad_request("span reaches beyond the largest file offset"))?;
        // SAFETY: `slice` is a valid buffer of `len` bytes for the duration of the call.
        let n = unsafe {
            if a.write {
                libc::pwrite(f.as_raw_fd(), slice.as_ptr().cast(), len, off)
            } else {
                libc::pread(f.as_raw_fd(), slice.as_mut_ptr().cast(), len, off)
            }
        };
        if usize::try_from(n).ok() != Some(len) {
            return Err(OpError::os("I/O", io::Error::last_os_error()));
        }
    }
    let ns = nanos(t0);
    let bytes = a.count.saturating_mul(a.block_size);
    Ok(IoBenchStats {
        ops: a.count,
        bytes,
        duration_ns: ns,
        mb_per_s: per_second(bytes, ns) / 1e6,
        iops: per_second(a.count, ns),
    })
}

/// `n` per second, for `n` events in `ns` nanoseconds.
fn per_second(n: u64, ns: u64) -> f64 {
    n as f64 / (ns as f64 / 1e9)
}

/// `meta_bench`: `count` rounds of create + stat + unlink of a file in `dir`, timed in the guest.
pub fn meta_bench(a: MetaBench) -> OpResult<MetaBenchStats> {
    let t0 = Instant::now();
    for i in 0..a.count {
        let p = format!("{}/.kestrel-meta-{i}", a.dir);
        std::fs::File::create(&p).map_err(|e| OpError::os(&p, e))?;
        std::fs::metadata(&p).map_err(|e| OpError::os(&p, e))?;
        std::fs::remove_file(&p).map_err(|e| OpError::os(&p, e))?;
    }
    let ns = nanos(t0);
    Ok(MetaBenchStats {
        rounds: a.count,
        duration_ns: ns,
        rounds_per_s: per_second(a.count, ns),
    })
}

/// `alloc_touch`: map `mib` MiB of anonymous memory, write every page, check it, unmap.
pub fn alloc_touch(a: AllocTouch) -> OpResult<AllocTouchStats> {
    let len = usize::try_from(a.mib)
        .ok()
        .and_then(|m| m.checked_mul(1 << 20))
        .ok_or_else(|| OpError::bad_request(format!("alloc_touch: {} MiB is too many", a.mib)))?;
    let t0 = Instant::now();
    // SAFETY: anonymous private mapping; checked for MAP_FAILED below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            // Populate in one call: far fewer page-fault round trips than touching each page
            // (each fault is expensive when the guest kernel is emulated).
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(OpError::os("mmap", io::Error::last_os_error()));
    }
    let base = p.cast::<u8>();
    let mut sum = 0u64;
    // SAFETY: every offset is inside the `len`-byte mapping created above.
    unsafe {
        for off in (0..len).step_by(4096) {
            // The page number's low byte, never 0.
            base.add(off)
                .write_volatile((off >> 12).to_le_bytes()[0] | 1);
        }
        for off in (0..len).step_by(4096) {
            sum += u64::from(base.add(off).read_volatile());
        }
        libc::munmap(p, len);
    }
    Ok(AllocTouchStats {
        mib: a.mib,
        pages: len_u64(len / 4096),
        checksum: sum,
        duration_ms: millis(t0),
    })
}
