//! Helpers shared by the device tests: a split ring driven by hand as a guest driver would, a
//! device on its own event loop, a temporary directory.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioDevice;

/// `VRING_DESC_F_NEXT`.
pub(crate) const VRING_DESC_F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub(crate) const VRING_DESC_F_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`.
pub(crate) const VRING_DESC_F_INDIRECT: u16 = 4;
/// How long a test waits for something that should happen soon.
pub(crate) const WAIT: Duration = Duration::from_secs(5);

static DIR_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A temporary directory removed on drop.
pub(crate) struct TmpDir(pub PathBuf);

impl TmpDir {
    /// A fresh, empty directory named `<prefix>-<pid>-<seq>`.
    pub fn new(prefix: &str) -> Self {
        let d = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            DIR_SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TmpDir(d)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A split ring as the driver sees it: the descriptor table at `base`, the avail ring at
/// +4 KiB, the used ring at +8 KiB (room for up to 256 entries).
pub(crate) struct Ring {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    size: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    /// A ready `Queue` of `size` entries with its rings at `base`, indexes and event fields
    /// zeroed.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> (Ring, Queue) {
        let r = Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
            avail_idx: 0,
            used_seen: 0,
        };
        let used_event = r.avail + 4 + 2 * u64::from(size);
        let avail_event = r.used + 4 + 8 * u64::from(size);
        for a in [
            r.avail,
            r.avail + 2,
            used_event,
            r.used,
            r.used + 2,
            avail_event,
        ] {
            mem.write_obj(0u16, GuestAddress(a)).unwrap();
        }
        let mut q = Queue::new(size).unwrap();
        q.try_set_size(size).unwrap();
        q.try_set_desc_table_address(GuestAddress(r.desc)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(r.avail)).unwrap();
        q.try_set_used_ring_address(GuestAddress(r.used)).unwrap();
        q.set_ready(true);
        assert!(q.is_valid(mem));
        (r, q)
    }

    /// Write descriptor `i`.
    pub fn set_desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let a = GuestAddress(self.desc + 16 * u64::from(i));
        mem.write_obj(addr, a).unwrap();
        mem.write_obj(len, GuestAddress(a.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(a.0 + 14)).unwrap();
    }

    /// Make the chain at `head` available.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// New used entries: (descriptor id, length).
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((u16::try_from(id).unwrap(), len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// An event loop with one device on it.
pub(crate) type DeviceLoop<D> = EventManager<Arc<Mutex<D>>>;

/// `dev` subscribed to a new event loop, and clones of its queue-notification `EventFd`s (the
/// driver's kicks).
pub(crate) fn on_event_loop<D: MutEventSubscriber + VirtioDevice + 'static>(
    dev: D,
) -> (Arc<Mutex<D>>, DeviceLoop<D>, Vec<EventFd>) {
    let kicks = dev
        .queue_events()
        .iter()
        .map(|e| e.try_clone().unwrap())
        .collect();
    let dev = Arc::new(Mutex::new(dev));
    let mut em = EventManager::new().unwrap();
    em.add_subscriber(dev.clone());
    (dev, em, kicks)
}

/// Run the event loop until it is idle (fails if it never is: a spinning device).
pub(crate) fn pump<S: MutEventSubscriber>(em: &mut EventManager<S>) {
    for _ in 0..1000 {
        if em.run_with_timeout(0).unwrap() == 0 {
            return;
        }
    }
    panic!("event loop never went idle");
}

/// Run `pass` (one event-loop pass of a device) while another thread plays a hostile guest
/// that keeps the split ring at `base` (layout of [`Ring`], `size` entries) as full as the
/// device allows: it publishes the heads of the last `size` available entries over and over
/// (the same heads again; a driver may do that — never-written slots read as head 0, which
/// must be a chain too), keeping the available index `size` entries ahead of
/// the used index. It stops after `max_republish` chains, so a device without a per-pass limit
/// ends (and fails the caller's check) instead of spinning forever. Returns how many chains
/// the device used during `pass`.
pub(crate) fn with_refilling_guest(
    mem: &GuestMemoryMmap,
    base: u64,
    size: u16,
    max_republish: usize,
    pass: impl FnOnce(),
) -> usize {
    use std::sync::atomic::AtomicBool;
    let avail = base + 0x1000;
    let used = base + 0x2000;
    let used_before: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
    let avail_before: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
    let heads: Vec<u16> = (1..=size)
        .map(|i| {
            let slot = u64::from(avail_before.wrapping_sub(i) % size);
            mem.read_obj(GuestAddress(avail + 4 + 2 * slot)).unwrap()
        })
        .collect();
    let stop = AtomicBool::new(false);
    let running = AtomicBool::new(false);
    std::thread::scope(|s| {
        let guest = s.spawn(|| {
            let mut avail_idx = avail_before;
            let mut republished = 0usize;
            while !stop.load(Ordering::SeqCst) && republished < max_republish {
                let used_idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
                while avail_idx.wrapping_sub(used_idx) < size && republished < max_republish {
                    let slot = u64::from(avail_idx % size);
                    let head = heads[republished % heads.len()];
                    mem.write_obj(head, GuestAddress(avail + 4 + 2 * slot))
                        .unwrap();
                    avail_idx = avail_idx.wrapping_add(1);
                    std::sync::atomic::fence(Ordering::SeqCst);
                    mem.write_obj(avail_idx, GuestAddress(avail + 2)).unwrap();
                    republished += 1;
                }
                running.store(true, Ordering::SeqCst);
                std::hint::spin_loop();
            }
            running.store(true, Ordering::SeqCst);
        });
        // The pass starts once the guest is publishing.
        while !running.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        pass();
        stop.store(true, Ordering::SeqCst);
        guest.join().unwrap();
    });
    let used_after: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
    usize::from(used_after.wrapping_sub(used_before))
}

/// Check a per-pass batch limit: `pass` runs one event-loop pass against a guest that keeps
/// the queue full ([`with_refilling_guest`]) and returns (chains used, whether the queue was
/// re-armed for the next pass). Every pass must stay within `limit`, and a pass that reached it
/// must have re-armed the queue. Passes are repeated until one reaches the limit (the guest
/// thread may be descheduled and let a pass drain the ring first).
pub(crate) fn assert_pass_bounded(limit: usize, mut pass: impl FnMut() -> (usize, bool)) {
    for _ in 0..50 {
        let (used, rearmed) = pass();
        assert!(used <= limit, "one pass used {used} chains, limit {limit}");
        if used == limit {
            assert!(
                rearmed,
                "the pass reached its limit but did not re-arm the queue"
            );
            return;
        }
    }
    panic!("no pass reached the limit of {limit}: the guest thread never kept up");
}
