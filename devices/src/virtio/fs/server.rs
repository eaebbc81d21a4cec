//! The in-process FUSE server of a virtio-fs share: fuse-backend-rs's `Server` over a `Vfs`
//! with one `PassthroughFs` mounted at `/`, rooted at the shared directory, behind
//! [`SharePolicy`].
//!
//! What keeps the guest inside the shared directory (the guest is hostile):
//! - `PassthroughFs` holds every inode as an `O_PATH | O_NOFOLLOW` descriptor and resolves
//!   names with `openat` relative to the parent's descriptor, one component at a time: a
//!   symlink is never followed on the host (a LOOKUP of a symlink yields the link itself, which
//!   cannot be opened), and a symlink swapped in after a LOOKUP does not change what the earlier
//!   descriptor refers to. Data is opened by re-opening that descriptor through
//!   `/proc/self/fd`, never by path.
//! - `Vfs` rejects names containing `/` on LOOKUP and `.`/`..`/`/` on every call that creates or
//!   removes a name; `PassthroughFs` turns `..` at the root into `.`.
//! - `PassthroughFs` opens only regular files and directories (anything else is `EBADF`), so a
//!   device node, FIFO or socket in the share never gives the guest host device access; on top
//!   of that [`SharePolicy`] refuses MKNOD of character and block devices (`EPERM`) unless the
//!   share has `allow_devices`, so a guest running as root cannot plant device nodes that host
//!   users could later open.
//! - [`SharePolicy`] makes a read-only share refuse every mutating request with `EROFS`, and
//!   caps the buffer sizes the guest asks for in GETXATTR/LISTXATTR/READDIR.
//! - Unless the share allows it (`allow_setid`), [`SharePolicy`] strips `S_ISUID`/`S_ISGID`
//!   from the modes of CREATE, MKNOD, MKDIR and SETATTR and refuses SETXATTR of
//!   `security.capability` (`EPERM`): nothing the guest makes grants privileges on the host.
//! - [`SharePolicy`] counts the host descriptors the share holds for the guest: one `O_PATH`
//!   descriptor per inode the guest has looked up and not forgotten (PassthroughFs keeps one per
//!   inode), one per open file or directory handle. At `max_open_handles`, a LOOKUP that would
//!   add an inode (or MKDIR, MKNOD, SYMLINK, LINK, READDIRPLUS entries) gets `ENFILE` and
//!   OPEN/OPENDIR/CREATE get `EMFILE`; FORGET, RELEASE and DESTROY free slots. The count mirrors
//!   PassthroughFs's own reference counting, so the guest cannot run the VMM out of fds.
//! - fuse-backend-rs sets the umask to 0 whenever it (re)imports the root: in
//!   `PassthroughFs::import` and in `destroy`, which the guest triggers with FUSE_DESTROY. The
//!   umask is shared by every thread of the process (the embedder's too), so both run on a
//!   short-lived thread that first gives itself a private copy of the file-system attributes
//!   (`unshare(CLONE_FS)`); the process umask never changes. (As before, the host umask
//!   therefore also applies to the modes of files the guest creates.)
//! - [`SharePolicy`] keeps the guest from making `PassthroughFs` close a descriptor it still
//!   uses. fuse-backend-rs 0.14 READ/WRITE borrow the handle's descriptor as a `File` and, when
//!   the request's flags differ from the open flags, `fcntl(F_SETFL)` them first; if that fails
//!   (`O_DIRECT` on tmpfs, `O_NOATIME` on a file the VMM does not own, an `O_PATH` handle) the
//!   early return drops the borrowed `File` and closes the handle's descriptor, whose number
//!   the next READ/WRITE/RELEASE then uses or closes again — by then maybe another descriptor
//!   of the VMM. So OPEN/CREATE/OPENDIR flags are limited to what a Linux FUSE client sends
//!   (no `O_PATH`, no `O_TMPFILE`), and READ/WRITE carry the handle's open flags (file or
//!   directory handle), never the guest's: no `fcntl` runs. (A guest `fcntl(F_SETFL)` after
//!   open therefore does not reach the host descriptor; the guest kernel implements
//!   `O_NONBLOCK`/`O_APPEND` itself.)

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn, ROOT_ID};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::api::server::{Server, MAX_BUFFER_SIZE};
use fuse_backend_rs::api::{BackendFileSystem, Vfs, VfsOptions};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::FsCacheReqHandler;
use kestrel_api::FsCache;

