//! virtio-blk request handling on guest-controlled rings.
//!
//! The input is laid out in guest memory as one split virtqueue plus its buffers:
//!
//! | input bytes                  | guest memory                                         |
//! |------------------------------|------------------------------------------------------|
//! | `[0]`                        | control: queue size `1 << (b & 7 + 1)` (2..=256),    |
//! |                              | bit 3 event idx, bit 4 read-only drive, bit 5 empty  |
//! |                              | slot, bit 6 ack discard/write-zeroes, bit 7 aliasing:|
//! |                              | the used ring on top of the descriptor table and the |
//! |                              | buffers mirrored at `HIGH` (2 MiB region at 1 MiB)   |
//! | next `16 * size`             | descriptor table at `DESC`, verbatim                 |
//! | next `6 + 2 * size`          | available ring at `AVAIL`, verbatim (flags, idx,     |
//! |                              | ring, used_event)                                    |
//! | the rest                     | buffers at `BUF` (headers, data, discard ranges)     |
//!
//! Guest memory is 64 KiB at 0 plus 2 MiB at `HIGH` (a hole between), so descriptors may point
//! into either region, into the hole, across a region's end, or at the rings themselves.
//!
//! The block device (over a small in-memory image) is activated on that queue and runs it:
//! chain parsing, request execution, used-ring updates and notifications. Nothing is asserted
//! beyond "no panic"; the sanitizer catches accesses outside guest memory.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use kestrel_api::DriveConfig;
use kestrel_devices::virtio::block::{Block, BlockConfig};
use kestrel_devices::virtio::{VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use kestrel_fuzz::{
    guest_memory, interrupt, memfd_image, queue, queue_size, split_ring, write_parts,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryAtomic;

const MEM_SIZE: usize = 0x1_0000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUF: u64 = 0x3000;
const HIGH: u64 = 0x10_0000;
const HIGH_SIZE: usize = 0x20_0000;
const IMAGE_SIZE: usize = 64 * 512;

/// DISCARD (13) and WRITE_ZEROES (14).
const DISCARD_WZ: u64 = (1 << 13) | (1 << 14);

/// A 32 KiB image in a memfd (no file left behind), reached by its /proc path.
fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| memfd_image(c"kestrel-fuzz-blk", IMAGE_SIZE as u64))
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let size = queue_size(control);
    let event_idx = control & 0x08 != 0;
    let read_only = control & 0x10 != 0;
    let empty = control & 0x20 != 0;
    let ack_discard = control & 0x40 != 0;
    let alias = control & 0x80 != 0;

    let mem = guest_memory(&[(0, MEM_SIZE), (HIGH, HIGH_SIZE)]);
    let (desc, avail, bufs) = split_ring(rest, size);
    let bufs = &bufs[..bufs.len().min(MEM_SIZE - BUF as usize)];
    write_parts(&mem, &[(desc, DESC), (avail, AVAIL), (bufs, BUF)]);
    if alias {
        write_parts(&mem, &[(bufs, HIGH)]);
    }

    let config = DriveConfig {
        drive_id: "fuzz".into(),
        path_on_host: (!empty).then(|| image().clone()),
        is_read_only: read_only,
        ..DriveConfig::default()
    };
    let mut block = Block::new(&BlockConfig::try_from(&config).unwrap()).unwrap();
    let mut features = block.avail_features();
    if !event_idx {
        features &= !VIRTIO_RING_F_EVENT_IDX;
    }
    if !ack_discard {
        features &= !DISCARD_WZ;
    }
    block.set_acked_features(features);

    let used = if alias { DESC } else { USED };
    let q = queue(size, DESC, AVAIL, used, event_idx);
    block
        .activate(GuestMemoryAtomic::new(mem), interrupt(), vec![q])
        .unwrap();
    block.process_queue();
    // Again: a second notification on the same ring must be just as safe.
    block.process_queue();
    let _ = block.metrics();
});
