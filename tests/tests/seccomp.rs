//! Seccomp filters bind only the threads Kestrel spawns: a call the event loop's filter
//! forbids fails there with EPERM (the library's default action) while the embedding process's
//! own threads make the same call successfully; `kestrel.seccomp = "off"` lifts the filters.

use std::sync::mpsc;
use std::time::Duration;

use kestrel_api::{SeccompMode, SerialOutput, VmConfig};
use kestrel_tests::*;
use kestrel_vmm::{ThreadKind, Vm};

fn spin_config(name: &str) -> VmConfig {
    let k = write_tiny_guest(&format!("{name}.elf"), &spin());
    let mut c = VmConfig::new(k, 1, 64);
    c.serial.output = SerialOutput::None;
    c.kestrel.name = Some(name.into());
    c
}

/// Calls no Kestrel thread class may make: an IPv4 socket (the event loop may create only
/// Unix sockets) and getppid (on no list). Each returns Ok or the errno.
fn forbidden_calls() -> Vec<Result<(), i32>> {
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    // SAFETY: socket has no memory preconditions; the fd, if any, is closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    let sock = if fd >= 0 {
        // SAFETY: `fd` is the socket just created and owned here.
        unsafe { libc::close(fd) };
        Ok(())
    } else {
        Err(errno())
    };
    // SAFETY: getppid has no preconditions.
    let ppid = if unsafe { libc::syscall(libc::SYS_getppid) } >= 0 {
        Ok(())
    } else {
        Err(errno())
    };
    vec![sock, ppid]
}

fn on_event_loop(vm: &Vm) -> Vec<Result<(), i32>> {
    let (tx, rx) = mpsc::channel();
    vm.run_on_event_loop(Box::new(move || {
        let _ = tx.send(forbidden_calls());
    }))
    .unwrap();
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the event loop ran the task")
}

/// `Seccomp:` of /proc/self/task/<tid>/status: 0 none, 2 filter.
fn seccomp_status(tid: i32) -> String {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .unwrap_or("?")
        .trim()
        .to_string()
}

#[test]
fn forbidden_call_fails_on_the_event_loop_but_not_on_the_callers_threads() {
    let vm = Vm::create(&spin_config("sec-on")).unwrap();
    vm.start().unwrap();
    assert_eq!(
        on_event_loop(&vm),
        vec![Err(libc::EPERM), Err(libc::EPERM)],
        "the event loop's filter stops them"
    );
    // The caller's threads, the one that created and started the VM included, are unaffected.
    assert_eq!(forbidden_calls(), vec![Ok(()), Ok(())]);
    let other = std::thread::spawn(forbidden_calls).join().unwrap();
    assert_eq!(other, vec![Ok(()), Ok(())]);
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    assert_eq!(seccomp_status(me), "0", "no filter on the caller's thread");
    let threads = vm.threads();
    assert!(threads.iter().any(|t| t.kind == ThreadKind::EventLoop));
    assert!(threads
        .iter()
        .any(|t| matches!(t.kind, ThreadKind::Vcpu(_))));
    for t in &threads {
        assert_eq!(seccomp_status(t.tid), "2", "{} is filtered", t.name);
    }
    // The guest still runs under the filters, and the VM stops cleanly.
    assert_eq!(vm.wait_timeout(Duration::from_millis(50)), None);
    assert_eq!(vm.stop(), kestrel_vmm::VmExit::Stopped);
}

#[test]
fn seccomp_off_installs_no_filter() {
    let mut c = spin_config("sec-off");
    c.kestrel.seccomp = Some(SeccompMode::Off);
    let vm = Vm::create(&c).unwrap();
    vm.start().unwrap();
    assert_eq!(on_event_loop(&vm), vec![Ok(()), Ok(())]);
    for t in vm.threads() {
        assert_eq!(seccomp_status(t.tid), "0", "{} is not filtered", t.name);
    }
    vm.stop();
}
