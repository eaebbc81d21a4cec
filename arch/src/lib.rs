//! # kestrel-arch: x86_64 boot-time CPU and memory setup
//!
//! Everything the VMM needs to put a Linux kernel's 64-bit entry point in front of a vCPU,
//! without firmware and without ACPI:
//!
//! - [`layout`]: the guest-physical memory map (constants, RAM regions, hotplug region);
//! - [`e820`]: the e820 memory map for the zero page;
//! - [`mptable`]: the Intel MP 1.4 table that tells the guest about its CPUs, I/O APIC and
//!   interrupt wiring;
//! - [`boot`]: the zero page (`boot_params`) and initrd placement;
//! - [`regs`]: GDT, IDT, identity page tables, registers, FPU, MSRs and LAPIC LINT pins;
//! - [`cpuid`]: per-vCPU CPUID (APIC id, topology, hypervisor leaf).
//!
//! Nothing here creates KVM objects: functions take a `GuestMemory` and/or a `VcpuFd` the VMM
//! owns. The builders behind them (`build_mptable`, `build_boot_params`, `apply_boot_sregs`,
//! `filter_cpuid`, ...) are pure and unit-tested without `/dev/kvm`.
//!
//! ## Guest physical layout
//!
//! ```text
//! 0x0000_0000 +---------------------------+ RAM (e820 type 1) up to 0x9fc00
//!             | real-mode IVT / BDA       |
//! 0x0000_0500 | boot GDT (4 x 8 bytes)    | BOOT_GDT_START
//! 0x0000_0520 | boot IDT (1 empty entry)  | BOOT_IDT_START
//! 0x0000_7000 | zero page (boot_params)   | ZERO_PAGE_START, rsi at entry
//! 0x0000_8ff0 | boot stack (grows down)   | BOOT_STACK_POINTER
//! 0x0000_9000 | PML4                      | PML4_START
//! 0x0000_a000 | PDPT                      | PDPTE_START
//! 0x0000_b000 | PD: 512 x 2 MiB = 1 GiB   | PDE_START (identity map)
//! 0x0002_0000 | kernel command line       | CMDLINE_START, CMDLINE_MAX_SIZE bytes
//! 0x0009_fc00 +---------------------------+ reserved (e820 type 2) up to 1 MiB
//!             | MP floating ptr + table   | EBDA_START = MPTABLE_START
//!             | VGA hole, BIOS area       |
//! 0x0010_0000 +---------------------------+ RAM up to min(mem, 3 GiB)
//!             | kernel (HIMEM_START)      |
//!             | ...                       |
//!             | initrd (top of low RAM)   | boot::initrd_load_addr
//! 0xc000_0000 +---------------------------+ 32-bit MMIO hole, never RAM
//!             | virtio-mmio 0xd000_0000.. | VIRTIO_MMIO_START, 4 KiB windows
//!             | IOAPIC      0xfec0_0000   |
//!             | LAPIC       0xfee0_0000   |
//! 0x1_0000_0000 +-------------------------+ RAM above 3 GiB continues here
//!             | (mem - 3 GiB) bytes       |
//!             +---------------------------+ layout::ram_end(mem)
//!             | (gap up to a 1 GiB boundary, never inside the hole)
//!             +---------------------------+ layout::hotplug_region(mem, max_mem)
//!             | hotplug region, not in    |   (max_mem - mem) bytes, handed out in
//!             | e820                      |   MEM_BLOCK_SIZE (128 MiB) blocks
//!             +---------------------------+
//! ```
//!
//! The boot vCPU enters the kernel in long mode with paging on (identity map of the first GiB,
//! which covers every structure above and the kernel), `rsi` = zero page. Other vCPUs are
//! started by the guest through INIT/SIPI (or the VMM's warm-reset-vector assist on nested KVM)
//! and only need CPUID ([`cpuid::setup_cpuid`]), MSRs and LINT setup.

