//! Real-guest tests: the Linux guest built by `resources/` on real KVM.
//!
//! All in one test binary on purpose: each guest has one or two vCPUs and a boot is CPU-bound
//! (the guest kernel is emulated on the CI machines, docs/nested-kvm.md), so `--test-threads=2`
//! runs two guests at once and keeps both host cores busy. Each test boots one guest and runs
//! many checks in it.

mod boot;
mod devices;
mod fs;
mod hotplug;
mod net;
