//! The VM configuration (`--config-file` JSON shape).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Smallest boot RAM Kestrel accepts, in MiB.
pub const MIN_MEM_SIZE_MIB: u64 = 32;
/// Largest boot RAM Kestrel accepts, in MiB (1 TiB).
pub const MAX_MEM_SIZE_MIB: u64 = 1 << 20;
/// Largest number of vCPUs the MP table can describe (APIC ids 0..=253; 254 is the IOAPIC).
pub const MAX_SUPPORTED_VCPUS: u32 = 254;
/// Largest kernel command line the x86_64 boot protocol takes (bytes, without the NUL).
pub const MAX_CMDLINE_LEN: usize = 2047;

/// A whole VM: what the `kestrel` binary reads with `--config` and what a runtime passes to
/// `kestrel_vmm::Vm::create`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel, command line and initrd.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// vCPUs and memory.
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfig,
    /// Firecracker's `drives`: virtio-blk devices, in order. A drive without a file is an empty
    /// slot a file can be attached to at run time.
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// Firecracker's `vsock`: a virtio-vsock device with hybrid vsock over Unix sockets.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Where the guest's serial console goes (Kestrel section).
    #[serde(default)]
    pub serial: SerialConfig,
    /// Host-side knobs that are not about the guest (Kestrel section).
    #[serde(default)]
    pub kestrel: KestrelOptions,
}

/// Firecracker's `boot-source`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Uncompressed ELF `vmlinux` or a bzImage.
    pub kernel_image_path: PathBuf,
    /// Kernel command line. Kestrel appends what the machine needs (`maxcpus=`, devices).
    /// When absent: `console=ttyS0 reboot=k panic=1`.
    #[serde(default)]
    pub boot_args: Option<String>,
    /// Optional initrd / initramfs (uncompressed cpio recommended).
    #[serde(default)]
    pub initrd_path: Option<PathBuf>,
}

/// Firecracker's `machine-config`, plus Kestrel's hotplug limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs online at boot.
    pub vcpu_count: u32,
    /// Boot RAM in MiB.
    pub mem_size_mib: u64,
    /// Firecracker's SMT flag. Kestrel presents one thread per core; `true` is rejected.
    #[serde(default)]
    pub smt: bool,
    /// vCPUs the guest can ever have (listed in the MP table, offline until hot-added).
    /// Absent or 0: the host's CPU count, never below `vcpu_count`.
    #[serde(default)]
    pub max_vcpus: Option<u32>,
    /// Largest RAM the VM may grow to by hotplug, in MiB. Absent: no memory hotplug.
    #[serde(default)]
    pub max_mem_size_mib: Option<u64>,
}

/// Where the serial console's output goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialOutput {
    /// The process's standard output (the binary's default).
    #[default]
    Stdout,
    /// Appended to `serial.path`.
    File,
    /// Discarded.
    None,
}

/// Kestrel's `serial` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Output sink.
    #[serde(default)]
    pub output: SerialOutput,
    /// File for `output: "file"`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Forward the process's standard input to the guest console.
    #[serde(default)]
    pub stdin: bool,
}

/// Whether to add the guest command-line switches that a software (nested) KVM needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestCompat {
    /// Add them only when the host's KVM is a software implementation (no VT-x/AMD-V visible).
    #[default]
    Auto,
    /// Always add them.
    Always,
    /// Never add them.
    Never,
}

/// Kestrel's `kestrel` section: host-side options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KestrelOptions {
    /// A short name used in thread names (`kestrel-<name>-vcpu0`) and logs. Default: `vm`.
    #[serde(default)]
    pub name: Option<String>,
    /// Guest command-line compatibility switches for software KVM (see docs/nested-kvm.md).
    #[serde(default)]
    pub guest_compat: GuestCompat,
}

