//! Linux boot protocol: the zero page (`struct boot_params`) and initrd placement.
//!
//! The VMM enters the kernel at its 64-bit entry point (see [`crate::regs`]), with `rsi`
//! pointing at the zero page written here. The setup header is either the one linux-loader read
//! from a bzImage, or an empty one for an ELF `vmlinux`; either way the loader-owned fields
//! (loader type, command line, initrd, heap, e820) are filled in by [`configure_system`].

use linux_loader::loader::bootparam::{
    boot_params, setup_header, CAN_USE_HEAP, E820_MAX_ENTRIES_ZEROPAGE, LOADED_HIGH,
};
use thiserror::Error;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::e820::e820_entries;
use crate::layout::{HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START};

/// `loadflags` bits (the bindings give them as `u32`; they are bits 0 and 7 of a `u8`).
#[allow(clippy::cast_possible_truncation)]
const LOADED_HIGH_FLAG: u8 = LOADED_HIGH as u8;
#[allow(clippy::cast_possible_truncation)]
const CAN_USE_HEAP_FLAG: u8 = CAN_USE_HEAP as u8;

/// `boot_flag` magic (0xAA55) of a valid setup header.
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` magic ("HdrS") of a valid setup header.
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` value for a boot loader without an assigned id.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Minimum alignment of a relocatable kernel (16 MiB), used when no bzImage header is given.
pub const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// End of the real-mode setup heap, relative to the start of the real-mode code (boot protocol
/// recommendation for loaders that set `CAN_USE_HEAP`).
const HEAP_END_PTR: u16 = 0xfe00;
/// Page size used to align the initrd.
pub const PAGE_SIZE: u64 = 0x1000;

/// Errors setting up the zero page or placing the initrd.
#[derive(Debug, Error)]
pub enum BootError {
    /// The command line is not inside guest memory.
    #[error("kernel command line ({size} bytes at {addr:#x}) is not inside guest memory")]
    CmdlineNotInMemory {
        /// Guest-physical address of the command line.
        addr: u64,
        /// Size of the command line including the terminating NUL.
        size: usize,
    },
    /// The command line is longer than the kernel's setup header allows.
    #[error("kernel command line of {size} bytes exceeds the kernel's limit of {max} bytes")]
    CmdlineTooLong {
        /// Size of the command line including the terminating NUL.
        size: usize,
        /// Limit from the setup header (excluding the NUL).
        max: u32,
    },
    /// The initrd is not inside guest memory.
    #[error("initrd ({size} bytes at {addr:#x}) is not inside guest memory")]
    InitrdNotInMemory {
        /// Guest-physical address of the initrd.
        addr: u64,
        /// Size of the initrd.
        size: usize,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error(
        "initrd of {size} bytes does not fit between {lowest:#x} and {top:#x} \
         (guest RAM {mem_size:#x} bytes)"
    )]
    InitrdTooBig {
        /// Size of the initrd.
        size: usize,
        /// Boot RAM size.
        mem_size: u64,
        /// Lowest address the initrd may start at (end of the kernel).
        lowest: u64,
        /// Exclusive upper bound for the initrd's end.
        top: u64,
    },
    /// The e820 map has more entries than the zero page can hold.
    #[error(
        "e820 map for {mem_size:#x} bytes of RAM has {count} entries, the zero page holds {max}"
    )]
    TooManyE820Entries {
        /// Boot RAM size.
        mem_size: u64,
        /// Number of entries produced.
        count: usize,
        /// Capacity of the zero page table.
        max: u32,
    },
    /// The zero page is not inside guest memory.
    #[error("zero page at {ZERO_PAGE_START:#x} is not inside guest memory")]
    ZeroPageNotInMemory,
    /// Writing the zero page failed.
    #[error("failed to write the zero page at {ZERO_PAGE_START:#x}: {0}")]
    ZeroPageWrite(#[source] vm_memory::GuestMemoryError),
}

