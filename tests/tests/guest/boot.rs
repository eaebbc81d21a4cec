//! The real Linux guest built by `resources/` boots to userspace. Each test boots one guest and
//! runs every check it can in that boot (a boot takes ~100 s on a software KVM).

use std::time::Duration;

use kestrel_api::{SerialOutput, VmConfig};
use kestrel_tests::*;
use kestrel_vmm::{Vm, VmExit};

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const CONSOLE_CHECK: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_";

fn boot(vcpus: u32) -> (Vm, Capture) {
    let g = guest_artifacts();
    let mut c = VmConfig::new(g.vmlinux, vcpus, 128);
    c.boot_source.initrd_path = Some(g.initramfs);
    c.serial.output = SerialOutput::None;
    c.kestrel.name = Some(format!("boot{vcpus}"));
    let cap = Capture::default();
    let vm = Vm::create_with_console(&c, Box::new(cap.clone())).expect("create VM");
    vm.start().expect("start VM");
    (vm, cap)
}

fn check_boot(vcpus: u32, expect_online: &str) {
    let (vm, cap) = boot(vcpus);
    let exit = vm.wait_timeout(BOOT_TIMEOUT);
    let text = cap.text();
    assert_eq!(
        exit,
        Some(VmExit::Reset),
        "guest did not reboot cleanly; console:\n{text}"
    );
    assert!(text.contains("Run /init"), "kernel never ran init:\n{text}");
    assert!(
        text.contains(&format!("kestrel-init: cpus online {expect_online}\n"))
            || text.contains(&format!("kestrel-init: cpus online {expect_online}\r\n")),
        "wrong online CPU set (want {expect_online}):\n{text}"
    );
    // User-space console output arrives whole (not only its first character).
    let line = format!("kestrel-init: console-check {}", CONSOLE_CHECK.repeat(4));
    assert!(text.contains(&line), "console line damaged:\n{text}");
    assert!(
        text.contains("KESTREL_GUEST_READY"),
        "no readiness marker:\n{text}"
    );
    if vcpus > 1 {
        assert!(
            text.contains(&format!("Brought up 1 node, {vcpus} CPUs")),
            "kernel did not bring up {vcpus} CPUs:\n{text}"
        );
        assert!(
            vm.metrics().assist_ap_start <= u64::from(vcpus),
            "{:?}",
            vm.metrics()
        );
    }
    let m = vm.metrics();
    eprintln!("boot with {vcpus} vCPU(s): {m:?}");
    assert!(m.serial_tx_bytes >= text.len() as u64);
}

#[test]
fn boots_to_userspace_with_one_vcpu() {
    check_boot(1, "0");
}

#[test]
fn boots_to_userspace_with_two_vcpus() {
    check_boot(2, "0-1");
}
