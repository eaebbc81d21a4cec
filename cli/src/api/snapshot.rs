//! Firecracker's snapshot bodies: `PUT /snapshot/create` ([`SnapshotCreate`]) and
//! `PUT /snapshot/load` ([`SnapshotLoadBody`], checked into a [`SnapshotLoad`]).
//!
//! Field names are those of Firecracker's swagger (`SnapshotCreateParams`,
//! `SnapshotLoadParams`, `MemoryBackend`, `NetworkOverride`, `VsockOverride`). What Kestrel does
//! not implement (diff snapshots, dirty-page tracking, a userfaultfd memory backend,
//! `clock_realtime`) is accepted only when absent or at its default, and otherwise refused
//! with "not supported by Kestrel" naming the field.

use std::path::PathBuf;

use kestrel_api::{ConfigError, NetOverride, RestoreOverrides};
use kestrel_vmm::SnapshotFiles;
use serde::{Deserialize, Serialize};

use super::ApiError;

/// Firecracker's `snapshot_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// The whole guest memory (Kestrel's only kind).
    #[default]
    Full,
    /// Only the pages dirtied since the previous snapshot. Not supported.
    Diff,
}

/// `PUT /snapshot/create` body (Firecracker's `SnapshotCreateParams`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// The state file to write.
    pub snapshot_path: PathBuf,
    /// The guest memory file to write.
    pub mem_file_path: PathBuf,
    /// `Full` (the default) or `Diff` (refused).
    #[serde(default)]
    pub snapshot_type: Option<SnapshotType>,
    /// Older Firecracker clients' target version of the snapshot format. Accepted and not
    /// used: Kestrel writes its own versioned format.
    #[serde(default)]
    pub version: Option<String>,
}

impl SnapshotCreate {
    /// The two files to write.
    ///
    /// # Errors
    /// [`ApiError::Config`] naming `snapshot_type` for a diff snapshot.
    pub fn files(&self) -> Result<SnapshotFiles, ApiError> {
        if self.snapshot_type == Some(SnapshotType::Diff) {
            return Err(ConfigError::not_supported("snapshot_type", &SnapshotType::Diff).into());
        }
        Ok(SnapshotFiles {
            state: self.snapshot_path.clone(),
            memory: self.mem_file_path.clone(),
        })
    }
}

/// Firecracker's `MemoryBackend.backend_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendType {
    /// Guest memory mapped from a file (copy-on-write).
    File,
    /// Pages served by a userfaultfd handler. Not supported.
    Uffd,
}

/// Firecracker's `MemoryBackend`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// `File` (or `Uffd`, refused).
    pub backend_type: BackendType,
    /// The memory file (for `File`).
    pub backend_path: PathBuf,
}

/// Firecracker's `NetworkOverride`: another TAP for an interface of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface (`network-interfaces[].iface_id` of the snapshot).
    pub iface_id: String,
    /// The TAP device to use.
    pub host_dev_name: String,
}

