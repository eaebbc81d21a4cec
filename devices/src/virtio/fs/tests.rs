//! Device tests: a scripted guest driver sends real FUSE requests through real split queues in
//! guest memory (rings laid out by hand: descriptor table, avail ring +4 KiB, used ring +8 KiB),
//! the device runs in a real `EventManager` pumped on the test thread, and the share is a real
//! temporary directory. The vhost-user test talks to a real virtiofsd. No KVM.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber};
use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, CreateIn, EntryOut, GetattrIn, InHeader, InitIn, InitOut, MkdirIn, MknodIn, Opcode,
    OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, RenameIn, SetattrIn, WriteIn, WriteOut, ROOT_ID,
};
use kestrel_api::{FsCache, FsConfig};
use virtio_queue::Queue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::vhost_user::VhostUserFsConfig;
use super::*;

/// An in-process device for a VM config's share (through the device's own config type).
fn new_fs(config: &FsConfig) -> Result<Fs, FsError> {
    Fs::new(&super::FsConfig::try_from(config)?)
}
use crate::virtio::test_util::{
    on_event_loop, Ring, TmpDir, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, WAIT,
};
use crate::virtio::{RestoreError, VirtioDevice, VirtioInterrupt};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = 256;
/// Queue `i`'s rings start at `RING_BASE + i * RING_STRIDE`.
const RING_BASE: u64 = 0x1_0000;
const RING_STRIDE: u64 = 0x4000;
const REQ_BUF: u64 = 0x20_0000;
const REPLY_BUF: u64 = 0x60_0000;
const REPLY_LEN: u32 = 0x10_1000;
/// FATTR_MODE, FATTR_SIZE.
const FATTR_MODE: u32 = 0x1;
const FATTR_SIZE: u32 = 0x8;
/// FUSE_INIT flags the test driver offers: ASYNC_READ | BIG_WRITES | DO_READDIRPLUS | MAX_PAGES.
const INIT_FLAGS: u32 = 0x1 | 0x20 | 0x2000 | 0x40_0000;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A FUSE reply.
#[derive(Debug)]
pub(super) struct Reply {
    pub hdr: OutHeader,
    pub body: Vec<u8>,
    pub used_len: u32,
}

impl Reply {
    /// The errno of an error reply (0 for success).
    pub fn errno(&self) -> i32 {
        -self.hdr.error
    }

    /// The body as `T`, asserting success.
    pub fn obj<T: ByteValued>(&self) -> T {
        assert_eq!(self.hdr.error, 0, "FUSE error {}", self.errno());
        T::from_slice(&self.body[..std::mem::size_of::<T>()])
            .copied()
            .expect("reply too short")
    }
}

fn cstr(s: &str) -> Vec<u8> {
    CString::new(s).unwrap().into_bytes_with_nul()
}

/// A scripted driver for any virtio-fs device (in-process or vhost-user): it lays FUSE
/// requests into guest memory, kicks the queue and pumps the event loop until they complete.
pub(super) struct Driver<D: MutEventSubscriber + VirtioDevice + 'static> {
    pub mem: GuestMemoryMmap,
    pub dev: Arc<Mutex<D>>,
    pub em: EventManager<Arc<Mutex<D>>>,
    pub kicks: Vec<EventFd>,
    pub irq: EventFd,
    pub interrupt: Arc<VirtioInterrupt>,
    pub rings: Vec<Ring>,
    unique: u64,
    /// Serve queues by calling this directly instead of through the event loop, adding the
    /// time it takes to `busy` (how long the loop would be blocked).
    pub serve_direct: Option<fn(&mut D, usize)>,
    pub busy: Duration,
}

/// `n` empty rings (one per queue) in `mem` and the device-side queues over them.
fn fresh_rings(mem: &GuestMemoryMmap, n: usize) -> (Vec<Ring>, Vec<Queue>) {
    (0..n)
        .map(|i| Ring::new(mem, RING_BASE + i as u64 * RING_STRIDE, QSIZE))
        .unzip()
}

impl<D: MutEventSubscriber + VirtioDevice + 'static> Driver<D> {
    /// `dev` with its queues in `mem`, not yet activated.
    pub fn new(dev: D, mem: GuestMemoryMmap) -> (Driver<D>, Vec<Queue>) {
        let nq = dev.queue_max_sizes().len();
        let (rings, queues) = fresh_rings(&mem, nq);
        (Driver::with_rings(dev, mem, rings), queues)
    }

    /// `dev` driven over existing `rings` in `mem` (a restored device), not yet activated.
    pub fn with_rings(dev: D, mem: GuestMemoryMmap, rings: Vec<Ring>) -> Driver<D> {
        let (dev, em, kicks) = on_event_loop(dev);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        Driver {
            mem,
            dev,
            em,
            kicks,
            irq,
            interrupt,
            rings,
            unique: 0,
            serve_direct: None,
            busy: Duration::ZERO,
        }
    }

    /// After a device reset: fresh rings for every queue, then [`Driver::activate`] with them.
    pub fn reactivate(&mut self) {
        let (rings, queues) = fresh_rings(&self.mem, self.rings.len());
        self.rings = rings;
        self.activate(queues);
    }

    /// Acknowledge every offered feature and activate with `queues`; run the loop once.
    pub fn activate(&mut self, queues: Vec<Queue>) {
        let mem = GuestMemoryAtomic::new(self.mem.clone());
        {
            let mut d = self.dev.lock().unwrap();
            let f = d.avail_features();
            d.set_acked_features(f);
            d.activate(mem, self.interrupt.clone(), queues).unwrap();
        }
        self.em.run_with_timeout(100).unwrap();
    }

    /// Put a chain on queue `q`: `readable` buffers (each its own descriptor, laid out one after
    /// the other at `REQ_BUF`), then one writable buffer of `reply_len` bytes at `REPLY_BUF`.
    /// Returns the head index.
    pub fn submit(&mut self, q: usize, readable: &[&[u8]], reply_len: u32) -> u16 {
        let mut addr = REQ_BUF;
        let n = u16::try_from(readable.len()).unwrap() + u16::from(reply_len > 0);
        for (i, buf) in readable.iter().enumerate() {
            self.mem.write_slice(buf, GuestAddress(addr)).unwrap();
            let i = u16::try_from(i).unwrap();
            let flags = if i + 1 < n { VRING_DESC_F_NEXT } else { 0 };
            self.rings[q].set_desc(
                &self.mem,
                i,
                addr,
                u32::try_from(buf.len()).unwrap(),
                flags,
                i + 1,
            );
            addr += (buf.len() as u64 + 7) & !7;
        }
        if reply_len > 0 {
            self.mem
                .write_slice(&vec![0xa5u8; reply_len as usize], GuestAddress(REPLY_BUF))
                .unwrap();
            self.rings[q].set_desc(
                &self.mem,
                n - 1,
                REPLY_BUF,
                reply_len,
                VRING_DESC_F_WRITE,
                0,
            );
        }
        self.rings[q].publish(&self.mem, 0);
        0
    }

    /// Kick queue `q` and pump the loop until one used entry appears.
    pub fn complete(&mut self, q: usize) -> (u16, u32) {
        if let Some(serve) = self.serve_direct {
            let mut dev = self.dev.lock().unwrap();
            let t = Instant::now();
            serve(&mut dev, q);
            self.busy += t.elapsed();
        } else {
            self.kicks[q].write(1).unwrap();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            if self.serve_direct.is_none() {
                self.em.run_with_timeout(0).unwrap();
            }
            let used = self.rings[q].take_used(&self.mem);
            if let Some(&u) = used.first() {
                assert_eq!(used.len(), 1, "one request at a time");
                return u;
            }
            assert!(Instant::now() < deadline, "queue {q}: no completion");
            // A worker thread or an external daemon completes it in the background.
            std::thread::yield_now();
        }
    }

    /// Send one FUSE request on request queue 1 and return the reply. `args` are the request's
    /// parts after the header; each goes into its own descriptor.
    pub fn fuse(&mut self, opcode: Opcode, nodeid: u64, args: &[&[u8]]) -> Reply {
        self.fuse_on(1, opcode, nodeid, args)
    }

    pub fn fuse_on(&mut self, q: usize, opcode: Opcode, nodeid: u64, args: &[&[u8]]) -> Reply {
        self.unique += 1;
        let len = std::mem::size_of::<InHeader>() + args.iter().map(|a| a.len()).sum::<usize>();
        let h = InHeader {
            len: u32::try_from(len).unwrap(),
            opcode: opcode as u32,
            unique: self.unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        };
        let mut parts: Vec<&[u8]> = vec![h.as_slice()];
        parts.extend_from_slice(args);
        self.submit(q, &parts, REPLY_LEN);
        let (_, used_len) = self.complete(q);
        let mut hdr = OutHeader::default();
        let mut body = Vec::new();
        if used_len as usize >= std::mem::size_of::<OutHeader>() {
            hdr = self.mem.read_obj(GuestAddress(REPLY_BUF)).unwrap();
            assert_eq!(hdr.unique, self.unique, "reply to another request");
            assert_eq!(hdr.len, used_len, "used length is the reply's length");
            body = vec![0u8; used_len as usize - std::mem::size_of::<OutHeader>()];
            self.mem
                .read_slice(&mut body, GuestAddress(REPLY_BUF + 16))
                .unwrap();
        }
        Reply {
            hdr,
            body,
            used_len,
        }
    }

    pub fn init(&mut self) -> InitOut {
        let i = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0x2_0000,
            flags: INIT_FLAGS,
        };
        let r = self.fuse(Opcode::Init, 0, &[i.as_slice()]);
        let out: InitOut = r.obj();
        assert_eq!(out.major, 7);
        out
    }

    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let r = self.fuse(Opcode::Lookup, parent, &[&cstr(name)]);
        if r.hdr.error != 0 {
            return Err(r.errno());
        }
        Ok(r.obj())
    }

    pub fn getattr(&mut self, nodeid: u64) -> Result<AttrOut, i32> {
        let g = GetattrIn::default();
        let r = self.fuse(Opcode::Getattr, nodeid, &[g.as_slice()]);
        if r.hdr.error != 0 {
            return Err(r.errno());
        }
        Ok(r.obj())
    }

    pub fn open(&mut self, nodeid: u64, flags: i32) -> Result<u64, i32> {
        let o = OpenIn {
            flags: u32::try_from(flags).unwrap(),
            fuse_flags: 0,
        };
        let r = self.fuse(Opcode::Open, nodeid, &[o.as_slice()]);
        if r.hdr.error != 0 {
            return Err(r.errno());
        }
        Ok(r.obj::<OpenOut>().fh)
    }

    pub fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        self.read_with_flags(nodeid, fh, offset, size, 0)
    }

    /// READ carrying the guest file's `flags` (a Linux client sends its `f_flags`).
    pub fn read_with_flags(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        size: u32,
        flags: i32,
    ) -> Result<Vec<u8>, i32> {
        let ri = ReadIn {
            fh,
            offset,
            size,
            flags: u32::try_from(flags).unwrap(),
            ..Default::default()
        };
        let r = self.fuse(Opcode::Read, nodeid, &[ri.as_slice()]);
        if r.hdr.error != 0 {
            return Err(r.errno());
        }
        Ok(r.body)
    }

    pub fn write(&mut self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let wi = WriteIn {
            fh,
            offset,
            size: u32::try_from(data.len()).unwrap(),
            ..Default::default()
        };
        // Header + WriteIn in one descriptor chain part each, the data in a third.
        let r = self.fuse(Opcode::Write, nodeid, &[wi.as_slice(), data]);
        if r.hdr.error != 0 {
            return Err(r.errno());
        }
        Ok(r.obj::<WriteOut>().size)
    }

    pub fn create(
        &mut self,
        parent: u64,
        name: &str,
        flags: i32,
        mode: u32,
    ) -> Result<(EntryOut, u64), i32> {
        let c = CreateIn {
            flags: u32::try_from(flags).unwrap(),
            mode: libc::S_IFREG | mode,
            umask: 0,
            fuse_flags: 0,
        };
        let r = self.fuse(Opcode::Create, parent, &[c.as_slice(), &cstr(name)]);
        if r.hdr.error != 0 {
            return Err(r.errno());
        }
        let e: EntryOut = r.obj();
        let o = OpenOut::from_slice(&r.body[std::mem::size_of::<EntryOut>()..][..16])
            .copied()
            .unwrap();
        Ok((e, o.fh))
    }

    pub fn release(&mut self, nodeid: u64, fh: u64) {
        let ri = ReleaseIn {
            fh,
            ..Default::default()
        };
        let r = self.fuse(Opcode::Release, nodeid, &[ri.as_slice()]);
        assert_eq!(r.hdr.error, 0, "release");
    }

    pub fn setattr(&mut self, nodeid: u64, s: SetattrIn) -> Result<AttrOut, i32> {
        let r = self.fuse(Opcode::Setattr, nodeid, &[s.as_slice()]);
        if r.hdr.error != 0 {
            return Err(r.errno());
        }
        Ok(r.obj())
    }

    pub fn mknod(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        rdev: u32,
    ) -> Result<EntryOut, i32> {
        let m = MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        };
        let r = self.fuse(Opcode::Mknod, parent, &[m.as_slice(), &cstr(name)]);
        if r.hdr.error != 0 {
            return Err(r.errno());
        }
        Ok(r.obj())
    }

    pub fn errno_of(&mut self, opcode: Opcode, nodeid: u64, args: &[&[u8]]) -> i32 {
        self.fuse(opcode, nodeid, args).errno()
    }
}

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// An activated in-process device over `config` (INIT not sent).
fn driver_for(config: &FsConfig) -> Driver<Fs> {
    let (mut d, queues) = Driver::new(new_fs(config).unwrap(), guest_memory());
    d.activate(queues);
    d
}

