//! Intel MultiProcessor Specification 1.4 tables.
//!
//! Without ACPI, the MP table is how a Linux guest learns about its processors, its I/O APIC
//! and how ISA interrupts are wired. It lists `max_cpus` processors so that CPUs beyond the boot
//! count (`maxcpus=` on the command line) exist but stay offline until hot-added.
//!
//! Layout written at [`MPTABLE_START`] (inside the EBDA, where Linux scans for it):
//!
//! ```text
//! +0   MP floating pointer (16 bytes, "_MP_")  -> physptr = base + 16
//! +16  MP configuration table header (44 bytes, "PCMP")
//!      processor entries      (20 bytes each, APIC ids 0..max_cpus, CPU 0 is the BSP)
//!      bus entry              (8 bytes, bus 0 = "ISA   ")
//!      I/O APIC entry         (8 bytes, id = max_cpus, at IOAPIC_START)
//!      I/O interrupt entries  (8 bytes each, ISA IRQ n -> I/O APIC pin n, n = 0..23)
//!      local interrupt entries (8 bytes each, LINT0 = ExtINT, LINT1 = NMI)
//! ```
//!
//! The tables are serialised field by field into a byte vector (little endian, as the spec
//! requires), so no `unsafe` plain-old-data casting is needed.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{APIC_START, HIMEM_START, IOAPIC_START, MPTABLE_START};

/// Highest number of processors the table can describe: APIC ids 0..=253, with 254 for the
/// I/O APIC and 255 being the broadcast id.
pub const MAX_SUPPORTED_CPUS: u8 = 254;

/// Number of I/O APIC input pins (the KVM in-kernel I/O APIC has 24).
pub const IOAPIC_PINS: u8 = 24;

/// MP spec revision 1.4.
const SPEC_REV: u8 = 4;
const FLOATING_POINTER_LEN: usize = 16;
const TABLE_HEADER_LEN: usize = 44;
const PROCESSOR_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// Processor entry flag: the processor is usable.
pub const CPU_FLAG_ENABLED: u8 = 1 << 0;
/// Processor entry flag: this is the bootstrap processor.
pub const CPU_FLAG_BSP: u8 = 1 << 1;
/// Local APIC version of an integrated (xAPIC) local APIC.
const LAPIC_VERSION: u8 = 0x14;
/// CPU signature reported in processor entries: family 6, model 0, stepping 0.
const CPU_SIGNATURE: u32 = 6 << 8;
/// Feature flags reported in processor entries: on-chip FPU (bit 0) and APIC (bit 9).
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// I/O APIC version (82093AA-compatible, as emulated by KVM).
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_FLAG_ENABLED: u8 = 1;

/// Interrupt types of I/O and local interrupt entries.
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger mode "conforms to the bus" (ISA: active high, edge).
const INT_FLAGS_CONFORMING: u16 = 0;

const ISA_BUS_ID: u8 = 0;
const ISA_BUS_TYPE: &[u8; 6] = b"ISA   ";
const OEM_ID: &[u8; 8] = b"KESTREL ";
const PRODUCT_ID: &[u8; 12] = b"KESTREL VMM ";
/// Destination local APIC id meaning "all local APICs".
const ALL_LOCAL_APICS: u8 = 0xff;

