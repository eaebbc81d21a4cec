//! Soak runs: many create/start/stop cycles in one process, with what the process holds
//! measured before and after. Shared by `tests/tests/soak.rs` (which asserts) and the
//! `bench_soak` binary behind `bench/soak.sh` (which prints the table).
//!
//! - [`tiny_soak`]: 1 vCPU, 32 MiB, a hybrid vsock device that the tiny guest activates
//!   ([`crate::virtio_script`]); create, start, wait for the guest's last register write, stop,
//!   drop.
//! - [`device_soak`]: every device kind in one VM — virtio-blk on a real file, virtio-net on a
//!   TAP created in a network namespace, hybrid vsock, virtio-fs in-process (with worker
//!   threads) and through vhost-user with a real virtiofsd per cycle — each activated by the
//!   tiny guest and given real work (a block write, a frame each way, a guest→host and a
//!   host→guest vsock connection, a FUSE_INIT on both shares), plus a hot-plugged vCPU and
//!   a hot-plugged 128 MiB memory block.
//!
//! Both take one warm-up cycle first (the kick signal handler, glibc's per-thread arenas, the
//! vsock listener registry are set up once per process), then measure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use kestrel_agent_proto::AGENT_PORT;
use kestrel_api::{DriveConfig, FsCache, FsConfig, NetConfig, SerialOutput, VmConfig, VsockConfig};
use kestrel_vmm::{VcpuRunState, Vm, VmExit};
use vm_memory::{Bytes, GuestAddress};

use crate::guest::KillOnDrop;
use crate::virtio_script::{Buf, Script, UsedRing};

/// RSS growth allowed over the 1000 tiny cycles (after the warm-up cycle). Leaks are caught
/// by the live-heap count ([`CountingAlloc`], see [`HEAP_ONE_TIME_SLACK`]);
/// RSS still grows a little from allocator fragmentation (glibc keeps freed chunks), measured
/// at +150..300 KiB. 1 MiB is 1 KiB per cycle.
pub const TINY_RSS_BOUND_KIB: u64 = 1024;
/// RSS growth allowed over the 20 device cycles (after the warm-up cycle); measured
/// +150..250 KiB.
pub const DEVICE_RSS_BOUND_KIB: u64 = 1024;
/// Cycles of the tiny soak.
pub const TINY_CYCLES: usize = 1000;
/// Cycles of the device soak.
pub const DEVICE_CYCLES: usize = 20;

/// How long any single wait of a cycle may take before the cycle fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// Live Rust heap the measured cycles may add in all (bytes, blocks), for one-time lazy
/// allocations whose moment depends on timing. Seen: one 48-byte block, at a random cycle —
/// std's channels cache a context (an `Arc` of 48 bytes) in a thread's TLS the first time a
/// receive on that thread has to block, and `Vm::start`/`plug_vcpu` wait for their threads on
/// a channel from the caller's thread, which blocks or not depending on scheduling. A leak of
/// one block per cycle is 20 (device soak) or 1000 (tiny soak) blocks.
pub const HEAP_ONE_TIME_SLACK: (i64, i64) = (256, 2);

/// A global allocator that counts live heap bytes and blocks (Rust allocations only), on top
/// of the system allocator. A soak binary installs it with
/// `#[global_allocator] static A: CountingAlloc = CountingAlloc;`; without it the counts stay 0.
pub struct CountingAlloc;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static LIVE_BLOCKS: AtomicI64 = AtomicI64::new(0);

/// An allocation size as the signed counters keep it.
#[allow(clippy::cast_possible_wrap)] // a `Layout`'s size is at most `isize::MAX`
fn signed(size: usize) -> i64 {
    size as i64
}

// SAFETY: every call is forwarded to `System` with the same arguments; the counters do not
// touch the memory.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is (the caller upholds `alloc`'s contract).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(signed(layout.size()), Ordering::Relaxed);
            LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is (the caller upholds `dealloc`'s contract).
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(signed(layout.size()), Ordering::Relaxed);
        LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(signed(layout.size()), Ordering::Relaxed);
            LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is (the caller upholds `realloc`'s contract).
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(signed(new_size) - signed(layout.size()), Ordering::Relaxed);
        }
        p
    }
}

/// `total` spread over `cycles` (at least one).
fn per_cycle(total: Duration, cycles: usize) -> Duration {
    total / u32::try_from(cycles.max(1)).unwrap_or(u32::MAX)
}

/// Live Rust heap (bytes, blocks) counted by [`CountingAlloc`] ((0, 0) when not installed).
pub fn live_heap() -> (i64, i64) {
    (
        LIVE_BYTES.load(Ordering::Relaxed),
        LIVE_BLOCKS.load(Ordering::Relaxed),
    )
}