/// A share in a fresh temporary directory (`<tmp>/share`), activated and INITed.
struct Share {
    tmp: TmpDir,
    dir: PathBuf,
    d: Driver<Fs>,
}

impl Share {
    fn new() -> Share {
        Share::with(|_| {})
    }

    fn with(f: impl FnOnce(&mut FsConfig)) -> Share {
        let tmp = TmpDir::new("kfs");
        let dir = tmp.0.join("share");
        std::fs::create_dir(&dir).unwrap();
        let mut config = FsConfig::shared_dir("kestrel", &dir);
        f(&mut config);
        let mut d = driver_for(&config);
        d.init();
        Share { tmp, dir, d }
    }

    fn metrics(&self) -> FsMetrics {
        self.d.dev.lock().unwrap().metrics()
    }
}

// ---------------------------------------------------------------------------------------------
// Device model

#[test]
fn config_space_and_features() {
    let tmp = TmpDir::new("kfs");
    let mut config = FsConfig::shared_dir("my-tag", &tmp.0);
    config.num_queues = 3;
    config.queue_size = 128;
    let dev = new_fs(&config).unwrap();
    assert_eq!(dev.device_type(), 26);
    assert_eq!(dev.queue_max_sizes(), &[128, 128, 128, 128]);
    assert_eq!(dev.queue_events().len(), 4);
    let f = dev.avail_features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
    let mut c = [0xffu8; CONFIG_SPACE_LEN];
    dev.read_config(0, &mut c);
    assert_eq!(&c[..6], b"my-tag");
    assert!(c[6..FS_TAG_LEN].iter().all(|&b| b == 0));
    assert_eq!(u32::from_le_bytes(c[36..40].try_into().unwrap()), 3);
    // Partial and out-of-range reads.
    let mut w = [0u8; 4];
    dev.read_config(36, &mut w);
    assert_eq!(u32::from_le_bytes(w), 3);
    let mut w = [0xffu8; 8];
    dev.read_config(38, &mut w);
    assert_eq!(w, [0, 0, 0, 0, 0, 0, 0, 0]);
    dev.read_config(u64::MAX, &mut w);
    assert_eq!(w, [0; 8]);
    // A 36-byte tag fills the field with no terminator.
    let long = "t".repeat(FS_TAG_LEN);
    assert_eq!(&config_space(&long, 1)[..FS_TAG_LEN], long.as_bytes());
}

#[test]
fn constructor_errors() {
    let tmp = TmpDir::new("kfs");
    let mut c = FsConfig::shared_dir("", &tmp.0);
    assert!(matches!(new_fs(&c), Err(FsError::InvalidTag(_))));
    c.tag = "x".repeat(37);
    assert!(matches!(new_fs(&c), Err(FsError::InvalidTag(_))));
    c.tag = "ok".into();
    c.num_queues = 0;
    assert!(matches!(new_fs(&c), Err(FsError::InvalidQueues { .. })));
    c.num_queues = 1;
    c.queue_size = 100;
    assert!(matches!(new_fs(&c), Err(FsError::InvalidQueues { .. })));
    c.queue_size = 256;
    c.shared_dir = Some(tmp.0.join("missing"));
    let e = new_fs(&c).err().unwrap();
    assert!(matches!(e, FsError::SharedDir { .. }), "{e}");
    assert!(e.to_string().contains("missing"), "{e}");
    let v = FsConfig::vhost_user("ok", tmp.0.join("s.sock"));
    assert!(matches!(new_fs(&v), Err(FsError::NoSharedDir(_))));
    c.shared_dir = Some(PathBuf::from(std::ffi::OsStr::from_bytes(b"/tmp/\xff")));
    assert!(matches!(new_fs(&c), Err(FsError::InvalidSharedDir(_))));
}

#[test]
fn wrong_queue_count_refused() {
    let tmp = TmpDir::new("kfs");
    let mut dev = new_fs(&FsConfig::shared_dir("t", &tmp.0)).unwrap();
    let mem = guest_memory();
    let (_, q) = Ring::new(&mem, RING_BASE, QSIZE);
    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    let e = dev
        .activate(GuestMemoryAtomic::new(mem), irq, vec![q])
        .unwrap_err();
    assert_eq!(
        e,
        ActivateError::QueueCount {
            expected: 2,
            got: 1
        }
    );
    assert!(!dev.is_activated());
}

// ---------------------------------------------------------------------------------------------
// FUSE operations against a real directory

#[test]
fn fuse_operations_reach_the_host() {
    fuse_operations(false);
}

#[test]
fn fuse_operations_on_worker_threads() {
    fuse_operations(true);
}

fn fuse_operations(workers: bool) {
    let mut s = Share::with(|c| c.worker_threads = workers);
    if workers {
        let dev = s.d.dev.lock().unwrap();
        assert!(dev.uses_worker_threads());
        let tids = dev.worker_tids();
        assert_eq!(tids.len(), 1, "one worker per request queue");
        let deadline = Instant::now() + WAIT;
        while dev.worker_tids()[0] == 0 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        let tid = dev.worker_tids()[0];
        let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap();
        assert_eq!(comm.trim(), "kestrel-fs-q1");
        // The worker lists itself (the VMM's thread list reads this handle).
        let listed = dev.worker_threads();
        while listed.is_empty() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            listed.list(),
            vec![FsWorkerThread {
                name: "kestrel-fs-q1".into(),
                queue: 1,
                tid
            }]
        );
    } else {
        assert!(s.d.dev.lock().unwrap().worker_tids().is_empty());
        assert!(s.d.dev.lock().unwrap().worker_threads().is_empty());
    }
    std::fs::write(s.dir.join("hello.txt"), b"hello from the host").unwrap();

    // LOOKUP + GETATTR
    let e = s.d.lookup(ROOT_ID, "hello.txt").unwrap();
    assert_eq!(e.attr.size, 19);
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(e.attr_valid, 1, "cache=auto: 1 s");
    let a = s.d.getattr(e.nodeid).unwrap();
    assert_eq!(a.attr.size, 19);
    assert_eq!(s.d.lookup(ROOT_ID, "nope").map(|_| ()), Err(libc::ENOENT));

    // OPEN + READ
    let fh = s.d.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(
        s.d.read(e.nodeid, fh, 0, 4096).unwrap(),
        b"hello from the host"
    );
    assert_eq!(s.d.read(e.nodeid, fh, 6, 4).unwrap(), b"from");
    s.d.release(e.nodeid, fh);

    // CREATE + WRITE
    let (c, fh) = s.d.create(ROOT_ID, "new.bin", libc::O_RDWR, 0o640).unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(s.d.write(c.nodeid, fh, 0, &data).unwrap(), 100_000);
    assert_eq!(s.d.write(c.nodeid, fh, 200_000, b"tail").unwrap(), 4);
    s.d.release(c.nodeid, fh);
    let host = std::fs::read(s.dir.join("new.bin")).unwrap();
    assert_eq!(host.len(), 200_004);
    assert_eq!(&host[..100_000], &data[..]);
    assert_eq!(&host[200_000..], b"tail");
    let meta = std::fs::metadata(s.dir.join("new.bin")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640 & !current_umask());

    // SETATTR (truncate), seen on the host
    let t = SetattrIn {
        valid: FATTR_SIZE,
        size: 10,
        ..Default::default()
    };
    assert_eq!(s.d.setattr(c.nodeid, t).unwrap().attr.size, 10);
    assert_eq!(std::fs::metadata(s.dir.join("new.bin")).unwrap().len(), 10);

    // RENAME
    let rn = RenameIn { newdir: ROOT_ID };
    let r = s.d.fuse(
        Opcode::Rename,
        ROOT_ID,
        &[rn.as_slice(), &cstr("new.bin"), &cstr("renamed.bin")],
    );
    assert_eq!(r.hdr.error, 0);
    assert!(!s.dir.join("new.bin").exists());
    assert_eq!(
        std::fs::read(s.dir.join("renamed.bin")).unwrap(),
        &data[..10]
    );

    // MKDIR + file inside
    let md = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let r =
        s.d.fuse(Opcode::Mkdir, ROOT_ID, &[md.as_slice(), &cstr("sub")]);
    let sub: EntryOut = r.obj();
    assert!(s.dir.join("sub").is_dir());
    let (f, fh) =
        s.d.create(sub.nodeid, "inner", libc::O_WRONLY, 0o600)
            .unwrap();
    s.d.write(f.nodeid, fh, 0, b"x").unwrap();
    s.d.release(f.nodeid, fh);
    assert_eq!(std::fs::read(s.dir.join("sub/inner")).unwrap(), b"x");

    // UNLINK
    let r = s.d.fuse(Opcode::Unlink, ROOT_ID, &[&cstr("renamed.bin")]);
    assert_eq!(r.hdr.error, 0);
    assert!(!s.dir.join("renamed.bin").exists());
    assert_eq!(
        s.d.errno_of(Opcode::Unlink, ROOT_ID, &[&cstr("renamed.bin")]),
        libc::ENOENT
    );

    let m = s.metrics();
    assert!(m.requests >= 15, "{m:?}");
    assert_eq!(m.error_replies, 2, "{m:?}");
    assert_eq!(
        m.malformed_chains + m.failed_requests + m.queue_errors + m.panics,
        0
    );
    assert!(m.interrupts >= m.requests, "{m:?}");
    assert_eq!(m.worker_requests, if workers { m.requests } else { 0 });
    if workers {
        // Reset joins the worker: its thread is gone afterwards.
        let tid = s.d.dev.lock().unwrap().worker_tids()[0];
        let listed = s.d.dev.lock().unwrap().worker_threads();
        s.d.dev.lock().unwrap().reset();
        assert!(s.d.dev.lock().unwrap().worker_tids().is_empty());
        assert!(listed.is_empty(), "a joined worker is no longer listed");
        assert!(!Path::new(&format!("/proc/self/task/{tid}")).exists());
    }
    drop(s.tmp);
}

