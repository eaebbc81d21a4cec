//! Kestrel's `fs` section: virtio-fs shares, in-process or through a vhost-user daemon.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::*;
use crate::error::ConfigError;

/// Longest virtio-fs tag: the config space holds 36 bytes (NUL-padded, not NUL-terminated).
pub const MAX_FS_TAG_LEN: usize = 36;
/// Most request queues a virtio-fs device may have (besides its high-priority queue).
pub const MAX_FS_REQUEST_QUEUES: u16 = 16;
/// Largest virtio-fs queue size.
pub const MAX_FS_QUEUE_SIZE: u16 = 1024;
/// Default number of virtio-fs request queues.
pub const DEFAULT_FS_NUM_QUEUES: u16 = 1;
/// Default virtio-fs queue size.
pub const DEFAULT_FS_QUEUE_SIZE: u16 = 256;
/// Default cap on the host descriptors one in-process share holds for the guest (inodes the
/// guest has looked up, one `O_PATH` descriptor each, plus open file and directory handles).
/// A guest kernel forgets cached inodes under memory pressure and on `drop_caches`, so it runs
/// fine against a cap; 4096 per share keeps a VM with a few shares far below a container
/// runtime's `RLIMIT_NOFILE` (containerd: 1048576). An embedder with the common soft limit of
/// 1024 must set a lower value.
pub const DEFAULT_FS_MAX_OPEN_HANDLES: u32 = 4096;
/// Smallest `max_open_handles`: the root and a few files must stay usable.
pub const MIN_FS_MAX_OPEN_HANDLES: u32 = 16;
/// Largest `max_open_handles` (the kernel's default `fs.nr_open`).
pub const MAX_FS_MAX_OPEN_HANDLES: u32 = 1 << 20;

/// How much the guest may cache of an in-process virtio-fs share (virtiofsd's `--cache`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsCache {
    /// No caching: file data goes to the host on every access (`DIRECT_IO`), attributes and
    /// directory entries time out at once. For directories the host also changes.
    None,
    /// Close-to-open consistency: cached data is dropped on open when the file changed;
    /// attributes and entries are trusted for 1 second.
    #[default]
    Auto,
    /// The guest keeps its caches (`KEEP_CACHE`) and trusts attributes and entries for a day.
    /// Only for directories that nothing but this guest changes.
    Always,
}

fn default_fs_num_queues() -> u16 {
    DEFAULT_FS_NUM_QUEUES
}

fn default_fs_queue_size() -> u16 {
    DEFAULT_FS_QUEUE_SIZE
}

fn default_fs_max_open_handles() -> u32 {
    DEFAULT_FS_MAX_OPEN_HANDLES
}

/// One entry of Kestrel's `fs` section: a virtio-fs device the guest mounts with
/// `mount -t virtiofs <tag> <dir>`.
///
/// Exactly one backend: `shared_dir` (served in-process by Kestrel's FUSE server) or `socket`
/// (an external vhost-user-fs daemon, e.g. `virtiofsd --socket-path=<socket> --shared-dir=...`,
/// started before the VM). With `socket`, guest RAM is memfd-backed so the daemon can map it,
/// and `read_only`, `cache` and `xattr` must stay at their defaults: they are the daemon's own
/// options (`--readonly`, `--cache`, `--xattr`), and Kestrel rejects them rather than
/// silently ignoring them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The mount tag the guest uses: 1 to 36 bytes of UTF-8 without NUL, unique among `fs`.
    pub tag: String,
    /// Host directory served in-process (must exist, be a directory, and have a UTF-8 path).
    #[serde(default)]
    pub shared_dir: Option<PathBuf>,
    /// Unix socket of a running vhost-user-fs daemon.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Refuse every change to the share (`EROFS`). `shared_dir` only.
    #[serde(default)]
    pub read_only: bool,
    /// Guest caching policy. `shared_dir` only.
    #[serde(default)]
    pub cache: FsCache,
    /// Pass extended attributes through. `shared_dir` only.
    #[serde(default)]
    pub xattr: bool,
    /// Request queues (besides the high-priority queue): 1 to 16.
    #[serde(default = "default_fs_num_queues")]
    pub num_queues: u16,
    /// Size of every queue: a power of two up to 1024.
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u16,
    /// Serve each request queue on its own worker thread instead of the VM's event loop, so
    /// slow file-system calls (cold reads, fsync: about a millisecond each on a local disk,
    /// far more on network storage) do not delay the VM's other devices. `shared_dir` only.
    #[serde(default)]
    pub worker_threads: bool,
    /// Most host descriptors the share holds for the guest: inodes it has looked up (one
    /// `O_PATH` descriptor each) plus open file and directory handles. At the cap, LOOKUP of a
    /// new inode (and MKDIR, MKNOD, SYMLINK, LINK) fails with `ENFILE` and OPEN, OPENDIR and
    /// CREATE with `EMFILE`; FORGET and RELEASE free slots. 16 to 1048576, default 4096.
    /// `shared_dir` only.
    #[serde(default = "default_fs_max_open_handles")]
    pub max_open_handles: u32,
    /// Let the guest create setuid/setgid files and directories (CREATE, MKNOD, MKDIR,
    /// SETATTR modes) and set `security.capability`. Off: the bits are stripped and the
    /// attribute refused (`EPERM`), so no host user can gain privileges from a file the guest
    /// made. `shared_dir` only.
    #[serde(default)]
    pub allow_setid: bool,
    /// Let the guest create character and block device nodes (MKNOD; the VMM also needs
    /// `CAP_MKNOD`). Off: `EPERM`. FIFOs and sockets are always allowed. `shared_dir` only.
    #[serde(default)]
    pub allow_devices: bool,
}

