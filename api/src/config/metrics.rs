//! Firecracker's `metrics` section: where the VMM's metrics go.
//!
//! Parsed and kept in [`crate::VmConfig::metrics`] for the `kestrel` binary, which writes
//! them; the library only keeps counters.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::files::check_output_path;
use crate::error::ConfigError;

/// Firecracker's `metrics` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// File or named pipe the metrics lines are written to (created when missing).
    pub metrics_path: PathBuf,
    /// Add the instance id as a top-level `id` field of every line; default `false`.
    #[serde(default)]
    pub emit_id: bool,
    /// Key-value pairs added as a top-level `properties` object to every line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
}

impl MetricsConfig {
    /// Check `metrics_path` (non-empty; not a directory; its directory exists). Opens
    /// nothing.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_output_path("metrics.metrics_path", &self.metrics_path)
    }
}

#[cfg(test)]
mod metrics_tests {
    use super::*;

    #[test]
    fn firecracker_metrics_bodies_parse() {
        let m: MetricsConfig = serde_json::from_str(r#"{"metrics_path": "metrics.fifo"}"#).unwrap();
        assert_eq!(m.metrics_path, PathBuf::from("metrics.fifo"));
        assert!(!m.emit_id);
        assert_eq!(m.properties, None);
        m.validate().unwrap();
        let m: MetricsConfig = serde_json::from_str(
            r#"{"metrics_path": "metrics.fifo", "emit_id": true,
                "properties": {"customer_id": "1234", "bundle_id": "fn-abc"}}"#,
        )
        .unwrap();
        assert!(m.emit_id);
        let props = m.properties.as_ref().unwrap();
        assert_eq!(props["bundle_id"], "fn-abc");
        let back: MetricsConfig =
            serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        for bad in [
            r#"{}"#,
            r#"{"metrics_path": "m", "emit_id": "yes"}"#,
            r#"{"metrics_path": "m", "properties": {"a": 1}}"#,
            r#"{"metrics_path": "m", "period": 60}"#,
        ] {
            assert!(serde_json::from_str::<MetricsConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn metrics_path_checked() {
        for bad in ["", "/tmp", "/nonexistent-dir/m.fifo"] {
            let m = MetricsConfig {
                metrics_path: bad.into(),
                emit_id: false,
                properties: None,
            };
            let e = m.validate().unwrap_err();
            assert_eq!(e.field(), Some("metrics.metrics_path"), "{bad:?}");
        }
    }
}
