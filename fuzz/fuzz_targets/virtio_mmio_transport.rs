//! The virtio-mmio transport (`kestrel_devices::virtio::mmio::MmioTransport`) driven by a
//! hostile driver: register reads and writes of any width, queue setup with rings anywhere
//! (outside guest memory, in its hole, across region ends, overlapping, huge or odd sizes),
//! status transitions, `DRIVER_OK` activation, resets, config-space accesses at any offset and
//! width, guest memory writes (ring and buffer contents) and queue notifications, for every
//! device type: virtio-blk over a 32 KiB memfd image, virtio-net in its empty-slot mode (no
//! TAP: link down, the hot-attach slot), hybrid vsock on a temporary Unix socket, virtio-fs
//! served in-process from a temporary directory. Each device runs in a real `EventManager`,
//! as in the VMM (activation and notifications are handled there).
//!
//! Guest memory: three regions, 0–2 MiB, 3–5 MiB and 6–8 MiB (holes at 2–3 and 5–6 MiB).
//!
//! | input bytes | use                                                                        |
//! |-------------|----------------------------------------------------------------------------|
//! | `[0]`       | device: `b % 4` = blk, net, vsock, fs; bit 2 read-only (blk, fs)           |
//! | then        | commands, each an opcode byte (`b % 14`) and its arguments:                |
//! |             | 0 write register: offset byte (`(b % 64) * 4`), u32                        |
//! |             | 1 read register: offset byte (`(b % 64) * 4`, width `[4,1,2,8][b >> 6]`)   |
//! |             | 2 config read: u16 offset (`0x100 + v % 0xf08`), width byte                |
//! |             | 3 config write: u16 offset, width byte, then `width` data bytes            |
//! |             | 4 queue setup: queue byte, size byte, three address bytes (a table of      |
//! |             |   hostile addresses; 15 = a raw u64 follows), then QueueReady = 1          |
//! |             | 5 status write: a byte picking a value (or the byte itself)                |
//! |             | 6 feature negotiation: ACK, DRIVER, the offer masked by a u64, FEATURES_OK |
//! |             | 7 DRIVER_OK (status \| 4)                                                  |
//! |             | 8 notify: queue byte, then the event loop runs                             |
//! |             | 9 guest memory write: base byte, u16 offset, length byte, the bytes        |
//! |             | 10 run the event loop                                                      |
//! |             | 11 reset (status 0), then the event loop                                   |
//! |             | 12 interrupt ack: u32                                                      |
//! |             | 13 a well-behaved driver: every queue 16 entries (or its maximum) at       |
//! |             |    `0x10000 + 0x4000 * i` (desc, avail +0x1000, used +0x2000), all offered |
//! |             |    features (flag byte: bit 0 drops EVENT_IDX), FEATURES_OK, DRIVER_OK     |
//!
//! Nothing is asserted beyond "no panic" (a device's event handler must not panic either: the
//! VMM contains that, but it still is a bug) and that the transport always answers; the
//! sanitizer catches accesses outside guest memory.

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kestrel_api::{DriveConfig, FsCache, FsConfig, NetConfig};
use kestrel_devices::virtio::block::{Block, BlockConfig};
use kestrel_devices::virtio::fs::Fs;
use kestrel_devices::virtio::mmio::{reg, MmioTransport, CONFIG_SPACE_OFFSET, MMIO_WINDOW_SIZE};
use kestrel_devices::virtio::net::Net;
use kestrel_devices::virtio::vsock::{Vsock, VsockConfig};
use kestrel_devices::virtio::{
    status, GuestMem, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use kestrel_devices::BusDevice;
use kestrel_fuzz::{
    fresh_share, guest_memory, ignore_sigpipe, interrupt, limit_file_size, memfd_image,
    run_until_idle, scratch_dir,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

const MIB: u64 = 1 << 20;
const REGIONS: [(u64, u64); 3] = [(0, 2 * MIB), (3 * MIB, 2 * MIB), (6 * MIB, 2 * MIB)];
const IMAGE_SIZE: usize = 64 * 512;
const MAX_FILE: u64 = 4 << 20;
const QUEUE_AREA: u64 = 0x1_0000;
const QUEUE_STRIDE: u64 = 0x4000;

/// Ring addresses a hostile driver may pick (index 15 reads a raw u64 instead).
const ADDRS: [u64; 15] = [
    0,
    QUEUE_AREA,
    QUEUE_AREA + 0x1000,
    2 * MIB - 0x1000,
    2 * MIB - 0x10,  // runs off the end of region 0
    2 * MIB,         // in the hole
    3 * MIB - 8,     // starts in the hole, ends in region 1
    3 * MIB,         // region 1
    5 * MIB - 0x100, // end of region 1
    6 * MIB,         // region 2
    8 * MIB - 2,     // end of memory
    8 * MIB,         // just past it
    1,               // misaligned
    0xffff_ffff_ffff_fff0,
    0xffff_ffff_0000_0000,
];

/// Queue sizes (index 15: whatever QueueNumMax says).
const SIZES: [u32; 15] = [
    0,
    1,
    2,
    3,
    4,
    8,
    16,
    64,
    256,
    1024,
    0x8000,
    0xffff,
    0x1_0000,
    0x8000_0000,
    u32::MAX,
];

/// Bases of guest-memory writes.
const MEM_BASES: [u64; 4] = [QUEUE_AREA, MIB, 3 * MIB, 6 * MIB];

/// Status values (index >= 10: the byte itself).
const STATUSES: [u32; 10] = [
    0,
    status::ACKNOWLEDGE,
    status::ACKNOWLEDGE | status::DRIVER,
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    status::FAILED,
    status::DEVICE_NEEDS_RESET,
    status::DRIVER_OK,
    status::ACKNOWLEDGE | status::DRIVER_OK,
    u32::MAX,
];

/// The block image: a memfd kept for the process's life, reached by its /proc path.
fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| memfd_image(c"kestrel-fuzz-mmio-blk", IMAGE_SIZE as u64))
}

