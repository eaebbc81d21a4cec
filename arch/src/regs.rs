//! Register state for a 64-bit Linux boot entry, and the boot vCPU's MSRs, FPU and LAPIC.
//!
//! The boot vCPU starts directly in long mode: a flat GDT, an empty IDT and identity page
//! tables for the first GiB are written into guest memory ([`setup_sregs`]), then the general
//! registers point at the kernel entry, the boot stack and the zero page ([`setup_regs`]).
//!
//! Suggested order per vCPU: `setup_cpuid` (KVM checks MSR writes against CPUID), then
//! [`setup_msrs`], [`setup_regs`], [`setup_sregs`], [`setup_fpu`], [`set_lint`] (needs the
//! in-kernel irqchip).

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

/// CR0: protected mode enable.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0: extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0: paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension.
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// RFLAGS bit 1 is reserved and always set.
pub const RFLAGS_RESERVED: u64 = 0x2;

/// x87 control word after FNINIT.
pub const FPU_FCW_DEFAULT: u16 = 0x37f;
/// MXCSR after reset: all exceptions masked.
pub const MXCSR_DEFAULT: u32 = 0x1f80;

/// GDT access/flags of the boot descriptors (low byte = access byte, high nibble = G/DB/L/AVL).
pub const GDT_CODE64_FLAGS: u16 = 0xa09b;
/// Flat 32/64-bit read/write data segment.
pub const GDT_DATA_FLAGS: u16 = 0xc093;
/// Busy 64-bit TSS.
pub const GDT_TSS_FLAGS: u16 = 0x808b;

/// Indexes of the boot GDT entries.
const GDT_CODE_INDEX: u8 = 1;
const GDT_DATA_INDEX: u8 = 2;
const GDT_TSS_INDEX: u8 = 3;

/// The GDT limit register value: the boot GDT's size in bytes, minus one (31).
#[allow(clippy::cast_possible_truncation)] // 4 entries of 8 bytes
const GDT_LIMIT: u16 = (std::mem::size_of::<[u64; 4]>() - 1) as u16;
/// The IDT limit register value: one empty 8-byte entry, minus one (7).
#[allow(clippy::cast_possible_truncation)]
const IDT_LIMIT: u16 = (std::mem::size_of::<u64>() - 1) as u16;

/// The boot GDT: null, code64, data, TSS — all flat (base 0, limit 0xfffff pages).
pub const fn boot_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(GDT_CODE64_FLAGS, 0, 0xfffff),
        gdt_entry(GDT_DATA_FLAGS, 0, 0xfffff),
        gdt_entry(GDT_TSS_FLAGS, 0, 0xfffff),
    ]
}

/// Page table entry flags.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_PAGE_SIZE: u64 = 1 << 7;
/// Entries per page-table page.
const PT_ENTRIES: u64 = 512;
/// Size of a large page mapped by a page directory entry.
const LARGE_PAGE_SIZE: u64 = 2 << 20;

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MISC_ENABLE bit 0: fast string operations.
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRdefType bit 11: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back.
pub const MTRR_MEM_TYPE_WB: u64 = 0x6;
/// IA32_STAR.
pub const MSR_STAR: u32 = 0xc000_0081;
/// IA32_LSTAR.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// IA32_CSTAR.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// IA32_FMASK (SYSCALL flag mask).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// IA32_KERNEL_GS_BASE.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Offset of the LVT LINT0 register in the local APIC page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the local APIC page.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode field (bits 8..10).
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
/// LVT delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;
/// LVT delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors setting up vCPU registers.
#[derive(Debug, Error)]
pub enum RegsError {
    /// Writing a boot structure (GDT, IDT, page table) into guest memory failed.
    #[error("failed to write the boot {what} at {addr:#x}: {source}")]
    WriteGuestMemory {
        /// Which structure.
        what: &'static str,
        /// Guest-physical address written to.
        addr: u64,
        /// Underlying guest memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A KVM register ioctl failed.
    #[error("KVM_{ioctl} failed: {source}")]
    Ioctl {
        /// Name of the ioctl (e.g. "SET_SREGS").
        ioctl: &'static str,
        /// Error from KVM.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The MSR list could not be built.
    #[error("cannot build a list of {count} MSRs: {source}")]
    MsrList {
        /// Number of MSRs.
        count: usize,
        /// Error from the FAM wrapper.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// KVM set fewer MSRs than requested.
    #[error(
        "KVM set only {set} of {expected} boot MSRs; the first rejected one is {first_rejected:#x}"
    )]
    MsrsNotAllSet {
        /// Number of MSRs KVM accepted.
        set: usize,
        /// Number of MSRs requested.
        expected: usize,
        /// Index of the first MSR KVM did not accept.
        first_rejected: u32,
    },
}

fn ioctl_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Ioctl { ioctl, source }
}