/// A `Name:  value` line of `/proc/thread-self/status`.
fn proc_status(name: &str) -> String {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in /proc/thread-self/status"))
        .trim()
        .to_string()
}

/// The umask, read without changing it (this thread shares it with the whole process).
fn current_umask() -> u32 {
    u32::from_str_radix(&proc_status("Umask"), 8).unwrap()
}

#[test]
fn cache_policies_set_timeouts() {
    for (cache, secs) in [
        (FsCache::None, 0),
        (FsCache::Auto, 1),
        (FsCache::Always, 86_400),
    ] {
        let mut s = Share::with(|c| c.cache = cache);
        std::fs::write(s.dir.join("f"), b"").unwrap();
        let e = s.d.lookup(ROOT_ID, "f").unwrap();
        assert_eq!((e.entry_valid, e.attr_valid), (secs, secs), "{cache:?}");
        let fh = s.d.open(e.nodeid, libc::O_RDONLY).unwrap();
        let _ = fh;
    }
}

#[test]
fn xattr_off_by_default() {
    let mut s = Share::new();
    std::fs::write(s.dir.join("f"), b"").unwrap();
    let e = s.d.lookup(ROOT_ID, "f").unwrap();
    let gx = fuse_backend_rs::abi::fuse_abi::GetxattrIn {
        size: u32::MAX,
        padding: 0,
    };
    let r = s.d.fuse(
        Opcode::Getxattr,
        e.nodeid,
        &[gx.as_slice(), &cstr("user.x")],
    );
    assert_eq!(r.errno(), libc::ENOSYS);
    // With xattr on, a huge size is capped (no 4 GiB allocation) and the call works.
    let mut s = Share::with(|c| c.xattr = true);
    std::fs::write(s.dir.join("f"), b"").unwrap();
    let e = s.d.lookup(ROOT_ID, "f").unwrap();
    let r = s.d.fuse(
        Opcode::Getxattr,
        e.nodeid,
        &[gx.as_slice(), &cstr("user.x")],
    );
    assert!(
        r.errno() == libc::ENODATA || r.errno() == libc::EOPNOTSUPP,
        "{r:?}"
    );
}

#[test]
fn read_only_share_refuses_changes() {
    let mut s = Share::with(|c| c.read_only = true);
    std::fs::write(s.dir.join("f"), b"data").unwrap();
    let e = s.d.lookup(ROOT_ID, "f").unwrap();
    // Reading works.
    let fh = s.d.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(s.d.read(e.nodeid, fh, 0, 10).unwrap(), b"data");
    // Every change is EROFS.
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(s.d.open(e.nodeid, flags), Err(libc::EROFS), "{flags:#x}");
    }
    assert_eq!(s.d.write(e.nodeid, fh, 0, b"x"), Err(libc::EROFS));
    assert_eq!(
        s.d.create(ROOT_ID, "g", libc::O_WRONLY, 0o644).map(|_| ()),
        Err(libc::EROFS)
    );
    let t = SetattrIn {
        valid: FATTR_SIZE,
        size: 0,
        ..Default::default()
    };
    assert_eq!(s.d.setattr(e.nodeid, t).map(|_| ()), Err(libc::EROFS));
    let md = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    assert_eq!(
        s.d.errno_of(Opcode::Mkdir, ROOT_ID, &[md.as_slice(), &cstr("d")]),
        libc::EROFS
    );
    assert_eq!(
        s.d.errno_of(Opcode::Unlink, ROOT_ID, &[&cstr("f")]),
        libc::EROFS
    );
    let rn = RenameIn { newdir: ROOT_ID };
    assert_eq!(
        s.d.errno_of(
            Opcode::Rename,
            ROOT_ID,
            &[rn.as_slice(), &cstr("f"), &cstr("g")]
        ),
        libc::EROFS
    );
    assert_eq!(
        s.d.errno_of(Opcode::Symlink, ROOT_ID, &[&cstr("l"), &cstr("/etc")]),
        libc::EROFS
    );
    assert_eq!(
        s.d.mknod(ROOT_ID, "p", libc::S_IFIFO | 0o644, 0)
            .map(|_| ()),
        Err(libc::EROFS)
    );
    let access = fuse_backend_rs::abi::fuse_abi::AccessIn {
        mask: libc::W_OK as u32,
        padding: 0,
    };
    assert_eq!(
        s.d.errno_of(Opcode::Access, e.nodeid, &[access.as_slice()]),
        libc::EROFS
    );
    // Nothing changed on the host.
    assert_eq!(std::fs::read(s.dir.join("f")).unwrap(), b"data");
    let names: Vec<_> = std::fs::read_dir(&s.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("f")]);
}

// ---------------------------------------------------------------------------------------------
// Security: the guest stays inside the shared directory