impl VmConfig {
    /// Parse a JSON document. Unknown fields are errors.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        Ok(serde_json::from_str(json)?)
    }

    /// Read and parse a JSON file (does not validate; call [`VmConfig::validate`]).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// A minimal configuration: `vcpu_count` vCPUs, `mem_size_mib` MiB, the given kernel.
    pub fn new(kernel: impl Into<PathBuf>, vcpu_count: u32, mem_size_mib: u64) -> Self {
        VmConfig {
            boot_source: BootSource {
                kernel_image_path: kernel.into(),
                boot_args: None,
                initrd_path: None,
            },
            machine_config: MachineConfig {
                vcpu_count,
                mem_size_mib,
                smt: false,
                max_vcpus: None,
                max_mem_size_mib: None,
            },
            serial: SerialConfig::default(),
            kestrel: KestrelOptions::default(),
            drives: Vec::new(),
            vsock: None,
        }
    }

    /// The VM's short name (thread names, logs).
    pub fn name(&self) -> &str {
        self.kestrel.name.as_deref().unwrap_or("vm")
    }

    /// Check every field. Touches the file system only to check that paths exist; creates
    /// nothing. The error names the first offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.boot_source.validate()?;
        self.machine_config.validate()?;
        self.serial.validate()?;
        self.kestrel.validate()?;
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        self.validate_drives()?;
        Ok(())
    }
}

fn check_file(field: &str, path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ConfigError::invalid(field, "must not be empty"));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::invalid(
            field,
            format!("{} is not a regular file", path.display()),
        )),
        Err(e) => Err(ConfigError::invalid(
            field,
            format!("cannot access {}: {e}", path.display()),
        )),
    }
}

impl BootSource {
    /// See [`VmConfig::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_file("boot-source.kernel_image_path", &self.kernel_image_path)?;
        if let Some(initrd) = &self.initrd_path {
            check_file("boot-source.initrd_path", initrd)?;
        }
        if let Some(args) = &self.boot_args {
            if args.len() > MAX_CMDLINE_LEN {
                return Err(ConfigError::invalid(
                    "boot-source.boot_args",
                    format!(
                        "{} bytes is longer than the {MAX_CMDLINE_LEN} the boot protocol allows",
                        args.len()
                    ),
                ));
            }
            if args.bytes().any(|b| b == 0 || !b.is_ascii()) {
                return Err(ConfigError::invalid(
                    "boot-source.boot_args",
                    "must be printable ASCII without NUL bytes",
                ));
            }
        }
        Ok(())
    }
}

impl MachineConfig {
    /// See [`VmConfig::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpu_count == 0 {
            return Err(ConfigError::invalid(
                "machine-config.vcpu_count",
                "must be at least 1",
            ));
        }
        if self.vcpu_count > MAX_SUPPORTED_VCPUS {
            return Err(ConfigError::invalid(
                "machine-config.vcpu_count",
                format!(
                    "{} is above the supported maximum of {MAX_SUPPORTED_VCPUS}",
                    self.vcpu_count
                ),
            ));
        }
        if self.smt {
            return Err(ConfigError::invalid(
                "machine-config.smt",
                "SMT is not supported: Kestrel presents one thread per core",
            ));
        }
        if let Some(max) = self.max_vcpus {
            if max != 0 && max < self.vcpu_count {
                return Err(ConfigError::invalid(
                    "machine-config.max_vcpus",
                    format!("{max} is below vcpu_count {}", self.vcpu_count),
                ));
            }
            if max > MAX_SUPPORTED_VCPUS {
                return Err(ConfigError::invalid(
                    "machine-config.max_vcpus",
                    format!("{max} is above the supported maximum of {MAX_SUPPORTED_VCPUS}"),
                ));
            }
        }
        if self.mem_size_mib < MIN_MEM_SIZE_MIB {
            return Err(ConfigError::invalid(
                "machine-config.mem_size_mib",
                format!(
                    "{} MiB is below the minimum of {MIN_MEM_SIZE_MIB} MiB",
                    self.mem_size_mib
                ),
            ));
        }
        if self.mem_size_mib > MAX_MEM_SIZE_MIB {
            return Err(ConfigError::invalid(
                "machine-config.mem_size_mib",
                format!(
                    "{} MiB is above the maximum of {MAX_MEM_SIZE_MIB} MiB",
                    self.mem_size_mib
                ),
            ));
        }
        if let Some(max) = self.max_mem_size_mib {
            if max < self.mem_size_mib {
                return Err(ConfigError::invalid(
                    "machine-config.max_mem_size_mib",
                    format!("{max} MiB is below mem_size_mib {}", self.mem_size_mib),
                ));
            }
            if max > MAX_MEM_SIZE_MIB {
                return Err(ConfigError::invalid(
                    "machine-config.max_mem_size_mib",
                    format!("{max} MiB is above the maximum of {MAX_MEM_SIZE_MIB} MiB"),
                ));
            }
        }
        Ok(())
    }
}

