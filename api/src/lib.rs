//! Kestrel's configuration and request types.
//!
//! This crate has no KVM dependency: it holds the serde types a runtime or the `kestrel` binary
//! uses to describe a VM, and their validation. The JSON shape follows Firecracker's
//! `--config-file` where the concepts are the same (`boot-source`, `machine-config`, ...), with
//! Firecracker's field names, and adds Kestrel sections for what Firecracker lacks. Unknown
//! fields are errors.
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
