//! Paravirtual extended-state switch for guests on a software (nested) KVM
//! (docs/nested-kvm.md §10).
//!
//! There the guest kernel must run with `noxsave`, so it switches only the FXSAVE image (x87,
//! SSE) between tasks, while guest user code runs natively with the host's XCR0 and uses AVX and
//! AVX-512: without help the upper register halves leak from one guest task to the next. The
//! project's guest kernel patch (`resources/guest/patches/0002-*`) asks the VMM to do the rest
//! when the command line has `kestrel.pvfpu`: each task's `fpstate` becomes a 4096-byte area laid
//! out as `struct kvm_xsave`; after every FXSAVE the guest writes the area's guest-physical
//! address `>> 6` to [`PORT_SAVE`] and the VMM stores the vCPU's XSAVE header and extended
//! components there (`KVM_GET_XSAVE`); before every FXRSTOR it writes the address to
//! [`PORT_LOAD`] and the VMM loads the area into the vCPU (`KVM_SET_XSAVE`).
//!
//! The guest owns the area; a hostile guest can only point the VMM at its own memory (checked
//! by `vm-memory`) and hand it an invalid state, which KVM refuses and which is counted. Each
//! request costs one exit, one 4 KiB copy and one ioctl: bounded work, no allocation beyond the
//! copy. On hardware KVM the guest uses XSAVE, the VMM does not add `kestrel.pvfpu`, and the
//! ports are not served.

use kvm_bindings::kvm_xsave;
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Port the guest writes after saving a task's FXSAVE image: store the extended state.
pub const PORT_SAVE: u16 = 0x0e90;
/// Port the guest writes before loading a task's FXSAVE image: load the extended state.
pub const PORT_LOAD: u16 = 0x0e94;
/// Kernel command-line word that turns the guest side on.
pub const CMDLINE_FLAG: &str = "kestrel.pvfpu";
/// Size of the per-task area: `struct kvm_xsave`.
pub const AREA_SIZE: usize = std::mem::size_of::<kvm_xsave>();
/// The FXSAVE image at the start of the area stays the guest kernel's own.
const LEGACY_SIZE: usize = 512;
/// XSTATE_BV bits of the legacy components (x87, SSE): always taken from the area.
const XSTATE_BV_FP_SSE: u64 = 0b11;

/// Whether this KVM can serve the assist: `KVM_GET/SET_XSAVE` exist and the VM's XSAVE state
/// fits `struct kvm_xsave` (no dynamically enabled features such as AMX tiles, which would need
/// `KVM_GET_XSAVE2`).
pub fn supported(vm: &VmFd) -> bool {
    vm.check_extension(Cap::Xsave)
        && usize::try_from(vm.check_extension_int(Cap::Xsave2)).is_ok_and(|n| n <= AREA_SIZE)
}

/// What a port write asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Store the vCPU's header and extended state at the area.
    Save(GuestAddress),
    /// Load the area into the vCPU.
    Load(GuestAddress),
}

/// Decode a port write: a 4-byte value, the area's guest-physical address `>> 6`.
pub fn decode(port: u16, data: &[u8]) -> Option<Request> {
    let value: [u8; 4] = data.try_into().ok()?;
    let addr = GuestAddress(u64::from(u32::from_le_bytes(value)) << 6);
    match port {
        PORT_SAVE => Some(Request::Save(addr)),
        PORT_LOAD => Some(Request::Load(addr)),
        _ => None,
    }
}

/// Why a request could not be served (the guest gave a bad address or state).
#[derive(Debug, thiserror::Error)]
pub enum PvFpuError {
    /// The area is not entirely inside guest memory.
    #[error("extended-state area at {0:#x} is outside guest memory")]
    Memory(u64),
    /// `KVM_GET_XSAVE` / `KVM_SET_XSAVE` failed (KVM refuses an invalid state with EINVAL).
    #[error("{op} failed: errno {errno}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The errno KVM returned.
        errno: i32,
    },
}

fn as_bytes(x: &kvm_xsave) -> &[u8] {
    // SAFETY: kvm_xsave is a plain array of u32 (no padding, every bit pattern valid); the
    // slice covers exactly its size and borrows it.
    unsafe { std::slice::from_raw_parts((x as *const kvm_xsave).cast::<u8>(), AREA_SIZE) }
}

fn as_bytes_mut(x: &mut kvm_xsave) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; every byte pattern is a valid kvm_xsave, and the mutable borrow
    // is exclusive.
    unsafe { std::slice::from_raw_parts_mut((x as *mut kvm_xsave).cast::<u8>(), AREA_SIZE) }
}

/// Store the header and extended components of `state` (what `KVM_GET_XSAVE` returned) in the
/// guest area at `addr`. The FXSAVE image the guest wrote itself is left alone.
pub fn store(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    state: &kvm_xsave,
) -> Result<(), PvFpuError> {
    let tail = addr
        .0
        .checked_add(LEGACY_SIZE as u64)
        .ok_or(PvFpuError::Memory(addr.0))?;
    mem.write_slice(&as_bytes(state)[LEGACY_SIZE..], GuestAddress(tail))
        .map_err(|_| PvFpuError::Memory(addr.0))
}

