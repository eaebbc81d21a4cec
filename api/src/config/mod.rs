//! The VM configuration (`--config-file` JSON shape): [`VmConfig`] and one module per
//! section, each with its types, limits, validation and tests.

mod boot;
mod de;
mod drive;
mod files;
mod fs;
mod kestrel;
mod logger;
mod machine;
mod metrics;
mod net;
mod restore;
mod serial;
#[cfg(test)]
mod tests;
mod unsupported;
mod vsock;

pub use boot::*;
use de::*;
pub use drive::*;
use files::*;
pub use fs::*;
pub use kestrel::*;
pub use logger::*;
pub use machine::*;
pub use metrics::*;
pub use net::*;
pub use restore::*;
pub use serial::*;
pub use unsupported::*;
pub use vsock::*;

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
/// Largest configuration file [`VmConfig::from_file`] reads (1 MiB; real ones are a few KiB).
pub const MAX_CONFIG_FILE_LEN: u64 = 1 << 20;
/// Command-line bytes Kestrel may append to `boot_args` besides one `virtio_mmio.device=` per
/// device: `root=PARTUUID=<36> rw`, `maxcpus=NNN`, the software-KVM switches and
/// `cpuhp.parallel=0` (148 bytes with separators, rounded up).
pub const CMDLINE_RESERVED_LEN: usize = 160;
/// Command-line bytes Kestrel appends per virtio device (`virtio_mmio.device=4K@0x........:NN`
/// and a separator: 36, rounded up).
pub const CMDLINE_RESERVED_PER_DEVICE: usize = 40;

/// The device id of the `index`-th virtio-fs share (`fs<index>`): shares are reached by
/// position, since their tags need not be valid ids.
pub fn fs_device_id(index: usize) -> String {
    format!("fs{index}")
}

/// A whole VM: what the `kestrel` binary reads with `--config` (or Firecracker's
/// `--config-file`) and what a runtime passes to `kestrel_vmm::Vm::create`.
///
/// Every Firecracker section is accepted in Firecracker's shape. Sections and fields Kestrel
/// does not implement mean "not used" when absent, `null`, empty or at Firecracker's default,
/// and [`VmConfig::validate`] refuses any other value with [`ConfigError::NotSupported`].
/// Sections that are lists or have defaults (`machine-config`, `drives`, ...) also take `null`
/// for "absent".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel, command line and initrd.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// vCPUs and memory. Absent or `null`: Firecracker's 1 vCPU and 128 MiB.
    #[serde(default, rename = "machine-config", deserialize_with = "null_default")]
    pub machine_config: MachineConfig,
    /// Firecracker's `drives`: virtio-blk devices, in order. A drive without a file is an empty
    /// slot a file can be attached to at run time.
    #[serde(default, deserialize_with = "null_default")]
    pub drives: Vec<DriveConfig>,
    /// Firecracker's `network-interfaces`: virtio-net devices over TAP devices, in order. An
    /// interface without `host_dev_name` is a hot-attach slot (link down until a TAP is
    /// attached at run time).
    #[serde(
        default,
        rename = "network-interfaces",
        deserialize_with = "null_default"
    )]
    pub network_interfaces: Vec<NetConfig>,
    /// Firecracker's `vsock`: a virtio-vsock device with hybrid vsock over Unix sockets.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Firecracker's `logger`: kept for the `kestrel` binary, which applies it (the library
    /// logs through `tracing` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    /// Firecracker's `metrics`: kept for the `kestrel` binary, which writes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// Firecracker's `balloon`. Not supported: absent or `null` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// Firecracker's `cpu-config` (custom CPU template). Not supported: absent, `null` or a
    /// template that changes nothing.
    #[serde(
        default,
        rename = "cpu-config",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<CpuConfig>,
    /// Firecracker's `entropy` (virtio-rng). Not supported: absent or `null` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyConfig>,
    /// Firecracker's `memory-hotplug` (virtio-mem). Not supported: absent or `null` only
    /// (Kestrel's memory hotplug is `machine-config.max_mem_size_mib`).
    #[serde(
        default,
        rename = "memory-hotplug",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_hotplug: Option<MemoryHotplugConfig>,
    /// Firecracker's `mmds-config`. Not supported: absent or `null` only.
    #[serde(
        default,
        rename = "mmds-config",
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<MmdsConfig>,
    /// Firecracker's `pmem` (virtio-pmem). Not supported: absent, `null` or `[]` only.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub pmem: Vec<PmemConfig>,
    /// virtio-fs shares (Kestrel section), in order: each one is served in-process from a host
    /// directory (`shared_dir`) or by an external vhost-user daemon such as virtiofsd (`socket`).
    #[serde(default, deserialize_with = "null_default")]
    pub fs: Vec<FsConfig>,
    /// Where the guest's serial console goes (Kestrel section).
    #[serde(default, deserialize_with = "null_default")]
    pub serial: SerialConfig,
    /// Host-side knobs that are not about the guest (Kestrel section).
    #[serde(default, deserialize_with = "null_default")]
    pub kestrel: KestrelOptions,
}

