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

/// How the VM's vCPU threads are named (`kestrel.thread_names`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThreadNames {
    /// `kestrel-<name>-vcpu<N>` (Linux keeps `k-<name>-vcpu<N>`, at most 15 bytes). The
    /// library's default.
    Kestrel,
    /// Firecracker's `fc_vcpu <N>`, for tools that find vCPU threads by that name (kata's
    /// Firecracker driver puts them into cgroups that way). What the `kestrel` binary uses when
    /// it is driven through Firecracker's interfaces (`--api-sock`, `--config-file`).
    Firecracker,
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
    /// How vCPU threads are named: `"kestrel"` or `"firecracker"` (`fc_vcpu <N>`). Absent: the
    /// embedding program's choice ([`ThreadNames::Kestrel`] for the library; the `kestrel`
    /// binary picks `firecracker` when driven through `--api-sock` or `--config-file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_names: Option<ThreadNames>,
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

    /// The thread naming in force: the configured one, else [`ThreadNames::Kestrel`].
    pub fn thread_names(&self) -> ThreadNames {
        self.thread_names.unwrap_or(ThreadNames::Kestrel)
    }

    /// The name of vCPU `id`'s thread for a VM named `vm_name`: `kestrel-<vm>-vcpu<N>` or
    /// `fc_vcpu <N>` (see [`ThreadNames`]).
    pub fn vcpu_thread_name(&self, vm_name: &str, id: u32) -> String {
        match self.thread_names() {
            ThreadNames::Kestrel => format!("kestrel-{vm_name}-vcpu{id}"),
            ThreadNames::Firecracker => format!("fc_vcpu {id}"),
        }
    }
}

impl Default for KestrelOptions {
    fn default() -> Self {
        Self {
            name: None,
            guest_compat: GuestCompat::default(),
            xstate_assist: true,
            seccomp: None,
            thread_names: None,
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

#[cfg(test)]
mod kestrel_tests {
    use super::*;

    #[test]
    fn thread_names_knob() {
        let k: KestrelOptions = serde_json::from_str("{}").unwrap();
        assert_eq!(k.thread_names, None);
        assert_eq!(k.vcpu_thread_name("vm", 3), "kestrel-vm-vcpu3");
        let k: KestrelOptions = serde_json::from_str(r#"{"thread_names": "firecracker"}"#).unwrap();
        assert_eq!(k.thread_names(), ThreadNames::Firecracker);
        assert_eq!(k.vcpu_thread_name("vm", 12), "fc_vcpu 12");
        assert!(serde_json::to_string(&k)
            .unwrap()
            .contains(r#""thread_names":"firecracker""#));
        assert!(!serde_json::to_string(&KestrelOptions::default())
            .unwrap()
            .contains("thread_names"));
        assert!(serde_json::from_str::<KestrelOptions>(r#"{"thread_names": "fc"}"#).is_err());
    }
}
