//! Block device tests: a driver written in the test puts requests on a real split ring in guest
//! memory built here; the device runs them against a temporary image.

use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempfile::TempFile;

use super::handler::BATCH_LIMIT;
use super::*;
use crate::bus::BusDevice;
use crate::rate_limiter::test_util::{bucket, FakeClock};
use crate::virtio::mmio::{MmioState, MmioTransport};
use crate::virtio::test_util::{
    assert_pass_bounded, with_refilling_guest, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use crate::virtio::{status, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_RING};
use crate::virtio::{ActivateError, GuestMem, VirtioDevice, VirtioInterrupt};

const MEM_SIZE: usize = 0x20_0000;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x4000;
const STATUS: u64 = 0x5000;
const DATA: u64 = 0x10000;
const SECTORS: u64 = 64;

const OK: u8 = VIRTIO_BLK_S_OK.to_le_bytes()[0];
const IOERR: u8 = VIRTIO_BLK_S_IOERR.to_le_bytes()[0];
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP.to_le_bytes()[0];

fn mem() -> GuestMem {
    GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

/// An image of `SECTORS` sectors; sector `i` is filled with byte `i`.
fn image() -> TempFile {
    let t = TempFile::new().unwrap();
    for i in 0..SECTORS {
        t.as_file()
            .write_all_at(&[i.to_le_bytes()[0]; 512], i * SECTOR_SIZE)
            .unwrap();
    }
    t
}

fn drive(path: Option<&Path>) -> BlockConfig {
    BlockConfig::new("disk0", path)
}

/// The guest side of the request queue.
struct Driver {
    mem: GuestMem,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl Driver {
    fn new(mem: &GuestMem) -> Self {
        Driver {
            mem: mem.clone(),
            size: QUEUE_SIZE,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn m(&self) -> impl std::ops::Deref<Target = GuestMemoryMmap> {
        self.mem.memory()
    }

    fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.try_set_size(self.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    /// Put raw descriptors (addr, len, flags, next) in the table from the next free slot and
    /// make the first one available. `next` values are relative to the first descriptor.
    fn add_raw(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let head = self.next_desc;
        let m = self.m();
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let idx = (head + u16::try_from(i).unwrap()) % self.size;
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&((head + next) % self.size).to_le_bytes());
            m.write_slice(&raw, GuestAddress(DESC + u64::from(idx) * 16))
                .unwrap();
        }
        drop(m);
        self.next_desc = (head + u16::try_from(descs.len()).unwrap()) % self.size;
        self.push_avail(head);
        head
    }

    fn push_avail(&mut self, head: u16) {
        let m = self.m();
        let slot = u64::from(self.avail_idx % self.size);
        m.write_obj(head, GuestAddress(AVAIL + 4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// A chain of (addr, len, device-writable) buffers.
    fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let n = bufs.len();
        let descs: Vec<_> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE } else { 0 };
                if i + 1 < n {
                    flags |= VRING_DESC_F_NEXT;
                }
                (addr, len, flags, u16::try_from(i).unwrap() + 1)
            })
            .collect();
        self.add_raw(&descs)
    }

    /// A request: header at `HDR + 16 * k`, data buffers, status at `STATUS + k`.
    fn request(&mut self, k: u64, t: u32, sector: u64, data: &[(u64, u32, bool)]) -> u16 {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        let hdr = HDR + 16 * k;
        self.m().write_slice(&h, GuestAddress(hdr)).unwrap();
        self.m()
            .write_obj(0xffu8, GuestAddress(STATUS + k))
            .unwrap();
        let mut bufs = vec![(hdr, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((STATUS + k, 1, true));
        self.add(&bufs)
    }

    fn status(&self, k: u64) -> u8 {
        self.m().read_obj(GuestAddress(STATUS + k)).unwrap()
    }

    fn used_idx(&self) -> u16 {
        self.m().read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Used element `i`: (id, len).
    fn used(&self, i: u16) -> (u32, u32) {
        let base = USED + 4 + 8 * u64::from(i % self.size);
        let m = self.m();
        (
            m.read_obj(GuestAddress(base)).unwrap(),
            m.read_obj(GuestAddress(base + 4)).unwrap(),
        )
    }

    fn write(&self, addr: u64, data: &[u8]) {
        self.m().write_slice(data, GuestAddress(addr)).unwrap();
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.m().read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

struct Setup {
    block: Block,
    driver: Driver,
    irq: Arc<VirtioInterrupt>,
    image: Option<TempFile>,
}

fn irq() -> Arc<VirtioInterrupt> {
    Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ))
}

/// An activated device with every offered feature acked.
fn setup_with(config: BlockConfig, image: Option<TempFile>, event_idx: bool) -> Setup {
    let mut block = Block::new(&config).unwrap();
    let mut features = block.avail_features();
    if !event_idx {
        features &= !VIRTIO_RING_F_EVENT_IDX;
    }
    block.set_acked_features(features);
    let mem = mem();
    let driver = Driver::new(&mem);
    let irq = irq();
    block
        .activate(mem, irq.clone(), vec![driver.queue(event_idx)])
        .unwrap();
    Setup {
        block,
        driver,
        irq,
        image,
    }
}

fn setup() -> Setup {
    let t = image();
    let config = drive(Some(t.as_path()));
    setup_with(config, Some(t), false)
}

fn file_bytes(t: &TempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    t.as_file().read_exact_at(&mut v, offset).unwrap();
    v
}

fn feature(bit: u32) -> u64 {
    1 << bit
}

/// Firecracker's `cache_type`: `Unsafe` offers no flush, `Writeback` (Kestrel's default) does.
#[test]
fn cache_type_unsafe_offers_no_flush() {
    let t = image();
    let mut api = kestrel_api::DriveConfig {
        drive_id: "d".into(),
        path_on_host: Some(t.as_path().to_path_buf()),
        ..kestrel_api::DriveConfig::default()
    };
    let writeback = Block::new(&BlockConfig::try_from(&api).unwrap()).unwrap();
    assert_ne!(writeback.avail_features() & feature(VIRTIO_BLK_F_FLUSH), 0);
    api.cache_type = kestrel_api::CacheType::Unsafe;
    let cfg = BlockConfig::try_from(&api).unwrap();
    assert!(cfg.no_flush);
    let unsafe_cache = Block::new(&cfg).unwrap();
    assert_eq!(
        unsafe_cache.avail_features() & feature(VIRTIO_BLK_F_FLUSH),
        0
    );
    // Everything else is the same offer.
    assert_eq!(
        unsafe_cache.avail_features() | feature(VIRTIO_BLK_F_FLUSH),
        writeback.avail_features()
    );
}

#[test]
fn features_and_config_space() {
    let t = image();
    let b = Block::new(&drive(Some(t.as_path()))).unwrap();
    assert_eq!(b.device_type(), 2);
    assert_eq!(b.queue_max_sizes(), &[256]);
    let f = b.avail_features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
    ] {
        assert_ne!(f & feature(bit), 0, "bit {bit}");
    }
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
    assert_eq!(f & feature(VIRTIO_BLK_F_RO), 0);
    // /tmp on the test hosts can punch holes; if it could not, neither feature is offered.
    let discard = f & feature(VIRTIO_BLK_F_DISCARD) != 0;
    assert_eq!(discard, f & feature(VIRTIO_BLK_F_WRITE_ZEROES) != 0);

    let mut c = [0u8; CONFIG_SPACE_LEN];
    b.read_config(0, &mut c);
    let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), SECTORS);
    assert_eq!(u32_at(12), 254, "seg_max");
    assert_eq!(u32_at(20), 512, "blk_size");
    assert_eq!(CONFIG_SPACE_LEN, 60);
    if discard {
        assert_eq!(u32_at(36), MAX_DISCARD_SECTORS);
        assert_eq!(u32_at(40), 1, "max_discard_seg");
        assert_eq!(u32_at(44), DISCARD_SECTOR_ALIGNMENT);
        assert_eq!(u32_at(48), MAX_WRITE_ZEROES_SECTORS);
        assert_eq!(u32_at(52), 1, "max_write_zeroes_seg");
        assert_eq!(c[56], 1, "write_zeroes_may_unmap");
    }
    // Partial and out-of-range reads.
    let mut cap_hi = [0xffu8; 4];
    b.read_config(4, &mut cap_hi);
    assert_eq!(cap_hi, [0; 4]);
    let mut b2 = [0xffu8; 2];
    b.read_config(0, &mut b2);
    assert_eq!(b2, [SECTORS.to_le_bytes()[0], 0]);
    let mut tail = [0xffu8; 8];
    b.read_config(56, &mut tail);
    assert_eq!(&tail[4..], &[0; 4]);
    let mut far = [0xffu8; 8];
    b.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 8]);

    // Read-only: RO, no discard / write-zeroes.
    let mut cfg = drive(Some(t.as_path()));
    cfg.read_only = true;
    let ro = Block::new(&cfg).unwrap();
    let f = ro.avail_features();
    assert_ne!(f & feature(VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        f & (feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES)),
        0
    );
    assert!(ro.is_read_only());
}

#[test]
fn new_rejects_bad_input() {
    let mut cfg = drive(Some(Path::new("/nonexistent/disk.img")));
    assert!(matches!(Block::new(&cfg), Err(BlockError::Open { .. })));
    cfg.path = Some(std::env::temp_dir());
    cfg.read_only = true;
    assert!(matches!(Block::new(&cfg), Err(BlockError::NotADisk(_))));
    let mut api = kestrel_api::DriveConfig {
        drive_id: "disk0".into(),
        serial: Some("x".repeat(21)),
        ..kestrel_api::DriveConfig::default()
    };
    let e = BlockConfig::try_from(&api).unwrap_err();
    assert!(matches!(e, BlockError::InvalidSerial(_)), "{e}");
    assert!(e.to_string().starts_with("serial "), "{e}");
    api.serial = Some("tab\there".into());
    assert!(matches!(
        BlockConfig::try_from(&api),
        Err(BlockError::InvalidSerial(_))
    ));
}

#[test]
fn write_then_read_back() {
    let mut s = setup();
    let t = s.image.take().unwrap();
    // Write 3 sectors at sector 2 from two buffers.
    s.driver.write(DATA, &[0xab; 1024]);
    s.driver.write(DATA + 0x1000, &[0xcd; 512]);
    let h = s.driver.request(
        0,
        VIRTIO_BLK_T_OUT,
        2,
        &[(DATA, 1024, false), (DATA + 0x1000, 512, false)],
    );
    s.block.process_queue();
    assert_eq!(s.driver.status(0), OK);
    assert_eq!(s.driver.used_idx(), 1);
    assert_eq!(s.driver.used(0), (u32::from(h), 1));
    // The data is in the file when the request completes.
    assert_eq!(file_bytes(&t, 2 * 512, 1024), vec![0xab; 1024]);
    assert_eq!(file_bytes(&t, 4 * 512, 512), vec![0xcd; 512]);
    assert_eq!(file_bytes(&t, 5 * 512, 1), vec![5]);
    // Read sectors 1..5 into one buffer.
    let h = s
        .driver
        .request(1, VIRTIO_BLK_T_IN, 1, &[(DATA + 0x2000, 2048, true)]);
    s.block.process_queue();
    assert_eq!(s.driver.status(1), OK);
    assert_eq!(s.driver.used(1), (u32::from(h), 2049));
    let got = s.driver.read(DATA + 0x2000, 2048);
    assert_eq!(&got[..512], &[1u8; 512][..]);
    assert_eq!(&got[512..1536], &[0xab; 1024][..]);
    assert_eq!(&got[1536..], &[0xcd; 512][..]);
    // Flush.
    s.driver.request(2, VIRTIO_BLK_T_FLUSH, 0, &[]);
    s.block.process_queue();
    assert_eq!(s.driver.status(2), OK);

    let m = s.block.metrics();
    assert_eq!(m.requests, 3);
    assert_eq!((m.write_ops, m.write_bytes), (1, 1536));
    assert_eq!((m.read_ops, m.read_bytes), (1, 2048));
    assert_eq!(m.flush_ops, 1);
    assert_eq!(m.io_errors + m.unsupported + m.malformed_chains, 0);
    assert_eq!(m.interrupts, 3);
    assert_ne!(s.irq.status() & INTERRUPT_USED_RING, 0);
    assert!(s.irq.event().read().unwrap() >= 1);
}

#[test]
fn several_requests_in_one_go() {
    let mut s = setup();
    for k in 0..10u64 {
        s.driver
            .request(k, VIRTIO_BLK_T_IN, k, &[(DATA + k * 0x1000, 512, true)]);
    }
    s.block.process_queue();
    assert_eq!(s.driver.used_idx(), 10);
    for k in 0..10u64 {
        assert_eq!(s.driver.status(k), OK);
        assert_eq!(
            s.driver.read(DATA + k * 0x1000, 512),
            vec![k.to_le_bytes()[0]; 512]
        );
    }
    // One interrupt for the batch.
    assert_eq!(s.block.metrics().interrupts, 1);
    assert_eq!(s.irq.event().read().unwrap(), 1);
}

#[test]
fn out_of_range_requests_fail() {
    let mut s = setup();
    let cases = [
        (VIRTIO_BLK_T_IN, SECTORS, 512u32),
        (VIRTIO_BLK_T_IN, SECTORS - 1, 1024),
        (VIRTIO_BLK_T_OUT, SECTORS, 512),
        (VIRTIO_BLK_T_IN, u64::MAX, 512),
        (VIRTIO_BLK_T_OUT, u64::MAX / 512, 1024),
        (VIRTIO_BLK_T_IN, 1 << 55, 512),
    ];
    for (k, &(t, sector, len)) in cases.iter().enumerate() {
        let w = t == VIRTIO_BLK_T_IN;
        s.driver.request(k as u64, t, sector, &[(DATA, len, w)]);
    }
    s.block.process_queue();
    for k in 0..cases.len() {
        assert_eq!(s.driver.status(k as u64), IOERR, "case {k}");
    }
    // The last sector itself is fine.
    s.driver
        .request(9, VIRTIO_BLK_T_IN, SECTORS - 1, &[(DATA, 512, true)]);
    s.block.process_queue();
    assert_eq!(s.driver.status(9), OK);
    assert_eq!(s.block.metrics().io_errors, cases.len() as u64);
}

#[test]
fn malformed_requests_get_ioerr() {
    let mut s = setup();
    // Data length not a multiple of 512.
    s.driver
        .request(0, VIRTIO_BLK_T_IN, 0, &[(DATA, 100, true)]);
    // Wrong direction: a read into a device-readable buffer.
    s.driver
        .request(1, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, false)]);
    // Data buffer outside guest memory.
    s.driver.request(
        2,
        VIRTIO_BLK_T_OUT,
        0,
        &[(MEM_SIZE as u64 - 256, 512, false)],
    );
    // Short header.
    s.driver.add(&[(HDR, 8, false), (STATUS + 3, 1, true)]);
    // Writable header.
    s.driver.add(&[(HDR, 16, true), (STATUS + 4, 1, true)]);
    // Header only, which is also the status: the single descriptor is readable -> no status.
    s.driver.add(&[(HDR, 16, false)]);
    // Unknown type.
    s.driver.request(6, 77, 0, &[]);
    s.block.process_queue();
    for k in 0..5 {
        assert_eq!(s.driver.status(k), IOERR, "case {k}");
    }
    assert_eq!(s.driver.status(6), UNSUPP);
    assert_eq!(s.driver.used_idx(), 7);
    assert_eq!(s.driver.used(5).1, 0);
    let m = s.block.metrics();
    assert_eq!((m.io_errors, m.unsupported, m.malformed_chains), (5, 1, 1));
    assert!(!s.block.needs_reset());
    // Nothing reached the image.
    assert_eq!(m.write_ops + m.read_ops, 0);
}