/// A file outside the share that the guest must never see or change.
fn host_secret(tmp: &TmpDir) -> PathBuf {
    let p = tmp.0.join("host-secret");
    std::fs::write(&p, b"TOP-SECRET host data").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn assert_no_leak(r: &Reply) {
    let s = String::from_utf8_lossy(&r.body);
    assert!(
        !s.contains("TOP-SECRET") && !s.contains("root:x:0"),
        "leak: {s}"
    );
}

#[test]
fn absolute_symlink_does_not_expose_host_files() {
    let mut s = Share::new();
    let secret = host_secret(&s.tmp);
    std::os::unix::fs::symlink("/etc/passwd", s.dir.join("evil")).unwrap();
    std::os::unix::fs::symlink(&secret, s.dir.join("evil2")).unwrap();
    std::os::unix::fs::symlink("/etc", s.dir.join("evildir")).unwrap();
    std::os::unix::fs::symlink("../host-secret", s.dir.join("evil3")).unwrap();

    for name in ["evil", "evil2", "evil3"] {
        // LOOKUP yields the link itself...
        let e = s.d.lookup(ROOT_ID, name).unwrap();
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
        // ...which cannot be opened (the guest's kernel resolves links in its own namespace)...
        for flags in [
            libc::O_RDONLY,
            libc::O_RDWR,
            libc::O_RDONLY | libc::O_NOFOLLOW,
        ] {
            assert_eq!(
                s.d.open(e.nodeid, flags),
                Err(libc::EBADF),
                "{name} {flags:#x}"
            );
        }
        // ...nor read through a guessed handle.
        for fh in 0..4 {
            let ri = ReadIn {
                fh,
                size: 4096,
                ..Default::default()
            };
            let r = s.d.fuse(Opcode::Read, e.nodeid, &[ri.as_slice()]);
            assert_ne!(r.hdr.error, 0, "{name} fh {fh}");
            assert_no_leak(&r);
        }
        // GETATTR/SETATTR act on the link, not on its target.
        let a = s.d.getattr(e.nodeid).unwrap();
        assert_eq!(a.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        let chmod = SetattrIn {
            valid: FATTR_MODE,
            mode: 0o777,
            ..Default::default()
        };
        let _ = s.d.setattr(e.nodeid, chmod);
        let trunc = SetattrIn {
            valid: FATTR_SIZE,
            size: 0,
            ..Default::default()
        };
        assert!(
            s.d.setattr(e.nodeid, trunc).is_err(),
            "{name}: truncate through a link"
        );
        // READLINK returns the text only.
        let r = s.d.fuse(Opcode::Readlink, e.nodeid, &[]);
        assert_eq!(r.hdr.error, 0);
    }
    // CREATE over an existing link (no O_EXCL) opens nothing on the host.
    assert!(s
        .d
        .create(ROOT_ID, "evil2", libc::O_RDWR | libc::O_TRUNC, 0o666)
        .is_err());
    // A directory link cannot be walked through.
    let d = s.d.lookup(ROOT_ID, "evildir").unwrap();
    assert!(s.d.lookup(d.nodeid, "passwd").is_err());
    assert_eq!(
        s.d.lookup(ROOT_ID, "evildir/passwd").map(|_| ()),
        Err(libc::EINVAL)
    );

    // The host files are untouched.
    assert_eq!(std::fs::read(&secret).unwrap(), b"TOP-SECRET host data");
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(std::fs::metadata("/etc/passwd").unwrap().len() > 0);
    let m = s.metrics();
    assert_eq!(m.panics + m.queue_errors, 0, "{m:?}");
}

#[test]
fn dotdot_stays_at_the_root() {
    let mut s = Share::new();
    std::fs::write(s.dir.join("marker"), b"in the share").unwrap();
    std::fs::create_dir(s.dir.join("sub")).unwrap();
    host_secret(&s.tmp);
    // The share's parent holds "share" and "host-secret": reaching it would find them.
    let up = s.d.lookup(ROOT_ID, "..").unwrap();
    assert!(
        s.d.lookup(up.nodeid, "marker").is_ok(),
        "`..` of the root is the root"
    );
    assert_eq!(
        s.d.lookup(up.nodeid, "share").map(|_| ()),
        Err(libc::ENOENT)
    );
    assert_eq!(
        s.d.lookup(up.nodeid, "host-secret").map(|_| ()),
        Err(libc::ENOENT)
    );
    let up2 = s.d.lookup(up.nodeid, "..").unwrap();
    assert!(s.d.lookup(up2.nodeid, "marker").is_ok());
    // Down and up again, and further up than the root.
    let sub = s.d.lookup(ROOT_ID, "sub").unwrap();
    let back = s.d.lookup(sub.nodeid, "..").unwrap();
    assert!(s.d.lookup(back.nodeid, "marker").is_ok());
    let beyond = s.d.lookup(back.nodeid, "..").unwrap();
    assert!(s.d.lookup(beyond.nodeid, "marker").is_ok());
    assert_eq!(
        s.d.lookup(beyond.nodeid, "host-secret").map(|_| ()),
        Err(libc::ENOENT)
    );
    // Names with a slash never reach the host.
    for name in ["../host-secret", "sub/../../host-secret", "/etc/passwd"] {
        assert_eq!(
            s.d.lookup(ROOT_ID, name).map(|_| ()),
            Err(libc::EINVAL),
            "{name}"
        );
    }
    // `..` and `.` cannot be created or removed.
    let (_, _) = (0, 0);
    assert_eq!(
        s.d.create(ROOT_ID, "..", libc::O_RDWR, 0o644).map(|_| ()),
        Err(libc::EINVAL)
    );
    assert_eq!(
        s.d.errno_of(Opcode::Unlink, sub.nodeid, &[&cstr("..")]),
        libc::EINVAL
    );
    let rn = RenameIn { newdir: ROOT_ID };
    assert_eq!(
        s.d.errno_of(
            Opcode::Rename,
            ROOT_ID,
            &[rn.as_slice(), &cstr("marker"), &cstr("../x")]
        ),
        libc::EINVAL
    );
    assert!(s.dir.join("marker").exists());
    assert!(!s.tmp.0.join("x").exists());
}

#[test]
fn symlink_swap_after_lookup_is_harmless() {
    let mut s = Share::new();
    let secret = host_secret(&s.tmp);
    std::fs::write(s.dir.join("f"), b"original").unwrap();
    std::fs::create_dir(s.dir.join("d")).unwrap();
    std::fs::write(s.dir.join("d/inner"), b"inside").unwrap();

    let f = s.d.lookup(ROOT_ID, "f").unwrap();
    let d = s.d.lookup(ROOT_ID, "d").unwrap();
    // The host (or a racing guest request) swaps both names for symlinks out of the share.
    let tmp_link = s.dir.join(".swap");
    std::os::unix::fs::symlink(&secret, &tmp_link).unwrap();
    std::fs::rename(&tmp_link, s.dir.join("f")).unwrap();
    std::fs::rename(s.dir.join("d"), s.dir.join("d.old")).unwrap();
    std::os::unix::fs::symlink(s.tmp.0.as_path(), s.dir.join("d")).unwrap();

    // The inode looked up earlier is still the original file, not the new link's target.
    let fh = s.d.open(f.nodeid, libc::O_RDONLY).unwrap();
    let data = s.d.read(f.nodeid, fh, 0, 4096).unwrap();
    assert_eq!(data, b"original");
    s.d.release(f.nodeid, fh);
    // Writing through it does not reach the secret either.
    let fh = s.d.open(f.nodeid, libc::O_WRONLY).unwrap();
    s.d.write(f.nodeid, fh, 0, b"OVERWRITE").unwrap();
    s.d.release(f.nodeid, fh);
    assert_eq!(std::fs::read(&secret).unwrap(), b"TOP-SECRET host data");
    // The old directory inode is still the moved directory: names resolve inside it only.
    assert!(s.d.lookup(d.nodeid, "inner").is_ok());
    assert_eq!(
        s.d.lookup(d.nodeid, "host-secret").map(|_| ()),
        Err(libc::ENOENT)
    );
    // A fresh LOOKUP sees the links, which cannot be opened.
    let f2 = s.d.lookup(ROOT_ID, "f").unwrap();
    assert_eq!(f2.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(s.d.open(f2.nodeid, libc::O_RDONLY), Err(libc::EBADF));
    let d2 = s.d.lookup(ROOT_ID, "d").unwrap();
    assert!(s.d.lookup(d2.nodeid, "host-secret").is_err());
}

/// A hostile OPEN/READ flag mix must not make PassthroughFs close a descriptor it keeps
/// using (fuse-backend-rs closes the handle's descriptor when `fcntl(F_SETFL)` of the READ
/// flags fails; found by the fuzz target): the handle keeps working and no descriptor of the
/// process is closed behind its owner's back.
#[test]
fn guest_open_flags_cannot_close_host_descriptors() {
    let mut s = Share::new();
    std::fs::write(s.dir.join("f"), b"file data").unwrap();
    let e = s.d.lookup(ROOT_ID, "f").unwrap();
    // O_PATH asked for on OPEN is dropped: the handle reads.
    let fh = s.d.open(e.nodeid, libc::O_RDONLY | libc::O_PATH).unwrap();
    let weird = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_DIRECT | libc::O_NOATIME;
    for _ in 0..3 {
        assert_eq!(
            s.d.read_with_flags(e.nodeid, fh, 0, 64, weird),
            Ok(b"file data".to_vec())
        );
    }
    // A descriptor the VMM opens now gets the lowest free number; releasing the handle (and
    // everything else the guest does) leaves it open.
    let mine = std::fs::File::open(s.dir.join("f")).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&mine);
    let fh2 = s.d.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(
        s.d.read_with_flags(e.nodeid, fh2, 0, 4, libc::O_APPEND | libc::O_NONBLOCK),
        Ok(b"file".to_vec())
    );
    s.d.release(e.nodeid, fh);
    s.d.release(e.nodeid, fh2);
    // SAFETY: F_GETFD on a descriptor number; no pointers.
    let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
    assert!(open, "fd {fd} was closed");
    drop(mine);
    // The flags of released handles are forgotten.
    assert_eq!(s.d.read(e.nodeid, fh, 0, 4), Err(libc::EBADF));
}

/// The same for a directory handle: a READ on it with flags a directory cannot take
/// (`O_DIRECT`) fails without closing the directory's descriptor.
#[test]
fn guest_flags_on_a_directory_handle_cannot_close_it() {
    let mut s = Share::new();
    std::fs::create_dir(s.dir.join("d")).unwrap();
    std::fs::write(s.dir.join("d/x"), b"x").unwrap();
    let e = s.d.lookup(ROOT_ID, "d").unwrap();
    let o = OpenIn {
        flags: (libc::O_RDONLY | libc::O_PATH) as u32,
        fuse_flags: 0,
    };
    let r = s.d.fuse(Opcode::Opendir, e.nodeid, &[o.as_slice()]);
    assert_eq!(r.hdr.error, 0);
    let fh = r.obj::<OpenOut>().fh;
    for _ in 0..3 {
        let got =
            s.d.read_with_flags(e.nodeid, fh, 0, 64, libc::O_DIRECT | libc::O_NOATIME);
        assert!(got.is_err(), "a directory reads no data");
    }
    let mine = std::fs::File::open(s.dir.join("d/x")).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&mine);
    let ri = ReadIn {
        fh,
        size: 4096,
        ..Default::default()
    };
    let r = s.d.fuse(Opcode::Readdir, e.nodeid, &[ri.as_slice()]);
    assert_eq!(r.hdr.error, 0, "the directory handle still lists");
    assert!(r.body.windows(1).any(|w| w == b"x"), "{:?}", r.body);
    let rel = ReleaseIn {
        fh,
        ..Default::default()
    };
    assert_eq!(
        s.d.fuse(Opcode::Releasedir, e.nodeid, &[rel.as_slice()])
            .hdr
            .error,
        0
    );
    // SAFETY: F_GETFD on a descriptor number; no pointers.
    let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
    assert!(open, "fd {fd} was closed");
}

#[test]
fn device_nodes_give_no_host_device_access() {
    if !is_root() {
        eprintln!("skipped: mknod needs root");
        return;
    }
    let mut s = Share::new();
    // /dev/zero (1, 5) and /dev/null (1, 3) as nodes inside the share, made on the host.
    for (name, minor) in [("zero", 5u32), ("null", 3)] {
        let p = CString::new(s.dir.join(name).as_os_str().as_bytes()).unwrap();
        // SAFETY: `p` is a valid NUL-terminated path; mknod reads nothing else.
        let r = unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, minor)) };
        assert_eq!(r, 0, "mknod: {}", std::io::Error::last_os_error());
    }
    for name in ["zero", "null"] {
        let e = s.d.lookup(ROOT_ID, name).unwrap();
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFCHR);
        for flags in [libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR] {
            assert_eq!(
                s.d.open(e.nodeid, flags),
                Err(libc::EBADF),
                "{name} {flags:#x}"
            );
        }
        // Not through CREATE of the existing name, nor a truncate without a handle.
        assert!(
            s.d.create(ROOT_ID, name, libc::O_RDWR, 0o666).is_err(),
            "{name}"
        );
        let t = SetattrIn {
            valid: FATTR_SIZE,
            size: 0,
            ..Default::default()
        };
        assert!(s.d.setattr(e.nodeid, t).is_err(), "{name}");
        for fh in 0..4 {
            let ri = ReadIn {
                fh,
                size: 64,
                ..Default::default()
            };
            assert_ne!(
                s.d.fuse(Opcode::Read, e.nodeid, &[ri.as_slice()]).hdr.error,
                0
            );
        }
    }
    // The guest cannot make device nodes (host users could open them later)...
    for kind in [libc::S_IFCHR, libc::S_IFBLK] {
        let r = s.d.mknod(
            ROOT_ID,
            "dev",
            kind | 0o666,
            u32::try_from(libc::makedev(8, 0)).unwrap(),
        );
        assert_eq!(r.map(|_| ()), Err(libc::EPERM));
    }
    assert!(!s.dir.join("dev").exists());
    // ...but FIFOs are fine (and still cannot be opened through the share).
    let p =
        s.d.mknod(ROOT_ID, "pipe", libc::S_IFIFO | 0o644, 0)
            .unwrap();
    assert_eq!(p.attr.mode & libc::S_IFMT, libc::S_IFIFO);
    assert_eq!(
        s.d.open(p.nodeid, libc::O_RDONLY | libc::O_NONBLOCK),
        Err(libc::EBADF)
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile chains and rings

#[test]
fn malformed_chains_complete_with_zero_length() {
    let mut s = Share::new();
    std::fs::write(s.dir.join("f"), b"data").unwrap();

    // A readable buffer outside guest memory.
    s.d.rings[1].set_desc(
        &s.d.mem,
        0,
        MEM_SIZE as u64 + 0x1000,
        64,
        VRING_DESC_F_NEXT,
        1,
    );
    s.d.rings[1].set_desc(&s.d.mem, 1, REPLY_BUF, 4096, VRING_DESC_F_WRITE, 0);
    s.d.rings[1].publish(&s.d.mem, 0);
    assert_eq!(s.d.complete(1), (0, 0));
    // A writable buffer running past the end of memory.
    s.d.rings[1].set_desc(&s.d.mem, 0, REQ_BUF, 64, VRING_DESC_F_NEXT, 1);
    s.d.rings[1].set_desc(
        &s.d.mem,
        1,
        MEM_SIZE as u64 - 8,
        4096,
        VRING_DESC_F_WRITE,
        0,
    );
    s.d.rings[1].publish(&s.d.mem, 0);
    assert_eq!(s.d.complete(1), (0, 0));
    assert_eq!(s.metrics().malformed_chains, 2);

    // A header that claims more bytes than the chain has, and a truncated header.
    let h = InHeader {
        len: 0x1000,
        opcode: Opcode::Lookup as u32,
        unique: 99,
        nodeid: ROOT_ID,
        ..Default::default()
    };
    s.d.submit(1, &[h.as_slice(), b"f\0"], 4096);
    let (_, len) = s.d.complete(1);
    assert!(len == 0 || len >= 16);
    s.d.submit(1, &[&h.as_slice()[..20]], 4096);
    assert_eq!(s.d.complete(1), (0, 0));
    // No room for the reply.
    s.d.submit(
        1,
        &[
            InHeader {
                len: 40 + 2,
                opcode: Opcode::Lookup as u32,
                nodeid: ROOT_ID,
                ..Default::default()
            }
            .as_slice(),
            b"f\0",
        ],
        0,
    );
    assert_eq!(s.d.complete(1), (0, 0));
    // Unknown opcode: ENOSYS.
    assert_eq!(
        s.d.fuse(Opcode::MaxOpcode, ROOT_ID, &[]).errno(),
        libc::ENOSYS
    );

    // The device keeps working.
    let e = s.d.lookup(ROOT_ID, "f").unwrap();
    assert_eq!(e.attr.size, 4);
    let m = s.metrics();
    assert!(m.failed_requests >= 2, "{m:?}");
    assert_eq!(m.panics + m.queue_errors, 0, "{m:?}");
    assert!(!s.d.dev.lock().unwrap().needs_reset());
}

#[test]
fn hiprio_queue_takes_forget() {
    let mut s = Share::new();
    std::fs::write(s.dir.join("f"), b"").unwrap();
    let e = s.d.lookup(ROOT_ID, "f").unwrap();
    let forget = fuse_backend_rs::abi::fuse_abi::ForgetIn { nlookup: 1 };
    let r =
        s.d.fuse_on(HIPRIO_QUEUE, Opcode::Forget, e.nodeid, &[forget.as_slice()]);
    assert_eq!(r.used_len, 0, "FORGET has no reply");
    assert_eq!(s.metrics().hiprio_requests, 1);
    // The name can be looked up again.
    assert!(s.d.lookup(ROOT_ID, "f").is_ok());
}

#[test]
fn broken_ring_needs_reset_and_reset_recovers() {
    let mut s = Share::new();
    std::fs::write(s.dir.join("f"), b"x").unwrap();
    // An available index far ahead of the queue.
    s.d.mem
        .write_obj(0x8000u16, GuestAddress(s.d.rings[1].avail + 2))
        .unwrap();
    s.d.kicks[1].write(1).unwrap();
    s.d.em.run_with_timeout(100).unwrap();
    assert!(s.d.dev.lock().unwrap().needs_reset());
    assert_eq!(s.metrics().queue_errors, 1);
    assert_ne!(
        s.d.interrupt.status() & crate::virtio::INTERRUPT_CONFIG_CHANGE,
        0
    );

    // The driver resets and sets the device up again: a new FUSE session (INIT again).
    {
        let mut d = s.d.dev.lock().unwrap();
        d.reset();
        assert!(!d.needs_reset() && !d.is_activated());
    }
    s.d.reactivate();
    s.d.init();
    assert!(s.d.lookup(ROOT_ID, "f").is_ok());
}

#[test]
fn worker_failure_needs_reset_and_drop_joins_threads() {
    let mut s = Share::with(|c| {
        c.worker_threads = true;
        c.num_queues = 2;
    });
    std::fs::write(s.dir.join("f"), b"x").unwrap();
    let r = s.d.fuse_on(2, Opcode::Lookup, ROOT_ID, &[&cstr("f")]);
    assert_eq!(r.hdr.error, 0);
    let tids = s.d.dev.lock().unwrap().worker_tids();
    assert_eq!(tids.len(), 2);
    // Queue 2's worker meets a broken ring.
    s.d.mem
        .write_obj(0x8000u16, GuestAddress(s.d.rings[2].avail + 2))
        .unwrap();
    s.d.kicks[2].write(1).unwrap();
    let deadline = Instant::now() + WAIT;
    while !s.d.dev.lock().unwrap().needs_reset() {
        s.d.em.run_with_timeout(1).unwrap();
        assert!(Instant::now() < deadline, "worker did not fail the device");
    }
    assert_ne!(
        s.d.interrupt.status() & crate::virtio::INTERRUPT_CONFIG_CHANGE,
        0
    );
    assert_eq!(s.metrics().queue_errors, 1);
    // Reset and set up again: fresh workers serve a new session.
    s.d.dev.lock().unwrap().reset();
    s.d.reactivate();
    s.d.init();
    let r = s.d.fuse_on(2, Opcode::Lookup, ROOT_ID, &[&cstr("f")]);
    assert_eq!(r.hdr.error, 0);
    let new_tids = s.d.dev.lock().unwrap().worker_tids();
    assert_eq!(new_tids.len(), 2);
    // Dropping the device joins its threads.
    let Share { tmp: _tmp, d, .. } = s;
    drop(d);
    for t in tids.iter().chain(&new_tids) {
        assert!(
            !Path::new(&format!("/proc/self/task/{t}")).exists(),
            "thread {t} left"
        );
    }
}

#[test]
fn second_init_without_reset_is_refused_and_reset_allows_it() {
    let mut s = Share::new();
    let i = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 0,
        flags: 0,
    };
    assert_eq!(
        s.d.fuse(Opcode::Init, 0, &[i.as_slice()]).errno(),
        libc::EINVAL
    );
    s.d.dev.lock().unwrap().reset();
    s.d.reactivate();
    s.d.init();
}