/// What the process holds at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Open file descriptors (`/proc/self/fd`).
    pub fds: usize,
    /// Threads (`/proc/self/task`).
    pub threads: usize,
    /// Their names (`comm`), sorted.
    pub thread_names: Vec<String>,
    /// Resident set size (`VmRSS`), KiB.
    pub rss_kib: u64,
    /// Unix socket files in the soak's directory.
    pub sockets: Vec<String>,
    /// Network interfaces in the calling thread's network namespace (`/proc/thread-self/net/dev`).
    pub links: Vec<String>,
    /// Mounts (`/proc/self/mountinfo` lines), without other tests' network-namespace mounts.
    pub mounts: Vec<String>,
    /// Child processes (`<pid> <comm>`), zombies included.
    pub children: Vec<String>,
}

impl Snapshot {
    /// Measure now; `dir` is where socket files are counted, `netns` the name of the
    /// soak's own network namespace (its mount stays in the list, other ones are left out).
    pub fn take(dir: &Path, netns: Option<&str>) -> Snapshot {
        Snapshot {
            fds: crate::fd_count(),
            threads: crate::thread_count(),
            thread_names: thread_names(),
            rss_kib: status_kib("VmRSS:"),
            sockets: socket_files(dir),
            links: links(),
            mounts: mounts(netns),
            children: children(),
        }
    }

    /// The thread names that start with one of `prefixes` (Kestrel's: `k-<vm>-...`).
    pub fn threads_named(&self, prefixes: &[&str]) -> Vec<&String> {
        let named = |n: &&String| prefixes.iter().any(|p| n.starts_with(p));
        self.thread_names.iter().filter(named).collect()
    }

    /// KVM's own workers of a VM (`kvm-nx-lpage-recovery` on some hosts), which the kernel
    /// counts as threads of this process.
    pub fn kvm_threads(&self) -> usize {
        self.threads_named(&["kvm-"]).len()
    }
}

/// A value from `/proc/self/status`, in KiB.
fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Reset `VmHWM` to the current RSS (`/proc/self/clear_refs`, value 5).
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
}

fn thread_names() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                .map(|n| n.trim_end().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn socket_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn links() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_to_string("/proc/thread-self/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_string()))
        .collect();
    v.sort();
    v
}

fn mounts(netns: Option<&str>) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<String> = text
        .lines()
        .filter(|l| {
            // Other tests on this host add and remove network namespaces (bind mounts under
            // /run/netns) at any time; only the soak's own one is counted.
            let point = l.split(' ').nth(4).unwrap_or("");
            match point
                .strip_prefix("/run/netns/")
                .or_else(|| point.strip_prefix("/var/run/netns/"))
            {
                Some(name) => Some(name) == netns,
                None => true,
            }
        })
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn children() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in dir.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "<pid> (<comm>) <state> <ppid> ...": comm may contain spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let mut rest = stat[close + 1..].split_whitespace();
        let (state, ppid) = (rest.next(), rest.next());
        if ppid == Some(me.as_str()) {
            v.push(format!(
                "{name} {} ({})",
                &stat[open + 1..close],
                state.unwrap_or("?")
            ));
        }
    }
    v.sort();
    v
}

