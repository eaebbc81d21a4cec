//! Resource accounting across VM lifecycles, panic containment (a panic on any Kestrel
//! thread, device handler or virtio-fs worker must neither hang nor leak), and virtio-fs
//! workers as threads of the VM (listed, filtered, ended with it). Every test here takes
//! `SERIAL`, so no other test's threads or fds disturb the counts.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kestrel_api::{DriveConfig, FsConfig, SerialOutput, VmConfig};
use kestrel_tests::*;
use kestrel_vmm::{ThreadClass, ThreadKind, Vm, VmExit, STOP_JOIN_TIMEOUT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn spin_config(name: &str, vcpus: u32) -> VmConfig {
    let k = write_tiny_guest(&format!("{name}.elf"), &spin());
    let mut c = VmConfig::new(k, vcpus, 64);
    c.serial.output = SerialOutput::None;
    c.kestrel.name = Some(name.into());
    c
}

fn cycle(c: &VmConfig) {
    let vm = Vm::create(c).unwrap();
    vm.start().unwrap();
    assert_eq!(vm.wait_timeout(Duration::from_millis(20)), None);
    assert_eq!(vm.stop(), VmExit::Stopped);
    drop(vm);
}

#[test]
fn twenty_create_start_stop_cycles_leave_no_threads_or_fds() {
    let _s = serial();
    let c = spin_config("cycle", 2);
    // Warm-up: the process-wide kick signal handler is installed once.
    cycle(&c);
    let (threads, fds) = (thread_count(), fd_count());
    for _ in 0..20 {
        cycle(&c);
    }
    assert_eq!(thread_count(), threads, "thread count changed");
    assert_eq!(fd_count(), fds, "fd count changed");
    // A failed create leaves nothing behind either.
    let mut bad = c.clone();
    bad.boot_source.kernel_image_path = scratch_dir().join("missing.elf");
    assert!(Vm::create(&bad).is_err());
    assert_eq!(fd_count(), fds);
}

/// Start `c`, inject a panic into `class`, and return the exit reason plus how long `wait`
/// took; checks that stop and drop return at once afterwards and nothing is left behind.
fn panic_ends_vm(c: &VmConfig, class: ThreadClass) -> VmExit {
    cycle(c); // warm-up (kick handler)
    let (threads, fds) = (thread_count(), fd_count());
    let vm = Vm::create(c).unwrap();
    vm.start().unwrap();
    vm.inject_panic(class).unwrap();
    let t0 = Instant::now();
    let exit = vm
        .wait_timeout(Duration::from_secs(10))
        .expect("a panic ends the VM instead of hanging it");
    assert!(vm.threads().is_empty(), "threads joined after wait");
    let t1 = Instant::now();
    assert_eq!(vm.stop(), exit, "stop reports the panic, not Stopped");
    drop(vm);
    assert!(t1.elapsed() < Duration::from_secs(1), "stop/drop are quick");
    assert!(
        t0.elapsed() < STOP_JOIN_TIMEOUT,
        "nothing waited for a timeout"
    );
    assert_eq!(thread_count(), threads, "thread count changed");
    assert_eq!(fd_count(), fds, "fd count changed");
    exit
}

#[test]
fn vcpu_panic_ends_the_vm_with_a_reason_naming_the_thread() {
    let _s = serial();
    let exit = panic_ends_vm(&spin_config("vpanic", 2), ThreadClass::Vcpu(1));
    match &exit {
        VmExit::ThreadPanicked { thread, message } => {
            assert_eq!(thread, "kestrel-vpanic-vcpu1");
            assert!(message.contains("injected panic on vCPU 1"), "{message}");
        }
        other => panic!("unexpected exit {other:?}"),
    }
    assert!(!exit.is_clean());
}

#[test]
fn event_loop_panic_ends_the_vm_and_vcpus_still_leave_kvm_run() {
    let _s = serial();
    // Two spinning vCPUs: only kicks get them out of KVM_RUN, and the loop that kicks is gone.
    let exit = panic_ends_vm(&spin_config("epanic", 2), ThreadClass::EventLoop);
    match &exit {
        VmExit::ThreadPanicked { thread, message } => {
            assert_eq!(thread, "kestrel-epanic-evloop");
            assert!(
                message.contains("injected panic on the event loop"),
                "{message}"
            );
        }
        other => panic!("unexpected exit {other:?}"),
    }
}

#[test]
fn device_handler_panic_fails_the_device_not_the_vm() {
    let _s = serial();
    let disk = scratch_dir().join("panic-disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let mut c = spin_config("dpanic", 1);
    c.drives.push(DriveConfig {
        drive_id: "d0".into(),
        path_on_host: Some(disk),
        ..DriveConfig::default()
    });
    cycle(&c);
    let (threads, fds) = (thread_count(), fd_count());
    let vm = Vm::create(&c).unwrap();
    vm.start().unwrap();
    assert_eq!(vm.device("d0").map(|d| d.needs_reset()), Some(false));
    assert_eq!(vm.device("nope").map(|d| d.needs_reset()), None);
    vm.inject_panic(ThreadClass::Device("d0".into())).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while vm.metrics().device_panics == 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(vm.metrics().device_panics, 1);
    assert_eq!(vm.device("d0").map(|d| d.needs_reset()), Some(true));
    // The VM runs on, and the event loop does not spin on the undrained queue event.
    let before = vm_thread_cpu_ns(&vm, false);
    assert_eq!(vm.wait_timeout(Duration::from_millis(500)), None);
    let spent = vm_thread_cpu_ns(&vm, false) - before;
    assert!(spent < 100_000_000, "event loop used {spent} ns in 500 ms");
    assert!(vm.threads().iter().any(|t| t.kind == ThreadKind::EventLoop));
    assert!(matches!(
        vm.inject_panic(ThreadClass::Device("nope".into())),
        Err(kestrel_vmm::VmmError::NoSuchDevice(_))
    ));
    assert_eq!(vm.stop(), VmExit::Stopped);
    drop(vm);
    assert_eq!(thread_count(), threads, "thread count changed");
    assert_eq!(fd_count(), fds, "fd count changed");
}

#[test]
fn fs_worker_panic_fails_the_device_not_the_vm() {
    let _s = serial();
    let share = scratch_dir().join("panic-share");
    std::fs::create_dir_all(&share).unwrap();
    // fs0 (the first virtio device) with a worker thread for its request queue; the guest
    // brings it up (DRIVER_OK starts the worker) and spins. fs1 serves without workers.
    let queues = [RingLayout::at(0x30_0000, 16), RingLayout::at(0x31_0000, 16)];
    let mut fs = FsConfig::shared_dir("share", &share);
    fs.num_queues = 1;
    fs.worker_threads = true;
    let c = fs_guest("fspanic", &queues, &[], 1000, fs);
    cycle(&c);
    let (threads, fds) = (thread_count(), fd_count());
    let t0 = Instant::now();
    let vm = Vm::create(&c).unwrap();
    vm.start().unwrap();
    // Armed at once: the worker takes it on its first pass, whether it runs yet or not.
    vm.inject_panic(ThreadClass::FsWorker("fs0".into()))
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while vm.metrics().device_panics == 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        vm.metrics().device_panics,
        1,
        "the worker's panic is counted"
    );
    assert_eq!(
        vm.device("fs0")
            .and_then(|d| d.metrics().fs())
            .unwrap()
            .panics,
        1
    );
    assert_eq!(vm.device("fs0").map(|d| d.needs_reset()), Some(true));
    assert_eq!(vm.device("fs1").map(|d| d.needs_reset()), Some(false));
    // The VM runs on.
    assert_eq!(vm.wait_timeout(Duration::from_millis(300)), None);
    assert_eq!(
        vm.threads().len(),
        2,
        "the vCPU and the event loop still run"
    );
    assert!(matches!(
        vm.inject_panic(ThreadClass::FsWorker("fs1".into())),
        Err(kestrel_vmm::VmmError::NoFsWorkers(_))
    ));
    assert!(matches!(
        vm.inject_panic(ThreadClass::FsWorker("nope".into())),
        Err(kestrel_vmm::VmmError::NoSuchDevice(_))
    ));
    let t1 = Instant::now();
    assert_eq!(vm.stop(), VmExit::Stopped);
    drop(vm);
    assert!(t1.elapsed() < Duration::from_secs(1), "stop/drop are quick");
    assert!(t0.elapsed() < STOP_JOIN_TIMEOUT + Duration::from_secs(5));
    assert_eq!(thread_count(), threads, "thread count changed");
    assert_eq!(fd_count(), fds, "fd count changed");
}

/// A FUSE request: header (`fuse_in_header`, 40 bytes) and body.
fn fuse_request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(40 + body.len());
    m.extend_from_slice(&desc_len(40 + body.len()).to_le_bytes());
    m.extend_from_slice(&opcode.to_le_bytes());
    m.extend_from_slice(&unique.to_le_bytes());
    m.extend_from_slice(&nodeid.to_le_bytes());
    m.extend_from_slice(&[0; 16]); // uid, gid, pid, total_extlen, padding
    m.extend_from_slice(body);
    m
}