#[test]
fn requests_before_activation_are_served_after_it() {
    let tmp = TmpDir::new("kfs");
    let config = FsConfig::shared_dir("t", &tmp.0);
    let (mut d, queues) = Driver::new(new_fs(&config).unwrap(), guest_memory());
    // A kick before DRIVER_OK is ignored...
    d.kicks[1].write(1).unwrap();
    d.em.run_with_timeout(10).unwrap();
    assert_eq!(d.dev.lock().unwrap().metrics().requests, 0);
    // ...and an INIT already on the ring is served at activation.
    d.activate(queues);
    d.init();
}

#[test]
fn multiple_request_queues() {
    let mut s = Share::with(|c| c.num_queues = 3);
    std::fs::write(s.dir.join("f"), b"abc").unwrap();
    for q in 1..=3 {
        let r = s.d.fuse_on(q, Opcode::Lookup, ROOT_ID, &[&cstr("f")]);
        assert_eq!(r.obj::<EntryOut>().attr.size, 3, "queue {q}");
    }
    assert_eq!(s.metrics().requests, 4);
}

// ---------------------------------------------------------------------------------------------
// Event loop cost (run with --ignored --nocapture)

/// How long FUSE requests block the event loop: the time `process_queue` takes per request
/// (what the loop cannot spend on other devices), for metadata and data requests, warm and cold,
/// with requests served on the loop and on a worker thread; and the request round trip in both
/// modes. Run with `cargo test --release -p kestrel-devices measure_event_loop -- --ignored
/// --nocapture`.
#[test]
#[ignore]
fn measure_event_loop_blocking() {
    for workers in [false, true] {
        eprintln!(
            "--- requests served on {}",
            if workers {
                "a worker thread"
            } else {
                "the event loop"
            }
        );
        measure(workers);
    }
}

