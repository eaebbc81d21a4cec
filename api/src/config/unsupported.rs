//! Firecracker sections Kestrel does not implement: `balloon`, `cpu-config`, `entropy`,
//! `memory-hotplug`, `mmds-config` and `pmem`.
//!
//! Each is parsed in Firecracker's shape (so a malformed one is still an error and a
//! well-formed one is recognised), and [`crate::VmConfig::validate`] accepts it only when it
//! is absent, `null` or an empty list (or, for `cpu-config`, an empty template): anything else
//! would ask for a device or behaviour Kestrel does not have, and is refused with
//! [`ConfigError::NotSupported`] naming the section. Kestrel's memory hotplug is its own
//! `machine-config.max_mem_size_mib`; `memory-hotplug` is Firecracker's virtio-mem device.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::VmConfig;
use crate::error::ConfigError;
use crate::RateLimiterConfig;

/// Firecracker's `balloon` section (a virtio-balloon device). Not supported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
    /// Deflate the balloon when the guest runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates (0: no statistics).
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting.
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Free page reporting.
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// Firecracker's MMDS protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// Version 1 (Firecracker's default).
    #[default]
    V1,
    /// Version 2 (session tokens).
    V2,
}

/// Firecracker's `mmds-config` section (its microVM metadata service). Not supported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// Protocol version.
    #[serde(default)]
    pub version: MmdsVersion,
    /// Interfaces (`iface_id`s) whose traffic to the MMDS address is answered.
    pub network_interfaces: Vec<String>,
    /// The MMDS address (default `169.254.169.254`).
    #[serde(default)]
    pub ipv4_address: Option<Ipv4Addr>,
    /// EC2 IMDS compatibility.
    #[serde(default)]
    pub imds_compat: bool,
}

/// Firecracker's `entropy` section (a virtio-rng device). Not supported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    /// Limits on the random bytes handed to the guest.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// One entry of Firecracker's `pmem` section (a virtio-pmem device). Not supported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmemConfig {
    /// Unique id.
    pub id: String,
    /// The backing file.
    pub path_on_host: String,
    /// Use it as the root file system.
    #[serde(default)]
    pub root_device: bool,
    /// Map it read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Limits on flush operations.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Firecracker's `memory-hotplug` section (a virtio-mem device). Not supported: Kestrel's
/// memory hotplug is `machine-config.max_mem_size_mib` (probe-based, no virtio-mem).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugConfig {
    /// Hot-pluggable memory in MiB.
    pub total_size_mib: u32,
    /// Block size in MiB (Firecracker's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size_mib: Option<u32>,
    /// Slot size in MiB (Firecracker's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_size_mib: Option<u32>,
}

/// Firecracker's x86_64 custom CPU template. The modifiers are kept as JSON: Kestrel does not
/// interpret them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomCpuTemplate {
    /// KVM capabilities to check (`"56"`) or to require absent (`"!56"`).
    #[serde(default)]
    pub kvm_capabilities: Vec<String>,
    /// CPUID leaf modifiers.
    #[serde(default)]
    pub cpuid_modifiers: Vec<serde_json::Value>,
    /// MSR modifiers.
    #[serde(default)]
    pub msr_modifiers: Vec<serde_json::Value>,
}

impl CustomCpuTemplate {
    /// Whether the template changes nothing (every list empty).
    pub fn is_empty(&self) -> bool {
        self.kvm_capabilities.is_empty()
            && self.cpuid_modifiers.is_empty()
            && self.msr_modifiers.is_empty()
    }
}

/// Firecracker's `cpu-config` section: a custom CPU template, given inline or as the path of
/// a JSON file. Not supported, except an inline template that changes nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CpuConfig {
    /// The path of a template file.
    Path(PathBuf),
    /// An inline template.
    Template(CustomCpuTemplate),
}

/// `Err(NotSupported)` for `field` when `value` is present.
fn refuse_if_set<T: Serialize>(field: &str, value: &Option<T>) -> Result<(), ConfigError> {
    match value {
        Some(v) => Err(ConfigError::not_supported(field, v)),
        None => Ok(()),
    }
}

impl VmConfig {
    /// The Firecracker sections Kestrel does not implement must be absent, `null` or empty
    /// (part of [`VmConfig::validate`]).
    pub fn validate_unsupported_sections(&self) -> Result<(), ConfigError> {
        refuse_if_set("balloon", &self.balloon)?;
        match &self.cpu_config {
            Some(CpuConfig::Template(t)) if t.is_empty() => {}
            other => refuse_if_set("cpu-config", other)?,
        }
        refuse_if_set("entropy", &self.entropy)?;
        refuse_if_set("memory-hotplug", &self.memory_hotplug)?;
        refuse_if_set("mmds-config", &self.mmds_config)?;
        if let Some(p) = self.pmem.first() {
            return Err(ConfigError::not_supported("pmem[0]", p));
        }
        Ok(())
    }
}