impl VmConfig {
    /// Parse a JSON document. Unknown fields are errors.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        Ok(serde_json::from_str(json)?)
    }

    /// Read and parse a JSON file (does not validate; call [`VmConfig::validate`]). Only a
    /// regular file of at most [`MAX_CONFIG_FILE_LEN`] bytes is read: `/dev/zero` or a FIFO is
    /// refused up front instead of being read without end or blocking.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let shown = || path.display().to_string();
        let read_err = |source| ConfigError::Read {
            path: shown(),
            source,
        };
        // stat first: opening a FIFO would block until a writer appears.
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if !meta.is_file() {
            return Err(ConfigError::NotARegularFile { path: shown() });
        }
        let f = std::fs::File::open(path).map_err(read_err)?;
        // Replaced between stat and open: check what was opened.
        if !f.metadata().map_err(read_err)?.is_file() {
            return Err(ConfigError::NotARegularFile { path: shown() });
        }
        let mut bytes = Vec::new();
        f.take(MAX_CONFIG_FILE_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_CONFIG_FILE_LEN {
            return Err(ConfigError::FileTooLarge {
                path: shown(),
                limit: MAX_CONFIG_FILE_LEN,
            });
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| read_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        Self::from_json(&text)
    }

    /// A minimal configuration: `vcpu_count` vCPUs, `mem_size_mib` MiB, the given kernel, and
    /// the serial console on ([`CONSOLE_BOOT_ARGS`] as `boot_args`; a JSON document without
    /// `boot_args` gets Firecracker's [`DEFAULT_BOOT_ARGS`] instead).
    pub fn new(kernel: impl Into<PathBuf>, vcpu_count: u32, mem_size_mib: u64) -> Self {
        VmConfig {
            boot_source: BootSource {
                kernel_image_path: kernel.into(),
                boot_args: Some(CONSOLE_BOOT_ARGS.to_string()),
                initrd_path: None,
            },
            machine_config: MachineConfig::new(vcpu_count, mem_size_mib),
            serial: SerialConfig::default(),
            kestrel: KestrelOptions::default(),
            drives: Vec::new(),
            network_interfaces: Vec::new(),
            vsock: None,
            fs: Vec::new(),
            logger: None,
            metrics: None,
            balloon: None,
            cpu_config: None,
            entropy: None,
            memory_hotplug: None,
            mmds_config: None,
            pmem: Vec::new(),
        }
    }

    /// The VM's short name (thread names, logs).
    pub fn name(&self) -> &str {
        self.kestrel.name.as_deref().unwrap_or("vm")
    }

    /// Check every field. Touches the file system only to look at the files named (kind,
    /// permissions, kernel format, sizes); creates and changes nothing. The error names the
    /// first offending field. Whatever `kestrel_vmm::Vm::create` would refuse because of
    /// the configuration is refused here, except what depends on the host at create time:
    /// KVM's vCPU limit, host memory, TAP devices and vhost-user daemons; and the kernel's
    /// format, which [`VmConfig::validate_for_boot`] adds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_with(true)
    }

    /// [`VmConfig::validate`] for a VM restored from a snapshot: the same checks except the
    /// kernel and initrd files (a restored guest is already in memory; they need not exist).
    pub fn validate_for_restore(&self) -> Result<(), ConfigError> {
        self.validate_with(false)
    }

    fn validate_with(&self, boot_files: bool) -> Result<(), ConfigError> {
        self.validate_unsupported_sections()?;
        if boot_files {
            self.boot_source.validate()?;
            self.check_initrd_fits()?;
        } else {
            self.boot_source.validate_args()?;
        }
        self.check_cmdline_room()?;
        self.machine_config.validate()?;
        self.serial.validate()?;
        self.kestrel.validate()?;
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        if let Some(l) = &self.logger {
            l.validate()?;
        }
        if let Some(m) = &self.metrics {
            m.validate()?;
        }
        self.validate_drives()?;
        self.validate_network_interfaces()?;
        self.validate_fs()?;
        self.check_device_ids_unique()
    }

    /// The id each virtio device gets in the VM (`Vm::device(id)`), with the field it comes
    /// from, in the order create wires them: drive ids, iface ids, `vsock`, `fs<N>` for the
    /// N-th share.
    pub fn device_ids(&self) -> Vec<(String, String)> {
        let drives = self.drives.iter().enumerate();
        let mut v: Vec<(String, String)> = drives
            .map(|(i, d)| (format!("drives[{i}].drive_id"), d.drive_id.clone()))
            .collect();
        let nets = self.network_interfaces.iter().enumerate();
        v.extend(nets.map(|(i, n)| {
            (
                format!("network-interfaces[{i}].iface_id"),
                n.iface_id.clone(),
            )
        }));
        if self.vsock.is_some() {
            v.push(("vsock".into(), "vsock".into()));
        }
        v.extend((0..self.fs.len()).map(|i| (format!("fs[{i}]"), fs_device_id(i))));
        v
    }

    /// Device ids are shared by every kind (a drive may not be called `eth0` when an interface
    /// is, nor `vsock` or `fs0` when that device exists), as create requires.
    fn check_device_ids_unique(&self) -> Result<(), ConfigError> {
        let ids = self.device_ids();
        for (i, (field, id)) in ids.iter().enumerate() {
            if let Some((other, _)) = ids[..i].iter().find(|(_, o)| o == id) {
                return Err(ConfigError::invalid(
                    field.as_str(),
                    format!("{id:?} is already the id of the device of {other}"),
                ));
            }
        }
        Ok(())
    }

    /// [`VmConfig::validate`], then the kernel's format (an x86_64 ELF `vmlinux` or a
    /// bzImage, read from its first bytes). This is what `Vm::create` and `kestrel validate`
    /// run. (`validate` alone does not read the kernel, so configurations naming any regular
    /// file as the kernel, as unit tests do, still validate.)
    pub fn validate_for_boot(&self) -> Result<(), ConfigError> {
        self.validate()?;
        let field = "boot-source.kernel_image_path";
        let kernel = check_file(field, &self.boot_source.kernel_image_path)?;
        check_kernel_format(field, &self.boot_source.kernel_image_path, kernel)
    }

    /// `boot_args` plus what Kestrel appends must fit the boot protocol's command line.
    fn check_cmdline_room(&self) -> Result<(), ConfigError> {
        let args = self.boot_source.boot_args_or_default();
        let reserved = CMDLINE_RESERVED_LEN + CMDLINE_RESERVED_PER_DEVICE * self.device_ids().len();
        let room = MAX_CMDLINE_LEN.saturating_sub(reserved);
        if args.trim().len() > room {
            return Err(ConfigError::invalid(
                "boot-source.boot_args",
                format!(
                    "{} bytes; with what Kestrel appends for this VM ({reserved} bytes at most) \
                     at most {room} fit in the {MAX_CMDLINE_LEN}-byte command line",
                    args.trim().len()
                ),
            ));
        }
        Ok(())
    }

    /// The initrd is loaded into RAM below the 32-bit MMIO hole (3 GiB).
    fn check_initrd_fits(&self) -> Result<(), ConfigError> {
        let Some(initrd) = &self.boot_source.initrd_path else {
            return Ok(());
        };
        let size = std::fs::metadata(initrd).map(|m| m.len()).unwrap_or(0);
        let low_ram = (self.machine_config.mem_size_mib << 20).min(3 << 30);
        if size >= low_ram {
            return Err(ConfigError::invalid(
                "boot-source.initrd_path",
                format!("{size} bytes do not fit in the {low_ram} bytes of guest RAM below 3 GiB"),
            ));
        }
        Ok(())
    }
}