const FUSE_LOOKUP: u32 = 1;
const FUSE_SETXATTR: u32 = 21;
const FUSE_GETXATTR: u32 = 22;
const FUSE_LISTXATTR: u32 = 23;
const FUSE_REMOVEXATTR: u32 = 24;
const FUSE_INIT: u32 = 26;

/// A tiny guest `name` that brings up `fs0` (the first virtio device, its queues at `rings`)
/// and then forever does the stores of `repeat`, pausing about `pause` PAUSEs in between;
/// `fs1` is a share of the same directory served without workers.
fn fs_guest(
    name: &str,
    rings: &[RingLayout],
    repeat: &[(u32, u32)],
    pause: u32,
    fs0: FsConfig,
) -> VmConfig {
    let code = mmio_writer(
        &virtio_mmio_bring_up(VIRTIO_MMIO_BASE, 0, rings),
        repeat,
        pause,
    );
    let mut c = VmConfig::new(write_tiny_guest(&format!("{name}.elf"), &code), 1, 32);
    c.serial.output = SerialOutput::None;
    c.kestrel.name = Some(name.into());
    let dir = fs0.shared_dir.clone().expect("an in-process share");
    c.fs.push(fs0);
    c.fs.push(FsConfig::shared_dir("plain", dir));
    c
}

