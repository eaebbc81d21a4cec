//! Per-vCPU CPUID.
//!
//! Starting from KVM's supported CPUID, each vCPU gets its own APIC id and a topology of
//! `max_vcpus` single-threaded cores in one socket, consistent across the leaves Linux reads
//! (1, 4, 0xb, 0x1f and, on AMD, 0x8000_0008 and 0x8000_001e), the "running under a
//! hypervisor" bit, and a Kestrel signature in hypervisor leaf 0x4000_0000.
//!
//! KVM's own hypervisor leaves ("KVMKVMKVM", PV features) are moved to the next hypervisor
//! base, 0x4000_0100. Linux (`kvm_cpuid_base`) and KVM itself look for the KVM signature at
//! every 0x100 step from 0x4000_0000, so the guest keeps kvmclock and the other PV features
//! while a Kestrel-aware guest agent can identify its VMM at the standard leaf.
//!
//! CPUID must be set on every vCPU, not only the boot one: KVM validates a guest's MSR writes
//! (EFER in the AP trampoline, for example) against the vCPU's CPUID (see NESTED-KVM.md §6).

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use thiserror::Error;

/// Signature in EBX/ECX/EDX of hypervisor leaf 0x4000_0000.
pub const KESTREL_SIGNATURE: [u8; 12] = *b"KestrelKVM\0\0";
/// KVM's hypervisor signature.
pub const KVM_SIGNATURE: [u8; 12] = *b"KVMKVMKVM\0\0\0";
/// First hypervisor CPUID leaf.
pub const HYPERVISOR_BASE: u32 = 0x4000_0000;
/// Distance between hypervisor CPUID bases that guests scan.
const HYPERVISOR_BASE_STEP: u32 = 0x100;
/// Last hypervisor base guests scan (exclusive).
const HYPERVISOR_SCAN_END: u32 = 0x4001_0000;

/// Leaf 1 ECX bit 31: running under a hypervisor.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: the logical processor count field is valid.
pub const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE_QWORDS: u32 = 8;

/// Topology level types of leaves 0xb / 0x1f.
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

const VENDOR_AMD: [u8; 12] = *b"AuthenticAMD";
const VENDOR_HYGON: [u8; 12] = *b"HygonGenuine";

/// Errors setting a vCPU's CPUID.
#[derive(Debug, Error)]
pub enum CpuidError {
    /// The vCPU id or count is out of range.
    #[error("invalid vCPU id {vcpu_id} for {max_vcpus} vCPUs")]
    InvalidVcpuId {
        /// Requested vCPU id.
        vcpu_id: u8,
        /// Number of vCPUs in the VM.
        max_vcpus: u8,
    },
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    GetSupported(#[source] kvm_ioctls::Error),
    /// `KVM_SET_CPUID2` failed.
    #[error("KVM_SET_CPUID2 on vCPU {vcpu_id} failed: {source}")]
    SetCpuid {
        /// The vCPU.
        vcpu_id: u8,
        /// Error from KVM.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Number of bits of the x2APIC id that select the core within the package:
/// `ceil(log2(max_vcpus))` (0 for a single vCPU).
pub fn core_id_bits(max_vcpus: u8) -> u32 {
    u32::from(max_vcpus.max(1))
        .next_power_of_two()
        .trailing_zeros()
}

fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == function && e.index == index)
}

fn regs_to_bytes(a: u32, b: u32, c: u32) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..4].copy_from_slice(&a.to_le_bytes());
    out[4..8].copy_from_slice(&b.to_le_bytes());
    out[8..12].copy_from_slice(&c.to_le_bytes());
    out
}

fn bytes_to_regs(s: &[u8; 12]) -> (u32, u32, u32) {
    let r = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    (r(0), r(4), r(8))
}

/// Vendor string of leaf 0 (EBX, EDX, ECX).
fn vendor(cpuid: &CpuId) -> Option<[u8; 12]> {
    find(cpuid, 0, 0).map(|e| regs_to_bytes(e.ebx, e.edx, e.ecx))
}

