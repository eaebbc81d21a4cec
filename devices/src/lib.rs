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
