//! Helpers for Kestrel's integration tests and benches: tiny hand-assembled guests packaged as
//! ELF files, console capture, guest-artifact lookup, process resource counts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
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
    c.extend_from_slice(&[0xb9, msg.len() as u8, 0, 0, 0]); // mov ecx, len
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

/// Build (or find in the cache) the guest kernel and initramfs. Panics with the build log's
/// tail on failure: a real-guest test must not silently skip.
pub fn guest_artifacts() -> GuestArtifacts {
    let out = Command::new("bash")
        .arg(repo_root().join("resources/build-guest.sh"))
        .output()
        .expect("run resources/build-guest.sh");
    assert!(
        out.status.success(),
        "resources/build-guest.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
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

/// The agent's `stream_source` byte stream (xorshift64*, docs/agent-protocol.md).
pub struct XorShift(u64);

impl XorShift {
    /// A stream from `seed` (0 behaves as 1).
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 { 1 } else { seed })
    }

    /// Fill `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

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
    let (mut outside_kb, mut inside_kb) = (0u64, 0u64);
    let mut cur_in = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let mut it = first.split('-');
            let start = u64::from_str_radix(it.next().unwrap_or("0"), 16).unwrap_or(0);
            let end = u64::from_str_radix(it.next().unwrap_or("0"), 16).unwrap_or(0);
            cur_in = inside(start, end);
        } else if let Some(v) = line.strip_prefix("Rss:") {
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
    fn serial_code_points_at_message() {
        let c = serial_then_reset(b"hi");
        // lea is at offset 4; disp32 at 7..11; rip after lea = 11.
        let disp = i32::from_le_bytes(c[7..11].try_into().unwrap()) as usize;
        assert_eq!(&c[11 + disp..], b"hi");
    }
}
