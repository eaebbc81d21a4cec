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

use event_manager::{EventManager, SubscriberOps};
use kestrel_devices::virtio::vsock::{muxer, Vsock, VsockConfig, RX_QUEUE, TX_QUEUE};
use kestrel_devices::virtio::VirtioDevice;
use kestrel_fuzz::{
    guest_memory, interrupt, post_writable_buffers, queue, queue_size, run_until_idle, scratch_dir,
    split_ring, write_parts,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryAtomic;

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

/// A private directory for this process's sockets (emptied after every input).
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| scratch_dir("vsock"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let size = queue_size(control);
    let no_rx = control & 0x08 != 0;
    let listener = control & 0x10 != 0;
    let rx_from_input = control & 0x20 != 0;
    let reset = control & 0x40 != 0;
    let alias = control & 0x80 != 0;

    let mem = guest_memory(&[(0, MEM_SIZE), (HIGH, HIGH_SIZE)]);
    let (desc, avail, mut rest) = split_ring(rest, size);
    write_parts(&mem, &[(desc, TX_DESC), (avail, TX_AVAIL)]);
    if rx_from_input {
        let (rx_desc, rx_avail, tail) = split_ring(rest, RX_SIZE);
        write_parts(&mem, &[(rx_desc, RX_DESC), (rx_avail, RX_AVAIL)]);
        rest = tail;
    } else if !no_rx {
        post_writable_buffers(&mem, RX_DESC, RX_AVAIL, RX_BUF, RX_SIZE, RX_BUF_LEN);
    }
    let bufs = &rest[..rest.len().min(RX_BUF as usize - BUF as usize)];
    write_parts(&mem, &[(bufs, BUF)]);
    if alias {
        write_parts(&mem, &[(bufs, HIGH)]);
    }
    let (tx_used, rx_used) = if alias {
        (TX_DESC, RX_BUF)
    } else {
        (TX_USED, RX_USED)
    };

    let _ = std::fs::create_dir_all(dir());
    let uds = dir().join("v.sock");
    let dev = Vsock::new(&VsockConfig::new(3, &uds)).unwrap();
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
        queue(RX_SIZE, RX_DESC, RX_AVAIL, rx_used, false),
        queue(size, TX_DESC, TX_AVAIL, tx_used, false),
        queue(RX_SIZE, EV_DESC, EV_AVAIL, EV_USED, false),
    ];
    dev.lock()
        .unwrap()
        .activate(GuestMemoryAtomic::new(mem), interrupt(), queues)
        .unwrap();
    tx_evt.write(1).unwrap();
    rx_evt.write(1).unwrap();
    run_until_idle(&mut em, 32);
    // A second notification on the same rings must be just as safe.
    tx_evt.write(1).unwrap();
    run_until_idle(&mut em, 32);
    {
        let d = dev.lock().unwrap();
        let _ = d.metrics();
        let _ = d.needs_reset();
    }
    if reset {
        dev.lock().unwrap().reset();
        run_until_idle(&mut em, 32);
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
