//! Helpers for Kestrel's integration tests and benches: tiny hand-assembled guests packaged as
//! ELF files, console capture, guest-artifact lookup, process resource counts; [`guest`] for
//! the real Linux guest, [`netns`] for TAP devices in a namespace of their own.

pub mod guest;
pub mod netns;
pub mod soak;
pub mod virtio_script;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Guest-physical load address and entry of tiny guests.
pub const TINY_LOAD_ADDR: u64 = 0x10_0000;

/// Wrap 64-bit code in a minimal ELF64 executable: one PT_LOAD segment at
/// [`TINY_LOAD_ADDR`], entry at its first byte.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(120 + code.len());
    e.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&TINY_LOAD_ADDR.to_le_bytes()); // e_entry
    e.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    e.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    e.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    e.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    e.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    e.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    e.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    assert_eq!(e.len(), 64);
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&7u32.to_le_bytes()); // RWX
    e.extend_from_slice(&120u64.to_le_bytes()); // p_offset
    e.extend_from_slice(&TINY_LOAD_ADDR.to_le_bytes()); // p_vaddr
    e.extend_from_slice(&TINY_LOAD_ADDR.to_le_bytes()); // p_paddr
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    assert_eq!(e.len(), 120);
    e.extend_from_slice(code);
    e
}

/// Code: write `msg` to COM1 byte by byte, then reset through the i8042 (0xfe to port 0x64).
pub fn serial_then_reset(msg: &[u8]) -> Vec<u8> {
    assert!(msg.len() < 256);
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
                                              // lea rsi, [rip + disp32] — the message follows the code below (22 bytes after the lea).
    let code_after_lea: i32 = 5 + 4 + 4 + 3; // mov ecx + lodsb/out/loop + reset + hlt/jmp
    c.extend_from_slice(&[0x48, 0x8d, 0x35]);
    c.extend_from_slice(&code_after_lea.to_le_bytes());
    let len = u8::try_from(msg.len()).expect("checked above");
    c.extend_from_slice(&[0xb9, len, 0, 0, 0]); // mov ecx, len
    c.extend_from_slice(&[0xac, 0xee, 0xe2, 0xfc]); // lodsb; out dx, al; loop -4
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    c.extend_from_slice(msg);
    c
}

/// Code: spin forever (`jmp $`).
pub fn spin() -> Vec<u8> {
    vec![0xeb, 0xfe]
}

/// Code: an instruction KVM's emulator cannot do, on an MMIO address (so hardware KVM must
/// emulate it too): `mov eax, 0x30000000; popcnt rbx, [rax]; hlt`.
pub fn unsupported_mmio_instruction() -> (Vec<u8>, u64, Vec<u8>) {
    let insn = vec![0xf3, 0x48, 0x0f, 0xb8, 0x18];
    let mut c = vec![0xb8, 0x00, 0x00, 0x00, 0x30];
    c.extend_from_slice(&insn);
    c.push(0xf4);
    (c, TINY_LOAD_ADDR + 5, insn)
}

/// First virtio-mmio window (`kestrel_arch::layout::VIRTIO_MMIO_START`): virtio devices get
/// 4 KiB windows from here in the order `Vm::create` adds them (drives, network interfaces,
/// vsock, fs shares).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;

/// Guest-physical page where [`mmio_writer`] builds the page directory that maps 3–4 GiB.
pub const TINY_MMIO_PD: u32 = 0x20_0000;

