//! A tiny guest that drives virtio-mmio devices without a kernel.
//!
//! The host prepares everything in guest memory before the guest runs (split rings, request
//! buffers, a page-table entry that maps the virtio-mmio windows); the guest only performs a
//! list of 32-bit stores: the device registers a driver writes (status, features, queue
//! layout, `DRIVER_OK`) and the `QueueNotify` writes that hand the prepared requests to the
//! devices, then one store to [`DONE_FLAG`], then `hlt`. The host then reads the used rings
//! from guest memory to see what the devices did.
//!
//! ```text
//!   lea rsi, [rip + table]          ; entries of (u64 address, u32 value, u32 pad)
//! 1:mov rdi, [rsi]
//!   test rdi, rdi                   ; address 0 ends the table
//!   jz 2f
//!   mov edx, [rsi + 8]
//!   mov [rdi], edx
//!   add rsi, 16
//!   jmp 1b
//! 2:hlt
//!   jmp 2b
//! ```

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemory};

// From `kestrel_arch::layout` (the guest layout Kestrel builds).
/// The boot identity map's page-directory-pointer table.
const PDPTE_START: u64 = 0xa000;
/// First virtio-mmio window; device `n` is at `VIRTIO_MMIO_START + n * VIRTIO_MMIO_WINDOW`.
const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
const VIRTIO_MMIO_WINDOW: u64 = 0x1000;

/// Where the guest stores [`DONE_MAGIC`] after its last register write.
pub const DONE_FLAG: u64 = 0x3f_f000;
/// The value stored at [`DONE_FLAG`].
pub const DONE_MAGIC: u32 = 0x600d_d00d;
/// Rings and buffers are allocated from here (4 MiB; the guest code sits at 1 MiB).
const ALLOC_START: u64 = 0x40_0000;
/// A page directory for the 3..4 GiB range (free low memory between the boot page tables
/// and the command line, see `kestrel_arch::layout`).
const MMIO_PD: u64 = 0xc000;
/// Queue size used for every queue.
pub const QUEUE_SIZE: u16 = 8;

// virtio-mmio registers (virtio 1.2 §4.2.2).
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// One split ring of a device.
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

/// A device the script drives: its MMIO window and rings.
#[derive(Debug, Clone)]
pub struct Dev {
    base: u64,
    rings: Vec<Ring>,
}

/// A guest buffer: address, length, whether the device writes it.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// What the host checks after the guest ran: the used ring of one queue.
#[derive(Debug, Clone, Copy)]
pub struct UsedRing {
    used: u64,
}

impl UsedRing {
    /// The used ring's `idx` (chains the device completed so far, modulo 2^16).
    pub fn idx<M: GuestMemory>(&self, mem: &M) -> u16 {
        mem.read_obj::<u16>(GuestAddress(self.used + 2))
            .expect("used ring in guest memory")
    }

