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
