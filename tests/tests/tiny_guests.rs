//! KVM tests with tiny hand-assembled guests: fast, no kernel needed.

use std::time::Duration;

use kestrel_api::{SerialOutput, VmConfig};
use kestrel_tests::*;
use kestrel_vmm::{ThreadKind, VcpuFault, Vm, VmExit};

fn config(kernel: std::path::PathBuf, vcpus: u32) -> VmConfig {
    let mut c = VmConfig::new(kernel, vcpus, 32);
    c.serial.output = SerialOutput::None;
    c
}

#[test]
fn serial_bytes_arrive_and_i8042_reset_stops_the_vm() {
    let msg = b"hello from a 64-bit tiny guest\n";
    let k = write_tiny_guest("serial.elf", &serial_then_reset(msg));
    let cap = Capture::default();
    let vm = Vm::create_with_console(&config(k, 1), Box::new(cap.clone())).unwrap();
    vm.start().unwrap();
    let exit = vm
        .wait_timeout(Duration::from_secs(60))
        .expect("guest stops");
    assert_eq!(exit, VmExit::Reset);
    assert_eq!(cap.text().as_bytes(), msg);
    let m = vm.metrics();
    assert_eq!(m.serial_tx_bytes, msg.len() as u64);
    assert!(m.pio_exits > msg.len() as u64, "{m:?}");
    assert!(m.setup_to_first_run_us.is_some());
    assert!(vm.threads().is_empty(), "threads are released after wait");
}

#[test]
fn unsupported_instruction_is_a_clean_error_naming_rip_and_bytes() {
    let (code, rip, insn) = unsupported_mmio_instruction();
    let k = write_tiny_guest("popcnt.elf", &code);
    let vm = Vm::create(&config(k, 1)).unwrap();
    vm.start().unwrap();
    let exit = vm
        .wait_timeout(Duration::from_secs(60))
        .expect("guest stops");
    match &exit {
        VmExit::Failed {
            vcpu: 0,
            fault: VcpuFault::EmulationFailure { rip: r, bytes },
        } => {
            assert_eq!(*r, rip);
            assert!(bytes.starts_with(&insn), "{bytes:02x?}");
        }
        other => panic!("unexpected exit {other:?}"),
    }
    let msg = exit.to_string();
    assert!(
        msg.contains(&format!("{rip:#x}")) && msg.contains("f3 48 0f b8 18"),
        "{msg}"
    );
}

#[test]
fn stop_from_another_thread_and_thread_ids() {
    let k = write_tiny_guest("spin.elf", &spin());
    let mut c = config(k, 2);
    c.kestrel.name = Some("spinner".into());
    let vm = std::sync::Arc::new(Vm::create(&c).unwrap());
    vm.start().unwrap();
    let threads = vm.threads();
    assert_eq!(threads.len(), 3, "{threads:?}");
    assert!(threads
        .iter()
        .any(|t| t.kind == ThreadKind::EventLoop && t.name == "kestrel-spinner-evloop"));
    for id in 0..2 {
        let t = threads
            .iter()
            .find(|t| t.kind == ThreadKind::Vcpu(id))
            .expect("vcpu thread listed");
        assert_eq!(t.name, format!("kestrel-spinner-vcpu{id}"));
        // The tid is a real thread of this process.
        assert!(std::path::Path::new(&format!("/proc/self/task/{}", t.tid)).exists());
    }
    assert_eq!(
        vm.wait_timeout(Duration::from_millis(300)),
        None,
        "still spinning"
    );
    let v2 = vm.clone();
    let stopper = std::thread::spawn(move || v2.stop());
    assert_eq!(stopper.join().unwrap(), VmExit::Stopped);
    assert_eq!(vm.stop(), VmExit::Stopped, "stop is idempotent");
    assert!(vm.threads().is_empty());
    assert!(vm.start().is_err(), "a stopped VM does not restart");
}

