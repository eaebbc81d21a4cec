//! Templates (kata's VM factory, in-process): a VM booted until its guest agent answers, then
//! paused and snapshotted into a directory. Clones restore from it (guest memory mapped
//! `MAP_PRIVATE` from the template's memory file, so they share every page they do not
//! write) and get fresh entropy and the host's clock on hand-out ([`Sandbox::refresh_guest`]).
//!
//! A template directory holds the snapshot's `state` and `memory` files and
//! [`TEMPLATE_FILE`] (written last: a directory without it is not a template). Templates made
//! by [`Template::ensure`] live under a root directory at `root/<key>`, where the key is a
//! hash of everything that decides what the guest looks like ([`template_key`]); they are
//! created once, under an exclusive `flock` on `root/<key>.lock`, in `root/<key>.tmp-<pid>`
//! and renamed into place. See docs/templates.md.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kestrel_api::{RestoreOverrides, VmConfig};
use kestrel_vmm::snapshot::{self, SnapshotFiles};
use kestrel_vmm::Vm;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::sandbox::{Sandbox, SandboxError};

/// The template's own file in its directory (format, key, creation time, configuration).
pub const TEMPLATE_FILE: &str = "template.json";
/// The [`TEMPLATE_FILE`] format this build writes and the only one it opens.
pub const TEMPLATE_FORMAT: u32 = 1;
/// Largest [`TEMPLATE_FILE`] [`Template::open`] reads (real ones are a few KiB).
const MAX_TEMPLATE_FILE: u64 = 1 << 20;

/// Template failures (creating, opening, keying). Booting, snapshotting and restoring fail
/// with the sandbox's and the VMM's own errors.
#[derive(Debug, Error)]
pub enum TemplateError {
    /// The directory lacks one of the template's files.
    #[error(
        "template {dir}: no {missing} file (not a template, or one whose creation did not finish)"
    )]
    Incomplete {
        /// The directory.
        dir: PathBuf,
        /// The missing file's name (`state`, `memory` or `template.json`).
        missing: &'static str,
    },
    /// [`TEMPLATE_FILE`] is unreadable, too large or not the expected JSON.
    #[error("template {path}: {reason}")]
    Meta {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// [`TEMPLATE_FILE`] is of another format.
    #[error("template {path}: format {found}; this Kestrel opens format {expected} only")]
    Format {
        /// The file.
        path: PathBuf,
        /// Its format.
        found: u32,
        /// [`TEMPLATE_FORMAT`].
        expected: u32,
    },
    /// [`Template::create`] was given a directory that already holds template or snapshot
    /// files: overwriting a memory file in place would change the memory of running clones.
    #[error(
        "template {dir}: already holds a {file} file; refusing to overwrite what clones may map"
    )]
    Exists {
        /// The directory.
        dir: PathBuf,
        /// The file found.
        file: &'static str,
    },
    /// A file the configuration names (kernel, initrd, drive) cannot be examined for the key.
    #[error("template key: {field} {path}: {source}")]
    FileIdentity {
        /// The configuration field (`boot-source.kernel_image_path`, `drives[0].path_on_host`).
        field: String,
        /// The path.
        path: PathBuf,
        /// The `stat` error.
        #[source]
        source: io::Error,
    },
    /// The configuration cannot be serialized (a path that is not UTF-8).
    #[error("template key: the configuration does not serialize to JSON: {0}")]
    Config(String),
    /// A file-system operation on a template, its lock or its root failed.
    #[error("template {path}: {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// A closure turning an `io::Error` into [`TemplateError::Io`] for `path`.
fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> TemplateError {
    let path = path.to_path_buf();
    move |source| TemplateError::Io { what, path, source }
}

/// The content of [`TEMPLATE_FILE`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateMeta {
    /// [`TEMPLATE_FORMAT`].
    format: u32,
    /// [`template_key`] of `config` when the template was created.
    key: String,
    /// Creation time, milliseconds since the Unix epoch.
    created_unix_ms: u64,
    /// The configuration the template's VM booted with.
    config: VmConfig,
}