/// Errors building or writing the MP table.
#[derive(Debug, Error)]
pub enum MpTableError {
    /// The processor count is outside what an MP table can describe.
    #[error("cannot build an MP table for {0} vCPUs: the count must be 1..={MAX_SUPPORTED_CPUS}")]
    InvalidCpuCount(u8),
    /// The table would not end below 1 MiB (or its pointer would not fit in 32 bits).
    #[error("MP table of {size} bytes at {base:#x} does not fit below {HIMEM_START:#x}")]
    TooLarge {
        /// Requested base address.
        base: u64,
        /// Total size of floating pointer plus configuration table.
        size: usize,
    },
    /// The configuration table's length or entry count overflowed its 16-bit field.
    #[error("MP configuration table for {cpus} vCPUs has a length or entry count above 65535")]
    FieldOverflow {
        /// Requested processor count.
        cpus: u8,
    },
    /// The guest memory does not cover the table.
    #[error("guest memory does not cover the MP table ({size} bytes at {base:#x})")]
    NotInGuestMemory {
        /// Address the table should be written to.
        base: u64,
        /// Size of the table.
        size: usize,
    },
    /// Writing the table into guest memory failed.
    #[error("failed to write the MP table ({size} bytes) at {base:#x}: {source}")]
    Write {
        /// Address the table was written to.
        base: u64,
        /// Size of the table.
        size: usize,
        /// Underlying guest memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Little-endian byte writer for the MP structures.
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    fn zeros(&mut self, n: usize) {
        self.0.resize(self.0.len() + n, 0);
    }
}

/// The value that makes `bytes` sum to zero (mod 256) when stored in a zeroed checksum field.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Total size in bytes of the floating pointer plus configuration table for `cpus` processors.
pub fn mptable_size(cpus: u8) -> usize {
    FLOATING_POINTER_LEN
        + TABLE_HEADER_LEN
        + usize::from(cpus) * PROCESSOR_ENTRY_LEN
        + (1 + 1 + usize::from(IOAPIC_PINS) + 2) * SMALL_ENTRY_LEN
}

/// Builds the MP floating pointer and configuration table for `max_cpus` processors, as the
/// bytes to place at guest-physical `base` (the floating pointer's `physptr` is `base + 16`).
///
/// Processors get APIC ids `0..max_cpus`, all enabled, CPU 0 is the BSP. There is one ISA bus,
/// one I/O APIC (id `max_cpus`, at [`IOAPIC_START`], 24 pins), an I/O interrupt entry mapping
/// ISA IRQ `n` to pin `n` for every pin (conforming polarity and trigger), and the local
/// interrupt entries LINT0 = ExtINT (to the BSP) and LINT1 = NMI (to all CPUs).
pub fn build_mptable(base: u64, max_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if max_cpus == 0 || max_cpus > MAX_SUPPORTED_CPUS {
        return Err(MpTableError::InvalidCpuCount(max_cpus));
    }
    let size = mptable_size(max_cpus);
    let fits = base
        .checked_add(size as u64)
        .is_some_and(|end| end <= HIMEM_START);
    if !fits {
        return Err(MpTableError::TooLarge { base, size });
    }
    // Below 1 MiB (checked above), so it fits in the 32-bit pointer field.
    let table_addr = u32::try_from(base + FLOATING_POINTER_LEN as u64)
        .map_err(|_| MpTableError::TooLarge { base, size })?;

    let ioapic_id = max_cpus;
    let entry_count = usize::from(max_cpus) + 1 + 1 + usize::from(IOAPIC_PINS) + 2;
    let table_len = size - FLOATING_POINTER_LEN;
    let (Ok(entry_count), Ok(table_len)) = (u16::try_from(entry_count), u16::try_from(table_len))
    else {
        return Err(MpTableError::FieldOverflow { cpus: max_cpus });
    };

    let mut w = Writer(Vec::with_capacity(size));
    w.floating_pointer(table_addr);
    let header_at = w.0.len();
    w.table_header(table_len, entry_count);
    w.processors(max_cpus);
    w.bus_and_ioapic(ioapic_id);
    w.interrupts(ioapic_id);
    debug_assert_eq!(w.0.len(), size);
    let table_sum = checksum(&w.0[header_at..]);
    w.0[header_at + 7] = table_sum;
    Ok(w.0)
}

/// The table's parts, in the order [`build_mptable`] writes them.
impl Writer {
    /// The MP floating pointer structure, pointing at the table at `table_addr`.
    fn floating_pointer(&mut self, table_addr: u32) {
        let start = self.0.len();
        self.bytes(b"_MP_");
        self.u32(table_addr);
        self.u8(1); // length in 16-byte paragraphs
        self.u8(SPEC_REV);
        self.u8(0); // checksum, patched below
        self.u8(0); // feature 1: 0 = a configuration table is present
        self.u8(0); // feature 2: bit 7 clear = no IMCR, virtual-wire mode
        self.zeros(3); // features 3..5
        let fp_sum = checksum(&self.0[start..start + FLOATING_POINTER_LEN]);
        self.0[start + 10] = fp_sum;
    }