/// Read the guest area at `addr` as the state to give `KVM_SET_XSAVE`: the guest's FXSAVE image
/// (always marked present, so x87/SSE come from it) plus the extended state stored earlier; a
/// fresh area (zero header) loads the init state of every extended component.
pub fn load(mem: &GuestMemoryMmap, addr: GuestAddress) -> Result<kvm_xsave, PvFpuError> {
    let mut state = kvm_xsave::default();
    mem.read_slice(as_bytes_mut(&mut state), addr)
        .map_err(|_| PvFpuError::Memory(addr.0))?;
    // XSTATE_BV is the first u64 of the header, right after the legacy area.
    let bv_index = LEGACY_SIZE / 4;
    let bv = u64::from(state.region[bv_index]) | (u64::from(state.region[bv_index + 1]) << 32);
    let bv = bv | XSTATE_BV_FP_SSE;
    let [b0, b1, b2, b3, b4, b5, b6, b7] = bv.to_le_bytes();
    state.region[bv_index] = u32::from_le_bytes([b0, b1, b2, b3]);
    state.region[bv_index + 1] = u32::from_le_bytes([b4, b5, b6, b7]);
    Ok(state)
}

/// Serve one request on the vCPU that made it.
pub fn serve(vcpu: &VcpuFd, mem: &GuestMemoryMmap, req: Request) -> Result<(), PvFpuError> {
    match req {
        Request::Save(addr) => {
            let state = vcpu.get_xsave().map_err(|e| PvFpuError::Kvm {
                op: "KVM_GET_XSAVE",
                errno: e.errno(),
            })?;
            store(mem, addr, &state)
        }
        Request::Load(addr) => {
            let state = load(mem, addr)?;
            // SAFETY: `supported` checked that the VM's XSAVE state fits `struct kvm_xsave`
            // (KVM_CAP_XSAVE2 <= 4096), so KVM reads no further than `state`.
            unsafe { vcpu.set_xsave(&state) }.map_err(|e| PvFpuError::Kvm {
                op: "KVM_SET_XSAVE",
                errno: e.errno(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn decode_ports_and_addresses() {
        assert_eq!(
            decode(PORT_SAVE, &0x40u32.to_le_bytes()),
            Some(Request::Save(GuestAddress(0x1000)))
        );
        assert_eq!(
            decode(PORT_LOAD, &u32::MAX.to_le_bytes()),
            Some(Request::Load(GuestAddress(u64::from(u32::MAX) << 6)))
        );
        // Wrong width or port: not a request.
        assert_eq!(decode(PORT_SAVE, &[1, 2]), None);
        assert_eq!(decode(0x3f8, &[0, 0, 0, 0]), None);
    }

    #[test]
    fn store_keeps_the_guest_fxsave_image_and_load_round_trips() {
        let m = mem();
        let area = GuestAddress(0x2000);
        // The guest's FXSAVE image.
        m.write_slice(&[0xaa; LEGACY_SIZE], area).unwrap();
        let mut state = kvm_xsave::default();
        for (i, w) in state.region.iter_mut().enumerate() {
            *w = u32::try_from(i).unwrap();
        }
        store(&m, area, &state).unwrap();
        let mut legacy = [0u8; LEGACY_SIZE];
        m.read_slice(&mut legacy, area).unwrap();
        assert_eq!(legacy, [0xaa; LEGACY_SIZE], "FXSAVE image overwritten");
        let back = load(&m, area).unwrap();
        assert_eq!(
            &back.region[LEGACY_SIZE / 4 + 2..],
            &state.region[LEGACY_SIZE / 4 + 2..]
        );
        // XSTATE_BV: the stored value with x87|SSE forced on.
        assert_eq!(
            back.region[LEGACY_SIZE / 4],
            state.region[LEGACY_SIZE / 4] | 0b11
        );
        assert_eq!(back.region[0], 0xaaaa_aaaa);
    }

    #[test]
    fn fresh_area_loads_init_state() {
        let m = mem();
        let back = load(&m, GuestAddress(0x3000)).unwrap();
        assert_eq!(back.region[LEGACY_SIZE / 4], 0b11);
        assert!(back.region[LEGACY_SIZE / 4 + 1..].iter().all(|w| *w == 0));
    }

    #[test]
    fn areas_outside_guest_memory_are_refused() {
        let m = mem();
        let state = kvm_xsave::default();
        assert!(matches!(
            store(&m, GuestAddress(0x10000 - 100), &state),
            Err(PvFpuError::Memory(_))
        ));
        assert!(matches!(
            load(&m, GuestAddress(0xffff_ffff_ffff_f000)),
            Err(PvFpuError::Memory(_))
        ));
        assert!(matches!(
            store(&m, GuestAddress(u64::MAX - 10), &state),
            Err(PvFpuError::Memory(_))
        ));
    }
}
