//! The state of a VM's in-kernel devices: the two PICs, the IOAPIC, the PIT and the kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// What KVM holds for the VM itself (created by `KVM_CREATE_IRQCHIP` and `KVM_CREATE_PIT2`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// The master 8259 PIC (`chip_id` 0).
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC (`chip_id` 1).
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC (`chip_id` 2) with its redirection table.
    pub ioapic: kvm_irqchip,
    /// The i8254 PIT's channels and flags.
    pub pit: kvm_pit_state2,
    /// The kvmclock (guest nanoseconds) when saved.
    pub clock: kvm_clock_data,
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { op, source }
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Read the VM's irqchips, PIT and clock. The vCPUs should be out of `KVM_RUN` (paused) so
/// that the state is one moment's.
///
/// # Errors
/// [`SnapshotError::Kvm`] naming the ioctl that failed (e.g. a VM without an in-kernel
/// irqchip or PIT).
pub fn save_vm(vm: &VmFd) -> Result<VmState, SnapshotError> {
    Ok(VmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
    })
}

/// Write `state` into a new VM that has its irqchip and PIT (builder step 3), in the order the
/// probe proved: PIT2, CLOCK, then the PICs and the IOAPIC. The clock is set without flags:
/// the guest's kvmclock continues from the saved value (the time the VM spent saved is not
/// added; a template hand-out sets the guest clock itself).
///
/// # Errors
/// [`SnapshotError::Kvm`] naming the ioctl that failed.
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), SnapshotError> {
    vm.set_pit2(&state.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::test_vm as new_vm;

    fn json<T: Serialize>(v: &T) -> serde_json::Value {
        serde_json::to_value(v).expect("encode")
    }

    #[test]
    fn vm_state_moves_to_a_new_vm() {
        let (_kvm, vm) = new_vm();
        let mut ioapic = get_chip(&vm, KVM_IRQCHIP_IOAPIC).expect("ioapic");
        // SAFETY: KVM_GET_IRQCHIP with the IOAPIC's chip_id filled the `ioapic` member of the
        // union; a redirection entry is plain bits.
        unsafe { ioapic.chip.ioapic.redirtbl[5].bits = 0x25 | (1 << 15) };
        vm.set_irqchip(&ioapic).expect("set ioapic");
        let mut pit = vm.get_pit2().expect("pit");
        pit.channels[2].count = 0x1234;
        pit.channels[2].mode = 3;
        vm.set_pit2(&pit).expect("set pit");
        let saved = save_vm(&vm).expect("save");

        let (_kvm2, vm2) = new_vm();
        restore_vm(&vm2, &saved).expect("restore");
        let back = save_vm(&vm2).expect("read back");
        assert_eq!(json(&back.ioapic), json(&saved.ioapic));
        assert_eq!(json(&back.pic_master), json(&saved.pic_master));
        assert_eq!(json(&back.pic_slave), json(&saved.pic_slave));
        // SAFETY: as above, for the read-back IOAPIC.
        let entry = unsafe { back.ioapic.chip.ioapic.redirtbl[5].bits };
        assert_eq!(entry, 0x25 | (1 << 15));
        assert_eq!(back.pit.channels[2].count, 0x1234);
        assert_eq!(back.pit.channels[2].mode, 3);
        let elapsed = back.clock.clock.checked_sub(saved.clock.clock);
        assert!(
            elapsed.is_some_and(|ns| ns < 1_000_000_000),
            "the clock continues from the saved value: {} then {}",
            saved.clock.clock,
            back.clock.clock
        );
    }

    #[test]
    fn a_vm_without_irqchip_cannot_be_saved() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().expect("VM");
        assert!(matches!(
            save_vm(&vm),
            Err(SnapshotError::Kvm {
                op: "KVM_GET_IRQCHIP",
                ..
            })
        ));
    }
}
