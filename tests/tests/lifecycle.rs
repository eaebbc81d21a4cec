//! Resource accounting across VM lifecycles, and panic containment (a panic on any Kestrel
//! thread, device handler or virtio-fs worker must neither hang nor leak). Every test here
//! takes `SERIAL`, so no other test's threads or fds disturb the counts.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use kestrel_api::{DriveConfig, FsConfig, SerialOutput, VmConfig};
use kestrel_tests::*;
use kestrel_vmm::{ThreadClass, ThreadKind, Vm, VmExit, STOP_JOIN_TIMEOUT};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn spin_config(name: &str, vcpus: u32) -> VmConfig {
    let k = write_tiny_guest(&format!("{name}.elf"), &spin());
    let mut c = VmConfig::new(k, vcpus, 64);
    c.serial.output = SerialOutput::None;
    c.kestrel.name = Some(name.into());
    c
}

fn cycle(c: &VmConfig) {
    let vm = Vm::create(c).unwrap();
    vm.start().unwrap();
    assert_eq!(vm.wait_timeout(Duration::from_millis(20)), None);
    assert_eq!(vm.stop(), VmExit::Stopped);
    drop(vm);
}

#[test]
fn twenty_create_start_stop_cycles_leave_no_threads_or_fds() {
    let _s = serial();
    let c = spin_config("cycle", 2);
    // Warm-up: the process-wide kick signal handler is installed once.
    cycle(&c);
    let (threads, fds) = (thread_count(), fd_count());
    for _ in 0..20 {
        cycle(&c);
    }
    assert_eq!(thread_count(), threads, "thread count changed");
    assert_eq!(fd_count(), fds, "fd count changed");
    // A failed create leaves nothing behind either.
    let mut bad = c.clone();
    bad.boot_source.kernel_image_path = scratch_dir().join("missing.elf");
    assert!(Vm::create(&bad).is_err());
    assert_eq!(fd_count(), fds);
}

/// Start `c`, inject a panic into `class`, and return the exit reason plus how long `wait`
/// took; checks that stop and drop return at once afterwards and nothing is left behind.
fn panic_ends_vm(c: &VmConfig, class: ThreadClass) -> VmExit {
    cycle(c); // warm-up (kick handler)
    let (threads, fds) = (thread_count(), fd_count());
    let vm = Vm::create(c).unwrap();
    vm.start().unwrap();
    vm.inject_panic(class).unwrap();
    let t0 = Instant::now();
    let exit = vm
        .wait_timeout(Duration::from_secs(10))
        .expect("a panic ends the VM instead of hanging it");
    assert!(vm.threads().is_empty(), "threads joined after wait");
    let t1 = Instant::now();
    assert_eq!(vm.stop(), exit, "stop reports the panic, not Stopped");
    drop(vm);
    assert!(t1.elapsed() < Duration::from_secs(1), "stop/drop are quick");
    assert!(
        t0.elapsed() < STOP_JOIN_TIMEOUT,
        "nothing waited for a timeout"
    );
    assert_eq!(thread_count(), threads, "thread count changed");
    assert_eq!(fd_count(), fds, "fd count changed");
    exit
}

#[test]
fn vcpu_panic_ends_the_vm_with_a_reason_naming_the_thread() {
    let _s = serial();
    let exit = panic_ends_vm(&spin_config("vpanic", 2), ThreadClass::Vcpu(1));
    match &exit {
        VmExit::ThreadPanicked { thread, message } => {
            assert_eq!(thread, "kestrel-vpanic-vcpu1");
            assert!(message.contains("injected panic on vCPU 1"), "{message}");
        }
        other => panic!("unexpected exit {other:?}"),
    }
    assert!(!exit.is_clean());
}

#[test]
fn event_loop_panic_ends_the_vm_and_vcpus_still_leave_kvm_run() {
    let _s = serial();
    // Two spinning vCPUs: only kicks get them out of KVM_RUN, and the loop that kicks is gone.
    let exit = panic_ends_vm(&spin_config("epanic", 2), ThreadClass::EventLoop);
    match &exit {
        VmExit::ThreadPanicked { thread, message } => {
            assert_eq!(thread, "kestrel-epanic-evloop");
            assert!(
                message.contains("injected panic on the event loop"),
                "{message}"
            );
        }
        other => panic!("unexpected exit {other:?}"),
    }
}