/// Code: a tiny driver. Maps the 32-bit MMIO hole (3–4 GiB, where the virtio-mmio windows,
/// IOAPIC and LAPIC are; the boot page tables map only the first GiB) with 2 MiB pages through
/// a page directory at [`TINY_MMIO_PD`], does each of `writes` (a 32-bit store of the value to
/// the guest-physical address), then forever: does each of `repeat` and spins about `pause`
/// PAUSE instructions.
pub fn mmio_writer(writes: &[(u32, u32)], repeat: &[(u32, u32)], pause: u32) -> Vec<u8> {
    let mut c = vec![
        0x0f, 0x20, 0xd8, // mov rax, cr3
        0x48, 0x25, 0x00, 0xf0, 0xff, 0xff, // and rax, -4096
        0x48, 0x8b, 0x00, // mov rax, [rax]      (PML4[0]: the PDPT)
        0x48, 0x25, 0x00, 0xf0, 0xff, 0xff, // and rax, -4096
        0xc7, 0x40, 0x18, // mov dword [rax + 0x18], PD | present | writable (PDPT[3])
    ];
    c.extend_from_slice(&(TINY_MMIO_PD | 3).to_le_bytes());
    c.extend_from_slice(&[0xc7, 0x40, 0x1c, 0, 0, 0, 0]); // mov dword [rax + 0x1c], 0
    c.push(0xbf); // mov edi, PD
    c.extend_from_slice(&TINY_MMIO_PD.to_le_bytes());
    c.extend_from_slice(&[0xb8, 0x83, 0x00, 0x00, 0xc0]); // mov eax, 3 GiB | PS | RW | P
    c.extend_from_slice(&[0xb9, 0x00, 0x02, 0x00, 0x00]); // mov ecx, 512
    c.extend_from_slice(&[
        0x89, 0x07, // fill: mov [rdi], eax
        0xc7, 0x47, 0x04, 0, 0, 0, 0, // mov dword [rdi + 4], 0
        0x48, 0x83, 0xc7, 0x08, // add rdi, 8
        0x05, 0x00, 0x00, 0x20, 0x00, // add eax, 2 MiB
        0xe2, 0xec, // loop fill
        0x0f, 0x20, 0xd8, // mov rax, cr3
        0x0f, 0x22, 0xd8, // mov cr3, rax (flush)
    ]);
    let store = |c: &mut Vec<u8>, (addr, value): (u32, u32)| {
        c.push(0xbb); // mov ebx, addr (zero-extended)
        c.extend_from_slice(&addr.to_le_bytes());
        c.extend_from_slice(&[0xc7, 0x03]); // mov dword [rbx], value
        c.extend_from_slice(&value.to_le_bytes());
    };
    for w in writes {
        store(&mut c, *w);
    }
    let again = c.len();
    for w in repeat {
        store(&mut c, *w);
    }
    c.push(0xb9); // mov ecx, pause
    c.extend_from_slice(&pause.max(1).to_le_bytes());
    c.extend_from_slice(&[0xf3, 0x90, 0xe2, 0xfc]); // wait: pause; loop wait
    c.push(0xe9); // jmp again (rel32)
    let offset = |n: usize| i32::try_from(n).expect("tiny guest code is far below 2 GiB");
    let rel = offset(again) - offset(c.len() + 4);
    c.extend_from_slice(&rel.to_le_bytes());
    c
}

/// Where a split virtqueue's parts lie in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Queue size (a power of two).
    pub size: u16,
    /// Descriptor table (16 bytes per entry).
    pub desc: u64,
    /// Available (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
}

impl RingLayout {
    /// A queue of `size` entries in the 16 KiB at `base` (descriptors, then the available ring
    /// at +8 KiB, the used ring at +12 KiB).
    pub fn at(base: u64, size: u16) -> Self {
        assert!(size <= 256, "the rings must fit their 4 KiB slots");
        RingLayout {
            size,
            desc: base,
            avail: base + 0x2000,
            used: base + 0x3000,
        }
    }
}