/// Builds the zero page contents (pure; [`configure_system`] writes the result).
///
/// See [`configure_system`] for the meaning of the arguments.
pub fn build_boot_params(
    mem_size: u64,
    cmdline_addr: GuestAddress,
    cmdline_size: usize,
    initrd: Option<(GuestAddress, usize)>,
    setup_header: Option<setup_header>,
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();

    match setup_header {
        Some(hdr) => {
            // Since protocol 2.06 the kernel tells the loader its command line limit.
            let version = hdr.version;
            let max = hdr.cmdline_size;
            if version >= 0x0206 && max > 0 && cmdline_size.saturating_sub(1) > max as usize {
                return Err(BootError::CmdlineTooLong {
                    size: cmdline_size,
                    max,
                });
            }
            params.hdr = hdr;
        }
        None => {
            // ELF vmlinux: no header from the kernel. Describe what the loader did.
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            params.hdr.loadflags = LOADED_HIGH_FLAG;
        }
    }

    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    // KEEP_SEGMENTS only matters for the 32-bit entry (and is ignored by current kernels); we
    // enter in 64-bit mode, so leave it clear. Offer the real-mode heap, harmless otherwise.
    params.hdr.loadflags |= CAN_USE_HEAP_FLAG;
    params.hdr.heap_end_ptr = HEAP_END_PTR;

    let cmdline = cmdline_addr.raw_value();
    (params.hdr.cmd_line_ptr, params.ext_cmd_line_ptr) = crate::split_u64(cmdline);
    params.hdr.cmdline_size =
        u32::try_from(cmdline_size).map_err(|_| BootError::CmdlineTooLong {
            size: cmdline_size,
            max: u32::MAX,
        })?;

    if let Some((addr, size)) = initrd {
        let addr = addr.raw_value();
        (params.hdr.ramdisk_image, params.ext_ramdisk_image) = crate::split_u64(addr);
        (params.hdr.ramdisk_size, params.ext_ramdisk_size) = crate::split_u64(size as u64);
    }

    let entries = e820_entries(mem_size);
    let count = u8::try_from(entries.len())
        .ok()
        .filter(|&n| u32::from(n) <= E820_MAX_ENTRIES_ZEROPAGE)
        .ok_or(BootError::TooManyE820Entries {
            mem_size,
            count: entries.len(),
            max: E820_MAX_ENTRIES_ZEROPAGE,
        })?;
    for (slot, entry) in params.e820_table.iter_mut().zip(entries.iter()) {
        *slot = *entry;
    }
    params.e820_entries = count;

    Ok(params)
}

/// Writes the Linux zero page (`boot_params`) at [`ZERO_PAGE_START`].
///
/// - `mem_size`: boot RAM size; the e820 map is [`crate::e820::e820_entries`] of it.
/// - `cmdline_addr`, `cmdline_size`: where the command line was written and its size including
///   the terminating NUL. Both must lie in `mem`.
/// - `initrd`: address and size of an already loaded initrd, if any.
/// - `setup_header`: the bzImage setup header read by linux-loader, used as the base header
///   (its command line limit is enforced); `None` for an ELF `vmlinux`.
///
/// The header gets the boot-flag and "HdrS" magics, `type_of_loader = 0xff`, `CAN_USE_HEAP`
/// with `heap_end_ptr`, the command line pointer/size and the initrd (using the `ext_*` fields
/// for the upper 32 bits of addresses above 4 GiB).
pub fn configure_system<M: GuestMemory>(
    mem: &M,
    mem_size: u64,
    cmdline_addr: GuestAddress,
    cmdline_size: usize,
    initrd: Option<(GuestAddress, usize)>,
    setup_header: Option<setup_header>,
) -> Result<(), BootError> {
    if !mem.check_range(cmdline_addr, cmdline_size) {
        return Err(BootError::CmdlineNotInMemory {
            addr: cmdline_addr.raw_value(),
            size: cmdline_size,
        });
    }
    if let Some((addr, size)) = initrd {
        if size > 0 && !mem.check_range(addr, size) {
            return Err(BootError::InitrdNotInMemory {
                addr: addr.raw_value(),
                size,
            });
        }
    }
    let params = build_boot_params(mem_size, cmdline_addr, cmdline_size, initrd, setup_header)?;

    let zero_page = GuestAddress(ZERO_PAGE_START);
    if !mem.check_range(zero_page, std::mem::size_of::<boot_params>()) {
        return Err(BootError::ZeroPageNotInMemory);
    }
    mem.write_obj(params, zero_page)
        .map_err(BootError::ZeroPageWrite)?;
    tracing::debug!(
        mem_size,
        cmdline = cmdline_addr.raw_value(),
        cmdline_size,
        initrd = ?initrd.map(|(a, s)| (a.raw_value(), s)),
        "zero page written"
    );
    Ok(())
}

