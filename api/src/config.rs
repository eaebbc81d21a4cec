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
/// Largest configuration file [`VmConfig::from_file`] reads (1 MiB; real ones are a few KiB).
pub const MAX_CONFIG_FILE_LEN: u64 = 1 << 20;
/// Command-line bytes Kestrel may append to `boot_args` besides one `virtio_mmio.device=` per
/// device: `root=PARTUUID=<36> rw`, `maxcpus=NNN`, the software-KVM switches and
/// `cpuhp.parallel=0` (148 bytes with separators, rounded up).
pub const CMDLINE_RESERVED_LEN: usize = 160;
/// Command-line bytes Kestrel appends per virtio device (`virtio_mmio.device=4K@0x........:NN`
/// and a separator: 36, rounded up).
pub const CMDLINE_RESERVED_PER_DEVICE: usize = 40;

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
    /// Firecracker's `network-interfaces`: virtio-net devices over TAP devices, in order. An
    /// interface without `host_dev_name` is a hot-attach slot (link down until a TAP is
    /// attached at run time).
    #[serde(default, rename = "network-interfaces")]
    pub network_interfaces: Vec<NetConfig>,
    /// Firecracker's `vsock`: a virtio-vsock device with hybrid vsock over Unix sockets.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares (Kestrel section), in order: each one is served in-process from a host
    /// directory (`shared_dir`) or by an external vhost-user daemon such as virtiofsd (`socket`).
    #[serde(default)]
    pub fs: Vec<FsConfig>,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KestrelOptions {
    /// A short name used in thread names (`kestrel-<name>-vcpu0`) and logs. Default: `vm`.
    #[serde(default)]
    pub name: Option<String>,
    /// Guest command-line compatibility switches for software KVM (see docs/nested-kvm.md).
    #[serde(default)]
    pub guest_compat: GuestCompat,
    /// With the software-KVM switches on: serve the guest kernel's paravirtual extended-state
    /// switch (`kestrel.pvfpu`, so guest tasks do not share AVX registers; docs/nested-kvm.md
    /// §10). Default: true. Only ever in effect on a software KVM; hardware KVM guests use
    /// XSAVE and never ask for it. Turning it off brings back the shared AVX state (random
    /// guest crashes); it exists to measure that and the assist's cost.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub xstate_assist: bool,
    /// The seccomp filters Kestrel installs on each thread it spawns (vCPUs, event loop,
    /// virtio-fs workers; never on the caller's threads): `"errno"` (a forbidden call fails with
    /// `EPERM` on that thread), `"kill"` (a forbidden call kills the process with `SIGSYS`) or
    /// `"off"`. Absent: `errno` in the library (it must not kill the process embedding it),
    /// `kill` in the `kestrel` binary. See docs/design.md, "Seccomp".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<SeccompMode>,
}

/// What a seccomp filter of a Kestrel thread does with a system call that is not on its
/// thread class's list (`kestrel.seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// The call fails with `EPERM` on that thread; the process goes on. The library's default.
    Errno,
    /// The whole process is killed (`SECCOMP_RET_KILL_PROCESS`, seen as `SIGSYS`). The
    /// `kestrel` binary's default; for a process that is only Kestrel.
    Kill,
    /// No filter.
    Off,
}

impl KestrelOptions {
    /// The seccomp mode in force: the configured one, else `default` (what the embedding
    /// program chose: [`SeccompMode::Errno`] for the library, [`SeccompMode::Kill`] for the
    /// `kestrel` binary).
    pub fn seccomp_or(&self, default: SeccompMode) -> SeccompMode {
        self.seccomp.unwrap_or(default)
    }
}

impl Default for KestrelOptions {
    fn default() -> Self {
        Self {
            name: None,
            guest_compat: GuestCompat::default(),
            xstate_assist: true,
            seccomp: None,
        }
    }
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
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
            network_interfaces: Vec::new(),
            vsock: None,
            fs: Vec::new(),
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
        self.boot_source.validate()?;
        self.check_cmdline_room()?;
        self.check_initrd_fits()?;
        self.machine_config.validate()?;
        self.serial.validate()?;
        self.kestrel.validate()?;
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        self.validate_drives()?;
        self.validate_network_interfaces()?;
        self.validate_fs()?;
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

    /// Virtio devices in the order create wires them: drives, interfaces, vsock, fs.
    fn device_fields(&self) -> Vec<String> {
        let mut v: Vec<String> = (0..self.drives.len())
            .map(|i| format!("drives[{i}]"))
            .collect();
        v.extend((0..self.network_interfaces.len()).map(|i| format!("network-interfaces[{i}]")));
        if self.vsock.is_some() {
            v.push("vsock".into());
        }
        v.extend((0..self.fs.len()).map(|i| format!("fs[{i}]")));
        v
    }