#[test]
fn device_handler_panic_fails_the_device_not_the_vm() {
    let _s = serial();
    let disk = scratch_dir().join("panic-disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let mut c = spin_config("dpanic", 1);
    c.drives.push(DriveConfig {
        drive_id: "d0".into(),
        path_on_host: Some(disk),
        ..DriveConfig::default()
    });
    cycle(&c);
    let (threads, fds) = (thread_count(), fd_count());
    let vm = Vm::create(&c).unwrap();
    vm.start().unwrap();
    assert_eq!(vm.device_needs_reset("d0"), Some(false));
    assert_eq!(vm.device_needs_reset("nope"), None);
    vm.inject_panic(ThreadClass::Device("d0".into())).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while vm.metrics().device_panics == 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(vm.metrics().device_panics, 1);
    assert_eq!(vm.device_needs_reset("d0"), Some(true));
    // The VM runs on, and the event loop does not spin on the undrained queue event.
    let before = vm_thread_cpu_ns(&vm, false);
    assert_eq!(vm.wait_timeout(Duration::from_millis(500)), None);
    let spent = vm_thread_cpu_ns(&vm, false) - before;
    assert!(spent < 100_000_000, "event loop used {spent} ns in 500 ms");
    assert!(vm.threads().iter().any(|t| t.kind == ThreadKind::EventLoop));
    assert!(matches!(
        vm.inject_panic(ThreadClass::Device("nope".into())),
        Err(kestrel_vmm::VmmError::NoSuchDevice(_))
    ));
    assert_eq!(vm.stop(), VmExit::Stopped);
    drop(vm);
    assert_eq!(thread_count(), threads, "thread count changed");
    assert_eq!(fd_count(), fds, "fd count changed");
}

#[test]
fn fs_worker_panic_fails_the_device_not_the_vm() {
    let _s = serial();
    let share = scratch_dir().join("panic-share");
    std::fs::create_dir_all(&share).unwrap();
    // fs0 (the first virtio device) with a worker thread for its request queue; the guest
    // brings it up (DRIVER_OK starts the worker) and spins. fs1 serves without workers.
    let queues = [RingLayout::at(0x30_0000, 16), RingLayout::at(0x31_0000, 16)];
    let code = mmio_writer(
        &virtio_mmio_bring_up(VIRTIO_MMIO_BASE, 0, &queues),
        &[],
        1000,
    );
    let mut c = VmConfig::new(write_tiny_guest("fs-driver.elf", &code), 1, 32);
    c.serial.output = SerialOutput::None;
    c.kestrel.name = Some("fspanic".into());
    let mut fs = FsConfig::shared_dir("share", &share);
    fs.num_queues = 1;
    fs.worker_threads = true;
    c.fs.push(fs);
    c.fs.push(FsConfig::shared_dir("plain", &share));
    cycle(&c);
    let (threads, fds) = (thread_count(), fd_count());
    let t0 = Instant::now();
    let vm = Vm::create(&c).unwrap();
    vm.start().unwrap();
    // Armed at once: the worker takes it on its first pass, whether it runs yet or not.
    vm.inject_panic(ThreadClass::FsWorker("fs0".into()))
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while vm.metrics().device_panics == 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        vm.metrics().device_panics,
        1,
        "the worker's panic is counted"
    );
    assert_eq!(vm.fs_metrics("share").unwrap().panics, 1);
    assert_eq!(vm.device_needs_reset("fs0"), Some(true));
    assert_eq!(vm.device_needs_reset("fs1"), Some(false));
    // The VM runs on.
    assert_eq!(vm.wait_timeout(Duration::from_millis(300)), None);
    assert_eq!(
        vm.threads().len(),
        2,
        "the vCPU and the event loop still run"
    );
    assert!(matches!(
        vm.inject_panic(ThreadClass::FsWorker("fs1".into())),
        Err(kestrel_vmm::VmmError::NoFsWorkers(_))
    ));
    assert!(matches!(
        vm.inject_panic(ThreadClass::FsWorker("nope".into())),
        Err(kestrel_vmm::VmmError::NoSuchDevice(_))
    ));
    let t1 = Instant::now();
    assert_eq!(vm.stop(), VmExit::Stopped);
    drop(vm);
    assert!(t1.elapsed() < Duration::from_secs(1), "stop/drop are quick");
    assert!(t0.elapsed() < STOP_JOIN_TIMEOUT + Duration::from_secs(5));
    assert_eq!(thread_count(), threads, "thread count changed");
    assert_eq!(fd_count(), fds, "fd count changed");
}
