//! The state of one vCPU: what KVM holds for it, read with the `KVM_GET_*` vCPU ioctls and
//! written back with the matching `KVM_SET_*` ones.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// Words (`u32`) in `struct kvm_xsave`'s region: 4096 bytes.
const XSAVE_WORDS: usize = 1024;

/// What the host's KVM lets a snapshot save and restore, probed once per VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmSupport {
    /// Every MSR of `KVM_GET_MSR_INDEX_LIST` (the ones a vCPU cannot read are dropped when
    /// saving).
    pub msr_indices: Vec<u32>,
    /// `KVM_GET_XSAVE`/`KVM_SET_XSAVE` work and the state fits `struct kvm_xsave` (Kestrel
    /// enables no dynamic XSTATE features, so `KVM_CAP_XSAVE2` never exceeds 4096 then).
    pub xsave: bool,
    /// `KVM_GET_XCRS`/`KVM_SET_XCRS` work.
    pub xcrs: bool,
}

impl KvmSupport {
    /// Probe the host: the MSR index list and the XSAVE/XCRS capabilities of `vm`.
    ///
    /// # Errors
    /// [`SnapshotError::Kvm`] if `KVM_GET_MSR_INDEX_LIST` fails.
    pub fn probe(kvm: &Kvm, vm: &VmFd) -> Result<Self, SnapshotError> {
        let list = kvm
            .get_msr_index_list()
            .map_err(|source| SnapshotError::Kvm {
                op: "KVM_GET_MSR_INDEX_LIST",
                source,
            })?;
        let xsave_fits = usize::try_from(vm.check_extension_int(Cap::Xsave2))
            .is_ok_and(|n| n <= XSAVE_WORDS * 4);
        Ok(KvmSupport {
            msr_indices: list.as_slice().to_vec(),
            xsave: vm.check_extension(Cap::Xsave) && xsave_fits,
            xcrs: vm.check_extension(Cap::Xcrs),
        })
    }
}

/// The x87/SSE state of `KVM_GET_FPU` (`struct kvm_fpu`, which has no serde support).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FpuState {
    /// ST0–ST7 / MM0–MM7, 16 bytes each (80 bits used).
    pub fpr: [[u8; 16]; 8],
    /// FPU control word.
    pub fcw: u16,
    /// FPU status word.
    pub fsw: u16,
    /// Abridged FPU tag word.
    pub ftwx: u8,
    /// Opcode of the last x87 instruction.
    pub last_opcode: u16,
    /// Address of the last x87 instruction.
    pub last_ip: u64,
    /// Address of the last x87 operand.
    pub last_dp: u64,
    /// XMM0–XMM15.
    pub xmm: [[u8; 16]; 16],
    /// SSE control and status.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// The vCPU index (its APIC id).
    pub id: u32,
    /// The CPUID table set on the vCPU (`KVM_GET_CPUID2`).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every readable MSR of the host's index list, with its value.
    pub msrs: Vec<kvm_msr_entry>,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: FpuState,
    /// The XSAVE area (`struct kvm_xsave`'s 1024 words), when the host has XSAVE.
    pub xsave: Option<Vec<u32>>,
    /// The extended control registers, when the host has XCRS.
    pub xcrs: Option<kvm_xcrs>,
    /// The local APIC's register page.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMM and interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for INIT/SIPI...
    pub mp_state: kvm_mp_state,
    /// DR0–DR3, DR6, DR7.
    pub debugregs: kvm_debugregs,
}

/// A vCPU-ioctl error mapper.
fn kvm_err(vcpu: u32, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::VcpuKvm { vcpu, op, source }
}