/// Hypervisor signature (EBX, ECX, EDX) of an entry.
pub fn hypervisor_signature(entry: &kvm_cpuid_entry2) -> [u8; 12] {
    regs_to_bytes(entry.ebx, entry.ecx, entry.edx)
}

fn push(cpuid: &mut CpuId, entry: kvm_cpuid_entry2) {
    if cpuid.push(entry).is_err() {
        tracing::warn!(
            function = entry.function,
            index = entry.index,
            "CPUID table full ({KVM_MAX_CPUID_ENTRIES} entries), leaf not added"
        );
    }
}

fn filter_leaf_1(e: &mut kvm_cpuid_entry2, vcpu_id: u8, max_vcpus: u8) {
    e.ebx = (u32::from(vcpu_id) << 24) | (u32::from(max_vcpus) << 16) | (CLFLUSH_LINE_QWORDS << 8);
    e.ecx |= LEAF1_ECX_HYPERVISOR;
    if max_vcpus > 1 {
        e.edx |= LEAF1_EDX_HTT;
    } else {
        e.edx &= !LEAF1_EDX_HTT;
    }
}

/// Leaf 4 (deterministic cache parameters): EAX[31:26] = addressable core ids - 1, EAX[25:14]
/// = logical processors sharing the cache - 1 (one per core for L1/L2, the package for L3).
fn filter_leaf_4(e: &mut kvm_cpuid_entry2, core_bits: u32) {
    if e.eax & 0x1f == 0 {
        return; // no more caches
    }
    let ids_in_package = (1u32 << core_bits) - 1;
    let cores = ids_in_package.min(0x3f);
    let level = (e.eax >> 5) & 0x7;
    let sharing = if level >= 3 {
        ids_in_package.min(0xfff)
    } else {
        0
    };
    e.eax = (e.eax & 0x3fff) | (cores << 26) | (sharing << 14);
}

/// AMD leaf 0x8000_0008 ECX: NC = cores - 1 (bits 7:0), ApicIdSize = core id bits (15:12).
fn filter_leaf_8000_0008(e: &mut kvm_cpuid_entry2, max_vcpus: u8, core_bits: u32) {
    e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | u32::from(max_vcpus - 1);
}

/// AMD leaf 0x8000_001e: extended APIC id, compute unit id = vcpu id with one thread per
/// unit, one node.
fn filter_leaf_8000_001e(e: &mut kvm_cpuid_entry2, vcpu_id: u8) {
    e.eax = u32::from(vcpu_id);
    e.ebx = (e.ebx & !0xffff) | u32::from(vcpu_id);
    e.ecx &= !0x7ff;
    e.edx = 0;
}

/// Rewrites x2APIC topology leaf `function` (0xb or 0x1f): SMT level (shift 0, one thread),
/// core level (shift `core_bits`, `max_vcpus` processors), then the terminating invalid level.
fn set_topology_leaf(cpuid: &mut CpuId, function: u32, vcpu_id: u8, max_vcpus: u8, core_bits: u32) {
    cpuid.retain(|e| e.function != function);
    let x2apic_id = u32::from(vcpu_id);
    let levels = [
        (0, 1, LEVEL_TYPE_SMT),
        (core_bits, u32::from(max_vcpus), LEVEL_TYPE_CORE),
        (0, 0, LEVEL_TYPE_INVALID),
    ];
    for (index, (shift, count, level_type)) in (0u32..).zip(levels) {
        push(
            cpuid,
            kvm_cpuid_entry2 {
                function,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: shift,
                ebx: count,
                ecx: (level_type << 8) | index,
                edx: x2apic_id,
                ..Default::default()
            },
        );
    }
}