#![deny(missing_docs)]

pub mod boot;
pub mod cpuid;
pub mod e820;
pub mod layout;
pub mod mptable;
pub mod regs;

pub use boot::BootError;
pub use cpuid::CpuidError;
pub use mptable::MpTableError;
pub use regs::RegsError;

// Kestrel is x86_64-only: a `usize` holds any `u64`.
const _: () = assert!(usize::BITS == u64::BITS);

/// `v` as a `usize`: lossless, since Kestrel only builds for 64-bit x86 (asserted at compile
/// time above).
#[allow(clippy::cast_possible_truncation)]
pub const fn u64_to_usize(v: u64) -> usize {
    v as usize
}

/// The low and high 32-bit halves of `v` (for the split pointer fields of the boot protocol).
pub const fn split_u64(v: u64) -> (u32, u32) {
    let [a, b, c, d, e, f, g, h] = v.to_le_bytes();
    (
        u32::from_le_bytes([a, b, c, d]),
        u32::from_le_bytes([e, f, g, h]),
    )
}

/// A guest-physical address that must fit in a 32-bit field (MP table, boot protocol), checked
/// when evaluated in a `const` (a compile error if it does not fit).
#[allow(clippy::cast_possible_truncation)]
pub const fn addr32(a: u64) -> u32 {
    assert!(a <= u32::MAX as u64, "address does not fit in 32 bits");
    a as u32
}

/// Any error of this crate, for callers that want a single type.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// Zero page or initrd placement failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Setting a vCPU's CPUID failed.
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    /// Building or writing the MP table failed.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    /// Setting up vCPU registers failed.
    #[error(transparent)]
    Regs(#[from] RegsError),
}

/// Tests against the real `/dev/kvm` (nested KVM on the development machines is enough).
#[cfg(test)]
mod kvm_tests {
    use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
    use kvm_ioctls::{Kvm, VcpuFd, VmFd};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use crate::cpuid::{hypervisor_signature, setup_cpuid, KESTREL_SIGNATURE, KVM_SIGNATURE};
    use crate::layout::{BOOT_GDT_START, BOOT_STACK_POINTER, PML4_START, ZERO_PAGE_START};
    use crate::regs::*;

    /// A VM with an in-kernel irqchip and one vCPU, or `None` when this machine has no KVM.
    fn vm_with_vcpu(id: u64) -> Option<(Kvm, VmFd, VcpuFd)> {
        if !std::path::Path::new("/dev/kvm").exists() {
            // scripts/test.sh sets KESTREL_TEST_REQUIRE_ALL: there a missing prerequisite fails.
            assert!(
                std::env::var_os("KESTREL_TEST_REQUIRE_ALL").is_none(),
                "/dev/kvm is missing"
            );
            eprintln!("/dev/kvm missing: skipping KVM test");
            return None;
        }
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create VM");
        vm.create_irq_chip().expect("create irqchip");
        let vcpu = vm.create_vcpu(id).expect("create vCPU");
        Some((kvm, vm, vcpu))
    }