/// The test's side of a virtio-fs driver on guest memory: requests go into the rings, the
/// replies are read back.
struct FuseDriver {
    mem: Arc<GuestMemoryMmap>,
    q: Vec<HostDriverRing>,
}

impl FuseDriver {
    fn new(mem: Arc<GuestMemoryMmap>, rings: &[RingLayout]) -> FuseDriver {
        let q = rings
            .iter()
            .map(|r| HostDriverRing::new(&mem, *r))
            .collect();
        FuseDriver { mem, q }
    }

    /// Publish request `req` on queue `queue` at `at`, its reply (header + 4 KiB) at
    /// `at + 0x1000`.
    fn push(&mut self, queue: usize, at: u64, req: &[u8]) {
        self.mem.write_slice(req, GuestAddress(at)).unwrap();
        let chain = [
            (at, desc_len(req.len()), 0),
            (at + 0x1000, 0x1000, DESC_WRITE),
        ];
        self.q[queue].push(&self.mem, &chain);
    }

    /// Chains the device has returned on `queue`.
    fn used(&self, queue: usize) -> u16 {
        self.q[queue].used_idx(&self.mem)
    }

    /// The reply at `at`: (error, unique, data after the 16-byte out header).
    fn reply(&self, at: u64) -> (i32, u64, Vec<u8>) {
        let mem = &self.mem;
        let len: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let error: i32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        let unique: u64 = mem.read_obj(GuestAddress(at + 8)).unwrap();
        let len = usize::try_from(len).expect("a u32 fits usize");
        let mut data = vec![0u8; len.saturating_sub(16)];
        mem.read_slice(&mut data, GuestAddress(at + 16)).unwrap();
        (error, unique, data)
    }
}

/// The fs worker threads `vm` lists.
fn workers(vm: &Vm) -> Vec<kestrel_vmm::ThreadInfo> {
    vm.threads()
        .into_iter()
        .filter(|t| matches!(t.kind, ThreadKind::FsWorker { .. }))
        .collect()
}

/// Where the `k`-th request on queue 2 goes.
fn q2_at(k: usize) -> u64 {
    0x41_0000 + 0x2000 * k as u64
}

