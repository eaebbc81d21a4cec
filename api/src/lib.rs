//! Kestrel's configuration and request types.
//!
//! This crate has no KVM dependency: it holds the serde types a runtime or the `kestrel` binary
//! uses to describe a VM, and their validation. The JSON shape is Firecracker's
//! `--config-file`: every Firecracker section and field is accepted with Firecracker's meaning
//! for what Kestrel implements; what Kestrel does not implement is accepted when absent, `null`,
//! empty or at Firecracker's default and refused otherwise ([`ConfigError::NotSupported`],
//! naming the field). Kestrel sections (`fs`, `serial`, `kestrel`) and hotplug limits are
//! additions. Unknown fields are errors. See `docs/firecracker-config.md`.
//!
//! Validation ([`VmConfig::validate`]) runs before any resource is created and reports the first
//! offending field by its JSON path (for example `machine-config.vcpu_count`) with the reason.

pub mod config;
pub mod error;
pub mod rate_limiter;
pub mod sizing;

pub use config::*;
pub use error::ConfigError;
pub use rate_limiter::{RateLimiterConfig, TokenBucketConfig, MAX_REFILL_TIME_MS};