fn measure(workers: bool) {
    use std::os::fd::AsRawFd;
    let mut s = Share::with(|c| c.worker_threads = workers);
    let data = vec![0x5au8; 1 << 20];
    let big = s.dir.join("big");
    std::fs::write(&big, &data).unwrap();
    let host = File::open(&big).unwrap();
    let e = s.d.lookup(ROOT_ID, "big").unwrap();
    let fh = s.d.open(e.nodeid, libc::O_RDWR).unwrap();
    let direct: fn(&mut Fs, usize) = |d, q| d.process_queue(q);
    s.d.serve_direct = Some(direct);
    let drop_cache = || {
        // SAFETY: plain advice on a descriptor we own.
        unsafe { libc::posix_fadvise(host.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    };
    let fsync = |d: &mut Driver<Fs>| {
        let f = fuse_backend_rs::abi::fuse_abi::FsyncIn {
            fh,
            fsync_flags: 0,
            padding: 0,
        };
        assert_eq!(
            d.fuse(Opcode::Fsync, e.nodeid, &[f.as_slice()]).hdr.error,
            0
        );
    };
    let mut report = |what: &str, n: u32, f: &mut dyn FnMut(&mut Driver<Fs>)| {
        // Event-loop time: requests handed to process_queue directly.
        s.d.serve_direct = Some(direct);
        s.d.busy = Duration::ZERO;
        let mut worst = Duration::ZERO;
        for _ in 0..n {
            let before = s.d.busy;
            f(&mut s.d);
            worst = worst.max(s.d.busy - before);
        }
        let blocked = s.d.busy / n;
        // Round trip: kick through the real event loop until the used entry shows up.
        s.d.serve_direct = None;
        let t = Instant::now();
        for _ in 0..n {
            f(&mut s.d);
        }
        eprintln!(
            "{what:<30} loop blocked: mean {blocked:>8.1?} worst {worst:>8.1?} | \
             round trip {:>8.1?}",
            t.elapsed() / n
        );
    };
    report("GETATTR", 2000, &mut |d| {
        d.getattr(e.nodeid).unwrap();
    });
    report("LOOKUP", 2000, &mut |d| {
        d.lookup(ROOT_ID, "big").unwrap();
    });
    report("READ 4 KiB (page cache)", 2000, &mut |d| {
        d.read(e.nodeid, fh, 0, 4096).unwrap();
    });
    report("READ 128 KiB (page cache)", 500, &mut |d| {
        d.read(e.nodeid, fh, 0, 128 << 10).unwrap();
    });
    report("READ 1 MiB (page cache)", 100, &mut |d| {
        d.read(e.nodeid, fh, 0, 1 << 20).unwrap();
    });
    report("READ 1 MiB (cold)", 20, &mut |d| {
        drop_cache();
        d.read(e.nodeid, fh, 0, 1 << 20).unwrap();
    });
    report("WRITE 128 KiB", 500, &mut |d| {
        d.write(e.nodeid, fh, 0, &data[..128 << 10]).unwrap();
    });
    report("WRITE 1 MiB", 100, &mut |d| {
        d.write(e.nodeid, fh, 0, &data).unwrap();
    });
    report("FSYNC (1 MiB dirty)", 20, &mut |d| {
        // Dirty the file outside the measurement's interest: both count, the fsync dominates.
        d.write(e.nodeid, fh, 0, &data).unwrap();
        fsync(d);
    });
}

// ---------------------------------------------------------------------------------------------
// vhost-user against a real virtiofsd

/// virtiofsd, if installed (`scripts/install-virtiofsd.sh`): `$VIRTIOFSD`, PATH, ~/.cargo/bin.
fn find_virtiofsd() -> Option<PathBuf> {
    let mut c: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("VIRTIOFSD") {
        c.push(p.into());
    }
    if let Some(path) = std::env::var_os("PATH") {
        c.extend(std::env::split_paths(&path).map(|d| d.join("virtiofsd")));
    }
    if let Some(home) = std::env::var_os("HOME") {
        c.push(Path::new(&home).join(".cargo/bin/virtiofsd"));
    }
    c.push("/usr/libexec/virtiofsd".into());
    c.into_iter().find(|p| p.is_file())
}

/// Guest memory in a memfd, mapped shared (what `MemoryManager::new(.., shared = true)` makes).
fn shared_guest_memory() -> GuestMemoryMmap {
    use std::os::fd::FromRawFd;
    use vm_memory::mmap::MmapRegion;
    use vm_memory::{FileOffset, GuestRegionMmap};
    // SAFETY: the name is NUL-terminated; memfd_create returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"kfs-test-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(MEM_SIZE as u64).unwrap();
    let region = MmapRegion::from_file(FileOffset::new(f, 0), MEM_SIZE).unwrap();
    let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
    GuestMemoryMmap::from_regions(vec![region]).unwrap()
}

/// A virtiofsd child process, killed on drop.
struct Virtiofsd(std::process::Child);

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_virtiofsd(bin: &Path, socket: &Path, dir: &Path) -> Virtiofsd {
    let sandbox = if is_root() { "chroot" } else { "none" };
    let child = std::process::Command::new(bin)
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", dir.display()))
        .arg(format!("--sandbox={sandbox}"))
        .arg("--cache=never")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn virtiofsd");
    let v = Virtiofsd(child);
    let deadline = Instant::now() + WAIT;
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "virtiofsd did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    v
}

#[test]
fn vhost_user_fs_against_virtiofsd() {
    let Some(bin) = find_virtiofsd() else {
        eprintln!("skipped: no virtiofsd (scripts/install-virtiofsd.sh installs it)");
        return;
    };
    let tmp = TmpDir::new("kfs");
    let share = tmp.0.join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("greeting"), b"hello via virtiofsd").unwrap();
    let sock = tmp.0.join("vfsd.sock");
    let _daemon = spawn_virtiofsd(&bin, &sock, &share);

    let dev = vhost_user::VhostUserFs::new(&VhostUserFsConfig {
        geometry: FsGeometry {
            tag: "vtag".into(),
            num_request_queues: 1,
            queue_size: QSIZE,
        },
        socket: sock.clone(),
    })
    .unwrap();
    assert_eq!(dev.device_type(), 26);
    assert_eq!(dev.queue_max_sizes(), &[QSIZE, QSIZE]);
    assert_ne!(dev.avail_features() & VIRTIO_F_VERSION_1, 0);
    assert_eq!(
        dev.avail_features() & (1 << 30),
        0,
        "PROTOCOL_FEATURES is not a guest feature"
    );
    let mut c = [0u8; CONFIG_SPACE_LEN];
    dev.read_config(0, &mut c);
    assert_eq!(&c[..5], b"vtag\0");
    assert_eq!(u32::from_le_bytes(c[36..].try_into().unwrap()), 1);

    // Anonymous (private) memory is refused at activation, with a clear error.
    let mut dev = dev;
    {
        let anon = guest_memory();
        let queues = (0..2)
            .map(|i| Ring::new(&anon, RING_BASE + i * RING_STRIDE, QSIZE).1)
            .collect();
        let irq = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let e = dev
            .activate(GuestMemoryAtomic::new(anon), irq, queues)
            .unwrap_err();
        assert!(e.to_string().contains("memfd"), "{e}");
        assert!(!dev.is_activated());
    }

    // memfd-backed memory: activation hands the rings to virtiofsd on the event loop.
    let (mut d, queues) = Driver::new(dev, shared_guest_memory());
    d.activate(queues);
    assert!(d.dev.lock().unwrap().is_started());
    assert!(!d.dev.lock().unwrap().needs_reset());

    // FUSE INIT + LOOKUP + OPEN + READ through the vrings, answered by virtiofsd into guest
    // memory; kicks go straight to the daemon, its call events come back as our interrupt.
    let init = d.init();
    assert!(init.minor >= 27, "{}", init.minor);
    let e = d.lookup(ROOT_ID, "greeting").unwrap();
    assert_eq!(e.attr.size, 19);
    assert_eq!(d.lookup(ROOT_ID, "missing").map(|_| ()), Err(libc::ENOENT));
    let fh = d.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(
        d.read(e.nodeid, fh, 0, 100).unwrap(),
        b"hello via virtiofsd"
    );
    let m = d.dev.lock().unwrap().metrics();
    assert_eq!(m.activations, 1);
    // With EVENT_IDX negotiated and used_event left at 0 by this driver, the daemon
    // notifies once (when the used index passes 0).
    assert!(m.interrupts >= 1, "{m:?}");
    assert_ne!(d.interrupt.status() & crate::virtio::INTERRUPT_USED_RING, 0);
    // The guest's interrupt line fired.
    assert!(d.irq.read().unwrap() >= 1);

    // Reset stops the rings in the daemon (GET_VRING_BASE answers), and a second activation
    // hands fresh rings over again.
    {
        let mut dev = d.dev.lock().unwrap();
        dev.reset();
        assert!(!dev.is_activated() && !dev.is_started());
        assert_eq!(dev.metrics().backend_errors, 0);
    }
    d.reactivate();
    assert!(d.dev.lock().unwrap().is_started());
    // virtiofsd keeps its FUSE session across a vring reset: a second INIT may be refused,
    // but requests are served again.
    let _ = d.fuse(
        Opcode::Init,
        0,
        &[InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0,
            flags: INIT_FLAGS,
        }
        .as_slice()],
    );
    let e = d.lookup(ROOT_ID, "greeting").unwrap();
    assert_eq!(e.attr.size, 19);
    assert_eq!(d.dev.lock().unwrap().metrics().activations, 2);
    d.dev.lock().unwrap().update_memory().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Hardening: request sizes, descriptor cap, umask, setid and device nodes

/// Peak resident memory of the process, KiB.
fn peak_rss_kib() -> u64 {
    let v = proc_status("VmHWM");
    v.trim_end_matches("kB").trim().parse().unwrap()
}

/// The reply header at `REPLY_BUF`.
fn reply_header(mem: &GuestMemoryMmap) -> OutHeader {
    mem.read_obj(GuestAddress(REPLY_BUF)).unwrap()
}

/// A FUSE_IOCTL request header and `IoctlIn` asking for `in_size` input bytes.
fn ioctl_request(unique: u64, in_size: u32) -> Vec<u8> {
    let io = fuse_backend_rs::abi::fuse_abi::IoctlIn {
        fh: 0,
        flags: 0,
        cmd: 0x5401,
        arg: 0,
        in_size,
        out_size: 0,
    };
    let h = InHeader {
        len: 40 + 32,
        opcode: Opcode::Ioctl as u32,
        unique,
        nodeid: ROOT_ID,
        ..Default::default()
    };
    [h.as_slice(), io.as_slice()].concat()
}

#[test]
fn request_limit_covers_the_largest_legal_request() {
    let mut s = Share::new();
    let init = s.d.init_again_after_destroy();
    // What INIT negotiates fits: a WRITE of max_write bytes plus its two headers, and a READ
    // reply of max_pages pages plus its header.
    assert_eq!(init.max_write, MAX_BUFFER_SIZE);
    assert_eq!(u32::from(init.max_pages) * 4096, MAX_BUFFER_SIZE);
    assert!(init.max_write + 40 + 40 <= MAX_REQUEST_BYTES);
    const { assert!(MAX_BUFFER_SIZE + 16 <= MAX_REQUEST_BYTES) };
    assert_eq!(
        REPLY_LEN, MAX_REQUEST_BYTES,
        "the driver's reply space is the limit"
    );
    // And is served.
    let (c, fh) = s.d.create(ROOT_ID, "big", libc::O_RDWR, 0o644).unwrap();
    let data = vec![0x5au8; init.max_write as usize];
    assert_eq!(s.d.write(c.nodeid, fh, 0, &data), Ok(init.max_write));
    let back = s.d.read(c.nodeid, fh, 0, init.max_write).unwrap();
    assert_eq!(back.len(), data.len());
    assert_eq!(s.metrics().oversized_chains, 0);
}

#[test]
fn oversized_aliasing_chain_refused_before_the_server() {
    let mut s = Share::new();
    let rss_before = peak_rss_kib();
    // FUSE_IOCTL with in_size 3 GiB, its input "backed" by 249 descriptors that all alias the
    // same 12 MiB of guest memory: the server would allocate and fill 3 GiB.
    let req = ioctl_request(77, 3 << 30);
    s.d.mem.write_slice(&req, GuestAddress(REQ_BUF)).unwrap();
    let ring = &s.d.rings[1];
    ring.set_desc(
        &s.d.mem,
        0,
        REQ_BUF,
        u32::try_from(req.len()).unwrap(),
        VRING_DESC_F_NEXT,
        1,
    );
    for i in 1..250u16 {
        ring.set_desc(&s.d.mem, i, REQ_BUF, 12 << 20, VRING_DESC_F_NEXT, i + 1);
    }
    ring.set_desc(&s.d.mem, 250, REPLY_BUF, 4096, VRING_DESC_F_WRITE, 0);
    s.d.rings[1].publish(&s.d.mem, 0);
    assert_eq!(s.d.complete(1), (0, 16));
    let h = reply_header(&s.d.mem);
    assert_eq!((h.error, h.unique, h.len), (-libc::ENOMEM, 77, 16));
    let m = s.metrics();
    assert_eq!(m.oversized_chains, 1, "{m:?}");
    assert_eq!(m.failed_requests + m.panics + m.queue_errors, 0, "{m:?}");
    // Nothing near the chain's size was allocated.
    let grown_mib = peak_rss_kib().saturating_sub(rss_before) / 1024;
    assert!(grown_mib < 256, "peak RSS grew by {grown_mib} MiB");

    // A FORGET that large gets no reply at all; the device keeps working.
    let forget = InHeader {
        len: 48,
        opcode: Opcode::Forget as u32,
        unique: 78,
        nodeid: ROOT_ID,
        ..Default::default()
    };
    s.d.mem
        .write_slice(forget.as_slice(), GuestAddress(REQ_BUF))
        .unwrap();
    s.d.rings[1].set_desc(&s.d.mem, 0, REQ_BUF, 40, VRING_DESC_F_NEXT, 1);
    s.d.rings[1].publish(&s.d.mem, 0);
    assert_eq!(s.d.complete(1), (0, 0));
    assert_eq!(s.metrics().oversized_chains, 2);
    std::fs::write(s.dir.join("f"), b"x").unwrap();
    assert!(s.d.lookup(ROOT_ID, "f").is_ok());
}

#[test]
fn oversized_reply_space_refused() {
    let mut s = Share::new();
    std::fs::write(s.dir.join("f"), b"data").unwrap();
    let e = s.d.lookup(ROOT_ID, "f").unwrap();
    let fh = s.d.open(e.nodeid, libc::O_RDONLY).unwrap();
    // READ of 4 GiB - 1 into 200 writable descriptors aliasing 8 MiB.
    let h = InHeader {
        len: 40 + 40,
        opcode: Opcode::Read as u32,
        unique: 5,
        nodeid: e.nodeid,
        ..Default::default()
    };
    let ri = ReadIn {
        fh,
        size: u32::MAX,
        ..Default::default()
    };
    let req = [h.as_slice(), ri.as_slice()].concat();
    s.d.mem.write_slice(&req, GuestAddress(REQ_BUF)).unwrap();
    s.d.rings[1].set_desc(&s.d.mem, 0, REQ_BUF, 80, VRING_DESC_F_NEXT, 1);
    for i in 1..=200u16 {
        let (flags, next) = if i < 200 {
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, i + 1)
        } else {
            (VRING_DESC_F_WRITE, 0)
        };
        s.d.rings[1].set_desc(&s.d.mem, i, REPLY_BUF, 8 << 20, flags, next);
    }
    s.d.rings[1].publish(&s.d.mem, 0);
    assert_eq!(s.d.complete(1), (0, 16));
    assert_eq!(reply_header(&s.d.mem).error, -libc::ENOMEM);
    assert_eq!(s.metrics().oversized_chains, 1);
    // One byte over the limit is refused too; at the limit it is served.
    let ri = ReadIn {
        fh,
        size: 4,
        ..Default::default()
    };
    for (reply_len, oversized) in [(MAX_REQUEST_BYTES + 1, 2), (MAX_REQUEST_BYTES, 2)] {
        let h = InHeader {
            len: 80,
            opcode: Opcode::Read as u32,
            unique: 6,
            nodeid: e.nodeid,
            ..Default::default()
        };
        s.d.submit(1, &[h.as_slice(), ri.as_slice()], reply_len);
        let (_, len) = s.d.complete(1);
        assert_eq!(s.metrics().oversized_chains, oversized, "{reply_len}");
        if reply_len == MAX_REQUEST_BYTES {
            assert_eq!(len, 16 + 4);
            assert_eq!(reply_header(&s.d.mem).error, 0);
        } else {
            assert_eq!(reply_header(&s.d.mem).error, -libc::ENOMEM);
        }
    }
}

#[test]
fn ioctl_answered_enotty_without_the_server() {
    let mut s = Share::new();
    // The header split over two descriptors, 16 bytes of input present: the server would
    // allocate and answer ENOSYS (no ioctl in PassthroughFs); the device answers ENOTTY.
    let req = ioctl_request(9, 16);
    let (a, b) = req.split_at(20);
    s.d.submit(1, &[a, b, &[0u8; 16]], 4096);
    assert_eq!(s.d.complete(1), (0, 16));
    let h = reply_header(&s.d.mem);
    assert_eq!((h.error, h.unique), (-libc::ENOTTY, 9));
    let m = s.metrics();
    assert_eq!((m.refused_ioctls, m.oversized_chains), (1, 0), "{m:?}");
}

/// Descriptors of this process that refer to `dir` or something below it.
fn fds_under(dir: &Path) -> usize {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(&dir)))
        .count()
}

