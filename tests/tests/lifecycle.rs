//! Resource accounting across VM lifecycles. Alone in its own test binary so no other test's
//! threads or fds disturb the counts.

use std::time::Duration;

use kestrel_api::{SerialOutput, VmConfig};
use kestrel_tests::*;
use kestrel_vmm::{Vm, VmExit};

fn cycle(c: &VmConfig) {
    let vm = Vm::create(c).unwrap();
    vm.start().unwrap();
    assert_eq!(vm.wait_timeout(Duration::from_millis(20)), None);
    assert_eq!(vm.stop(), VmExit::Stopped);
    drop(vm);
}

#[test]
fn twenty_create_start_stop_cycles_leave_no_threads_or_fds() {
    let k = write_tiny_guest("cycle.elf", &spin());
    let mut c = VmConfig::new(k, 2, 64);
    c.serial.output = SerialOutput::None;
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
