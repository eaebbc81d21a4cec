//! A tiny guest that drives virtio-mmio devices without a kernel, with everything prepared
//! before it runs: one [`Script`] collects the register stores of a driver (device bring-up and
//! `QueueNotify`, through [`crate::virtio_mmio_bring_up`] / [`crate::virtio_mmio_notify`]) and
//! the requests to put in the rings. [`Script::guest_elf`] is the guest ([`crate::mmio_writer`]:
//! the stores, then one store of [`DONE_MAGIC`] to [`DONE_FLAG`], then it idles);
//! [`Script::apply`] writes the buffers and publishes the chains ([`crate::HostDriverRing`]) in
//! the new VM's memory before `Vm::start`. The host then reads the used rings to see what the
//! devices did.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{
    mmio_writer, virtio_mmio_bring_up, virtio_mmio_notify, HostDriverRing, RingLayout, DESC_WRITE,
    VIRTIO_MMIO_BASE,
};

/// Where the guest stores [`DONE_MAGIC`] after its last register store.
pub const DONE_FLAG: u32 = 0x3f_f000;
/// The value stored at [`DONE_FLAG`].
pub const DONE_MAGIC: u32 = 0x600d_d00d;
/// Rings and buffers are allocated from here up (4 MiB: above the guest code at 1 MiB and
/// `mmio_writer`'s page directory at 2 MiB).
const ALLOC_START: u64 = 0x40_0000;
/// Size of one virtio-mmio window.
const MMIO_WINDOW: u64 = 0x1000;
/// Queue size used for every queue.
pub const QUEUE_SIZE: u16 = 8;

/// The idle loop [`mmio_writer`] ends with when it has nothing to repeat: `mov ecx, 1`,
/// `pause; loop`, `jmp` back to the `mov` (rel32 -14).
const IDLE_LOOP: [u8; 14] = [
    0xb9, 1, 0, 0, 0, 0xf3, 0x90, 0xe2, 0xfc, 0xe9, 0xf2, 0xff, 0xff, 0xff,
];

