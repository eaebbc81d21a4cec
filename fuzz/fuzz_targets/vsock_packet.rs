//! virtio-vsock tx processing (packet parsing, connection handling, replies on the rx queue)
//! on guest-controlled rings.
//!
//! The input is laid out in guest memory as the tx virtqueue plus its buffers:
//!
//! | input bytes                  | guest memory                                         |
//! |------------------------------|------------------------------------------------------|
//! | `[0]`                        | control: tx queue size `1 << (b & 7 + 1)` (2..=256), |
//! |                              | bit 3 no rx buffers, bit 4 a host listener at        |
//! |                              | `<uds>_1`, bit 5 rx ring from the input, bit 6 reset |
//! |                              | the device afterwards, bit 7 aliasing: the tx used   |
//! |                              | ring on the tx descriptor table, the rx used ring in |
//! |                              | the rx buffers, the buffers mirrored at `HIGH`       |
//! | next `16 * size`             | tx descriptor table at `TX_DESC`, verbatim           |
//! | next `6 + 2 * size`          | tx available ring at `TX_AVAIL`, verbatim            |
//! | bit 5: next `16 * 16 + 38`   | rx descriptor table and available ring, verbatim     |
//! | the rest                     | buffers at `BUF` (headers, payloads)                 |
//!
//! Guest memory is 128 KiB at 0 plus 2 MiB at `HIGH` (a hole between), so descriptors may
//! point into either region, into the hole, across a region's end, or at the rings.
//!
//! Without bit 5 the rx queue holds 16 well-formed buffers (unless bit 3), so the device's
//! replies (RST, RESPONSE, credit updates, data from the host listener) are written too. The
//! device runs in a real event manager, as in the VMM. Nothing is asserted beyond "no panic";
//! the sanitizer catches accesses outside guest memory.

#![no_main]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use kestrel_devices::virtio::vsock::{muxer, Vsock, RX_QUEUE, TX_QUEUE};
use kestrel_devices::virtio::{VirtioDevice, VirtioInterrupt};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use event_manager::{EventManager, SubscriberOps};

const MEM_SIZE: usize = 0x2_0000;
const TX_DESC: u64 = 0x0;
const TX_AVAIL: u64 = 0x1000;
const TX_USED: u64 = 0x2000;
const RX_DESC: u64 = 0x3000;
const RX_AVAIL: u64 = 0x3100;
const RX_USED: u64 = 0x3200;
const EV_DESC: u64 = 0x3400;
const EV_AVAIL: u64 = 0x3500;
const EV_USED: u64 = 0x3600;
const BUF: u64 = 0x4000;
const RX_BUF: u64 = 0x1_8000;
const HIGH: u64 = 0x10_0000;
const HIGH_SIZE: usize = 0x20_0000;
const RX_SIZE: u16 = 16;
const RX_BUF_LEN: u32 = 0x800;
const VRING_DESC_F_WRITE: u16 = 2;

/// A private directory for this process's sockets (emptied after every input).
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        std::env::temp_dir().join(format!("kestrel-fuzz-vsock-{}", std::process::id()))
    })
}

fn queue(size: u16, desc: u64, avail: u64, used: u64) -> Queue {
    let mut q = Queue::new(256).unwrap();
    q.try_set_size(size).unwrap();
    q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
    q.try_set_used_ring_address(GuestAddress(used)).unwrap();
    q.set_ready(true);
    q
}

