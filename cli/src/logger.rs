//! The binary's `tracing` subscriber: Kestrel's own log on stderr (`KESTREL_LOG`, default
//! `warn`), plus Firecracker's `logger` when it is configured: lines in Firecracker's format
//! written to `logger.log_path` (a file or a named pipe), with its level, module filter,
//! `show_level` and `show_log_origin`.
//!
//! Firecracker's line: `<local time, ns> [<instance id>:<thread name>(:<LEVEL>)(:<file>:<line>)]
//! <message>`. The library only emits `tracing` events; this binary owns the subscriber.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use kestrel_api::{LogLevel, LoggerConfig, DEFAULT_LOG_LEVEL};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Metadata};
use tracing_subscriber::layer::{Context, Filter, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// Lines that could not be written (a full pipe, a failing file): Firecracker's
/// `logger.missed_log_count`.
static MISSED_LOGS: AtomicU64 = AtomicU64::new(0);

/// Lines the Firecracker logger could not write so far.
pub fn missed_logs() -> u64 {
    MISSED_LOGS.load(Ordering::Relaxed)
}

/// What the `logger` section asks for.
struct LogState {
    file: Option<File>,
    level: LogLevel,
    show_level: bool,
    show_log_origin: bool,
    module: Option<String>,
}

impl LogState {
    fn filter(&self) -> LevelFilter {
        if self.file.is_none() {
            return LevelFilter::OFF;
        }
        match self.level {
            LogLevel::Off => LevelFilter::OFF,
            LogLevel::Trace => LevelFilter::TRACE,
            LogLevel::Debug => LevelFilter::DEBUG,
            LogLevel::Info => LevelFilter::INFO,
            LogLevel::Warn => LevelFilter::WARN,
            LogLevel::Error => LevelFilter::ERROR,
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        self.filter() >= *meta.level()
            && self
                .module
                .as_deref()
                .is_none_or(|m| meta.module_path().is_some_and(|p| p.starts_with(m)))
    }
}

/// Handle to Firecracker's logger: [`Logger::apply`] takes a `logger` section.
#[derive(Clone)]
pub struct Logger {
    state: Arc<RwLock<LogState>>,
}

fn initial_state() -> Arc<RwLock<LogState>> {
    Arc::new(RwLock::new(LogState {
        file: None,
        level: DEFAULT_LOG_LEVEL,
        show_level: false,
        show_log_origin: false,
        module: None,
    }))
}

impl Logger {
    /// A logger no subscriber writes through (tests of its users).
    #[cfg(test)]
    pub fn detached() -> Self {
        Logger {
            state: initial_state(),
        }
    }

    /// Apply a `logger` section as Firecracker does: the file is opened first (an error leaves
    /// everything as it was); then the level (default `Info`) is set, and the other fields
    /// change only when given.
    pub fn apply(&self, cfg: &LoggerConfig) -> std::io::Result<()> {
        let file = cfg
            .log_path
            .as_deref()
            .map(crate::metrics::open_output)
            .transpose()?;
        let mut s = self.state.write().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = file {
            s.file = Some(f);
        }
        s.level = cfg.level.unwrap_or(DEFAULT_LOG_LEVEL);
        if let Some(v) = cfg.show_level {
            s.show_level = v;
        }
        if let Some(v) = cfg.show_log_origin {
            s.show_log_origin = v;
        }
        if let Some(m) = &cfg.module {
            s.module = Some(m.clone());
        }
        drop(s);
        // The level may have gone up: have every call site ask again.
        tracing::callsite::rebuild_interest_cache();
        Ok(())
    }
}

/// The layer writing Firecracker's lines.
struct FirecrackerLayer {
    state: Arc<RwLock<LogState>>,
    instance_id: String,
}

/// Its filter: the `logger` section's level and module, read at every event.
struct FirecrackerFilter {
    state: Arc<RwLock<LogState>>,
}

impl<S> Filter<S> for FirecrackerFilter {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .enabled(meta)
    }

    fn callsite_enabled(&self, _: &'static Metadata<'static>) -> Interest {
        // The configuration changes at run time: decide per event.
        Interest::sometimes()
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(
            self.state
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .filter(),
        )
    }
}

impl<S: tracing::Subscriber> Layer<S> for FirecrackerLayer {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        let Some(mut file) = s.file.as_ref() else {
            return;
        };
        let line = format_line(&self.instance_id, &s, event);
        // One write per line keeps lines whole in a pipe.
        if file.write_all(line.as_bytes()).is_err() {
            MISSED_LOGS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Firecracker's line for `event`.
fn format_line(instance_id: &str, s: &LogState, event: &Event<'_>) -> String {
    let meta = event.metadata();
    let thread = std::thread::current();
    let mut line = format!(
        "{} [{instance_id}:{}",
        local_time(),
        thread.name().unwrap_or("-")
    );
    if s.show_level {
        let _ = write!(line, ":{}", meta.level());
    }
    if s.show_log_origin {
        let _ = write!(
            line,
            ":{}:{}",
            meta.file().unwrap_or("?"),
            meta.line().map_or("?".to_string(), |l| l.to_string())
        );
    }
    line.push_str("] ");
    let mut v = MessageVisitor(&mut line);
    event.record(&mut v);
    line.push('\n');
    line
}

/// Writes the `message` field, then the others as ` name=value`.
struct MessageVisitor<'a>(&'a mut String);

impl Visit for MessageVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

/// Local time as Firecracker writes it: `2024-01-31T13:45:07.123456789`.
fn local_time() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    // SAFETY: an all-zero `tm` is a valid value of the plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is the thread-safe form.
    unsafe { libc::localtime_r(&ts.tv_sec, &mut tm) };
    format!(
        "{}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        ts.tv_nsec
    )
}

/// Install the process's subscriber: stderr (`KESTREL_LOG`) and Firecracker's logger (off
/// until [`Logger::apply`] gives it a file). Lines carry `instance_id`.
pub fn init(instance_id: &str) -> Logger {
    let state = initial_state();
    let fmt = tracing_subscriber::fmt::layer();
    // Unit tests: through the test harness's capture.
    #[cfg(test)]
    let fmt = fmt.with_test_writer();
    #[cfg(not(test))]
    let fmt = fmt.with_writer(std::io::stderr);
    let stderr = fmt.with_filter(
        tracing_subscriber::EnvFilter::try_from_env("KESTREL_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
    );
    let fc = FirecrackerLayer {
        state: state.clone(),
        instance_id: instance_id.to_string(),
    }
    .with_filter(FirecrackerFilter {
        state: state.clone(),
    });
    // Fails only when a subscriber is installed already (a second call in tests).
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(fc)
        .try_init();
    Logger { state }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_in_firecrackers_format() {
        let p = std::env::temp_dir().join(format!("kestrel-log-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let logger = init("vm-1");
        let mut cfg = LoggerConfig {
            log_path: Some(p.clone()),
            level: Some(LogLevel::Debug),
            show_level: Some(true),
            show_log_origin: Some(true),
            // Other tests of this binary log through the same global subscriber.
            module: Some("kestrel::logger".into()),
        };
        logger.apply(&cfg).unwrap();
        std::thread::Builder::new()
            .name("fc_api".into())
            .spawn(|| {
                tracing::debug!(drive = "rootfs", "hello {}", 42);
                tracing::trace!("not at debug");
            })
            .unwrap()
            .join()
            .unwrap();
        cfg.level = Some(LogLevel::Error);
        cfg.log_path = None;
        cfg.show_log_origin = Some(false);
        logger.apply(&cfg).unwrap();
        tracing::warn!("below error");
        tracing::error!("an error");
        // Module filter: only modules whose path starts with it.
        cfg.module = Some("kestrel_vmm".into());
        logger.apply(&cfg).unwrap();
        tracing::error!("filtered out");
        cfg.module = Some("kestrel::logger".into());
        logger.apply(&cfg).unwrap();
        tracing::error!("from this module");
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[2].ends_with("] from this module"), "{text}");
        let (time, rest) = lines[0].split_once(' ').unwrap();
        assert_eq!(time.len(), "2024-01-31T13:45:07.123456789".len(), "{time}");
        assert_eq!(&time[10..11], "T");
        assert!(
            rest.starts_with("[vm-1:fc_api:DEBUG:cli/src/logger.rs:"),
            "{rest}"
        );
        assert!(rest.ends_with("] hello 42 drive=\"rootfs\""), "{rest}");
        assert!(lines[1].ends_with(":ERROR] an error"), "{}", lines[1]);
        let bad = LoggerConfig {
            log_path: Some("/nonexistent-dir/x.log".into()),
            ..LoggerConfig::default()
        };
        assert!(logger.apply(&bad).is_err());
    }
}
