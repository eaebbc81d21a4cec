//! Kestrel's `serial` section: where the guest console goes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::*;
use crate::error::ConfigError;

/// Where the serial console's output goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialOutput {
    /// The process's standard output (the binary's default).
    #[default]
    Stdout,
    /// Appended to `serial.path`.
    File,
    /// Discarded.
    None,
}

/// Kestrel's `serial` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Output sink.
    #[serde(default)]
    pub output: SerialOutput,
    /// File for `output: "file"`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Forward the process's standard input to the guest console.
    #[serde(default)]
    pub stdin: bool,
}

impl SerialConfig {
    /// See [`VmConfig::validate`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        match (&self.output, &self.path) {
            (SerialOutput::File, None) => Err(ConfigError::invalid(
                "serial.path",
                "is required when serial.output is \"file\"",
            )),
            (SerialOutput::File, Some(p)) if p.as_os_str().is_empty() => {
                Err(ConfigError::invalid("serial.path", "must not be empty"))
            }
            (SerialOutput::File, Some(p)) => {
                let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
                if let Some(d) = parent.filter(|d| !d.is_dir()) {
                    return Err(ConfigError::invalid(
                        "serial.path",
                        format!("directory {} does not exist", d.display()),
                    ));
                }
                check_serial_file(p)
            }
            (_, Some(_)) => Err(ConfigError::invalid(
                "serial.path",
                "is only used with serial.output \"file\"",
            )),
            _ => Ok(()),
        }
    }
}

/// An existing `serial.path` must be a regular file create can append to, or a character
/// device (a terminal, `/dev/null`): a directory fails at create, and opening a FIFO for
/// writing would block create until a reader appears.
fn check_serial_file(p: &Path) -> Result<(), ConfigError> {
    let m = match std::fs::metadata(p) {
        Ok(m) => m,
        // Created by create (its directory exists).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ConfigError::invalid(
                "serial.path",
                format!("cannot access {}: {e}", p.display()),
            ))
        }
    };
    use std::os::unix::fs::FileTypeExt;
    if m.file_type().is_char_device() {
        return Ok(());
    }
    if !m.is_file() {
        return Err(ConfigError::invalid(
            "serial.path",
            format!(
                "{} is {}; it must be a regular file or a character device",
                p.display(),
                file_kind(&m)
            ),
        ));
    }
    // Opening an existing file for appending changes nothing; it proves create can.
    std::fs::OpenOptions::new()
        .append(true)
        .open(p)
        .map(drop)
        .map_err(|e| {
            ConfigError::invalid("serial.path", format!("cannot open {}: {e}", p.display()))
        })
}
