//! `io_bench`: sequential or random O_DIRECT reads/writes on a file or block device, timed in
//! the guest — the disk benchmark without a process per I/O (see docs/agent-protocol.md).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Instant;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::proto::{OpError, OpResult};
use crate::stream::XorShift;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoBench {
    path: String,
    block_size: usize,
    count: u64,
    #[serde(default)]
    random: bool,
    #[serde(default)]
    write: bool,
    #[serde(default)]
    seed: u64,
    /// Bytes of the device to use (default: its size).
    #[serde(default)]
    span: Option<u64>,
}

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

pub fn io_bench(a: IoBench) -> OpResult<Value> {
    if a.block_size == 0 || !a.block_size.is_multiple_of(512) || a.block_size > (16 << 20) {
        return Err(OpError::new(
            "bad_request",
            "block_size must be a multiple of 512, at most 16 MiB",
        ));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(a.write)
        .custom_flags(libc::O_DIRECT)
        .open(&a.path)
        .map_err(|e| OpError::os(&a.path, e))?;
    // SAFETY: lseek on our own fd.
    let size = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
    let size = a.span.unwrap_or(size.max(0) as u64);
    let blocks = size / a.block_size as u64;
    if blocks == 0 {
        return Err(OpError::new("bad_request", "device smaller than one block"));
    }
    let buf = Aligned::new(a.block_size)?;
    // SAFETY: `buf` owns `len` bytes.
    let slice = unsafe { std::slice::from_raw_parts_mut(buf.ptr, buf.len) };
    XorShift::new(a.seed ^ 0x5eed).fill(slice);
    let mut rng = XorShift::new(a.seed);
    let mut pick = [0u8; 8];
    let t0 = Instant::now();
    for i in 0..a.count {
        let blk = if a.random {
            rng.fill(&mut pick);
            u64::from_le_bytes(pick) % blocks
        } else {
            i % blocks
        };
        let off = (blk * a.block_size as u64) as i64;
        // SAFETY: `slice` is a valid buffer of `block_size` bytes for the duration of the call.
        let n = unsafe {
            if a.write {
                libc::pwrite(f.as_raw_fd(), slice.as_ptr().cast(), a.block_size, off)
            } else {
                libc::pread(f.as_raw_fd(), slice.as_mut_ptr().cast(), a.block_size, off)
            }
        };
        if n != a.block_size as isize {
            return Err(OpError::os("I/O", io::Error::last_os_error()));
        }
    }
    let ns = t0.elapsed().as_nanos().max(1) as u64;
    let bytes = a.count * a.block_size as u64;
    Ok(json!({
        "ops": a.count,
        "bytes": bytes,
        "duration_ns": ns,
        "mb_per_s": bytes as f64 / (ns as f64 / 1e9) / 1e6,
        "iops": a.count as f64 / (ns as f64 / 1e9),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaBench {
    dir: String,
    count: u64,
}

/// `meta_bench`: `count` rounds of create + stat + unlink of a file in `dir`, timed in the guest.
pub fn meta_bench(a: MetaBench) -> OpResult<Value> {
    let t0 = Instant::now();
    for i in 0..a.count {
        let p = format!("{}/.kestrel-meta-{i}", a.dir);
        std::fs::File::create(&p).map_err(|e| OpError::os(&p, e))?;
        std::fs::metadata(&p).map_err(|e| OpError::os(&p, e))?;
        std::fs::remove_file(&p).map_err(|e| OpError::os(&p, e))?;
    }
    let ns = t0.elapsed().as_nanos().max(1) as u64;
    Ok(
        json!({"rounds": a.count, "duration_ns": ns, "rounds_per_s": a.count as f64 / (ns as f64 / 1e9)}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocTouch {
    mib: u64,
}

/// `alloc_touch`: map `mib` MiB of anonymous memory, write every page, check it, unmap.
pub fn alloc_touch(a: AllocTouch) -> OpResult<Value> {
    let len = (a.mib as usize) << 20;
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
            base.add(off).write_volatile((off >> 12) as u8 | 1);
        }
        for off in (0..len).step_by(4096) {
            sum += u64::from(base.add(off).read_volatile());
        }
        libc::munmap(p, len);
    }
    Ok(
        json!({"mib": a.mib, "pages": len / 4096, "checksum": sum, "duration_ms": t0.elapsed().as_millis() as u64}),
    )
}
