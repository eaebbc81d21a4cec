//! Firecracker's `machine-config`: vCPUs and memory, plus Kestrel's hotplug limits.

use serde::{Deserialize, Serialize};

use super::*;
use crate::error::ConfigError;

/// Firecracker's `machine-config`, plus Kestrel's hotplug limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs online at boot.
    pub vcpu_count: u32,
    /// Boot RAM in MiB.
    pub mem_size_mib: u64,
    /// Firecracker's SMT flag. Kestrel presents one thread per core; `true` is rejected.
    #[serde(default)]
    pub smt: bool,
    /// vCPUs the guest can ever have (listed in the MP table, offline until hot-added).
    /// Absent or 0: the host's CPU count, never below `vcpu_count`.
    #[serde(default)]
    pub max_vcpus: Option<u32>,
    /// Largest RAM the VM may grow to by hotplug, in MiB. Absent: no memory hotplug.
    #[serde(default)]
    pub max_mem_size_mib: Option<u64>,
}

impl MachineConfig {
    /// See [`VmConfig::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpu_count == 0 {
            return Err(ConfigError::invalid(
                "machine-config.vcpu_count",
                "must be at least 1",
            ));
        }
        if self.vcpu_count > MAX_SUPPORTED_VCPUS {
            return Err(ConfigError::invalid(
                "machine-config.vcpu_count",
                format!(
                    "{} is above the supported maximum of {MAX_SUPPORTED_VCPUS}",
                    self.vcpu_count
                ),
            ));
        }
        if self.smt {
            return Err(ConfigError::invalid(
                "machine-config.smt",
                "SMT is not supported: Kestrel presents one thread per core",
            ));
        }
        if let Some(max) = self.max_vcpus {
            if max != 0 && max < self.vcpu_count {
                return Err(ConfigError::invalid(
                    "machine-config.max_vcpus",
                    format!("{max} is below vcpu_count {}", self.vcpu_count),
                ));
            }
            if max > MAX_SUPPORTED_VCPUS {
                return Err(ConfigError::invalid(
                    "machine-config.max_vcpus",
                    format!("{max} is above the supported maximum of {MAX_SUPPORTED_VCPUS}"),
                ));
            }
        }
        if self.mem_size_mib < MIN_MEM_SIZE_MIB {
            return Err(ConfigError::invalid(
                "machine-config.mem_size_mib",
                format!(
                    "{} MiB is below the minimum of {MIN_MEM_SIZE_MIB} MiB",
                    self.mem_size_mib
                ),
            ));
        }
        if self.mem_size_mib > MAX_MEM_SIZE_MIB {
            return Err(ConfigError::invalid(
                "machine-config.mem_size_mib",
                format!(
                    "{} MiB is above the maximum of {MAX_MEM_SIZE_MIB} MiB",
                    self.mem_size_mib
                ),
            ));
        }
        if let Some(max) = self.max_mem_size_mib {
            if max < self.mem_size_mib {
                return Err(ConfigError::invalid(
                    "machine-config.max_mem_size_mib",
                    format!("{max} MiB is below mem_size_mib {}", self.mem_size_mib),
                ));
            }
            if max > MAX_MEM_SIZE_MIB {
                return Err(ConfigError::invalid(
                    "machine-config.max_mem_size_mib",
                    format!("{max} MiB is above the maximum of {MAX_MEM_SIZE_MIB} MiB"),
                ));
            }
        }
        Ok(())
    }
}