    /// `boot_args` plus what Kestrel appends must fit the boot protocol's command line.
    fn check_cmdline_room(&self) -> Result<(), ConfigError> {
        let Some(args) = &self.boot_source.boot_args else {
            return Ok(());
        };
        let reserved =
            CMDLINE_RESERVED_LEN + CMDLINE_RESERVED_PER_DEVICE * self.device_fields().len();
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

/// `path` must be a readable regular file.
fn check_file(field: &str, path: &Path) -> Result<std::fs::File, ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ConfigError::invalid(field, "must not be empty"));
    }
    match std::fs::metadata(path) {
        // Opening a regular file has no side effect (and never blocks, unlike a FIFO).
        Ok(m) if m.is_file() => std::fs::File::open(path).map_err(|e| {
            ConfigError::invalid(field, format!("cannot open {}: {e}", path.display()))
        }),
        Ok(m) => Err(ConfigError::invalid(
            field,
            format!(
                "{} is {}, not a regular file",
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

/// What kind of file `m` describes, for messages.
fn file_kind(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// The kernel must be an x86_64 ELF (`vmlinux`) or a bzImage: what create's loader takes.
fn check_kernel_format(field: &str, path: &Path, mut f: std::fs::File) -> Result<(), ConfigError> {
    use std::io::Read;
    let mut head = Vec::with_capacity(0x210);
    (&mut f)
        .take(0x210)
        .read_to_end(&mut head)
        .map_err(|e| ConfigError::invalid(field, format!("cannot read {}: {e}", path.display())))?;
    let elf64_x86 = head.len() >= 20
        && head[..4] == *b"\x7fELF"
        && head[4] == 2
        && u16::from_le_bytes([head[18], head[19]]) == 0x3e;
    let bzimage = head.len() >= 0x206 && head[0x202..0x206] == *b"HdrS";
    if elf64_x86 || bzimage {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!(
                "{} is neither an x86_64 ELF vmlinux nor a bzImage",
                path.display()
            ),
        ))
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
            // What linux-loader's command line takes: printable ASCII and spaces only.
            if let Some(b) = args.bytes().find(|b| !(b' '..=b'~').contains(b)) {
                return Err(ConfigError::invalid(
                    "boot-source.boot_args",
                    format!(
                        "must be printable ASCII (byte {b:#04x} is not; no tabs, newlines or \
                         other control characters)"
                    ),
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
                if let Some(d) = parent.filter(|d| !d.is_dir()) {
                    return Err(ConfigError::invalid(
                        "serial.path",
                        format!("directory {} does not exist", d.display()),
                    ));
                }
                check_serial_file(p)
            }
            (_, Some(_)) => Err(ConfigError::invalid(
                "serial.path",
                "is only used with serial.output \"file\"",
            )),
            _ => Ok(()),
        }
    }
}

/// An existing `serial.path` must be a regular file create can append to, or a character
/// device (a terminal, `/dev/null`): a directory fails at create, and opening a FIFO for
/// writing would block create until a reader appears.
fn check_serial_file(p: &Path) -> Result<(), ConfigError> {
    let m = match std::fs::metadata(p) {
        Ok(m) => m,
        // Created by create (its directory exists).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ConfigError::invalid(
                "serial.path",
                format!("cannot access {}: {e}", p.display()),
            ))
        }
    };
    use std::os::unix::fs::FileTypeExt;
    if m.file_type().is_char_device() {
        return Ok(());
    }
    if !m.is_file() {
        return Err(ConfigError::invalid(
            "serial.path",
            format!(
                "{} is {}; it must be a regular file or a character device",
                p.display(),
                file_kind(&m)
            ),
        ));
    }
    // Opening an existing file for appending changes nothing; it proves create can.
    std::fs::OpenOptions::new()
        .append(true)
        .open(p)
        .map(drop)
        .map_err(|e| {
            ConfigError::invalid("serial.path", format!("cannot open {}: {e}", p.display()))
        })
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
    fn seccomp_switch_parses_defaults_to_absent_and_round_trips() {
        let base = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}},
               "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}}"#,
            kernel_file().display()
        );
        let with = |kestrel: &str| VmConfig::from_json(&format!("{base}, {kestrel}}}"));
        let absent = VmConfig::from_json(&format!("{base}}}")).unwrap();
        assert_eq!(absent.kestrel.seccomp, None);
        assert!(
            absent.kestrel.xstate_assist,
            "the assist is on unless turned off"
        );
        assert_eq!(
            absent.kestrel.seccomp_or(SeccompMode::Errno),
            SeccompMode::Errno
        );
        assert_eq!(
            absent.kestrel.seccomp_or(SeccompMode::Kill),
            SeccompMode::Kill
        );
        assert!(!serde_json::to_string(&absent).unwrap().contains("seccomp"));
        for (text, mode) in [
            ("errno", SeccompMode::Errno),
            ("kill", SeccompMode::Kill),
            ("off", SeccompMode::Off),
        ] {
            let c = with(&format!(r#""kestrel": {{"seccomp": "{text}"}}"#)).unwrap();
            assert_eq!(c.kestrel.seccomp, Some(mode));
            // The configured mode wins over the program's default.
            assert_eq!(c.kestrel.seccomp_or(SeccompMode::Kill), mode);
            c.validate().unwrap();
            let back = VmConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
            assert_eq!(back.kestrel.seccomp, Some(mode));
        }
        // The other kestrel fields are untouched by it.
        let c =
            with(r#""kestrel": {"name": "a", "seccomp": "off", "xstate_assist": false}"#).unwrap();
        assert_eq!(c.kestrel.name.as_deref(), Some("a"));
        assert!(!c.kestrel.xstate_assist);
        for bad in [
            r#""seccomp": "trap""#,
            r#""seccomp": true"#,
            r#""seccomp": 1"#,
        ] {
            assert!(with(&format!(r#""kestrel": {{{bad}}}"#)).is_err(), "{bad}");
        }
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
    /// Token buckets for the drive's requests: bandwidth counts the bytes read or written, ops
    /// counts every request. Changeable at run time (`BlockControl::update_rate_limiter`).
    #[serde(default)]
    pub rate_limiter: Option<crate::RateLimiterConfig>,
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
            if let Some(j) = self.fs[..i].iter().position(|o| o.tag == f.tag) {
                return Err(ConfigError::invalid(
                    format!("fs[{i}].tag"),
                    format!("{:?} is already the tag of fs[{j}]", f.tag),
                ));
            }
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

/// Most virtio-mmio devices a VM can have: each takes one of the IOAPIC pins 5 to 23.
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// Longest `iface_id`.
pub const MAX_IFACE_ID_LEN: usize = 64;
/// Longest `host_dev_name`: a Linux interface name holds `IFNAMSIZ - 1` = 15 bytes.
pub const MAX_HOST_DEV_NAME_LEN: usize = 15;

/// One entry of Firecracker's `network-interfaces`: a virtio-net device whose host side is a
/// TAP device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Unique name: 1 to 64 ASCII letters, digits, `-` and `_`.
    pub iface_id: String,
    /// The TAP device on the host. Absent or `""`: a hot-attach slot whose link stays down
    /// until a TAP is attached at run time.
    #[serde(default)]
    pub host_dev_name: Option<String>,
    /// The guest's MAC address, `aa:bb:cc:dd:ee:ff` (unicast, not all zeros). Default: a
    /// locally administered address derived from `iface_id` ([`derived_mac`]), stable across
    /// boots.
    #[serde(default)]
    pub guest_mac: Option<String>,
    /// Limits on traffic to the guest.
    #[serde(default)]
    pub rx_rate_limiter: Option<crate::RateLimiterConfig>,
    /// Limits on traffic from the guest.
    #[serde(default)]
    pub tx_rate_limiter: Option<crate::RateLimiterConfig>,
    /// Kestrel: create the TAP device when it does not exist (it goes away with the VM).
    /// Without it the TAP must already exist.
    #[serde(default)]
    pub create_tap: bool,
}

impl NetConfig {
    /// The TAP device's name, or `None` for a hot-attach slot.
    pub fn tap_name(&self) -> Option<&str> {
        self.host_dev_name.as_deref().filter(|n| !n.is_empty())
    }

    /// Whether the interface starts without a TAP (link down).
    pub fn is_hot_attach_slot(&self) -> bool {
        self.tap_name().is_none()
    }

    /// The MAC address the guest gets: `guest_mac` parsed, or the one derived from `iface_id`.
    /// `None` when `guest_mac` is not a valid `aa:bb:cc:dd:ee:ff` address.
    pub fn mac(&self) -> Option<[u8; 6]> {
        match &self.guest_mac {
            Some(s) => parse_mac(s),
            None => Some(derived_mac(&self.iface_id)),
        }
    }
}

/// Parse `aa:bb:cc:dd:ee:ff` (six pairs of hex digits, either case, separated by `:`).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Format a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// The default MAC of interface `iface_id`: a 64-bit FNV-1a hash of the id, with the first
/// octet marked locally administered (bit 1 set) and unicast (bit 0 clear).
pub fn derived_mac(iface_id: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in iface_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

/// Why `name` cannot be a Linux interface name, if it cannot (the kernel's rules: 1 to 15
/// bytes, not `.` or `..`, no `/`, `:` or whitespace; Kestrel also refuses `%`, which the
/// kernel would treat as a name template, and NUL).
pub fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_HOST_DEV_NAME_LEN {
        return Err(format!(
            "must be 1 to {MAX_HOST_DEV_NAME_LEN} bytes (a Linux interface name)"
        ));
    }
    if name == "." || name == ".." {
        return Err("must not be \".\" or \"..\"".into());
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '%' || c == '\0' || c.is_whitespace())
    {
        return Err("must not contain '/', ':', '%', NUL or whitespace".into());
    }
    Ok(())
}

impl VmConfig {
    /// Check `network-interfaces` (part of [`VmConfig::validate`]) and the total number of
    /// virtio devices; errors name `network-interfaces[<index>].<field>`.
    pub fn validate_network_interfaces(&self) -> Result<(), ConfigError> {
        let nets = &self.network_interfaces;
        let vsock = usize::from(self.vsock.is_some());
        let total = self.drives.len() + nets.len() + vsock + self.fs.len();
        if total > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::invalid(
                "network-interfaces",
                format!(
                    "{} drives, {} network interfaces, {} fs shares and {vsock} vsock make \
                     {total} virtio devices; at most {MAX_VIRTIO_DEVICES} fit (one IOAPIC pin each)",
                    self.drives.len(),
                    nets.len(),
                    self.fs.len()
                ),
            ));
        }
        let mut macs: Vec<[u8; 6]> = Vec::with_capacity(nets.len());
        for (i, n) in nets.iter().enumerate() {
            let field = |name: &str| format!("network-interfaces[{i}].{name}");
            let id = &n.iface_id;
            if id.is_empty() || id.len() > MAX_IFACE_ID_LEN {
                return Err(ConfigError::invalid(
                    field("iface_id"),
                    format!("must be 1 to {MAX_IFACE_ID_LEN} characters"),
                ));
            }
            if !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError::invalid(
                    field("iface_id"),
                    "may hold only ASCII letters, digits, '-' and '_'",
                ));
            }
            if let Some(j) = nets[..i].iter().position(|o| o.iface_id == *id) {
                return Err(ConfigError::invalid(
                    field("iface_id"),
                    format!("duplicate of network-interfaces[{j}]"),
                ));
            }
            match n.tap_name() {
                Some(name) => {
                    check_interface_name(name)
                        .map_err(|why| ConfigError::invalid(field("host_dev_name"), why))?;
                    if let Some(j) = nets[..i].iter().position(|o| o.tap_name() == Some(name)) {
                        return Err(ConfigError::invalid(
                            field("host_dev_name"),
                            format!("{name} is already used by network-interfaces[{j}]"),
                        ));
                    }
                }
                None if n.create_tap => {
                    return Err(ConfigError::invalid(
                        field("create_tap"),
                        "is only used with host_dev_name",
                    ));
                }
                None => {}
            }
            let mac = match &n.guest_mac {
                Some(s) => {
                    let mac = parse_mac(s).ok_or_else(|| {
                        ConfigError::invalid(
                            field("guest_mac"),
                            format!("{s:?} is not a MAC address like aa:bb:cc:dd:ee:ff"),
                        )
                    })?;
                    if mac[0] & 1 != 0 {
                        return Err(ConfigError::invalid(
                            field("guest_mac"),
                            format!("{s} is a multicast address (lowest bit of the first octet)"),
                        ));
                    }
                    if mac == [0; 6] {
                        return Err(ConfigError::invalid(
                            field("guest_mac"),
                            "must not be all zeros",
                        ));
                    }
                    mac
                }
                None => derived_mac(id),
            };
            if let Some(j) = macs.iter().position(|m| *m == mac) {
                return Err(ConfigError::invalid(
                    field("guest_mac"),
                    format!(
                        "{} is also the MAC of network-interfaces[{j}]",
                        format_mac(&mac)
                    ),
                ));
            }
            macs.push(mac);
            if let Some(rl) = &n.rx_rate_limiter {
                rl.validate(&field("rx_rate_limiter"))?;
            }
            if let Some(rl) = &n.tx_rate_limiter {
                rl.validate(&field("tx_rate_limiter"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod net_tests {
    use super::*;
    use crate::{RateLimiterConfig, TokenBucketConfig};

    fn some_file() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")
    }

    fn net(id: &str) -> NetConfig {
        NetConfig {
            iface_id: id.into(),
            host_dev_name: Some(format!("tap-{id}")),
            ..NetConfig::default()
        }
    }

    fn with(nets: Vec<NetConfig>) -> VmConfig {
        let mut cfg = VmConfig::new(some_file(), 1, 128);
        cfg.network_interfaces = nets;
        cfg
    }

    /// The error's field and message.
    fn err(cfg: &VmConfig) -> (String, String) {
        let e = cfg
            .validate()
            .expect_err("network interfaces should be rejected");
        (e.field().expect("names a field").to_string(), e.to_string())
    }

    #[test]
    fn firecracker_network_interfaces_parse() {
        let json = format!(
            r#"{{
            "boot-source": {{"kernel_image_path": "{k}"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
            "network-interfaces": [
                {{"iface_id": "eth0", "guest_mac": "AA:FC:00:00:00:01", "host_dev_name": "tap0",
                  "rx_rate_limiter": {{"bandwidth": {{"size": 1048576, "refill_time": 1000}}}},
                  "tx_rate_limiter": {{"ops": {{"size": 100, "refill_time": 1000}}}}}},
                {{"iface_id": "eth1", "host_dev_name": "kt-new", "create_tap": true}},
                {{"iface_id": "slot0"}},
                {{"iface_id": "slot1", "host_dev_name": ""}}
            ]
        }}"#,
            k = some_file().display()
        );
        let cfg = VmConfig::from_json(&json).unwrap();
        cfg.validate().unwrap();
        let n = &cfg.network_interfaces;
        assert_eq!(n.len(), 4);
        assert_eq!(n[0].tap_name(), Some("tap0"));
        assert_eq!(n[0].mac(), Some([0xaa, 0xfc, 0, 0, 0, 1]));
        assert_eq!(
            n[0].rx_rate_limiter.unwrap().bandwidth.unwrap().size,
            1 << 20
        );
        assert_eq!(n[0].tx_rate_limiter.unwrap().ops.unwrap().size, 100);
        assert!(!n[0].create_tap && n[1].create_tap);
        assert!(!n[1].is_hot_attach_slot());
        assert!(n[2].is_hot_attach_slot() && n[3].is_hot_attach_slot());
        assert_eq!(n[2].mac(), Some(derived_mac("slot0")));
        // Round trip; none at all is the default.
        let back = VmConfig::from_json(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        assert!(VmConfig::new(some_file(), 1, 128)
            .network_interfaces
            .is_empty());
        let json = serde_json::to_string(&with(vec![net("a")])).unwrap();
        assert!(json.contains("\"network-interfaces\""), "{json}");
    }

    #[test]
    fn unknown_and_missing_fields_rejected() {
        let e = serde_json::from_str::<NetConfig>(r#"{"iface_id": "a", "allow_mmds": true}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `allow_mmds`"), "{e}");
        let e = serde_json::from_str::<NetConfig>(r#"{"host_dev_name": "tap0"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `iface_id`"), "{e}");
    }

    #[test]
    fn iface_ids_checked() {
        let (f, m) = err(&with(vec![net("a"), net("b"), {
            let mut n = net("a");
            n.host_dev_name = Some("other".into());
            n
        }]));
        assert_eq!(f, "network-interfaces[2].iface_id");
        assert_eq!(
            m,
            "network-interfaces[2].iface_id: duplicate of network-interfaces[0]"
        );
        assert_eq!(
            err(&with(vec![net("")])).0,
            "network-interfaces[0].iface_id"
        );
        assert_eq!(
            err(&with(vec![net("ok"), net("eth 0")])).0,
            "network-interfaces[1].iface_id"
        );
        assert_eq!(
            err(&with(vec![net("éth0")])).0,
            "network-interfaces[0].iface_id"
        );
        let mut long = net("x");
        long.iface_id = "x".repeat(MAX_IFACE_ID_LEN + 1);
        assert_eq!(
            err(&with(vec![long.clone()])).0,
            "network-interfaces[0].iface_id"
        );
        long.iface_id.pop();
        with(vec![long, net("A-b_9")]).validate().unwrap();
    }

    #[test]
    fn host_dev_names_checked() {
        for bad in [
            "x".repeat(16),
            "tap/0".into(),
            "tap 0".into(),
            "tap\t0".into(),
            "tap:0".into(),
            "tap%d".into(),
            ".".into(),
            "..".into(),
            "a\0b".into(),
        ] {
            let mut n = net("a");
            n.host_dev_name = Some(bad.clone());
            let (f, _) = err(&with(vec![n]));
            assert_eq!(f, "network-interfaces[0].host_dev_name", "{bad:?}");
        }
        let mut n = net("a");
        n.host_dev_name = Some("x".repeat(15));
        with(vec![n]).validate().unwrap();
        // Unique, but any number of slots.
        let mut b = net("b");
        b.host_dev_name = Some("tap-a".into());
        let (f, m) = err(&with(vec![net("a"), b]));
        assert_eq!(f, "network-interfaces[1].host_dev_name");
        assert!(
            m.contains("tap-a is already used by network-interfaces[0]"),
            "{m}"
        );
        let slot = |id: &str, name: Option<&str>| NetConfig {
            iface_id: id.into(),
            host_dev_name: name.map(str::to_string),
            ..NetConfig::default()
        };
        with(vec![
            slot("s0", None),
            slot("s1", Some("")),
            slot("s2", None),
        ])
        .validate()
        .unwrap();
        // create_tap needs a name.
        let mut s = slot("s0", Some(""));
        s.create_tap = true;
        assert_eq!(err(&with(vec![s])).0, "network-interfaces[0].create_tap");
    }

    #[test]
    fn macs_checked() {
        assert_eq!(
            parse_mac("aa:BB:0c:dd:ee:ff"),
            Some([0xaa, 0xbb, 0x0c, 0xdd, 0xee, 0xff])
        );
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aa-bb-cc-dd-ee-ff",
            "a:bb:cc:dd:ee:fff",
            "aa:bb:cc:dd:ee:gg",
            "+a:bb:cc:dd:ee:ff",
            " aa:bb:cc:dd:ee:ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
            let mut n = net("a");
            n.guest_mac = Some(bad.into());
            let (f, m) = err(&with(vec![n.clone()]));
            assert_eq!(f, "network-interfaces[0].guest_mac", "{bad:?}");
            assert!(m.contains("is not a MAC address"), "{m}");
            assert_eq!(n.mac(), None);
        }
        let mut n = net("a");
        n.guest_mac = Some("01:00:5e:00:00:01".into());
        let (f, m) = err(&with(vec![n.clone()]));
        assert_eq!(f, "network-interfaces[0].guest_mac");
        assert!(m.contains("multicast"), "{m}");
        n.guest_mac = Some("ff:ff:ff:ff:ff:ff".into());
        assert_eq!(
            err(&with(vec![n.clone()])).0,
            "network-interfaces[0].guest_mac"
        );
        n.guest_mac = Some("00:00:00:00:00:00".into());
        assert_eq!(
            err(&with(vec![n.clone()])).0,
            "network-interfaces[0].guest_mac"
        );
        n.guest_mac = Some("02:00:00:00:00:01".into());
        with(vec![n.clone()]).validate().unwrap();
        // Two interfaces with one MAC (given or derived).
        let mut b = net("b");
        b.guest_mac = Some("02:00:00:00:00:01".into());
        let (f, m) = err(&with(vec![n, b]));
        assert_eq!(f, "network-interfaces[1].guest_mac");
        assert!(
            m.contains("02:00:00:00:00:01 is also the MAC of network-interfaces[0]"),
            "{m}"
        );
        let mut c = net("c");
        c.guest_mac = Some(format_mac(&derived_mac("a")));
        assert_eq!(
            err(&with(vec![net("a"), c])).0,
            "network-interfaces[1].guest_mac"
        );
    }

    #[test]
    fn derived_macs_are_stable_unicast_and_local() {
        let a = derived_mac("eth0");
        assert_eq!(a, derived_mac("eth0"));
        assert_ne!(a, derived_mac("eth1"));
        for id in [
            "eth0",
            "eth1",
            "x",
            "",
            "a-very-long-interface-id_0123456789",
        ] {
            let m = derived_mac(id);
            assert_eq!(m[0] & 1, 0, "{id}: unicast");
            assert_eq!(m[0] & 2, 2, "{id}: locally administered");
            assert_eq!(parse_mac(&format_mac(&m)), Some(m));
        }
        assert_eq!(net("eth0").mac(), Some(a));
    }

    #[test]
    fn rate_limiters_checked() {
        let bad = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 0,
                one_time_burst: None,
                refill_time: 100,
            }),
            ops: None,
        };
        let mut n = net("a");
        n.rx_rate_limiter = Some(bad);
        assert_eq!(
            err(&with(vec![net("z"), n.clone()])).0,
            "network-interfaces[1].rx_rate_limiter.bandwidth.size"
        );
        n.rx_rate_limiter = None;
        n.tx_rate_limiter = Some(RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 10,
                one_time_burst: Some(5),
                refill_time: 0,
            }),
        });
        assert_eq!(
            err(&with(vec![n.clone()])).0,
            "network-interfaces[0].tx_rate_limiter.ops.refill_time"
        );
        n.tx_rate_limiter = Some(RateLimiterConfig::default());
        n.rx_rate_limiter = Some(RateLimiterConfig::default());
        with(vec![n]).validate().unwrap();
    }

    #[test]
    fn at_most_19_virtio_devices_in_total() {
        let drive = |i: usize| DriveConfig {
            drive_id: format!("d{i}"),
            path_on_host: Some(some_file()),
            ..DriveConfig::default()
        };
        let nets = |n: usize| (0..n).map(|i| net(&format!("n{i}"))).collect::<Vec<_>>();
        let mut cfg = with(nets(MAX_VIRTIO_DEVICES));
        cfg.validate().unwrap();
        cfg.network_interfaces = nets(10);
        cfg.drives = (0..9).map(drive).collect();
        cfg.validate().unwrap();
        cfg.drives.push(drive(9));
        let (f, m) = err(&cfg);
        assert_eq!(f, "network-interfaces");
        assert!(m.contains("make 20 virtio devices"), "{m}");
        cfg.drives.pop();
        cfg.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: PathBuf::from("kestrel-never-created-net.sock"),
            vsock_id: None,
        });
        let (f, m) = err(&cfg);
        assert_eq!(f, "network-interfaces");
        assert!(
            m.contains("9 drives, 10 network interfaces, 0 fs shares and 1 vsock"),
            "{m}"
        );
        cfg.network_interfaces.pop();
        cfg.validate().unwrap();
    }

    #[test]
    fn network_interfaces_checked_by_validate() {
        // validate() reaches them only when everything before is valid, and does reach them.
        let mut cfg = with(vec![net("")]);
        cfg.machine_config.vcpu_count = 0;
        assert_eq!(err(&cfg).0, "machine-config.vcpu_count");
        cfg.machine_config.vcpu_count = 1;
        assert_eq!(err(&cfg).0, "network-interfaces[0].iface_id");
    }
}

