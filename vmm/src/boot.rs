//! Loading the guest: kernel (ELF `vmlinux` or bzImage), initrd, command line, boot params and
//! MP table.

use std::fs::File;
use std::path::Path;

use kestrel_api::VmConfig;
use kestrel_arch::layout;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, Error as ElfError};
use linux_loader::loader::{load_cmdline, Error as LoaderError, KernelLoader};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::error::VmmError;

/// Default kernel command line when `boot_args` is absent.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1";

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
pub(crate) fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, VmmError> {
    let open = || {
        File::open(path).map_err(|source| VmmError::File {
            field: "boot-source.kernel_image_path",
            path: path.display().to_string(),
            source,
        })
    };
    let load_err = |source| VmmError::KernelLoad {
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
) -> Result<(GuestAddress, usize), VmmError> {
    let file_err = |source| VmmError::File {
        field: "boot-source.initrd_path",
        path: path.display().to_string(),
        source,
    };
    let mut f = File::open(path).map_err(file_err)?;
    let size = f.metadata().map_err(file_err)?.len() as usize;
    let addr = kestrel_arch::boot::initrd_load_addr(mem_size, size).map_err(VmmError::Initrd)?;
    if addr.0 < kernel_end {
        return Err(VmmError::File {
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
) -> Result<Cmdline, VmmError> {
    let mut c = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(VmmError::Cmdline)?;
    let base = config
        .boot_source
        .boot_args
        .as_deref()
        .unwrap_or(DEFAULT_BOOT_ARGS);
    if !base.trim().is_empty() {
        c.insert_str(base.trim()).map_err(VmmError::Cmdline)?;
    }
    if software_kvm {
        c.insert_str(SOFTWARE_KVM_ARGS).map_err(VmmError::Cmdline)?;
        if max_vcpus > 1 {
            // Parallel AP bring-up reads the APIC id with CPUID, which this KVM does not filter.
            c.insert_str("cpuhp.parallel=0")
                .map_err(VmmError::Cmdline)?;
        }
    }
    if max_vcpus > config.machine_config.vcpu_count {
        c.insert("maxcpus", &config.machine_config.vcpu_count.to_string())
            .map_err(VmmError::Cmdline)?;
    }
    for e in extra {
        c.insert_str(e).map_err(VmmError::Cmdline)?;
    }
    Ok(c)
}

/// Write command line, boot params and MP table.
pub(crate) fn write_boot_data(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline: &Cmdline,
    initrd: Option<(GuestAddress, usize)>,
    kernel: &LoadedKernel,
    max_vcpus: u32,
) -> Result<(), VmmError> {
    let cmdline_addr = GuestAddress(layout::CMDLINE_START);
    load_cmdline(mem, cmdline_addr, cmdline).map_err(VmmError::CmdlineLoad)?;
    let len = cmdline
        .as_cstring()
        .map_err(VmmError::Cmdline)?
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
    .map_err(VmmError::BootParams)?;
    kestrel_arch::mptable::setup_mptable(mem, max_vcpus as u8).map_err(VmmError::MpTable)?;
    debug_assert!(mem.num_regions() > 0);
    Ok(())
}