use super::FsError;

/// The FUSE server a device hands its requests to.
pub type FuseServer = Server<Vfs>;

/// Largest extended-attribute value or name list the kernel handles (`XATTR_SIZE_MAX`,
/// `XATTR_LIST_MAX`); larger GETXATTR/LISTXATTR sizes are capped to it.
pub const XATTR_MAX: u32 = 65536;

/// How long the guest trusts attributes and entries under `cache: always`.
pub const CACHE_ALWAYS_TIMEOUT: Duration = Duration::from_secs(86_400);
/// How long the guest trusts attributes and entries under `cache: auto`.
pub const CACHE_AUTO_TIMEOUT: Duration = Duration::from_secs(1);

/// What the FUSE server of one share is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareOptions {
    /// The shared directory (root of what the guest sees).
    pub root: PathBuf,
    /// Refuse every change with `EROFS`.
    pub read_only: bool,
    /// Guest caching policy.
    pub cache: FsCache,
    /// Pass extended attributes through.
    pub xattr: bool,
    /// Most inodes plus open handles held for the guest (see [`SharePolicy`]).
    pub max_open_handles: u32,
    /// Let the guest make setuid/setgid files and set `security.capability`.
    pub allow_setid: bool,
    /// Let the guest make character and block device nodes.
    pub allow_devices: bool,
}

impl ShareOptions {
    /// The entry and attribute timeout for the cache policy.
    pub fn timeout(&self) -> Duration {
        match self.cache {
            FsCache::None => Duration::ZERO,
            FsCache::Auto => CACHE_AUTO_TIMEOUT,
            FsCache::Always => CACHE_ALWAYS_TIMEOUT,
        }
    }

    fn passthrough_config(&self, root: &str) -> Config {
        let timeout = self.timeout();
        Config {
            root_dir: root.to_string(),
            // Under a Vfs the Vfs negotiates the options and we import the root ourselves.
            do_import: false,
            cache_policy: match self.cache {
                FsCache::None => CachePolicy::Never,
                FsCache::Auto => CachePolicy::Auto,
                FsCache::Always => CachePolicy::Always,
            },
            entry_timeout: timeout,
            attr_timeout: timeout,
            xattr: self.xattr,
            writeback: false,
            // O_PATH descriptors, not file handles (those need CAP_DAC_READ_SEARCH and
            // open_by_handle_at, which would reach any inode of the host file system).
            inode_file_handles: false,
            ..Config::default()
        }
    }
}

/// Build the FUSE server for `opts`: the shared directory is opened (`O_PATH`) here, so a
/// missing or inaccessible directory fails now rather than at the guest's INIT.
pub fn build(opts: &ShareOptions) -> Result<FuseServer, FsError> {
    let root = share_root(&opts.root)?;
    let fs_err = |source| FsError::SharedDir {
        path: opts.root.clone(),
        source,
    };
    let fs: PassthroughFs = PassthroughFs::new(opts.passthrough_config(root)).map_err(fs_err)?;
    // `import` opens the root and calls umask(0): only on a thread with its own umask.
    with_private_umask(|| fs.import()).map_err(fs_err)?;

    let mut vfs_opts = VfsOptions {
        // Plain FUSE open semantics (an OPEN per open file, handles), as virtiofsd has by
        // default.
        no_open: false,
        no_opendir: false,
        // No writeback cache: a write reaches the host before it completes in the guest.
        no_writeback: true,
        killpriv_v2: false,
        ..VfsOptions::default()
    };
    // No DAX window: per-file DAX is never offered.
    vfs_opts.out_opts.remove(FsOptions::PERFILE_DAX);
    let vfs = Vfs::new(vfs_opts);
    let policy = SharePolicy::new(fs, opts.read_only).with_limits(ShareLimits {
        max_open_handles: opts.max_open_handles,
        allow_setid: opts.allow_setid,
        allow_devices: opts.allow_devices,
    });
    vfs.mount(Box::new(policy), "/")
        .map_err(|e| FsError::Server(format!("cannot mount the share: {e}")))?;
    Ok(Server::new(vfs))
}