/// Puts the Kestrel signature at 0x4000_0000 and moves KVM's hypervisor leaves to the next
/// free hypervisor base. Idempotent.
fn set_hypervisor_leaves(cpuid: &mut CpuId) {
    let in_range = |f: u32, base: u32| (base..base + HYPERVISOR_BASE_STEP).contains(&f);
    if find(cpuid, HYPERVISOR_BASE, 0).is_some_and(|e| hypervisor_signature(e) == KESTREL_SIGNATURE)
    {
        return;
    }
    if cpuid.as_slice().len() >= KVM_MAX_CPUID_ENTRIES {
        tracing::warn!("CPUID table full, hypervisor leaves left as KVM reported them");
        return;
    }
    let has_base_leaves = cpuid
        .as_slice()
        .iter()
        .any(|e| in_range(e.function, HYPERVISOR_BASE));
    if has_base_leaves {
        let free_base = (1..)
            .map(|n| HYPERVISOR_BASE + n * HYPERVISOR_BASE_STEP)
            .take_while(|b| *b < HYPERVISOR_SCAN_END)
            .find(|b| !cpuid.as_slice().iter().any(|e| in_range(e.function, *b)));
        let Some(new_base) = free_base else {
            tracing::warn!("no free hypervisor CPUID base, hypervisor leaves left unchanged");
            return;
        };
        let delta = new_base - HYPERVISOR_BASE;
        for e in cpuid.as_mut_slice() {
            if in_range(e.function, HYPERVISOR_BASE) {
                if e.function == HYPERVISOR_BASE && in_range(e.eax, HYPERVISOR_BASE) {
                    e.eax += delta;
                }
                e.function += delta;
            }
        }
    }
    let (ebx, ecx, edx) = bytes_to_regs(&KESTREL_SIGNATURE);
    push(
        cpuid,
        kvm_cpuid_entry2 {
            function: HYPERVISOR_BASE,
            index: 0,
            flags: 0,
            // Highest leaf of the Kestrel range: only the signature leaf itself.
            eax: HYPERVISOR_BASE,
            ebx,
            ecx,
            edx,
            ..Default::default()
        },
    );
}

/// Adjusts `cpuid` (normally KVM's supported CPUID) for vCPU `vcpu_id` of `max_vcpus`.
///
/// - leaf 1: EBX initial APIC id = `vcpu_id`, logical processor count = `max_vcpus`, CLFLUSH
///   line 64 bytes; ECX hypervisor bit; EDX HTT when `max_vcpus > 1`;
/// - leaves 0xb and 0x1f (when within the basic range or already present): SMT level with
///   shift 0 and one thread, core level with shift `ceil(log2(max_vcpus))` and `max_vcpus`
///   processors, EDX = x2APIC id = `vcpu_id` on every sub-leaf;
/// - leaf 4: cores-per-package and cache-sharing fields consistent with that topology;
/// - AMD/Hygon: 0x8000_0008 ECX NC and ApicIdSize, 0x8000_001e ids, when present;
/// - hypervisor leaf 0x4000_0000: "KestrelKVM\0\0" with its max leaf in EAX; KVM's leaves move
///   to 0x4000_0100 (see the module docs).
///
/// A `max_vcpus` of 0 is treated as 1. Idempotent for the same arguments.
pub fn filter_cpuid(cpuid: &mut CpuId, vcpu_id: u8, max_vcpus: u8) {
    let max_vcpus = max_vcpus.max(1);
    let core_bits = core_id_bits(max_vcpus);
    let is_amd = vendor(cpuid).is_some_and(|v| v == VENDOR_AMD || v == VENDOR_HYGON);
    let max_basic = find(cpuid, 0, 0).map_or(0, |e| e.eax);

    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => filter_leaf_1(e, vcpu_id, max_vcpus),
            4 => filter_leaf_4(e, core_bits),
            0x8000_0008 if is_amd => filter_leaf_8000_0008(e, max_vcpus, core_bits),
            0x8000_001e if is_amd => filter_leaf_8000_001e(e, vcpu_id),
            _ => {}
        }
    }

    for leaf in [0xb, 0x1f] {
        let present = cpuid.as_slice().iter().any(|e| e.function == leaf);
        if present || max_basic >= leaf {
            set_topology_leaf(cpuid, leaf, vcpu_id, max_vcpus, core_bits);
        }
    }

    set_hypervisor_leaves(cpuid);

    // Deterministic order (KVM does not care), so filtering twice gives identical tables.
    cpuid.as_mut_slice().sort_by_key(|e| (e.function, e.index));
}