impl FsConfig {
    /// A share of `shared_dir` under `tag`, everything else at its default.
    pub fn shared_dir(tag: impl Into<String>, shared_dir: impl Into<PathBuf>) -> Self {
        FsConfig {
            tag: tag.into(),
            shared_dir: Some(shared_dir.into()),
            socket: None,
            read_only: false,
            cache: FsCache::default(),
            xattr: false,
            num_queues: DEFAULT_FS_NUM_QUEUES,
            queue_size: DEFAULT_FS_QUEUE_SIZE,
            worker_threads: false,
            max_open_handles: DEFAULT_FS_MAX_OPEN_HANDLES,
            allow_setid: false,
            allow_devices: false,
        }
    }

    /// A share served by the vhost-user daemon listening on `socket`.
    pub fn vhost_user(tag: impl Into<String>, socket: impl Into<PathBuf>) -> Self {
        FsConfig {
            shared_dir: None,
            socket: Some(socket.into()),
            ..FsConfig::shared_dir(tag, PathBuf::new())
        }
    }

    /// Whether the share is served by an external vhost-user daemon.
    pub fn is_vhost_user(&self) -> bool {
        self.socket.is_some()
    }

    /// Check this entry alone; `index` names it in errors (`fs[<index>].<field>`). Uniqueness of
    /// tags is checked by [`VmConfig::validate`].
    pub fn validate(&self, index: usize) -> Result<(), ConfigError> {
        let field = |name: &str| format!("fs[{index}].{name}");
        if self.tag.is_empty() || self.tag.len() > MAX_FS_TAG_LEN {
            return Err(ConfigError::invalid(
                field("tag"),
                format!("must be 1 to {MAX_FS_TAG_LEN} bytes, is {}", self.tag.len()),
            ));
        }
        if self.tag.contains('\0') {
            return Err(ConfigError::invalid(
                field("tag"),
                "must not contain NUL bytes",
            ));
        }
        match (&self.shared_dir, &self.socket) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    field("socket"),
                    "give either shared_dir (in-process) or socket (vhost-user), not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::invalid(
                    field("shared_dir"),
                    "one of shared_dir (in-process) or socket (vhost-user) is required",
                ))
            }
            (Some(dir), None) => check_shared_dir(&field("shared_dir"), dir)?,
            (None, Some(sock)) => {
                check_socket(&field("socket"), sock)?;
                self.check_no_in_process_options(index)?;
            }
        }
        if self.num_queues == 0 || self.num_queues > MAX_FS_REQUEST_QUEUES {
            return Err(ConfigError::invalid(
                field("num_queues"),
                format!(
                    "{} is outside 1 to {MAX_FS_REQUEST_QUEUES}",
                    self.num_queues
                ),
            ));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size > MAX_FS_QUEUE_SIZE {
            return Err(ConfigError::invalid(
                field("queue_size"),
                format!(
                    "{} is not a power of two up to {MAX_FS_QUEUE_SIZE}",
                    self.queue_size
                ),
            ));
        }
        if !(MIN_FS_MAX_OPEN_HANDLES..=MAX_FS_MAX_OPEN_HANDLES).contains(&self.max_open_handles) {
            return Err(ConfigError::invalid(
                field("max_open_handles"),
                format!(
                    "{} is outside {MIN_FS_MAX_OPEN_HANDLES} to {MAX_FS_MAX_OPEN_HANDLES}",
                    self.max_open_handles
                ),
            ));
        }
        Ok(())
    }

    /// With `socket`, the options of the in-process server must stay at their defaults: the
    /// vhost-user daemon has its own.
    fn check_no_in_process_options(&self, index: usize) -> Result<(), ConfigError> {
        let field = |name: &str| format!("fs[{index}].{name}");
        let daemon_option = |name: &str, flag: &str| {
            ConfigError::invalid(
                field(name),
                format!(
                    "is an option of the vhost-user daemon (virtiofsd {flag}), not of \
                     Kestrel: leave it at its default with socket"
                ),
            )
        };
        if self.read_only {
            return Err(daemon_option("read_only", "--readonly"));
        }
        if self.cache != FsCache::default() {
            return Err(daemon_option("cache", "--cache"));
        }
        if self.xattr {
            return Err(daemon_option("xattr", "--xattr"));
        }
        if self.worker_threads {
            return Err(daemon_option("worker_threads", "--thread-pool-size"));
        }
        if self.max_open_handles != DEFAULT_FS_MAX_OPEN_HANDLES {
            return Err(daemon_option("max_open_handles", "--rlimit-nofile"));
        }
        for (name, set) in [
            ("allow_setid", self.allow_setid),
            ("allow_devices", self.allow_devices),
        ] {
            if set {
                return Err(ConfigError::invalid(
                    field(name),
                    "is a rule of the in-process server (shared_dir); the vhost-user \
                     daemon applies its own: leave it at its default with socket",
                ));
            }
        }
        Ok(())
    }
}