#[cfg(test)]
mod create_agreement_tests {
    //! Each case here used to pass `validate` and fail only at `Vm::create`.
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kestrel-api-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A file holding `bytes` (a fresh one per call: tests run in parallel).
    fn file(tag: &str, bytes: &[u8]) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = dir("files").join(format!("{tag}-{n}"));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn elf_kernel() -> PathBuf {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[18..20].copy_from_slice(&0x3eu16.to_le_bytes());
        file("vmlinux", &h)
    }

    fn base() -> VmConfig {
        VmConfig::new(elf_kernel(), 1, 128)
    }

    fn field(cfg: &VmConfig) -> String {
        let e = cfg.validate_for_boot().expect_err("should be refused");
        e.field().expect("names a field").to_string()
    }

    #[test]
    fn base_config_is_valid() {
        base().validate_for_boot().unwrap();
        let mut c = base();
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        c.boot_source.kernel_image_path = file("bzImage", &bz);
        c.validate_for_boot().unwrap();
    }

    #[test]
    fn control_characters_in_boot_args_refused() {
        for bad in ["console=ttyS0\n", "a\tb", "x\x1b[0m", "nul\0"] {
            let mut c = base();
            c.boot_source.boot_args = Some(bad.into());
            assert_eq!(field(&c), "boot-source.boot_args", "{bad:?}");
        }
        let mut c = base();
        c.boot_source.boot_args = Some("console=ttyS0 reboot=k panic=1 ~!".into());
        c.validate_for_boot().unwrap();
    }