#[test]
fn several_vms_in_one_process() {
    let mut vms = Vec::new();
    for i in 0..3 {
        let msg = format!("vm number {i} says hi\n");
        let k = write_tiny_guest(&format!("multi{i}.elf"), &serial_then_reset(msg.as_bytes()));
        let cap = Capture::default();
        let vm = Vm::create_with_console(&config(k, 1), Box::new(cap.clone())).unwrap();
        vm.start().unwrap();
        vms.push((vm, cap, msg));
    }
    for (vm, cap, msg) in vms {
        assert_eq!(
            vm.wait_timeout(Duration::from_secs(60)),
            Some(VmExit::Reset)
        );
        assert_eq!(cap.text(), msg);
    }
}

#[test]
fn bad_config_is_rejected_before_anything_is_created() {
    let mut c = config("/nonexistent/vmlinux".into(), 1);
    let err = Vm::create(&c).err().expect("rejected").to_string();
    assert!(err.contains("boot-source.kernel_image_path"), "{err}");
    c.boot_source.kernel_image_path = write_tiny_guest("ok.elf", &spin());
    c.machine_config.vcpu_count = 0;
    let err = Vm::create(&c).err().expect("rejected").to_string();
    assert!(err.contains("machine-config.vcpu_count"), "{err}");
    // A file that is neither ELF nor bzImage.
    let junk = scratch_dir().join("junk.bin");
    std::fs::write(&junk, vec![0u8; 4096]).unwrap();
    c.machine_config.vcpu_count = 1;
    c.boot_source.kernel_image_path = junk;
    let err = Vm::create(&c).err().expect("rejected").to_string();
    assert!(err.contains("boot-source.kernel_image_path"), "{err}");
}

#[test]
fn vcpu_plug_park_and_memory_hotplug_primitives() {
    use kestrel_vmm::VcpuRunState;
    use vm_memory::{Bytes, GuestAddress};
    let k = write_tiny_guest("hp.elf", &spin());
    let mut c = config(k, 1);
    c.machine_config.max_vcpus = Some(2);
    c.machine_config.max_mem_size_mib = Some(32 + 256);
    let vm = Vm::create(&c).unwrap();
    assert!(vm.plug_vcpu(1).is_err(), "not started yet");
    vm.start().unwrap();
    assert_eq!(vm.threads().len(), 2);
    // Adding out of order or beyond max_vcpus is refused.
    assert!(vm.plug_vcpu(2).is_err());
    vm.plug_vcpu(1).unwrap();
    assert_eq!(
        vm.vcpu_states(),
        vec![(0, VcpuRunState::Running), (1, VcpuRunState::Running)]
    );
    let t = vm.threads();
    assert!(t.iter().any(|t| t.name.ends_with("-vcpu1")), "{t:?}");
    vm.park_vcpu(1).unwrap();
    assert_eq!(vm.vcpu_states()[1], (1, VcpuRunState::Parked));
    assert!(vm.park_vcpu(0).is_err(), "vCPU 0 stays");
    vm.plug_vcpu(1).unwrap();
    assert_eq!(vm.vcpu_states()[1], (1, VcpuRunState::Running));
    assert_eq!(vm.threads().len(), 3, "the parked thread was reused");

    // Memory: the region starts at the first 1 GiB boundary above boot RAM.
    let (base, size) = vm.hotplug_region().unwrap();
    assert_eq!((base, size), (1 << 30, 256 << 20));
    let r = vm.add_memory(128 << 20, 128 << 20).unwrap();
    assert_eq!(r.addr, base);
    vm.guest_memory()
        .write_obj(0xabcdu16, GuestAddress(r.addr + 0x1000))
        .unwrap();
    assert!(
        vm.add_memory(256 << 20, 128 << 20).is_err(),
        "only 128 MiB left"
    );
    vm.remove_memory(r.addr, r.size).unwrap();
    assert!(vm
        .guest_memory()
        .read_obj::<u16>(GuestAddress(r.addr))
        .is_err());
    assert_eq!(vm.stop(), VmExit::Stopped);
}