/// Time per phase over the cycles: (name, total, max), in the order phases first ran. Made
/// with room for every phase before the measurement starts, so adding to it never allocates
/// (the live-heap count would see it).
#[derive(Debug, Default)]
pub struct Phases(Vec<(&'static str, Duration, Duration)>);

impl Phases {
    fn new() -> Phases {
        Phases(Vec::with_capacity(16))
    }

    fn add(&mut self, name: &'static str, d: Duration) {
        match self.0.iter_mut().find(|p| p.0 == name) {
            Some(p) => {
                p.1 += d;
                p.2 = p.2.max(d);
            }
            None => self.0.push((name, d, d)),
        }
    }
}

/// The result of a soak: timings, the process before and after, the peak RSS.
#[derive(Debug, Clone)]
pub struct SoakReport {
    /// What ran.
    pub title: String,
    /// Measured cycles (the warm-up cycle excluded).
    pub cycles: usize,
    /// Wall time of the measured cycles.
    pub total: Duration,
    /// Per phase (in cycle order): mean and max.
    pub phases: Vec<(&'static str, Duration, Duration)>,
    /// After the warm-up cycle.
    pub before: Snapshot,
    /// In the warm-up cycle while its VM ran with its devices active: shows that the
    /// counts see what a VM holds.
    pub during: Snapshot,
    /// After the last cycle.
    pub after: Snapshot,
    /// Live Rust heap (bytes, blocks) right before the first and right after the last
    /// measured cycle, when the binary installed [`CountingAlloc`] (else zeros).
    pub heap: [(i64, i64); 2],
    /// Highest RSS during the measured cycles (`VmHWM` after a reset), KiB.
    pub peak_rss_kib: u64,
    /// Allowed RSS growth, KiB.
    pub rss_bound_kib: u64,
}

impl SoakReport {
    fn new(
        title: String,
        cycles: usize,
        phases: Phases,
        total: Duration,
        [before, during, after]: [Snapshot; 3],
        heap: [(i64, i64); 2],
        rss_bound_kib: u64,
    ) -> SoakReport {
        let mut phases = phases.0;
        for p in &mut phases {
            p.1 = per_cycle(p.1, cycles);
        }
        SoakReport {
            title,
            cycles,
            total,
            phases,
            before,
            during,
            after,
            heap,
            peak_rss_kib: status_kib("VmHWM:"),
            rss_bound_kib,
        }
    }

    /// Mean wall time of one cycle.
    pub fn per_cycle(&self) -> Duration {
        per_cycle(self.total, self.cycles)
    }

    /// Everything that did not come back: fds, threads, socket files, network interfaces,
    /// mounts and child processes must be exactly as before; RSS may grow by at most the
    /// bound. Empty when the soak left nothing behind.
    pub fn problems(&self) -> Vec<String> {
        let (b, a) = (&self.before, &self.after);
        let mut p = Vec::new();
        if a.fds != b.fds {
            p.push(format!("fds {} -> {}", b.fds, a.fds));
        }
        if a.threads != b.threads {
            p.push(format!("threads {} -> {}", b.threads, a.threads));
        }
        let [(bytes0, blocks0), (bytes1, blocks1)] = self.heap;
        if bytes1 - bytes0 > HEAP_ONE_TIME_SLACK.0 || blocks1 - blocks0 > HEAP_ONE_TIME_SLACK.1 {
            p.push(format!(
                "live Rust heap {bytes0} -> {bytes1} bytes, {blocks0} -> {blocks1} blocks"
            ));
        }
        let grown = a.rss_kib.saturating_sub(b.rss_kib);
        if grown > self.rss_bound_kib {
            p.push(format!(
                "RSS grew {grown} KiB ({} -> {}), bound {} KiB",
                b.rss_kib, a.rss_kib, self.rss_bound_kib
            ));
        }
        for (what, x, y) in [
            ("socket files", &b.sockets, &a.sockets),
            ("network interfaces", &b.links, &a.links),
            ("mounts", &b.mounts, &a.mounts),
            ("child processes", &b.children, &a.children),
        ] {
            if x != y {
                p.push(format!("{what}: {x:?} -> {y:?}"));
            }
        }
        p
    }

    /// Print a one-line summary (the tables with `KESTREL_SOAK_TABLE` set) and panic, with
    /// the tables, if anything was left behind.
    pub fn assert_clean(&self) {
        if std::env::var_os("KESTREL_SOAK_TABLE").is_some() {
            println!("{}", self.table());
        } else {
            eprintln!(
                "{}: {} cycles in {:.1} s, {:?} per cycle; RSS {} -> {} KiB (peak {})",
                self.title,
                self.cycles,
                self.total.as_secs_f64(),
                self.per_cycle(),
                self.before.rss_kib,
                self.after.rss_kib,
                self.peak_rss_kib
            );
        }
        let problems = self.problems();
        assert!(
            problems.is_empty(),
            "left behind after {} cycles: {problems:#?}\n{}",
            self.cycles,
            self.table()
        );
    }

    /// Markdown tables: phases, then resources.
    pub fn table(&self) -> String {
        let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
        let mut s = format!(
            "### {}\n\n{} cycles in {:.1} s ({} ms per cycle)\n\n| phase | mean ms | max ms |\n|---|---:|---:|\n",
            self.title,
            self.cycles,
            self.total.as_secs_f64(),
            ms(self.per_cycle()),
        );
        for (name, mean, max) in &self.phases {
            s += &format!("| {name} | {} | {} |\n", ms(*mean), ms(*max));
        }
        let (b, d, a) = (&self.before, &self.during, &self.after);
        s += "\n| resource | before | during a cycle | after | peak |\n|---|---:|---:|---:|---:|\n";
        let mut row = |name: &str, x: usize, y: usize, z: usize| {
            s += &format!("| {name} | {x} | {y} | {z} | |\n");
        };
        row("fds", b.fds, d.fds, a.fds);
        row("threads", b.threads, d.threads, a.threads);
        row(
            "socket files",
            b.sockets.len(),
            d.sockets.len(),
            a.sockets.len(),
        );
        row(
            "network interfaces",
            b.links.len(),
            d.links.len(),
            a.links.len(),
        );
        row("mounts", b.mounts.len(), d.mounts.len(), a.mounts.len());
        row(
            "child processes",
            b.children.len(),
            d.children.len(),
            a.children.len(),
        );
        s += &format!(
            "| RSS KiB | {} | {} | {} | {} |\n",
            b.rss_kib, d.rss_kib, a.rss_kib, self.peak_rss_kib
        );
        let [(bytes0, blocks0), (bytes1, blocks1)] = self.heap;
        if blocks0 > 0 {
            s += &format!("| live Rust heap, bytes | {bytes0} | | {bytes1} | |\n");
            s += &format!("| live Rust heap, blocks | {blocks0} | | {blocks1} | |\n");
        }
        let problems = self.problems();
        s += &format!(
            "\nRSS bound: +{} KiB. {}\n",
            self.rss_bound_kib,
            if problems.is_empty() {
                "Everything back to its starting value.".to_string()
            } else {
                format!("LEFT BEHIND: {}", problems.join("; "))
            }
        );
        s
    }
}

/// A fresh directory for one soak (socket files are counted in it).
fn soak_dir(name: &str) -> PathBuf {
    let d = crate::scratch_dir().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create the soak dir");
    d
}

fn timed<T>(times: &mut Phases, name: &'static str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    times.add(name, t.elapsed());
    r
}

// ------------------------------------------------------------------------------------ tiny

/// `cycles` create/start/stop cycles of a 1-vCPU, 32 MiB VM whose tiny guest activates a
/// hybrid vsock device (listener socket in the soak's directory). Panics if a cycle fails.
pub fn tiny_soak(cycles: usize) -> SoakReport {
    let dir = soak_dir("soak-tiny");
    let mut script = Script::new();
    let _vsock = script.device(0, 3);
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, script.guest_elf()).expect("write the guest");
    let mut c = VmConfig::new(&kernel, 1, 32);
    c.serial.output = SerialOutput::None;
    c.kestrel.name = Some("soak".into());
    c.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: dir.join("v.sock"),
        vsock_id: None,
    });
    let cycle = |times: &mut Phases, during: Option<&mut Option<Snapshot>>| {
        let vm = timed(times, "create", || Vm::create(&c).expect("create"));
        script.apply(&vm.guest_memory());
        timed(times, "start", || vm.start().expect("start"));
        let done = timed(times, "guest", || {
            Script::wait_done(&vm.guest_memory(), STEP_TIMEOUT)
        });
        assert!(
            done,
            "the tiny guest did not finish: {:?}",
            vm.exit_reason()
        );
        if let Some(d) = during {
            *d = Some(Snapshot::take(&dir, None));
        }
        timed(times, "stop", || assert_eq!(vm.stop(), VmExit::Stopped));
        timed(times, "drop", || drop(vm));
    };
    let mut during = None;
    cycle(&mut Phases::new(), Some(&mut during)); // warm-up
    let mut times = Phases::new();
    let before = Snapshot::take(&dir, None);
    reset_peak_rss();
    let t = Instant::now();
    let heap_before = live_heap();
    for _ in 0..cycles {
        cycle(&mut times, None);
    }
    let heap = [heap_before, live_heap()];
    let total = t.elapsed();
    let after = Snapshot::take(&dir, None);
    SoakReport::new(
        format!("tiny guests: {cycles} create/start/stop cycles (1 vCPU, 32 MiB, vsock)"),
        cycles,
        times,
        total,
        [before, during.expect("taken in the warm-up cycle"), after],
        heap,
        TINY_RSS_BOUND_KIB,
    )
}