/// Encodes a GDT descriptor.
///
/// `flags` holds the access byte in bits 0..7 and the G/DB/L/AVL nibble in bits 12..15 (so
/// `0xa09b` is a present ring-0 64-bit code segment with 4 KiB granularity); `limit` is 20 bits.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn descriptor_base(entry: u64) -> u64 {
    ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000)
}

#[allow(clippy::cast_possible_truncation)] // masked to 20 bits
fn descriptor_limit(entry: u64) -> u32 {
    (((entry >> 32) & 0x000f_0000) | (entry & 0x0000_ffff)) as u32
}

/// The KVM segment register state for GDT descriptor `entry` at `table_index`.
///
/// The limit is expanded to bytes when the granularity bit is set; a non-present descriptor
/// yields an unusable segment.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 0x1) as u8;
    let present = ((entry >> 47) & 0x1) as u8;
    let raw_limit = descriptor_limit(entry);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base: descriptor_base(entry),
        limit,
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 0x1) as u8,
        s: ((entry >> 44) & 0x1) as u8,
        l: ((entry >> 53) & 0x1) as u8,
        g,
        avl: ((entry >> 52) & 0x1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn write_u64<M: GuestMemory>(
    mem: &M,
    what: &'static str,
    addr: u64,
    val: u64,
) -> Result<(), RegsError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| RegsError::WriteGuestMemory { what, addr, source })
}

/// Writes the boot GDT at [`BOOT_GDT_START`] and an empty IDT at [`BOOT_IDT_START`].
pub fn write_gdt_and_idt<M: GuestMemory>(mem: &M) -> Result<(), RegsError> {
    for (i, entry) in boot_gdt().iter().enumerate() {
        write_u64(mem, "GDT", BOOT_GDT_START + 8 * i as u64, *entry)?;
    }
    write_u64(mem, "IDT", BOOT_IDT_START, 0)
}

/// Writes identity page tables mapping the first GiB with 2 MiB pages: PML4 at
/// [`PML4_START`] -> PDPT at [`PDPTE_START`] -> 512 PDEs at [`PDE_START`].
pub fn write_identity_page_tables<M: GuestMemory>(mem: &M) -> Result<(), RegsError> {
    write_u64(
        mem,
        "PML4",
        PML4_START,
        PDPTE_START | PTE_PRESENT | PTE_WRITABLE,
    )?;
    write_u64(
        mem,
        "PDPT",
        PDPTE_START,
        PDE_START | PTE_PRESENT | PTE_WRITABLE,
    )?;
    for i in 0..PT_ENTRIES {
        write_u64(
            mem,
            "page directory",
            PDE_START + 8 * i,
            (i * LARGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE,
        )?;
    }
    Ok(())
}

/// Applies the long-mode boot state (segments from the boot GDT, descriptor tables, control
/// registers, EFER) to `sregs`, keeping every other field (e.g. `apic_base`). Pure.
pub fn apply_boot_sregs(sregs: &mut kvm_sregs) {
    let gdt = boot_gdt();
    let code = kvm_segment_from_gdt(gdt[usize::from(GDT_CODE_INDEX)], GDT_CODE_INDEX);
    let data = kvm_segment_from_gdt(gdt[usize::from(GDT_DATA_INDEX)], GDT_DATA_INDEX);
    let tss = kvm_segment_from_gdt(gdt[usize::from(GDT_TSS_INDEX)], GDT_TSS_INDEX);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = IDT_LIMIT;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// Writes the boot GDT, IDT and identity page tables into `mem` and puts the vCPU in 64-bit
/// long mode: CR0 = PE|ET|PG, CR3 = [`PML4_START`], CR4.PAE, EFER.LME|LMA, segments from the GDT.
pub fn setup_sregs<M: GuestMemory>(mem: &M, vcpu: &VcpuFd) -> Result<(), RegsError> {
    write_gdt_and_idt(mem)?;
    write_identity_page_tables(mem)?;
    let mut sregs = vcpu.get_sregs().map_err(ioctl_err("GET_SREGS"))?;
    apply_boot_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(ioctl_err("SET_SREGS"))
}

/// General registers for the 64-bit Linux entry at `entry`. Pure.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    }
}

/// Sets rip = `entry`, rsp = rbp = [`BOOT_STACK_POINTER`], rsi = [`ZERO_PAGE_START`] (the
/// zero page, as the 64-bit boot protocol requires), rflags = 0x2, everything else zero.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    vcpu.set_regs(&boot_regs(entry))
        .map_err(ioctl_err("SET_REGS"))
}

