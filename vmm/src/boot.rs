//! Loading the guest: kernel (ELF `vmlinux` or bzImage), initrd, command line, boot params and
//! MP table.

use std::fs::File;
use std::path::Path;

use kestrel_api::{DriveConfig, VmConfig};
use kestrel_arch::layout;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, Error as ElfError};
use linux_loader::loader::{load_cmdline, Error as LoaderError, KernelLoader};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};

use thiserror::Error;

/// Why the guest could not be loaded.
#[derive(Debug, Error)]
pub enum BootError {
    /// A file named in the configuration could not be opened or read.
    #[error("{field}: cannot read {path}: {source}")]
    File {
        /// The configuration field.
        field: &'static str,
        /// The path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is neither a loadable ELF nor a bzImage.
    #[error("boot-source.kernel_image_path: cannot load {path}: {source}")]
    KernelLoad {
        /// The path.
        path: String,
        /// linux-loader's reason.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd does not fit in guest memory.
    #[error("boot-source.initrd_path: {0}")]
    Initrd(#[source] kestrel_arch::boot::BootError),
    /// The kernel command line could not be built.
    #[error("boot-source.boot_args: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line could not be written into guest memory.
    #[error("cannot write the kernel command line into guest memory: {0}")]
    CmdlineLoad(#[source] linux_loader::loader::Error),
    /// Boot parameters could not be written.
    #[error("cannot write boot parameters: {0}")]
    BootParams(#[source] kestrel_arch::boot::BootError),
    /// The MP table could not be written.
    #[error("cannot write the MP table: {0}")]
    MpTable(#[source] kestrel_arch::mptable::MpTableError),
}

/// Default kernel command line when `boot_args` is absent: Firecracker's (no serial console).
pub use kestrel_api::DEFAULT_BOOT_ARGS;

/// Command-line switches a Linux guest needs on a software (nested) KVM, where CPUID filtering
/// does not reach the guest (docs/nested-kvm.md §2).
pub const SOFTWARE_KVM_ARGS: &str =
    "noxsave clearcpuid=smap,smep,popcnt,fsgsbase,cx16,erms,fsrm nopv";

/// Whether the host's KVM is a software implementation: `/dev/kvm` works but the host CPU shows
/// neither VT-x (`vmx`) nor AMD-V (`svm`).
pub fn host_kvm_is_software() -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return false;
    };
    let flags = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    !flags.split_whitespace().any(|f| f == "vmx" || f == "svm")
}

/// Where the guest starts and what the loader learnt about the kernel.
pub(crate) struct LoadedKernel {
    pub(crate) entry: u64,
    pub(crate) end: u64,
    pub(crate) setup_header: Option<setup_header>,
}

/// Load the kernel: an ELF `vmlinux` (entered at its ELF entry in 64-bit mode) or, failing
/// the ELF magic check, a bzImage (entered at the 64-bit entry, 0x200 past its load address).
pub(crate) fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let open = || {
        File::open(path).map_err(|source| BootError::File {
            field: "boot-source.kernel_image_path",
            path: path.display().to_string(),
            source,
        })
    };
    let load_err = |source| BootError::KernelLoad {
        path: path.display().to_string(),
        source,
    };
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let mut f = open()?;
    match Elf::load(mem, None, &mut f, himem) {
        Ok(r) => Ok(LoadedKernel {
            entry: r.kernel_load.0,
            end: r.kernel_end,
            setup_header: None,
        }),
        Err(LoaderError::Elf(ElfError::InvalidElfMagicNumber)) => {
            let mut f = open()?;
            let r = BzImage::load(mem, None, &mut f, himem).map_err(load_err)?;
            Ok(LoadedKernel {
                entry: r.kernel_load.0 + 0x200,
                end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
        Err(e) => Err(load_err(e)),
    }
}

/// Copy the initrd into guest memory below the MMIO gap, as high as it fits.
pub(crate) fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    kernel_end: u64,
) -> Result<(GuestAddress, usize), BootError> {
    let file_err = |source| BootError::File {
        field: "boot-source.initrd_path",
        path: path.display().to_string(),
        source,
    };
    let mut f = File::open(path).map_err(file_err)?;
    let len = f.metadata().map_err(file_err)?.len();
    let size = usize::try_from(len)
        .map_err(|_| file_err(std::io::Error::other(format!("{len} bytes is too large"))))?;
    let addr = kestrel_arch::boot::initrd_load_addr(mem_size, size).map_err(BootError::Initrd)?;
    if addr.0 < kernel_end {
        return Err(BootError::File {
            field: "boot-source.initrd_path",
            path: path.display().to_string(),
            source: std::io::Error::other(format!(
                "{size} bytes do not fit between the kernel (ends at {kernel_end:#x}) and the end of RAM"
            )),
        });
    }
    use vm_memory::Bytes;
    mem.read_exact_volatile_from(addr, &mut f, size)
        .map_err(|e| file_err(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

/// Build the kernel command line: the user's `boot_args` (or the default), then what the
/// machine needs. Returns the final string.
pub(crate) fn build_cmdline(
    config: &VmConfig,
    max_vcpus: u32,
    software_kvm: bool,
    extra: &[String],
) -> Result<Cmdline, BootError> {
    let mut c = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    let base = config.boot_source.boot_args_or_default();
    if !base.trim().is_empty() {
        c.insert_str(base.trim()).map_err(BootError::Cmdline)?;
    }
    if software_kvm {
        c.insert_str(SOFTWARE_KVM_ARGS)
            .map_err(BootError::Cmdline)?;
        if max_vcpus > 1 {
            // Parallel AP bring-up reads the APIC id with CPUID, which this KVM does not filter.
            c.insert_str("cpuhp.parallel=0")
                .map_err(BootError::Cmdline)?;
        }
    }
    if max_vcpus > config.machine_config.vcpu_count {
        c.insert("maxcpus", &config.machine_config.vcpu_count.to_string())
            .map_err(BootError::Cmdline)?;
    }
    for e in extra {
        c.insert_str(e).map_err(BootError::Cmdline)?;
    }
    Ok(c)
}

/// `root=` and `ro`/`rw` for the root drive, the `position`-th virtio device (`/dev/vd<a+position>`)
/// unless it is named by partition UUID.
pub(crate) fn root_args(drive: &DriveConfig, position: usize) -> [String; 2] {
    let root = match &drive.partuuid {
        Some(u) => format!("root=PARTUUID={u}"),
        None => format!("root=/dev/vd{}", disk_letter(position)),
    };
    let mode = if drive.is_read_only { "ro" } else { "rw" };
    [root, mode.to_string()]
}

/// The letter of the `position`-th virtio disk; at most 19 virtio devices fit, so always
/// `a`..`s` (`?` past `z`).
fn disk_letter(position: usize) -> char {
    u8::try_from(position)
        .ok()
        .filter(|p| *p < 26)
        .map_or('?', |p| char::from(b'a' + p))
}

/// Write command line, boot params and MP table.
pub(crate) fn write_boot_data(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline: &Cmdline,
    initrd: Option<(GuestAddress, usize)>,
    kernel: &LoadedKernel,
    max_vcpus: u32,
) -> Result<(), BootError> {
    let cmdline_addr = GuestAddress(layout::CMDLINE_START);
    load_cmdline(mem, cmdline_addr, cmdline).map_err(BootError::CmdlineLoad)?;
    let len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes()
        .len();
    kestrel_arch::boot::configure_system(
        mem,
        mem_size,
        cmdline_addr,
        len + 1,
        initrd,
        kernel.setup_header,
    )
    .map_err(BootError::BootParams)?;
    // max_vcpus never exceeds MAX_SUPPORTED_VCPUS (254): see `effective_max_vcpus`.
    let max = u8::try_from(max_vcpus).unwrap_or(u8::MAX);
    kestrel_arch::mptable::setup_mptable(mem, max).map_err(BootError::MpTable)?;
    debug_assert!(mem.num_regions() > 0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmdline(config: &VmConfig, max_vcpus: u32, software: bool, extra: &[&str]) -> String {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let c = build_cmdline(config, max_vcpus, software, &extra).unwrap();
        c.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn default_args_then_what_the_machine_needs_in_order() {
        let mut c = VmConfig::new("/k", 1, 128);
        // VmConfig::new turns the console on; a config without boot_args gets Firecracker's.
        assert_eq!(cmdline(&c, 1, false, &[]), kestrel_api::CONSOLE_BOOT_ARGS);
        c.boot_source.boot_args = None;
        assert_eq!(cmdline(&c, 1, false, &[]), DEFAULT_BOOT_ARGS);
        assert!(!DEFAULT_BOOT_ARGS.contains("console="));
        assert_eq!(
            cmdline(
                &c,
                1,
                false,
                &["root=/dev/vda", "rw", "virtio_mmio.device=4K@0xd0000000:5"]
            ),
            format!("{DEFAULT_BOOT_ARGS} root=/dev/vda rw virtio_mmio.device=4K@0xd0000000:5")
        );
    }

    #[test]
    fn user_args_are_trimmed_and_empty_ones_add_nothing() {
        let mut c = VmConfig::new("/k", 1, 128);
        c.boot_source.boot_args = Some("  console=ttyS0 quiet  ".into());
        assert_eq!(cmdline(&c, 1, false, &["x=1"]), "console=ttyS0 quiet x=1");
        c.boot_source.boot_args = Some("   ".into());
        assert_eq!(cmdline(&c, 1, false, &["x=1"]), "x=1");
        assert_eq!(cmdline(&c, 1, false, &[]), "");
    }

    #[test]
    fn software_kvm_switches_and_serial_ap_bring_up_with_more_than_one_vcpu() {
        let mut c = VmConfig::new("/k", 1, 128);
        c.boot_source.boot_args = Some("a".into());
        assert_eq!(cmdline(&c, 1, true, &[]), format!("a {SOFTWARE_KVM_ARGS}"));
        c.machine_config.vcpu_count = 2;
        assert_eq!(
            cmdline(&c, 2, true, &[]),
            format!("a {SOFTWARE_KVM_ARGS} cpuhp.parallel=0")
        );
        assert_eq!(cmdline(&c, 2, false, &[]), "a");
    }

    #[test]
    fn hot_pluggable_vcpus_boot_offline_with_maxcpus() {
        let mut c = VmConfig::new("/k", 2, 128);
        c.boot_source.boot_args = Some("a".into());
        assert_eq!(cmdline(&c, 2, false, &[]), "a");
        assert_eq!(cmdline(&c, 8, false, &["z"]), "a maxcpus=2 z");
        assert_eq!(
            cmdline(&c, 8, true, &[]),
            format!("a {SOFTWARE_KVM_ARGS} cpuhp.parallel=0 maxcpus=2")
        );
    }

    #[test]
    fn a_command_line_past_the_limit_is_an_error_naming_boot_args() {
        let c = VmConfig::new("/k", 1, 128);
        let long = vec!["x".repeat(layout::CMDLINE_MAX_SIZE)];
        let e = build_cmdline(&c, 1, false, &long).unwrap_err();
        assert!(matches!(e, BootError::Cmdline(_)));
        assert!(e.to_string().starts_with("boot-source.boot_args: "), "{e}");
    }

    #[test]
    fn root_drive_args_name_the_disk_or_the_partition() {
        let mut d = DriveConfig {
            drive_id: "root".into(),
            is_root_device: true,
            ..DriveConfig::default()
        };
        assert_eq!(root_args(&d, 0), ["root=/dev/vda", "rw"]);
        d.is_read_only = true;
        assert_eq!(root_args(&d, 2), ["root=/dev/vdc", "ro"]);
        d.partuuid = Some("0eaa91a0-01".into());
        assert_eq!(root_args(&d, 0), ["root=PARTUUID=0eaa91a0-01", "ro"]);
        assert_eq!(disk_letter(25), 'z');
        assert_eq!(disk_letter(26), '?');
    }
}