// ---------------------------------------------------------------------------------- devices

pub use crate::netns::Netns;

/// The virtiofsd binary: `$VIRTIOFSD` or what `scripts/install-virtiofsd.sh` finds or
/// installs. Panics (never skips) when there is none.
pub fn virtiofsd() -> PathBuf {
    PathBuf::from(crate::guest::run_repo_script("scripts/install-virtiofsd.sh").trim())
}

/// Guest CID and ports of the vsock traffic.
const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1234;
const HOST_PORT: u32 = 5000;
/// vsock packet header length, ops and type.
const VSOCK_HDR: usize = 44;
const VSOCK_OP_REQUEST: u16 = 1;
const VSOCK_OP_RESPONSE: u16 = 2;
const VSOCK_TYPE_STREAM: u16 = 1;
/// FUSE_INIT opcode and the unique id the script uses.
const FUSE_INIT: u32 = 26;
const FUSE_UNIQUE: u64 = 0x50a4;
/// The sector the block request writes and its data.
const BLK_SECTOR: u64 = 8;
const BLK_PATTERN: u8 = 0x5a;
/// Addresses of the TAP's host side and of a guest that does not exist (the host ARPs
/// for it, which puts a frame into the guest's RX queue).
const TAP_HOST_IP: &str = "10.77.0.1";
const TAP_PEER_IP: &str = "10.77.0.2";