    /// The configuration table header (its checksum is patched in by the caller).
    fn table_header(&mut self, table_len: u16, entry_count: u16) {
        self.bytes(b"PCMP");
        self.u16(table_len);
        self.u8(SPEC_REV);
        self.u8(0); // checksum, patched by build_mptable
        self.bytes(OEM_ID);
        self.bytes(PRODUCT_ID);
        self.u32(0); // OEM table pointer
        self.u16(0); // OEM table size
        self.u16(entry_count);
        self.u32(const { crate::addr32(APIC_START) });
        self.u16(0); // extended table length: no extended entries
        self.u8(0); // extended table checksum: sum of zero bytes
        self.u8(0); // reserved
    }

    /// One processor entry per APIC id `0..max_cpus`, all enabled, CPU 0 the BSP.
    fn processors(&mut self, max_cpus: u8) {
        for apic_id in 0..max_cpus {
            let mut flags = CPU_FLAG_ENABLED;
            if apic_id == 0 {
                flags |= CPU_FLAG_BSP;
            }
            self.u8(ENTRY_PROCESSOR);
            self.u8(apic_id);
            self.u8(LAPIC_VERSION);
            self.u8(flags);
            self.u32(CPU_SIGNATURE);
            self.u32(CPU_FEATURES);
            self.zeros(8);
        }
    }

    /// The ISA bus entry and the I/O APIC entry.
    fn bus_and_ioapic(&mut self, ioapic_id: u8) {
        self.u8(ENTRY_BUS);
        self.u8(ISA_BUS_ID);
        self.bytes(ISA_BUS_TYPE);
        self.u8(ENTRY_IOAPIC);
        self.u8(ioapic_id);
        self.u8(IOAPIC_VERSION);
        self.u8(IOAPIC_FLAG_ENABLED);
        self.u32(const { crate::addr32(IOAPIC_START) });
    }