fn check_shared_dir(field: &str, dir: &Path) -> Result<(), ConfigError> {
    if dir.as_os_str().is_empty() {
        return Err(ConfigError::invalid(field, "must not be empty"));
    }
    // The FUSE server takes its root as a UTF-8 string.
    if dir.to_str().is_none() {
        return Err(ConfigError::invalid(
            field,
            format!("{} is not valid UTF-8", dir.display()),
        ));
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(ConfigError::invalid(
            field,
            format!("{} is not a directory", dir.display()),
        )),
        Err(e) => Err(ConfigError::invalid(
            field,
            format!("cannot access {}: {e}", dir.display()),
        )),
    }
}

fn check_socket(field: &str, sock: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    let len = sock.as_os_str().len();
    if len == 0 {
        return Err(ConfigError::invalid(field, "must not be empty"));
    }
    if len > MAX_UDS_PATH_LEN {
        return Err(ConfigError::invalid(
            field,
            format!(
                "{len} bytes is longer than the {MAX_UDS_PATH_LEN} a Unix socket path can hold"
            ),
        ));
    }
    match std::fs::metadata(sock) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err(ConfigError::invalid(
            field,
            format!("{} is not a Unix socket", sock.display()),
        )),
        Err(e) => Err(ConfigError::invalid(
            field,
            format!(
                "cannot access {} (is the vhost-user daemon running?): {e}",
                sock.display()
            ),
        )),
    }
}

impl VmConfig {
    /// Check `fs` (part of [`VmConfig::validate`]); errors name `fs[<index>].<field>`.
    pub fn validate_fs(&self) -> Result<(), ConfigError> {
        for (i, f) in self.fs.iter().enumerate() {
            f.validate(i)?;
            let earlier = self.fs[..i].iter().map(|o| o.tag.as_str());
            check_unique(&format!("fs[{i}].tag"), &f.tag, "fs", earlier)?;
        }
        Ok(())
    }

    /// Whether any `fs` entry uses a vhost-user daemon, which needs guest RAM the daemon can map
    /// (memfd-backed, `MAP_SHARED`).
    pub fn needs_shared_memory(&self) -> bool {
        self.fs.iter().any(FsConfig::is_vhost_user)
    }
}