/// Run `f` on a short-lived thread that first gives itself a private copy of the process's
/// file-system attributes (`unshare(CLONE_FS)`: root, working directory, umask), so a
/// `umask()` inside `f` changes only that thread. If that copy cannot be made, `f` does not
/// run.
pub fn with_private_umask<T: Send>(f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("kestrel-fs-init".to_string())
            .spawn_scoped(scope, || {
                crate::sigpipe::block_on_this_thread_or_log("kestrel-fs-init");
                // SAFETY: unshare takes no pointers; CLONE_FS only gives the calling thread its
                // own copy of root, cwd and umask.
                if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })?;
        thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the FUSE root import panicked")))
    })
}

/// The shared directory as the UTF-8 string PassthroughFs takes, without NUL bytes.
fn share_root(root: &Path) -> Result<&str, FsError> {
    root.to_str()
        .filter(|s| !s.is_empty() && !s.contains('\0'))
        .ok_or_else(|| FsError::InvalidSharedDir(root.to_path_buf()))
}

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

/// Whether OPEN/CREATE flags ask for write access or truncation.
fn wants_write(flags: u32) -> bool {
    // The flags are the guest's open(2) flags; reinterpret them as the host's c_int.
    let flags = flags.cast_signed();
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

/// Open flags a Linux FUSE client passes on OPEN/CREATE/OPENDIR (its file's `f_flags` minus
/// what the kernel handles itself). Anything else — `O_PATH`, `__O_TMPFILE`, unknown bits — is
/// dropped before `PassthroughFs` sees it.
const OPEN_FLAGS_ALLOWED: libc::c_int = libc::O_ACCMODE
    | libc::O_CREAT
    | libc::O_EXCL
    | libc::O_NOCTTY
    | libc::O_TRUNC
    | libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_DSYNC
    | libc::O_SYNC
    | libc::O_ASYNC
    | libc::O_DIRECT
    | libc::O_LARGEFILE
    | libc::O_DIRECTORY
    | libc::O_NOFOLLOW
    | libc::O_NOATIME
    | libc::O_CLOEXEC;

/// Largest READDIR/READDIRPLUS buffer handed to PassthroughFs (which allocates it up front):
/// a FUSE reply is never larger than [`MAX_BUFFER_SIZE`].
pub const READDIR_MAX: u32 = MAX_BUFFER_SIZE;

/// The extended attribute that grants file capabilities (as good as setuid).
const XATTR_SECURITY_CAPABILITY: &[u8] = b"security.capability";

/// What [`SharePolicy`] lets the guest hold and make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareLimits {
    /// Most inodes plus open handles held for the guest.
    pub max_open_handles: u32,
    /// Setuid/setgid modes and `security.capability` allowed.
    pub allow_setid: bool,
    /// Character and block device nodes allowed.
    pub allow_devices: bool,
}

impl Default for ShareLimits {
    fn default() -> Self {
        ShareLimits {
            max_open_handles: kestrel_api::DEFAULT_FS_MAX_OPEN_HANDLES,
            allow_setid: false,
            allow_devices: false,
        }
    }
}

/// The guest's open flags limited to `OPEN_FLAGS_ALLOWED`.
pub fn sanitize_open_flags(flags: u32) -> u32 {
    // The flags are the guest's open(2) flags; reinterpret them as the host's c_int and back.
    (flags.cast_signed() & OPEN_FLAGS_ALLOWED).cast_unsigned()
}

/// What the share holds for the guest, mirroring PassthroughFs's own tables.
#[derive(Debug, Default)]
struct Held {
    /// Open flags of every open file and directory handle, as `PassthroughFs` recorded them.
    handles: HashMap<u64, u32>,
    /// Lookup count of every inode the guest holds (the root excepted: it is always there).
    inodes: HashMap<u64, u64>,
}

impl Held {
    /// Descriptors held: one per inode, one per handle.
    fn used(&self) -> usize {
        self.handles.len() + self.inodes.len()
    }

    /// One more lookup of `inode` (0, a negative entry, and the root hold nothing).
    fn add_lookup(&mut self, inode: u64) {
        if inode != 0 && inode != ROOT_ID {
            *self.inodes.entry(inode).or_insert(0) += 1;
        }
    }

    /// Whether a lookup of `inode` would add a descriptor although `cap` are held.
    fn would_exceed(&self, inode: u64, cap: usize) -> bool {
        inode != 0 && inode != ROOT_ID && !self.inodes.contains_key(&inode) && self.used() >= cap
    }

