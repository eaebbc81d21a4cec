//! What the fuzz targets share: guest memory, split virtqueues laid out from fuzz input,
//! interrupts, event-loop passes, scratch files and process settings.
//!
//! Every helper does exactly what the targets did inline before, so inputs (and the seeds in
//! `seeds/`) keep their meaning.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use event_manager::{EventManager, MutEventSubscriber};
use kestrel_devices::virtio::VirtioInterrupt;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// `VIRTQ_DESC_F_WRITE`: the device writes the buffer.
pub const VRING_DESC_F_WRITE: u16 = 2;

/// The queue size a control byte picks: `1 << ((b & 7) + 1)`, 2 to 256.
pub fn queue_size(control: u8) -> u16 {
    1 << ((control & 7) + 1)
}

/// Guest memory of `(start, length)` regions.
pub fn guest_memory(regions: &[(u64, usize)]) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|&(start, len)| (GuestAddress(start), len))
        .collect();
    GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap()
}

/// Split fuzz input into a ring of `size` entries: the descriptor table (`16 * size` bytes),
/// the available ring (`6 + 2 * size` bytes: flags, idx, ring, used_event) and the rest. A
/// short input gives short parts.
pub fn split_ring(input: &[u8], size: u16) -> (&[u8], &[u8], &[u8]) {
    let desc_len = 16 * usize::from(size);
    let avail_len = 6 + 2 * usize::from(size);
    let (desc, rest) = input.split_at(desc_len.min(input.len()));
    let (avail, rest) = rest.split_at(avail_len.min(rest.len()));
    (desc, avail, rest)
}

/// Write each `(bytes, guest address)` into guest memory (the parts of a ring and its
/// buffers).
pub fn write_parts(mem: &GuestMemoryMmap, parts: &[(&[u8], u64)]) {
    for &(bytes, addr) in parts {
        mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }
}

/// A ready queue of `size` entries (maximum 256) with its parts at `desc`, `avail`, `used`.
pub fn queue(size: u16, desc: u64, avail: u64, used: u64, event_idx: bool) -> Queue {
    let mut q = Queue::new(256).unwrap();
    q.try_set_size(size).unwrap();
    q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
    q.try_set_used_ring_address(GuestAddress(used)).unwrap();
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q
}

/// An interrupt line nobody listens to.
pub fn interrupt() -> Arc<VirtioInterrupt> {
    Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ))
}

/// Post `count` well-formed device-writable buffers of `len` bytes each (at `bufs`, one after
/// the other) on the ring whose descriptor table is at `desc` and available ring at `avail`.
pub fn post_writable_buffers(
    mem: &GuestMemoryMmap,
    desc: u64,
    avail: u64,
    bufs: u64,
    count: u16,
    len: u32,
) {
    for i in 0..count {
        let d = desc + 16 * u64::from(i);
        let addr = bufs + u64::from(i) * u64::from(len);
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(VRING_DESC_F_WRITE, GuestAddress(d + 12))
            .unwrap();
        mem.write_obj(i, GuestAddress(avail + 4 + 2 * u64::from(i)))
            .unwrap();
    }
    mem.write_obj(count, GuestAddress(avail + 2)).unwrap();
}

/// Run the event loop without waiting until a pass handles nothing, at most `passes` times
/// (an event-manager error counts as an idle pass).
pub fn run_until_idle<S: MutEventSubscriber>(em: &mut EventManager<S>, passes: usize) {
    for _ in 0..passes {
        if em.run_with_timeout(0).unwrap_or(0) == 0 {
            break;
        }
    }
}

/// A new memfd named `name` (no file left behind).
pub fn memfd(name: &CStr) -> File {
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new descriptor (or -1);
    // it touches no other memory.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    unsafe { File::from_raw_fd(fd) }
}

/// A zero-filled image of `size` bytes in a memfd kept open for the life of the process,
/// reached by its `/proc/self/fd` path (a drive's `path_on_host`).
pub fn memfd_image(name: &CStr, size: u64) -> PathBuf {
    let f = memfd(name);
    f.set_len(size).expect("ftruncate failed");
    PathBuf::from(format!("/proc/self/fd/{}", f.into_raw_fd()))
}

/// This process's scratch directory for `tag`: `<tmp>/kestrel-fuzz-<tag>-<pid>` (not created).
pub fn scratch_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kestrel-fuzz-{tag}-{}", std::process::id()))
}

/// Cap the files this process writes at `max` bytes (`RLIMIT_FSIZE`), with `SIGXFSZ` ignored,
/// so big writes and fallocates through virtio-fs fail with `EFBIG` instead of filling the
/// disk.
pub fn limit_file_size(max: u64) {
    let lim = libc::rlimit {
        rlim_cur: max,
        rlim_max: max,
    };
    // SAFETY: `lim` is a valid rlimit; setrlimit reads only it.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) }, 0);
    // SAFETY: ignoring SIGXFSZ installs no handler code.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
}

/// Ignore `SIGPIPE` (once per process): a write to a closed socket then fails with `EPIPE`
/// instead of killing the fuzzer (libFuzzer's C `main` does not ignore it as Rust's does).
pub fn ignore_sigpipe() {
    static ONCE: Once = Once::new();
    // SAFETY: ignoring SIGPIPE installs no handler code.
    ONCE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
}

/// An empty share under `parent` for one input: `f` with data and an empty directory `d/`
/// (whatever the previous input left there is removed first).
pub fn fresh_share(parent: &Path) -> PathBuf {
    let share = parent.join("share");
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(share.join("d")).unwrap();
    std::fs::write(share.join("f"), b"file data for the fuzzer").unwrap();
    share
}