/// A template: a snapshot directory of a VM booted until its agent answered. Cheap to keep
/// (an open template holds no file descriptor); share it in an `Arc` (a [`crate::Pool`]
/// does). `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Template {
    dir: PathBuf,
    meta: TemplateMeta,
}

impl Template {
    /// Boot a VM from `config` (which needs a `vsock` section), wait up to `agent_timeout`
    /// for its agent to answer a ping, pause it, snapshot it into `dir` (created if missing),
    /// stop it, and write [`TEMPLATE_FILE`] last. Blocks for the whole boot.
    ///
    /// The template VM uses `config` as given (its vsock `uds_path` must be free while it
    /// runs). Clones keep the snapshot's configuration except what their
    /// [`RestoreOverrides`] change.
    ///
    /// # Errors
    /// [`SandboxError::NoVsock`]; [`TemplateError::Exists`] if `dir` already holds a template
    /// or snapshot file; [`TemplateError::FileIdentity`] for a kernel, initrd or drive that
    /// cannot be examined; the boot's, agent's or snapshot's error. On error the files this
    /// call wrote are removed (and `dir` if this call created it).
    pub fn create(
        config: &VmConfig,
        dir: &Path,
        agent_timeout: Duration,
    ) -> Result<Template, SandboxError> {
        if config.vsock.is_none() {
            return Err(SandboxError::NoVsock);
        }
        let key = template_key(config)?;
        Self::create_keyed(config, dir, &key, agent_timeout)
    }

    /// [`Template::create`] with the key already computed (by [`Template::ensure`], before
    /// it picked the directory).
    fn create_keyed(
        config: &VmConfig,
        dir: &Path,
        key: &str,
        agent_timeout: Duration,
    ) -> Result<Template, SandboxError> {
        refuse_existing(dir)?;
        let created_dir = !dir.exists();
        fs::create_dir_all(dir).map_err(io_err("creating the template directory", dir))?;
        let made = boot_and_snapshot(config, dir, agent_timeout).and_then(|()| {
            let meta = TemplateMeta {
                format: TEMPLATE_FORMAT,
                key: key.to_string(),
                created_unix_ms: unix_ms(SystemTime::now()),
                config: config.clone(),
            };
            write_meta(dir, &meta)?;
            Ok(Template {
                dir: dir.to_path_buf(),
                meta,
            })
        });
        if made.is_err() {
            remove_partial(dir, created_dir);
        }
        made
    }

    /// Open the template in `dir` (made by [`Template::create`] or [`Template::ensure`]).
    /// Reads [`TEMPLATE_FILE`] only; the snapshot itself is checked when a clone restores it.
    ///
    /// # Errors
    /// [`TemplateError::Incomplete`] naming the first missing file (`state`, `memory`,
    /// `template.json`); [`TemplateError::Meta`] for an unreadable or malformed
    /// [`TEMPLATE_FILE`]; [`TemplateError::Format`] for another format.
    pub fn open(dir: &Path) -> Result<Template, TemplateError> {
        let files = SnapshotFiles::in_dir(dir);
        for (path, missing) in [
            (&files.state, snapshot::STATE_FILE),
            (&files.memory, snapshot::MEMORY_FILE),
            (&dir.join(TEMPLATE_FILE), TEMPLATE_FILE),
        ] {
            if !path.is_file() {
                return Err(TemplateError::Incomplete {
                    dir: dir.to_path_buf(),
                    missing,
                });
            }
        }
        let meta = read_meta(&dir.join(TEMPLATE_FILE))?;
        Ok(Template {
            dir: dir.to_path_buf(),
            meta,
        })
    }

