//! Firecracker's `machine-config`: vCPUs and memory, plus Kestrel's hotplug limits.

use serde::{Deserialize, Serialize};

use super::*;
use crate::error::ConfigError;

/// vCPUs when `machine-config` is absent or `null` (Firecracker's default).
pub const DEFAULT_VCPU_COUNT: u32 = 1;
/// Boot RAM in MiB when `machine-config` is absent or `null` (Firecracker's
/// `DEFAULT_MEM_SIZE_MIB`).
pub const DEFAULT_MEM_SIZE_MIB: u64 = 128;

/// Firecracker's static CPU templates (`machine-config.cpu_template`). Kestrel has none: only
/// `"None"` (or an absent or `null` field) is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuTemplate {
    /// Firecracker's C3 template.
    C3,
    /// Firecracker's T2 template.
    T2,
    /// Firecracker's T2S template.
    T2S,
    /// No template: the host CPU's features as Kestrel filters them.
    None,
    /// Firecracker's T2CL template.
    T2CL,
    /// Firecracker's T2A template.
    T2A,
}

/// What backs guest memory (Firecracker's `machine-config.huge_pages`). Kestrel backs it with
/// 4 KiB pages: only `"None"` (the default) is accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// 4 KiB pages.
    #[default]
    None,
    /// Transparent huge pages (`madvise(MADV_HUGEPAGE)`).
    Transparent,
    /// 2 MiB hugetlbfs pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// Firecracker's `machine-config`, plus Kestrel's hotplug limits. The section may be absent or
/// `null`: 1 vCPU and 128 MiB, as in Firecracker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs online at boot.
    pub vcpu_count: u32,
    /// Boot RAM in MiB.
    pub mem_size_mib: u64,
    /// Firecracker's SMT flag. Kestrel presents one thread per core; `true` is refused.
    #[serde(default)]
    pub smt: bool,
    /// Firecracker's static CPU template. Not supported: absent, `null` or `"None"` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Firecracker's dirty-page tracking (for diff snapshots). Not supported: `false` only.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Firecracker's guest memory page size. Not supported: `"None"` (4 KiB pages) only.
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Firecracker's GDB stub socket (its `gdb` build only). Not supported: absent or `null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gdb_socket_path: Option<String>,
    /// vCPUs the guest can ever have (listed in the MP table, offline until hot-added).
    /// Absent or 0: the host's CPU count, never below `vcpu_count`.
    #[serde(default)]
    pub max_vcpus: Option<u32>,
    /// Largest RAM the VM may grow to by hotplug, in MiB. Absent: no memory hotplug.
    #[serde(default)]
    pub max_mem_size_mib: Option<u64>,
}

impl Default for MachineConfig {
    /// Firecracker's defaults: 1 vCPU, 128 MiB, no hotplug.
    fn default() -> Self {
        MachineConfig {
            vcpu_count: DEFAULT_VCPU_COUNT,
            mem_size_mib: DEFAULT_MEM_SIZE_MIB,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
            gdb_socket_path: None,
            max_vcpus: None,
            max_mem_size_mib: None,
        }
    }
}

impl MachineConfig {
    /// `vcpu_count` vCPUs and `mem_size_mib` MiB, everything else at its default.
    pub fn new(vcpu_count: u32, mem_size_mib: u64) -> Self {
        MachineConfig {
            vcpu_count,
            mem_size_mib,
            ..MachineConfig::default()
        }
    }

    /// Firecracker's fields Kestrel does not implement must hold their "not used" value.
    fn check_firecracker_only(&self) -> Result<(), ConfigError> {
        if self.smt {
            return Err(ConfigError::not_supported("machine-config.smt", &true));
        }
        if let Some(t) = self.cpu_template.filter(|t| *t != CpuTemplate::None) {
            return Err(ConfigError::not_supported(
                "machine-config.cpu_template",
                &t,
            ));
        }
        if self.track_dirty_pages {
            return Err(ConfigError::not_supported(
                "machine-config.track_dirty_pages",
                &true,
            ));
        }
        if self.huge_pages != HugePages::None {
            return Err(ConfigError::not_supported(
                "machine-config.huge_pages",
                &self.huge_pages,
            ));
        }
        if let Some(p) = &self.gdb_socket_path {
            return Err(ConfigError::not_supported(
                "machine-config.gdb_socket_path",
                p,
            ));
        }
        Ok(())
    }

    /// See [`VmConfig::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_firecracker_only()?;
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
