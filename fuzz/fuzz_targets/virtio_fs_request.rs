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
use std::sync::OnceLock;

use kestrel_api::{FsCache, FsConfig};
use kestrel_devices::virtio::fs::Fs;
use kestrel_devices::virtio::{VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use kestrel_fuzz::{
    guest_memory, interrupt, limit_file_size, queue, queue_size, scratch_dir, split_ring,
    write_parts,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryAtomic;

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
        limit_file_size(MAX_FILE);
        let d = scratch_dir("fs");
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// A fresh share for one input: `f`, `d/inner` and a symlink `l` to /etc/passwd.
fn fresh_share() -> PathBuf {
    let share = kestrel_fuzz::fresh_share(base());
    std::fs::write(share.join("d/inner"), b"inner").unwrap();
    let _ = std::os::unix::fs::symlink("/etc/passwd", share.join("l"));
    share
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let size = queue_size(control);
    let event_idx = control & 0x08 != 0;
    let read_only = control & 0x10 != 0;
    let queue_index = if control & 0x20 != 0 { 0 } else { 1 };
    let xattr = control & 0x40 != 0;
    let mirror = control & 0x80 != 0;

    let mem = guest_memory(&[(0, MEM_SIZE)]);
    let (desc, avail, bufs) = split_ring(rest, size);
    let bufs = &bufs[..bufs.len().min(OWN_RINGS as usize - BUF as usize)];
    write_parts(&mem, &[(desc, DESC), (avail, AVAIL), (bufs, BUF)]);

    let mut config = FsConfig::shared_dir("fuzz", fresh_share());
    config.read_only = read_only;
    config.xattr = xattr;
    config.cache = FsCache::Auto;
    config.num_queues = REQUEST_QUEUES;
    let mut fs = Fs::new(&(&config).try_into().unwrap()).unwrap();
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
        queues.push(if i == queue_index || mirror {
            let used = if i == queue_index { USED } else { own };
            queue(size, DESC, AVAIL, used, event_idx)
        } else {
            // An empty ring (avail idx 0).
            write_parts(&mem, &[(&[0u8; 0x300], own)]);
            queue(2, own, own + 0x100, own + 0x200, event_idx)
        });
    }

    fs.activate(GuestMemoryAtomic::new(mem), interrupt(), queues)
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