    #[test]
    fn boot_args_leave_room_for_what_kestrel_appends() {
        let mut c = base();
        let room = MAX_CMDLINE_LEN - CMDLINE_RESERVED_LEN;
        c.boot_source.boot_args = Some("x".repeat(room));
        c.validate_for_boot().unwrap();
        c.boot_source.boot_args = Some("x".repeat(room + 1));
        assert_eq!(field(&c), "boot-source.boot_args");
        // Each device takes room too.
        c.boot_source.boot_args = Some("x".repeat(room));
        c.drives.push(DriveConfig {
            drive_id: "d0".into(),
            ..DriveConfig::default()
        });
        let e = c.validate_for_boot().unwrap_err();
        assert_eq!(e.field(), Some("boot-source.boot_args"));
        assert!(e.to_string().contains("Kestrel appends"), "{e}");
    }

    #[test]
    fn directories_where_files_are_expected_refused() {
        let d = dir("a-directory");
        let mut c = base();
        c.boot_source.kernel_image_path = d.clone();
        assert_eq!(field(&c), "boot-source.kernel_image_path");
        let mut c = base();
        c.boot_source.initrd_path = Some(d.clone());
        assert_eq!(field(&c), "boot-source.initrd_path");
        let mut c = base();
        c.drives.push(DriveConfig {
            drive_id: "d0".into(),
            path_on_host: Some(d.clone()),
            ..DriveConfig::default()
        });
        let e = c.validate_for_boot().unwrap_err();
        assert_eq!(e.field(), Some("drives[0].path_on_host"));
        assert!(e.to_string().contains("a directory"), "{e}");
        let mut c = base();
        c.serial.output = SerialOutput::File;
        c.serial.path = Some(d);
        let e = c.validate_for_boot().unwrap_err();
        assert_eq!(e.field(), Some("serial.path"));
        assert!(e.to_string().contains("a directory"), "{e}");
    }

