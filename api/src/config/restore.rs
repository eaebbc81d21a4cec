//! Per-clone overrides for restoring a snapshot: what must differ between VMs restored from
//! one snapshot (a name, host paths, TAP devices). Everything else comes from the snapshot.
//!
//! The JSON shape (the `kestrel restore --overrides` file):
//! ```json
//! { "name": "clone-1", "vsock_uds_path": "/run/clone-1.vsock",
//!   "network_interfaces": [ { "iface_id": "eth0", "host_dev_name": "tap1" } ],
//!   "drives": [ { "drive_id": "data", "path_on_host": "/srv/clone-1.img" } ],
//!   "fs": [ { "tag": "share", "shared_dir": "/srv/clone-1" } ] }
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::VmConfig;
use crate::ConfigError;

/// What a restored VM changes against the snapshot's configuration. Every field is optional;
/// an entry naming a device the snapshot does not have is an error naming the field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreOverrides {
    /// The VM's name (thread names, logs); default: the snapshot's.
    #[serde(default)]
    pub name: Option<String>,
    /// The vsock device's host listener (`vsock.uds_path`): every clone needs its own.
    #[serde(default)]
    pub vsock_uds_path: Option<PathBuf>,
    /// Network interfaces by `iface_id`.
    #[serde(default)]
    pub network_interfaces: Vec<NetOverride>,
    /// Drives by `drive_id`.
    #[serde(default)]
    pub drives: Vec<DriveOverride>,
    /// virtio-fs shares by `tag`.
    #[serde(default)]
    pub fs: Vec<FsOverride>,
}

/// A network interface's host side for the restored VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetOverride {
    /// The interface (`network-interfaces[].iface_id`).
    pub iface_id: String,
    /// The TAP device to use instead of the snapshot's.
    #[serde(default)]
    pub host_dev_name: Option<String>,
    /// The MAC address the device reports from now on. The guest driver read the old one
    /// when it probed the device; the guest must set the new one on its interface itself
    /// (the sandbox layer does that through the agent).
    #[serde(default)]
    pub guest_mac: Option<String>,
}

/// A drive's backing file for the restored VM (the same capacity as the snapshot's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    /// The drive (`drives[].drive_id`).
    pub drive_id: String,
    /// The file to use instead of the snapshot's.
    pub path_on_host: PathBuf,
}

/// A virtio-fs share's host directory for the restored VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsOverride {
    /// The share (`fs[].tag`).
    pub tag: String,
    /// The directory to serve instead of the snapshot's.
    pub shared_dir: PathBuf,
}

impl RestoreOverrides {
    /// Parse overrides from JSON (unknown fields are errors).
    ///
    /// # Errors
    /// [`ConfigError::Parse`] with serde's message.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        Ok(serde_json::from_str(json)?)
    }

    /// `config` (a snapshot's) with these overrides applied, then validated as a whole (the
    /// new paths and names are checked like a fresh configuration's).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the override (`overrides.drives[0].drive_id`, ...) when
    /// it names a device the configuration does not have, or the field of the resulting
    /// configuration that does not validate.
    pub fn apply(&self, config: &VmConfig) -> Result<VmConfig, ConfigError> {
        let mut c = config.clone();
        if let Some(name) = &self.name {
            c.kestrel.name = Some(name.clone());
        }
        if let Some(path) = &self.vsock_uds_path {
            let v = c.vsock.as_mut().ok_or_else(|| {
                ConfigError::invalid(
                    "overrides.vsock_uds_path",
                    "the snapshot's VM has no vsock device",
                )
            })?;
            v.uds_path = path.clone();
        }
        for (i, o) in self.network_interfaces.iter().enumerate() {
            let field = format!("overrides.network_interfaces[{i}].iface_id");
            let n = c
                .network_interfaces
                .iter_mut()
                .find(|n| n.iface_id == o.iface_id)
                .ok_or_else(|| unknown(field, "interface", &o.iface_id))?;
            if let Some(tap) = &o.host_dev_name {
                n.host_dev_name = Some(tap.clone());
            }
            if let Some(mac) = &o.guest_mac {
                n.guest_mac = Some(mac.clone());
            }
        }
        for (i, o) in self.drives.iter().enumerate() {
            let field = format!("overrides.drives[{i}].drive_id");
            let d = c
                .drives
                .iter_mut()
                .find(|d| d.drive_id == o.drive_id)
                .ok_or_else(|| unknown(field, "drive", &o.drive_id))?;
            d.path_on_host = Some(o.path_on_host.clone());
        }
        for (i, o) in self.fs.iter().enumerate() {
            let field = format!("overrides.fs[{i}].tag");
            let f =
                c.fs.iter_mut()
                    .find(|f| f.tag == o.tag)
                    .ok_or_else(|| unknown(field, "virtio-fs share", &o.tag))?;
            if f.socket.is_some() {
                return Err(ConfigError::invalid(
                    format!("overrides.fs[{i}].shared_dir"),
                    format!(
                        "share {:?} is served by a vhost-user daemon, not a directory",
                        o.tag
                    ),
                ));
            }
            f.shared_dir = Some(o.shared_dir.clone());
        }
        c.validate()?;
        Ok(c)
    }
}

fn unknown(field: String, what: &str, id: &str) -> ConfigError {
    ConfigError::invalid(field, format!("the snapshot's VM has no {what} {id:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        let mut c = VmConfig::new("/nonexistent-kernel", 1, 128);
        c.drives.push(crate::DriveConfig {
            drive_id: "data".into(),
            ..Default::default()
        });
        c.network_interfaces.push(crate::NetConfig {
            iface_id: "eth0".into(),
            ..Default::default()
        });
        c
    }

    #[test]
    fn unknown_devices_are_named() {
        let c = config();
        let o =
            RestoreOverrides::from_json(r#"{"drives":[{"drive_id":"nope","path_on_host":"/x"}]}"#)
                .unwrap();
        let e = o.apply(&c).unwrap_err();
        assert_eq!(e.field(), Some("overrides.drives[0].drive_id"));
        assert!(e.to_string().contains("\"nope\""), "{e}");
        let o = RestoreOverrides {
            network_interfaces: vec![NetOverride {
                iface_id: "eth9".into(),
                host_dev_name: Some("tap9".into()),
                guest_mac: None,
            }],
            ..Default::default()
        };
        let e = o.apply(&c).unwrap_err();
        assert_eq!(e.field(), Some("overrides.network_interfaces[0].iface_id"));
        let o = RestoreOverrides {
            vsock_uds_path: Some("/tmp/x.vsock".into()),
            ..Default::default()
        };
        let e = o.apply(&c).unwrap_err();
        assert_eq!(e.field(), Some("overrides.vsock_uds_path"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = RestoreOverrides::from_json(r#"{"nmae":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("nmae"), "{e}");
    }

    #[test]
    fn overrides_replace_only_what_they_name() {
        let mut c = config();
        c.network_interfaces[0].host_dev_name = Some("tap0".into());
        let o = RestoreOverrides {
            name: Some("clone-1".into()),
            network_interfaces: vec![NetOverride {
                iface_id: "eth0".into(),
                host_dev_name: Some("tap1".into()),
                guest_mac: Some("02:00:00:00:00:09".into()),
            }],
            ..Default::default()
        };
        // The kernel does not exist, so validation fails on it: the override itself applied.
        let e = o.apply(&c).unwrap_err();
        assert_eq!(e.field(), Some("boot-source.kernel_image_path"), "{e}");
    }
}
