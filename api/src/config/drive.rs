//! Firecracker's `drives`: virtio-blk devices.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::*;
use crate::error::ConfigError;

/// Most drives a VM can have: each virtio-mmio device takes one of the IOAPIC pins 5 to 23.
pub const MAX_DRIVES: usize = 19;
/// Longest `drive_id`.
pub const MAX_DRIVE_ID_LEN: usize = 64;
/// Longest virtio-blk serial (the GET_ID answer holds 20 bytes).
pub const MAX_DRIVE_SERIAL_LEN: usize = 20;
/// Longest `partuuid` (a GPT UUID has 36 characters; an MBR one `xxxxxxxx-pp` 11).
pub const MAX_PARTUUID_LEN: usize = 36;

/// Whether the guest is offered a flush (Firecracker's `drives[].cache_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// No flush is offered to the guest (`VIRTIO_BLK_F_FLUSH` off): the guest believes its
    /// writes are stable once written, and the host's page cache decides when they reach the
    /// disk. Firecracker's default; fast, but a host crash can lose what the guest thought
    /// stable.
    Unsafe,
    /// Flush is offered and honoured: a guest flush (`fsync`, journal commits) is an
    /// `fdatasync` of the image before it completes. Kestrel's default, unlike Firecracker's:
    /// it is what Kestrel's virtio-blk always did, and a guest's `fsync` means what it says.
    #[default]
    Writeback,
}

/// How the drive's I/O is submitted on the host (Firecracker's `drives[].io_engine`). Kestrel
/// uses blocking system calls: only `Sync` is accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking `pread`/`pwrite` (Firecracker's default and Kestrel's only engine).
    #[default]
    Sync,
    /// io_uring. Not supported by Kestrel.
    Async,
}

/// One entry of Firecracker's `drives`: a virtio-blk device over a raw image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Unique name: 1 to 64 ASCII letters, digits, `-` and `_`.
    pub drive_id: String,
    /// The image: a regular file or a block device. Absent or `""`: an empty slot (capacity
    /// 0) that gets a file later (hot-swap).
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    /// The guest's root file system (`root=/dev/vdX` or `root=PARTUUID=...`). At most one.
    #[serde(default)]
    pub is_root_device: bool,
    /// Offer the drive read-only. Absent or `null`: read-write (Firecracker's `Option<bool>`).
    #[serde(default, deserialize_with = "null_default")]
    pub is_read_only: bool,
    /// The virtio-blk serial (GET_ID): up to 20 bytes of printable ASCII. Default: `drive_id`.
    #[serde(default)]
    pub serial: Option<String>,
    /// The root partition's PARTUUID, for `root=PARTUUID=`. Used only with `is_root_device`;
    /// on another drive it is ignored, as in Firecracker.
    #[serde(default)]
    pub partuuid: Option<String>,
    /// Token buckets for the drive's requests: bandwidth counts the bytes read or written, ops
    /// counts every request. Changeable at run time (`BlockControl::update_rate_limiter`).
    #[serde(default)]
    pub rate_limiter: Option<crate::RateLimiterConfig>,
    /// Firecracker's `cache_type`: whether the guest is offered a flush. Default `Writeback`
    /// (Firecracker's default is `Unsafe`; see [`CacheType`]).
    #[serde(default)]
    pub cache_type: CacheType,
    /// Firecracker's `io_engine`. Only `Sync` (or absent/`null`) is supported.
    #[serde(default)]
    pub io_engine: Option<IoEngine>,
    /// Firecracker's `socket`: a vhost-user-blk backend. Not supported: absent or `null` only.
    #[serde(default)]
    pub socket: Option<String>,
}

impl DriveConfig {
    /// Whether the guest is offered `VIRTIO_BLK_F_FLUSH` (and its flushes are `fdatasync`s):
    /// `cache_type` is `Writeback`.
    pub fn offers_flush(&self) -> bool {
        self.cache_type == CacheType::Writeback
    }

    /// Firecracker's fields Kestrel does not implement must hold their "not used" value.
    fn check_firecracker_only(&self, i: usize) -> Result<(), ConfigError> {
        if let Some(e) = self.io_engine.filter(|e| *e != IoEngine::Sync) {
            return Err(ConfigError::not_supported(
                format!("drives[{i}].io_engine"),
                &e,
            ));
        }
        if let Some(s) = &self.socket {
            return Err(ConfigError::not_supported(format!("drives[{i}].socket"), s));
        }
        Ok(())
    }

    /// Whether the drive starts without a file.
    pub fn is_empty_slot(&self) -> bool {
        self.path_on_host
            .as_ref()
            .is_none_or(|p| p.as_os_str().is_empty())
    }
}