    #[test]
    fn serial_path_fifo_refused_char_device_and_new_file_accepted() {
        let mut c = base();
        c.serial.output = SerialOutput::File;
        c.serial.path = Some("/dev/null".into());
        c.validate_for_boot().unwrap();
        c.serial.path = Some(dir("serial").join("new-console.log"));
        c.validate_for_boot().unwrap();
        let fifo = dir("serial").join("fifo");
        let _ = std::fs::remove_file(&fifo);
        let st = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(st.success());
        c.serial.path = Some(fifo);
        let e = c.validate_for_boot().unwrap_err();
        assert_eq!(e.field(), Some("serial.path"));
        assert!(e.to_string().contains("a FIFO"), "{e}");
    }

    #[test]
    fn kernel_that_is_not_elf_or_bzimage_refused() {
        let mut c = base();
        c.boot_source.kernel_image_path = file("not-a-kernel", b"#!/bin/sh\necho hi\n");
        let e = c.validate_for_boot().unwrap_err();
        assert_eq!(e.field(), Some("boot-source.kernel_image_path"));
        assert!(e.to_string().contains("neither"), "{e}");
        // A 32-bit ELF is not loadable either.
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 1;
        c.boot_source.kernel_image_path = file("elf32", &h);
        assert_eq!(field(&c), "boot-source.kernel_image_path");
        // `validate` alone does not read the kernel.
        c.validate().unwrap();
    }