#[test]
fn unusable_status_means_used_len_zero() {
    let mut s = setup();
    let t = s.image.take().unwrap();
    // Status descriptor device-readable: the write must not happen either.
    s.driver.write(DATA, &[0x77; 512]);
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    s.driver.write(HDR, &h);
    let head = s
        .driver
        .add(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, false)]);
    // Status outside guest memory.
    s.driver
        .add(&[(HDR, 16, false), (MEM_SIZE as u64 + 0x1000, 1, true)]);
    // Status of length 0.
    s.driver.add(&[(HDR, 16, false), (STATUS, 0, true)]);
    s.block.process_queue();
    assert_eq!(s.driver.used_idx(), 3);
    assert_eq!(s.driver.used(0), (u32::from(head), 0));
    assert_eq!(s.driver.used(1).1, 0);
    assert_eq!(s.driver.used(2).1, 0);
    assert_eq!(s.block.metrics().malformed_chains, 3);
    assert_eq!(file_bytes(&t, 0, 1), vec![0]);
}

#[test]
fn broken_chains_do_not_stop_the_queue() {
    let mut s = setup();
    let n = VRING_DESC_F_NEXT;
    let w = VRING_DESC_F_WRITE;
    // A loop: 0 -> 1 -> 0.
    s.driver.add_raw(&[(HDR, 16, n, 1), (STATUS, 1, n | w, 0)]);
    // `next` out of the table.
    s.driver.add_raw(&[(HDR, 16, n, 300)]);
    // A good request after them.
    s.driver
        .request(5, VIRTIO_BLK_T_IN, 3, &[(DATA, 512, true)]);
    s.block.process_queue();
    assert_eq!(s.driver.used_idx(), 3);
    assert_eq!(s.driver.used(0).1, 0);
    assert_eq!(s.driver.used(1).1, 0);
    assert_eq!(s.driver.status(5), OK);
    assert_eq!(s.driver.read(DATA, 512), vec![3; 512]);
    assert_eq!(s.block.metrics().malformed_chains, 2);
    assert!(!s.block.needs_reset());
}