    /// The template for `config` under `root` (created if missing): `root/<key>` with the key
    /// of [`template_key`]. The first caller creates it (see [`Template::create`]) while
    /// holding an exclusive `flock` on `root/<key>.lock`; other callers, in this process or
    /// another, wait for the lock and then open what it created. Creation happens in
    /// `root/<key>.tmp-<pid>`, renamed to `root/<key>` when complete; what a crashed creator
    /// left (a temporary directory, a directory without [`TEMPLATE_FILE`]) is removed and the
    /// template made again. Blocks while another caller creates it.
    ///
    /// # Errors
    /// As [`Template::create`]; [`TemplateError::Io`] for `root`, the lock or the rename.
    pub fn ensure(
        config: &VmConfig,
        root: &Path,
        agent_timeout: Duration,
    ) -> Result<Template, SandboxError> {
        if config.vsock.is_none() {
            return Err(SandboxError::NoVsock);
        }
        let key = template_key(config)?;
        ensure_with(root, &key, |tmp| {
            Self::create_keyed(config, tmp, &key, agent_timeout).map(drop)
        })
    }

    /// A new sandbox from this template: restore the snapshot with `overrides` (each clone
    /// running at the same time needs its own `vsock_uds_path`; see [`RestoreOverrides`]),
    /// start it, connect to its agent (waiting up to `agent_timeout`), then
    /// [`Sandbox::refresh_guest`]. A changed `guest_mac` reaches the device only: the guest
    /// keeps the MAC its driver read at boot until it is set inside the guest.
    ///
    /// # Errors
    /// The restore's error (a bad or mismatching snapshot, an override naming a missing
    /// device or TAP), the start's, the agent's, or the refresh's. Nothing is left running.
    pub fn clone_sandbox(
        &self,
        overrides: &RestoreOverrides,
        agent_timeout: Duration,
    ) -> Result<Sandbox, SandboxError> {
        let vm = Vm::restore(&self.dir, overrides)?;
        let sb = Sandbox::from_restored(vm, agent_timeout)?;
        sb.refresh_guest()?;
        Ok(sb)
    }

    /// The template's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration the template's VM booted with (clones: this, with their overrides).
    pub fn config(&self) -> &VmConfig {
        &self.meta.config
    }

    /// The template's key ([`template_key`] of [`Template::config`] at creation).
    pub fn key(&self) -> &str {
        &self.meta.key
    }

    /// When the template was created.
    pub fn created(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.meta.created_unix_ms)
    }

    /// The snapshot's state and memory files.
    pub fn files(&self) -> SnapshotFiles {
        SnapshotFiles::in_dir(&self.dir)
    }
}

/// Boot `config`, wait for the agent, pause, snapshot into `dir`; the VM stops when the
/// sandbox drops.
fn boot_and_snapshot(
    config: &VmConfig,
    dir: &Path,
    agent_timeout: Duration,
) -> Result<(), SandboxError> {
    let sb = Sandbox::boot(config, agent_timeout)?;
    let version = sb.agent().ping()?;
    tracing::info!(
        "template: VM {} agent {version} ready, snapshotting into {}",
        sb.vm().name(),
        dir.display()
    );
    sb.vm().pause()?;
    sb.vm().snapshot(dir)?;
    sb.vm().stop();
    Ok(())
}

/// Refuse a directory that holds any file a template consists of.
fn refuse_existing(dir: &Path) -> Result<(), TemplateError> {
    for file in [snapshot::STATE_FILE, snapshot::MEMORY_FILE, TEMPLATE_FILE] {
        if dir.join(file).symlink_metadata().is_ok() {
            return Err(TemplateError::Exists {
                dir: dir.to_path_buf(),
                file,
            });
        }
    }
    Ok(())
}

/// Remove what a failed [`Template::create`] wrote.
fn remove_partial(dir: &Path, whole_dir: bool) {
    let r = if whole_dir {
        fs::remove_dir_all(dir)
    } else {
        [snapshot::STATE_FILE, snapshot::MEMORY_FILE, TEMPLATE_FILE]
            .iter()
            .try_for_each(|f| match fs::remove_file(dir.join(f)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            })
    };
    if let Err(e) = r {
        tracing::warn!(
            "template: cannot clean up {} after a failed creation: {e}",
            dir.display()
        );
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Write [`TEMPLATE_FILE`] atomically (temporary file, fsync, rename, fsync of the directory).
fn write_meta(dir: &Path, meta: &TemplateMeta) -> Result<(), TemplateError> {
    let path = dir.join(TEMPLATE_FILE);
    let tmp = dir.join(format!("{TEMPLATE_FILE}.tmp"));
    let json = serde_json::to_vec_pretty(meta).map_err(|e| TemplateError::Meta {
        path: path.clone(),
        reason: format!("cannot serialize: {e}"),
    })?;
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err("writing the template file", &path)(e)
    })
}