    /// I/O interrupt entries (identity mapping: ISA IRQs 0..15 and pins 16..23), then the
    /// local interrupt entries LINT0 = ExtINT (to the BSP) and LINT1 = NMI (to all CPUs).
    fn interrupts(&mut self, ioapic_id: u8) {
        for pin in 0..IOAPIC_PINS {
            self.u8(ENTRY_IO_INTERRUPT);
            self.u8(INT_TYPE_INT);
            self.u16(INT_FLAGS_CONFORMING);
            self.u8(ISA_BUS_ID);
            self.u8(pin); // source bus IRQ
            self.u8(ioapic_id);
            self.u8(pin); // destination I/O APIC INTIN
        }
        let locals = [(INT_TYPE_EXTINT, 0, 0), (INT_TYPE_NMI, ALL_LOCAL_APICS, 1)];
        for (int_type, dest_apic, lint) in locals {
            self.u8(ENTRY_LOCAL_INTERRUPT);
            self.u8(int_type);
            self.u16(INT_FLAGS_CONFORMING);
            self.u8(ISA_BUS_ID);
            self.u8(0); // source bus IRQ
            self.u8(dest_apic);
            self.u8(lint);
        }
    }
}

/// Builds the MP table for `max_cpus` processors and writes it at [`MPTABLE_START`].
///
/// Fails for `max_cpus` of 0 or above [`MAX_SUPPORTED_CPUS`], if the table would not end below
/// 1 MiB, or if `mem` does not cover it.
pub fn setup_mptable<M: GuestMemory>(mem: &M, max_cpus: u8) -> Result<(), MpTableError> {
    let bytes = build_mptable(MPTABLE_START, max_cpus)?;
    let base = GuestAddress(MPTABLE_START);
    if !mem.check_range(base, bytes.len()) {
        return Err(MpTableError::NotInGuestMemory {
            base: MPTABLE_START,
            size: bytes.len(),
        });
    }
    mem.write_slice(&bytes, base)
        .map_err(|source| MpTableError::Write {
            base: MPTABLE_START,
            size: bytes.len(),
            source,
        })?;
    tracing::debug!(max_cpus, size = bytes.len(), "MP table written");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test constants, all small
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[derive(Debug, Default)]
    struct Parsed {
        cpus: Vec<(u8, u8)>, // (apic id, flags)
        buses: Vec<(u8, [u8; 6])>,
        ioapics: Vec<(u8, u8, u32)>,             // (id, flags, addr)
        io_ints: Vec<(u8, u16, u8, u8, u8, u8)>, // (type, flags, bus, irq, ioapic, pin)
        local_ints: Vec<(u8, u8, u8)>,           // (type, dest apic, lint)
        entry_count: u16,
        lapic_addr: u32,
    }

    /// Parses the bytes placed at `base` the way a guest would, checking the spec invariants.
    fn parse(base: u64, bytes: &[u8]) -> Parsed {
        // Floating pointer.
        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(bytes[8], 1, "floating pointer length (paragraphs)");
        assert_eq!(bytes[9], 4, "spec revision 1.4");
        assert_eq!(sum(&bytes[..16]), 0, "floating pointer checksum");
        assert_eq!(bytes[11], 0, "a configuration table is present");
        let physptr = u64::from(u32_at(bytes, 4));
        assert_eq!(physptr, base + 16);

        // Configuration table.
        let t = &bytes[(physptr - base) as usize..];
        assert_eq!(&t[0..4], b"PCMP");
        let len = usize::from(u16_at(t, 4));
        assert_eq!(len, t.len(), "base table length covers exactly the entries");
        assert_eq!(t[6], 4);
        assert_eq!(sum(&t[..len]), 0, "configuration table checksum");
        assert_eq!(u32_at(t, 28), 0, "no OEM table");
        let ext_len = u16_at(t, 40);
        let ext_sum = t[42];
        assert_eq!(ext_len, 0);
        assert_eq!(ext_sum, 0, "extended checksum of an empty extended table");

        let mut p = Parsed {
            entry_count: u16_at(t, 34),
            lapic_addr: u32_at(t, 36),
            ..Parsed::default()
        };
        let mut off = 44;
        let mut seen = 0;
        while off < len {
            match t[off] {
                0 => {
                    p.cpus.push((t[off + 1], t[off + 3]));
                    off += 20;
                }
                1 => {
                    let mut ty = [0u8; 6];
                    ty.copy_from_slice(&t[off + 2..off + 8]);
                    p.buses.push((t[off + 1], ty));
                    off += 8;
                }
                2 => {
                    p.ioapics.push((t[off + 1], t[off + 3], u32_at(t, off + 4)));
                    off += 8;
                }
                3 => {
                    p.io_ints.push((
                        t[off + 1],
                        u16_at(t, off + 2),
                        t[off + 4],
                        t[off + 5],
                        t[off + 6],
                        t[off + 7],
                    ));
                    off += 8;
                }
                4 => {
                    p.local_ints.push((t[off + 1], t[off + 6], t[off + 7]));
                    off += 8;
                }
                other => panic!("unknown entry type {other} at offset {off}"),
            }
            seen += 1;
        }
        assert_eq!(off, len, "entries end exactly at the table length");
        assert_eq!(seen, p.entry_count, "entry count field");
        p
    }

    fn check(cpus: u8) {
        let bytes = build_mptable(MPTABLE_START, cpus).expect("build");
        assert_eq!(bytes.len(), mptable_size(cpus));
        let p = parse(MPTABLE_START, &bytes);

        let expected_entries = usize::from(cpus) + 1 + 1 + 24 + 2;
        assert_eq!(usize::from(p.entry_count), expected_entries);
        assert_eq!(p.lapic_addr, APIC_START as u32);
        assert_eq!(
            bytes.len() - 16,
            44 + usize::from(cpus) * 20 + (expected_entries - usize::from(cpus)) * 8
        );

        assert_eq!(p.cpus.len(), usize::from(cpus));
        for (i, &(apic_id, flags)) in p.cpus.iter().enumerate() {
            assert_eq!(usize::from(apic_id), i);
            assert_ne!(flags & CPU_FLAG_ENABLED, 0, "cpu {i} enabled");
            assert_eq!(flags & CPU_FLAG_BSP != 0, i == 0, "only cpu 0 is the BSP");
        }
        assert_eq!(p.buses, vec![(0, *b"ISA   ")]);
        assert_eq!(p.ioapics, vec![(cpus, 1, IOAPIC_START as u32)]);

        assert_eq!(p.io_ints.len(), 24);
        for (pin, &(ty, flags, bus, irq, ioapic, dst)) in p.io_ints.iter().enumerate() {
            assert_eq!(ty, INT_TYPE_INT);
            assert_eq!(flags, 0, "conforming polarity and trigger");
            assert_eq!(bus, 0);
            assert_eq!(usize::from(irq), pin);
            assert_eq!(ioapic, cpus, "routed to the I/O APIC's id");
            assert_eq!(usize::from(dst), pin);
        }
        assert_eq!(
            p.local_ints,
            vec![(INT_TYPE_EXTINT, 0, 0), (INT_TYPE_NMI, 0xff, 1)]
        );
    }

    #[test]
    fn mptable_one_cpu() {
        check(1);
    }

    #[test]
    fn mptable_two_cpus() {
        check(2);
    }

    #[test]
    fn mptable_eight_cpus() {
        check(8);
    }

    #[test]
    fn mptable_max_cpus_fits_below_1mib() {
        check(MAX_SUPPORTED_CPUS);
        assert!(MPTABLE_START + mptable_size(MAX_SUPPORTED_CPUS) as u64 <= HIMEM_START);
    }

    #[test]
    fn mptable_rejects_zero_and_255_cpus() {
        for n in [0u8, 255] {
            let err = build_mptable(MPTABLE_START, n).expect_err("must fail");
            assert!(matches!(err, MpTableError::InvalidCpuCount(v) if v == n));
            assert!(err.to_string().contains(&n.to_string()), "{err}");
        }
    }

    #[test]
    fn mptable_rejects_base_too_high() {
        let err = build_mptable(0xf_ff00, 2).expect_err("must fail");
        assert!(matches!(err, MpTableError::TooLarge { base: 0xf_ff00, .. }));
        assert!(build_mptable(u64::MAX - 8, 1).is_err());
    }

    #[test]
    fn setup_mptable_writes_into_guest_memory() {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("mem");
        setup_mptable(&mem, 4).expect("setup");
        let mut bytes = vec![0u8; mptable_size(4)];
        mem.read_slice(&mut bytes, GuestAddress(MPTABLE_START))
            .expect("read");
        let p = parse(MPTABLE_START, &bytes);
        assert_eq!(p.cpus.len(), 4);
        assert_eq!(p.ioapics[0].0, 4);

        let err = setup_mptable(&mem, 0).expect_err("0 cpus");
        assert!(matches!(err, MpTableError::InvalidCpuCount(0)));
    }

    #[test]
    fn setup_mptable_needs_memory_below_1mib() {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x9f000)]).expect("mem");
        let err = setup_mptable(&mem, 1).expect_err("no memory there");
        assert!(
            matches!(err, MpTableError::NotInGuestMemory { .. }),
            "{err}"
        );
    }
}