/// Read the state of vCPU `id` (its fd `fd`), which must be out of `KVM_RUN` (parked, or not
/// started). MSRs of `support.msr_indices` that this vCPU cannot read are left out.
///
/// # Errors
/// [`SnapshotError::VcpuKvm`] naming the ioctl that failed.
pub fn save_vcpu(fd: &VcpuFd, id: u32, support: &KvmSupport) -> Result<VcpuState, SnapshotError> {
    let e = |op| kvm_err(id, op);
    let xsave = if support.xsave {
        Some(fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?.region.to_vec())
    } else {
        None
    };
    let xcrs = if support.xcrs {
        Some(fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?)
    } else {
        None
    };
    Ok(VcpuState {
        id,
        mp_state: fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?,
        regs: fd.get_regs().map_err(e("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(e("KVM_GET_SREGS"))?,
        fpu: FpuState::from(&fd.get_fpu().map_err(e("KVM_GET_FPU"))?),
        xsave,
        xcrs,
        msrs: read_msrs(fd, id, &support.msr_indices)?,
        lapic: fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?,
        events: fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?,
        debugregs: fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?,
        cpuid: fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(e("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec(),
    })
}

/// Read every MSR of `indices` that the vCPU lets KVM read, in batches of KVM's maximum.
/// `KVM_GET_MSRS` stops at the first MSR it cannot read: that one is skipped and the rest of
/// the batch is read again.
fn read_msrs(fd: &VcpuFd, id: u32, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let entries: Vec<kvm_msr_entry> = rest
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = msrs_from(id, &entries)?;
            let n = fd
                .get_msrs(&mut msrs)
                .map_err(kvm_err(id, "KVM_GET_MSRS"))?;
            let n = n.min(rest.len());
            out.extend_from_slice(&msrs.as_slice()[..n]);
            if n < rest.len() {
                tracing::debug!("vCPU {id}: MSR {:#x} is not readable, left out", rest[n]);
                rest = &rest[n + 1..];
            } else {
                rest = &[];
            }
        }
    }
    Ok(out)
}

fn msrs_from(id: u32, entries: &[kvm_msr_entry]) -> Result<Msrs, SnapshotError> {
    Msrs::from_entries(entries).map_err(|_| SnapshotError::TooManyEntries {
        vcpu: id,
        what: "the MSR list",
        found: entries.len(),
        max: KVM_MAX_MSR_ENTRIES,
    })
}

/// Write `state` into the vCPU `fd` (a new vCPU of a new VM, not running), in the order the
/// probe proved: CPUID, MSRs, SREGS, REGS, FPU, XSAVE, XCRS, DEBUGREGS, LAPIC, MP_STATE,
/// VCPU_EVENTS. What the host cannot take is refused before anything is set.
///
/// # Errors
/// Before any ioctl: [`SnapshotError::MissingCapability`] if the state has XSAVE or XCRs and
/// `support` says the host lacks them; [`SnapshotError::TooManyEntries`] and
/// [`SnapshotError::XsaveSize`] for saved lists of an impossible size. Then
/// [`SnapshotError::VcpuKvm`] naming the ioctl that failed, or
/// [`SnapshotError::MsrRefused`] naming the MSR.
pub fn restore_vcpu(
    fd: &VcpuFd,
    state: &VcpuState,
    support: &KvmSupport,
) -> Result<(), SnapshotError> {
    let id = state.id;
    let (cpuid, xsave) = prepare(state, support)?;
    let e = |op| kvm_err(id, op);
    fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
    write_msrs(fd, id, &state.msrs)?;
    fd.set_sregs(&state.sregs).map_err(e("KVM_SET_SREGS"))?;
    fd.set_regs(&state.regs).map_err(e("KVM_SET_REGS"))?;
    fd.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(e("KVM_SET_FPU"))?;
    if let Some(xsave) = &xsave {
        // SAFETY: `prepare` returns an area only when `support.xsave` holds: KVM_CAP_XSAVE2 is
        // at most 4096 bytes (Kestrel enables no dynamic XSTATE features), so KVM reads no
        // further than `xsave`.
        unsafe { fd.set_xsave(xsave) }.map_err(e("KVM_SET_XSAVE"))?;
    }
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(e("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&state.debugregs)
        .map_err(e("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(e("KVM_SET_LAPIC"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(e("KVM_SET_MP_STATE"))?;
    fd.set_vcpu_events(&state.events)
        .map_err(e("KVM_SET_VCPU_EVENTS"))
}

/// Check `state` against the host and KVM's limits; returns the CPUID table and the XSAVE
/// area (if saved) in KVM's types. MSR batches are checked by [`msrs_from`] (chunks never
/// exceed KVM's maximum).
fn prepare(
    state: &VcpuState,
    support: &KvmSupport,
) -> Result<(CpuId, Option<kvm_xsave>), SnapshotError> {
    let id = state.id;
    let missing = |cap| SnapshotError::MissingCapability { vcpu: id, cap };
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| SnapshotError::TooManyEntries {
        vcpu: id,
        what: "the CPUID table",
        found: state.cpuid.len(),
        max: KVM_MAX_CPUID_ENTRIES,
    })?;
    if state.xcrs.is_some() && !support.xcrs {
        return Err(missing("KVM_CAP_XCRS"));
    }
    let Some(words) = &state.xsave else {
        return Ok((cpuid, None));
    };
    if !support.xsave {
        return Err(missing(
            "KVM_CAP_XSAVE (with an XSAVE state of at most 4096 bytes)",
        ));
    }
    if words.len() != XSAVE_WORDS {
        return Err(SnapshotError::XsaveSize {
            vcpu: id,
            found: words.len(),
            expected: XSAVE_WORDS,
        });
    }
    let mut xsave = kvm_xsave::default();
    xsave.region.copy_from_slice(words);
    Ok((cpuid, Some(xsave)))
}

/// Set `entries` in batches of KVM's maximum; a short count names the refused MSR.
fn write_msrs(fd: &VcpuFd, id: u32, entries: &[kvm_msr_entry]) -> Result<(), SnapshotError> {
    for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = msrs_from(id, chunk)?;
        let n = fd.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
        if n < chunk.len() {
            return Err(SnapshotError::MsrRefused {
                vcpu: id,
                index: chunk[n].index,
                done: n,
                total: chunk.len(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::test_vm as new_vm;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// MSR_IA32_TSC: it counts on, so a read-back differs.
    const MSR_IA32_TSC: u32 = 0x10;

    /// vCPU 0 as the builder leaves a boot vCPU, plus values no fresh vCPU has.
    fn boot_vcpu(kvm: &Kvm, vm: &VmFd) -> VcpuFd {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)])
            .expect("guest memory");
        let fd = crate::vcpu::create_vcpu(kvm, vm, 0, 1).expect("vCPU");
        crate::vcpu::setup_boot_vcpu(&fd, &mem, 0x100_0000).expect("boot registers");
        let mut regs = fd.get_regs().expect("regs");
        regs.rax = 0x1234_5678;
        regs.r15 = 0xdead_beef;
        fd.set_regs(&regs).expect("set regs");
        let mut fpu = fd.get_fpu().expect("fpu");
        fpu.xmm[3] = [0xab; 16];
        fd.set_fpu(&fpu).expect("set fpu");
        let mut dr = fd.get_debug_regs().expect("debugregs");
        dr.db[1] = 0x4000;
        fd.set_debug_regs(&dr).expect("set debugregs");
        fd
    }

    fn without_tsc(msrs: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
        msrs.iter()
            .filter(|m| m.index != MSR_IA32_TSC)
            .copied()
            .collect()
    }

    #[test]
    fn a_boot_vcpu_state_moves_to_a_new_vm() {
        let (kvm, vm) = new_vm();
        let support = KvmSupport::probe(&kvm, &vm).expect("probe");
        assert!(!support.msr_indices.is_empty());
        let fd = boot_vcpu(&kvm, &vm);
        let saved = save_vcpu(&fd, 0, &support).expect("save");
        assert_eq!(saved.regs.rax, 0x1234_5678);
        assert_eq!(saved.fpu.xmm[3], [0xab; 16]);
        assert_eq!(saved.debugregs.db[1], 0x4000);
        assert!(!saved.cpuid.is_empty() && !saved.msrs.is_empty());
        assert_eq!(saved.xsave.is_some(), support.xsave);
        assert_eq!(saved.xcrs.is_some(), support.xcrs);

        let (_kvm2, vm2) = new_vm();
        let fd2 = vm2.create_vcpu(0).expect("vCPU of the new VM");
        restore_vcpu(&fd2, &saved, &support).expect("restore");
        let back = save_vcpu(&fd2, 0, &support).expect("read back");
        assert_eq!(back.regs, saved.regs);
        assert_eq!(back.sregs, saved.sregs);
        assert_eq!(back.fpu, saved.fpu);
        assert_eq!(back.xsave, saved.xsave);
        assert_eq!(back.xcrs, saved.xcrs);
        assert_eq!(back.lapic, saved.lapic);
        assert_eq!(back.events, saved.events);
        assert_eq!(back.mp_state, saved.mp_state);
        assert_eq!(back.debugregs, saved.debugregs);
        assert_eq!(back.cpuid, saved.cpuid);
        assert_eq!(without_tsc(&back.msrs), without_tsc(&saved.msrs));
    }

    #[test]
    fn a_vcpu_state_survives_json() {
        let (kvm, vm) = new_vm();
        let support = KvmSupport::probe(&kvm, &vm).expect("probe");
        let saved = save_vcpu(&boot_vcpu(&kvm, &vm), 0, &support).expect("save");
        let json = serde_json::to_vec(&saved).expect("encode");
        let back: VcpuState = serde_json::from_slice(&json).expect("decode");
        assert_eq!(back, saved);
    }

    #[test]
    fn restore_refuses_what_the_host_lacks_or_kvm_cannot_take() {
        let (kvm, vm) = new_vm();
        let support = KvmSupport::probe(&kvm, &vm).expect("probe");
        let mut state = save_vcpu(&boot_vcpu(&kvm, &vm), 0, &support).expect("save");
        let fd = vm.create_vcpu(1).expect("second vCPU");
        state.xsave = Some(vec![0; 10]);
        let without = KvmSupport {
            xsave: false,
            ..support.clone()
        };
        assert!(matches!(
            restore_vcpu(&fd, &state, &without),
            Err(SnapshotError::MissingCapability { vcpu: 0, .. })
        ));
        if support.xsave {
            assert!(matches!(
                restore_vcpu(&fd, &state, &support),
                Err(SnapshotError::XsaveSize { found: 10, .. })
            ));
        }
        state.xsave = None;
        state.cpuid = vec![kvm_cpuid_entry2::default(); KVM_MAX_CPUID_ENTRIES + 1];
        assert!(matches!(
            restore_vcpu(&fd, &state, &support),
            Err(SnapshotError::TooManyEntries { .. })
        ));
    }

    #[test]
    fn fpu_state_converts_both_ways() {
        let f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 7,
            xmm: [[1; 16]; 16],
            ..Default::default()
        };
        assert_eq!(kvm_fpu::from(&FpuState::from(&f)), f);
    }
}