/// The register stores of a virtio-mmio driver bringing up the device whose window is at
/// `base`: ACKNOWLEDGE, DRIVER, the driver features (`VIRTIO_F_VERSION_1` plus
/// `features`), FEATURES_OK, every queue of `queues` (size, rings, ready), DRIVER_OK. For
/// [`mmio_writer`].
pub fn virtio_mmio_bring_up(base: u64, features: u64, queues: &[RingLayout]) -> Vec<(u32, u32)> {
    use kestrel_devices::virtio::mmio::reg;
    use kestrel_devices::virtio::{status, VIRTIO_F_VERSION_1};
    let r = |off: u64| u32::try_from(base + off).expect("MMIO windows are below 4 GiB");
    let features = features | VIRTIO_F_VERSION_1;
    let mut w = vec![
        (r(reg::STATUS), status::ACKNOWLEDGE),
        (r(reg::STATUS), status::ACKNOWLEDGE | status::DRIVER),
        (r(reg::DRIVER_FEATURES_SEL), 0),
        (r(reg::DRIVER_FEATURES), low_high(features).0),
        (r(reg::DRIVER_FEATURES_SEL), 1),
        (r(reg::DRIVER_FEATURES), low_high(features).1),
        (
            r(reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        ),
    ];
    for (i, q) in (0u32..).zip(queues) {
        w.push((r(reg::QUEUE_SEL), i));
        w.push((r(reg::QUEUE_NUM), u32::from(q.size)));
        for (low, high, addr) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, q.desc),
            (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, q.avail),
            (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, q.used),
        ] {
            let (lo, hi) = low_high(addr);
            w.push((r(low), lo));
            w.push((r(high), hi));
        }
        w.push((r(reg::QUEUE_READY), 1));
    }
    w.push((
        r(reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    ));
    w
}

/// The low and high 32 bits of `v` (64-bit values go to virtio-mmio as two registers).
#[allow(clippy::cast_possible_truncation)] // the truncation is the point: the low half
fn low_high(v: u64) -> (u32, u32) {
    (v as u32, (v >> 32) as u32)
}

/// The store that notifies queue `queue` of the device whose window is at `base`.
pub fn virtio_mmio_notify(base: u64, queue: u32) -> (u32, u32) {
    let addr = base + kestrel_devices::virtio::mmio::QUEUE_NOTIFY_OFFSET;
    (
        u32::try_from(addr).expect("MMIO windows are below 4 GiB"),
        queue,
    )
}

/// The driver side of a split virtqueue, played by the host on guest memory while the
/// guest runs (a tiny guest only notifies): chains go into the descriptor table and the
/// available ring; the device's used ring is read back.
#[derive(Debug)]
pub struct HostDriverRing {
    layout: RingLayout,
    next_desc: u16,
    avail_idx: u16,
}

/// `n` bytes as a descriptor's 32-bit length. Panics at 4 GiB or more (no test buffer is
/// that large).
pub fn desc_len(n: usize) -> u32 {
    u32::try_from(n).expect("descriptor lengths are below 4 GiB")
}

/// A descriptor the device writes (`VIRTQ_DESC_F_WRITE`).
pub const DESC_WRITE: u16 = 2;
const DESC_NEXT: u16 = 1;

impl HostDriverRing {
    /// An empty ring at `layout` (its parts are zeroed in `mem`).
    pub fn new(mem: &vm_memory::GuestMemoryMmap, layout: RingLayout) -> Self {
        use vm_memory::{Bytes, GuestAddress};
        let n = usize::from(layout.size);
        for (addr, len) in [
            (layout.desc, 16 * n),
            (layout.avail, 6 + 2 * n),
            (layout.used, 6 + 8 * n),
        ] {
            mem.write_slice(&vec![0u8; len], GuestAddress(addr))
                .expect("ring inside guest memory");
        }
        HostDriverRing {
            layout,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Publish a chain of `(address, length, flags)` buffers (flags: [`DESC_WRITE`] or 0).
    /// Descriptors are used round-robin, so at most `size` chains' worth may be in flight.
    pub fn push(&mut self, mem: &vm_memory::GuestMemoryMmap, bufs: &[(u64, u32, u16)]) -> u16 {
        use vm_memory::{Bytes, GuestAddress};
        let size = self.layout.size;
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let d = self.next_desc;
            let next = (d + 1) % size;
            let last = i + 1 == bufs.len();
            let at = self.layout.desc + 16 * u64::from(d);
            let mut e = [0u8; 16];
            e[0..8].copy_from_slice(&addr.to_le_bytes());
            e[8..12].copy_from_slice(&len.to_le_bytes());
            let f = flags | if last { 0 } else { DESC_NEXT };
            e[12..14].copy_from_slice(&f.to_le_bytes());
            e[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&e, GuestAddress(at)).expect("descriptor");
            self.next_desc = next;
        }
        let slot = self.layout.avail + 4 + 2 * u64::from(self.avail_idx % size);
        mem.write_obj(head, GuestAddress(slot)).expect("avail slot");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The index last: the device must see the entry before it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.layout.avail + 2))
            .expect("avail idx");
        head
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &vm_memory::GuestMemoryMmap) -> u16 {
        use vm_memory::{Bytes, GuestAddress};
        mem.read_obj(GuestAddress(self.layout.used + 2))
            .expect("used idx")
    }

    /// Used element `i` (of those the device has returned): (descriptor head, length).
    pub fn used(&self, mem: &vm_memory::GuestMemoryMmap, i: u16) -> (u32, u32) {
        use vm_memory::{Bytes, GuestAddress};
        let at = self.layout.used + 4 + 8 * u64::from(i % self.layout.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).expect("used id");
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used len");
        (id, len)
    }
}