/// Sets the CPUID of `vcpu` (id `vcpu_id` of `max_vcpus`): KVM's supported CPUID passed
/// through [`filter_cpuid`]. Call it for every vCPU before `KVM_RUN` and before setting MSRs.
pub fn setup_cpuid(kvm: &Kvm, vcpu: &VcpuFd, vcpu_id: u8, max_vcpus: u8) -> Result<(), CpuidError> {
    if max_vcpus == 0 || vcpu_id >= max_vcpus {
        return Err(CpuidError::InvalidVcpuId { vcpu_id, max_vcpus });
    }
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::GetSupported)?;
    filter_cpuid(&mut cpuid, vcpu_id, max_vcpus);
    vcpu.set_cpuid2(&cpuid)
        .map_err(|source| CpuidError::SetCpuid { vcpu_id, source })?;
    tracing::debug!(
        vcpu_id,
        max_vcpus,
        entries = cpuid.as_slice().len(),
        "CPUID set"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn vendor_leaf(max_basic: u32, v: &[u8; 12]) -> kvm_cpuid_entry2 {
        let (ebx, edx, ecx) = bytes_to_regs(v);
        leaf(0, 0, max_basic, ebx, ecx, edx)
    }

    fn kvm_hv_leaf() -> kvm_cpuid_entry2 {
        let (ebx, ecx, edx) = bytes_to_regs(&KVM_SIGNATURE);
        leaf(HYPERVISOR_BASE, 0, HYPERVISOR_BASE + 1, ebx, ecx, edx)
    }

    /// Roughly what KVM reports on an Intel host, with host-specific junk in the fields we own.
    fn synthetic_intel() -> CpuId {
        let sub = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        let mut entries = vec![
            vendor_leaf(0x1f, b"GenuineIntel"),
            // Host APIC id 0x2a, 32 logical, brand index 5.
            leaf(1, 0, 0x000806f8, 0x2a20_0805, 0x7ffa_3203, 0x0f8b_fbff),
            // L1d, L2, L3, terminator.
            leaf(4, 0, 0x3c00_4121, 0x01c0_003f, 0x3f, 0),
            leaf(4, 1, 0x3c00_4143, 0x03c0_003f, 0x7ff, 0),
            leaf(4, 2, 0x3c07_c163, 0x0380_003f, 0xbfff, 6),
            leaf(4, 3, 0, 0, 0, 0),
            // Host topology: SMT 2 threads, 32 logical, die level.
            leaf(0xb, 0, 1, 2, 0x100, 0x2a),
            leaf(0xb, 1, 6, 32, 0x201, 0x2a),
            leaf(0xb, 2, 0, 0, 2, 0x2a),
            leaf(0x1f, 0, 1, 2, 0x100, 0x2a),
            leaf(0x1f, 1, 6, 32, 0x201, 0x2a),
            leaf(0x1f, 2, 7, 64, 0x502, 0x2a),
            leaf(0x1f, 3, 0, 0, 3, 0x2a),
            kvm_hv_leaf(),
            leaf(HYPERVISOR_BASE + 1, 0, 0x0100_7afb, 0, 0, 0),
            leaf(0x8000_0000, 0, 0x8000_0008, 0, 0, 0),
            leaf(0x8000_0008, 0, 0x3030, 0, 0, 0),
        ];
        for e in &mut entries {
            if [4, 0xb, 0x1f].contains(&e.function) {
                e.flags = sub;
            }
        }
        CpuId::from_entries(&entries).expect("cpuid")
    }

    fn synthetic_amd() -> CpuId {
        let entries = vec![
            vendor_leaf(0x10, b"AuthenticAMD"),
            leaf(1, 0, 0x00a00f11, 0x0b40_0800, 0x7ed8_320b, 0x178b_fbff),
            leaf(4, 0, 0, 0, 0, 0),
            kvm_hv_leaf(),
            leaf(HYPERVISOR_BASE + 1, 0, 0x0100_7afb, 0, 0, 0),
            leaf(0x8000_0000, 0, 0x8000_0021, 0, 0, 0),
            leaf(0x8000_0008, 0, 0x3030, 0x0, 0x0000_700f, 0),
            leaf(0x8000_001e, 0, 0x16, 0x0000_010b, 0x0000_0100, 0),
        ];
        CpuId::from_entries(&entries).expect("cpuid")
    }

    fn get(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *find(cpuid, function, index).unwrap_or_else(|| panic!("leaf {function:#x}.{index}"))
    }

    fn count(cpuid: &CpuId, function: u32) -> usize {
        cpuid
            .as_slice()
            .iter()
            .filter(|e| e.function == function)
            .count()
    }

    #[test]
    fn core_id_bits_is_ceil_log2() {
        let cases = [
            (0u8, 0u32),
            (1, 0),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 3),
            (8, 3),
            (9, 4),
            (254, 8),
        ];
        for (n, bits) in cases {
            assert_eq!(core_id_bits(n), bits, "max_vcpus {n}");
        }
    }

    #[test]
    fn leaf_1_apic_id_count_and_hypervisor_bit() {
        let mut c = synthetic_intel();
        filter_cpuid(&mut c, 5, 8);
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 5, "initial APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 8, "logical processor count");
        assert_eq!((l1.ebx >> 8) & 0xff, 8, "CLFLUSH line size in qwords");
        assert_eq!(l1.ebx & 0xff, 0, "brand index cleared");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        // Other feature bits untouched.
        assert_eq!(l1.ecx & !LEAF1_ECX_HYPERVISOR, 0x7ffa_3203);
        assert_eq!(l1.eax, 0x000806f8);

        let mut c = synthetic_intel();
        filter_cpuid(&mut c, 0, 1);
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 0);
        assert_eq!((l1.ebx >> 16) & 0xff, 1);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0, "no HTT with a single vCPU");
    }

    #[test]
    fn topology_leaves_describe_one_socket_of_single_thread_cores() {
        for (vcpu_id, max, shift) in [
            (0u8, 1u8, 0u32),
            (1, 2, 1),
            (6, 8, 3),
            (2, 3, 2),
            (200, 254, 8),
        ] {
            let mut c = synthetic_intel();
            filter_cpuid(&mut c, vcpu_id, max);
            for function in [0xb, 0x1f] {
                assert_eq!(count(&c, function), 3, "leaf {function:#x} sub-leaves");
                let smt = get(&c, function, 0);
                assert_eq!(smt.eax & 0x1f, 0, "SMT shift");
                assert_eq!(smt.ebx & 0xffff, 1, "one thread per core");
                assert_eq!(smt.ecx, 0x100, "level 0, type SMT");
                let core = get(&c, function, 1);
                assert_eq!(core.eax & 0x1f, shift, "core shift for {max} vCPUs");
                assert_eq!(core.ebx & 0xffff, u32::from(max));
                assert_eq!(core.ecx, 0x201, "level 1, type core");
                let end = get(&c, function, 2);
                assert_eq!((end.eax, end.ebx, end.ecx), (0, 0, 2), "terminating level");
                for e in [smt, core, end] {
                    assert_eq!(e.edx, u32::from(vcpu_id), "x2APIC id");
                    assert_eq!(e.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
                }
                // The package id derived from the x2APIC id is 0 for every vCPU.
                assert_eq!(u32::from(vcpu_id) >> shift, 0);
            }
        }
    }

    #[test]
    fn leaf_4_fields_match_topology() {
        let mut c = synthetic_intel();
        filter_cpuid(&mut c, 0, 8);
        for index in 0..3 {
            let e = get(&c, 4, index);
            assert_eq!(e.eax >> 26, 7, "8 addressable cores");
            let sharing = (e.eax >> 14) & 0xfff;
            let level = (e.eax >> 5) & 7;
            assert_eq!(sharing, if level >= 3 { 7 } else { 0 }, "L{level} sharing");
            // Cache type and level bits untouched.
            assert_eq!(
                e.eax & 0x3fff,
                get(&synthetic_intel(), 4, index).eax & 0x3fff
            );
        }
        assert_eq!(get(&c, 4, 3).eax, 0, "terminator untouched");

        let mut c = synthetic_intel();
        filter_cpuid(&mut c, 0, 254);
        assert_eq!(get(&c, 4, 0).eax >> 26, 63, "field saturates at 6 bits");
        assert_eq!((get(&c, 4, 2).eax >> 14) & 0xfff, 255);
    }

    #[test]
    fn hypervisor_leaf_is_kestrel_and_kvm_moves_up() {
        let mut c = synthetic_intel();
        filter_cpuid(&mut c, 0, 2);
        let hv = get(&c, HYPERVISOR_BASE, 0);
        assert_eq!(&hypervisor_signature(&hv), b"KestrelKVM\0\0");
        assert_eq!(hv.eax, HYPERVISOR_BASE, "max leaf of the Kestrel range");
        let kvm = get(&c, 0x4000_0100, 0);
        assert_eq!(hypervisor_signature(&kvm), KVM_SIGNATURE);
        assert_eq!(kvm.eax, 0x4000_0101, "KVM max leaf relocated");
        assert_eq!(
            get(&c, 0x4000_0101, 0).eax,
            0x0100_7afb,
            "KVM features kept"
        );
        assert!(find(&c, HYPERVISOR_BASE + 1, 0).is_none());
    }

    #[test]
    fn hypervisor_leaf_added_when_kvm_reports_none() {
        let entries = [vendor_leaf(1, b"GenuineIntel"), leaf(1, 0, 0, 0, 0, 0)];
        let mut c = CpuId::from_entries(&entries).expect("cpuid");
        filter_cpuid(&mut c, 0, 1);
        assert_eq!(
            hypervisor_signature(&get(&c, HYPERVISOR_BASE, 0)),
            KESTREL_SIGNATURE
        );
        // Max basic leaf 1: no topology leaves invented.
        assert_eq!(count(&c, 0xb), 0);
        assert_eq!(count(&c, 0x1f), 0);
    }

    #[test]
    fn filter_is_idempotent() {
        let mut once = synthetic_intel();
        filter_cpuid(&mut once, 3, 4);
        let mut twice = once.clone();
        filter_cpuid(&mut twice, 3, 4);
        assert_eq!(once.as_slice(), twice.as_slice());
    }

    #[test]
    fn amd_leaves() {
        let mut c = synthetic_amd();
        filter_cpuid(&mut c, 3, 6);
        let l8 = get(&c, 0x8000_0008, 0);
        assert_eq!(l8.ecx & 0xff, 5, "NC = cores - 1");
        assert_eq!((l8.ecx >> 12) & 0xf, 3, "ApicIdSize");
        assert_eq!(l8.eax, 0x3030, "address sizes untouched");
        let l1e = get(&c, 0x8000_001e, 0);
        assert_eq!(l1e.eax, 3, "extended APIC id");
        assert_eq!(l1e.ebx & 0xff, 3, "compute unit id");
        assert_eq!((l1e.ebx >> 8) & 0xff, 0, "one thread per compute unit");
        assert_eq!(l1e.ecx & 0x7ff, 0, "node 0 of 1");
        // Max basic 0x10: leaf 0xb is in range and gets the topology, 0x1f is not.
        assert_eq!(count(&c, 0xb), 3);
        assert_eq!(get(&c, 0xb, 1).ebx, 6);
        assert_eq!(get(&c, 0xb, 0).edx, 3);
        assert_eq!(count(&c, 0x1f), 0);
        assert_eq!(get(&c, 1, 0).ebx >> 24, 3);
        assert_eq!(get(&c, 4, 0).eax, 0, "empty leaf 4 untouched");
    }

    #[test]
    fn intel_does_not_get_amd_fields() {
        let mut c = synthetic_intel();
        filter_cpuid(&mut c, 1, 4);
        assert_eq!(get(&c, 0x8000_0008, 0).ecx, 0);
    }
}