impl SerialConfig {
    /// See [`VmConfig::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        match (&self.output, &self.path) {
            (SerialOutput::File, None) => Err(ConfigError::invalid(
                "serial.path",
                "is required when serial.output is \"file\"",
            )),
            (SerialOutput::File, Some(p)) if p.as_os_str().is_empty() => {
                Err(ConfigError::invalid("serial.path", "must not be empty"))
            }
            (SerialOutput::File, Some(p)) => {
                let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
                match parent {
                    Some(d) if !d.is_dir() => Err(ConfigError::invalid(
                        "serial.path",
                        format!("directory {} does not exist", d.display()),
                    )),
                    _ => Ok(()),
                }
            }
            (_, Some(_)) => Err(ConfigError::invalid(
                "serial.path",
                "is only used with serial.output \"file\"",
            )),
            _ => Ok(()),
        }
    }
}

impl KestrelOptions {
    /// See [`VmConfig::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(name) = &self.name {
            // Linux thread names hold 15 bytes; `kestrel-<name>-vcpuNNN` must stay readable.
            if name.is_empty() || name.len() > 16 {
                return Err(ConfigError::invalid(
                    "kestrel.name",
                    "must be 1 to 16 characters",
                ));
            }
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError::invalid(
                    "kestrel.name",
                    "may hold only ASCII letters, digits, '-' and '_'",
                ));
            }
        }
        Ok(())
    }
}

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
    /// See [`VmConfig::validate`]. The socket path is checked, not created.
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
mod tests {
    use super::*;

    fn kernel_file() -> PathBuf {
        // Any regular file passes the existence check.
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")
    }

    fn valid() -> VmConfig {
        VmConfig::new(kernel_file(), 1, 128)
    }

    fn field_of(cfg: &VmConfig) -> String {
        cfg.validate()
            .expect_err("config should be rejected")
            .field()
            .expect("error names a field")
            .to_string()
    }

