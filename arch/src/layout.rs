//! Guest-physical memory layout of a Kestrel x86_64 guest.
//!
//! Every address the boot code writes to, and every address range the VMM must keep free of RAM
//! (the 32-bit MMIO hole), is defined here so that the e820 map, the MP table, the zero page and
//! the VMM's memory manager all agree. See the crate-level documentation for a picture.

use vm_memory::GuestAddress;

/// One KiB.
const KIB: u64 = 1 << 10;
/// One MiB.
const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;

/// The kernel is loaded at or above 1 MiB ("high memory" in boot-protocol terms).
pub const HIMEM_START: u64 = MIB;

/// Boot GDT: four 8-byte descriptors (null, code64, data, TSS).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT: a single empty descriptor (the kernel installs its own very early).
pub const BOOT_IDT_START: u64 = 0x520;

/// The Linux zero page (`struct boot_params`, 4 KiB).
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Initial stack pointer of the boot vCPU (grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Identity page tables used to enter long mode: one PML4 page, one PDPT page and one page
/// directory of 2 MiB pages that maps the first GiB.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 x 2 MiB pages) of the boot identity map.
pub const PDE_START: u64 = 0xb000;

/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Size reserved for the kernel command line, including its terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of the extended BIOS data area: the last KiB of conventional memory (639 KiB). Linux
/// scans it for the MP floating pointer; it is reserved in the e820 map up to 1 MiB.
pub const EBDA_START: u64 = 639 * KIB;
/// Where the MP floating pointer (followed by the MP configuration table) is written.
pub const MPTABLE_START: u64 = EBDA_START;

/// Start of the 32-bit MMIO hole (3 GiB). No RAM is placed in `MMIO_GAP_START..MMIO_GAP_END`.
pub const MMIO_GAP_START: u64 = 3 * GIB;
/// End (exclusive) of the 32-bit MMIO hole (4 GiB). RAM above 3 GiB continues here.
pub const MMIO_GAP_END: u64 = 4 * GIB;
/// Size of the 32-bit MMIO hole.
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;

/// First virtio-mmio device window; device `n` lives at `VIRTIO_MMIO_START + n * VIRTIO_MMIO_WINDOW`.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;

/// I/O APIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;

/// Guest memory block size used for memory hotplug (the Linux x86_64 block size below 64 GiB).
pub const MEM_BLOCK_SIZE: u64 = 128 * MIB;

/// Alignment of the hotplug region's start.
pub const HOTPLUG_ALIGNMENT: u64 = GIB;

// The low-memory structures must not overlap; checked at compile time.
const _: () = {
    assert!(BOOT_GDT_START + 4 * 8 == BOOT_IDT_START);
    assert!(BOOT_IDT_START + 8 <= ZERO_PAGE_START);
    assert!(ZERO_PAGE_START + 4096 <= BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PML4_START + 0x1000 == PDPTE_START);
    assert!(PDPTE_START + 0x1000 == PDE_START);
    assert!(PDE_START + 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= MPTABLE_START);
    assert!(MPTABLE_START < HIMEM_START);
    assert!(MMIO_GAP_START < VIRTIO_MMIO_START && VIRTIO_MMIO_START < IOAPIC_START);
    assert!(IOAPIC_START < APIC_START && APIC_START < MMIO_GAP_END);
    assert!(HOTPLUG_ALIGNMENT.is_multiple_of(MEM_BLOCK_SIZE));
};

/// RAM regions backing `mem_size` bytes of boot RAM.
///
/// `[0, min(mem_size, 3 GiB))` and, when `mem_size` is larger than 3 GiB, the rest from 4 GiB up.
/// A `mem_size` of 0 gives no region.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_size.min(MMIO_GAP_START);
    let mut regions = Vec::with_capacity(2);
    if low > 0 {
        regions.push((GuestAddress(0), crate::u64_to_usize(low)));
    }
    let high = mem_size - low;
    if high > 0 {
        regions.push((GuestAddress(MMIO_GAP_END), crate::u64_to_usize(high)));
    }
    regions
}

/// Guest-physical end (exclusive) of `mem_size` bytes of boot RAM, accounting for the hole.
///
/// Saturates at `u64::MAX` for sizes that cannot be mapped anyway.
pub fn ram_end(mem_size: u64) -> u64 {
    if mem_size <= MMIO_GAP_START {
        mem_size
    } else {
        mem_size.saturating_add(MMIO_GAP_SIZE)
    }
}