    #[test]
    fn initrd_larger_than_guest_ram_refused() {
        let mut c = base();
        c.machine_config.mem_size_mib = MIN_MEM_SIZE_MIB;
        let big = dir("initrd").join("big.cpio");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MIN_MEM_SIZE_MIB << 20).unwrap(); // sparse
        c.boot_source.initrd_path = Some(big);
        let e = c.validate_for_boot().unwrap_err();
        assert_eq!(e.field(), Some("boot-source.initrd_path"));
        c.machine_config.mem_size_mib = 2 * MIN_MEM_SIZE_MIB;
        c.validate_for_boot().unwrap();
    }

    #[test]
    fn read_only_image_needs_is_read_only() {
        if unsafe_is_root() {
            return; // root opens anything read-write
        }
        let img = file("ro.img", &[0u8; 512]);
        let mut perms = std::fs::metadata(&img).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
        std::fs::set_permissions(&img, perms).unwrap();
        let mut c = base();
        c.drives.push(DriveConfig {
            drive_id: "d0".into(),
            path_on_host: Some(img),
            ..DriveConfig::default()
        });
        assert_eq!(field(&c), "drives[0].path_on_host");
        c.drives[0].is_read_only = true;
        c.validate_for_boot().unwrap();
    }

    fn unsafe_is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
            })
            .unwrap_or(false)
    }

    #[test]
    fn rate_limiter_refill_overflow_names_the_field() {
        let mut c = base();
        c.drives.push(DriveConfig {
            drive_id: "d0".into(),
            rate_limiter: Some(crate::RateLimiterConfig {
                bandwidth: Some(crate::TokenBucketConfig {
                    size: 1,
                    one_time_burst: None,
                    refill_time: 1 << 58,
                }),
                ops: None,
            }),
            ..DriveConfig::default()
        });
        assert_eq!(field(&c), "drives[0].rate_limiter.bandwidth.refill_time");
    }

    #[test]
    fn config_file_reads_are_bounded_and_regular_files_only() {
        for special in ["/dev/zero", "/dev/null"] {
            assert!(matches!(
                VmConfig::from_file(Path::new(special)),
                Err(ConfigError::NotARegularFile { .. })
            ));
        }
        assert!(matches!(
            VmConfig::from_file(&dir("cfg-dir")),
            Err(ConfigError::NotARegularFile { .. })
        ));
        let fifo = dir("cfg").join("fifo.json");
        let _ = std::fs::remove_file(&fifo);
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        // Returns at once (no writer ever appears).
        assert!(matches!(
            VmConfig::from_file(&fifo),
            Err(ConfigError::NotARegularFile { .. })
        ));
        let big = dir("cfg").join("big.json");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_CONFIG_FILE_LEN + 1).unwrap();
        assert!(matches!(
            VmConfig::from_file(&big),
            Err(ConfigError::FileTooLarge { .. })
        ));
        let ok = file(
            "ok.json",
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{}"}},
                    "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}}}}"#,
                elf_kernel().display()
            )
            .as_bytes(),
        );
        VmConfig::from_file(&ok)
            .unwrap()
            .validate_for_boot()
            .unwrap();
    }
}