/// Firecracker's `VsockOverride`: another listener path for the vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The new `vsock.uds_path`.
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load` body as sent (Firecracker's `SnapshotLoadParams`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadBody {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// Where guest memory comes from (exclusive with `mem_file_path`).
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    /// Firecracker's deprecated form of a `File` backend.
    #[serde(default)]
    pub mem_file_path: Option<PathBuf>,
    /// Firecracker's deprecated dirty-page tracking flag: only `false`.
    #[serde(default)]
    pub enable_diff_snapshots: Option<bool>,
    /// Dirty-page tracking: only `false`.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// Run the guest once loaded (default: stay paused).
    #[serde(default)]
    pub resume_vm: Option<bool>,
    /// Other TAPs for the snapshot's interfaces.
    #[serde(default)]
    pub network_overrides: Option<Vec<NetworkOverride>>,
    /// Another vsock listener path.
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// Advance the guest clock by the time since the snapshot: only `false`.
    #[serde(default)]
    pub clock_realtime: Option<bool>,
}

/// A checked `PUT /snapshot/load`: what to restore and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotLoad {
    /// The state and memory files.
    pub files: SnapshotFiles,
    /// The snapshot configuration's changes (TAPs, vsock path).
    pub overrides: RestoreOverrides,
    /// Whether the guest runs once loaded (else it is paused).
    pub resume_vm: bool,
}

impl TryFrom<SnapshotLoadBody> for SnapshotLoad {
    type Error = ApiError;

    /// # Errors
    /// [`ApiError::BadRequest`] without exactly one of `mem_backend` and `mem_file_path`;
    /// [`ApiError::Config`] naming a field whose value Kestrel does not support.
    fn try_from(b: SnapshotLoadBody) -> Result<Self, ApiError> {
        for (field, on) in [
            ("enable_diff_snapshots", b.enable_diff_snapshots),
            ("track_dirty_pages", b.track_dirty_pages),
            ("clock_realtime", b.clock_realtime),
        ] {
            if on == Some(true) {
                return Err(ConfigError::not_supported(field, &true).into());
            }
        }
        let memory = memory_file(b.mem_backend, b.mem_file_path)?;
        let network_interfaces = b
            .network_overrides
            .unwrap_or_default()
            .into_iter()
            .map(|n| NetOverride {
                iface_id: n.iface_id,
                host_dev_name: Some(n.host_dev_name),
                guest_mac: None,
            })
            .collect();
        Ok(SnapshotLoad {
            files: SnapshotFiles {
                state: b.snapshot_path,
                memory,
            },
            overrides: RestoreOverrides {
                vsock_uds_path: b.vsock_override.map(|v| v.uds_path),
                network_interfaces,
                ..RestoreOverrides::default()
            },
            resume_vm: b.resume_vm.unwrap_or(false),
        })
    }
}

/// The memory file from exactly one of `mem_backend` (a `File` backend) and `mem_file_path`.
fn memory_file(
    backend: Option<MemoryBackend>,
    legacy: Option<PathBuf>,
) -> Result<PathBuf, ApiError> {
    match (backend, legacy) {
        (Some(_), Some(_)) => Err(ApiError::BadRequest(
            "Too many fields: give either `mem_backend` or `mem_file_path`, not both.".into(),
        )),
        (None, None) => Err(ApiError::BadRequest(
            "Missing field: either `mem_backend` or `mem_file_path` is required.".into(),
        )),
        (Some(m), None) if m.backend_type == BackendType::Uffd => {
            Err(ConfigError::not_supported("mem_backend.backend_type", &BackendType::Uffd).into())
        }
        (Some(m), None) => Ok(m.backend_path),
        (None, Some(p)) => Ok(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(json: &str) -> Result<SnapshotLoad, String> {
        let b: SnapshotLoadBody = serde_json::from_str(json).map_err(|e| e.to_string())?;
        SnapshotLoad::try_from(b).map_err(|e| e.to_string())
    }

    #[test]
    fn create_bodies() {
        let c: SnapshotCreate = serde_json::from_str(
            r#"{"snapshot_type": "Full", "snapshot_path": "s", "mem_file_path": "m", "version": "1.0.0"}"#,
        )
        .unwrap();
        let f = c.files().unwrap();
        assert_eq!(
            (f.state.to_str(), f.memory.to_str()),
            (Some("s"), Some("m"))
        );
        let c: SnapshotCreate =
            serde_json::from_str(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#).unwrap();
        assert!(c.files().is_ok());
        let c: SnapshotCreate = serde_json::from_str(
            r#"{"snapshot_type": "Diff", "snapshot_path": "s", "mem_file_path": "m"}"#,
        )
        .unwrap();
        let e = c.files().unwrap_err().to_string();
        assert!(
            e.contains("`snapshot_type` = `Diff` is not supported by Kestrel"),
            "{e}"
        );
        for bad in [
            r#"{"snapshot_path": "s"}"#,
            r#"{"snapshot_path": "s", "mem_file_path": "m", "snapshot_type": "Half"}"#,
            r#"{"snapshot_path": "s", "mem_file_path": "m", "extra": 1}"#,
        ] {
            assert!(
                serde_json::from_str::<SnapshotCreate>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn load_bodies_map_to_files_and_overrides() {
        let l = load(
            r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "File", "backend_path": "m"},
                "enable_diff_snapshots": false, "resume_vm": true,
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}],
                "vsock_override": {"uds_path": "/run/v.sock"}}"#,
        )
        .unwrap();
        assert_eq!(l.files.state, PathBuf::from("s"));
        assert_eq!(l.files.memory, PathBuf::from("m"));
        assert!(l.resume_vm);
        assert_eq!(
            l.overrides.vsock_uds_path,
            Some(PathBuf::from("/run/v.sock"))
        );
        assert_eq!(l.overrides.network_interfaces[0].iface_id, "eth0");
        assert_eq!(
            l.overrides.network_interfaces[0].host_dev_name.as_deref(),
            Some("tap9")
        );
        // The deprecated memory field; resume_vm defaults to false.
        let l = load(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#).unwrap();
        assert_eq!(
            (l.files.memory, l.resume_vm, l.overrides),
            (PathBuf::from("m"), false, RestoreOverrides::default())
        );
    }

    #[test]
    fn load_bodies_kestrel_refuses_name_the_field() {
        for (json, needle) in [
            (
                r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd", "backend_path": "u"}}"#,
                "`mem_backend.backend_type` = `Uffd` is not supported by Kestrel",
            ),
            (
                r#"{"snapshot_path": "s", "mem_file_path": "m", "enable_diff_snapshots": true}"#,
                "`enable_diff_snapshots` = `true` is not supported",
            ),
            (
                r#"{"snapshot_path": "s", "mem_file_path": "m", "track_dirty_pages": true}"#,
                "`track_dirty_pages` = `true` is not supported",
            ),
            (
                r#"{"snapshot_path": "s", "mem_file_path": "m", "clock_realtime": true}"#,
                "`clock_realtime` = `true` is not supported",
            ),
            (
                r#"{"snapshot_path": "s", "mem_file_path": "m",
                    "mem_backend": {"backend_type": "File", "backend_path": "m"}}"#,
                "either `mem_backend` or `mem_file_path`, not both",
            ),
            (
                r#"{"snapshot_path": "s"}"#,
                "either `mem_backend` or `mem_file_path` is required",
            ),
            (r#"{"mem_file_path": "m"}"#, "missing field `snapshot_path`"),
            (
                r#"{"snapshot_path": "s", "mem_file_path": "m", "network_overrides": [{"iface_id": "eth0"}]}"#,
                "missing field `host_dev_name`",
            ),
            (
                r#"{"snapshot_path": "s", "mem_file_path": "m", "resume": true}"#,
                "unknown field `resume`",
            ),
        ] {
            let e = load(json).unwrap_err();
            assert!(e.contains(needle), "{json}: {e:?} lacks {needle:?}");
        }
    }
}
