//! The Unix listeners of every vsock device in this process, so one VM's guest cannot reach
//! another VM's host socket through the `<uds_path>_<port>` forwarding rule.
//!
//! A guest connecting to host port `P` reaches `<uds_path>_P`. If one VM's `uds_path` were
//! `/run/a.vsock` and another's `/run/a.vsock_52`, the first guest could connect to port 52 and
//! talk to the second VM's main socket as if it were a host client (`CONNECT <port>` into the
//! other guest). Two guards, both needed:
//! - at device creation, a `uds_path` that is `<other>_<digits>` of a registered listener, or
//!   whose `<uds_path>_<digits>` names one, is refused ([`VsockError::PathCollision`]);
//! - a guest-initiated connect whose target is a registered listener (same file after
//!   following symlinks, by device and inode) is refused with `RST`.
//!
//! Names are compared in the canonical form of their directory (the directory exists once the
//! listener is bound), so `/run/./a.vsock` and `/run/a.vsock` are one path. The registry sees
//! only this process: listeners of other processes are not known to it.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::VsockError;

struct Listener {
    id: u64,
    dir: PathBuf,
    name: OsString,
    dev: u64,
    ino: u64,
}

struct Registry {
    next_id: u64,
    listeners: Vec<Listener>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next_id: 0,
    listeners: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    // The registry's data stays consistent whatever a panicking holder did.
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// A listener's place in the registry; dropping it removes the entry.
#[derive(Debug)]
pub struct Registration {
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        registry().listeners.retain(|l| l.id != self.id);
    }
}

/// Whether `name` is `base` followed by `_` and one or more ASCII digits.
fn is_port_name(name: &OsStr, base: &OsStr) -> bool {
    let (name, base) = (name.as_bytes(), base.as_bytes());
    name.strip_prefix(base)
        .and_then(|rest| rest.strip_prefix(b"_"))
        .is_some_and(|digits| !digits.is_empty() && digits.iter().all(u8::is_ascii_digit))
}

/// `path` as (canonical directory, file name).
fn split(path: &Path) -> io::Result<(PathBuf, OsString)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.canonicalize()?,
        _ => std::env::current_dir()?,
    };
    Ok((dir, name.to_os_string()))
}

/// Bind a listener at `uds_path` and register it, unless it collides with a registered
/// listener through the `_<port>` rule.
pub fn bind(uds_path: &Path) -> Result<(UnixListener, Registration), VsockError> {
    let bind_err = |source| VsockError::Bind {
        path: uds_path.to_path_buf(),
        source,
    };
    let (dir, name) = split(uds_path).map_err(bind_err)?;
    // Held from the check to the insertion, so two devices created at once cannot both pass.
    let mut reg = registry();
    if let Some(other) = reg.listeners.iter().find(|l| {
        // The same name fails in bind (the socket file exists).
        l.dir == dir && (is_port_name(&name, &l.name) || is_port_name(&l.name, &name))
    }) {
        return Err(VsockError::PathCollision {
            path: uds_path.to_path_buf(),
            other: other.dir.join(&other.name),
        });
    }
    let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
    let meta = match std::fs::metadata(uds_path) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(uds_path);
            return Err(bind_err(e));
        }
    };
    let id = reg.next_id;
    reg.next_id += 1;
    reg.listeners.push(Listener {
        id,
        dir,
        name,
        dev: meta.dev(),
        ino: meta.ino(),
    });
    Ok((listener, Registration { id }))
}

/// Whether `path` (after following symlinks) is the listener of a vsock device of this
/// process.
pub fn is_listener(path: &Path) -> bool {
    let id = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let named = split(path).ok();
    registry().listeners.iter().any(|l| {
        id == Some((l.dev, l.ino))
            || named
                .as_ref()
                .is_some_and(|(d, n)| *d == l.dir && *n == l.name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names() {
        let b = OsStr::new("a.vsock");
        assert!(is_port_name(OsStr::new("a.vsock_52"), b));
        assert!(is_port_name(OsStr::new("a.vsock_0"), b));
        assert!(!is_port_name(OsStr::new("a.vsock_"), b));
        assert!(!is_port_name(OsStr::new("a.vsock_5x"), b));
        assert!(!is_port_name(OsStr::new("a.vsock"), b));
        assert!(!is_port_name(OsStr::new("b.vsock_52"), b));
    }
}