    #[test]
    fn firecracker_shape_parses() {
        let json = format!(
            r#"{{
            "boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}},
            "machine-config": {{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}}
        }}"#,
            kernel_file().display()
        );
        let cfg = VmConfig::from_json(&json).unwrap();
        assert_eq!(cfg.machine_config.vcpu_count, 2);
        assert_eq!(cfg.machine_config.mem_size_mib, 256);
        assert_eq!(cfg.boot_source.boot_args.as_deref(), Some("console=ttyS0"));
        assert_eq!(cfg.serial.output, SerialOutput::Stdout);
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_field_is_named() {
        let json = r#"{
            "boot-source": {"kernel_image_path": "/k", "bogus_field": 1},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}
        }"#;
        let err = VmConfig::from_json(json).unwrap_err().to_string();
        assert!(err.contains("unknown field `bogus_field`"), "{err}");
        let json = r#"{
            "boot-source": {"kernel_image_path": "/k"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
            "drivez": []
        }"#;
        let err = VmConfig::from_json(json).unwrap_err().to_string();
        assert!(err.contains("unknown field `drivez`"), "{err}");
    }

    #[test]
    fn zero_vcpus_rejected() {
        let mut cfg = valid();
        cfg.machine_config.vcpu_count = 0;
        assert_eq!(field_of(&cfg), "machine-config.vcpu_count");
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("at least 1"), "{msg}");
    }

    #[test]
    fn memory_below_minimum_rejected() {
        let mut cfg = valid();
        cfg.machine_config.mem_size_mib = 8;
        assert_eq!(field_of(&cfg), "machine-config.mem_size_mib");
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(
            msg.contains("8 MiB is below the minimum of 32 MiB"),
            "{msg}"
        );
    }

    #[test]
    fn missing_kernel_rejected() {
        let mut cfg = valid();
        cfg.boot_source.kernel_image_path = PathBuf::from("/nonexistent/vmlinux");
        assert_eq!(field_of(&cfg), "boot-source.kernel_image_path");
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("/nonexistent/vmlinux"), "{msg}");
        // Missing in the JSON altogether: serde names it.
        let json =
            r#"{"boot-source": {}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}"#;
        let err = VmConfig::from_json(json).unwrap_err().to_string();
        assert!(err.contains("missing field `kernel_image_path`"), "{err}");
        cfg.boot_source.kernel_image_path = PathBuf::new();
        assert_eq!(field_of(&cfg), "boot-source.kernel_image_path");
    }

    #[test]
    fn missing_initrd_rejected() {
        let mut cfg = valid();
        cfg.boot_source.initrd_path = Some("/nonexistent/initrd".into());
        assert_eq!(field_of(&cfg), "boot-source.initrd_path");
    }

    #[test]
    fn vcpu_limits() {
        let mut cfg = valid();
        cfg.machine_config.vcpu_count = 4;
        cfg.machine_config.max_vcpus = Some(2);
        assert_eq!(field_of(&cfg), "machine-config.max_vcpus");
        cfg.machine_config.max_vcpus = Some(0);
        cfg.validate().unwrap();
        cfg.machine_config.max_vcpus = Some(255);
        assert_eq!(field_of(&cfg), "machine-config.max_vcpus");
        cfg.machine_config.max_vcpus = None;
        cfg.machine_config.vcpu_count = 300;
        assert_eq!(field_of(&cfg), "machine-config.vcpu_count");
        cfg.machine_config.vcpu_count = 1;
        cfg.machine_config.smt = true;
        assert_eq!(field_of(&cfg), "machine-config.smt");
    }

    #[test]
    fn memory_limits() {
        let mut cfg = valid();
        cfg.machine_config.max_mem_size_mib = Some(64);
        assert_eq!(field_of(&cfg), "machine-config.max_mem_size_mib");
        cfg.machine_config.max_mem_size_mib = Some(1024);
        cfg.validate().unwrap();
        cfg.machine_config.mem_size_mib = MAX_MEM_SIZE_MIB + 1;
        assert_eq!(field_of(&cfg), "machine-config.mem_size_mib");
    }

    #[test]
    fn boot_args_checked() {
        let mut cfg = valid();
        cfg.boot_source.boot_args = Some("x".repeat(MAX_CMDLINE_LEN + 1));
        assert_eq!(field_of(&cfg), "boot-source.boot_args");
        cfg.boot_source.boot_args = Some("console=ttyS0\0".into());
        assert_eq!(field_of(&cfg), "boot-source.boot_args");
    }

    #[test]
    fn serial_checked() {
        let mut cfg = valid();
        cfg.serial.output = SerialOutput::File;
        assert_eq!(field_of(&cfg), "serial.path");
        cfg.serial.path = Some("/nonexistent-dir/console.log".into());
        assert_eq!(field_of(&cfg), "serial.path");
        cfg.serial.path = Some("/tmp/console.log".into());
        cfg.validate().unwrap();
        cfg.serial.output = SerialOutput::None;
        assert_eq!(field_of(&cfg), "serial.path");
        let json = r#"{"boot-source": {"kernel_image_path": "/k"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
            "serial": {"output": "printer"}}"#;
        let err = VmConfig::from_json(json).unwrap_err().to_string();
        assert!(err.contains("unknown variant `printer`"), "{err}");
    }

    #[test]
    fn name_checked() {
        let mut cfg = valid();
        cfg.kestrel.name = Some("bad name".into());
        assert_eq!(field_of(&cfg), "kestrel.name");
        cfg.kestrel.name = Some("pod-1".into());
        cfg.validate().unwrap();
        assert_eq!(cfg.name(), "pod-1");
    }

    #[test]
    fn round_trip() {
        let mut cfg = valid();
        cfg.machine_config.max_vcpus = Some(4);
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains("\"machine-config\""));
        assert_eq!(VmConfig::from_json(&json).unwrap(), cfg);
    }
}

