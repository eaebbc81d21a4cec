//! Seccomp filters bind only the threads Kestrel spawns: a call the event loop's filter
//! forbids fails there with EPERM (the library's default action) while the embedding process's
//! own threads make the same call successfully; `kestrel.seccomp = "off"` lifts the filters;
//! every class refuses a new mount namespace but lets virtio-fs's root import unshare its
//! file-system attributes.

use std::sync::mpsc;
use std::time::Duration;

use kestrel_api::{SeccompMode, SerialOutput, VmConfig};
use kestrel_tests::*;
use kestrel_vmm::seccomp::{FilterClass, Filters};
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

/// `unshare(flags)` on the calling thread: Ok or the errno.
fn unshare(flags: libc::c_int) -> Result<(), i32> {
    // SAFETY: unshare takes no pointers; it changes only what the calling thread shares.
    if unsafe { libc::unshare(flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// What a thread may do about namespaces: (Seccomp status, a new mount namespace, the same
/// with CLONE_FS, CLONE_FS alone, getppid).
type UnshareResults = (
    String,
    Result<(), i32>,
    Result<(), i32>,
    Result<(), i32>,
    Result<(), i32>,
);

/// Run the namespace calls on a new thread (its mount namespace, if it gets one, ends with
/// it), after `setup`.
fn unshare_on_new_thread(setup: impl FnOnce() + Send + 'static) -> UnshareResults {
    std::thread::spawn(move || {
        setup();
        // SAFETY: gettid has no preconditions.
        let status = seccomp_status(unsafe { libc::gettid() });
        // SAFETY: getppid has no preconditions.
        let ppid = if unsafe { libc::syscall(libc::SYS_getppid) } >= 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        };
        (
            status,
            unshare(libc::CLONE_NEWNS),
            unshare(libc::CLONE_NEWNS | libc::CLONE_FS),
            unshare(libc::CLONE_FS),
            ppid,
        )
    })
    .join()
    .expect("the thread ran")
}

#[test]
fn every_class_refuses_a_mount_namespace_allows_clone_fs_and_leaves_the_caller_alone() {
    let filters = Filters::build(SeccompMode::Errno)
        .unwrap()
        .expect("errno mode builds filters");
    for class in [
        FilterClass::Vcpu,
        FilterClass::FsWorker,
        FilterClass::EventLoop,
    ] {
        let f = filters.clone();
        let got = unshare_on_new_thread(move || f.install(class).unwrap());
        assert_eq!(
            got,
            (
                "2".to_string(),
                Err(libc::EPERM),
                Err(libc::EPERM),
                Ok(()),
                Err(libc::EPERM)
            ),
            "{class} thread: (filter, CLONE_NEWNS, CLONE_NEWNS|CLONE_FS, CLONE_FS, getppid)"
        );
    }
    // The caller's threads have no filter: the same calls succeed there (a new mount
    // namespace needs CAP_SYS_ADMIN; these tests run as root, like the rest of tests/).
    let got = unshare_on_new_thread(|| {});
    assert_eq!(
        got,
        ("0".to_string(), Ok(()), Ok(()), Ok(()), Ok(())),
        "unfiltered thread: (filter, CLONE_NEWNS, CLONE_NEWNS|CLONE_FS, CLONE_FS, getppid); \
         run as root"
    );
    // SAFETY: gettid has no preconditions.
    assert_eq!(seccomp_status(unsafe { libc::gettid() }), "0");
}