#[test]
fn ring_errors_need_a_reset() {
    // The driver claims more available entries than the queue holds.
    let mut s = setup();
    s.driver.request(0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    let m = s.driver.m();
    m.write_obj(500u16, GuestAddress(AVAIL + 2)).unwrap();
    drop(m);
    s.block.process_queue();
    assert!(s.block.needs_reset());
    assert_eq!(s.block.metrics().queue_errors, 1);
    assert_ne!(s.irq.status() & INTERRUPT_CONFIG_CHANGE, 0);
    assert_eq!(s.driver.used_idx(), 0);
    // Stopped: further notifications do nothing until a reset.
    s.driver
        .m()
        .write_obj(1u16, GuestAddress(AVAIL + 2))
        .unwrap();
    s.block.process_queue();
    assert_eq!(s.driver.used_idx(), 0);
    s.block.reset();
    assert!(!s.block.needs_reset() && !s.block.is_activated());

    // A head index beyond the queue size cannot go on the used ring.
    let mut s = setup();
    s.driver.push_avail(QUEUE_SIZE + 3);
    s.block.process_queue();
    assert!(s.block.needs_reset());
    assert_eq!(s.block.metrics().malformed_chains, 1);
}

#[test]
fn read_only_drive_refuses_writes() {
    let t = image();
    let mut cfg = drive(Some(t.as_path()));
    cfg.read_only = true;
    let mut s = setup_with(cfg, Some(t), false);
    let t = s.image.take().unwrap();
    s.driver.write(DATA, &[0xee; 512]);
    s.driver
        .request(0, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]);
    s.driver
        .request(1, VIRTIO_BLK_T_IN, 0, &[(DATA + 0x1000, 512, true)]);
    s.driver.request(2, VIRTIO_BLK_T_FLUSH, 0, &[]);
    // Discard was not offered: UNSUPP.
    s.driver.write(DATA + 0x2000, &[0; 16]);
    s.driver
        .request(3, VIRTIO_BLK_T_DISCARD, 0, &[(DATA + 0x2000, 16, false)]);
    s.block.process_queue();
    assert_eq!(s.driver.status(0), IOERR);
    assert_eq!(s.driver.status(1), OK);
    assert_eq!(s.driver.status(2), OK);
    assert_eq!(s.driver.status(3), UNSUPP);
    assert_eq!(file_bytes(&t, 0, 512), vec![0; 512]);
}