#[test]
fn fs_workers_are_listed_as_vm_threads_run_filtered_and_end_with_the_vm() {
    let _s = serial();
    let share = scratch_dir().join("threads-share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("f"), b"x").unwrap();
    // fs0 with two request queues on worker threads; fs1 serves on the event loop. The guest
    // brings fs0 up and keeps notifying both request queues; the test plays the rest of the
    // driver: FUSE_INIT and a LOOKUP on queue 1, more requests on queue 2.
    let rings = [0x30_0000, 0x31_0000, 0x32_0000].map(|base| RingLayout::at(base, 16));
    let notify = [1, 2].map(|q| virtio_mmio_notify(VIRTIO_MMIO_BASE, q));
    let mut fs = FsConfig::shared_dir("share", &share);
    fs.num_queues = 2;
    fs.worker_threads = true;
    fs.xattr = true;
    let c = fs_guest("fsthr", &rings, &notify, 20_000, fs);
    cycle(&c);
    let (threads, fds) = (thread_count(), fd_count());
    let vm = Vm::create(&c).unwrap();
    // Absent `kestrel.seccomp`: the library's default.
    assert_eq!(c.kestrel.seccomp, None);
    assert_eq!(vm.seccomp_mode(), kestrel_api::SeccompMode::Errno);
    let mut fuse = FuseDriver::new(vm.guest_memory(), &rings);
    // FUSE 7.31 (virtio-fs), no flags.
    let init = [7u32, 31, 0, 0].map(u32::to_le_bytes).concat();
    fuse.push(1, 0x40_0000, &fuse_request(FUSE_INIT, 1, 0, &init));
    fuse.push(1, 0x40_2000, &fuse_request(FUSE_LOOKUP, 2, 1, b"f\0"));
    vm.start().unwrap();

    // The guest's DRIVER_OK starts the workers; they list themselves.
    let end = Instant::now() + Duration::from_secs(20);
    while workers(&vm).len() < 2 || fuse.used(1) < 2 {
        assert!(Instant::now() < end, "workers: {:?}", vm.threads());
        std::thread::sleep(Duration::from_millis(10));
    }
    let served = check_worker_serves_lookup_and_xattrs(&mut fuse, &share, end);
    let m = vm.device("fs0").and_then(|d| d.metrics().fs()).unwrap();
    let n = 2 + served;
    assert_eq!((m.requests, m.worker_requests), (n, n), "{m:?}");
    let fs1 = vm.device("fs1").and_then(|d| d.metrics().fs()).unwrap();
    assert_eq!(fs1.worker_requests, 0);
    let w = check_workers_listed_named_and_filtered(&vm);
    assert_eq!(vm.metrics().device_panics, 0);
    assert_eq!(vm.device("fs0").map(|d| d.needs_reset()), Some(false));
    check_workers_end_with_the_vm(&vm, &w);
    drop(fuse);
    drop(vm);
    assert_eq!(thread_count(), threads, "thread count changed");
    assert_eq!(fd_count(), fds, "fd count changed");
}

/// The second queue's worker serves a LOOKUP and (the share has xattrs on, and so has the
/// host file system, usually) set/get/list/remove of an xattr: each of those calls passes the
/// worker's filter stacked on the event loop's; every reply, the first queue's included, is
/// a success, and the xattr is seen on the host. Returns the requests served on queue 2.
fn check_worker_serves_lookup_and_xattrs(fuse: &mut FuseDriver, share: &Path, end: Instant) -> u64 {
    let xattrs = match host_setxattr(&share.join("f"), "user.host", b"h") {
        Err(libc::ENOTSUP) => {
            kestrel_tests::skip_without("user xattrs on the host file system");
            false
        }
        r => r.map(|()| true).unwrap(),
    };
    // fuse_entry_out.nodeid, after the reply header.
    let node: u64 = fuse.mem.read_obj(GuestAddress(0x40_3000 + 16)).unwrap();
    let reqs = q2_requests(node, xattrs);
    for (k, r) in reqs.iter().enumerate() {
        fuse.push(2, q2_at(k), r);
    }
    while usize::from(fuse.used(2)) < reqs.len() {
        assert!(Instant::now() < end, "queue 2 not served");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Every reply is a success (out header: len, error, unique).
    let replies = [(0x40_1000, 1), (0x40_3000, 2)]
        .into_iter()
        .chain((0..reqs.len()).map(|k| (q2_at(k) + 0x1000, 3 + k as u64)));
    for (addr, unique) in replies {
        let (error, u, _) = fuse.reply(addr);
        assert_eq!((error, u), (0, unique), "reply to request {unique}");
    }
    if xattrs {
        assert_eq!(fuse.reply(q2_at(2) + 0x1000).2, b"v-worker");
        let mut names: Vec<Vec<u8>> = fuse
            .reply(q2_at(3) + 0x1000)
            .2
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        names.sort();
        assert_eq!(names, [&b"user.host"[..], b"user.kestrel"]);
        assert_eq!(
            host_getxattr(&share.join("f"), "user.kestrel"),
            Err(libc::ENODATA),
            "removed by the guest's request"
        );
    }
    reqs.len() as u64
}

/// The requests for queue 2: a LOOKUP, then (with `xattrs`) set, get, list and remove of
/// `user.kestrel` on node `node`.
fn q2_requests(node: u64, xattrs: bool) -> Vec<Vec<u8>> {
    let name = b"user.kestrel\0";
    let u32s = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut reqs = vec![fuse_request(FUSE_LOOKUP, 3, 1, b"f\0")];
    if xattrs {
        reqs.extend([
            // fuse_setxattr_in {size, flags}, name, value.
            fuse_request(
                FUSE_SETXATTR,
                4,
                node,
                &[&u32s(&[8, 0])[..], name, b"v-worker"].concat(),
            ),
            // fuse_getxattr_in {size, padding}, name.
            fuse_request(
                FUSE_GETXATTR,
                5,
                node,
                &[&u32s(&[64, 0])[..], name].concat(),
            ),
            fuse_request(FUSE_LISTXATTR, 6, node, &u32s(&[256, 0])),
            fuse_request(FUSE_REMOVEXATTR, 7, node, name),
        ]);
    }
    reqs
}

/// fs0's two workers are listed with their kinds and names (fs1 has none), are threads of
/// their own named as listed, and run under two seccomp filters (the event loop's, inherited,
/// and their own) where the loop has one. Returns them.
fn check_workers_listed_named_and_filtered(vm: &Vm) -> Vec<kestrel_vmm::ThreadInfo> {
    let all = vm.threads();
    let evloop = all
        .iter()
        .find(|t| t.kind == ThreadKind::EventLoop)
        .unwrap();
    let mut w = workers(vm);
    w.sort_by_key(|t| t.name.clone());
    assert_eq!(
        w.iter()
            .map(|t| (t.kind, t.name.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (
                ThreadKind::FsWorker { share: 0, queue: 1 },
                "kestrel-fsthr-fs0-q1"
            ),
            (
                ThreadKind::FsWorker { share: 0, queue: 2 },
                "kestrel-fsthr-fs0-q2"
            ),
        ],
        "fs1 serves on the event loop: no workers"
    );
    for t in &w {
        assert_ne!(t.tid, evloop.tid);
        let comm = std::fs::read_to_string(format!("/proc/self/task/{}/comm", t.tid)).unwrap();
        assert_eq!(comm.trim(), kestrel_devices::os_thread_name(&t.name));
        assert_eq!(comm.trim(), t.name.replace("kestrel-", "k-"));
        assert_eq!(task_status(t.tid, "Seccomp"), "2", "{}", t.name);
        assert_eq!(task_status(t.tid, "Seccomp_filters"), "2", "{}", t.name);
    }
    assert_eq!(task_status(evloop.tid, "Seccomp_filters"), "1");
    w
}

/// Stopping the VM ends its fs workers too: none listed, none left running (within 1 s).
fn check_workers_end_with_the_vm(vm: &Vm, w: &[kestrel_vmm::ThreadInfo]) {
    assert_eq!(vm.stop(), VmExit::Stopped);
    assert!(vm.threads().is_empty(), "{:?}", vm.threads());
    let end = Instant::now() + Duration::from_secs(1);
    for t in w {
        while Path::new(&format!("/proc/self/task/{}", t.tid)).exists() {
            assert!(Instant::now() < end, "{} still runs after stop", t.name);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
