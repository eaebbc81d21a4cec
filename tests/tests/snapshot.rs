//! Snapshots of a running tiny guest (issue 13): refused unless the
//! VM is paused, with nothing written; a paused VM's snapshot directory holds a state file
//! that reads back (every vCPU, the in-kernel devices, every virtio device, the memory layout)
//! and a memory file with the guest's RAM; the VM resumes afterwards. `Vm::restore` rebuilds a
//! guest that counts on where it stopped, clones of one snapshot run side by side without
//! changing its memory file, and bad snapshots are refused with nothing left behind.

use std::time::Duration;

use kestrel_api::{DriveConfig, SerialOutput, VmConfig};
use kestrel_tests::*;
use kestrel_vmm::snapshot::{self, DeviceState};
use kestrel_vmm::{Vm, VmExit, VmmError};
use vm_memory::{Bytes, GuestAddress};

/// The tests of this file one at a time: the leak checks count the process's fds and threads.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// A started tiny guest `name` running `code` on `vcpus` vCPUs and 64 MiB, with a 4 KiB drive
/// `d0`.
fn tiny_vm(name: &str, code: &[u8], vcpus: u32) -> Vm {
    let k = write_tiny_guest(&format!("{name}.elf"), code);
    let mut c = VmConfig::new(k, vcpus, 64);
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

fn spin_vm(name: &str) -> Vm {
    tiny_vm(name, &spin(), 2)
}

#[test]
fn a_running_vm_is_not_snapshotted() {
    let _one = one_at_a_time();
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
    let _one = one_at_a_time();
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
    let _one = one_at_a_time();
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

fn counting_vm(name: &str) -> Vm {
    tiny_vm(name, &counting_guest(), 1)
}

fn counter(vm: &Vm) -> u32 {
    vm.guest_memory()
        .read_obj::<u32>(GuestAddress(COUNTER))
        .expect("counter")
}

/// Wait until the guest's counter reaches `at_least`.
fn counts_to(vm: &Vm, at_least: u32) {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while counter(vm) < at_least {
        assert!(std::time::Instant::now() < end, "the guest counts");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Snapshot of a counting guest stopped past 100; returns the snapshot dir and the count.
fn counting_snapshot(name: &str) -> (std::path::PathBuf, u32) {
    let vm = counting_vm(name);
    counts_to(&vm, 100);
    vm.pause().expect("pause");
    let saved = counter(&vm);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(counter(&vm), saved, "a paused guest does not count");
    let dir = scratch_dir().join(name);
    vm.snapshot(&dir).expect("snapshot");
    assert_eq!(vm.stop(), VmExit::Stopped);
    (dir, saved)
}

#[test]
fn a_restored_guest_continues_where_it_stopped() {
    let _one = one_at_a_time();
    let (dir, saved) = counting_snapshot("snap-count");
    let state = snapshot::read_state_file(&dir.join(snapshot::STATE_FILE)).expect("state file");
    let mem = std::fs::read(dir.join(snapshot::MEMORY_FILE)).expect("memory file");
    assert_eq!(counter_in(&mem, &state), saved);
    let overrides = kestrel_api::RestoreOverrides {
        name: Some("snap-count-clone".into()),
        ..Default::default()
    };
    let vm = Vm::restore(&dir, &overrides).expect("restore");
    assert_eq!(vm.name(), "snap-count-clone");
    assert_eq!(counter(&vm), saved, "memory is the snapshot's");
    vm.start().expect("start");
    counts_to(&vm, saved + 1000);
    // Copy-on-write: the memory file did not change.
    assert_eq!(
        std::fs::read(dir.join(snapshot::MEMORY_FILE)).expect("memory file"),
        mem
    );
    assert!(vm.device("d0").is_some(), "the drive is back");
    assert_eq!(vm.stop(), VmExit::Stopped);
    std::fs::remove_dir_all(&dir).expect("remove the snapshot");
}

#[test]
fn clones_of_one_snapshot_run_side_by_side() {
    let _one = one_at_a_time();
    let (dir, saved) = counting_snapshot("snap-clones");
    let clones: Vec<Vm> = (0..3)
        .map(|i| {
            let o = kestrel_api::RestoreOverrides {
                name: Some(format!("snap-clone{i}")),
                ..Default::default()
            };
            let vm = Vm::restore(&dir, &o).expect("restore");
            vm.start().expect("start");
            vm
        })
        .collect();
    for vm in &clones {
        counts_to(vm, saved + 500);
    }
    for vm in &clones {
        assert_eq!(vm.stop(), VmExit::Stopped);
    }
    std::fs::remove_dir_all(&dir).expect("remove the snapshot");
}

/// Threads named after `name` and open fds of this process.
fn leftovers(name: &str) -> usize {
    let mut n = 0;
    for t in std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.contains(name) {
            n += 1;
        }
    }
    n
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("fds").count()
}

#[test]
fn bad_snapshots_are_refused_and_leave_nothing_behind() {
    let _one = one_at_a_time();
    let (dir, _) = counting_snapshot("snap-bad");
    let state_path = dir.join(snapshot::STATE_FILE);
    let mem_path = dir.join(snapshot::MEMORY_FILE);
    let good_state = std::fs::read(&state_path).expect("state");
    let good_mem = std::fs::read(&mem_path).expect("memory");
    let o = kestrel_api::RestoreOverrides {
        name: Some("snapbad".into()),
        ..Default::default()
    };
    let fds = fd_count();
    let restore_err = || match Vm::restore(&dir, &o) {
        Ok(_) => panic!("restored a bad snapshot"),
        Err(e) => e.to_string(),
    };
    // Another format version (bytes 8..12 of the header).
    let mut other = good_state.clone();
    other[8..12].copy_from_slice(&(snapshot::FORMAT_VERSION + 1).to_le_bytes());
    std::fs::write(&state_path, &other).expect("write");
    let e = restore_err();
    assert!(e.contains("version"), "{e}");
    // Truncated.
    std::fs::write(&state_path, &good_state[..good_state.len() / 2]).expect("write");
    let e = restore_err();
    assert!(e.contains("truncated") || e.contains("length"), "{e}");
    std::fs::write(&state_path, &good_state).expect("write");
    // A memory file of the wrong size.
    std::fs::write(&mem_path, &good_mem[..good_mem.len() - 4096]).expect("write");
    let e = restore_err();
    assert!(e.contains("memory file") && e.contains("bytes"), "{e}");
    std::fs::write(&mem_path, &good_mem).expect("write");
    // An override naming a drive the snapshot lacks.
    let bad = kestrel_api::RestoreOverrides {
        drives: vec![kestrel_api::DriveOverride {
            drive_id: "nope".into(),
            path_on_host: "/nonexistent".into(),
        }],
        ..Default::default()
    };
    let e = Vm::restore(&dir, &bad).err().expect("refused").to_string();
    assert!(e.contains("overrides.drives[0].drive_id"), "{e}");
    assert_eq!(leftovers("snapbad"), 0, "no thread left");
    assert_eq!(fd_count(), fds, "no fd left");
    let vm = Vm::restore(&dir, &o).expect("the repaired snapshot restores");
    vm.start().expect("start");
    assert_eq!(vm.stop(), VmExit::Stopped);
    std::fs::remove_dir_all(&dir).expect("remove the snapshot");
}