/// What the device script prepared, for the host's checks.
struct DeviceChecks {
    blk: UsedRing,
    blk_status: u64,
    net_rx: UsedRing,
    net_tx: UsedRing,
    vsock_rx: UsedRing,
    vsock_rx_bufs: Vec<Buf>,
    vsock_tx: UsedRing,
    fs: [(UsedRing, Buf); 2],
}

fn fuse_init_request() -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&56u32.to_le_bytes()); // len: in header 40 + fuse_init_in 16
    r.extend_from_slice(&FUSE_INIT.to_le_bytes());
    r.extend_from_slice(&FUSE_UNIQUE.to_le_bytes());
    r.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    r.extend_from_slice(&[0u8; 16]); // uid, gid, pid, total_extlen, padding
    r.extend_from_slice(&7u32.to_le_bytes()); // major
    r.extend_from_slice(&31u32.to_le_bytes()); // minor
    r.extend_from_slice(&0x2_0000u32.to_le_bytes()); // max_readahead
    r.extend_from_slice(&0u32.to_le_bytes()); // flags
    r
}

fn vsock_request() -> Vec<u8> {
    let mut h = Vec::with_capacity(VSOCK_HDR);
    h.extend_from_slice(&GUEST_CID.to_le_bytes()); // src_cid
    h.extend_from_slice(&2u64.to_le_bytes()); // dst_cid: the host
    h.extend_from_slice(&GUEST_PORT.to_le_bytes());
    h.extend_from_slice(&HOST_PORT.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // len
    h.extend_from_slice(&VSOCK_TYPE_STREAM.to_le_bytes());
    h.extend_from_slice(&VSOCK_OP_REQUEST.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // flags
    h.extend_from_slice(&65536u32.to_le_bytes()); // buf_alloc
    h.extend_from_slice(&0u32.to_le_bytes()); // fwd_cnt
    assert_eq!(h.len(), VSOCK_HDR);
    h
}

/// The device script: blk (device 0), net (1), vsock (2), fs in-process (3), fs vhost-user
/// (4) — the order `Vm::create` gives them MMIO windows.
fn device_script() -> (Script, DeviceChecks) {
    let mut s = Script::new();
    // virtio-blk: one write of a sector.
    let blk = s.device(0, 1);
    let mut hdr = 1u32.to_le_bytes().to_vec(); // VIRTIO_BLK_T_OUT
    hdr.extend_from_slice(&0u32.to_le_bytes());
    hdr.extend_from_slice(&BLK_SECTOR.to_le_bytes());
    let (h, d, st) = (s.buf(&hdr), s.buf(&[BLK_PATTERN; 512]), s.out_buf(1));
    s.chain(&blk, 0, &[h, d, st]);
    s.notify(&blk, 0);
    // virtio-net: two RX buffers, one broadcast frame to send.
    let net = s.device(1, 2);
    for _ in 0..2 {
        let b = s.out_buf(2048);
        s.chain(&net, 0, &[b]);
    }
    let mut frame = vec![0u8; 12]; // virtio_net_hdr_v1: no offloads
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[0x06, 0, 0x0a, 0x4d, 0, 2]);
    frame.extend_from_slice(&0x88b5u16.to_be_bytes()); // local experimental ethertype
    frame.extend_from_slice(b"kestrel soak frame, padded to the minimum length.");
    frame.resize(12 + 60, 0);
    let f = s.buf(&frame);
    s.chain(&net, 1, &[f]);
    s.notify(&net, 0);
    s.notify(&net, 1);
    // vsock: four RX buffers, a connection request to host port HOST_PORT.
    let vsock = s.device(2, 3);
    let mut vsock_rx_bufs = Vec::new();
    for _ in 0..4 {
        let b = s.out_buf(4096);
        s.chain(&vsock, 0, &[b]);
        vsock_rx_bufs.push(b);
    }
    let req = s.buf(&vsock_request());
    s.chain(&vsock, 1, &[req]);
    s.notify(&vsock, 0);
    s.notify(&vsock, 1);
    // virtio-fs, both: FUSE_INIT on the first request queue.
    let mut fs = Vec::new();
    for index in [3, 4] {
        let dev = s.device(index, 2);
        let (req, reply) = (s.buf(&fuse_init_request()), s.out_buf(256));
        s.chain(&dev, 1, &[req, reply]);
        s.notify(&dev, 1);
        fs.push((s.used(&dev, 1), reply));
    }
    let checks = DeviceChecks {
        blk: s.used(&blk, 0),
        blk_status: st.addr,
        net_rx: s.used(&net, 0),
        net_tx: s.used(&net, 1),
        vsock_rx: s.used(&vsock, 0),
        vsock_rx_bufs,
        vsock_tx: s.used(&vsock, 1),
        fs: [fs[0], fs[1]],
    };
    (s, checks)
}

/// The device soak's fixed surroundings.
struct DeviceEnv {
    dir: PathBuf,
    vfsd_dir: PathBuf,
    virtiofsd: PathBuf,
    netns: Netns,
    tap: String,
    config: VmConfig,
    script: Script,
    checks: DeviceChecks,
}

impl DeviceEnv {
    fn new(virtiofsd: PathBuf) -> DeviceEnv {
        let pid = std::process::id();
        let dir = soak_dir("soak-devices");
        let (share, vhu, vfsd_dir) = (dir.join("share"), dir.join("vhu"), dir.join("vfsd"));
        for d in [&share, &vhu, &vfsd_dir] {
            std::fs::create_dir_all(d).expect("create dir");
        }
        std::fs::write(share.join("hello"), b"in-process share").expect("write share file");
        std::fs::write(vhu.join("hello"), b"vhost-user share").expect("write share file");
        let disk = dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).expect("write disk image");
        let netns = Netns::new(&format!("ksoak{pid}"));
        let tap = format!("ksoak{pid}");
        let (script, checks) = device_script();
        let kernel = dir.join("guest.elf");
        std::fs::write(&kernel, script.guest_elf()).expect("write the guest");

        let mut c = VmConfig::new(&kernel, 1, 64);
        c.serial.output = SerialOutput::None;
        c.kestrel.name = Some("sd".into());
        c.machine_config.max_vcpus = Some(2);
        c.machine_config.max_mem_size_mib = Some(64 + 128);
        c.drives.push(DriveConfig {
            drive_id: "blk0".into(),
            path_on_host: Some(disk),
            ..DriveConfig::default()
        });
        c.network_interfaces.push(NetConfig {
            iface_id: "eth0".into(),
            host_dev_name: Some(tap.clone()),
            guest_mac: Some("06:00:0a:4d:00:02".into()),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            create_tap: true,
            ..NetConfig::default()
        });
        c.vsock = Some(VsockConfig {
            guest_cid: u32::try_from(GUEST_CID).expect("a small CID"),
            uds_path: dir.join("v.sock"),
            vsock_id: None,
        });
        let mut inproc = FsConfig::shared_dir("share", &share);
        inproc.cache = FsCache::None;
        inproc.worker_threads = true;
        c.fs.push(inproc);
        c.fs.push(FsConfig::vhost_user("vhu", vfsd_dir.join("vfsd.sock")));
        DeviceEnv {
            dir,
            vfsd_dir,
            virtiofsd,
            netns,
            tap,
            config: c,
            script,
            checks,
        }
    }

    fn spawn_virtiofsd(&self) -> KillOnDrop {
        crate::guest::spawn_virtiofsd(
            &self.virtiofsd,
            &self.vfsd_dir.join("vfsd.sock"),
            &self.dir.join("vhu"),
            "never",
            STEP_TIMEOUT,
        )
    }

    /// One cycle; panics naming what did not happen.
    fn cycle(&self, times: &mut Phases, during: Option<&mut Option<Snapshot>>) {
        let vfsd = timed(times, "virtiofsd spawn", || self.spawn_virtiofsd());
        let port_path = self.dir.join(format!("v.sock_{HOST_PORT}"));
        let listener = UnixListener::bind(&port_path).expect("bind the host port listener");

        let vm = timed(times, "create", || {
            Vm::create(&self.config).expect("create")
        });
        let mem = vm.guest_memory();
        self.script.apply(&mem);
        // The TAP (made by create) is up before the guest sends its frame.
        timed(times, "TAP up (ip)", || {
            self.netns.ip(&[
                "addr",
                "add",
                &format!("{TAP_HOST_IP}/24"),
                "dev",
                &self.tap,
            ]);
            self.netns.ip(&["link", "set", &self.tap, "up"]);
        });
        timed(times, "start", || vm.start().expect("start"));
        let done = timed(times, "guest", || Script::wait_done(&mem, STEP_TIMEOUT));
        assert!(done, "the guest did not finish: {:?}", vm.exit_reason());

        let (host_conn, accepted) = timed(times, "devices+hotplug", || {
            self.drive_and_check(&vm, &mem, &listener)
        });
        if let Some(d) = during {
            *d = Some(Snapshot::take(&self.dir, Some(&self.netns.0)));
        }

        timed(times, "stop", || assert_eq!(vm.stop(), VmExit::Stopped));
        timed(times, "drop", || {
            drop(mem);
            drop(vm);
        });
        timed(times, "teardown checks", || {
            check_closed_by_the_vmm([("host client", host_conn), ("guest connection", accepted)]);
            check_virtiofsd_ends(vfsd);
            drop(listener);
            std::fs::remove_file(&port_path).expect("remove the host port listener");
        });
    }

    /// Host side of the cycle while the guest's requests are in flight: host connections,
    /// a frame into the TAP, hot-plug; then check every device did its part. Returns the two
    /// host ends of vsock connections (closed by the test after the VM is gone).
    fn drive_and_check(
        &self,
        vm: &Vm,
        mem: &vm_memory::GuestMemoryMmap,
        listener: &UnixListener,
    ) -> (UnixStream, UnixStream) {
        let conns = self.vsock_both_ways(listener);
        // net: the host ARPs for a neighbour behind the TAP; the frame lands in the guest.
        let udp = UdpSocket::bind(format!("{TAP_HOST_IP}:0")).expect("udp bind");
        udp.send_to(b"soak", format!("{TAP_PEER_IP}:9"))
            .expect("udp send");
        hot_plug(vm);
        self.check_blk(mem);
        self.check_net(vm, mem);
        self.check_vsock(mem);
        self.check_fs(vm, mem);
        for id in ["blk0", "eth0", "vsock", "fs0", "fs1"] {
            assert_eq!(
                vm.device(id).map(|d| d.needs_reset()),
                Some(false),
                "{id} failed"
            );
        }
        conns
    }

    /// vsock, host -> guest: connect to the agent's port (the device asks the guest with an
    /// RX packet); guest -> host: the guest's REQUEST reaches `listener`. Both host ends.
    fn vsock_both_ways(&self, listener: &UnixListener) -> (UnixStream, UnixStream) {
        let mut host_conn = UnixStream::connect(self.dir.join("v.sock")).expect("connect v.sock");
        host_conn
            .write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())
            .expect("write CONNECT");
        listener.set_nonblocking(true).expect("nonblocking");
        let end = Instant::now() + STEP_TIMEOUT;
        let accepted = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < end,
                        "the guest's vsock connection never reached {HOST_PORT}"
                    );
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        (host_conn, accepted)
    }

    /// blk: the request completed OK and the sector is in the file.
    fn check_blk(&self, mem: &vm_memory::GuestMemoryMmap) {
        let c = &self.checks;
        assert_eq!(
            c.blk.wait(mem, 1, STEP_TIMEOUT),
            1,
            "blk request not completed"
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(c.blk_status)).ok(), Some(0));
        let mut sector = vec![0u8; 512];
        {
            use std::os::unix::fs::FileExt;
            std::fs::File::open(self.dir.join("disk.img"))
                .expect("open disk")
                .read_exact_at(&mut sector, BLK_SECTOR * 512)
                .expect("read disk");
        }
        assert!(
            sector.iter().all(|&b| b == BLK_PATTERN),
            "sector not written"
        );
    }

    /// net: the guest's frame went out, the host's ARP request came in.
    fn check_net(&self, vm: &Vm, mem: &vm_memory::GuestMemoryMmap) {
        let c = &self.checks;
        assert_eq!(
            c.net_tx.wait(mem, 1, STEP_TIMEOUT),
            1,
            "net TX not completed"
        );
        assert!(
            c.net_rx.wait(mem, 1, STEP_TIMEOUT) >= 1,
            "no frame reached net RX"
        );
        let m = vm
            .device("eth0")
            .and_then(|d| d.metrics().net())
            .expect("net metrics");
        assert!(m.tx_packets == 1 && m.rx_packets >= 1, "{m:?}");
    }

    /// vsock: the guest's request was answered (RESPONSE to GUEST_PORT) and the host's
    /// CONNECT became a REQUEST to AGENT_PORT.
    fn check_vsock(&self, mem: &vm_memory::GuestMemoryMmap) {
        let c = &self.checks;
        assert_eq!(
            c.vsock_tx.wait(mem, 1, STEP_TIMEOUT),
            1,
            "vsock TX not completed"
        );
        assert!(
            c.vsock_rx.wait(mem, 2, STEP_TIMEOUT) >= 2,
            "vsock RX: {} packets",
            c.vsock_rx.idx(mem)
        );
        let mut ops = Vec::new();
        for i in 0..c.vsock_rx.idx(mem) {
            let (head, _) = c.vsock_rx.elem(mem, i);
            let b = c.vsock_rx_bufs[head as usize];
            let mut hdr = [0u8; VSOCK_HDR];
            mem.read_slice(&mut hdr, GuestAddress(b.addr))
                .expect("rx hdr");
            let dst_port = u32::from_le_bytes(hdr[20..24].try_into().expect("4 bytes"));
            let op = u16::from_le_bytes(hdr[30..32].try_into().expect("2 bytes"));
            ops.push((op, dst_port));
        }
        assert!(
            ops.contains(&(VSOCK_OP_RESPONSE, GUEST_PORT))
                && ops.contains(&(VSOCK_OP_REQUEST, AGENT_PORT)),
            "vsock RX packets (op, dst_port): {ops:?}"
        );
    }

    /// fs, both backends: FUSE_INIT answered without error, and counted by the worker.
    fn check_fs(&self, vm: &Vm, mem: &vm_memory::GuestMemoryMmap) {
        for (i, (used, reply)) in self.checks.fs.iter().enumerate() {
            assert_eq!(
                used.wait(mem, 1, STEP_TIMEOUT),
                1,
                "fs{i}: no FUSE_INIT reply"
            );
            let mut out = [0u8; 16];
            mem.read_slice(&mut out, GuestAddress(reply.addr))
                .expect("reply");
            let error = i32::from_le_bytes(out[4..8].try_into().expect("4 bytes"));
            let unique = u64::from_le_bytes(out[8..16].try_into().expect("8 bytes"));
            assert_eq!((error, unique), (0, FUSE_UNIQUE), "fs{i}: FUSE_INIT reply");
        }
        // A worker adds its counts after it published the reply.
        let requests = || {
            vm.device("fs0")
                .and_then(|d| d.metrics().fs())
                .map(|m| m.requests)
        };
        let end = Instant::now() + STEP_TIMEOUT;
        while requests() != Some(1) && Instant::now() < end {
            std::thread::sleep(Duration::from_micros(200));
        }
        assert_eq!(requests(), Some(1));
    }
}