/// A per-process scratch directory (removed by the OS's tmp cleaning, not by tests).
pub fn scratch_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-tests-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

/// Write a tiny guest ELF and return its path.
pub fn write_tiny_guest(name: &str, code: &[u8]) -> PathBuf {
    let p = scratch_dir().join(name);
    std::fs::write(&p, tiny_elf(code)).expect("write tiny guest");
    p
}

/// A console sink tests can read while the VM runs.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// Everything written so far, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Wait until `needle` appears or `timeout` passes; returns whether it appeared.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.text().contains(needle)
    }
}

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Paths of the guest built by `resources/build-guest.sh`.
pub struct GuestArtifacts {
    /// ELF vmlinux.
    pub vmlinux: PathBuf,
    /// Uncompressed cpio initramfs.
    pub initramfs: PathBuf,
}

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A test's prerequisite `what` is missing. Under `scripts/test.sh`
/// (`KESTREL_TEST_REQUIRE_ALL` set) that fails the test: a green run there means everything
/// ran. Elsewhere the test notes it on stderr and skips that part.
pub fn skip_without(what: &str) {
    assert!(
        std::env::var_os("KESTREL_TEST_REQUIRE_ALL").is_none(),
        "prerequisite missing: {what}"
    );
    eprintln!("NOTE: {what} missing; that part of the test is skipped");
}

/// Build (or find in the cache) the guest kernel and initramfs. Panics with the build log's
/// tail on failure: a real-guest test must not silently skip.
pub fn guest_artifacts() -> GuestArtifacts {
    let stdout = guest::run_repo_script("resources/build-guest.sh");
    let get = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("build-guest.sh printed no {key}= line:\n{stdout}"))
    };
    GuestArtifacts {
        vmlinux: get("vmlinux"),
        initramfs: get("initramfs"),
    }
}

/// The guest agent's vsock device on `uds` (CID 3), as the real-guest tests and benches give it.
pub fn agent_vsock(uds: &std::path::Path) -> Option<kestrel_api::VsockConfig> {
    Some(kestrel_api::VsockConfig {
        guest_cid: 3,
        uds_path: uds.to_path_buf(),
        vsock_id: None,
    })
}

/// The agent's `stream_source` byte stream (xorshift64*, docs/agent-protocol.md).
pub use kestrel_agent_proto::XorShift;