/// `code` from [`mmio_writer`] (nothing to repeat) with its idle loop replaced by `hlt; jmp
/// back to hlt`: on the emulated CPL0 of a nested KVM a PAUSE loop costs a host core, a halted
/// vCPU nothing.
fn then_halt(mut code: Vec<u8>) -> Vec<u8> {
    assert!(code.ends_with(&IDLE_LOOP), "mmio_writer's tail changed");
    code.truncate(code.len() - IDLE_LOOP.len());
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp -3
    code
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

/// A device the script drives: its MMIO window and its queues (indices into the script's
/// rings).
#[derive(Debug, Clone)]
pub struct Dev {
    base: u64,
    rings: Vec<usize>,
}

/// A chain as [`HostDriverRing::push`] takes it: (address, length, flags) per buffer.
type Chain = Vec<(u64, u32, u16)>;

/// The used ring of one queue, read by the host.
#[derive(Debug, Clone, Copy)]
pub struct UsedRing(RingLayout);

impl UsedRing {
    /// The used ring's `idx` (chains the device completed so far, modulo 2^16).
    pub fn idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.0.used + 2))
            .expect("used ring in guest memory")
    }

    /// Used element `i`: (descriptor head, bytes written).
    pub fn elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.0.used + 4 + 8 * u64::from(i % self.0.size);
        (
            mem.read_obj(GuestAddress(at)).expect("used elem"),
            mem.read_obj(GuestAddress(at + 4)).expect("used elem"),
        )
    }

    /// Poll (every 200 µs) until `idx` reaches `n` or `timeout` passes; returns the last idx.
    pub fn wait(&self, mem: &GuestMemoryMmap, n: u16, timeout: Duration) -> u16 {
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

/// The guest's stores plus the guest memory the host prepares before start.
#[derive(Debug)]
pub struct Script {
    stores: Vec<(u32, u32)>,
    /// Initial contents of buffers.
    mem: Vec<(u64, Vec<u8>)>,
    /// Every queue's rings and the chains to publish in it.
    rings: Vec<(RingLayout, Vec<Chain>)>,
    next: u64,
}

impl Default for Script {
    fn default() -> Self {
        Script::new()
    }
}

impl Script {
    /// An empty script.
    pub fn new() -> Script {
        Script {
            stores: Vec::new(),
            mem: Vec::new(),
            rings: Vec::new(),
            next: ALLOC_START,
        }
    }

    fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let a = self.next.next_multiple_of(align);
        self.next = a + len;
        a
    }

    /// A device-readable buffer holding `data`.
    pub fn buf(&mut self, data: &[u8]) -> Buf {
        let addr = self.alloc(data.len() as u64, 16);
        self.mem.push((addr, data.to_vec()));
        Buf {
            addr,
            len: u32::try_from(data.len()).expect("script buffers are small"),
            writable: false,
        }
    }

    /// A zeroed device-writable buffer of `len` bytes.
    pub fn out_buf(&mut self, len: u32) -> Buf {
        let addr = self.alloc(u64::from(len), 16);
        self.mem.push((addr, vec![0u8; len as usize]));
        Buf {
            addr,
            len,
            writable: true,
        }
    }

    /// Bring up virtio-mmio device number `index` (creation order: drives, network
    /// interfaces, vsock, shares) with `queues` queues of [`QUEUE_SIZE`] and no feature but
    /// `VIRTIO_F_VERSION_1`, up to DRIVER_OK.
    pub fn device(&mut self, index: u64, queues: u16) -> Dev {
        let base = VIRTIO_MMIO_BASE + index * MMIO_WINDOW;
        let layouts: Vec<RingLayout> = (0..queues)
            .map(|_| RingLayout::at(self.alloc(0x4000, 0x1000), QUEUE_SIZE))
            .collect();
        self.stores.extend(virtio_mmio_bring_up(base, 0, &layouts));
        let first = self.rings.len();
        self.rings
            .extend(layouts.into_iter().map(|l| (l, Vec::new())));
        Dev {
            base,
            rings: (first..first + usize::from(queues)).collect(),
        }
    }

    /// Make `bufs` one available chain of queue `q` of `dev` (published by [`Script::apply`];
    /// the device sees it when notified).
    pub fn chain(&mut self, dev: &Dev, q: usize, bufs: &[Buf]) {
        let chains = &mut self.rings[dev.rings[q]].1;
        let used: usize = chains.iter().map(Vec::len).sum();
        assert!(
            used + bufs.len() <= usize::from(QUEUE_SIZE),
            "queue {q} full"
        );
        chains.push(
            bufs.iter()
                .map(|b| (b.addr, b.len, if b.writable { DESC_WRITE } else { 0 }))
                .collect(),
        );
    }

    /// Guest store to queue `q`'s `QueueNotify`.
    pub fn notify(&mut self, dev: &Dev, q: u32) {
        self.stores.push(virtio_mmio_notify(dev.base, q));
    }

    /// The used ring of `dev`'s queue `q`.
    pub fn used(&self, dev: &Dev, q: usize) -> UsedRing {
        UsedRing(self.rings[dev.rings[q]].0)
    }

    /// The guest program (the stores, then the store to [`DONE_FLAG`]), as an ELF for
    /// `VmConfig::boot_source.kernel_image_path`. After its last store it halts (interrupts
    /// stay off), so its vCPU sleeps in the kernel until the VM is stopped.
    pub fn guest_elf(&self) -> Vec<u8> {
        let mut stores = self.stores.clone();
        stores.push((DONE_FLAG, DONE_MAGIC));
        crate::tiny_elf(&then_halt(mmio_writer(&stores, &[], 1)))
    }

    /// Write the buffers and publish the chains in a created VM's memory. Call after
    /// `Vm::create` and before `Vm::start`.
    pub fn apply(&self, mem: &GuestMemoryMmap) {
        for (addr, data) in &self.mem {
            mem.write_slice(data, GuestAddress(*addr))
                .expect("script buffer inside guest RAM");
        }
        for (layout, chains) in &self.rings {
            let mut ring = HostDriverRing::new(mem, *layout);
            for c in chains {
                ring.push(mem, c);
            }
        }
        mem.write_obj(0u32, GuestAddress(u64::from(DONE_FLAG)))
            .expect("done flag inside guest RAM");
    }

    /// Wait until the guest stored [`DONE_MAGIC`]; false after `timeout`.
    pub fn wait_done(mem: &GuestMemoryMmap, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if mem.read_obj::<u32>(GuestAddress(u64::from(DONE_FLAG))).ok() == Some(DONE_MAGIC) {
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
    fn the_guest_halts_after_the_done_store() {
        let s = Script::new();
        let elf = s.guest_elf();
        assert!(elf.ends_with(&[0xf4, 0xeb, 0xfd]));
        // The done store right before: mov ebx, DONE_FLAG; mov dword [rbx], DONE_MAGIC.
        let store = &elf[elf.len() - 3 - 11..elf.len() - 3];
        assert_eq!(store[0], 0xbb);
        assert_eq!(
            u32::from_le_bytes(store[1..5].try_into().unwrap()),
            DONE_FLAG
        );
        assert_eq!(
            u32::from_le_bytes(store[7..11].try_into().unwrap()),
            DONE_MAGIC
        );
    }

    #[test]
    fn devices_get_consecutive_windows_and_chains_count_against_the_queue() {
        let mut s = Script::new();
        let d0 = s.device(0, 1);
        let d1 = s.device(1, 2);
        assert_eq!((d0.base, d1.base), (0xd000_0000, 0xd000_1000));
        assert_eq!(d1.rings, [1, 2]);
        // Bring-up ends with DRIVER_OK (status 0xf) in each window.
        assert!(s.stores.contains(&(0xd000_0070, 0xf)));
        assert!(s.stores.contains(&(0xd000_1070, 0xf)));
        let (a, b) = (s.buf(&[1, 2, 3]), s.out_buf(8));
        s.chain(&d1, 1, &[a, b]);
        assert_eq!(
            s.rings[2].1,
            [vec![(a.addr, 3, 0), (b.addr, 8, DESC_WRITE)]]
        );
        s.notify(&d1, 1);
        assert_eq!(s.stores.last(), Some(&(0xd000_1050, 1)));
        // Rings and buffers never overlap the guest code or the page directory.
        assert!(s.rings.iter().all(|(l, _)| l.desc >= ALLOC_START));
        assert!(a.addr >= ALLOC_START && b.addr > a.addr);
    }
}