    /// `count` lookups of `inode` forgotten (as PassthroughFs does: saturating, gone at 0).
    fn forget(&mut self, inode: u64, count: u64) {
        if let Some(n) = self.inodes.get_mut(&inode) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                self.inodes.remove(&inode);
            }
        }
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// The request filter between the Vfs and PassthroughFs: read-only shares, the setid and
/// device-node rules, the descriptor cap and open-flag hygiene (see the module documentation).
pub struct SharePolicy<F> {
    inner: F,
    read_only: bool,
    limits: ShareLimits,
    held: Mutex<Held>,
}

impl<F> SharePolicy<F> {
    /// `inner` behind the policy, with the default [`ShareLimits`].
    pub fn new(inner: F, read_only: bool) -> Self {
        SharePolicy {
            inner,
            read_only,
            limits: ShareLimits::default(),
            held: Mutex::new(Held::default()),
        }
    }

    /// The same policy with `limits`.
    pub fn with_limits(mut self, limits: ShareLimits) -> Self {
        self.limits = limits;
        self
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inodes and handles the share holds for the guest now.
    pub fn open_count(&self) -> usize {
        self.held().used()
    }

    fn cap(&self) -> usize {
        self.limits.max_open_handles as usize
    }

    /// Refuse with `err` unless `more` descriptors fit under the cap.
    fn check_room(&self, more: usize, err: i32) -> io::Result<()> {
        if self.held().used() + more > self.cap() {
            Err(errno(err))
        } else {
            Ok(())
        }
    }

    /// `mode` without the setuid/setgid bits unless the share allows them.
    fn filter_mode(&self, mode: u32) -> u32 {
        if self.limits.allow_setid {
            mode
        } else {
            mode & !(libc::S_ISUID | libc::S_ISGID)
        }
    }

    /// The flags to pass on READ/WRITE of `handle`: its open flags, so `PassthroughFs` never
    /// changes (or, on failure, closes) the descriptor. An unknown handle keeps the guest's
    /// flags: `PassthroughFs` refuses it with `EBADF` before touching any descriptor.
    fn io_flags(&self, handle: u64, guest: u32) -> u32 {
        self.held().handles.get(&handle).copied().unwrap_or(guest)
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(erofs())
        } else {
            Ok(())
        }
    }
}

