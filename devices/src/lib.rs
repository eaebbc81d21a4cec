//! Kestrel device models.
//!
//! Devices know nothing about KVM file descriptors: they are reached through a [`bus::Bus`]
//! (port I/O or MMIO dispatched by the vCPU threads) and signal the outside world through
//! `EventFd`s (interrupts through irqfd, resets through an event the VMM watches).

pub mod bus;
pub mod legacy;
pub mod rate_limiter;
pub mod sigpipe;
pub mod tap;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

/// The result of a `read`/`write`-style system call: the byte count, or the error in `errno`
/// when it returned a negative value.
pub(crate) fn syscall_len(r: isize) -> std::io::Result<usize> {
    usize::try_from(r).map_err(|_| std::io::Error::last_os_error())
}

/// Put `fd` into non-blocking mode (`O_NONBLOCK` added to its status flags).
pub(crate) fn set_nonblocking(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl(2) with F_GETFL / F_SETFL takes no pointers; `fd` is open and owned by
    // the caller for the whole call.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The name Linux keeps for a thread whose full name is `full`: at most 15 bytes
/// (`TASK_COMM_LEN` - 1). Rust's `std` would keep the first 15 bytes, which for Kestrel's names
/// (`kestrel-<vm>-vcpu3`, `kestrel-<vm>-fs0-q1`) drops what tells threads apart; here
/// `kestrel-` becomes `k-` and then the tail is kept. Thread lists (`Vm::threads`) carry the
/// full name.
pub fn os_thread_name(full: &str) -> String {
    const MAX: usize = 15;
    if full.len() <= MAX {
        return full.to_string();
    }
    let short = match full.strip_prefix("kestrel-") {
        Some(rest) => format!("k-{rest}"),
        None => full.to_string(),
    };
    let mut start = short.len().saturating_sub(MAX);
    while !short.is_char_boundary(start) {
        start += 1;
    }
    short[start..].to_string()
}

/// Run first in the body of every thread a device spawns (an fs worker), on that thread: the
/// VMM installs the thread's seccomp filter with it. An `Err` (what failed) ends the thread
/// before it does any work; the device then needs a reset.
pub type ThreadStartHook = std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Called by a device each time it contains a panic of its own (inside a backend it runs, or
/// on a worker thread it spawned) and goes to `DEVICE_NEEDS_RESET`: the VMM counts it with
/// the panics of event handlers (`VmMetrics::device_panics`). `devices` does not depend on
/// the VMM, so the counter reaches the device as this closure.
pub type DevicePanicHook = std::sync::Arc<dyn Fn() + Send + Sync>;

/// A panic caught at a thread or handler boundary ([`catch_panic`]): its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("panicked: {0}")]
pub struct Panicked(pub String);

/// Run `f`, catching a panic instead of letting it unwind out of a Kestrel thread or event
/// handler (the embedding process must survive it). Every thread Kestrel spawns runs its body
/// through this. Needs `panic = "unwind"` (the default); with `panic = "abort"` nothing can be
/// contained. The process's panic hook still runs (Kestrel does not replace it).
pub fn catch_panic<R>(f: impl FnOnce() -> R) -> Result<R, Panicked> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|payload| Panicked(panic_message(payload.as_ref())))
}

/// The message of a panic payload (`panic!("...")` gives `&str` or `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}

#[cfg(test)]
mod panic_tests {
    use super::*;

    #[test]
    fn catch_panic_returns_the_value_or_the_message() {
        assert_eq!(catch_panic(|| 7), Ok(7));
        assert_eq!(
            catch_panic(|| panic!("static message")),
            Err::<(), _>(Panicked("static message".into()))
        );
        let n = 3;
        assert_eq!(
            catch_panic(|| panic!("formatted {n}")),
            Err::<(), _>(Panicked("formatted 3".into()))
        );
        let e = catch_panic(|| std::panic::panic_any(5u8)).unwrap_err();
        assert!(e.0.contains("non-string"), "{e}");
    }
}

#[cfg(test)]
mod thread_name_tests {
    use super::os_thread_name;

    #[test]
    fn os_thread_names_fit_and_keep_the_tail() {
        assert_eq!(os_thread_name("kestrel-vm-vcpu0"), "k-vm-vcpu0");
        assert_eq!(os_thread_name("kestrel-fs-fs0-q1"), "k-fs-fs0-q1");
        assert_eq!(os_thread_name("kestrel-fs-q1"), "kestrel-fs-q1");
        assert_eq!(os_thread_name("short"), "short");
        assert_eq!(
            os_thread_name("kestrel-averylongname-evloop"),
            "longname-evloop"
        );
        assert_eq!(
            os_thread_name("kestrel-averylongname-fs0-q1"),
            "longname-fs0-q1"
        );
        // Never more than 15 bytes, never a split character.
        let n = os_thread_name("kestrel-vmé-éé-fs10-q12");
        assert!(n.len() <= 15 && n.ends_with("-fs10-q12"), "{n}");
    }
}