/// Read and check [`TEMPLATE_FILE`].
fn read_meta(path: &Path) -> Result<TemplateMeta, TemplateError> {
    let meta_err = |reason: String| TemplateError::Meta {
        path: path.to_path_buf(),
        reason,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_TEMPLATE_FILE + 1).read_to_end(&mut bytes))
        .map_err(|e| meta_err(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_TEMPLATE_FILE {
        return Err(meta_err(format!("larger than {MAX_TEMPLATE_FILE} bytes")));
    }
    // The format first, so another format is reported as such, not as a parse error.
    #[derive(Deserialize)]
    struct Format {
        format: u32,
    }
    let f: Format = serde_json::from_slice(&bytes)
        .map_err(|e| meta_err(format!("not a template file: {e}")))?;
    if f.format != TEMPLATE_FORMAT {
        return Err(TemplateError::Format {
            path: path.to_path_buf(),
            found: f.format,
            expected: TEMPLATE_FORMAT,
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| meta_err(format!("not a template file: {e}")))
}

/// The key of the template for `config`: the hex SHA-256 of the template and snapshot
/// formats, the configuration's JSON (keys sorted) with `vsock.uds_path` and `kestrel.name`
/// blanked (they differ per VM and do not change the guest), and the identity of every file
/// it boots from: the kernel and initrd (path, size, modification time) and each drive's
/// backing file (path and size; read-only drives also their modification time — a writable
/// drive's time changes whenever a guest writes to it, including the template's own).
///
/// # Errors
/// [`TemplateError::FileIdentity`] for a file that cannot be `stat`ed;
/// [`TemplateError::Config`] for a configuration that does not serialize.
pub fn template_key(config: &VmConfig) -> Result<String, TemplateError> {
    let mut blank = config.clone();
    if let Some(v) = blank.vsock.as_mut() {
        v.uds_path = PathBuf::new();
    }
    blank.kestrel.name = None;
    // Through `Value`, whose maps are sorted: the same configuration gives the same bytes.
    let json = serde_json::to_value(&blank)
        .and_then(|v| serde_json::to_vec(&v))
        .map_err(|e| TemplateError::Config(e.to_string()))?;
    let mut h = Sha256::new();
    h.update(b"kestrel-template\0");
    h.update(TEMPLATE_FORMAT.to_le_bytes());
    h.update(snapshot::FORMAT_VERSION.to_le_bytes());
    put(&mut h, &json);
    for (field, path, with_mtime) in boot_files(config) {
        let m = fs::metadata(path).map_err(|source| TemplateError::FileIdentity {
            field: field.clone(),
            path: path.to_path_buf(),
            source,
        })?;
        put(&mut h, field.as_bytes());
        put(&mut h, path.as_os_str().as_bytes());
        h.update(m.size().to_le_bytes());
        if with_mtime {
            h.update(m.mtime().to_le_bytes());
            h.update(m.mtime_nsec().to_le_bytes());
        }
    }
    Ok(hex(&h.finalize()))
}

/// Hash `bytes` with their length in front (so two fields never run into each other).
fn put(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// The files `config` boots from: (field, path, whether the modification time counts).
fn boot_files(config: &VmConfig) -> Vec<(String, &Path, bool)> {
    let b = &config.boot_source;
    let mut files = vec![(
        "boot-source.kernel_image_path".to_string(),
        b.kernel_image_path.as_path(),
        true,
    )];
    if let Some(initrd) = &b.initrd_path {
        files.push(("boot-source.initrd_path".into(), initrd.as_path(), true));
    }
    for (i, d) in config.drives.iter().enumerate() {
        match &d.path_on_host {
            Some(p) if !p.as_os_str().is_empty() => {
                files.push((format!("drives[{i}].path_on_host"), p, d.is_read_only));
            }
            _ => {}
        }
    }
    files
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// An exclusive `flock` on a lock file, released when dropped (the descriptor closes).
struct FileLock {
    _file: File,
}

impl FileLock {
    /// Open (creating it) and lock `path`, waiting for another holder.
    fn exclusive(path: &Path) -> Result<FileLock, TemplateError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err("opening the lock file", path))?;
        loop {
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if r == 0 {
                return Ok(FileLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err("locking", path)(e));
            }
        }
    }
}

/// [`Template::ensure`]'s directory logic with the creation step given: `create` fills the
/// (new, empty) temporary directory it is given with a complete template.
pub(crate) fn ensure_with(
    root: &Path,
    key: &str,
    create: impl FnOnce(&Path) -> Result<(), SandboxError>,
) -> Result<Template, SandboxError> {
    let dir = root.join(key);
    // A complete template is only ever renamed into place: no lock needed to open one.
    if let Some(t) = open_matching(&dir, key) {
        return Ok(t);
    }
    fs::create_dir_all(root).map_err(io_err("creating the template root", root))?;
    let _lock = FileLock::exclusive(&root.join(format!("{key}.lock")))?;
    if let Some(t) = open_matching(&dir, key) {
        return Ok(t);
    }
    clear_leftovers(root, key)?;
    let tmp = root.join(format!("{key}.tmp-{}", std::process::id()));
    fs::create_dir(&tmp).map_err(io_err("creating the temporary directory", &tmp))?;
    if let Err(e) = create(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let renamed = fs::rename(&tmp, &dir)
        .and_then(|()| File::open(root)?.sync_all())
        .map_err(io_err("renaming the new template into place", &dir));
    if let Err(e) = renamed {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.into());
    }
    tracing::info!("template {key} created in {}", dir.display());
    Ok(Template::open(&dir)?)
}

/// The template in `dir` if it opens and carries `key`.
fn open_matching(dir: &Path, key: &str) -> Option<Template> {
    Template::open(dir).ok().filter(|t| t.key() == key)
}

/// With the key's lock held: remove `root/<key>` (it did not open as this key's template)
/// and every `root/<key>.tmp-*` (no creator can be running: they hold the lock).
fn clear_leftovers(root: &Path, key: &str) -> Result<(), TemplateError> {
    let dir = root.join(key);
    if dir.symlink_metadata().is_ok() {
        tracing::warn!(
            "template: removing {} (incomplete or not this key's template)",
            dir.display()
        );
        remove_any(&dir).map_err(io_err("removing a broken template", &dir))?;
    }
    let prefix = format!("{key}.tmp-");
    let entries = fs::read_dir(root).map_err(io_err("listing the template root", root))?;
    for entry in entries.flatten() {
        if entry.file_name().as_bytes().starts_with(prefix.as_bytes()) {
            let p = entry.path();
            tracing::warn!("template: removing {} left by a creator", p.display());
            remove_any(&p).map_err(io_err("removing a leftover directory", &p))?;
        }
    }
    Ok(())
}

/// Remove a directory tree, or a single file or symlink.
fn remove_any(path: &Path) -> io::Result<()> {
    if path.symlink_metadata()?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use kestrel_api::{DriveConfig, VsockConfig};

    /// A directory under the system's temporary directory, removed when dropped.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir()
                .join(format!("kestrel-sandbox-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A configuration with a (fake) kernel file in `dir` and a vsock section.
    pub(crate) fn config_in(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        if !kernel.exists() {
            fs::write(&kernel, b"not really a kernel").unwrap();
        }
        let mut c = VmConfig::new(kernel, 1, 128);
        c.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("template.vsock"),
            vsock_id: None,
        });
        c
    }

    /// Fill `dir` with what [`Template::open`] accepts: garbage snapshot files and a valid
    /// template file for `config`.
    pub(crate) fn fake_template(dir: &Path, config: &VmConfig) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(snapshot::STATE_FILE), b"not a state file").unwrap();
        fs::write(dir.join(snapshot::MEMORY_FILE), b"").unwrap();
        let meta = TemplateMeta {
            format: TEMPLATE_FORMAT,
            key: template_key(config).unwrap(),
            created_unix_ms: unix_ms(SystemTime::now()),
            config: config.clone(),
        };
        write_meta(dir, &meta).unwrap();
    }

    fn set_mtime(path: &Path, secs: u64) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.set_modified(UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap();
    }

    #[test]
    fn the_key_covers_the_guest_and_ignores_per_vm_fields() {
        let tmp = TempDir::new("key");
        let c = config_in(&tmp.0);
        let key = template_key(&c).unwrap();
        assert_eq!(key.len(), 64);
        assert!(key
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(template_key(&c.clone()).unwrap(), key, "stable");

        // The vsock socket and the name differ per VM: they do not change the template.
        let mut other = c.clone();
        other.vsock.as_mut().unwrap().uds_path = "/run/elsewhere.vsock".into();
        other.kestrel.name = Some("clone-7".into());
        assert_eq!(template_key(&other).unwrap(), key);

        // What the guest sees does.
        let mut more = c.clone();
        more.machine_config.vcpu_count = 2;
        assert_ne!(template_key(&more).unwrap(), key, "vcpu_count");
        let mut cid = c.clone();
        cid.vsock.as_mut().unwrap().guest_cid = 4;
        assert_ne!(template_key(&cid).unwrap(), key, "guest_cid");

        // So do the files it boots from.
        let kernel = c.boot_source.kernel_image_path.clone();
        set_mtime(&kernel, 1_000_000);
        let k1 = template_key(&c).unwrap();
        assert_ne!(k1, key, "kernel mtime");
        fs::write(&kernel, b"another kernel, longer").unwrap();
        set_mtime(&kernel, 1_000_000);
        assert_ne!(template_key(&c).unwrap(), k1, "kernel size");
    }

    #[test]
    fn drives_and_initrd_count_by_identity() {
        let tmp = TempDir::new("key-drives");
        let mut c = config_in(&tmp.0);
        let initrd = tmp.0.join("initrd");
        let ro = tmp.0.join("ro.img");
        let rw = tmp.0.join("rw.img");
        for f in [&initrd, &ro, &rw] {
            fs::write(f, [0u8; 512]).unwrap();
            set_mtime(f, 5_000);
        }
        c.boot_source.initrd_path = Some(initrd.clone());
        for (id, path, ro) in [("ro", &ro, true), ("rw", &rw, false)] {
            c.drives.push(DriveConfig {
                drive_id: id.into(),
                path_on_host: Some(path.clone()),
                is_read_only: ro,
                ..Default::default()
            });
        }
        let key = template_key(&c).unwrap();
        set_mtime(&initrd, 6_000);
        let k = template_key(&c).unwrap();
        assert_ne!(k, key, "initrd mtime");
        set_mtime(&ro, 6_000);
        let k2 = template_key(&c).unwrap();
        assert_ne!(k2, k, "read-only drive mtime");
        // A writable drive's time changes with every guest write (the template's own too).
        set_mtime(&rw, 6_000);
        assert_eq!(template_key(&c).unwrap(), k2, "writable drive mtime");
        fs::write(&rw, [0u8; 1024]).unwrap();
        assert_ne!(template_key(&c).unwrap(), k2, "writable drive size");

        fs::remove_file(&ro).unwrap();
        let e = template_key(&c).unwrap_err();
        assert!(
            matches!(&e, TemplateError::FileIdentity { field, .. } if field == "drives[0].path_on_host"),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with("template key: drives[0].path_on_host "),
            "{e}"
        );
    }

    #[test]
    fn open_refuses_what_is_not_a_complete_template() {
        let tmp = TempDir::new("open");
        let dir = tmp.0.join("t");
        let missing = |dir: &Path| match Template::open(dir) {
            Err(TemplateError::Incomplete { missing, .. }) => missing,
            other => panic!("{other:?}"),
        };
        assert_eq!(missing(&dir), "state", "no directory at all");
        fs::create_dir(&dir).unwrap();
        assert_eq!(missing(&dir), "state");
        let e = Template::open(&dir).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "template {}: no state file (not a template, or one whose creation did not \
                 finish)",
                dir.display()
            )
        );
        fs::write(dir.join("state"), b"x").unwrap();
        assert_eq!(missing(&dir), "memory");
        fs::write(dir.join("memory"), b"").unwrap();
        assert_eq!(missing(&dir), "template.json");

        fs::write(dir.join(TEMPLATE_FILE), b"{ not json").unwrap();
        let e = Template::open(&dir).unwrap_err();
        assert!(matches!(e, TemplateError::Meta { .. }), "{e:?}");
        assert!(e.to_string().contains("not a template file"), "{e}");

        fs::write(dir.join(TEMPLATE_FILE), br#"{"format": 99, "key": "k"}"#).unwrap();
        let e = Template::open(&dir).unwrap_err();
        assert!(
            matches!(
                e,
                TemplateError::Format {
                    found: 99,
                    expected: 1,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .ends_with("format 99; this Kestrel opens format 1 only"),
            "{e}"
        );

        fs::write(dir.join(TEMPLATE_FILE), br#"{"format": 1, "key": "k"}"#).unwrap();
        let e = Template::open(&dir).unwrap_err();
        assert!(e.to_string().contains("missing field"), "{e}");

        let c = config_in(&tmp.0);
        fs::remove_file(dir.join(TEMPLATE_FILE)).unwrap();
        fake_template(&dir, &c);
        let t = Template::open(&dir).unwrap();
        assert_eq!(t.dir(), dir);
        assert_eq!(t.config(), &c);
        assert_eq!(t.key(), template_key(&c).unwrap());
        assert!(t.created() <= SystemTime::now());
        assert_eq!(t.files(), SnapshotFiles::in_dir(&dir));
        assert!(!dir.join("template.json.tmp").exists());
    }

    #[test]
    fn create_refuses_a_directory_with_template_files_before_booting() {
        let tmp = TempDir::new("create");
        let c = config_in(&tmp.0);
        let dir = tmp.0.join("t");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("memory"), b"a clone may map this").unwrap();
        let e = Template::create(&c, &dir, Duration::from_millis(1)).unwrap_err();
        assert!(
            matches!(
                e,
                SandboxError::Template(TemplateError::Exists { file: "memory", .. })
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("refusing to overwrite"), "{e}");
        assert_eq!(
            fs::read(dir.join("memory")).unwrap(),
            b"a clone may map this"
        );

        // A sandbox needs its agent channel: refused before anything is created.
        let mut no_vsock = c.clone();
        no_vsock.vsock = None;
        let fresh = tmp.0.join("fresh");
        let e = Template::create(&no_vsock, &fresh, Duration::from_millis(1)).unwrap_err();
        assert!(matches!(e, SandboxError::NoVsock), "{e:?}");
        let e = Template::ensure(&no_vsock, &fresh, Duration::from_millis(1)).unwrap_err();
        assert!(matches!(e, SandboxError::NoVsock), "{e:?}");
        assert!(!fresh.exists());
    }

    #[test]
    fn a_failed_create_removes_what_it_made() {
        // The fake kernel does not boot: the VM is refused, and the directory this call
        // created goes again (a directory that existed stays, empty).
        let tmp = TempDir::new("create-fail");
        let c = config_in(&tmp.0);
        let dir = tmp.0.join("new");
        assert!(Template::create(&c, &dir, Duration::from_millis(1)).is_err());
        assert!(!dir.exists());
        let existing = tmp.0.join("existing");
        fs::create_dir(&existing).unwrap();
        assert!(Template::create(&c, &existing, Duration::from_millis(1)).is_err());
        assert_eq!(fs::read_dir(&existing).unwrap().count(), 0);
    }

    /// A creator that writes a fake template for `config` and counts its calls.
    fn creator<'a>(
        config: &'a VmConfig,
        calls: &'a AtomicUsize,
        hold: Duration,
    ) -> impl FnOnce(&Path) -> Result<(), SandboxError> + 'a {
        move |tmp: &Path| {
            calls.fetch_add(1, Ordering::SeqCst);
            assert!(tmp.is_dir(), "given an existing directory");
            assert_eq!(fs::read_dir(tmp).unwrap().count(), 0, "and an empty one");
            let name = tmp.file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.contains(".tmp-"), "{name}");
            std::thread::sleep(hold);
            fake_template(tmp, config);
            Ok(())
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn ensure_creates_once_in_a_temporary_directory_and_renames_it() {
        let tmp = TempDir::new("ensure");
        let c = config_in(&tmp.0);
        let key = template_key(&c).unwrap();
        let root = tmp.0.join("root");
        let calls = AtomicUsize::new(0);
        let t = ensure_with(&root, &key, creator(&c, &calls, Duration::ZERO)).unwrap();
        assert_eq!(t.dir(), root.join(&key));
        assert_eq!(t.key(), key);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            names(&root),
            vec![key.clone(), format!("{key}.lock")],
            "no temporary left"
        );

        let again = ensure_with(&root, &key, creator(&c, &calls, Duration::ZERO)).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "opened, not created again");
        assert_eq!(again.created(), t.created());
    }

    #[test]
    fn ensure_replaces_what_a_crashed_creator_left() {
        let tmp = TempDir::new("ensure-crash");
        let c = config_in(&tmp.0);
        let key = template_key(&c).unwrap();
        let root = tmp.0.join("root");
        // A half-written template (no template.json), a temporary directory of a dead
        // creator and a stray temporary file; another key's temporary directory stays.
        fs::create_dir_all(root.join(&key)).unwrap();
        fs::write(root.join(&key).join("memory"), b"half").unwrap();
        fs::create_dir_all(root.join(format!("{key}.tmp-4242"))).unwrap();
        fs::write(root.join(format!("{key}.tmp-1")), b"").unwrap();
        fs::create_dir_all(root.join("otherkey.tmp-4242")).unwrap();
        let calls = AtomicUsize::new(0);
        let t = ensure_with(&root, &key, creator(&c, &calls, Duration::ZERO)).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(Template::open(t.dir()).is_ok());
        assert_eq!(
            names(&root),
            vec![
                key.clone(),
                format!("{key}.lock"),
                "otherkey.tmp-4242".into()
            ]
        );

        // A complete template whose key is not the directory's name is replaced.
        let mut other = c.clone();
        other.machine_config.vcpu_count = 2;
        fake_template(&root.join("somekey"), &other);
        let calls = AtomicUsize::new(0);
        let t = ensure_with(&root, "somekey", |tmp: &Path| {
            calls.fetch_add(1, Ordering::SeqCst);
            fake_template(tmp, &other);
            let mut meta = read_meta(&tmp.join(TEMPLATE_FILE)).unwrap();
            meta.key = "somekey".into();
            write_meta(tmp, &meta).unwrap();
            Ok(())
        })
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "recreated");
        assert_eq!(t.key(), "somekey");
    }

    #[test]
    fn a_failed_ensure_leaves_nothing_and_releases_the_lock() {
        let tmp = TempDir::new("ensure-fail");
        let c = config_in(&tmp.0);
        let key = template_key(&c).unwrap();
        let root = tmp.0.join("root");
        let e = ensure_with(&root, &key, |tmp: &Path| {
            fs::write(tmp.join("memory"), b"partial").unwrap();
            Err(SandboxError::NoVsock)
        })
        .unwrap_err();
        assert!(matches!(e, SandboxError::NoVsock), "{e:?}");
        assert_eq!(names(&root), vec![format!("{key}.lock")]);
        let calls = AtomicUsize::new(0);
        ensure_with(&root, &key, creator(&c, &calls, Duration::ZERO)).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn concurrent_ensures_create_once_and_all_open_it() {
        let tmp = TempDir::new("ensure-race");
        let c = Arc::new(config_in(&tmp.0));
        let key = template_key(&c).unwrap();
        let root = tmp.0.join("root");
        let calls = AtomicUsize::new(0);
        let keys: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        // Each call opens its own descriptor of the lock file, so flock
                        // serialises threads of one process as it does processes.
                        let create = creator(&c, &calls, Duration::from_millis(200));
                        ensure_with(&root, &key, create).map(|t| t.key().to_string())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(keys.iter().all(|k| *k == key));
    }
}