/// Guest-physical region reserved for hot-added memory: `(start, size)`.
///
/// It starts at the first 1 GiB boundary at or above [`ram_end`] and is `max_mem_size -
/// mem_size` bytes long. If that range would reach into the 3–4 GiB MMIO hole it is moved up to
/// start at 4 GiB instead. Returns `None` when there is nothing to hot-add (`max_mem_size <=
/// mem_size`) or when the region would not fit in the 64-bit address space.
///
/// The region is never listed in the e820 map; the VMM hands it out in [`MEM_BLOCK_SIZE`]
/// blocks and the guest adds them through `/sys/devices/system/memory/probe`.
pub fn hotplug_region(mem_size: u64, max_mem_size: u64) -> Option<(GuestAddress, u64)> {
    let size = max_mem_size.checked_sub(mem_size).filter(|s| *s > 0)?;
    let end_of_ram = ram_end(mem_size);
    let mut start = end_of_ram.checked_next_multiple_of(HOTPLUG_ALIGNMENT)?;
    let overlaps_hole = start < MMIO_GAP_END
        && start
            .checked_add(size)
            .is_none_or(|end| end > MMIO_GAP_START);
    if overlaps_hole {
        start = MMIO_GAP_END;
    }
    // The whole region must be addressable.
    start.checked_add(size)?;
    Some((GuestAddress(start), size))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test constants, all small
mod tests {
    use super::*;

    #[test]
    fn constants_match_the_documented_layout() {
        assert_eq!(EBDA_START, 0x9fc00);
        assert_eq!(MPTABLE_START, EBDA_START);
        assert_eq!(MMIO_GAP_START, 0xc000_0000);
        assert_eq!(MMIO_GAP_END, 0x1_0000_0000);
        assert_eq!(MMIO_GAP_SIZE, GIB);
        assert_eq!(MEM_BLOCK_SIZE, 128 << 20);
    }

    #[test]
    fn ram_below_the_hole() {
        let mem = 256 * MIB;
        assert_eq!(ram_regions(mem), vec![(GuestAddress(0), mem as usize)]);
        assert_eq!(ram_end(mem), mem);
    }

    #[test]
    fn ram_exactly_three_gib() {
        let mem = 3 * GIB;
        assert_eq!(ram_regions(mem), vec![(GuestAddress(0), mem as usize)]);
        assert_eq!(ram_end(mem), MMIO_GAP_START);
    }

    #[test]
    fn ram_above_the_hole_continues_at_four_gib() {
        let mem = 3 * GIB + 512 * MIB;
        assert_eq!(
            ram_regions(mem),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), (512 * MIB) as usize)
            ]
        );
        assert_eq!(ram_end(mem), 4 * GIB + 512 * MIB);

        let mem = 6 * GIB;
        assert_eq!(
            ram_regions(mem),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), (3 * GIB) as usize)
            ]
        );
        assert_eq!(ram_end(mem), 7 * GIB);
        let total: usize = ram_regions(mem).iter().map(|r| r.1).sum();
        assert_eq!(total as u64, mem);
    }

    #[test]
    fn ram_regions_of_zero_is_empty() {
        assert!(ram_regions(0).is_empty());
        assert_eq!(ram_end(0), 0);
    }

    #[test]
    fn hotplug_below_the_hole() {
        // 256 MiB boot RAM, 1 GiB max: 768 MiB region at 1 GiB.
        assert_eq!(
            hotplug_region(256 * MIB, GIB),
            Some((GuestAddress(GIB), 768 * MIB))
        );
        // RAM ending exactly on a boundary: the region starts right there.
        assert_eq!(hotplug_region(GIB, 2 * GIB), Some((GuestAddress(GIB), GIB)));
        // Region that would run into the hole is moved above it.
        assert_eq!(
            hotplug_region(256 * MIB, 4 * GIB),
            Some((GuestAddress(4 * GIB), 4 * GIB - 256 * MIB))
        );
        // RAM up to 2.5 GiB: next boundary is 3 GiB, the hole start; must move to 4 GiB.
        assert_eq!(
            hotplug_region(2 * GIB + 512 * MIB, 3 * GIB),
            Some((GuestAddress(4 * GIB), 512 * MIB))
        );
        // Exactly 3 GiB of RAM.
        assert_eq!(
            hotplug_region(3 * GIB, 4 * GIB),
            Some((GuestAddress(4 * GIB), GIB))
        );
    }

    #[test]
    fn hotplug_above_the_hole() {
        // 3.5 GiB boot RAM ends at 4.5 GiB; the region starts at 5 GiB.
        let boot = 3 * GIB + 512 * MIB;
        let (start, size) = hotplug_region(boot, 8 * GIB).expect("region");
        assert_eq!(start, GuestAddress(5 * GIB));
        assert_eq!(size, 8 * GIB - boot);
        assert!(start.0 >= ram_end(boot));
        assert_eq!(start.0 % GIB, 0);
        assert_eq!(start.0 % MEM_BLOCK_SIZE, 0);
    }

    #[test]
    fn no_hotplug_region_without_headroom() {
        assert_eq!(hotplug_region(GIB, GIB), None);
        assert_eq!(hotplug_region(GIB, 512 * MIB), None);
        assert_eq!(hotplug_region(GIB, u64::MAX), None);
    }
}