#[cfg(test)]
mod vsock_tests {
    use super::*;

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

/// Most drives a VM can have: each virtio-mmio device takes one of the IOAPIC pins 5 to 23.
pub const MAX_DRIVES: usize = 19;
/// Longest `drive_id`.
pub const MAX_DRIVE_ID_LEN: usize = 64;
/// Longest virtio-blk serial (the GET_ID answer holds 20 bytes).
pub const MAX_DRIVE_SERIAL_LEN: usize = 20;
/// Longest `partuuid` (a GPT UUID has 36 characters; an MBR one `xxxxxxxx-pp` 11).
pub const MAX_PARTUUID_LEN: usize = 36;

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
    /// Offer the drive read-only.
    #[serde(default)]
    pub is_read_only: bool,
    /// The virtio-blk serial (GET_ID): up to 20 bytes of printable ASCII. Default: `drive_id`.
    #[serde(default)]
    pub serial: Option<String>,
    /// The root partition's PARTUUID, for `root=PARTUUID=`; only with `is_root_device`.
    #[serde(default)]
    pub partuuid: Option<String>,
}

impl DriveConfig {
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
            let id = &d.drive_id;
            if id.is_empty() || id.len() > MAX_DRIVE_ID_LEN {
                return Err(ConfigError::invalid(
                    field("drive_id"),
                    format!("must be 1 to {MAX_DRIVE_ID_LEN} characters"),
                ));
            }
            if !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError::invalid(
                    field("drive_id"),
                    "may hold only ASCII letters, digits, '-' and '_'",
                ));
            }
            if let Some(j) = self.drives[..i].iter().position(|o| o.drive_id == *id) {
                return Err(ConfigError::invalid(
                    field("drive_id"),
                    format!("duplicate of drives[{j}]"),
                ));
            }
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
                check_disk_image(&field("path_on_host"), path)?;
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
            if let Some(partuuid) = &d.partuuid {
                if !d.is_root_device {
                    return Err(ConfigError::invalid(
                        field("partuuid"),
                        "is only used with is_root_device",
                    ));
                }
                // It ends up on the kernel command line: keep it to what a PARTUUID can be.
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
        }
        Ok(())
    }
}

/// A drive's image must exist and be a regular file or a block device.
fn check_disk_image(field: &str, path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() || m.file_type().is_block_device() => Ok(()),
        Ok(_) => Err(ConfigError::invalid(
            field,
            format!(
                "{} is neither a regular file nor a block device",
                path.display()
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
                {{"drive_id": "slot1"}}
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
        assert_eq!(m, "drives[2].drive_id: duplicate of drives[0]");
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
    fn partuuid_only_on_root() {
        let mut d = drive("a");
        d.partuuid = Some("0eaa91a0-01".into());
        assert_eq!(err(&with(vec![d.clone()])).0, "drives[0].partuuid");
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