#[test]
fn get_id_returns_the_serial() {
    let mut s = setup();
    s.driver
        .request(0, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
    s.block.process_queue();
    assert_eq!(s.driver.status(0), OK);
    assert_eq!(s.driver.used(0).1, 21);
    let mut want = b"disk0".to_vec();
    want.resize(20, 0);
    assert_eq!(s.driver.read(DATA, 20), want);

    let t = image();
    let mut cfg = drive(Some(t.as_path()));
    cfg.serial = Some(*b"SERIAL-0123456789ABC");
    let mut s = setup_with(cfg, Some(t), false);
    // A buffer larger than 20 bytes gets 20; a smaller one what fits.
    s.driver.write(DATA, &[0xff; 32]);
    s.driver
        .request(0, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 32, true)]);
    s.driver
        .request(1, VIRTIO_BLK_T_GET_ID, 0, &[(DATA + 0x100, 8, true)]);
    s.block.process_queue();
    assert_eq!(s.driver.read(DATA, 21), b"SERIAL-0123456789ABC\xff");
    assert_eq!(s.driver.read(DATA + 0x100, 8), b"SERIAL-0");
    assert_eq!(s.driver.used(1).1, 9);
    assert_eq!(s.block.metrics().get_id_ops, 2);
}

fn range(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&num.to_le_bytes());
    r[12..].copy_from_slice(&flags.to_le_bytes());
    r
}