fn run(em: &mut EventManager<Arc<Mutex<Vsock>>>) {
    for _ in 0..32 {
        if em.run_with_timeout(0).unwrap_or(0) == 0 {
            break;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let size: u16 = 1 << ((control & 7) + 1);
    let no_rx = control & 0x08 != 0;
    let listener = control & 0x10 != 0;
    let rx_from_input = control & 0x20 != 0;
    let reset = control & 0x40 != 0;
    let alias = control & 0x80 != 0;

    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), MEM_SIZE),
        (GuestAddress(HIGH), HIGH_SIZE),
    ])
    .unwrap();
    let take = |rest: &[u8], n: usize| -> (Vec<u8>, usize) {
        let n = n.min(rest.len());
        (rest[..n].to_vec(), n)
    };
    let mut off = 0;
    let (desc, n) = take(&rest[off..], 16 * usize::from(size));
    off += n;
    let (avail, n) = take(&rest[off..], 6 + 2 * usize::from(size));
    off += n;
    mem.write_slice(&desc, GuestAddress(TX_DESC)).unwrap();
    mem.write_slice(&avail, GuestAddress(TX_AVAIL)).unwrap();
    if rx_from_input {
        let (rx_desc, n) = take(&rest[off..], 16 * usize::from(RX_SIZE));
        off += n;
        let (rx_avail, n) = take(&rest[off..], 6 + 2 * usize::from(RX_SIZE));
        off += n;
        mem.write_slice(&rx_desc, GuestAddress(RX_DESC)).unwrap();
        mem.write_slice(&rx_avail, GuestAddress(RX_AVAIL)).unwrap();
    } else if !no_rx {
        for i in 0..RX_SIZE {
            let d = RX_DESC + 16 * u64::from(i);
            let addr = RX_BUF + u64::from(i) * u64::from(RX_BUF_LEN);
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(RX_BUF_LEN, GuestAddress(d + 8)).unwrap();
            mem.write_obj(VRING_DESC_F_WRITE, GuestAddress(d + 12))
                .unwrap();
            mem.write_obj(i, GuestAddress(RX_AVAIL + 4 + 2 * u64::from(i)))
                .unwrap();
        }
        mem.write_obj(RX_SIZE, GuestAddress(RX_AVAIL + 2)).unwrap();
    }
    let bufs = &rest[off..];
    let bufs = &bufs[..bufs.len().min(RX_BUF as usize - BUF as usize)];
    mem.write_slice(bufs, GuestAddress(BUF)).unwrap();
    if alias {
        mem.write_slice(bufs, GuestAddress(HIGH)).unwrap();
    }
    let (tx_used, rx_used) = if alias {
        (TX_DESC, RX_BUF)
    } else {
        (TX_USED, RX_USED)
    };

    let _ = std::fs::create_dir_all(dir());
    let uds = dir().join("v.sock");
    let dev = Vsock::new(3, &uds).unwrap();
    let host = if listener {
        let p = muxer::port_path(&uds, 1);
        let _ = std::fs::remove_file(&p);
        UnixListener::bind(&p).ok().map(|l| (l, p))
    } else {
        None
    };
    let tx_evt = dev.queue_events()[TX_QUEUE].try_clone().unwrap();
    let rx_evt = dev.queue_events()[RX_QUEUE].try_clone().unwrap();
    let dev = Arc::new(Mutex::new(dev));
    let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
    em.add_subscriber(dev.clone());

    let queues = vec![
        queue(RX_SIZE, RX_DESC, RX_AVAIL, rx_used),
        queue(size, TX_DESC, TX_AVAIL, tx_used),
        queue(RX_SIZE, EV_DESC, EV_AVAIL, EV_USED),
    ];
    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    dev.lock()
        .unwrap()
        .activate(GuestMemoryAtomic::new(mem), irq, queues)
        .unwrap();
    tx_evt.write(1).unwrap();
    rx_evt.write(1).unwrap();
    run(&mut em);
    // A second notification on the same rings must be just as safe.
    tx_evt.write(1).unwrap();
    run(&mut em);
    {
        let d = dev.lock().unwrap();
        let _ = d.metrics();
        let _ = d.needs_reset();
    }
    if reset {
        dev.lock().unwrap().reset();
        run(&mut em);
    }
    drop(em);
    drop(dev);
    if let Some((l, p)) = host {
        drop(l);
        let _ = std::fs::remove_file(p);
    }
    // Nothing left behind (the device removed its own socket on drop).
    let _ = std::fs::remove_dir(dir());
});
