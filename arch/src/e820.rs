//! The e820 memory map handed to the guest in the zero page.
//!
//! Only boot RAM is listed. The hotplug region is deliberately absent: the guest learns about
//! hot-added blocks through `/sys/devices/system/memory/probe`.

use linux_loader::loader::bootparam::boot_e820_entry;

use crate::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

fn entry(addr: u64, size: u64, type_: u32) -> boot_e820_entry {
    boot_e820_entry { addr, size, type_ }
}

/// e820 map for `mem_size` bytes of boot RAM, in ascending address order:
///
/// - RAM `0 .. 0x9fc00` (conventional memory, or less if `mem_size` is smaller),
/// - reserved `0x9fc00 .. 0x10_0000` (EBDA with the MP table, VGA hole, BIOS area),
/// - RAM `1 MiB .. min(mem_size, 3 GiB)` when `mem_size` is above 1 MiB,
/// - RAM `4 GiB .. 4 GiB + (mem_size - 3 GiB)` when `mem_size` is above 3 GiB.
///
/// Nothing is ever listed inside the 3–4 GiB MMIO hole.
pub fn e820_entries(mem_size: u64) -> Vec<boot_e820_entry> {
    let mut entries = Vec::with_capacity(4);
    let conventional = mem_size.min(EBDA_START);
    if conventional > 0 {
        entries.push(entry(0, conventional, E820_RAM));
    }
    entries.push(entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED));
    let low_end = mem_size.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        entries.push(entry(HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if mem_size > MMIO_GAP_START {
        entries.push(entry(MMIO_GAP_END, mem_size - MMIO_GAP_START, E820_RAM));
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{ram_end, GIB, MPTABLE_START};

    const MIB: u64 = 1 << 20;

    /// Plain (unpacked) copy of an entry, so tests can compare and pattern-match freely.
    fn triples(entries: &[boot_e820_entry]) -> Vec<(u64, u64, u32)> {
        entries.iter().map(|e| (e.addr, e.size, e.type_)).collect()
    }

    /// Ascending, non-overlapping, nothing in the hole, the MP region reserved, RAM adds up.
    fn check_invariants(mem_size: u64, entries: &[boot_e820_entry]) {
        let t = triples(entries);
        for pair in t.windows(2) {
            let (a, a_size, _) = pair[0];
            let (b, _, _) = pair[1];
            assert!(a + a_size <= b, "overlap or disorder in {t:x?}");
        }
        for &(addr, size, _) in &t {
            assert!(size > 0, "empty entry in {t:x?}");
            let end = addr + size;
            assert!(
                end <= MMIO_GAP_START || addr >= MMIO_GAP_END,
                "entry {addr:#x}..{end:#x} reaches into the MMIO hole"
            );
        }
        assert!(
            t.iter().any(|&(addr, size, ty)| ty == E820_RESERVED
                && addr <= MPTABLE_START
                && MPTABLE_START < addr + size),
            "MP table region not reserved in {t:x?}"
        );
        let ram: u64 = t
            .iter()
            .filter(|e| e.2 == E820_RAM)
            .map(|e| e.1)
            .sum::<u64>();
        // The reserved legacy area (EBDA..1 MiB) is backed but not usable RAM.
        assert_eq!(ram, mem_size - (HIMEM_START - EBDA_START));
        let last = t.last().map(|&(a, s, _)| a + s).unwrap_or(0);
        assert_eq!(last, ram_end(mem_size));
    }

    #[test]
    fn e820_256_mib() {
        let mem = 256 * MIB;
        let e = e820_entries(mem);
        assert_eq!(
            triples(&e),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, mem - 0x100000, E820_RAM),
            ]
        );
        check_invariants(mem, &e);
    }

    #[test]
    fn e820_exactly_3_gib() {
        let mem = 3 * GIB;
        let e = e820_entries(mem);
        assert_eq!(
            triples(&e),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, 3 * GIB - 0x100000, E820_RAM),
            ]
        );
        check_invariants(mem, &e);
    }

    #[test]
    fn e820_6_gib_splits_around_the_hole() {
        let mem = 6 * GIB;
        let e = e820_entries(mem);
        assert_eq!(
            triples(&e),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, 3 * GIB - 0x100000, E820_RAM),
                (4 * GIB, 3 * GIB, E820_RAM),
            ]
        );
        check_invariants(mem, &e);
    }

    #[test]
    fn e820_one_byte_above_the_hole() {
        let mem = 3 * GIB + 4096;
        let e = e820_entries(mem);
        assert_eq!(triples(&e).last().copied(), Some((4 * GIB, 4096, E820_RAM)));
        check_invariants(mem, &e);
    }
}