    #[test]
    fn cpuid_on_real_vcpus() {
        let Some((kvm, vm, vcpu0)) = vm_with_vcpu(0) else {
            return;
        };
        let vcpu1 = vm.create_vcpu(1).expect("create vCPU 1");
        for (id, vcpu) in [(0u8, &vcpu0), (1, &vcpu1)] {
            setup_cpuid(&kvm, vcpu, id, 2).expect("setup_cpuid");
            let c = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).expect("get_cpuid2");
            let find = |f: u32, i: u32| {
                c.as_slice()
                    .iter()
                    .find(|e| e.function == f && e.index == i)
                    .copied()
            };
            let l1 = find(1, 0).expect("leaf 1");
            assert_eq!(l1.ebx >> 24, u32::from(id));
            assert_ne!(l1.ecx & (1 << 31), 0);
            let hv = find(0x4000_0000, 0).expect("hypervisor leaf");
            assert_eq!(hypervisor_signature(&hv), KESTREL_SIGNATURE);
            let kvm_leaf = find(0x4000_0100, 0).expect("relocated KVM leaf");
            assert_eq!(hypervisor_signature(&kvm_leaf), KVM_SIGNATURE);
            if let Some(topo) = find(0xb, 1) {
                assert_eq!(topo.edx, u32::from(id));
                assert_eq!(topo.eax & 0x1f, 1);
            }
        }
        let err = setup_cpuid(&kvm, &vcpu0, 2, 2).expect_err("id out of range");
        assert!(err.to_string().contains("vCPU id 2"), "{err}");
    }

    #[test]
    fn boot_registers_on_a_real_vcpu() {
        let Some((kvm, _vm, vcpu)) = vm_with_vcpu(0) else {
            return;
        };
        // CPUID first: KVM checks MSR writes against it.
        setup_cpuid(&kvm, &vcpu, 0, 1).expect("cpuid");

        setup_msrs(&vcpu).expect("setup_msrs");
        let expected = boot_msr_entries();
        let query: Vec<kvm_msr_entry> = expected
            .iter()
            .map(|e| kvm_msr_entry {
                index: e.index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&query).expect("msrs");
        let read = vcpu.get_msrs(&mut msrs).expect("get_msrs");
        assert_eq!(read, expected.len());
        for (got, want) in msrs.as_slice().iter().zip(&expected) {
            assert_eq!(got.index, want.index);
            if want.index == MSR_IA32_TSC {
                continue; // the TSC keeps counting after it is written
            }
            if want.index == MSR_IA32_MISC_ENABLE {
                assert_ne!(got.data & MSR_IA32_MISC_ENABLE_FAST_STRING, 0);
                continue;
            }
            assert_eq!(got.data, want.data, "MSR {:#x}", want.index);
        }

        setup_regs(&vcpu, 0x100_0000).expect("setup_regs");
        let regs = vcpu.get_regs().expect("get_regs");
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(
            (regs.rsp, regs.rbp),
            (BOOT_STACK_POINTER, BOOT_STACK_POINTER)
        );
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(regs.rflags, 0x2);

        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        setup_sregs(&mem, &vcpu).expect("setup_sregs");
        let sregs = vcpu.get_sregs().expect("get_sregs");
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.gdt.base, BOOT_GDT_START);
        assert_eq!((sregs.cs.selector, sregs.cs.l), (0x08, 1));
        assert_eq!(sregs.ss.selector, 0x10);
        assert_eq!(sregs.tr.selector, 0x18);
        let gdt1: u64 = mem
            .read_obj(GuestAddress(BOOT_GDT_START + 8))
            .expect("read gdt");
        assert_eq!(gdt1, gdt_entry(GDT_CODE64_FLAGS, 0, 0xfffff));

        setup_fpu(&vcpu).expect("setup_fpu");
        let fpu = vcpu.get_fpu().expect("get_fpu");
        assert_eq!(fpu.fcw, FPU_FCW_DEFAULT);
        // KVM_GET/SET_FPU do not carry MXCSR; read it from the XSAVE legacy area (bytes 24..28).
        let xsave = vcpu.get_xsave().expect("get_xsave");
        assert_eq!(xsave.region[0] & 0xffff, u32::from(FPU_FCW_DEFAULT));
        assert_eq!(xsave.region[6], MXCSR_DEFAULT);

        set_lint(&vcpu).expect("set_lint");
        let lapic = vcpu.get_lapic().expect("get_lapic");
        assert_eq!(
            (lapic_register(&lapic, APIC_LVT0) >> 8) & 0x7,
            APIC_MODE_EXTINT
        );
        assert_eq!(
            (lapic_register(&lapic, APIC_LVT1) >> 8) & 0x7,
            APIC_MODE_NMI
        );
    }
}