/// Highest page-aligned address at which an initrd of `size` bytes fits below
/// `min(ram_end, 3 GiB)` and at or above `lowest` (typically the end of the loaded kernel).
pub fn initrd_load_addr_above(
    mem_size: u64,
    size: usize,
    lowest: u64,
) -> Result<GuestAddress, BootError> {
    let top = mem_size.min(MMIO_GAP_START);
    let too_big = || BootError::InitrdTooBig {
        size,
        mem_size,
        lowest,
        top,
    };
    let start = top.checked_sub(size as u64).ok_or_else(too_big)?;
    let aligned = start - start % PAGE_SIZE;
    if aligned < lowest {
        return Err(too_big());
    }
    Ok(GuestAddress(aligned))
}

/// Highest page-aligned address at which an initrd of `size` bytes fits below
/// `min(ram_end, MMIO_GAP_START)` and above the kernel's load address ([`HIMEM_START`]).
///
/// Use [`initrd_load_addr_above`] to also keep it clear of a kernel image whose end is known.
pub fn initrd_load_addr(mem_size: u64, size: usize) -> Result<GuestAddress, BootError> {
    initrd_load_addr_above(mem_size, size, HIMEM_START)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test constants, all small
mod tests {
    use super::*;
    use crate::e820::{E820_RAM, E820_RESERVED};
    use crate::layout::{CMDLINE_START, GIB, MMIO_GAP_END};
    use linux_loader::loader::bootparam::boot_e820_entry;
    use vm_memory::GuestMemoryMmap;

    const MIB: u64 = 1 << 20;

    fn guest_mem(size: u64) -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).expect("guest memory")
    }

    fn e820_of(p: &boot_params) -> Vec<(u64, u64, u32)> {
        let table = p.e820_table;
        table[..usize::from(p.e820_entries)]
            .iter()
            .map(|e: &boot_e820_entry| (e.addr, e.size, e.type_))
            .collect()
    }

    #[test]
    fn configure_system_writes_readable_zero_page() {
        let mem_size = 128 * MIB;
        let mem = guest_mem(mem_size);
        let cmdline = b"console=ttyS0 reboot=k panic=1\0";
        mem.write_slice(cmdline, GuestAddress(CMDLINE_START))
            .expect("cmdline");
        let initrd = (GuestAddress(0x700_0000), 0x12345);
        configure_system(
            &mem,
            mem_size,
            GuestAddress(CMDLINE_START),
            cmdline.len(),
            Some(initrd),
            None,
        )
        .expect("configure");

        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).expect("read");
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_ne!(hdr.loadflags & CAN_USE_HEAP_FLAG, 0);
        assert_ne!(hdr.loadflags & LOADED_HIGH_FLAG, 0);
        assert_eq!({ hdr.heap_end_ptr }, HEAP_END_PTR);
        assert_eq!({ hdr.kernel_alignment }, KERNEL_MIN_ALIGNMENT_BYTES);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.ext_cmd_line_ptr }, 0);
        assert_eq!({ hdr.cmdline_size } as usize, cmdline.len());
        assert_eq!({ hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x12345);
        assert_eq!({ p.ext_ramdisk_image }, 0);

        // The command line the header points at reads back.
        let mut buf = vec![0u8; { hdr.cmdline_size } as usize];
        mem.read_slice(&mut buf, GuestAddress(u64::from(hdr.cmd_line_ptr)))
            .expect("read cmdline");
        assert_eq!(&buf[..], &cmdline[..]);

        assert_eq!(
            e820_of(&p),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x60400, E820_RESERVED),
                (0x10_0000, mem_size - 0x10_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn configure_system_uses_the_bzimage_header() {
        let mem = guest_mem(64 * MIB);
        let hdr = setup_header {
            setup_sects: 0x1e,
            version: 0x020f,
            kernel_version: 0x3b0,
            loadflags: LOADED_HIGH_FLAG,
            kernel_alignment: 0x20_0000,
            cmdline_size: 0x7ff,
            init_size: 0x123_4000,
            type_of_loader: 0,
            ..Default::default()
        };
        configure_system(
            &mem,
            64 * MIB,
            GuestAddress(CMDLINE_START),
            100,
            None,
            Some(hdr),
        )
        .expect("configure");
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).expect("read");
        let got = p.hdr;
        // Kernel-owned fields kept.
        assert_eq!({ got.setup_sects }, 0x1e);
        assert_eq!({ got.version }, 0x020f);
        assert_eq!({ got.kernel_alignment }, 0x20_0000);
        assert_eq!({ got.init_size }, 0x123_4000);
        // Loader-owned fields filled in.
        assert_eq!({ got.type_of_loader }, 0xff);
        assert_eq!({ got.cmdline_size }, 100);
        assert_eq!({ got.ramdisk_image }, 0);
        assert_eq!({ got.ramdisk_size }, 0);
        assert_eq!({ got.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.e820_entries }, 3);
    }

    #[test]
    fn configure_system_enforces_the_kernels_cmdline_limit() {
        let mem = guest_mem(64 * MIB);
        let hdr = setup_header {
            version: 0x020f,
            cmdline_size: 255,
            ..Default::default()
        };
        let err = configure_system(
            &mem,
            64 * MIB,
            GuestAddress(CMDLINE_START),
            300,
            None,
            Some(hdr),
        )
        .expect_err("too long");
        assert!(
            matches!(
                err,
                BootError::CmdlineTooLong {
                    size: 300,
                    max: 255
                }
            ),
            "{err}"
        );
        // 255 characters plus NUL is fine.
        configure_system(
            &mem,
            64 * MIB,
            GuestAddress(CMDLINE_START),
            256,
            None,
            Some(hdr),
        )
        .expect("at the limit");
    }

    #[test]
    fn configure_system_above_4gib_uses_ext_fields() {
        let p = build_boot_params(
            6 * GIB,
            GuestAddress(CMDLINE_START),
            10,
            Some((GuestAddress(MMIO_GAP_END + 0x20_0000), 0x1_0000_1000)),
            None,
        )
        .expect("params");
        assert_eq!({ p.hdr.ramdisk_image }, 0x20_0000);
        assert_eq!({ p.ext_ramdisk_image }, 1);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1000);
        assert_eq!({ p.ext_ramdisk_size }, 1);
        assert_eq!(
            e820_of(&p).last().copied(),
            Some((4 * GIB, 3 * GIB, E820_RAM))
        );
    }

    #[test]
    fn configure_system_rejects_out_of_memory_inputs() {
        let mem = guest_mem(16 * MIB);
        let err = configure_system(&mem, 16 * MIB, GuestAddress(16 * MIB), 10, None, None)
            .expect_err("cmdline outside");
        assert!(
            matches!(err, BootError::CmdlineNotInMemory { addr, size: 10 } if addr == 16 * MIB),
            "{err}"
        );
        let err = configure_system(
            &mem,
            16 * MIB,
            GuestAddress(CMDLINE_START),
            10,
            Some((GuestAddress(15 * MIB), 2 * MIB as usize)),
            None,
        )
        .expect_err("initrd outside");
        assert!(matches!(err, BootError::InitrdNotInMemory { .. }), "{err}");

        // Guest memory that does not reach the zero page.
        let tiny = guest_mem(0x4000);
        let err = configure_system(&tiny, 0x4000, GuestAddress(0x1000), 10, None, None)
            .expect_err("zero page outside");
        assert!(matches!(err, BootError::ZeroPageNotInMemory), "{err}");
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory_page_aligned() {
        let mem = 256 * MIB;
        let addr = initrd_load_addr(mem, 0x1234).expect("fits");
        assert_eq!(addr.raw_value() % PAGE_SIZE, 0);
        assert!(addr.raw_value() + 0x1234 <= mem);
        // Highest: one page more would not fit.
        assert_eq!(addr.raw_value(), mem - 0x2000);

        // Exactly page-sized: ends right at the top.
        assert_eq!(
            initrd_load_addr(mem, 0x1000).expect("fits").raw_value(),
            mem - 0x1000
        );

        // Above 3 GiB of RAM the initrd still stays below the MMIO hole.
        let addr = initrd_load_addr(6 * GIB, 16 << 20).expect("fits");
        assert_eq!(addr.raw_value(), MMIO_GAP_START - (16 << 20));
    }

    #[test]
    fn initrd_too_big_is_an_error() {
        let mem = 64 * MIB;
        let err = initrd_load_addr(mem, (64 * MIB) as usize).expect_err("too big");
        assert!(
            matches!(err, BootError::InitrdTooBig { size, mem_size, .. }
                if size == (64 * MIB) as usize && mem_size == mem),
            "{err}"
        );
        assert!(err.to_string().contains(&(64 * MIB).to_string()));
        // Must stay above the kernel.
        assert!(initrd_load_addr(mem, (mem - HIMEM_START) as usize).is_ok());
        assert!(initrd_load_addr(mem, (mem - HIMEM_START + 1) as usize).is_err());
        assert!(initrd_load_addr_above(mem, 32 << 20, 40 << 20).is_err());
        assert!(initrd_load_addr_above(mem, 16 << 20, 40 << 20).is_ok());
    }
}
