//! Configuration errors.

use thiserror::Error;

/// Why a configuration was rejected. Every variant names the offending field by its JSON path.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The JSON could not be parsed into a [`crate::VmConfig`] (syntax error, wrong type,
    /// unknown field — serde's message names the field and the line).
    #[error("invalid configuration JSON: {0}")]
    Parse(#[from] serde_json::Error),
    /// The configuration file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The path that was read.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration path is not a regular file (a directory, FIFO, device, ...).
    #[error("configuration file {path}: not a regular file")]
    NotARegularFile {
        /// The path.
        path: String,
    },
    /// The configuration file is larger than [`crate::MAX_CONFIG_FILE_LEN`].
    #[error("configuration file {path}: larger than {limit} bytes")]
    FileTooLarge {
        /// The path.
        path: String,
        /// The limit.
        limit: u64,
    },
    /// A Firecracker field or section Kestrel does not implement holds a value other than
    /// "not used" (absent, `null`, an empty list or Firecracker's default are accepted).
    #[error("Firecracker's `{field}` = `{value}` is not supported by Kestrel")]
    NotSupported {
        /// JSON path of the field or section, e.g. `machine-config.huge_pages` or `balloon`.
        field: String,
        /// The value given, as compact JSON (strings without quotes), shortened when long.
        value: String,
    },
    /// A field holds a value Kestrel cannot use.
    #[error("{field}: {reason}")]
    Invalid {
        /// JSON path of the field, e.g. `machine-config.vcpu_count`.
        field: String,
        /// Why the value was rejected.
        reason: String,
    },
}

impl ConfigError {
    /// Shorthand for [`ConfigError::Invalid`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// [`ConfigError::NotSupported`] for `field` holding `value` (rendered as compact JSON,
    /// a string without its quotes, cut to [`MAX_SHOWN_VALUE_LEN`] characters).
    pub fn not_supported(field: impl Into<String>, value: &impl serde::Serialize) -> Self {
        let value = match serde_json::to_value(value) {
            Ok(serde_json::Value::String(s)) => s,
            Ok(v) => v.to_string(),
            Err(e) => format!("<{e}>"),
        };
        ConfigError::NotSupported {
            field: field.into(),
            value: shorten(value),
        }
    }

    /// The JSON path of the offending field, when the error is about one field.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } | ConfigError::NotSupported { field, .. } => {
                Some(field)
            }
            _ => None,
        }
    }
}

/// Longest value [`ConfigError::NotSupported`] shows, in characters.
pub const MAX_SHOWN_VALUE_LEN: usize = 80;

fn shorten(s: String) -> String {
    match s.char_indices().nth(MAX_SHOWN_VALUE_LEN) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s,
    }
}
