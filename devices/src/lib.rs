//! Kestrel device models.
//!
//! Devices know nothing about KVM file descriptors: they are reached through a [`bus::Bus`]
//! (port I/O or MMIO dispatched by the vCPU threads) and signal the outside world through
//! `EventFd`s (interrupts through irqfd, resets through an event the VMM watches).

pub mod bus;
pub mod legacy;
pub mod rate_limiter;
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
