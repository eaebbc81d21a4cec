//! virtio-fs request handling (in-process FUSE server) on guest-controlled rings.
//!
//! The input is laid out in 16 MiB of guest memory as one split virtqueue plus its buffers:
//!
//! | input bytes                  | guest memory                                         |
//! |------------------------------|------------------------------------------------------|
//! | `[0]`                        | control: queue size `1 << (b & 7 + 1)` (2..=256),    |
//! |                              | bit 3 event idx, bit 4 read-only share, bit 5 the    |
//! |                              | chains go to the high-priority queue (else request   |
//! |                              | queue 1), bit 6 xattr on, bit 7 every other queue    |
//! |                              | shares the same descriptor table and available ring  |
//! | next `16 * size`             | descriptor table at `DESC`, verbatim                 |
//! | next `6 + 2 * size`          | available ring at `AVAIL`, verbatim                  |
//! | the rest                     | buffers at `BUF` (FUSE requests, reply space)        |
//!
//! The device has the high-priority queue and three request queues. Descriptors may point
//! anywhere in the 16 MiB and alias each other, so a chain's byte count can be far larger
//! than guest memory (256 descriptors of 16 MiB: 4 GiB); with bit 7 the same chains are
//! served again from every queue (a guest may publish one chain on several queues), each
//! queue with its own used ring. A FUSE server that allocated what such a chain adds up to
//! hits libFuzzer's malloc/RSS limit, which counts as a crash.
//!
//! The device serves a small temporary directory (recreated for every input: `f` with data,
//! `d/` with a file, `l` a symlink to /etc/passwd). Files are capped at 4 MiB with
//! `RLIMIT_FSIZE` (SIGXFSZ ignored, so big writes and fallocates fail with EFBIG instead of
//! filling the disk). A panic caught inside the FUSE server counts as a crash.

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use kestrel_api::{FsCache, FsConfig};
use kestrel_devices::virtio::fs::Fs;
use kestrel_devices::virtio::{VirtioDevice, VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 16 << 20;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUF: u64 = 0x3000;
/// Request queues besides the high-priority queue.
const REQUEST_QUEUES: u16 = 3;
/// All queues: the high-priority queue first.
const NUM_QUEUES: usize = 1 + REQUEST_QUEUES as usize;
/// Queue `i`'s own rings (an empty ring, or the used ring of a mirrored queue) are at
/// `OWN_RINGS + i * 0x1000`, at the top of guest memory.
const OWN_RINGS: u64 = MEM_SIZE as u64 - 0x1_0000;
const MAX_FILE: u64 = 4 << 20;

/// The share's parent directory (process-wide, set up once).
fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let lim = libc::rlimit {
            rlim_cur: MAX_FILE,
            rlim_max: MAX_FILE,
        };
        // SAFETY: `lim` is a valid rlimit; setrlimit reads only it.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) }, 0);
        // SAFETY: ignoring SIGXFSZ installs no handler code.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        let d = std::env::temp_dir().join(format!("kestrel-fuzz-fs-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// A fresh share for one input.
fn fresh_share() -> PathBuf {
    let share = base().join("share");
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(share.join("d")).unwrap();
    std::fs::write(share.join("f"), b"file data for the fuzzer").unwrap();
    std::fs::write(share.join("d/inner"), b"inner").unwrap();
    let _ = std::os::unix::fs::symlink("/etc/passwd", share.join("l"));
    share
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let size: u16 = 1 << ((control & 7) + 1);
    let event_idx = control & 0x08 != 0;
    let read_only = control & 0x10 != 0;
    let queue_index = if control & 0x20 != 0 { 0 } else { 1 };
    let xattr = control & 0x40 != 0;
    let mirror = control & 0x80 != 0;

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let desc_len = 16 * usize::from(size);
    let avail_len = 6 + 2 * usize::from(size);
    let (desc, rest) = rest.split_at(desc_len.min(rest.len()));
    let (avail, bufs) = rest.split_at(avail_len.min(rest.len()));
    let bufs = &bufs[..bufs.len().min(OWN_RINGS as usize - BUF as usize)];
    mem.write_slice(desc, GuestAddress(DESC)).unwrap();
    mem.write_slice(avail, GuestAddress(AVAIL)).unwrap();
    mem.write_slice(bufs, GuestAddress(BUF)).unwrap();

    let mut config = FsConfig::shared_dir("fuzz", fresh_share());
    config.read_only = read_only;
    config.xattr = xattr;
    config.cache = FsCache::Auto;
    config.num_queues = REQUEST_QUEUES;
    let mut fs = Fs::new(&config).unwrap();
    let mut features = fs.avail_features();
    if !event_idx {
        features &= !VIRTIO_RING_F_EVENT_IDX;
    }
    fs.set_acked_features(features);

    // The fuzzed queue; the others either serve the same chains (bit 7, each with its own
    // used ring) or are valid empty rings.
    let mut queues = Vec::new();
    for i in 0..NUM_QUEUES {
        let own = OWN_RINGS + i as u64 * 0x1000;
        let mut q = Queue::new(256).unwrap();
        if i == queue_index || mirror {
            q.try_set_size(size).unwrap();
            q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
            let used = if i == queue_index { USED } else { own };
            q.try_set_used_ring_address(GuestAddress(used)).unwrap();
        } else {
            // An empty ring (avail idx 0).
            q.try_set_size(2).unwrap();
            q.try_set_desc_table_address(GuestAddress(own)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(own + 0x100))
                .unwrap();
            q.try_set_used_ring_address(GuestAddress(own + 0x200))
                .unwrap();
            mem.write_slice(&[0u8; 0x300], GuestAddress(own)).unwrap();
        }
        q.set_event_idx(event_idx);
        q.set_ready(true);
        queues.push(q);
    }

    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    fs.activate(GuestMemoryAtomic::new(mem), irq, queues)
        .unwrap();
    fs.process_queue(queue_index);
    // Again: a second notification on the same ring must be just as safe.
    fs.process_queue(queue_index);
    // Every queue, in the order the control byte picks (the mirrored ones serve the same
    // chains again).
    let start = usize::from(control) % NUM_QUEUES;
    for k in 0..NUM_QUEUES {
        fs.process_queue((start + k) % NUM_QUEUES);
    }
    fs.process_all();
    let m = fs.metrics();
    assert_eq!(m.panics, 0, "the FUSE server panicked on this input");
    // A reset rebuilds the server; it must come back.
    fs.reset();
});
