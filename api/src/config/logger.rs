//! Firecracker's `logger` section: where the VMM's log goes, at which level, in which format.
//!
//! Parsed and kept in [`crate::VmConfig::logger`] for the `kestrel` binary, which applies it;
//! the library logs through `tracing` and never writes a log file itself.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::files::check_output_path;
use crate::error::ConfigError;

/// A log level filter (Firecracker's `LevelFilter`). Firecracker reads it case-insensitively
/// and takes `Warning` for `Warn`; so does Kestrel. Written back as `Off`, `Trace`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Everything.
    Trace,
    /// Debug and above.
    Debug,
    /// Info and above (Firecracker's default).
    Info,
    /// Warnings and errors.
    Warn,
    /// Errors only.
    Error,
}

/// The level when `logger.level` is absent (Firecracker's `DEFAULT_LEVEL`).
pub const DEFAULT_LOG_LEVEL: LogLevel = LogLevel::Info;

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.to_ascii_lowercase().as_str() {
            "off" => Ok(LogLevel::Off),
            "trace" => Ok(LogLevel::Trace),
            "debug" => Ok(LogLevel::Debug),
            "info" => Ok(LogLevel::Info),
            "warn" | "warning" => Ok(LogLevel::Warn),
            "error" => Ok(LogLevel::Error),
            _ => Err(serde::de::Error::custom(format!(
                "unknown log level {s:?}: expected Off, Trace, Debug, Info, Warn (Warning) or \
                 Error, in any case"
            ))),
        }
    }
}

/// Firecracker's `logger` section. Every field is optional; an absent one keeps Firecracker's
/// default (no log file, level `Info`, no level or origin shown, every module).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// File or named pipe the log is written to (created when missing).
    #[serde(default)]
    pub log_path: Option<PathBuf>,
    /// Level filter; default [`DEFAULT_LOG_LEVEL`].
    #[serde(default)]
    pub level: Option<LogLevel>,
    /// Prefix each line with its level; default `false`.
    #[serde(default)]
    pub show_level: Option<bool>,
    /// Prefix each line with the source file and line; default `false`.
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    /// Only log from modules whose path starts with this; default: every module.
    #[serde(default)]
    pub module: Option<String>,
}

impl LoggerConfig {
    /// The level in force: `level`, else [`DEFAULT_LOG_LEVEL`].
    pub fn level_or_default(&self) -> LogLevel {
        self.level.unwrap_or(DEFAULT_LOG_LEVEL)
    }

    /// Check `log_path` (non-empty; not a directory; its directory exists). Opens nothing.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(p) = &self.log_path {
            check_output_path("logger.log_path", p)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod logger_tests {
    use super::*;

    #[test]
    fn firecracker_logger_bodies_parse() {
        let l: LoggerConfig = serde_json::from_str(
            r#"{"log_path": "/tmp/fc.log", "level": "Debug", "show_level": true,
                "show_log_origin": true}"#,
        )
        .unwrap();
        assert_eq!(
            l.log_path.as_deref(),
            Some(std::path::Path::new("/tmp/fc.log"))
        );
        assert_eq!(l.level, Some(LogLevel::Debug));
        assert_eq!((l.show_level, l.show_log_origin), (Some(true), Some(true)));
        l.validate().unwrap();
        let l: LoggerConfig =
            serde_json::from_str(r#"{"level": "Trace", "module": "api_server::request"}"#).unwrap();
        assert_eq!(l.module.as_deref(), Some("api_server::request"));
        assert_eq!(l.log_path, None);
        let l: LoggerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(l, LoggerConfig::default());
        assert_eq!(l.level_or_default(), LogLevel::Info);
        let e = serde_json::from_str::<LoggerConfig>(r#"{"path": "x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `path`"), "{e}");
    }

    #[test]
    fn levels_as_firecracker_reads_them() {
        for (text, level) in [
            ("Off", LogLevel::Off),
            ("TRACE", LogLevel::Trace),
            ("debug", LogLevel::Debug),
            ("Info", LogLevel::Info),
            ("Warn", LogLevel::Warn),
            ("Warning", LogLevel::Warn),
            ("WARNING", LogLevel::Warn),
            ("error", LogLevel::Error),
        ] {
            let l: LogLevel = serde_json::from_str(&format!("{text:?}")).unwrap();
            assert_eq!(l, level, "{text}");
            let back: LogLevel = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
            assert_eq!(back, l);
        }
        let e = serde_json::from_str::<LogLevel>(r#""verbose""#).unwrap_err();
        assert!(e.to_string().contains("unknown log level"), "{e}");
        assert!(serde_json::from_str::<LogLevel>("3").is_err());
    }

    #[test]
    fn log_path_checked() {
        let with = |p: &str| LoggerConfig {
            log_path: Some(p.into()),
            ..LoggerConfig::default()
        };
        for bad in ["", "/", "/nonexistent-dir/fc.log"] {
            let e = with(bad).validate().unwrap_err();
            assert_eq!(e.field(), Some("logger.log_path"), "{bad:?}");
        }
        with("/dev/null").validate().unwrap();
        with("relative-fc.log").validate().unwrap();
        let fresh = std::env::temp_dir().join(format!("kestrel-log-{}", std::process::id()));
        with(fresh.to_str().unwrap()).validate().unwrap();
        assert!(!fresh.exists(), "validation creates nothing");
    }
}
