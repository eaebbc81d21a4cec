//! Firecracker's `boot-source`: kernel, command line, initrd.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::*;
use crate::error::ConfigError;

/// Firecracker's `boot-source`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Uncompressed ELF `vmlinux` or a bzImage.
    pub kernel_image_path: PathBuf,
    /// Kernel command line. Kestrel appends what the machine needs (`maxcpus=`, devices).
    /// When absent: `console=ttyS0 reboot=k panic=1`.
    #[serde(default)]
    pub boot_args: Option<String>,
    /// Optional initrd / initramfs (uncompressed cpio recommended).
    #[serde(default)]
    pub initrd_path: Option<PathBuf>,
}

impl BootSource {
    /// See [`VmConfig::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_file("boot-source.kernel_image_path", &self.kernel_image_path)?;
        if let Some(initrd) = &self.initrd_path {
            check_file("boot-source.initrd_path", initrd)?;
        }
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
