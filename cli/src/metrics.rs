//! Firecracker's metrics: one JSON object per line, written to `metrics.metrics_path` (a file
//! or a named pipe) every [`FLUSH_PERIOD`], on `FlushMetrics` and when the VM stops.
//!
//! The shape is Firecracker's (`src/vmm/src/logger/metrics.rs`): `utc_timestamp_ms`, then one
//! object per component. Counters are, as in Firecracker, what happened since the previous
//! line (a reader adds them up); `api_server` and `latencies_us` values are as measured. The
//! components are the ones Kestrel has counters for: `block` and `block_<drive_id>`, `net` and
//! `net_<iface_id>`, `vsock`, `vcpu`, `uart`, the API request counters
//! (`get_api_requests`, `put_api_requests`, `patch_api_requests`), `api_server`,
//! `latencies_us`, `logger` and `vmm`. docs/firecracker-api.md lists every field.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kestrel_api::MetricsConfig;
use serde_json::{Map, Value};

/// How often the metrics are written while the VM runs (Firecracker's
/// `WRITE_METRICS_PERIOD_MS`).
pub const FLUSH_PERIOD: Duration = Duration::from_secs(60);
/// How long one write may wait for a full named pipe before the line is given up (counted in
/// `logger.missed_metrics_count`).
const WRITE_WAIT: Duration = Duration::from_millis(500);

/// A component's counters: (Firecracker field name, value since the VM started).
pub type Fields = Vec<(&'static str, u64)>;

/// The running VM's counters, as the metrics writer reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineCounters {
    /// Per drive: (drive_id, fields).
    pub blocks: Vec<(String, Fields)>,
    /// Per network interface: (iface_id, fields).
    pub nets: Vec<(String, Fields)>,
    /// The vsock device, if any.
    pub vsock: Option<Fields>,
    /// VM exits and the like (all vCPUs together).
    pub vcpu: Fields,
    /// The serial console.
    pub uart: Fields,
    /// Panics contained in devices.
    pub device_panics: u64,
}

/// Where the VM's counters come from once it runs.
pub type CounterSource = Box<dyn Fn() -> MachineCounters + Send>;

/// The API request counters Firecracker has, per group; each name gets `_count` (and, for
/// PUT and PATCH, `_fails`).
const API_COUNTERS: &[(&str, &[&str])] = &[
    (
        "get_api_requests",
        &["instance_info", "machine_cfg", "vmm_version"],
    ),
    (
        "put_api_requests",
        &[
            "actions",
            "boot_source",
            "drive",
            "logger",
            "machine_cfg",
            "metrics",
            "network",
            "serial",
            "vsock",
        ],
    ),
    ("patch_api_requests", &["drive", "machine_cfg", "network"]),
];