impl VmConfig {
    /// Check `drives` (part of [`VmConfig::validate`]); errors name `drives[<index>].<field>`.
    pub fn validate_drives(&self) -> Result<(), ConfigError> {
        if self.drives.len() > MAX_DRIVES {
            return Err(ConfigError::invalid(
                "drives",
                format!(
                    "{} drives; at most {MAX_DRIVES} fit (one IOAPIC pin each)",
                    self.drives.len()
                ),
            ));
        }
        let mut root: Option<usize> = None;
        for (i, d) in self.drives.iter().enumerate() {
            let field = |name: &str| format!("drives[{i}].{name}");
            d.check_firecracker_only(i)?;
            let id = &d.drive_id;
            check_id(&field("drive_id"), id, MAX_DRIVE_ID_LEN)?;
            let earlier = self.drives[..i].iter().map(|o| o.drive_id.as_str());
            check_unique(&field("drive_id"), id, "drives", earlier)?;
            if d.is_root_device {
                if let Some(j) = root {
                    return Err(ConfigError::invalid(
                        field("is_root_device"),
                        format!("drives[{j}] is already the root device"),
                    ));
                }
                root = Some(i);
                if d.is_empty_slot() {
                    return Err(ConfigError::invalid(
                        field("path_on_host"),
                        "the root device needs a file",
                    ));
                }
            }
            if let Some(path) = d
                .path_on_host
                .as_ref()
                .filter(|p| !p.as_os_str().is_empty())
            {
                check_disk_image(&field("path_on_host"), path, d.is_read_only)?;
            }
            if let Some(serial) = &d.serial {
                if serial.len() > MAX_DRIVE_SERIAL_LEN {
                    return Err(ConfigError::invalid(
                        field("serial"),
                        format!(
                            "{} bytes is longer than the {MAX_DRIVE_SERIAL_LEN} virtio-blk allows",
                            serial.len()
                        ),
                    ));
                }
                if !serial.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
                    return Err(ConfigError::invalid(
                        field("serial"),
                        "must be printable ASCII",
                    ));
                }
            }
            // Only a root device's PARTUUID is used (it ends up on the kernel command line: keep
            // it to what a PARTUUID can be); Firecracker ignores it on other drives.
            if let Some(partuuid) = d.partuuid.as_ref().filter(|_| d.is_root_device) {
                if partuuid.is_empty()
                    || partuuid.len() > MAX_PARTUUID_LEN
                    || !partuuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
                {
                    return Err(ConfigError::invalid(
                        field("partuuid"),
                        format!("must be 1 to {MAX_PARTUUID_LEN} hex digits and '-'"),
                    ));
                }
            }
            if let Some(rl) = &d.rate_limiter {
                rl.validate(&field("rate_limiter"))?;
            }
        }
        Ok(())
    }
}

/// A drive's image must exist, be a regular file or a block device, and open as create opens
/// it (read-only or read-write).
fn check_disk_image(field: &str, path: &Path, read_only: bool) -> Result<(), ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() || m.file_type().is_block_device() => std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map(drop)
            .map_err(|e| {
                ConfigError::invalid(
                    field,
                    format!(
                        "cannot open {} {}: {e}",
                        path.display(),
                        if read_only { "read-only" } else { "read-write" }
                    ),
                )
            }),
        Ok(m) => Err(ConfigError::invalid(
            field,
            format!(
                "{} is {}, neither a regular file nor a block device",
                path.display(),
                file_kind(&m)
            ),
        )),
        Err(e) => Err(ConfigError::invalid(
            field,
            format!("cannot access {}: {e}", path.display()),
        )),
    }
}

#[cfg(test)]
mod drive_tests {
    use super::*;