/// Initial FPU state: FCW 0x37f, MXCSR 0x1f80.
///
/// KVM's `KVM_SET_FPU` copies the x87 and XMM state but not `mxcsr` (nor does `KVM_GET_FPU`
/// report it); MXCSR keeps the value KVM gives a new vCPU, which is already 0x1f80. The field is
/// still filled in so the request says what is meant.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: FPU_FCW_DEFAULT,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl_err("SET_FPU"))
}

/// The boot MSR values: SYSENTER_*, STAR/LSTAR/CSTAR/FMASK/KERNEL_GS_BASE and TSC zero,
/// MISC_ENABLE with fast strings, MTRRdefType enabled with write-back default. Pure.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let msr = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Writes [`boot_msr_entries`]. KVM stops at the first MSR it rejects; that is reported as
/// [`RegsError::MsrsNotAllSet`] with the count and the rejected MSR's index.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|source| RegsError::MsrList {
        count: entries.len(),
        source,
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(ioctl_err("SET_MSRS"))?;
    if set < entries.len() {
        return Err(RegsError::MsrsNotAllSet {
            set,
            expected: entries.len(),
            first_rejected: entries[set].index,
        });
    }
    Ok(())
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let r = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([
        r[0].cast_unsigned(),
        r[1].cast_unsigned(),
        r[2].cast_unsigned(),
        r[3].cast_unsigned(),
    ])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, b) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = b.cast_signed();
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !APIC_DELIVERY_MODE_MASK) | (mode << 8)
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in a LAPIC state. Pure.
pub fn apply_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

/// Configures the local APIC's LINT0 as ExtINT and LINT1 as NMI (virtual-wire mode, matching
/// the MP table). Needs the in-kernel irqchip (`KVM_CREATE_IRQCHIP` before the vCPU).
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(ioctl_err("GET_LAPIC"))?;
    apply_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(ioctl_err("SET_LAPIC"))
}