/// Why the metrics could not be set up (Firecracker's messages).
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `metrics` was configured already.
    #[error("Reinitialization of metrics not allowed.")]
    AlreadyInitialized,
    /// The path could not be opened.
    #[error("Cannot open the metrics file {path}: {source}")]
    Open {
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

struct Sink {
    file: File,
    emit_id: bool,
    properties: Option<BTreeMap<String, String>>,
}

#[derive(Default)]
struct State {
    sink: Option<Sink>,
    source: Option<CounterSource>,
    /// Cumulative counters of the binary itself: "component.field" -> value.
    own: BTreeMap<(String, String), u64>,
    /// Values at the previous line, for the deltas: "component.field" -> value.
    previous: HashMap<(String, String), u64>,
    /// Measured values (not deltas): "component.field" -> value.
    stored: BTreeMap<(String, String), u64>,
}

/// The metrics of this process. Shared by the API thread and the main thread.
pub struct Metrics {
    instance_id: String,
    write_wait: Duration,
    state: Mutex<State>,
}

impl Metrics {
    /// Metrics with nowhere to go yet, for instance `instance_id` (the `id` field).
    pub fn new(instance_id: &str) -> Arc<Self> {
        Arc::new(Metrics {
            instance_id: instance_id.to_string(),
            write_wait: WRITE_WAIT,
            state: Mutex::new(State::default()),
        })
    }

    /// Metrics that wait at most `wait` for a full pipe (tests).
    #[cfg(test)]
    fn with_write_wait(instance_id: &str, wait: Duration) -> Arc<Self> {
        Arc::new(Metrics {
            instance_id: instance_id.to_string(),
            write_wait: wait,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open `cfg.metrics_path` (a named pipe without blocking on a reader). Once only, as in
    /// Firecracker.
    pub fn init(&self, cfg: &MetricsConfig) -> Result<(), MetricsError> {
        let mut s = self.lock();
        if s.sink.is_some() {
            return Err(MetricsError::AlreadyInitialized);
        }
        let file = open_output(&cfg.metrics_path).map_err(|source| MetricsError::Open {
            path: cfg.metrics_path.display().to_string(),
            source,
        })?;
        s.sink = Some(Sink {
            file,
            emit_id: cfg.emit_id,
            properties: cfg.properties.clone(),
        });
        Ok(())
    }

    /// Read the VM's counters from `source` from now on.
    pub fn set_source(&self, source: CounterSource) {
        self.lock().source = Some(source);
    }

    /// Count a request of API endpoint `key` (as Firecracker, before it is handled: a
    /// `FlushMetrics` line counts its own request).
    pub fn count_request(&self, key: crate::api::MetricKey) {
        let (group, name) = key;
        *self
            .lock()
            .own
            .entry((group.into(), format!("{name}_count")))
            .or_default() += 1;
    }

    /// Count a failed request of API endpoint `key` (GETs have no failure counters).
    pub fn count_failure(&self, key: crate::api::MetricKey) {
        let (group, name) = key;
        if group != "get_api_requests" {
            *self
                .lock()
                .own
                .entry((group.into(), format!("{name}_fails")))
                .or_default() += 1;
        }
    }

    /// Set measured value `component.field` (e.g. `latencies_us.pause_vm`).
    pub fn store(&self, component: &str, field: &str, value: u64) {
        self.lock()
            .stored
            .insert((component.into(), field.into()), value);
    }

    /// Write one line now (nothing when `metrics` is not set up). A write that fails or
    /// would block too long is dropped and counted in `logger.missed_metrics_count`.
    pub fn flush(&self) {
        let mut s = self.lock();
        let Some(sink) = &s.sink else {
            return;
        };
        let (emit_id, properties) = (sink.emit_id, sink.properties.clone());
        let machine = s.source.as_ref().map(|f| f()).unwrap_or_default();
        let mut line = self.render(&mut s, &machine, emit_id, properties);
        line.push('\n');
        let ok = s
            .sink
            .as_mut()
            .is_some_and(|sink| write_line(&mut sink.file, line.as_bytes(), self.write_wait));
        if !ok {
            *s.own
                .entry(("logger".into(), "missed_metrics_count".into()))
                .or_default() += 1;
        }
    }

    /// The JSON line (without the newline); advances the deltas.
    fn render(
        &self,
        s: &mut State,
        m: &MachineCounters,
        emit_id: bool,
        properties: Option<BTreeMap<String, String>>,
    ) -> String {
        let mut line = Line {
            previous: &mut s.previous,
            comps: BTreeMap::new(),
        };
        line.per_device("block", &m.blocks);
        line.per_device("net", &m.nets);
        line.fields("vsock", m.vsock.iter().flatten());
        line.fields("vcpu", &m.vcpu);
        line.fields("uart", &m.uart);
        line.delta("vmm", "device_panics", m.device_panics);
        let own = |c: &str, f: &str| s.own.get(&(c.into(), f.into())).copied().unwrap_or(0);
        for (group, names) in API_COUNTERS {
            for name in *names {
                line.delta(
                    group,
                    &format!("{name}_count"),
                    own(group, &format!("{name}_count")),
                );
                if *group != "get_api_requests" {
                    let f = format!("{name}_fails");
                    line.delta(group, &f, own(group, &f));
                }
            }
        }
        line.delta(
            "logger",
            "missed_metrics_count",
            own("logger", "missed_metrics_count"),
        );
        line.delta("logger", "metrics_fails", own("logger", "metrics_fails"));
        line.delta("logger", "missed_log_count", crate::logger::missed_logs());
        for ((c, f), v) in &s.stored {
            line.set(c, f, *v);
        }
        let mut top = Map::new();
        if emit_id {
            top.insert("id".into(), self.instance_id.clone().into());
        }
        if let Some(p) = properties {
            top.insert("properties".into(), serde_json::json!(p));
        }
        for (c, fields) in line.comps {
            top.insert(c, Value::Object(fields));
        }
        let rest = Value::Object(top).to_string();
        format!(
            "{{\"utc_timestamp_ms\":{},{}",
            utc_ms(),
            rest.strip_prefix('{').unwrap_or(&rest)
        )
    }
}

/// One metrics line being built: components and their fields, counters as deltas.
struct Line<'a> {
    previous: &'a mut HashMap<(String, String), u64>,
    comps: BTreeMap<String, Map<String, Value>>,
}

impl Line<'_> {
    /// Counter `comp.field`, now at `now`: what it gained since the previous line.
    fn delta(&mut self, comp: &str, field: &str, now: u64) {
        let before = self
            .previous
            .insert((comp.to_string(), field.to_string()), now)
            .unwrap_or(0);
        self.set(comp, field, now.saturating_sub(before));
    }

    /// Value `comp.field` as it is.
    fn set(&mut self, comp: &str, field: &str, value: u64) {
        self.comps
            .entry(comp.to_string())
            .or_default()
            .insert(field.to_string(), value.into());
    }

    fn fields<'f>(
        &mut self,
        comp: &str,
        fields: impl IntoIterator<Item = &'f (&'static str, u64)>,
    ) {
        for (f, v) in fields {
            self.delta(comp, f, *v);
        }
    }

    /// `<kind>_<id>` per device and `<kind>` for all of them together (Firecracker's
    /// aggregate).
    fn per_device(&mut self, kind: &str, devices: &[(String, Fields)]) {
        let mut total: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (id, fields) in devices {
            self.fields(&format!("{kind}_{id}"), fields);
            for (f, v) in fields {
                *total.entry(f).or_default() += v;
            }
        }
        for (f, v) in total {
            self.delta(kind, f, v);
        }
    }
}