impl Driver<Fs> {
    fn forget(&mut self, nodeid: u64, nlookup: u64) {
        let f = fuse_backend_rs::abi::fuse_abi::ForgetIn { nlookup };
        let r = self.fuse_on(HIPRIO_QUEUE, Opcode::Forget, nodeid, &[f.as_slice()]);
        assert_eq!(r.used_len, 0);
    }

    fn opendir(&mut self, nodeid: u64) -> Result<u64, i32> {
        let o = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        let r = self.fuse(Opcode::Opendir, nodeid, &[o.as_slice()]);
        if r.hdr.error != 0 {
            return Err(r.errno());
        }
        Ok(r.obj::<OpenOut>().fh)
    }

    /// READDIRPLUS of `fh`: the reply's body, or the errno.
    fn readdirplus(&mut self, nodeid: u64, fh: u64) -> Result<Vec<u8>, i32> {
        let ri = ReadIn {
            fh,
            size: 4096,
            ..Default::default()
        };
        let r = self.fuse(Opcode::Readdirplus, nodeid, &[ri.as_slice()]);
        if r.hdr.error != 0 {
            return Err(r.errno());
        }
        Ok(r.body)
    }

    /// FUSE_DESTROY, then INIT again (a new session on the same server).
    fn init_again_after_destroy(&mut self) -> InitOut {
        let r = self.fuse(Opcode::Destroy, 0, &[]);
        assert!(r.hdr.error == 0 || r.used_len == 0, "{r:?}");
        self.init()
    }
}

#[test]
fn open_handles_capped_per_share() {
    const CAP: u32 = 32;
    let mut s = Share::with(|c| c.max_open_handles = CAP);
    for i in 0..200 {
        std::fs::write(s.dir.join(format!("f{i}")), b"x").unwrap();
    }
    std::fs::create_dir(s.dir.join("sub")).unwrap();
    for name in ["a", "b", "c"] {
        std::fs::write(s.dir.join("sub").join(name), b"x").unwrap();
    }
    let base = fds_under(&s.dir);
    // A flood of LOOKUPs of new inodes stops at the cap with ENFILE.
    let mut ids = Vec::new();
    for i in 0..200 {
        match s.d.lookup(ROOT_ID, &format!("f{i}")) {
            Ok(e) => ids.push(e.nodeid),
            Err(e) => assert_eq!(e, libc::ENFILE, "f{i}"),
        }
    }
    assert_eq!(ids.len(), CAP as usize);
    assert!(
        fds_under(&s.dir) <= base + CAP as usize,
        "{}",
        fds_under(&s.dir)
    );
    // Inodes already held can still be looked up (no new descriptor); OPEN, OPENDIR and
    // CREATE get EMFILE, MKDIR ENFILE, and nothing is made on the host.
    assert_eq!(s.d.lookup(ROOT_ID, "f0").map(|e| e.nodeid), Ok(ids[0]));
    assert_eq!(s.d.open(ids[0], libc::O_RDONLY), Err(libc::EMFILE));
    assert_eq!(s.d.opendir(ROOT_ID), Err(libc::EMFILE));
    assert_eq!(
        s.d.create(ROOT_ID, "new", libc::O_RDWR, 0o644).map(|_| ()),
        Err(libc::EMFILE)
    );
    assert!(!s.dir.join("new").exists());
    let mk = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    assert_eq!(
        s.d.errno_of(Opcode::Mkdir, ROOT_ID, &[mk.as_slice(), &cstr("dir")]),
        libc::ENFILE
    );
    assert!(!s.dir.join("dir").exists());

    // FORGET frees slots (f0 was looked up twice): then OPEN floods stop at the cap.
    s.d.forget(ids[0], 2);
    for &id in &ids[1..8] {
        s.d.forget(id, 1);
    }
    let mut handles = Vec::new();
    for _ in 0..100 {
        match s.d.open(ids[8], libc::O_RDONLY) {
            Ok(fh) => handles.push(fh),
            Err(e) => assert_eq!(e, libc::EMFILE),
        }
    }
    assert_eq!(handles.len(), 8);
    assert!(fds_under(&s.dir) <= base + CAP as usize);
    // RELEASE frees a slot; a RELEASE naming the wrong inode frees nothing.
    let r = ReleaseIn {
        fh: handles[0],
        ..Default::default()
    };
    assert_eq!(
        s.d.errno_of(Opcode::Release, ids[9], &[r.as_slice()]),
        libc::EBADF
    );
    assert_eq!(s.d.open(ids[8], libc::O_RDONLY), Err(libc::EMFILE));
    s.d.release(ids[8], handles.remove(0));
    handles.push(s.d.open(ids[8], libc::O_RDONLY).unwrap());
    assert_eq!(s.d.open(ids[8], libc::O_RDONLY), Err(libc::EMFILE));

    // READDIRPLUS looks entries up too: at the cap with nothing listable it is ENFILE, not
    // an empty (end-of-directory) listing.
    for fh in handles.drain(..2) {
        s.d.release(ids[8], fh);
    }
    let sub = s.d.lookup(ROOT_ID, "sub").unwrap().nodeid;
    let dh = s.d.opendir(sub).unwrap();
    assert_eq!(s.d.readdirplus(sub, dh), Err(libc::ENFILE));
    assert!(fds_under(&s.dir) <= base + CAP as usize);

    // DESTROY gives everything back; the next session has the whole cap again.
    s.d.init_again_after_destroy();
    assert_eq!(fds_under(&s.dir), base);
    let n = (0..200)
        .filter(|i| s.d.lookup(ROOT_ID, &format!("f{i}")).is_ok())
        .count();
    assert_eq!(n, CAP as usize);
    // A device reset closes everything too.
    s.d.dev.lock().unwrap().reset();
    assert_eq!(fds_under(&s.dir), base);
}

#[test]
fn readdirplus_lists_under_the_cap() {
    let mut s = Share::with(|c| c.max_open_handles = 16);
    for i in 0..40 {
        std::fs::write(s.dir.join(format!("f{i:02}")), b"x").unwrap();
    }
    let base = fds_under(&s.dir);
    let dh = s.d.opendir(ROOT_ID).unwrap();
    // The first page lists only what fits under the cap (15 inodes beside the handle).
    // (A 4 KiB page holds 25 entries of 160 bytes; the cap stops it earlier.)
    let body = s.d.readdirplus(ROOT_ID, dh).unwrap();
    assert!(!body.is_empty());
    assert!(fds_under(&s.dir) <= base + 16, "{}", fds_under(&s.dir));
    // Exactly the listed inodes are held: looking them up again works, any other is ENFILE.
    let mut held = 0;
    for i in 0..40 {
        match s.d.lookup(ROOT_ID, &format!("f{i:02}")) {
            Ok(_) => held += 1,
            Err(e) => assert_eq!(e, libc::ENFILE),
        }
    }
    assert_eq!(held, 15);
}

#[test]
fn process_umask_never_changes() {
    if current_umask() == 0 {
        // SAFETY: umask only sets the process mask (0 would hide a flip to 0).
        unsafe { libc::umask(0o022) };
    }
    let before = current_umask();
    assert_ne!(before, 0);
    // The helper runs its closure with a private umask.
    let inside = server::with_private_umask(|| {
        // SAFETY: umask only sets the calling thread's (private) mask.
        unsafe { libc::umask(0o077) };
        Ok(current_umask())
    })
    .unwrap();
    assert_eq!((inside, current_umask()), (0o077, before));

    let tmp = TmpDir::new("kfs");
    let config = FsConfig::shared_dir("u", &tmp.0);
    let (mut d, queues) = Driver::new(new_fs(&config).unwrap(), guest_memory());
    assert_eq!(current_umask(), before, "device creation");
    d.activate(queues);
    for round in 0..10 {
        d.init();
        assert_eq!(current_umask(), before, "INIT, round {round}");
        // FUSE_DESTROY re-imports the root in fuse-backend-rs (umask(0) there).
        d.init_again_after_destroy();
        assert_eq!(current_umask(), before, "DESTROY, round {round}");
        assert!(d.lookup(ROOT_ID, ".").is_ok());
        d.dev.lock().unwrap().reset();
        assert_eq!(current_umask(), before, "reset, round {round}");
        d.reactivate();
        assert_eq!(current_umask(), before, "activate, round {round}");
    }
}

/// The host's mode bits of `p`.
fn host_mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode()
}

#[test]
fn setid_bits_stripped_unless_allowed() {
    let setid = libc::S_ISUID | libc::S_ISGID;
    let mut s = Share::with(|c| c.xattr = true);
    // CREATE, MKNOD (regular file), MKDIR: the bits never reach the host.
    let (c, _) = s.d.create(ROOT_ID, "c", libc::O_RDWR, 0o6755).unwrap();
    assert_eq!(c.attr.mode & setid, 0);
    assert_eq!(host_mode(&s.dir.join("c")) & setid, 0);
    let n = s.d.mknod(ROOT_ID, "n", libc::S_IFREG | 0o4755, 0).unwrap();
    assert_eq!(n.attr.mode & setid, 0);
    assert_eq!(host_mode(&s.dir.join("n")) & setid, 0);
    let mk = MkdirIn {
        mode: 0o2775,
        umask: 0,
    };
    let r =
        s.d.fuse(Opcode::Mkdir, ROOT_ID, &[mk.as_slice(), &cstr("d")]);
    assert_eq!(r.obj::<EntryOut>().attr.mode & setid, 0);
    assert_eq!(host_mode(&s.dir.join("d")) & libc::S_ISGID, 0);
    // SETATTR (chmod u+s): the rest of the mode applies, the bits do not.
    let chmod = SetattrIn {
        valid: FATTR_MODE,
        mode: libc::S_IFREG | 0o4711,
        ..Default::default()
    };
    let a = s.d.setattr(c.nodeid, chmod).unwrap();
    assert_eq!(a.attr.mode & 0o7777, 0o711);
    assert_eq!(host_mode(&s.dir.join("c")) & 0o7777, 0o711);
    // File capabilities are as good as setuid.
    let sx = fuse_backend_rs::abi::fuse_abi::SetxattrIn { size: 4, flags: 0 };
    let r = s.d.fuse(
        Opcode::Setxattr,
        c.nodeid,
        &[sx.as_slice(), &cstr("security.capability"), b"\x01\0\0\x02"],
    );
    assert_eq!(r.errno(), libc::EPERM);

    // With allow_setid the guest's mode stands.
    let mut s = Share::with(|c| c.allow_setid = true);
    let (c, _) = s.d.create(ROOT_ID, "c", libc::O_RDWR, 0o4755).unwrap();
    assert_eq!(host_mode(&s.dir.join("c")) & libc::S_ISUID, libc::S_ISUID);
    let a = s.d.setattr(c.nodeid, chmod).unwrap();
    assert_eq!(a.attr.mode & libc::S_ISUID, libc::S_ISUID);
}

#[test]
fn device_nodes_only_with_allow_devices() {
    let mut s = Share::new();
    for kind in [libc::S_IFCHR, libc::S_IFBLK] {
        let r = s.d.mknod(
            ROOT_ID,
            "dev",
            kind | 0o600,
            u32::try_from(libc::makedev(1, 3)).unwrap(),
        );
        assert_eq!(r.map(|_| ()), Err(libc::EPERM));
        assert!(!s.dir.join("dev").exists());
    }
    // FIFOs and sockets are fine.
    for (name, kind) in [("fifo", libc::S_IFIFO), ("sock", libc::S_IFSOCK)] {
        let e = s.d.mknod(ROOT_ID, name, kind | 0o600, 0).unwrap();
        assert_eq!(e.attr.mode & libc::S_IFMT, kind);
    }
    if !is_root() {
        eprintln!("skipped the allow_devices half: mknod of a device needs root");
        return;
    }
    let mut s = Share::with(|c| c.allow_devices = true);
    let e =
        s.d.mknod(
            ROOT_ID,
            "null",
            libc::S_IFCHR | 0o600,
            u32::try_from(libc::makedev(1, 3)).unwrap(),
        )
        .unwrap();
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFCHR);
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(s.dir.join("null"))
        .unwrap()
        .file_type()
        .is_char_device());
}