/// This process's scratch directory (vsock sockets, the fs share); files written through
/// virtio-fs are capped at 4 MiB.
fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        limit_file_size(MAX_FILE);
        ignore_sigpipe();
        let d = scratch_dir("mmio");
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// Reads fuzz bytes; missing bytes read as zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
}

struct Machine<D: VirtioDevice + MutEventSubscriber + 'static> {
    mem: GuestMem,
    transport: MmioTransport,
    em: EventManager<Arc<Mutex<D>>>,
    nqueues: u32,
}

impl<D: VirtioDevice + MutEventSubscriber + 'static> Machine<D> {
    fn new(dev: D, mem: GuestMem) -> Self {
        let nqueues = dev.queue_max_sizes().len() as u32;
        let dev = Arc::new(Mutex::new(dev));
        let mut em = EventManager::<Arc<Mutex<D>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let transport = MmioTransport::new(dev, interrupt(), mem.clone());
        let mut m = Machine {
            mem,
            transport,
            em,
            nqueues,
        };
        m.run();
        m
    }

    fn run(&mut self) {
        run_until_idle(&mut self.em, 8);
    }

    fn write(&mut self, offset: u64, v: u32) {
        self.transport.write(offset, &v.to_le_bytes());
    }

    fn read(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn queue_setup(&mut self, q: u32, size: u32, addrs: [u64; 3]) {
        self.write(reg::QUEUE_SEL, q);
        self.write(reg::QUEUE_NUM, size);
        for (addr, (low, high)) in addrs.into_iter().zip([
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH),
            (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH),
            (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH),
        ]) {
            self.write(low, addr as u32);
            self.write(high, (addr >> 32) as u32);
        }
        self.write(reg::QUEUE_READY, 1);
    }

    fn negotiate(&mut self, mask: u64) {
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let mut offered = 0u64;
        for page in 0..2u32 {
            self.write(reg::DEVICE_FEATURES_SEL, page);
            offered |= u64::from(self.read(reg::DEVICE_FEATURES)) << (32 * page);
        }
        let wanted = offered & mask;
        for page in 0..2u32 {
            self.write(reg::DRIVER_FEATURES_SEL, page);
            self.write(reg::DRIVER_FEATURES, (wanted >> (32 * page)) as u32);
        }
        let s = self.read(reg::STATUS);
        self.write(reg::STATUS, s | status::FEATURES_OK);
        let _ = self.read(reg::STATUS);
    }

    /// Queue `q` (in range, one past it, or huge) set up with a fuzzed size and addresses
    /// (from the interesting lists or raw).
    fn fuzzed_queue_setup(&mut self, inp: &mut Input<'_>) {
        let q = u32::from(inp.byte());
        let q = if q >= 0xf0 {
            q << 24
        } else {
            q % (self.nqueues + 1)
        };
        let s = usize::from(inp.byte() % 16);
        let size = match SIZES.get(s) {
            Some(&v) => v,
            None => {
                self.write(reg::QUEUE_SEL, q);
                self.read(reg::QUEUE_NUM_MAX)
            }
        };
        let mut addrs = [0u64; 3];
        for a in &mut addrs {
            let i = usize::from(inp.byte() % 16);
            *a = match ADDRS.get(i) {
                Some(&v) => v,
                None => inp.u64(),
            };
        }
        self.queue_setup(q, size, addrs);
    }

    /// A driver's whole bring-up: every queue set up in the queue area, features negotiated
    /// (without `EVENT_IDX` if asked), `DRIVER_OK`.
    fn bring_up(&mut self, no_event_idx: bool) {
        for q in 0..self.nqueues {
            self.write(reg::QUEUE_SEL, q);
            let size = self.read(reg::QUEUE_NUM_MAX).min(16);
            let base = QUEUE_AREA + QUEUE_STRIDE * u64::from(q);
            self.queue_setup(q, size, [base, base + 0x1000, base + 0x2000]);
        }
        let mut mask = u64::MAX;
        if no_event_idx {
            mask &= !VIRTIO_RING_F_EVENT_IDX;
        }
        self.negotiate(mask);
        let s = self.read(reg::STATUS);
        self.write(reg::STATUS, s | status::DRIVER_OK);
        self.run();
    }

    fn step(&mut self, inp: &mut Input<'_>) {
        match inp.byte() % 14 {
            0 => {
                let off = u64::from(inp.byte() % 64) * 4;
                let v = inp.u32();
                self.write(off, v);
            }
            1 => {
                let b = inp.byte();
                let off = u64::from(b % 64) * 4;
                let mut buf = [0u8; 8];
                let w = [4, 1, 2, 8][usize::from(b >> 6)];
                self.transport.read(off, &mut buf[..w]);
            }
            2 => {
                let off = CONFIG_SPACE_OFFSET
                    + u64::from(inp.u16()) % (MMIO_WINDOW_SIZE - CONFIG_SPACE_OFFSET + 8);
                let w = usize::from(inp.byte() % 17);
                let mut buf = [0u8; 16];
                self.transport.read(off, &mut buf[..w]);
            }
            3 => {
                let off = CONFIG_SPACE_OFFSET
                    + u64::from(inp.u16()) % (MMIO_WINDOW_SIZE - CONFIG_SPACE_OFFSET + 8);
                let w = usize::from(inp.byte() % 17);
                let data = inp.bytes(w).to_vec();
                self.transport.write(off, &data);
            }
            4 => self.fuzzed_queue_setup(inp),
            5 => {
                let b = inp.byte();
                let v = STATUSES
                    .get(usize::from(b))
                    .copied()
                    .unwrap_or(u32::from(b));
                self.write(reg::STATUS, v);
                self.run();
            }
            6 => {
                let mask = inp.u64() | VIRTIO_F_VERSION_1;
                self.negotiate(mask);
            }
            7 => {
                let s = self.read(reg::STATUS);
                self.write(reg::STATUS, s | status::DRIVER_OK);
                self.run();
            }
            8 => {
                let q = u32::from(inp.byte()) % (self.nqueues + 2);
                self.write(reg::QUEUE_NOTIFY, q);
                self.run();
            }
            9 => {
                let base = MEM_BASES[usize::from(inp.byte() % 4)];
                let addr = base + u64::from(inp.u16());
                let n = usize::from(inp.byte());
                let data = inp.bytes(n).to_vec();
                let _ = self.mem.memory().write_slice(&data, GuestAddress(addr));
            }
            10 => self.run(),
            11 => {
                self.write(reg::STATUS, 0);
                self.run();
            }
            12 => {
                let v = inp.u32();
                self.write(reg::INTERRUPT_ACK, v);
            }
            _ => {
                let flags = inp.byte();
                self.bring_up(flags & 1 != 0);
            }
        }
    }

    fn drive(mut self, mut inp: Input<'_>) {
        // Bounded: every command takes at least one byte.
        while !inp.0.is_empty() {
            self.step(&mut inp);
        }
        self.run();
        // Every register still answers.
        for off in (0..CONFIG_SPACE_OFFSET).step_by(4) {
            let _ = self.read(off);
        }
        let _ = self.transport.status();
        self.write(reg::STATUS, 0);
        self.run();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let read_only = control & 4 != 0;
    let _ = base();
    let mem = GuestMemoryAtomic::new(guest_memory(&REGIONS.map(|(a, l)| (a, l as usize))));
    let inp = Input(rest);
    match control % 4 {
        0 => {
            let config = DriveConfig {
                drive_id: "fuzz".into(),
                path_on_host: Some(image().clone()),
                is_read_only: read_only,
                ..DriveConfig::default()
            };
            let config = BlockConfig::try_from(&config).unwrap();
            Machine::new(Block::new(&config).unwrap(), mem).drive(inp);
        }
        1 => {
            let config = NetConfig {
                iface_id: "fuzz".into(),
                ..NetConfig::default()
            };
            let config = (&config).try_into().unwrap();
            Machine::new(Net::new(&config).unwrap(), mem).drive(inp);
        }
        2 => {
            let uds = base().join("v.sock");
            let _ = std::fs::remove_file(&uds);
            Machine::new(Vsock::new(&VsockConfig::new(3, &uds)).unwrap(), mem).drive(inp);
            let _ = std::fs::remove_file(&uds);
        }
        _ => {
            let mut config = FsConfig::shared_dir("fuzz", fresh_share(base()));
            config.read_only = read_only;
            config.cache = FsCache::Auto;
            let config = (&config).try_into().unwrap();
            Machine::new(Fs::new(&config).unwrap(), mem).drive(inp);
        }
    }
});