/// Reads an LVT register (e.g. [`APIC_LVT0`]) from a LAPIC state, for checks and debugging.
pub fn lapic_register(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    lapic_reg(lapic, offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_entry_values() {
        assert_eq!(gdt_entry(0, 0, 0), 0);
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        // Base and limit scattered over their fields.
        assert_eq!(
            gdt_entry(0xc093, 0x1234_5678, 0xa_bcde),
            0x12ca_9334_5678_bcde
        );
        // Bits of flags that are not descriptor flags are dropped.
        assert_eq!(gdt_entry(0x0f00, 0, 0), 0);
    }

    #[test]
    fn segment_from_gdt_entries() {
        let code = kvm_segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code.selector, 0x8);
        assert_eq!(code.base, 0);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.type_, 0xb);
        assert_eq!((code.present, code.dpl, code.s), (1, 0, 1));
        assert_eq!((code.l, code.db, code.g, code.avl), (1, 0, 1, 0));
        assert_eq!(code.unusable, 0);

        let data = kvm_segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(data.selector, 0x10);
        assert_eq!(data.type_, 0x3);
        assert_eq!((data.l, data.db, data.g), (0, 1, 1));

        let tss = kvm_segment_from_gdt(gdt_entry(0x808b, 0, 0xfffff), 3);
        assert_eq!(tss.selector, 0x18);
        assert_eq!(tss.type_, 0xb);
        assert_eq!((tss.s, tss.present, tss.g), (0, 1, 1));

        let byte_gran = kvm_segment_from_gdt(gdt_entry(0x0093, 0xabcd_ef01, 0x1234), 5);
        assert_eq!(byte_gran.base, 0xabcd_ef01);
        assert_eq!(byte_gran.limit, 0x1234);
        assert_eq!(byte_gran.g, 0);

        let null = kvm_segment_from_gdt(0, 0);
        assert_eq!((null.present, null.unusable), (0, 1));
    }

    #[test]
    fn boot_sregs_are_long_mode() {
        let mut sregs = kvm_sregs {
            apic_base: 0xfee0_0900,
            cr0: 0x6000_0010,
            ..Default::default()
        };
        apply_boot_sregs(&mut sregs);
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET | X86_CR0_PG);
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (BOOT_GDT_START, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (BOOT_IDT_START, 7));
        assert_eq!((sregs.cs.selector, sregs.cs.l), (0x8, 1));
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(seg.selector, 0x10);
        }
        assert_eq!(sregs.tr.selector, 0x18);
        assert_eq!(sregs.apic_base, 0xfee0_0900, "unrelated fields kept");
    }

    #[test]
    fn boot_tables_in_guest_memory() {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
        write_gdt_and_idt(&mem).expect("gdt");
        write_identity_page_tables(&mem).expect("page tables");

        let gdt: [u64; 4] = mem
            .read_obj(GuestAddress(BOOT_GDT_START))
            .expect("read gdt");
        assert_eq!(
            gdt,
            [
                0,
                0x00af_9b00_0000_ffff,
                0x00cf_9300_0000_ffff,
                0x008f_8b00_0000_ffff
            ]
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(BOOT_IDT_START))
                .expect("idt"),
            0
        );

        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PML4_START)).expect("pml4"),
            0xa003
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PDPTE_START))
                .expect("pdpt"),
            0xb003
        );
        for i in [0u64, 1, 255, 511] {
            let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8 * i)).expect("pde");
            assert_eq!(pde, (i << 21) | 0x83);
        }

        // Too little memory for the page directory.
        let small: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0xb000)]).expect("mem");
        let err = write_identity_page_tables(&small).expect_err("no room");
        assert!(
            matches!(
                err,
                RegsError::WriteGuestMemory {
                    what: "page directory",
                    addr: 0xb000,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn boot_regs_values() {
        let r = boot_regs(0x100_0000);
        assert_eq!(r.rip, 0x100_0000);
        assert_eq!((r.rsp, r.rbp), (BOOT_STACK_POINTER, BOOT_STACK_POINTER));
        assert_eq!(r.rsi, ZERO_PAGE_START);
        assert_eq!(r.rflags, 0x2);
        assert_eq!((r.rax, r.rdi, r.rcx), (0, 0, 0));
    }

    #[test]
    fn boot_msrs_list() {
        let e = boot_msr_entries();
        let get = |i: u32| e.iter().find(|m| m.index == i).map(|m| m.data);
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        for i in [
            MSR_IA32_SYSENTER_CS,
            MSR_IA32_SYSENTER_ESP,
            MSR_IA32_SYSENTER_EIP,
            MSR_STAR,
            MSR_LSTAR,
            MSR_CSTAR,
            MSR_SYSCALL_MASK,
            MSR_KERNEL_GS_BASE,
            MSR_IA32_TSC,
        ] {
            assert_eq!(get(i), Some(0), "MSR {i:#x}");
        }
    }

    #[test]
    fn lint_delivery_modes() {
        let mut lapic = kvm_lapic_state::default();
        // Masked LVT entries with a stale delivery mode and vector.
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0230);
        set_lapic_reg(&mut lapic, APIC_LVT1, 0x0001_0700);
        apply_lint(&mut lapic);
        assert_eq!(lapic_register(&lapic, APIC_LVT0), 0x0001_0730);
        assert_eq!(lapic_register(&lapic, APIC_LVT1), 0x0001_0400);
    }
}