impl<F: BackendFileSystem<Inode = u64, Handle = u64> + Sync + Send + 'static> BackendFileSystem
    for SharePolicy<F>
{
    fn mount(&self) -> io::Result<(Entry, u64)> {
        self.inner.mount()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl<F: FileSystem<Inode = u64, Handle = u64> + Sync> SharePolicy<F> {
    /// Count the lookup `entry` holds, or, when it would add an inode beyond the cap, give it
    /// back to `inner` and refuse with `ENFILE`.
    fn admit(&self, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        let mut held = self.held();
        if held.would_exceed(entry.inode, self.cap()) {
            drop(held);
            self.inner.forget(ctx, entry.inode, 1);
            return Err(errno(libc::ENFILE));
        }
        held.add_lookup(entry.inode);
        Ok(entry)
    }

    /// Count the lookup of a newly made `entry` (room was checked before making it).
    fn made(&self, entry: Entry) -> Entry {
        self.held().add_lookup(entry.inode);
        entry
    }
}

impl<F: FileSystem<Inode = u64, Handle = u64> + Sync> FileSystem for SharePolicy<F> {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        // PassthroughFs drops every inode and handle, then re-imports the root (umask(0)).
        let done = with_private_umask(|| {
            self.inner.destroy();
            Ok(())
        });
        match done {
            Ok(()) => *self.held() = Held::default(),
            Err(e) => tracing::warn!("virtio-fs: FUSE_DESTROY not carried out: {e}"),
        }
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let entry = self.inner.lookup(ctx, parent, name)?;
        self.admit(ctx, entry)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.inner.forget(ctx, inode, count);
        self.held().forget(inode, count);
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        let mirror = requests.clone();
        self.inner.batch_forget(ctx, requests);
        let mut held = self.held();
        for (inode, count) in mirror {
            held.forget(inode, count);
        }
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.check_writable()?;
        let mut attr = attr;
        if valid.contains(SetattrValid::MODE) {
            attr.st_mode = self.filter_mode(attr.st_mode);
        }
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        self.check_room(1, libc::ENFILE)?;
        let entry = self.inner.symlink(ctx, linkname, parent, name)?;
        Ok(self.made(entry))
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        let kind = mode & libc::S_IFMT;
        if (kind == libc::S_IFCHR || kind == libc::S_IFBLK) && !self.limits.allow_devices {
            return Err(errno(libc::EPERM));
        }
        self.check_room(1, libc::ENFILE)?;
        let mode = self.filter_mode(mode);
        let entry = self.inner.mknod(ctx, inode, name, mode, rdev, umask)?;
        Ok(self.made(entry))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        self.check_room(1, libc::ENFILE)?;
        let mode = self.filter_mode(mode);
        let entry = self.inner.mkdir(ctx, parent, name, mode, umask)?;
        Ok(self.made(entry))
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.check_writable()?;
        self.check_room(1, libc::ENFILE)?;
        let entry = self.inner.link(ctx, inode, newparent, newname)?;
        Ok(self.made(entry))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        if wants_write(flags) {
            self.check_writable()?;
        }
        self.check_room(1, libc::EMFILE)?;
        let flags = sanitize_open_flags(flags);
        let r = self.inner.open(ctx, inode, flags, fuse_flags)?;
        if let Some(h) = r.0 {
            self.held().handles.insert(h, flags);
        }
        Ok(r)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.check_writable()?;
        // A new inode and a handle.
        self.check_room(2, libc::EMFILE)?;
        let mut args = args;
        args.flags = sanitize_open_flags(args.flags);
        args.mode = self.filter_mode(args.mode);
        let flags = args.flags;
        let r = self.inner.create(ctx, parent, name, args)?;
        let mut held = self.held();
        held.add_lookup(r.0.inode);
        if let Some(h) = r.1 {
            held.handles.insert(h, flags);
        }
        drop(held);
        Ok(r)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        let flags = self.io_flags(handle, flags);
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.check_writable()?;
        let flags = self.io_flags(handle, flags);
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        // Only a handle PassthroughFs really released (it checks the inode too).
        self.held().handles.remove(&handle);
        Ok(())
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let mut st = self.inner.statfs(ctx, inode)?;
        if self.read_only {
            st.f_flag |= libc::ST_RDONLY;
        }
        Ok(st)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        if !self.limits.allow_setid && name.to_bytes() == XATTR_SECURITY_CAPABILITY {
            return Err(errno(libc::EPERM));
        }
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        // PassthroughFs allocates `size` bytes up front; no value is larger than XATTR_MAX.
        self.inner.getxattr(ctx, inode, name, size.min(XATTR_MAX))
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size.min(XATTR_MAX))
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.check_room(1, libc::EMFILE)?;
        let flags = sanitize_open_flags(flags);
        let r = self.inner.opendir(ctx, inode, flags)?;
        if let Some(h) = r.0 {
            // PassthroughFs records a directory handle's flags with O_DIRECTORY added; a READ
            // on it must carry the same, or it would `fcntl` the directory's descriptor.
            self.held()
                .handles
                .insert(h, flags | libc::O_DIRECTORY as u32);
        }
        Ok(r)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let size = size.min(READDIR_MAX);
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let size = size.min(READDIR_MAX);
        // Every entry PassthroughFs hands over carries a lookup. At the cap, an entry for a new
        // inode ends the listing with `Ok(0)` ("buffer full"), on which PassthroughFs gives
        // that lookup back itself; if nothing was listed yet, the reply is ENFILE rather than
        // an empty (end-of-directory) listing.
        let cap = self.cap();
        let (mut listed, mut full) = (0usize, false);
        let r = self
            .inner
            .readdirplus(ctx, inode, handle, size, offset, &mut |d, e| {
                let ino = e.inode;
                if self.held().would_exceed(ino, cap) {
                    full = true;
                    return Ok(0);
                }
                let r = add_entry(d, e);
                // PassthroughFs keeps the lookup unless the entry did not fit (`Ok(0)`).
                if !matches!(r, Ok(0)) {
                    self.held().add_lookup(ino);
                    listed += 1;
                }
                r
            });
        if full && listed == 0 && r.is_ok() {
            return Err(errno(libc::ENFILE));
        }
        r
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        // PassthroughFs releases file handles here too (and checks the inode).
        self.inner.releasedir(ctx, inode, flags, handle)?;
        self.held().handles.remove(&handle);
        Ok(())
    }

    fn setupmapping(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: u64,
        _foffset: u64,
        _len: u64,
        _flags: u64,
        _moffset: u64,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        // No DAX window.
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    fn removemapping(
        &self,
        _ctx: &Context,
        _inode: u64,
        _requests: Vec<RemovemappingOne>,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            self.check_writable()?;
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }
}