    /// Used element `i`: (descriptor head, bytes written).
    pub fn elem<M: GuestMemory>(&self, mem: &M, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % QUEUE_SIZE);
        (
            mem.read_obj(GuestAddress(at)).expect("used elem"),
            mem.read_obj(GuestAddress(at + 4)).expect("used elem"),
        )
    }

    /// Poll (every 200 µs) until `idx` reaches `n` or `timeout` passes; returns the last idx.
    pub fn wait<M: GuestMemory>(&self, mem: &M, n: u16, timeout: Duration) -> u16 {
        let end = Instant::now() + timeout;
        loop {
            let i = self.idx(mem);
            if i >= n || Instant::now() >= end {
                return i;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// The guest's store list plus the guest memory the host writes before start.
#[derive(Debug, Default)]
pub struct Script {
    stores: Vec<(u64, u32)>,
    mem: Vec<(u64, Vec<u8>)>,
    next: u64,
}

impl Script {
    /// An empty script whose page tables map the virtio-mmio windows (one 2 MiB page).
    pub fn new() -> Script {
        let mut s = Script {
            next: ALLOC_START,
            ..Script::default()
        };
        // PDPT entry 3 (3..4 GiB) -> a page directory with one uncached 2 MiB page at the
        // first virtio-mmio window: present, writable, PWT, PCD, page size.
        s.write(PDPTE_START + 3 * 8, &(MMIO_PD | 0x3).to_le_bytes());
        let pde = (VIRTIO_MMIO_START - (3 << 30)) >> 21;
        s.write(MMIO_PD + 8 * pde, &(VIRTIO_MMIO_START | 0x9b).to_le_bytes());
        s
    }

    fn write(&mut self, addr: u64, data: &[u8]) {
        self.mem.push((addr, data.to_vec()));
    }

    fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let a = self.next.next_multiple_of(align);
        self.next = a + len;
        a
    }

    /// A device-readable buffer holding `data`.
    pub fn buf(&mut self, data: &[u8]) -> Buf {
        let addr = self.alloc(data.len() as u64, 16);
        self.write(addr, data);
        Buf {
            addr,
            len: data.len() as u32,
            writable: false,
        }
    }

    /// A zeroed device-writable buffer of `len` bytes.
    pub fn out_buf(&mut self, len: u32) -> Buf {
        let addr = self.alloc(u64::from(len), 16);
        self.write(addr, &vec![0u8; len as usize]);
        Buf {
            addr,
            len,
            writable: true,
        }
    }

    /// Guest store of `v` at `addr`.
    pub fn store(&mut self, addr: u64, v: u32) {
        assert_ne!(addr, 0, "address 0 ends the table");
        self.stores.push((addr, v));
    }

    /// Bring up virtio-mmio device number `index` (creation order: drives, network
    /// interfaces, vsock, shares) with `queues` queues of [`QUEUE_SIZE`]: ACKNOWLEDGE, DRIVER,
    /// features = VIRTIO_F_VERSION_1 only, FEATURES_OK, the queue layout, DRIVER_OK.
    pub fn device(&mut self, index: u64, queues: u16) -> Dev {
        let base = VIRTIO_MMIO_START + index * VIRTIO_MMIO_WINDOW;
        let n = u64::from(QUEUE_SIZE);
        self.store(base + STATUS, ACKNOWLEDGE);
        self.store(base + STATUS, ACKNOWLEDGE | DRIVER);
        self.store(base + DRIVER_FEATURES_SEL, 0);
        self.store(base + DRIVER_FEATURES, 0);
        self.store(base + DRIVER_FEATURES_SEL, 1);
        self.store(base + DRIVER_FEATURES, 1); // bit 32: VIRTIO_F_VERSION_1
        self.store(base + STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        let mut rings = Vec::new();
        for q in 0..queues {
            let desc = self.alloc(16 * n, 16);
            let avail = self.alloc(6 + 2 * n, 2);
            let used = self.alloc(6 + 8 * n, 4);
            self.write(desc, &vec![0u8; (16 * n) as usize]);
            self.write(avail, &vec![0u8; (6 + 2 * n) as usize]);
            self.write(used, &vec![0u8; (6 + 8 * n) as usize]);
            self.store(base + QUEUE_SEL, u32::from(q));
            self.store(base + QUEUE_NUM, u32::from(QUEUE_SIZE));
            for (lo, hi, a) in [
                (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, desc),
                (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, avail),
                (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, used),
            ] {
                self.store(base + lo, a as u32);
                self.store(base + hi, (a >> 32) as u32);
            }
            self.store(base + QUEUE_READY, 1);
            rings.push(Ring {
                desc,
                avail,
                used,
                next_desc: 0,
                avail_idx: 0,
            });
        }
        self.store(
            base + STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        Dev { base, rings }
    }

    /// Make `bufs` one available chain of queue `q` (written to memory before the guest
    /// runs; the device sees it when notified).
    pub fn chain(&mut self, dev: &mut Dev, q: usize, bufs: &[Buf]) {
        let r = &mut dev.rings[q];
        assert!(
            usize::from(r.next_desc) + bufs.len() <= usize::from(QUEUE_SIZE),
            "queue {q} full"
        );
        let head = r.next_desc;
        let mut writes = Vec::new();
        for (i, b) in bufs.iter().enumerate() {
            let d = head + i as u16;
            let mut e = Vec::with_capacity(16);
            e.extend_from_slice(&b.addr.to_le_bytes());
            e.extend_from_slice(&b.len.to_le_bytes());
            let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            e.extend_from_slice(&flags.to_le_bytes());
            e.extend_from_slice(&(d + 1).to_le_bytes());
            writes.push((r.desc + 16 * u64::from(d), e));
        }
        r.next_desc += bufs.len() as u16;
        let slot = r.avail + 4 + 2 * u64::from(r.avail_idx % QUEUE_SIZE);
        writes.push((slot, head.to_le_bytes().to_vec()));
        r.avail_idx += 1;
        writes.push((r.avail + 2, r.avail_idx.to_le_bytes().to_vec()));
        self.mem.extend(writes);
    }

    /// Guest store to queue `q`'s `QueueNotify`.
    pub fn notify(&mut self, dev: &Dev, q: u16) {
        self.store(dev.base + QUEUE_NOTIFY, u32::from(q));
    }

    /// The used ring of `dev`'s queue `q`.
    pub fn used(dev: &Dev, q: usize) -> UsedRing {
        UsedRing {
            used: dev.rings[q].used,
        }
    }

    /// The guest program: the store interpreter, its table (ending with the store to
    /// [`DONE_FLAG`]), as an ELF for `VmConfig::boot_source.kernel_image_path`.
    pub fn guest_elf(&self) -> Vec<u8> {
        let mut code = vec![0x48, 0x8d, 0x35]; // lea rsi, [rip + disp32]
        code.extend_from_slice(&25i32.to_le_bytes()); // table at 32, rip after lea = 7
        code.extend_from_slice(&[
            0x48, 0x8b, 0x3e, // 7: mov rdi, [rsi]
            0x48, 0x85, 0xff, // 10: test rdi, rdi
            0x74, 0x0b, // 13: jz 26
            0x8b, 0x56, 0x08, // 15: mov edx, [rsi + 8]
            0x89, 0x17, // 18: mov [rdi], edx
            0x48, 0x83, 0xc6, 0x10, // 20: add rsi, 16
            0xeb, 0xed, // 24: jmp 7
            0xf4, // 26: hlt
            0xeb, 0xfd, // 27: jmp 26
            0x90, 0x90, 0x90, // 29: pad to 32
        ]);
        assert_eq!(code.len(), 32);
        for (addr, v) in self
            .stores
            .iter()
            .chain(std::iter::once(&(DONE_FLAG, DONE_MAGIC)))
        {
            code.extend_from_slice(&addr.to_le_bytes());
            code.extend_from_slice(&v.to_le_bytes());
            code.extend_from_slice(&0u32.to_le_bytes());
        }
        code.extend_from_slice(&[0u8; 16]);
        crate::tiny_elf(&code)
    }

    /// Write the prepared guest memory (page tables, rings, buffers). Call after
    /// `Vm::create` (which writes the boot page tables) and before `Vm::start`.
    pub fn apply<M: GuestMemory>(&self, mem: &M) {
        for (addr, data) in &self.mem {
            mem.write_slice(data, GuestAddress(*addr))
                .expect("script memory inside guest RAM");
        }
        mem.write_obj(0u32, GuestAddress(DONE_FLAG))
            .expect("done flag inside guest RAM");
    }

    /// Wait until the guest stored [`DONE_MAGIC`]; false after `timeout`.
    pub fn wait_done<M: GuestMemory>(mem: &M, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if mem.read_obj::<u32>(GuestAddress(DONE_FLAG)).ok() == Some(DONE_MAGIC) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreter_finds_its_table_and_ends_with_the_done_store() {
        let mut s = Script::new();
        s.store(0x1234, 7);
        let elf = s.guest_elf();
        let code = &elf[120..];
        // rip after the lea is 7; the table starts at 7 + disp.
        let disp = i32::from_le_bytes(code[3..7].try_into().unwrap()) as usize;
        let table = &code[7 + disp..];
        assert_eq!(u64::from_le_bytes(table[..8].try_into().unwrap()), 0x1234);
        assert_eq!(u32::from_le_bytes(table[8..12].try_into().unwrap()), 7);
        assert_eq!(
            u64::from_le_bytes(table[16..24].try_into().unwrap()),
            DONE_FLAG
        );
        assert_eq!(&table[32..48], &[0u8; 16]);
        // Both jumps land where the comments say.
        assert_eq!(15 + code[14] as usize, 26);
        assert_eq!(26 + (code[25] as i8) as isize, 7);
        assert_eq!(29 + (code[28] as i8) as isize, 26);
    }

    #[test]
    fn chains_fill_descriptors_and_the_avail_ring() {
        let mut s = Script::new();
        let mut d = s.device(0, 2);
        let a = s.buf(&[1, 2, 3]);
        let b = s.out_buf(8);
        s.chain(&mut d, 1, &[a, b]);
        assert_eq!(d.rings[1].next_desc, 2);
        assert_eq!(d.rings[1].avail_idx, 1);
        assert_eq!(d.rings[0].avail_idx, 0);
        let desc0 = s
            .mem
            .iter()
            .rev()
            .find(|(addr, _)| *addr == d.rings[1].desc)
            .unwrap();
        // addr, len, flags = NEXT, next = 1.
        assert_eq!(u64::from_le_bytes(desc0.1[..8].try_into().unwrap()), a.addr);
        assert_eq!(u16::from_le_bytes(desc0.1[12..14].try_into().unwrap()), 1);
        assert_eq!(u16::from_le_bytes(desc0.1[14..16].try_into().unwrap()), 1);
    }
}