/// Both vsock peers see the VMM's side close (end of stream or reset, within the step
/// timeout).
fn check_closed_by_the_vmm(peers: [(&str, UnixStream); 2]) {
    for (what, mut s) in peers {
        s.set_read_timeout(Some(STEP_TIMEOUT)).expect("timeout");
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => {}
            Ok(n) => panic!("{what}: {n} unexpected bytes"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("{what}: the VMM's end stayed open")
            }
            Err(_) => {} // reset: closed as well
        }
    }
}

/// virtiofsd ends by itself once the frontend is gone (within the step timeout).
fn check_virtiofsd_ends(mut vfsd: KillOnDrop) {
    let end = Instant::now() + STEP_TIMEOUT;
    loop {
        if vfsd.0.try_wait().expect("wait virtiofsd").is_some() {
            break;
        }
        if Instant::now() > end {
            drop(vfsd);
            panic!("virtiofsd still running after the VM was dropped");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Hot-plug a vCPU and a 128 MiB memory block: the block is usable, both vCPUs run.
fn hot_plug(vm: &Vm) {
    vm.plug_vcpu(1).expect("plug vCPU 1");
    let r = vm.add_memory(128 << 20, 128 << 20).expect("add memory");
    let gm = vm.guest_memory();
    gm.write_obj(0x5eed_u64, GuestAddress(r.addr + 4096))
        .expect("write hot-plugged memory");
    assert_eq!(
        gm.read_obj::<u64>(GuestAddress(r.addr + 4096)).ok(),
        Some(0x5eed)
    );
    drop(gm);
    assert_eq!(
        vm.vcpu_states(),
        vec![(0, VcpuRunState::Running), (1, VcpuRunState::Running)]
    );
}

/// `cycles` cycles of a VM with every device kind (see the module documentation), on a
/// thread of its own inside a network namespace made for it. Panics if a cycle fails or a
/// prerequisite (root, iproute2, virtiofsd) is missing.
pub fn device_soak(cycles: usize) -> SoakReport {
    let virtiofsd = virtiofsd();
    std::thread::Builder::new()
        .name("device-soak".into())
        .spawn(move || {
            let env = DeviceEnv::new(virtiofsd);
            // This thread (and the VMs' threads it starts) live in the namespace: the TAP is
            // created there and the host side of the network test runs there.
            env.netns.enter();
            let mut during = None;
            env.cycle(&mut Phases::new(), Some(&mut during)); // warm-up
            let mut times = Phases::new();
            let before = Snapshot::take(&env.dir, Some(&env.netns.0));
            reset_peak_rss();
            let t = Instant::now();
            let heap_before = live_heap();
            for _ in 0..cycles {
                env.cycle(&mut times, None);
            }
            let heap = [heap_before, live_heap()];
            let total = t.elapsed();
            let after = Snapshot::take(&env.dir, Some(&env.netns.0));
            assert!(
                !Path::new("/sys/class/net").join(&env.tap).exists(),
                "the TAP leaked into the host's namespace"
            );
            SoakReport::new(
                format!(
                    "every device kind: {cycles} cycles (blk, TAP net, vsock, virtio-fs \
                     in-process + vhost-user/virtiofsd, +1 vCPU, +128 MiB)"
                ),
                cycles,
                times,
                total,
                [before, during.expect("taken in the warm-up cycle"), after],
                heap,
                DEVICE_RSS_BOUND_KIB,
            )
        })
        .expect("spawn the soak thread")
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}