/// CPU time (ns, from /proc/self/task/<tid>/schedstat) of the VM's threads of one kind:
/// `vcpus` false for the event loop, true for the vCPU threads.
pub fn vm_thread_cpu_ns(vm: &kestrel_vmm::Vm, vcpus: bool) -> u64 {
    vm.threads()
        .iter()
        .filter(|t| matches!(t.kind, kestrel_vmm::ThreadKind::Vcpu(_)) == vcpus)
        .filter_map(|t| {
            std::fs::read_to_string(format!("/proc/self/task/{}/schedstat", t.tid))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// The value of `name:` in `/proc/self/task/<tid>/status` (`Seccomp`, `Seccomp_filters`...).
pub fn task_status(tid: i32, name: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or("?")
        .trim()
        .to_string()
}

fn c_path(path: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL in the path")
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// setxattr(2) on the host: `Err(errno)` on failure.
pub fn host_setxattr(path: &Path, name: &str, value: &[u8]) -> Result<(), i32> {
    let (p, n) = (c_path(path), std::ffi::CString::new(name).unwrap());
    // SAFETY: NUL-terminated strings and a buffer of `value.len()` bytes, all live for the call.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// getxattr(2) on the host (values up to 4 KiB): `Err(errno)` on failure.
pub fn host_getxattr(path: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let (p, n) = (c_path(path), std::ffi::CString::new(name).unwrap());
    let mut buf = vec![0u8; 4096];
    // SAFETY: NUL-terminated strings and a writable buffer of `buf.len()` bytes.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    // Negative: failed, errno says why.
    let len = usize::try_from(r).map_err(|_| errno())?;
    buf.truncate(len);
    Ok(buf)
}

/// Number of threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Number of open fds of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The number after `name` on the command line (`--runs 3`), or `default`.
pub fn cli_arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident KiB of a process's mappings from its `smaps` text (`/proc/<pid>/smaps`), split by
/// `inside(start, end)`: (outside, inside).
pub fn smaps_rss_split(smaps: &str, inside: impl Fn(u64, u64) -> bool) -> (u64, u64) {
    smaps_split(smaps, "Rss:", inside)
}

/// KiB of the smaps field `field` (`"Rss:"`, `"Pss:"`...) of a process's mappings from its
/// `smaps` text, split by `inside(start, end)`: (outside, inside).
pub fn smaps_split(smaps: &str, field: &str, inside: impl Fn(u64, u64) -> bool) -> (u64, u64) {
    let (mut outside_kb, mut inside_kb) = (0u64, 0u64);
    let mut cur_in = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let mut it = first.split('-');
            let start = u64::from_str_radix(it.next().unwrap_or("0"), 16).unwrap_or(0);
            let end = u64::from_str_radix(it.next().unwrap_or("0"), 16).unwrap_or(0);
            cur_in = inside(start, end);
        } else if let Some(v) = line.strip_prefix(field) {
            let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            if cur_in {
                inside_kb += kb;
            } else {
                outside_kb += kb;
            }
        }
    }
    (outside_kb, inside_kb)
}

/// KiB of `field` (`"Rss:"`, `"Pss:"`) over the mappings of `smaps` that start inside one of
/// `ranges` (host address ranges, e.g. `Vm::guest_memory_host_ranges`).
pub fn smaps_kib_in(smaps: &str, field: &str, ranges: &[(u64, u64)]) -> u64 {
    smaps_split(smaps, field, |start, _| {
        ranges.iter().any(|&(s, e)| start >= s && start < e)
    })
    .1
}

/// Resident KiB of the host pages in `[start, end)` (`mincore`: exact for the range even when
/// the kernel merged its mapping with a neighbour; 0 when the range is not mapped).
pub fn resident_kib(start: u64, end: u64) -> u64 {
    let Ok(len) = usize::try_from(end.saturating_sub(start)) else {
        return 0;
    };
    let mut v = vec![0u8; len / 4096];
    // SAFETY: mincore only writes one byte per page of the range into `v` (`len / 4096`
    // bytes); the range is page-aligned. It reads no memory.
    let r = unsafe { libc::mincore(start as *mut libc::c_void, len, v.as_mut_ptr()) };
    if r != 0 {
        return 0;
    }
    v.iter().filter(|b| *b & 1 != 0).count() as u64 * 4
}

/// The guest memory file of the snapshot in `dir`: `dir/memory`, or the first `memory` file
/// in a subdirectory of `dir` (a template directory may keep its snapshot one level down).
/// Panics if there is none.
pub fn snapshot_memory_file(dir: &Path) -> PathBuf {
    let direct = kestrel_vmm::SnapshotFiles::in_dir(dir).memory;
    if direct.exists() {
        return direct;
    }
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {dir:?}: {e}"))
        .filter_map(|e| Some(kestrel_vmm::SnapshotFiles::in_dir(&e.ok()?.path()).memory))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no snapshot memory file in {dir:?}"))
}

/// KiB of the 4 KiB pages of the file at `path` that hold a non-zero byte (for a snapshot's
/// memory file: the guest memory the guest or the VMM wrote, all of it resident in the VM
/// the snapshot was taken of). Panics if the file cannot be read.
pub fn nonzero_file_kib(path: &Path) -> u64 {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let mut buf = Vec::with_capacity(1 << 20);
    let mut pages = 0u64;
    loop {
        buf.clear();
        let n = (&mut f)
            .take(1 << 20)
            .read_to_end(&mut buf)
            .unwrap_or_else(|e| panic!("read {path:?}: {e}"));
        if n == 0 {
            return pages * 4;
        }
        pages += buf
            .chunks(4096)
            .filter(|p| p.iter().any(|b| *b != 0))
            .count() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_split_by_range() {
        let smaps = "\
1000-3000 rw-p 00000000 00:00 0
Size:                  8 kB
Rss:                   4 kB
7f00-8000 r--p 00000000 00:00 0 [x]
Rss:                  12 kB
Swap:                  0 kB
";
        assert_eq!(
            smaps_rss_split(smaps, |s, e| (s, e) == (0x1000, 0x3000)),
            (12, 4)
        );
        assert_eq!(smaps_rss_split(smaps, |_, _| false), (16, 0));
        assert_eq!(smaps_kib_in(smaps, "Rss:", &[(0x1000, 0x2000)]), 4);
        assert_eq!(smaps_kib_in(smaps, "Size:", &[(0x1000, 0x2000)]), 8);
    }

    #[test]
    fn nonzero_pages_of_a_file() {
        let p = scratch_dir().join("nonzero.bin");
        let mut d = vec![0u8; 5 * 4096];
        d[4096 + 17] = 1;
        d[4 * 4096] = 0xff;
        std::fs::write(&p, &d).unwrap();
        assert_eq!(nonzero_file_kib(&p), 8);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn elf_header_fields() {
        let e = tiny_elf(&[0x90, 0xf4]);
        assert_eq!(&e[..4], b"\x7fELF");
        assert_eq!(
            u64::from_le_bytes(e[24..32].try_into().unwrap()),
            TINY_LOAD_ADDR
        );
        assert_eq!(&e[120..], &[0x90, 0xf4]);
    }

    #[test]
    fn mmio_writer_stores_then_loops_back_to_the_repeated_stores() {
        let c = mmio_writer(&[(0xd000_0070, 1)], &[(0xd000_0050, 2)], 5);
        // ... mov ebx/mov [rbx] (repeated store), mov ecx, pause; loop, jmp rel32.
        let again = c.len() - 5 - 4 - 5 - 11;
        assert_eq!(&c[again..again + 5], &[0xbb, 0x50, 0x00, 0x00, 0xd0]);
        assert_eq!(&c[again - 11..again - 6], &[0xbb, 0x70, 0x00, 0x00, 0xd0]);
        let rel = i32::from_le_bytes(c[c.len() - 4..].try_into().unwrap());
        let end = i64::try_from(c.len()).unwrap();
        assert_eq!(end + i64::from(rel), i64::try_from(again).unwrap());
    }

    #[test]
    fn bring_up_ends_with_driver_ok_after_the_queues() {
        let w = virtio_mmio_bring_up(0xd000_0000, 0, &[RingLayout::at(0x30_0000, 16)]);
        assert_eq!(w.first(), Some(&(0xd000_0070, 1)));
        assert_eq!(w.last(), Some(&(0xd000_0070, 0xf)));
        assert!(w.contains(&(0xd000_0080, 0x30_0000)), "descriptor table");
        assert!(
            w.contains(&(0xd000_0024, 1)) && w.contains(&(0xd000_0020, 1)),
            "VERSION_1"
        );
    }

    #[test]
    fn serial_code_points_at_message() {
        let c = serial_then_reset(b"hi");
        // lea is at offset 4; disp32 at 7..11; rip after lea = 11.
        let disp = i32::from_le_bytes(c[7..11].try_into().unwrap());
        let disp = usize::try_from(disp).unwrap();
        assert_eq!(&c[11 + disp..], b"hi");
    }
}
