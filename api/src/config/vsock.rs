//! Firecracker's `vsock` section: hybrid vsock over a Unix socket.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Longest Unix socket path the kernel takes (`sun_path` holds 108 bytes with the NUL).
pub const MAX_UDS_PATH_LEN: usize = 107;

/// Firecracker's `vsock` section: a virtio-vsock device whose host side is a Unix socket
/// ("hybrid vsock"). Host programs connect to `uds_path` and write `CONNECT <port>\n`; guest
/// connections to the host (CID 2) port `P` are forwarded to `<uds_path>_P`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or above).
    pub guest_cid: u32,
    /// Where the device's Unix listener is created. Must not exist yet; its directory must.
    pub uds_path: PathBuf,
    /// Firecracker's device id; accepted for compatibility and otherwise unused.
    #[serde(default)]
    pub vsock_id: Option<String>,
}

impl VsockConfig {
    /// See [`crate::VmConfig::validate`]. The socket path is checked, not created.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < 3 || self.guest_cid == u32::MAX {
            return Err(ConfigError::invalid(
                "vsock.guest_cid",
                format!(
                    "{} is reserved: guest CIDs are 3 to {}",
                    self.guest_cid,
                    u32::MAX - 1
                ),
            ));
        }
        let path = &self.uds_path;
        let len = path.as_os_str().len();
        if len == 0 {
            return Err(ConfigError::invalid("vsock.uds_path", "must not be empty"));
        }
        if len > MAX_UDS_PATH_LEN {
            return Err(ConfigError::invalid(
                "vsock.uds_path",
                format!(
                    "{len} bytes is longer than the {MAX_UDS_PATH_LEN} a Unix socket path can hold"
                ),
            ));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(ConfigError::invalid(
                    "vsock.uds_path",
                    format!("directory {} does not exist", dir.display()),
                ));
            }
        }
        // symlink_metadata: a dangling symlink also occupies the name.
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(ConfigError::invalid(
                "vsock.uds_path",
                format!(
                    "{} already exists (a stale socket of an earlier VM?)",
                    path.display()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod vsock_tests {
    use super::*;
    use crate::VmConfig;

    fn kernel_file() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")
    }

    fn tmp_dir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("kestrel-api-vsock-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn vsock(path: PathBuf) -> VsockConfig {
        VsockConfig {
            guest_cid: 3,
            uds_path: path,
            vsock_id: None,
        }
    }

    fn field(v: &VsockConfig) -> String {
        v.validate().unwrap_err().field().unwrap().to_string()
    }

    #[test]
    fn firecracker_vsock_section_parses_and_validates() {
        let dir = tmp_dir("parse");
        let sock = dir.join("v.sock");
        let json = format!(
            r#"{{
            "boot-source": {{"kernel_image_path": "{}"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
            "vsock": {{"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "{}"}}
        }}"#,
            kernel_file().display(),
            sock.display()
        );
        let cfg = VmConfig::from_json(&json).unwrap();
        let v = cfg.vsock.as_ref().unwrap();
        assert_eq!(v.guest_cid, 3);
        assert_eq!(v.uds_path, sock);
        assert_eq!(v.vsock_id.as_deref(), Some("vsock0"));
        cfg.validate().unwrap();
        // vsock_id is optional; unknown fields are not.
        let v: VsockConfig =
            serde_json::from_str(r#"{"guest_cid": 5, "uds_path": "v.sock"}"#).unwrap();
        assert_eq!(v.vsock_id, None);
        let err = serde_json::from_str::<VsockConfig>(
            r#"{"guest_cid": 5, "uds_path": "v.sock", "cid": 1}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `cid`"), "{err}");
        // Absent section: no device.
        assert_eq!(VmConfig::new(kernel_file(), 1, 128).vsock, None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn guest_cid_range() {
        let dir = tmp_dir("cid");
        let mut v = vsock(dir.join("v.sock"));
        for bad in [0, 1, 2, u32::MAX] {
            v.guest_cid = bad;
            assert_eq!(field(&v), "vsock.guest_cid", "cid {bad}");
        }
        for good in [3, 42, u32::MAX - 1] {
            v.guest_cid = good;
            v.validate().unwrap();
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn uds_path_checked() {
        let dir = tmp_dir("path");
        assert_eq!(field(&vsock(PathBuf::new())), "vsock.uds_path");
        let msg = vsock(PathBuf::from("/nonexistent-dir/v.sock"))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("vsock.uds_path: directory /nonexistent-dir"),
            "{msg}"
        );
        // Too long for sun_path.
        let long = dir.join("x".repeat(MAX_UDS_PATH_LEN));
        let msg = vsock(long).validate().unwrap_err().to_string();
        assert!(msg.contains("longer than the 107"), "{msg}");
        // Already exists (a leftover socket or any file).
        let taken = dir.join("taken.sock");
        std::fs::write(&taken, b"").unwrap();
        let msg = vsock(taken).validate().unwrap_err().to_string();
        assert!(
            msg.starts_with("vsock.uds_path:") && msg.contains("already exists"),
            "{msg}"
        );
        // A relative path in the current directory is fine (its parent is "").
        vsock(PathBuf::from("kestrel-never-created.sock"))
            .validate()
            .unwrap();
        // Validation creates nothing.
        let fresh = dir.join("fresh.sock");
        vsock(fresh.clone()).validate().unwrap();
        assert!(!fresh.exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn vm_config_validate_checks_vsock() {
        let mut cfg = VmConfig::new(kernel_file(), 1, 128);
        cfg.vsock = Some(vsock(PathBuf::from("/nonexistent-dir/v.sock")));
        assert_eq!(cfg.validate().unwrap_err().field(), Some("vsock.uds_path"));
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains("\"vsock\""), "{json}");
        assert_eq!(VmConfig::from_json(&json).unwrap(), cfg);
    }
}