#[cfg(test)]
mod fs_tests {
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn some_file() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")
    }

    fn some_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    fn with(fs: Vec<FsConfig>) -> VmConfig {
        let mut cfg = VmConfig::new(some_file(), 1, 128);
        cfg.fs = fs;
        cfg
    }

    /// The error's field and message.
    fn err(cfg: &VmConfig) -> (String, String) {
        let e = cfg.validate().expect_err("fs should be rejected");
        (e.field().expect("names a field").to_string(), e.to_string())
    }

    /// A listening Unix socket in a fresh temporary directory (removed on drop).
    struct Sock {
        dir: PathBuf,
        path: PathBuf,
        _listener: UnixListener,
    }

    impl Sock {
        fn new() -> Sock {
            static SEQ: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "kfs-cfg-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("vfsd.sock");
            let listener = UnixListener::bind(&path).unwrap();
            Sock {
                dir,
                path,
                _listener: listener,
            }
        }
    }

    impl Drop for Sock {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn fs_section_parses_with_defaults() {
        let sock = Sock::new();
        let json = format!(
            r#"{{
            "boot-source": {{"kernel_image_path": "{k}"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
            "fs": [
                {{"tag": "share", "shared_dir": "{d}"}},
                {{"tag": "ro", "shared_dir": "{d}", "read_only": true, "cache": "none",
                  "xattr": true, "num_queues": 4, "queue_size": 1024, "worker_threads": true}},
                {{"tag": "ext", "socket": "{s}"}}
            ]
        }}"#,
            k = some_file().display(),
            d = some_dir().display(),
            s = sock.path.display()
        );
        let cfg = VmConfig::from_json(&json).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.fs.len(), 3);
        assert_eq!(cfg.fs[0], FsConfig::shared_dir("share", some_dir()));
        assert_eq!(cfg.fs[0].cache, FsCache::Auto);
        assert_eq!(cfg.fs[0].num_queues, 1);
        assert_eq!(cfg.fs[0].queue_size, 256);
        assert!(!cfg.fs[0].read_only && !cfg.fs[0].xattr);
        assert!(cfg.fs[1].read_only && cfg.fs[1].xattr);
        assert_eq!(cfg.fs[1].cache, FsCache::None);
        assert_eq!((cfg.fs[1].num_queues, cfg.fs[1].queue_size), (4, 1024));
        assert!(cfg.fs[1].worker_threads && !cfg.fs[0].worker_threads);
        assert_eq!(cfg.fs[2], FsConfig::vhost_user("ext", &sock.path));
        assert!(cfg.needs_shared_memory());
        // Round trip; no fs at all is the default.
        let back = VmConfig::from_json(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        let plain = with(Vec::new());
        assert!(plain.fs.is_empty() && !plain.needs_shared_memory());
        let json = serde_json::to_string(&plain).unwrap();
        assert!(VmConfig::from_json(&json).unwrap().fs.is_empty());
    }

    #[test]
    fn fs_unknown_fields_and_cache_values_rejected() {
        let base = |entry: &str| {
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "/k"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
                "fs": [{entry}]}}"#
            )
        };
        let e = VmConfig::from_json(&base(r#"{"tag": "a", "shared_dir": "/", "dax": true}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `dax`"), "{e}");
        let e = VmConfig::from_json(&base(
            r#"{"tag": "a", "shared_dir": "/", "cache": "never"}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown variant `never`"), "{e}");
        for c in ["none", "auto", "always"] {
            let json = base(&format!(
                r#"{{"tag": "a", "shared_dir": "/", "cache": "{c}"}}"#
            ));
            VmConfig::from_json(&json).unwrap();
        }
        let e = VmConfig::from_json(&base(r#"{"shared_dir": "/"}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `tag`"), "{e}");
    }

    #[test]
    fn fs_tag_rules() {
        let ok = |tag: &str| FsConfig::shared_dir(tag, some_dir());
        with(vec![ok("a")]).validate().unwrap();
        with(vec![ok(&"t".repeat(MAX_FS_TAG_LEN))])
            .validate()
            .unwrap();
        // 36 bytes of multi-byte UTF-8 (12 × 3 bytes) fit; 37 bytes do not.
        with(vec![ok(&"€".repeat(12))]).validate().unwrap();
        let (f, m) = err(&with(vec![ok("")]));
        assert_eq!(f, "fs[0].tag");
        assert!(m.contains("1 to 36 bytes"), "{m}");
        let (f, m) = err(&with(vec![ok(&"t".repeat(MAX_FS_TAG_LEN + 1))]));
        assert_eq!(f, "fs[0].tag");
        assert!(m.contains("is 37"), "{m}");
        assert_eq!(
            err(&with(vec![ok(&format!("{}a", "€".repeat(12)))])).0,
            "fs[0].tag"
        );
        assert_eq!(err(&with(vec![ok("a\0b")])).0, "fs[0].tag");
        let (f, m) = err(&with(vec![ok("a"), ok("b"), ok("a")]));
        assert_eq!(f, "fs[2].tag");
        assert!(m.contains("fs[0]"), "{m}");
    }

    #[test]
    fn fs_exactly_one_backend() {
        let sock = Sock::new();
        let mut both = FsConfig::shared_dir("a", some_dir());
        both.socket = Some(sock.path.clone());
        let (f, m) = err(&with(vec![both]));
        assert_eq!(f, "fs[0].socket");
        assert!(m.contains("not both"), "{m}");
        let mut neither = FsConfig::shared_dir("a", some_dir());
        neither.shared_dir = None;
        let (f, m) = err(&with(vec![neither]));
        assert_eq!(f, "fs[0].shared_dir");
        assert!(m.contains("required"), "{m}");
    }

    #[test]
    fn fs_shared_dir_must_be_an_existing_directory() {
        let (f, m) = err(&with(vec![FsConfig::shared_dir("a", "/nonexistent/share")]));
        assert_eq!(f, "fs[0].shared_dir");
        assert!(m.contains("/nonexistent/share"), "{m}");
        let (f, m) = err(&with(vec![FsConfig::shared_dir("a", some_file())]));
        assert_eq!(f, "fs[0].shared_dir");
        assert!(m.contains("not a directory"), "{m}");
        assert_eq!(
            err(&with(vec![FsConfig::shared_dir("a", "")])).0,
            "fs[0].shared_dir"
        );
        use std::os::unix::ffi::OsStrExt;
        let not_utf8 = PathBuf::from(std::ffi::OsStr::from_bytes(b"/tmp/\xff"));
        let (f, m) = err(&with(vec![FsConfig::shared_dir("a", not_utf8)]));
        assert_eq!(f, "fs[0].shared_dir");
        assert!(m.contains("UTF-8"), "{m}");
    }

    #[test]
    fn fs_socket_must_be_a_live_socket() {
        let sock = Sock::new();
        with(vec![FsConfig::vhost_user("a", &sock.path)])
            .validate()
            .unwrap();
        let (f, m) = err(&with(vec![FsConfig::vhost_user(
            "a",
            sock.dir.join("none.sock"),
        )]));
        assert_eq!(f, "fs[0].socket");
        assert!(m.contains("daemon running"), "{m}");
        let (f, m) = err(&with(vec![FsConfig::vhost_user("a", some_file())]));
        assert_eq!(f, "fs[0].socket");
        assert!(m.contains("not a Unix socket"), "{m}");
        let long = PathBuf::from(format!("/tmp/{}", "s".repeat(MAX_UDS_PATH_LEN)));
        let (f, m) = err(&with(vec![FsConfig::vhost_user("a", long)]));
        assert_eq!(f, "fs[0].socket");
        assert!(m.contains("longer than"), "{m}");
        assert_eq!(
            err(&with(vec![FsConfig::vhost_user("a", "")])).0,
            "fs[0].socket"
        );
    }

    #[test]
    fn fs_daemon_options_rejected_with_socket() {
        let sock = Sock::new();
        let base = FsConfig::vhost_user("a", &sock.path);
        let mut c = base.clone();
        c.read_only = true;
        let (f, m) = err(&with(vec![c]));
        assert_eq!(f, "fs[0].read_only");
        assert!(m.contains("--readonly"), "{m}");
        let mut c = base.clone();
        c.cache = FsCache::Always;
        assert_eq!(err(&with(vec![c])).0, "fs[0].cache");
        let mut c = base.clone();
        c.xattr = true;
        assert_eq!(err(&with(vec![c])).0, "fs[0].xattr");
        let mut c = base.clone();
        c.worker_threads = true;
        let (f, m) = err(&with(vec![c]));
        assert_eq!(f, "fs[0].worker_threads");
        assert!(m.contains("--thread-pool-size"), "{m}");
        let mut c = base.clone();
        c.max_open_handles = 100;
        let (f, m) = err(&with(vec![c]));
        assert_eq!(f, "fs[0].max_open_handles");
        assert!(m.contains("--rlimit-nofile"), "{m}");
        let mut c = base.clone();
        c.allow_setid = true;
        let (f, m) = err(&with(vec![c]));
        assert_eq!(f, "fs[0].allow_setid");
        assert!(m.contains("in-process"), "{m}");
        let mut c = base.clone();
        c.allow_devices = true;
        assert_eq!(err(&with(vec![c])).0, "fs[0].allow_devices");
        // Queue geometry is Kestrel's (the guest sees it), so it stays allowed.
        let mut c = base;
        c.num_queues = 2;
        c.queue_size = 512;
        with(vec![c]).validate().unwrap();
    }

    #[test]
    fn fs_queue_limits() {
        let mut c = FsConfig::shared_dir("a", some_dir());
        for n in [1, MAX_FS_REQUEST_QUEUES] {
            c.num_queues = n;
            with(vec![c.clone()]).validate().unwrap();
        }
        for n in [0, MAX_FS_REQUEST_QUEUES + 1] {
            c.num_queues = n;
            let (f, m) = err(&with(vec![c.clone()]));
            assert_eq!(f, "fs[0].num_queues");
            assert!(m.contains(&n.to_string()), "{m}");
        }
        c.num_queues = 1;
        for s in [1, 2, 256, MAX_FS_QUEUE_SIZE] {
            c.queue_size = s;
            with(vec![c.clone()]).validate().unwrap();
        }
        for s in [0, 3, 100, 2048] {
            c.queue_size = s;
            let (f, m) = err(&with(vec![c.clone()]));
            assert_eq!(f, "fs[0].queue_size", "{s}");
            assert!(m.contains("power of two"), "{m}");
        }
    }

    #[test]
    fn fs_max_open_handles_limits_and_share_rules() {
        let mut c = FsConfig::shared_dir("a", some_dir());
        assert_eq!(c.max_open_handles, DEFAULT_FS_MAX_OPEN_HANDLES);
        assert!(!c.allow_setid && !c.allow_devices);
        for n in [MIN_FS_MAX_OPEN_HANDLES, 4096, MAX_FS_MAX_OPEN_HANDLES] {
            c.max_open_handles = n;
            with(vec![c.clone()]).validate().unwrap();
        }
        for n in [0, MIN_FS_MAX_OPEN_HANDLES - 1, MAX_FS_MAX_OPEN_HANDLES + 1] {
            c.max_open_handles = n;
            let (f, m) = err(&with(vec![c.clone()]));
            assert_eq!(f, "fs[0].max_open_handles");
            assert!(m.contains(&n.to_string()), "{m}");
        }
        // JSON: defaults when absent, values when given, unknown spellings refused.
        let json = |entry: &str| {
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "/k"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
                "fs": [{entry}]}}"#
            )
        };
        let cfg = VmConfig::from_json(&json(
            r#"{"tag": "a", "shared_dir": "/", "max_open_handles": 64,
                "allow_setid": true, "allow_devices": true}"#,
        ))
        .unwrap();
        assert_eq!(cfg.fs[0].max_open_handles, 64);
        assert!(cfg.fs[0].allow_setid && cfg.fs[0].allow_devices);
        let cfg = VmConfig::from_json(&json(r#"{"tag": "a", "shared_dir": "/"}"#)).unwrap();
        assert_eq!(cfg.fs[0].max_open_handles, DEFAULT_FS_MAX_OPEN_HANDLES);
        assert!(!cfg.fs[0].allow_setid && !cfg.fs[0].allow_devices);
        let e = VmConfig::from_json(&json(
            r#"{"tag": "a", "shared_dir": "/", "allow_suid": true}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `allow_suid`"), "{e}");
    }

    #[test]
    fn fs_checked_after_drives_and_index_named() {
        let mut cfg = with(vec![
            FsConfig::shared_dir("ok", some_dir()),
            FsConfig::shared_dir("bad", "/nonexistent"),
        ]);
        assert_eq!(err(&cfg).0, "fs[1].shared_dir");
        cfg.drives.push(DriveConfig::default());
        assert_eq!(err(&cfg).0, "drives[0].drive_id");
    }
}