#[test]
fn pause_parks_every_vcpu_and_the_guest_stands_still_until_resume() {
    use kestrel_vmm::VcpuRunState::{Parked, Running};
    use std::time::Instant;
    use vm_memory::{Bytes, GuestAddress};
    const COUNTER: u64 = 0x3f_0000;
    // inc qword [COUNTER]; jmp back
    let mut code = vec![0x48, 0xff, 0x04, 0x25];
    code.extend_from_slice(&u32::try_from(COUNTER).unwrap().to_le_bytes());
    code.extend_from_slice(&[0xeb, 0xf6]);
    let k = write_tiny_guest("count.elf", &code);
    let vm = Vm::create(&config(k, 2)).unwrap();
    assert!(vm.pause().is_err(), "not started yet");
    vm.start().unwrap();
    let count = || {
        vm.guest_memory()
            .read_obj::<u64>(GuestAddress(COUNTER))
            .unwrap()
    };
    let advances_past = |n: u64| {
        let end = Instant::now() + Duration::from_secs(10);
        while count() <= n && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        count() > n
    };
    assert!(advances_past(0), "the guest counts");

    vm.pause().unwrap();
    assert_eq!(vm.vcpu_states(), vec![(0, Parked), (1, Parked)]);
    let paused_at = count();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(count(), paused_at, "a paused guest does not run");
    assert_eq!(vm.threads().len(), 3, "paused threads stay");

    // A vCPU hot-removed while paused stays parked across the resume.
    vm.park_vcpu(1).unwrap();
    vm.resume().unwrap();
    assert_eq!(vm.vcpu_states(), vec![(0, Running), (1, Parked)]);
    assert!(advances_past(paused_at), "the guest counts again");
    vm.plug_vcpu(1).unwrap();
    assert_eq!(vm.vcpu_states(), vec![(0, Running), (1, Running)]);

    // Stopping a paused VM ends its parked threads.
    vm.pause().unwrap();
    assert_eq!(vm.stop(), VmExit::Stopped);
    assert!(vm.threads().is_empty());
    assert!(vm.resume().is_err(), "not running");
}

#[test]
fn devices_are_reached_by_id_and_ids_are_unique_across_kinds() {
    use kestrel_api::{DriveConfig, FsConfig};
    use kestrel_vmm::{DeviceKind, VmmError};
    let share = scratch_dir().join("ids-share");
    std::fs::create_dir_all(&share).unwrap();
    let mut c = config(write_tiny_guest("ids.elf", &spin()), 1);
    c.drives.push(DriveConfig {
        drive_id: "slot".into(),
        ..DriveConfig::default()
    });
    c.fs.push(FsConfig::shared_dir("share", &share));
    let vm = Vm::create(&c).unwrap();
    let seen: Vec<(&str, DeviceKind)> = vm.devices().map(|d| (d.id(), d.kind())).collect();
    assert_eq!(seen, [("slot", DeviceKind::Block), ("fs0", DeviceKind::Fs)]);
    let fs = vm
        .device("fs0")
        .and_then(|d| d.fs())
        .expect("fs0 is a share");
    assert_eq!((fs.tag(), fs.is_vhost_user()), ("share", false));
    let slot = vm.device("slot").unwrap();
    assert!(slot.net().is_none() && slot.fs().is_none());
    assert_eq!(slot.metrics().block().map(|m| m.requests), Some(0));
    assert!(slot.metrics().fs().is_none());
    assert!(!slot.needs_reset());
    assert!(vm.device("nope").is_none());
    drop(vm);
    // A drive may not take the id the first share gets: validation (which create runs first)
    // refuses it, naming the share, before anything is created.
    c.drives[0].drive_id = "fs0".into();
    match Vm::create(&c) {
        Err(VmmError::Config(e)) => {
            assert_eq!(e.field(), Some("fs[0]"), "{e}");
            assert!(e.to_string().contains("\"fs0\" is already the id"), "{e}");
        }
        other => panic!("expected a config error, got {:?}", other.map(|_| ())),
    }
}
