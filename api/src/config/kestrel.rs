//! Kestrel's `kestrel` section: host-side options (name, guest compatibility, seccomp).

use serde::{Deserialize, Serialize};

use super::files::check_id;
use crate::error::ConfigError;

/// Longest `kestrel.name`: Linux thread names hold 15 bytes and `kestrel-<name>-vcpuNNN`
/// must stay readable.
pub const MAX_NAME_LEN: usize = 16;

/// Whether to add the guest command-line switches that a software (nested) KVM needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestCompat {
    /// Add them only when the host's KVM is a software implementation (no VT-x/AMD-V visible).
    #[default]
    Auto,
    /// Always add them.
    Always,
    /// Never add them.
    Never,
}

/// Kestrel's `kestrel` section: host-side options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KestrelOptions {
    /// A short name used in thread names (`kestrel-<name>-vcpu0`) and logs. Default: `vm`.
    #[serde(default)]
    pub name: Option<String>,
    /// Guest command-line compatibility switches for software KVM (see docs/nested-kvm.md).
    #[serde(default)]
    pub guest_compat: GuestCompat,
    /// With the software-KVM switches on: serve the guest kernel's paravirtual extended-state
    /// switch (`kestrel.pvfpu`, so guest tasks do not share AVX registers; docs/nested-kvm.md
    /// §10). Default: true. Only ever in effect on a software KVM; hardware KVM guests use
    /// XSAVE and never ask for it. Turning it off brings back the shared AVX state (random
    /// guest crashes); it exists to measure that and the assist's cost.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub xstate_assist: bool,
    /// The seccomp filters Kestrel installs on each thread it spawns (vCPUs, event loop,
    /// virtio-fs workers; never on the caller's threads): `"errno"` (a forbidden call fails with
    /// `EPERM` on that thread), `"kill"` (a forbidden call kills the process with `SIGSYS`) or
    /// `"off"`. Absent: `errno` in the library (it must not kill the process embedding it),
    /// `kill` in the `kestrel` binary. See docs/design.md, "Seccomp".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<SeccompMode>,
}

/// What a seccomp filter of a Kestrel thread does with a system call that is not on its
/// thread class's list (`kestrel.seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// The call fails with `EPERM` on that thread; the process goes on. The library's default.
    Errno,
    /// The whole process is killed (`SECCOMP_RET_KILL_PROCESS`, seen as `SIGSYS`). The
    /// `kestrel` binary's default; for a process that is only Kestrel.
    Kill,
    /// No filter.
    Off,
}

impl KestrelOptions {
    /// The seccomp mode in force: the configured one, else `default` (what the embedding
    /// program chose: [`SeccompMode::Errno`] for the library, [`SeccompMode::Kill`] for the
    /// `kestrel` binary).
    pub fn seccomp_or(&self, default: SeccompMode) -> SeccompMode {
        self.seccomp.unwrap_or(default)
    }
}

impl Default for KestrelOptions {
    fn default() -> Self {
        Self {
            name: None,
            guest_compat: GuestCompat::default(),
            xstate_assist: true,
            seccomp: None,
        }
    }
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl KestrelOptions {
    /// See [`crate::VmConfig::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(name) = &self.name {
            check_id("kestrel.name", name, MAX_NAME_LEN)?;
        }
        Ok(())
    }
}
