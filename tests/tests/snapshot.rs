//! Snapshots of a running tiny guest (issue 13; restore is still to come): refused unless the
//! VM is paused, with nothing written; a paused VM's snapshot directory holds a state file
//! that reads back (every vCPU, the in-kernel devices, every virtio device, the memory layout)
//! and a memory file with the guest's RAM; the VM resumes afterwards. And the snapshot is
//! enough to go on: a guest rebuilt from it in a new KVM VM (by hand, until `Vm::restore`
//! exists) continues counting where it stopped.

use std::time::Duration;

use kestrel_api::{DriveConfig, SerialOutput, VmConfig};
use kestrel_tests::*;
use kestrel_vmm::snapshot::{self, DeviceState};
use kestrel_vmm::{Vm, VmExit, VmmError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn spin_vm(name: &str) -> Vm {
    let k = write_tiny_guest(&format!("{name}.elf"), &spin());
    let mut c = VmConfig::new(k, 2, 64);
    c.serial.output = SerialOutput::None;
    c.kestrel.name = Some(name.into());
    let disk = scratch_dir().join(format!("{name}-disk.img"));
    std::fs::write(&disk, vec![0u8; 4096]).expect("disk");
    c.drives.push(DriveConfig {
        drive_id: "d0".into(),
        path_on_host: Some(disk),
        ..DriveConfig::default()
    });
    let vm = Vm::create(&c).expect("create");
    vm.start().expect("start");
    vm
}

#[test]
fn a_running_vm_is_not_snapshotted() {
    let vm = spin_vm("snap-running");
    let dir = scratch_dir().join("snap-running");
    assert!(matches!(vm.snapshot(&dir), Err(VmmError::NotPaused)));
    assert!(!dir.exists(), "nothing is written");
    vm.pause().expect("pause");
    vm.resume().expect("resume");
    assert!(matches!(vm.snapshot(&dir), Err(VmmError::NotPaused)));
    assert_eq!(vm.stop(), VmExit::Stopped);
    assert!(matches!(vm.snapshot(&dir), Err(VmmError::NotRunning)));
}

#[test]
fn a_paused_vm_is_snapshotted_and_runs_on() {
    let vm = spin_vm("snap-paused");
    vm.guest_memory()
        .write_obj(0x5a5a_1234u32, GuestAddress(0x30_0000))
        .expect("mark guest memory");
    std::thread::sleep(Duration::from_millis(20));
    vm.pause().expect("pause");
    let dir = scratch_dir().join("snap-paused");
    vm.snapshot(&dir).expect("snapshot");

    let state = snapshot::read_state_file(&dir.join(snapshot::STATE_FILE)).expect("state file");
    assert_eq!(state.version, snapshot::FORMAT_VERSION);
    let ids: Vec<u32> = state.vcpus.iter().map(|v| v.id).collect();
    assert_eq!(ids, [0, 1]);
    let v0 = &state.vcpus[0];
    assert!(!v0.msrs.is_empty() && !v0.cpuid.is_empty());
    assert_ne!(v0.sregs.cr0 & 1, 0, "vCPU 0 runs in protected (long) mode");
    assert_eq!(state.devices.len(), 1);
    assert_eq!(state.devices[0].id, "d0");
    assert!(matches!(state.devices[0].state, DeviceState::Block(_)));
    assert_eq!(state.cmdline, vm.cmdline());
    assert_eq!(state.hotplug, snapshot::HotplugState::default());

    let total: u64 = state.memory.iter().map(|r| r.size).sum();
    assert_eq!(total, 64 << 20);
    let mem = std::fs::read(dir.join(snapshot::MEMORY_FILE)).expect("memory file");
    assert_eq!(u64::try_from(mem.len()).expect("size"), total);
    let r0 = state
        .memory
        .iter()
        .find(|r| r.guest_addr == 0)
        .expect("low RAM");
    let at = usize::try_from(r0.file_offset + 0x30_0000).expect("offset");
    assert_eq!(mem[at..at + 4], 0x5a5a_1234u32.to_le_bytes());

    drop(mem);
    std::fs::remove_dir_all(&dir).expect("remove the snapshot");

    vm.resume().expect("resume");
    assert_eq!(vm.wait_timeout(Duration::from_millis(50)), None, "runs on");
    assert_eq!(vm.stop(), VmExit::Stopped);
}

#[test]
fn the_hotplug_state_is_in_the_snapshot() {
    let k = write_tiny_guest("snap-hotplug.elf", &spin());
    let mut c = VmConfig::new(k, 1, 64);
    c.serial.output = SerialOutput::None;
    c.kestrel.name = Some("snap-hotplug".into());
    c.machine_config.max_vcpus = Some(2);
    c.machine_config.max_mem_size_mib = Some(128);
    let vm = Vm::create(&c).expect("create");
    vm.start().expect("start");
    vm.plug_vcpu(1).expect("plug vCPU 1");
    vm.park_vcpu(1).expect("park vCPU 1");
    let block = 2 << 20;
    let plugged = vm.add_memory(block, block).expect("add memory");
    vm.pause().expect("pause");
    let dir = scratch_dir().join("snap-hotplug");
    vm.snapshot(&dir).expect("snapshot");
    let state = snapshot::read_state_file(&dir.join(snapshot::STATE_FILE)).expect("state file");
    std::fs::remove_dir_all(&dir).expect("remove the snapshot");
    let ids: Vec<u32> = state.vcpus.iter().map(|v| v.id).collect();
    assert_eq!(ids, [0, 1], "a hot-removed vCPU is saved too");
    assert_eq!(state.hotplug.unplugged_vcpus, [1]);
    assert_eq!(
        state.hotplug.plugged_memory,
        [snapshot::PluggedMemory {
            addr: plugged.addr,
            size: block
        }]
    );
    assert!(state
        .memory
        .iter()
        .any(|r| r.guest_addr == plugged.addr && r.size == block));
    let total: u64 = state.memory.iter().map(|r| r.size).sum();
    assert_eq!(total, (64 << 20) + block);
    assert_eq!(vm.stop(), VmExit::Stopped);
}

/// Counter of the counting guest.
const COUNTER: u64 = 0x30_0000;

/// Code: `mov eax, COUNTER; l: inc dword [rax]; out 0x80, al; jmp l` (one PIO exit per count).
fn counting_guest() -> Vec<u8> {
    vec![
        0xb8, 0x00, 0x00, 0x30, 0x00, 0xff, 0x00, 0xe6, 0x80, 0xeb, 0xfa,
    ]
}

fn counter_in(mem: &[u8], state: &snapshot::SnapshotState) -> u32 {
    let r = state
        .memory
        .iter()
        .find(|r| r.guest_addr == 0)
        .expect("low RAM");
    let at = usize::try_from(r.file_offset + COUNTER).expect("offset");
    u32::from_le_bytes(mem[at..at + 4].try_into().expect("4 bytes"))
}

/// A new KVM VM with the guest memory, irqchip, PIT and vCPU 0 of `state`.
fn rebuild(
    state: &snapshot::SnapshotState,
    mem: &[u8],
) -> (kvm_ioctls::VmFd, kvm_ioctls::VcpuFd, GuestMemoryMmap) {
    use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
    use vm_memory::{GuestMemory, GuestMemoryRegion};
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("VM");
    vm.set_tss_address(0xfffb_d000).expect("TSS");
    vm.create_irq_chip().expect("irqchip");
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).expect("PIT");
    let ranges: Vec<(GuestAddress, usize)> = state
        .memory
        .iter()
        .map(|r| {
            (
                GuestAddress(r.guest_addr),
                usize::try_from(r.size).expect("size"),
            )
        })
        .collect();
    let gm = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    for (slot, r) in state.memory.iter().enumerate() {
        let from = usize::try_from(r.file_offset).expect("offset");
        let len = usize::try_from(r.size).expect("size");
        gm.write_slice(&mem[from..from + len], GuestAddress(r.guest_addr))
            .expect("copy memory");
        let host = gm
            .find_region(GuestAddress(r.guest_addr))
            .expect("region")
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("host address");
        let region = kvm_userspace_memory_region {
            slot: u32::try_from(slot).expect("slot"),
            guest_phys_addr: r.guest_addr,
            memory_size: r.size,
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is mapped by `gm`, which the caller keeps as long as the VM.
        unsafe { vm.set_user_memory_region(region) }.expect("memory slot");
    }
    assert_eq!(gm.num_regions(), state.memory.len());
    snapshot::restore_vm(&vm, &state.vm).expect("restore the VM state");
    let support = snapshot::KvmSupport::probe(&kvm, &vm).expect("probe");
    let vcpu = vm.create_vcpu(0).expect("vCPU");
    snapshot::restore_vcpu(&vcpu, &state.vcpus[0], &support).expect("restore vCPU 0");
    (vm, vcpu, gm)
}

#[test]
fn a_guest_rebuilt_from_its_snapshot_continues_where_it_stopped() {
    let k = write_tiny_guest("snap-count.elf", &counting_guest());
    let mut c = VmConfig::new(k, 1, 64);
    c.serial.output = SerialOutput::None;
    c.kestrel.name = Some("snap-count".into());
    let vm = Vm::create(&c).expect("create");
    vm.start().expect("start");
    let live = vm.guest_memory();
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while live
        .read_obj::<u32>(GuestAddress(COUNTER))
        .expect("counter")
        < 100
    {
        assert!(std::time::Instant::now() < end, "the guest counts");
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.pause().expect("pause");
    let dir = scratch_dir().join("snap-count");
    vm.snapshot(&dir).expect("snapshot");
    assert_eq!(vm.stop(), VmExit::Stopped);
    drop(live);
    drop(vm);

    let state = snapshot::read_state_file(&dir.join(snapshot::STATE_FILE)).expect("state file");
    let mem = std::fs::read(dir.join(snapshot::MEMORY_FILE)).expect("memory file");
    std::fs::remove_dir_all(&dir).expect("remove the snapshot");
    let saved = counter_in(&mem, &state);
    assert!(saved >= 100);
    let (_vm, mut vcpu, gm) = rebuild(&state, &mem);
    for _ in 0..1000 {
        match vcpu.run().expect("KVM_RUN") {
            kvm_ioctls::VcpuExit::IoOut(0x80, _) => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    let now = gm.read_obj::<u32>(GuestAddress(COUNTER)).expect("counter");
    assert!(
        (saved + 999..=saved + 1001).contains(&now),
        "counted on from {saved}: {now}"
    );
}