    fn some_file() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")
    }

    fn drive(id: &str) -> DriveConfig {
        DriveConfig {
            drive_id: id.into(),
            path_on_host: Some(some_file()),
            ..DriveConfig::default()
        }
    }

    fn with(drives: Vec<DriveConfig>) -> VmConfig {
        let mut cfg = VmConfig::new(some_file(), 1, 128);
        cfg.drives = drives;
        cfg
    }

    /// The error's field and message.
    fn err(cfg: &VmConfig) -> (String, String) {
        let e = cfg.validate().expect_err("drives should be rejected");
        (e.field().expect("names a field").to_string(), e.to_string())
    }

    #[test]
    fn firecracker_drives_parse() {
        let json = format!(
            r#"{{
            "boot-source": {{"kernel_image_path": "{k}"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
            "drives": [
                {{"drive_id": "rootfs", "path_on_host": "{k}", "is_root_device": true,
                  "is_read_only": true, "partuuid": "0eaa91a0-01"}},
                {{"drive_id": "slot0", "path_on_host": "", "is_root_device": false,
                  "is_read_only": false, "serial": "KESTREL-SLOT-0"}},
                {{"drive_id": "slot1",
                  "rate_limiter": {{"bandwidth": {{"size": 1048576, "refill_time": 1000}},
                                   "ops": {{"size": 100, "one_time_burst": 50,
                                           "refill_time": 1000}}}}}}
            ]
        }}"#,
            k = some_file().display()
        );
        let cfg = VmConfig::from_json(&json).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.drives.len(), 3);
        assert!(cfg.drives[0].is_root_device && cfg.drives[0].is_read_only);
        assert!(!cfg.drives[0].is_empty_slot());
        assert!(cfg.drives[1].is_empty_slot());
        assert!(cfg.drives[2].is_empty_slot());
        assert_eq!(cfg.drives[1].serial.as_deref(), Some("KESTREL-SLOT-0"));
        let rl = cfg.drives[2].rate_limiter.unwrap();
        assert_eq!(rl.bandwidth.unwrap().size, 1_048_576);
        assert_eq!(rl.ops.unwrap().one_time_burst, Some(50));
        assert!(cfg.drives[0].rate_limiter.is_none());
        // Round trip, and no drives at all is the default.
        let back = VmConfig::from_json(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        assert!(VmConfig::new(some_file(), 1, 128).drives.is_empty());
    }

    #[test]
    fn unknown_drive_field_rejected() {
        let e = serde_json::from_str::<DriveConfig>(r#"{"drive_id": "a", "cache_typo": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `cache_typo`"), "{e}");
        let e = serde_json::from_str::<DriveConfig>(r#"{"path_on_host": "/x"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `drive_id`"), "{e}");
    }

    #[test]
    fn drive_ids_checked() {
        let (f, m) = err(&with(vec![drive("a"), drive("b"), drive("a")]));
        assert_eq!(f, "drives[2].drive_id");
        assert_eq!(m, "drives[2].drive_id: \"a\" is already used by drives[0]");
        assert_eq!(err(&with(vec![drive("")])).0, "drives[0].drive_id");
        assert_eq!(
            err(&with(vec![drive("a"), drive("bad id")])).0,
            "drives[1].drive_id"
        );
        assert_eq!(err(&with(vec![drive("dísk")])).0, "drives[0].drive_id");
        assert_eq!(
            err(&with(vec![drive(&"x".repeat(65))])).0,
            "drives[0].drive_id"
        );
        with(vec![drive(&"x".repeat(64)), drive("A-b_9")])
            .validate()
            .unwrap();
    }

    #[test]
    fn drive_rate_limiter_checked() {
        let mut d = drive("b");
        d.rate_limiter = Some(crate::RateLimiterConfig {
            bandwidth: None,
            ops: Some(crate::TokenBucketConfig {
                size: 0,
                one_time_burst: None,
                refill_time: 1000,
            }),
        });
        let (f, m) = err(&with(vec![drive("a"), d.clone()]));
        assert_eq!(f, "drives[1].rate_limiter.ops.size");
        assert!(m.starts_with("drives[1].rate_limiter.ops.size: "), "{m}");
        d.rate_limiter = Some(crate::RateLimiterConfig::default());
        with(vec![d]).validate().unwrap();
    }

    #[test]
    fn one_root_device_with_a_file() {
        let mut a = drive("a");
        a.is_root_device = true;
        let mut b = drive("b");
        b.is_root_device = true;
        let (f, m) = err(&with(vec![a.clone(), b]));
        assert_eq!(f, "drives[1].is_root_device");
        assert!(m.contains("drives[0] is already the root device"), "{m}");
        for empty in [None, Some(PathBuf::new())] {
            let mut r = drive("r");
            r.is_root_device = true;
            r.path_on_host = empty;
            assert_eq!(err(&with(vec![r])).0, "drives[0].path_on_host");
        }
        with(vec![a, drive("b")]).validate().unwrap();
    }

    #[test]
    fn paths_checked() {
        let mut d = drive("a");
        d.path_on_host = Some("/nonexistent/disk.img".into());
        let (f, m) = err(&with(vec![d]));
        assert_eq!(f, "drives[0].path_on_host");
        assert!(m.contains("/nonexistent/disk.img"), "{m}");
        let mut d = drive("a");
        d.path_on_host = Some(std::env::temp_dir());
        let (f, m) = err(&with(vec![drive("ok"), d]));
        assert_eq!(f, "drives[1].path_on_host");
        assert!(
            m.contains("neither a regular file nor a block device"),
            "{m}"
        );
        // Empty slots need no file.
        let mut d = drive("slot");
        d.path_on_host = None;
        with(vec![d]).validate().unwrap();
        // A block device is accepted when the host has one we can see.
        if let Some(dev) = ["/dev/loop0", "/dev/vda", "/dev/sda", "/dev/nvme0n1"]
            .iter()
            .find(|p| {
                use std::os::unix::fs::FileTypeExt;
                std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
            })
        {
            let mut d = drive("blk");
            d.path_on_host = Some(dev.into());
            with(vec![d]).validate().unwrap();
        }
    }

    #[test]
    fn serial_checked() {
        let mut d = drive("a");
        d.serial = Some("x".repeat(21));
        let (f, m) = err(&with(vec![d.clone()]));
        assert_eq!(f, "drives[0].serial");
        assert!(m.contains("21 bytes"), "{m}");
        d.serial = Some("bad\nserial".into());
        assert_eq!(err(&with(vec![d.clone()])).0, "drives[0].serial");
        d.serial = Some("é".into());
        assert_eq!(err(&with(vec![d.clone()])).0, "drives[0].serial");
        d.serial = Some("SERIAL 0123456789ABC".into());
        with(vec![d]).validate().unwrap();
    }

    #[test]
    fn partuuid_checked_on_root_ignored_elsewhere() {
        let mut d = drive("a");
        // Firecracker: "used only if the is_root_device field is true".
        for ignored in ["0eaa91a0-01", "", "not a partuuid"] {
            d.partuuid = Some(ignored.into());
            with(vec![d.clone()]).validate().unwrap();
        }
        d.partuuid = Some("0eaa91a0-01".into());
        d.is_root_device = true;
        with(vec![d.clone()]).validate().unwrap();
        for bad in ["", "0eaa91a0-01 init=/bin/sh", "zz"] {
            d.partuuid = Some(bad.into());
            assert_eq!(
                err(&with(vec![d.clone()])).0,
                "drives[0].partuuid",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn firecracker_drive_fields() {
        // Firecracker's own drive as its vm_config.json writes it.
        let d: DriveConfig = serde_json::from_str(
            r#"{"drive_id": "rootfs", "partuuid": null, "is_root_device": true,
                "cache_type": "Unsafe", "is_read_only": null, "path_on_host": "r.ext4",
                "io_engine": "Sync", "rate_limiter": null, "socket": null}"#,
        )
        .unwrap();
        assert_eq!(d.cache_type, CacheType::Unsafe);
        assert!(!d.offers_flush());
        assert!(!d.is_read_only, "null is read-write");
        assert_eq!(d.io_engine, Some(IoEngine::Sync));
        // Kestrel's default keeps the flush it always offered.
        let d: DriveConfig = serde_json::from_str(r#"{"drive_id": "a"}"#).unwrap();
        assert_eq!(d.cache_type, CacheType::Writeback);
        assert!(d.offers_flush());
        assert_eq!(DriveConfig::default().cache_type, CacheType::Writeback);
        let d: DriveConfig =
            serde_json::from_str(r#"{"drive_id": "a", "cache_type": "Writeback"}"#).unwrap();
        assert!(d.offers_flush());
        for bad in [
            r#"{"drive_id": "a", "cache_type": "writeback"}"#,
            r#"{"drive_id": "a", "io_engine": "Uring"}"#,
            r#"{"drive_id": "a", "is_read_only": "yes"}"#,
        ] {
            assert!(serde_json::from_str::<DriveConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unsupported_drive_fields_refused_by_name() {
        let mut d = drive("a");
        d.io_engine = Some(IoEngine::Async);
        let (f, m) = err(&with(vec![drive("z"), d.clone()]));
        assert_eq!(f, "drives[1].io_engine");
        assert_eq!(
            m,
            "Firecracker's `drives[1].io_engine` = `Async` is not supported by Kestrel"
        );
        d.io_engine = Some(IoEngine::Sync);
        d.socket = Some("/run/vhost-user-blk.sock".into());
        let (f, m) = err(&with(vec![d.clone()]));
        assert_eq!(f, "drives[0].socket");
        assert!(
            m.contains("`/run/vhost-user-blk.sock` is not supported"),
            "{m}"
        );
        d.socket = None;
        with(vec![d]).validate().unwrap();
    }

    #[test]
    fn at_most_19_drives() {
        let mut drives: Vec<DriveConfig> =
            (0..MAX_DRIVES).map(|i| drive(&format!("d{i}"))).collect();
        with(drives.clone()).validate().unwrap();
        drives.push(drive("one-too-many"));
        let (f, m) = err(&with(drives));
        assert_eq!(f, "drives");
        assert!(m.contains("20 drives"), "{m}");
    }

    #[test]
    fn drives_checked_after_the_rest() {
        // validate() reaches the drives only when everything else is valid, and does reach them.
        let mut cfg = with(vec![drive("")]);
        cfg.machine_config.vcpu_count = 0;
        assert_eq!(err(&cfg).0, "machine-config.vcpu_count");
        cfg.machine_config.vcpu_count = 1;
        assert_eq!(err(&cfg).0, "drives[0].drive_id");
    }
}
