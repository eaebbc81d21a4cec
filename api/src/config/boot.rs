//! Firecracker's `boot-source`: kernel, command line, initrd.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::*;
use crate::error::ConfigError;

/// The kernel command line when `boot-source.boot_args` is absent or `null`: Firecracker's
/// (`DEFAULT_KERNEL_CMDLINE` in its `src/vmm/src/vmm_config/boot_source.rs`), so a Firecracker
/// configuration boots with the same command line. It has no `console=` and disables the
/// 8250 UART driver (`8250.nr_uarts=0`): such a guest prints nothing on the serial console,
/// exactly as under Firecracker. Give `boot_args` (e.g. [`CONSOLE_BOOT_ARGS`]) to see it.
pub const DEFAULT_BOOT_ARGS: &str = "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux \
                                     i8042.nomux i8042.dumbkbd swiotlb=noforce";

/// A command line with the serial console on: what [`crate::VmConfig::new`] sets as
/// `boot_args` (Kestrel's default before it took Firecracker's [`DEFAULT_BOOT_ARGS`]).
pub const CONSOLE_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1";

/// Firecracker's `boot-source`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Uncompressed ELF `vmlinux` or a bzImage.
    pub kernel_image_path: PathBuf,
    /// Kernel command line. Kestrel appends what the machine needs (`maxcpus=`, devices).
    /// When absent or `null`: Firecracker's [`DEFAULT_BOOT_ARGS`] (see
    /// [`BootSource::boot_args_or_default`]).
    #[serde(default)]
    pub boot_args: Option<String>,
    /// Optional initrd / initramfs (uncompressed cpio recommended).
    #[serde(default)]
    pub initrd_path: Option<PathBuf>,
}

impl BootSource {
    /// The command line the guest starts from: `boot_args`, or [`DEFAULT_BOOT_ARGS`] when it is
    /// absent.
    pub fn boot_args_or_default(&self) -> &str {
        self.boot_args.as_deref().unwrap_or(DEFAULT_BOOT_ARGS)
    }

    /// See [`VmConfig::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_file("boot-source.kernel_image_path", &self.kernel_image_path)?;
        if let Some(initrd) = &self.initrd_path {
            check_file("boot-source.initrd_path", initrd)?;
        }
        self.validate_args()
    }

    /// The command-line checks of [`BootSource::validate`], without looking at the files.
    pub fn validate_args(&self) -> Result<(), ConfigError> {
        if let Some(args) = &self.boot_args {
            if args.len() > MAX_CMDLINE_LEN {
                return Err(ConfigError::invalid(
                    "boot-source.boot_args",
                    format!(
                        "{} bytes is longer than the {MAX_CMDLINE_LEN} the boot protocol allows",
                        args.len()
                    ),
                ));
            }
            // What linux-loader's command line takes: printable ASCII and spaces only.
            if let Some(b) = args.bytes().find(|b| !(b' '..=b'~').contains(b)) {
                return Err(ConfigError::invalid(
                    "boot-source.boot_args",
                    format!(
                        "must be printable ASCII (byte {b:#04x} is not; no tabs, newlines or \
                         other control characters)"
                    ),
                ));
            }
        }
        Ok(())
    }
}