/// Milliseconds since the Unix epoch.
fn utc_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Open a log or metrics destination: a named pipe read-write and non-blocking (so opening
/// never waits for a reader and a full pipe never blocks a writer, as Firecracker does), a
/// regular file for appending (created when missing).
pub fn open_output(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let is_fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
    let mut o = std::fs::OpenOptions::new();
    if is_fifo {
        o.read(true).write(true).custom_flags(libc::O_NONBLOCK);
    } else {
        o.append(true).create(true);
    }
    o.open(path)
}

/// Write all of `line` to `f`, waiting at most `wait` for a full pipe.
pub fn write_line(f: &mut File, mut line: &[u8], wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while !line.is_empty() {
        match f.write(line) {
            Ok(0) => return false,
            Ok(n) => line = &line[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                let mut pfd = libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                let ms = i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX);
                // SAFETY: one valid pollfd, alive for the call.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            }
            Err(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_lines(p: &Path) -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn tmp(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("kestrel-metrics-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn lines_have_firecrackers_shape_and_deltas() {
        let p = tmp("shape");
        let m = Metrics::new("vm-7");
        let mut cfg: MetricsConfig =
            serde_json::from_value(serde_json::json!({"metrics_path": p, "emit_id": true}))
                .unwrap();
        cfg.properties = Some(BTreeMap::from([("k".to_string(), "v".to_string())]));
        m.init(&cfg).unwrap();
        assert!(matches!(
            m.init(&cfg),
            Err(MetricsError::AlreadyInitialized)
        ));
        let reads = Arc::new(Mutex::new(10u64));
        let r = reads.clone();
        m.set_source(Box::new(move || MachineCounters {
            blocks: vec![
                ("rootfs".into(), vec![("read_count", *r.lock().unwrap())]),
                ("scratch".into(), vec![("read_count", 5)]),
            ],
            nets: vec![],
            vsock: Some(vec![("rx_bytes_count", 7)]),
            vcpu: vec![("exit_io", 3)],
            uart: vec![],
            device_panics: 0,
        }));
        m.count_request(("put_api_requests", "drive"));
        m.count_request(("put_api_requests", "drive"));
        m.count_failure(("put_api_requests", "drive"));
        m.store("latencies_us", "pause_vm", 42);
        m.flush();
        *reads.lock().unwrap() = 25;
        m.flush();
        let lines = read_lines(&p);
        assert_eq!(lines.len(), 2);
        let (a, b) = (&lines[0], &lines[1]);
        assert!(a["utc_timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000);
        assert_eq!(a["id"], "vm-7");
        assert_eq!(a["properties"]["k"], "v");
        assert_eq!(a["block_rootfs"]["read_count"], 10);
        assert_eq!(a["block"]["read_count"], 15);
        assert_eq!(a["vsock"]["rx_bytes_count"], 7);
        assert_eq!(a["vcpu"]["exit_io"], 3);
        assert_eq!(a["put_api_requests"]["drive_count"], 2);
        assert_eq!(a["put_api_requests"]["drive_fails"], 1);
        assert_eq!(a["get_api_requests"]["instance_info_count"], 0);
        assert_eq!(a["latencies_us"]["pause_vm"], 42);
        // The second line holds what happened since the first.
        assert_eq!(b["block_rootfs"]["read_count"], 15);
        assert_eq!(b["block_scratch"]["read_count"], 0);
        assert_eq!(b["block"]["read_count"], 15);
        assert_eq!(b["put_api_requests"]["drive_count"], 0);
        assert_eq!(b["latencies_us"]["pause_vm"], 42, "measured values stay");
        let raw = std::fs::read_to_string(&p).unwrap();
        assert!(raw.starts_with("{\"utc_timestamp_ms\":"), "{raw}");
    }

    #[test]
    fn a_fifo_without_reader_never_blocks() {
        let p = tmp("fifo");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let m = Metrics::with_write_wait("x", Duration::from_millis(10));
        m.init(&serde_json::from_value(serde_json::json!({"metrics_path": p})).unwrap())
            .unwrap();
        let t0 = Instant::now();
        // Fill the pipe: later lines are dropped and counted, none blocks for long.
        for _ in 0..200 {
            m.flush();
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
        let s = m.lock();
        assert!(s.own[&("logger".to_string(), "missed_metrics_count".to_string())] > 0);
    }

    #[test]
    fn nothing_is_written_before_init() {
        let m = Metrics::new("x");
        m.flush();
        assert!(m.lock().sink.is_none());
        let e = m
            .init(
                &serde_json::from_value(serde_json::json!({"metrics_path": "/nonexistent-dir/m"}))
                    .unwrap(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir/m"), "{e}");
    }
}