#[test]
fn discard_and_write_zeroes() {
    let mut s = setup();
    if s.block.avail_features() & feature(VIRTIO_BLK_F_DISCARD) == 0 {
        eprintln!("temp dir cannot punch holes; skipping");
        return;
    }
    let t = s.image.take().unwrap();
    let ranges = [
        (VIRTIO_BLK_T_WRITE_ZEROES, range(2, 2, 0)),
        (VIRTIO_BLK_T_WRITE_ZEROES, range(8, 1, 1)),
        (VIRTIO_BLK_T_DISCARD, range(16, 8, 0)),
        // Unmap on a discard, unknown flags: UNSUPP.
        (VIRTIO_BLK_T_DISCARD, range(16, 8, 1)),
        (VIRTIO_BLK_T_WRITE_ZEROES, range(16, 8, 2)),
        // Out of range, too large: IOERR.
        (VIRTIO_BLK_T_WRITE_ZEROES, range(SECTORS - 1, 2, 0)),
        (VIRTIO_BLK_T_DISCARD, range(u64::MAX, 1, 0)),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            range(0, MAX_WRITE_ZEROES_SECTORS + 1, 0),
        ),
    ];
    for (k, (t, r)) in ranges.iter().enumerate() {
        let addr = DATA + 0x100 * k as u64;
        s.driver.write(addr, r);
        s.driver.request(k as u64, *t, 0, &[(addr, 16, false)]);
    }
    s.block.process_queue();
    let statuses: Vec<u8> = (0..ranges.len() as u64)
        .map(|k| s.driver.status(k))
        .collect();
    assert_eq!(
        statuses,
        vec![OK, OK, OK, UNSUPP, UNSUPP, IOERR, IOERR, IOERR]
    );
    assert_eq!(file_bytes(&t, 512, 512), vec![1; 512]);
    assert_eq!(file_bytes(&t, 2 * 512, 1024), vec![0; 1024]);
    assert_eq!(file_bytes(&t, 4 * 512, 512), vec![4; 512]);
    assert_eq!(file_bytes(&t, 8 * 512, 512), vec![0; 512]);
    assert_eq!(file_bytes(&t, 9 * 512, 512), vec![9; 512]);
    // Discarded sectors read back as zeros here (punched holes), size unchanged.
    assert_eq!(file_bytes(&t, 16 * 512, 4096), vec![0; 4096]);
    assert_eq!(t.as_file().metadata().unwrap().len(), SECTORS * 512);
    let m = s.block.metrics();
    assert_eq!((m.write_zeroes_ops, m.discard_ops), (2, 1));
}

#[test]
fn empty_slot_and_hot_swap() {
    let mut s = setup_with(drive(None), None, false);
    assert_eq!(s.block.capacity(), 0);
    assert_eq!(s.block.path(), None);
    // An empty slot still offers discard / write-zeroes (decided for the slot, not the file).
    assert_ne!(s.block.avail_features() & feature(VIRTIO_BLK_F_DISCARD), 0);
    s.driver
        .request(0, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]);
    s.driver.request(1, VIRTIO_BLK_T_IN, 0, &[]);
    s.driver.request(2, VIRTIO_BLK_T_FLUSH, 0, &[]);
    s.block.process_queue();
    assert_eq!(
        [s.driver.status(0), s.driver.status(1), s.driver.status(2)],
        [IOERR, OK, OK]
    );
    assert_eq!(s.block.config_generation(), 0);
    s.irq.clear();
    while s.irq.event().read().is_ok() {}

    // Attach a file: new capacity, generation moves, config interrupt.
    let t = image();
    s.block.swap_backing(Some(t.as_path()), false).unwrap();
    assert_eq!(s.block.capacity(), SECTORS);
    assert_eq!(s.block.path(), Some(t.as_path()));
    assert_eq!(s.block.config_generation(), 1);
    assert_eq!(s.irq.status(), INTERRUPT_CONFIG_CHANGE);
    assert_eq!(s.irq.event().read().unwrap(), 1);
    let mut cap = [0u8; 8];
    s.block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    s.driver
        .request(3, VIRTIO_BLK_T_IN, 7, &[(DATA, 512, true)]);
    s.block.process_queue();
    assert_eq!(s.driver.status(3), OK);
    assert_eq!(s.driver.read(DATA, 512), vec![7; 512]);

    // A failed swap keeps the old file.
    assert!(s
        .block
        .swap_backing(Some(Path::new("/nonexistent/x.img")), false)
        .is_err());
    assert_eq!(s.block.capacity(), SECTORS);
    assert_eq!(s.block.config_generation(), 1);

    // Read-only file in a read-write slot: writes fail.
    s.block.swap_backing(Some(t.as_path()), true).unwrap();
    assert!(s.block.is_read_only());
    s.driver
        .request(4, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]);
    s.block.process_queue();
    assert_eq!(s.driver.status(4), IOERR);

    // Remove it again.
    s.block.swap_backing(None, false).unwrap();
    assert_eq!(s.block.capacity(), 0);
    assert_eq!(s.block.config_generation(), 3);
    assert_eq!(s.block.metrics().config_changes, 3);

    // Not activated: no interrupt, but the generation still moves.
    let mut b = Block::new(&drive(None)).unwrap();
    b.swap_backing(Some(t.as_path()), false).unwrap();
    assert_eq!(b.config_generation(), 1);
    assert_eq!(b.metrics().config_changes, 0);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let t = image();
    let config = drive(Some(t.as_path()));
    let mut s = setup_with(config, Some(t), true);
    // used_event (after the avail ring) = 0: interrupt when used idx passes 0.
    s.driver.request(0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    s.block.process_queue();
    assert_eq!(s.block.metrics().interrupts, 1);
    // used_event = 10: no interrupt for the next requests until used idx passes 10.
    let used_event = AVAIL + 4 + 2 * u64::from(QUEUE_SIZE);
    s.driver
        .m()
        .write_obj(10u16, GuestAddress(used_event))
        .unwrap();
    s.driver.request(1, VIRTIO_BLK_T_FLUSH, 0, &[]);
    s.block.process_queue();
    assert_eq!(s.block.metrics().interrupts, 1);
    for k in 2..12 {
        s.driver.request(k, VIRTIO_BLK_T_FLUSH, 0, &[]);
    }
    s.block.process_queue();
    assert_eq!(s.block.metrics().interrupts, 2);
    // The device publishes avail_event for the driver (after the used ring).
    let avail_event: u16 = s
        .driver
        .m()
        .read_obj(GuestAddress(USED + 4 + 8 * u64::from(QUEUE_SIZE)))
        .unwrap();
    assert_eq!(avail_event, 12);
}

