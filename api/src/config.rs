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
                format!("{} is above the supported maximum of {MAX_SUPPORTED_VCPUS}", self.vcpu_count),
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
        assert!(msg.contains("8 MiB is below the minimum of 32 MiB"), "{msg}");
    }

    #[test]
    fn missing_kernel_rejected() {
        let mut cfg = valid();
        cfg.boot_source.kernel_image_path = PathBuf::from("/nonexistent/vmlinux");
        assert_eq!(field_of(&cfg), "boot-source.kernel_image_path");
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("/nonexistent/vmlinux"), "{msg}");
        // Missing in the JSON altogether: serde names it.
        let json = r#"{"boot-source": {}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}"#;
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