#[test]
fn worker_start_hook_runs_first_on_the_worker_and_its_failure_needs_reset() {
    let tmp = TmpDir::new("kfs");
    let mut config = FsConfig::shared_dir("kestrel", &tmp.0);
    config.worker_threads = true;
    let mut dev = new_fs(&config).unwrap();
    dev.set_worker_name_prefix("hooked");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    dev.set_worker_start_hook(Some(Arc::new(move || {
        let name = std::thread::current().name().unwrap_or("").to_string();
        seen2.lock().unwrap().push(name);
        Err("no filter for you".to_string())
    })));
    let (mut d, queues) = Driver::new(dev, guest_memory());
    d.activate(queues);
    let deadline = Instant::now() + WAIT;
    while !d.dev.lock().unwrap().needs_reset() {
        d.em.run_with_timeout(1).unwrap();
        assert!(
            Instant::now() < deadline,
            "a failed hook did not fail the device"
        );
    }
    assert_eq!(*seen.lock().unwrap(), vec!["hooked-q1".to_string()]);
    assert_ne!(
        d.interrupt.status() & crate::virtio::INTERRUPT_CONFIG_CHANGE,
        0
    );
}

/// A running share saved and rebuilt from its state serves on the restored queues where the
/// old device stopped; the guest starts a new FUSE session (the old one is not part of the
/// state). A state of another share geometry is refused.
#[test]
fn saved_state_restores_a_running_share() {
    let mut s = Share::new();
    std::fs::write(s.dir.join("f"), b"x").unwrap();
    assert!(s.d.lookup(ROOT_ID, "f").is_ok());
    let state = s.d.dev.lock().unwrap().state();
    assert_eq!(
        (
            state.geometry.tag.as_str(),
            state.geometry.num_request_queues
        ),
        ("kestrel", 1)
    );
    assert!(state.virtio.activated && state.virtio.queues[1].next_avail == 2);
    let state: FsState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    let api = FsConfig::shared_dir("kestrel", &s.dir);
    let config = super::FsConfig::try_from(&api).unwrap();
    let mut other = config.clone();
    other.geometry.num_request_queues = 2;
    assert!(matches!(
        Fs::restore(&other, &state),
        Err(FsError::Restore(RestoreError::Mismatch { .. }))
    ));

    let fs = Fs::restore(&config, &state).unwrap();
    let rings = std::mem::take(&mut s.d.rings);
    let mut d = Driver::with_rings(fs, s.d.mem.clone(), rings);
    let gm = GuestMemoryAtomic::new(d.mem.clone());
    let interrupt = d.interrupt.clone();
    d.dev
        .lock()
        .unwrap()
        .activate_restored(gm, interrupt)
        .unwrap();
    d.em.run_with_timeout(100).unwrap();
    d.init();
    assert!(d.lookup(ROOT_ID, "f").is_ok());
    assert_eq!(d.dev.lock().unwrap().state().virtio.queues[1].next_avail, 4);
}

// ---------------------------------------------------------------------------------------------
// Snapshots of shares the guest has not mounted

/// The queues of a state saved from a `Driver::new` device: as the driver set them up, the
/// device at the start of each ring.
fn assert_fresh_queues(state: &FsState) {
    assert!(state.virtio.activated);
    assert_eq!(state.virtio.queues.len(), 2);
    for (i, q) in state.virtio.queues.iter().enumerate() {
        let base = RING_BASE + i as u64 * RING_STRIDE;
        assert_eq!(
            (q.desc_table, q.avail_ring, q.used_ring),
            (base, base + 0x1000, base + 0x2000),
            "queue {i}"
        );
        assert!(q.ready && q.size == QSIZE, "queue {i}");
        assert_eq!((q.next_avail, q.next_used), (0, 0), "queue {i}");
    }
}

/// A share the driver activated (as Linux does at probe) but the guest never mounted is saved
/// with its queues; restored with another directory (the override) and activated again on
/// the same rings, it serves the guest's first FUSE_INIT (on a worker thread when the share
/// has them). Once used, the restored share is no longer ready for a snapshot.
fn unmounted_share_restores(worker_threads: bool) {
    let tmp = TmpDir::new("kfs");
    let (old_dir, new_dir) = (tmp.0.join("old"), tmp.0.join("new"));
    for (dir, file) in [(&old_dir, "f"), (&new_dir, "g")] {
        std::fs::create_dir(dir).unwrap();
        std::fs::write(dir.join(file), b"x").unwrap();
    }
    let share = |dir: &Path| {
        let mut c = FsConfig::shared_dir("kestrel", dir);
        c.worker_threads = worker_threads;
        c
    };
    let mut d = driver_for(&share(&old_dir));
    let workers = usize::from(worker_threads);
    assert_eq!(d.dev.lock().unwrap().worker_tids().len(), workers);
    let state = d.dev.lock().unwrap().snapshot_ready().unwrap();
    assert_fresh_queues(&state);
    assert_eq!(d.dev.lock().unwrap().state(), state);
    let state: FsState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    let (rings, mem) = (std::mem::take(&mut d.rings), d.mem.clone());
    drop(d);

    let config = super::FsConfig::try_from(&share(&new_dir)).unwrap();
    let fs = Fs::restore(&config, &state).unwrap();
    assert!(!fs.is_activated());
    let mut d = Driver::with_rings(fs, mem, rings);
    let gm = GuestMemoryAtomic::new(d.mem.clone());
    let interrupt = d.interrupt.clone();
    d.dev
        .lock()
        .unwrap()
        .activate_restored(gm, interrupt)
        .unwrap();
    d.em.run_with_timeout(100).unwrap();
    assert_eq!(d.dev.lock().unwrap().worker_tids().len(), workers);
    assert_fresh_queues(&d.dev.lock().unwrap().snapshot_ready().unwrap());

    d.init();
    assert!(d.lookup(ROOT_ID, "g").is_ok());
    assert_eq!(d.lookup(ROOT_ID, "f").map(|_| ()), Err(libc::ENOENT));
    let m = d.dev.lock().unwrap().metrics();
    assert_eq!(m.worker_requests, if worker_threads { 3 } else { 0 });
    assert_eq!(
        d.dev.lock().unwrap().snapshot_ready(),
        Err(FsSnapshotError::Mounted { queue: 1 })
    );
}

#[test]
fn unmounted_share_is_saved_with_its_queues_and_restores() {
    unmounted_share_restores(false);
}

#[test]
fn unmounted_share_with_worker_threads_is_saved_with_its_queues_and_restores() {
    unmounted_share_restores(true);
}

/// A share the guest sent a request on is refused, whichever queue and whether or not the
/// request was served yet (its rings in guest memory say so); a share the driver never
/// activated is saved without queues.
#[test]
fn a_share_the_guest_used_is_not_ready_for_a_snapshot() {
    for workers in [false, true] {
        let s = Share::with(|c| c.worker_threads = workers);
        let e = s.d.dev.lock().unwrap().snapshot_ready().unwrap_err();
        assert_eq!(
            e,
            FsSnapshotError::Mounted { queue: 1 },
            "workers: {workers}"
        );
        assert!(e.reason().starts_with("the guest has mounted the share"));
        assert!(e.to_string().contains("FUSE session"), "{e}");
    }
    // A request published on the high-priority queue, not yet served.
    let tmp = TmpDir::new("kfs");
    let mut d = driver_for(&FsConfig::shared_dir("kestrel", &tmp.0));
    assert!(d.dev.lock().unwrap().snapshot_ready().is_ok());
    d.rings[0].set_desc(&d.mem, 0, REQ_BUF, 64, 0, 0);
    d.rings[0].publish(&d.mem, 0);
    assert_eq!(
        d.dev.lock().unwrap().snapshot_ready(),
        Err(FsSnapshotError::Mounted { queue: 0 })
    );
    // Never activated: nothing to check.
    let dev = new_fs(&FsConfig::shared_dir("kestrel", &tmp.0)).unwrap();
    let state = dev.snapshot_ready().unwrap();
    assert!(!state.virtio.activated && state.virtio.queues.is_empty());
    // Ring indices outside guest memory (a queue the transport would not have accepted).
    let mut dev = new_fs(&FsConfig::shared_dir("kestrel", &tmp.0)).unwrap();
    let mem = guest_memory();
    let mut queues = fresh_rings(&mem, 2).1;
    queues[1]
        .try_set_avail_ring_address(GuestAddress(MEM_SIZE as u64 + 0x1000))
        .unwrap();
    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    dev.activate(GuestMemoryAtomic::new(mem), irq, queues)
        .unwrap();
    assert_eq!(
        dev.snapshot_ready(),
        Err(FsSnapshotError::RingUnreadable { queue: 1 })
    );
}

/// The vhost-user share the guest has not mounted is saved with its queues; restored against
/// a new daemon, activation hands it the memory table and the rings again, and the guest's
/// first FUSE_INIT is answered.
#[test]
fn unmounted_vhost_user_share_restores_against_a_new_daemon() {
    let Some(bin) = find_virtiofsd() else {
        eprintln!("skipped: no virtiofsd (scripts/install-virtiofsd.sh installs it)");
        return;
    };
    let tmp = TmpDir::new("kfs");
    let share = tmp.0.join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("greeting"), b"hello").unwrap();
    let config = |socket: PathBuf| VhostUserFsConfig {
        geometry: FsGeometry {
            tag: "vtag".into(),
            num_request_queues: 1,
            queue_size: QSIZE,
        },
        socket,
    };
    let sock = tmp.0.join("vfsd1.sock");
    let daemon = spawn_virtiofsd(&bin, &sock, &share);
    let dev = vhost_user::VhostUserFs::new(&config(sock)).unwrap();
    let (mut d, queues) = Driver::new(dev, shared_guest_memory());
    d.activate(queues);
    assert!(d.dev.lock().unwrap().is_started());
    let state = d.dev.lock().unwrap().snapshot_ready().unwrap();
    assert_fresh_queues(&state);
    let state: FsState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    let (rings, mem) = (std::mem::take(&mut d.rings), d.mem.clone());
    drop(d);
    drop(daemon);

    let sock = tmp.0.join("vfsd2.sock");
    let _daemon = spawn_virtiofsd(&bin, &sock, &share);
    let dev = vhost_user::VhostUserFs::restore(&config(sock), &state).unwrap();
    let mut d = Driver::with_rings(dev, mem, rings);
    let gm = GuestMemoryAtomic::new(d.mem.clone());
    let interrupt = d.interrupt.clone();
    d.dev
        .lock()
        .unwrap()
        .activate_restored(gm, interrupt)
        .unwrap();
    d.em.run_with_timeout(100).unwrap();
    assert!(d.dev.lock().unwrap().is_started());
    assert_eq!(d.dev.lock().unwrap().metrics().activations, 1);
    d.init();
    assert_eq!(d.lookup(ROOT_ID, "greeting").unwrap().attr.size, 5);
    assert_eq!(
        d.dev.lock().unwrap().snapshot_ready(),
        Err(FsSnapshotError::Mounted { queue: 1 })
    );
}