#[test]
fn activation_and_reset() {
    let t = image();
    let mut b = Block::new(&drive(Some(t.as_path()))).unwrap();
    let mem = mem();
    let d = Driver::new(&mem);
    assert!(!b.is_activated());
    // Wrong number of queues.
    assert_eq!(
        b.activate(mem.clone(), irq(), vec![]),
        Err(ActivateError::QueueCount {
            expected: 1,
            got: 0
        })
    );
    assert_eq!(
        b.activate(mem.clone(), irq(), vec![d.queue(false), d.queue(false)]),
        Err(ActivateError::QueueCount {
            expected: 1,
            got: 2
        })
    );
    b.activate(mem.clone(), irq(), vec![d.queue(false)])
        .unwrap();
    assert!(b.is_activated());
    assert_eq!(b.wake_event().read().unwrap(), 1);
    // Before activation and after reset, notifications are ignored.
    b.reset();
    assert!(!b.is_activated());
    b.process_queue();
    // The backing file survives a reset.
    assert_eq!(b.capacity(), SECTORS);
    // Config writes are ignored.
    b.write_config(0, &[1, 2, 3, 4]);
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
}

/// The whole path: a driver programs the transport, notifies through the QueueNotify
/// register, and the event loop runs the request.
#[test]
fn through_transport_and_event_loop() {
    let t = image();
    let block = Arc::new(Mutex::new(Block::new(&drive(Some(t.as_path()))).unwrap()));
    let mem = mem();
    let irq = irq();
    let mut transport = MmioTransport::new(block.clone(), irq.clone(), mem.clone());
    let mut ops = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    ops.add_subscriber(block.clone());

    let mut w = |off: u64, v: u32| transport.write(off, &v.to_le_bytes());
    w(0x70, status::ACKNOWLEDGE);
    w(0x70, status::ACKNOWLEDGE | status::DRIVER);
    w(0x24, 1);
    w(0x20, 1); // VERSION_1
    w(
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    w(0x30, 0);
    w(0x38, u32::from(QUEUE_SIZE));
    w(0x80, u32::try_from(DESC).unwrap());
    w(0x90, u32::try_from(AVAIL).unwrap());
    w(0xa0, u32::try_from(USED).unwrap());
    w(0x44, 1);
    let mut d = Driver::new(&mem);
    d.request(0, VIRTIO_BLK_T_IN, 5, &[(DATA, 512, true)]);
    w(
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(block.lock().unwrap().is_activated());
    // The activation event runs the queue on the loop.
    ops.run_with_timeout(1000).unwrap();
    assert_eq!(d.status(0), OK);
    assert_eq!(d.read(DATA, 512), vec![5; 512]);
    // A notification through the register.
    d.request(1, VIRTIO_BLK_T_IN, 6, &[(DATA, 512, true)]);
    w(0x50, 0);
    ops.run_with_timeout(1000).unwrap();
    assert_eq!(d.status(1), OK);
    assert_eq!(d.read(DATA, 512), vec![6; 512]);
    assert_eq!(d.used_idx(), 2);
    assert_eq!(irq.status(), INTERRUPT_USED_RING);
    // Hot-swap shows up in the transport's ConfigGeneration.
    let mut gen = [0u8; 4];
    transport.read(0xfc, &mut gen);
    assert_eq!(u32::from_le_bytes(gen), 0);
    block.lock().unwrap().swap_backing(None, false).unwrap();
    transport.read(0xfc, &mut gen);
    assert_eq!(u32::from_le_bytes(gen), 1);
    let mut cap = [0xffu8; 8];
    transport.read(0x100, &mut cap);
    assert_eq!(cap, [0; 8]);
    // Nothing is pending: the loop times out quietly.
    let start = std::time::Instant::now();
    ops.run_with_timeout(10).unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn bandwidth_limit_holds_requests_in_the_ring_until_refilled() {
    let mut s = setup();
    let clock = FakeClock::default();
    // 2 KiB per 100 ms, plus a one-time burst of 1 KiB.
    let cfg = RateLimiterConfig {
        bandwidth: Some(bucket(2048, Some(1024), 100)),
        ops: None,
    };
    s.block
        .set_rate_limiter(RateLimiter::with_clock(&cfg, Box::new(clock.clone()), None));
    // Six 1 KiB reads: burst + bucket pay for three.
    for k in 0..6u64 {
        s.driver.request(
            k,
            VIRTIO_BLK_T_IN,
            2 * k,
            &[(DATA + k * 0x1000, 1024, true)],
        );
    }
    s.block.process_queue();
    assert_eq!(s.driver.used_idx(), 3);
    assert_eq!(s.driver.status(3), 0xff, "the fourth request is not done");
    assert!(s.block.rate_limiter().is_blocked());
    assert_eq!(s.block.metrics().rate_limited, 1);
    // While blocked, a kick does nothing (and does not re-parse into the limiter).
    s.block.process_queue();
    assert_eq!(s.driver.used_idx(), 3);
    assert_eq!(s.block.metrics().rate_limited, 1);
    // Half the refill time: one request's worth.
    clock.advance_ms(50);
    s.block.on_rate_limiter_timer();
    assert_eq!(s.driver.used_idx(), 4);
    // The rest after another 100 ms; everything read in ring order with the right data.
    clock.advance_ms(100);
    s.block.on_rate_limiter_timer();
    assert_eq!(s.driver.used_idx(), 6);
    for k in 0..6u64 {
        assert_eq!(s.driver.status(k), OK);
        assert_eq!(s.driver.used(u16::try_from(k).unwrap()).1, 1025);
        let got = s.driver.read(DATA + k * 0x1000, 1024);
        assert_eq!(
            got,
            [
                vec![2 * k.to_le_bytes()[0]; 512],
                vec![2 * k.to_le_bytes()[0] + 1; 512]
            ]
            .concat()
        );
    }
    let m = s.block.metrics();
    assert_eq!((m.read_ops, m.read_bytes), (6, 6 * 1024));
    assert_eq!(m.rate_limited, 2);
}

#[test]
fn ops_limit_counts_every_request_kind_and_can_be_lifted() {
    let mut s = setup();
    let clock = FakeClock::default();
    let cfg = RateLimiterConfig {
        bandwidth: None,
        ops: Some(bucket(2, None, 1000)),
    };
    s.block
        .set_rate_limiter(RateLimiter::with_clock(&cfg, Box::new(clock.clone()), None));
    s.driver.request(0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    s.driver
        .request(1, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
    s.driver.request(2, VIRTIO_BLK_T_FLUSH, 0, &[]);
    // An unsupported request still costs an operation.
    s.driver.request(3, 0xdead, 0, &[]);
    s.block.process_queue();
    assert_eq!(s.driver.used_idx(), 2);
    // Lifting the limits at run time lets the rest through on the next wake-up.
    s.block.update_rate_limiter(&RateLimiterConfig::default());
    s.block.on_rate_limiter_timer();
    assert_eq!(s.driver.used_idx(), 4);
    assert_eq!(s.driver.status(2), OK);
    assert_eq!(s.driver.status(3), UNSUPP);
    assert_eq!(s.block.metrics().rate_limited, 1);
}

#[test]
fn rate_limited_queue_resumes_from_its_timer_on_the_event_loop() {
    let t = image();
    let mut config = drive(Some(t.as_path()));
    // One request per 50 ms.
    config.rate_limiter = RateLimiterConfig {
        bandwidth: None,
        ops: Some(bucket(1, None, 50)),
    };
    let mut s = setup_with(config, Some(t), false);
    for k in 0..4u64 {
        s.driver
            .request(k, VIRTIO_BLK_T_IN, k, &[(DATA + k * 0x1000, 512, true)]);
    }
    let block = Arc::new(Mutex::new(s.block));
    let mut ops = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    ops.add_subscriber(block.clone());
    let start = std::time::Instant::now();
    block.lock().unwrap().process_queue();
    assert_eq!(s.driver.used_idx(), 1);
    // Only the limiter's timerfd wakes the loop: each wake-up completes one more request.
    let mut wakeups = 0;
    while s.driver.used_idx() < 4 {
        assert!(start.elapsed() < Duration::from_secs(10), "stalled");
        wakeups += ops.run_with_timeout(1000).unwrap();
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(150), "{took:?}");
    assert!(wakeups >= 3, "{wakeups}");
    for k in 0..4u64 {
        assert_eq!(s.driver.status(k), OK);
        assert_eq!(
            s.driver.read(DATA + k * 0x1000, 512),
            vec![k.to_le_bytes()[0]; 512]
        );
    }
    assert_eq!(block.lock().unwrap().metrics().rate_limited, 3);
}

#[test]
fn queue_kept_full_is_served_in_bounded_passes() {
    let mut s = setup();
    // GET_ID requests sharing one header, data buffer and status byte.
    for _ in 0..80 {
        s.driver
            .request(0, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
    }
    let mem = s.driver.m().clone();
    let block = &mut s.block;
    assert_pass_bounded(BATCH_LIMIT, || {
        while block.queue_events()[0].read().is_ok() {}
        let used = with_refilling_guest(&mem, DESC, QUEUE_SIZE, 20 * BATCH_LIMIT, || {
            block.process_queue()
        });
        // A re-armed queue event brings the event loop back for the rest.
        (used, block.queue_events()[0].read().is_ok())
    });
    assert!(s.block.metrics().get_id_ops >= BATCH_LIMIT as u64);
}

#[test]
fn swap_and_detach_flush_the_image_first_and_report_errors() {
    let mut s = setup();
    s.driver.write(DATA, &[0xab; 512]);
    s.driver
        .request(0, VIRTIO_BLK_T_OUT, 1, &[(DATA, 512, false)]);
    s.block.process_queue();
    assert_eq!(s.driver.status(0), OK);
    let first = s.image.take().unwrap();
    // Swapped out: flushed first.
    let second = image();
    s.block.swap_backing(Some(second.as_path()), false).unwrap();
    assert_eq!(s.block.metrics().backing_flushes, 1);
    assert_eq!(file_bytes(&first, 512, 512), vec![0xab; 512]);
    // A failing flush refuses the detach, names the image and keeps it attached.
    s.block.device.backend.disk.as_mut().unwrap().fail_flush = Some(std::io::ErrorKind::Other);
    let err = s.block.swap_backing(None, false).unwrap_err();
    assert!(matches!(err, BlockError::Flush { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&second.as_path().display().to_string()),
        "{err}"
    );
    assert_eq!(s.block.path(), Some(second.as_path()));
    assert_eq!(s.block.capacity(), SECTORS);
    assert_eq!(s.block.metrics().backing_flushes, 1);
    // Once the flush works the detach goes through.
    s.block.device.backend.disk.as_mut().unwrap().fail_flush = None;
    s.block.swap_backing(None, false).unwrap();
    assert_eq!(s.block.metrics().backing_flushes, 2);
    assert_eq!(s.block.path(), None);
    // An empty slot or a read-only image has nothing to flush.
    s.block.swap_backing(Some(first.as_path()), true).unwrap();
    s.block.swap_backing(None, false).unwrap();
    assert_eq!(s.block.metrics().backing_flushes, 2);
}

/// Registers a driver reads, for comparing a transport with its restored copy: identification,
/// features, status, ISR, config generation, each queue's size and readiness, the capacity.
fn registers(t: &mut MmioTransport) -> Vec<u32> {
    let r = |t: &mut MmioTransport, off: u64| {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    let mut out: Vec<u32> = [
        0x00, 0x04, 0x08, 0x10, 0x60, 0x70, 0xfc, 0x34, 0x44, 0x100, 0x104,
    ]
    .into_iter()
    .map(|off| r(t, off))
    .collect();
    t.write(0x14, &1u32.to_le_bytes());
    out.push(r(t, 0x10));
    out
}

/// A running device and its transport are saved (through serde, as a snapshot file would
/// hold them), rebuilt from the state, and the restored pair behaves the same: the transport
/// reads the same registers and the device serves the next request on the restored queue
/// where the old one stopped.
#[test]
fn saved_state_restores_a_running_device() {
    let t = image();
    let cfg = drive(Some(t.as_path()));
    let mem = mem();
    let block = Arc::new(Mutex::new(Block::new(&cfg).unwrap()));
    let mut transport = MmioTransport::new(block.clone(), irq(), mem.clone());
    let mut w = |off: u64, v: u32| transport.write(off, &v.to_le_bytes());
    w(0x70, status::ACKNOWLEDGE | status::DRIVER);
    w(0x24, 1);
    w(0x20, 1); // VERSION_1
    w(
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    w(0x38, u32::from(QUEUE_SIZE));
    w(0x80, u32::try_from(DESC).unwrap());
    w(0x90, u32::try_from(AVAIL).unwrap());
    w(0xa0, u32::try_from(USED).unwrap());
    w(0x44, 1);
    w(
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    let mut d = Driver::new(&mem);
    d.request(0, VIRTIO_BLK_T_IN, 5, &[(DATA, 512, true)]);
    block.lock().unwrap().process_queue();
    assert_eq!(d.status(0), OK);

    let saved = serde_json::to_string(&(block.lock().unwrap().state(), transport.state())).unwrap();
    let before = registers(&mut transport);
    drop(transport);
    drop(block);
    let (state, mmio): (BlockState, MmioState) = serde_json::from_str(&saved).unwrap();
    assert!(state.virtio.activated);
    assert_eq!(state.virtio.queues[0].next_avail, 1);
    assert_eq!(
        (state.capacity, state.path.as_deref()),
        (SECTORS, Some(t.as_path()))
    );

    let block = Arc::new(Mutex::new(Block::restore(&cfg, &state).unwrap()));
    assert!(!block.lock().unwrap().is_activated());
    let mut transport = MmioTransport::new(block.clone(), irq(), mem.clone());
    transport.restore(&mmio).unwrap();
    assert!(block.lock().unwrap().is_activated());
    assert_eq!(registers(&mut transport), before);
    assert_eq!(block.lock().unwrap().state(), state);
    d.request(1, VIRTIO_BLK_T_IN, 6, &[(DATA, 512, true)]);
    block.lock().unwrap().process_queue();
    assert_eq!(d.status(1), OK);
    assert_eq!(d.read(DATA, 512), vec![6; 512]);
    assert_eq!(d.used_idx(), 2);
}

#[test]
fn restore_refuses_a_state_that_does_not_fit() {
    let t = image();
    let cfg = drive(Some(t.as_path()));
    let state = Block::new(&cfg).unwrap().state();
    // Another image size, another drive, another kind of device.
    let mut other = state.clone();
    other.capacity += 1;
    assert!(matches!(
        Block::restore(&cfg, &other),
        Err(BlockError::Restore(RestoreError::Mismatch {
            field: "capacity",
            ..
        }))
    ));
    let mut other = state.clone();
    other.drive_id = "disk9".into();
    assert!(Block::restore(&cfg, &other).is_err());
    let mut other = state.clone();
    other.virtio.device_type = 1;
    assert!(matches!(
        Block::restore(&cfg, &other),
        Err(BlockError::Restore(RestoreError::DeviceType {
            saved: 1,
            device: 2
        }))
    ));
    // Features the read-only drive does not offer.
    let mut other = state.clone();
    other.virtio.acked_features = 1 << VIRTIO_BLK_F_DISCARD;
    let mut ro = cfg.clone();
    ro.read_only = true;
    assert!(matches!(
        Block::restore(&ro, &other),
        Err(BlockError::Restore(RestoreError::Features { .. }))
    ));
    // A device that was not running is not activated by its transport's restore.
    let block = Arc::new(Mutex::new(Block::restore(&cfg, &state).unwrap()));
    let mut transport = MmioTransport::new(block.clone(), irq(), mem());
    let mmio = transport.state();
    transport.restore(&mmio).unwrap();
    assert!(!block.lock().unwrap().is_activated());
    let mut short = mmio.clone();
    short.queues.clear();
    assert!(matches!(
        transport.restore(&short),
        Err(RestoreError::TransportQueues {
            saved: 0,
            device: 1
        })
    ));
}
