//! A pool of ready clones of one [`Template`] (kata's VMCache, in-process): `size` sandboxes
//! kept restored, started and with their agent connected and answering, refilled by one
//! background thread (`kestrel-pool`). [`Pool::take`] hands one out after checking its agent
//! still answers and refreshing the guest (entropy and clock, [`Sandbox::refresh_guest`]).
//! See docs/templates.md.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kestrel_api::RestoreOverrides;
use kestrel_vmm::{Vm, VmmError};
use thiserror::Error;

use crate::agent::{AgentClient, AgentError, AGENT_PORT, DEFAULT_CALL_TIMEOUT};
use crate::sandbox::{Sandbox, SandboxError};
use crate::template::Template;

/// First wait after a failed clone; doubled on each further failure in a row.
pub const FILL_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two failed clones.
pub const FILL_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Least time the agent of a ready clone gets to answer the ping at [`Pool::take`] (the
/// take's remaining timeout when that is longer).
pub const TAKE_PING_MIN: Duration = Duration::from_secs(1);
/// Slice in which the filler waits for a new clone's agent, so that [`Pool::close`] does not
/// wait for a whole agent timeout.
const CONNECT_SLICE: Duration = Duration::from_millis(250);

/// What makes the overrides of clone `n` (0, 1, 2, ... in creation order, never reused): at
/// least a `vsock_uds_path` of its own, usually a `name` too.
pub type OverridesFn = Arc<dyn Fn(u64) -> RestoreOverrides + Send + Sync>;

/// Pool failures.
#[derive(Debug, Error)]
pub enum PoolError {
    /// No clone is ready and the take could not wait (a pool of size 0, or a zero timeout).
    #[error("no clone is ready (pool of {size})")]
    Empty {
        /// The pool's size.
        size: usize,
    },
    /// No clone became ready in time.
    #[error("no clone became ready within {waited:?}")]
    Timeout {
        /// How long the take waited.
        waited: Duration,
    },
    /// The pool has no ready clone and its last attempt to make one failed (the filler keeps
    /// trying, with a growing pause between attempts).
    #[error("cannot make a clone of the template: {0}")]
    Template(Arc<SandboxError>),
    /// The filler thread could not run or its work panicked.
    #[error("the pool's filler failed: {0}")]
    Filler(String),
    /// The pool is closed.
    #[error("the pool is closed")]
    Closed,
}

/// Counters and the last hand-out's timings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Clones handed out by [`Pool::take`].
    pub handed_out: u64,
    /// Ready clones thrown away because their agent did not answer (or the refresh failed)
    /// at take time.
    pub discarded: u64,
    /// Clones the filler made (restored, started, agent answering).
    pub created: u64,
    /// Attempts of the filler that failed.
    pub failures: u64,
    /// The last successful take, first part: from the call to a ready clone in hand (waiting
    /// for the filler included; no guest round trip), microseconds.
    pub last_take_us: u64,
    /// Of `last_take_us`, the time spent waiting for the filler, microseconds.
    pub last_wait_us: u64,
    /// The last successful take, second part: [`Sandbox::refresh_guest`], microseconds.
    pub last_refresh_us: u64,
}

/// Why the filler's last attempt failed.
#[derive(Clone)]
enum Failure {
    Clone(Arc<SandboxError>),
    Other(String),
}

impl Failure {
    fn to_error(&self) -> PoolError {
        match self {
            Failure::Clone(e) => PoolError::Template(Arc::clone(e)),
            Failure::Other(s) => PoolError::Filler(s.clone()),
        }
    }
}

struct State {
    ready: VecDeque<Sandbox>,
    closed: bool,
    next_id: u64,
    /// Failed attempts in a row (0 after a success).
    failures_in_row: u32,
    last_failure: Option<Failure>,
    stats: PoolStats,
}

struct Shared {
    template: Arc<Template>,
    size: usize,
    make_overrides: OverridesFn,
    agent_timeout: Duration,
    state: Mutex<State>,
    /// Signalled when a clone is taken or the pool closes (the filler waits on it).
    need: Condvar,
    /// Signalled when a clone is ready, an attempt failed or the pool closes (takers wait).
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Microseconds, saturating.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A pool of ready clones of one template. `Send + Sync`: share it to take from several
/// threads. Dropping it is [`Pool::close`].
pub struct Pool {
    shared: Arc<Shared>,
    filler: Mutex<Option<JoinHandle<()>>>,
}

impl Pool {
    /// A pool keeping `size` clones of `template` ready, each restored with
    /// `make_overrides(n)` for a new `n`, started, and its agent connected (waiting up to
    /// `agent_timeout`) and answering a ping. Filling starts at once on the `kestrel-pool`
    /// thread, one clone at a time; after a failed clone the filler pauses
    /// ([`FILL_BACKOFF_MIN`], doubling up to [`FILL_BACKOFF_MAX`]) before the next attempt.
    /// If the thread cannot be spawned, every take fails with [`PoolError::Filler`].
    pub fn new(
        template: Arc<Template>,
        size: usize,
        make_overrides: OverridesFn,
        agent_timeout: Duration,
    ) -> Pool {
        let shared = Arc::new(Shared {
            template,
            size,
            make_overrides,
            agent_timeout,
            state: Mutex::new(State {
                ready: VecDeque::with_capacity(size),
                closed: false,
                next_id: 0,
                failures_in_row: 0,
                last_failure: None,
                stats: PoolStats::default(),
            }),
            need: Condvar::new(),
            changed: Condvar::new(),
        });
        let worker = Arc::clone(&shared);
        let filler = std::thread::Builder::new()
            .name("kestrel-pool".into())
            .spawn(move || fill(&worker));
        let filler = match filler {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::error!("pool: cannot spawn the filler thread: {e}");
                let mut st = shared.lock();
                st.failures_in_row = 1;
                st.last_failure = Some(Failure::Other(format!("cannot spawn the thread: {e}")));
                None
            }
        };
        Pool {
            shared,
            filler: Mutex::new(filler),
        }
    }

    /// Hand out a ready clone, waiting up to `timeout` for one, and refresh it
    /// ([`Sandbox::refresh_guest`]: reseed the RNG, set the clock). A candidate whose VM has
    /// stopped, or whose refresh fails (its agent does not answer), is discarded (its VM
    /// stopped) and the next one tried; the filler is told to make a replacement.
    /// [`PoolStats::last_take_us`] is the hand-out without the refresh (taking a ready clone:
    /// VMM side only), [`PoolStats::last_refresh_us`] the refresh (two agent round trips).
    ///
    /// # Errors
    /// [`PoolError::Closed`]; [`PoolError::Empty`] for a pool of size 0, or nothing ready and
    /// a zero `timeout`; [`PoolError::Template`] (or [`PoolError::Filler`]) at once when
    /// nothing is ready and the filler's last attempt failed; [`PoolError::Timeout`].
    pub fn take(&self, timeout: Duration) -> Result<Sandbox, PoolError> {
        let start = Instant::now();
        let deadline = start.checked_add(timeout);
        let mut waited = Duration::ZERO;
        loop {
            let (sb, w) = self.next_ready(start, deadline, timeout)?;
            waited += w;
            // A clone whose VM has stopped is discarded here; one whose agent does not answer
            // fails the refresh below (the refresh is the health check: no extra round trip).
            if let Some(why) = sb.vm().exit_reason() {
                tracing::warn!("pool: discarding a clone whose VM stopped: {why:?}");
                self.discard(sb);
                continue;
            }
            let take_us = micros(start.elapsed());
            let t = Instant::now();
            if let Err(e) = sb.refresh_guest() {
                tracing::warn!("pool: discarding a clone whose refresh failed: {e}");
                self.discard(sb);
                continue;
            }
            let refresh_us = micros(t.elapsed());
            let mut st = self.shared.lock();
            st.stats.handed_out += 1;
            st.stats.last_take_us = take_us;
            st.stats.last_wait_us = micros(waited);
            st.stats.last_refresh_us = refresh_us;
            return Ok(sb);
        }
    }

    /// Pop a ready clone (waking the filler), waiting until `deadline`. Returns it and the
    /// time spent waiting.
    fn next_ready(
        &self,
        start: Instant,
        deadline: Option<Instant>,
        timeout: Duration,
    ) -> Result<(Sandbox, Duration), PoolError> {
        let mut st = self.shared.lock();
        let mut waited = Duration::ZERO;
        loop {
            if st.closed {
                return Err(PoolError::Closed);
            }
            if let Some(sb) = st.ready.pop_front() {
                self.shared.need.notify_all();
                return Ok((sb, waited));
            }
            if let Some(f) = st.last_failure.as_ref().filter(|_| st.failures_in_row > 0) {
                return Err(f.to_error());
            }
            if self.shared.size == 0 || timeout.is_zero() {
                return Err(PoolError::Empty {
                    size: self.shared.size,
                });
            }
            let now = Instant::now();
            let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(now));
            if left.is_zero() {
                return Err(PoolError::Timeout {
                    waited: start.elapsed(),
                });
            }
            let (g, _) = self
                .shared
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner());
            st = g;
            waited += now.elapsed();
        }
    }

    /// Stop a clone, remove its socket, count it.
    fn discard(&self, sb: Sandbox) {
        self.shared.lock().stats.discarded += 1;
        dispose(sb);
    }

    /// Clones ready now.
    pub fn ready(&self) -> usize {
        self.shared.lock().ready.len()
    }

    /// The pool's size (clones it keeps ready).
    pub fn size(&self) -> usize {
        self.shared.size
    }

    /// The template the pool clones.
    pub fn template(&self) -> &Arc<Template> {
        &self.shared.template
    }

    /// Counters and the last hand-out's timings.
    pub fn stats(&self) -> PoolStats {
        self.shared.lock().stats
    }

    /// Close the pool: stop the filler (a clone it is making is stopped too; this waits at
    /// most for a restore in progress and a short connect slice, or a ping of up to the agent
    /// timeout), then stop every ready clone and remove its vsock socket. Idempotent; takes
    /// fail with [`PoolError::Closed`] afterwards. Clones already handed out are the caller's.
    pub fn close(&self) {
        let ready = {
            let mut st = self.shared.lock();
            st.closed = true;
            self.shared.need.notify_all();
            self.shared.changed.notify_all();
            std::mem::take(&mut st.ready)
        };
        let handle = self.filler.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("pool: the filler thread panicked");
            }
        }
        // A clone the filler finished while closing was disposed of by the filler itself.
        let late = std::mem::take(&mut self.shared.lock().ready);
        for sb in ready.into_iter().chain(late) {
            dispose(sb);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.close();
    }
}

/// Stop a clone's VM and remove its vsock socket (the device removes it as the VM drops;
/// this also covers a VM that failed half-way).
fn dispose(sb: Sandbox) {
    let uds = sb.uds_path().to_path_buf();
    drop(sb);
    remove_socket(&uds);
}

fn remove_socket(uds: &Path) {
    match std::fs::remove_file(uds) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!("pool: cannot remove {}: {e}", uds.display());
        }
        _ => {}
    }
}

/// The filler thread: keep `size` clones ready until closed.
fn fill(shared: &Shared) {
    while let Some(id) = wait_for_need(shared) {
        let made = catch_unwind(AssertUnwindSafe(|| make_clone(shared, id)));
        let mut st = shared.lock();
        match made {
            Ok(Ok(sb)) => {
                st.stats.created += 1;
                st.failures_in_row = 0;
                st.last_failure = None;
                if st.closed {
                    drop(st);
                    dispose(sb);
                    return;
                }
                st.ready.push_back(sb);
            }
            Ok(Err(Made::Closed)) => return,
            Ok(Err(Made::Failed(e))) => {
                tracing::warn!("pool: clone {id} failed: {e}");
                record_failure(&mut st, Failure::Clone(Arc::new(e)));
            }
            Err(panic) => {
                let what = panic_message(panic.as_ref());
                tracing::error!("pool: making clone {id} panicked: {what}");
                record_failure(
                    &mut st,
                    Failure::Other(format!("clone {id} panicked: {what}")),
                );
            }
        }
        shared.changed.notify_all();
    }
}

fn record_failure(st: &mut State, f: Failure) {
    st.stats.failures += 1;
    st.failures_in_row = st.failures_in_row.saturating_add(1);
    st.last_failure = Some(f);
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// The pause after `failures` failed attempts in a row.
fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32 << (failures - 1).min(16);
    FILL_BACKOFF_MIN
        .saturating_mul(factor)
        .min(FILL_BACKOFF_MAX)
}

/// Wait until a clone is needed and any backoff has passed; the id of the next clone, or
/// `None` once closed.
fn wait_for_need(shared: &Shared) -> Option<u64> {
    let mut st = shared.lock();
    // Only this thread changes the failure count: it holds while waiting.
    let pause_until = Instant::now() + backoff(st.failures_in_row);
    loop {
        if st.closed {
            return None;
        }
        let now = Instant::now();
        let wait = if st.ready.len() >= shared.size {
            None
        } else if now < pause_until {
            Some(pause_until - now)
        } else {
            let id = st.next_id;
            st.next_id += 1;
            return Some(id);
        };
        st = match wait {
            None => shared.need.wait(st).unwrap_or_else(|p| p.into_inner()),
            Some(d) => {
                shared
                    .need
                    .wait_timeout(st, d)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
    }
}

/// How making a clone ended, besides success.
enum Made {
    Closed,
    Failed(SandboxError),
}

impl From<SandboxError> for Made {
    fn from(e: SandboxError) -> Self {
        Made::Failed(e)
    }
}

impl From<VmmError> for Made {
    fn from(e: VmmError) -> Self {
        Made::Failed(e.into())
    }
}

impl From<AgentError> for Made {
    fn from(e: AgentError) -> Self {
        Made::Failed(e.into())
    }
}

/// Restore, start, connect and ping clone `id`.
fn make_clone(shared: &Shared, id: u64) -> Result<Sandbox, Made> {
    let overrides = (shared.make_overrides)(id);
    let t = Instant::now();
    let vm = Vm::restore(shared.template.dir(), &overrides)?;
    let uds = vm
        .config()
        .vsock
        .as_ref()
        .map(|v| v.uds_path.clone())
        .ok_or(SandboxError::NoVsock)?;
    let made = start_and_connect(shared, &vm, &uds).map(|agent| (vm, agent));
    let (vm, agent) = match made {
        Ok(p) => p,
        Err(e) => {
            remove_socket(&uds);
            return Err(e);
        }
    };
    tracing::debug!(
        "pool: clone {id} ({}) ready in {} us",
        vm.name(),
        micros(t.elapsed())
    );
    Ok(Sandbox::from_restored_agent(vm, agent, uds))
}

/// Start `vm` and connect to its agent (in slices, giving up when the pool closes), then
/// ping it. The VM stops when dropped on error.
fn start_and_connect(shared: &Shared, vm: &Vm, uds: &Path) -> Result<AgentClient, Made> {
    vm.start()?;
    let deadline = Instant::now().checked_add(shared.agent_timeout);
    let mut agent = loop {
        let left = deadline.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        });
        match AgentClient::connect(uds, AGENT_PORT, left.min(CONNECT_SLICE)) {
            Ok(a) => break a,
            // This slice is over, the agent timeout is not.
            Err(AgentError::Timeout { .. }) if left > CONNECT_SLICE => {
                if shared.lock().closed {
                    return Err(Made::Closed);
                }
            }
            Err(AgentError::Timeout { what, .. }) => {
                let after = shared.agent_timeout;
                return Err(AgentError::Timeout { what, after }.into());
            }
            Err(e) => return Err(e.into()),
        }
    };
    let left = deadline.map_or(shared.agent_timeout, |d| {
        d.saturating_duration_since(Instant::now())
    });
    agent.set_call_timeout(Some(left.max(TAKE_PING_MIN)));
    agent.ping()?;
    agent.set_call_timeout(Some(DEFAULT_CALL_TIMEOUT));
    // A guest that died right after answering.
    if vm.exit_reason().is_some() {
        return Err(VmmError::NotRunning.into());
    }
    Ok(agent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    use crate::template::tests::{config_in, fake_template, TempDir};

    /// A template whose snapshot files are garbage: every restore fails.
    fn broken_template(tmp: &TempDir) -> Arc<Template> {
        let c = config_in(&tmp.0);
        let dir = tmp.0.join("template");
        fake_template(&dir, &c);
        Arc::new(Template::open(&dir).unwrap())
    }

    /// Overrides giving clone `n` its own socket and name in `dir`, recording the ids.
    fn overrides_in(dir: &Path, ids: Arc<Mutex<Vec<u64>>>) -> OverridesFn {
        let dir = dir.to_path_buf();
        Arc::new(move |n| {
            ids.lock().unwrap().push(n);
            RestoreOverrides {
                name: Some(format!("clone{n}")),
                vsock_uds_path: Some(dir.join(format!("clone{n}.vsock"))),
                ..Default::default()
            }
        })
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            PoolError::Empty { size: 0 }.to_string(),
            "no clone is ready (pool of 0)"
        );
        assert_eq!(
            PoolError::Timeout {
                waited: Duration::from_millis(1500)
            }
            .to_string(),
            "no clone became ready within 1.5s"
        );
        assert_eq!(
            PoolError::Template(Arc::new(SandboxError::NoVsock)).to_string(),
            "cannot make a clone of the template: vsock: a sandbox needs a vsock device for its \
             guest agent"
        );
        assert_eq!(
            PoolError::Filler("clone 3 panicked: boom".into()).to_string(),
            "the pool's filler failed: clone 3 panicked: boom"
        );
        assert_eq!(PoolError::Closed.to_string(), "the pool is closed");
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), FILL_BACKOFF_MIN);
        assert_eq!(backoff(2), FILL_BACKOFF_MIN * 2);
        assert_eq!(backoff(4), FILL_BACKOFF_MIN * 8);
        assert_eq!(backoff(9), FILL_BACKOFF_MIN * 256);
        assert_eq!(backoff(10), FILL_BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), FILL_BACKOFF_MAX);
    }

    #[test]
    fn a_template_that_does_not_restore_fails_takes_fast_and_the_filler_backs_off() {
        let tmp = TempDir::new("pool-broken");
        let ids = Arc::new(Mutex::new(Vec::new()));
        let pool = Pool::new(
            broken_template(&tmp),
            2,
            overrides_in(&tmp.0, Arc::clone(&ids)),
            Duration::from_secs(5),
        );
        let t = Instant::now();
        let e = pool.take(Duration::from_secs(10)).err().expect("no clone");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(matches!(e, PoolError::Template(_)), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("cannot make a clone of the template: "),
            "{e}"
        );
        // Later takes fail at once too, without waiting out their timeout.
        let t = Instant::now();
        assert!(matches!(
            pool.take(Duration::from_secs(10)),
            Err(PoolError::Template(_))
        ));
        assert!(t.elapsed() < Duration::from_millis(500));

        std::thread::sleep(Duration::from_millis(1000));
        let st = pool.stats();
        // Attempts at about 0, 0.1, 0.3, 0.7 and 1.5 s: a spinning filler makes thousands.
        assert!(
            (1..=5).contains(&st.failures),
            "{} attempts in about a second",
            st.failures
        );
        assert_eq!((st.created, st.handed_out, st.discarded), (0, 0, 0));
        assert_eq!(pool.ready(), 0);
        let ids = ids.lock().unwrap().clone();
        assert_eq!(
            ids,
            (0..ids.len() as u64).collect::<Vec<_>>(),
            "unique, in order"
        );

        let t = Instant::now();
        pool.close();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(matches!(
            pool.take(Duration::from_secs(1)),
            Err(PoolError::Closed)
        ));
        pool.close();
        // No clone socket is left behind.
        let left: Vec<_> = std::fs::read_dir(&tmp.0)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".vsock"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn an_empty_pool_times_out_and_a_zero_size_pool_is_empty() {
        let tmp = TempDir::new("pool-wait");
        // The filler is held in make_overrides until the test lets it go.
        let (tx, rx) = mpsc::channel::<()>();
        let rx = Mutex::new(rx);
        let template = broken_template(&tmp);
        let dir = tmp.0.clone();
        let pool = Pool::new(
            Arc::clone(&template),
            1,
            Arc::new(move |n| {
                let _ = rx.lock().unwrap().recv();
                RestoreOverrides {
                    vsock_uds_path: Some(dir.join(format!("c{n}.vsock"))),
                    ..Default::default()
                }
            }),
            Duration::from_secs(1),
        );
        assert!(matches!(
            pool.take(Duration::ZERO),
            Err(PoolError::Empty { size: 1 })
        ));
        let t = Instant::now();
        match pool.take(Duration::from_millis(200)) {
            Err(PoolError::Timeout { waited }) => {
                assert!(waited >= Duration::from_millis(200), "{waited:?}");
                assert!(t.elapsed() < Duration::from_secs(2));
            }
            other => panic!("{:?}", other.err()),
        }
        assert_eq!(pool.size(), 1);
        assert!(Arc::ptr_eq(pool.template(), &template));
        // The filler's thread is named.
        let named = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
            .any(|c| c.trim_end() == "kestrel-pool");
        assert!(named);
        drop(tx);
        drop(pool);

        let zero = Pool::new(
            template,
            0,
            overrides_in(&tmp.0, Arc::default()),
            Duration::from_secs(1),
        );
        assert!(matches!(
            zero.take(Duration::from_secs(5)),
            Err(PoolError::Empty { size: 0 })
        ));
        assert_eq!(zero.stats(), PoolStats::default(), "nothing attempted");
    }

    #[test]
    fn a_panicking_overrides_function_is_a_filler_error_not_a_dead_pool() {
        let tmp = TempDir::new("pool-panic");
        let pool = Pool::new(
            broken_template(&tmp),
            1,
            Arc::new(|n| panic!("no overrides for clone {n}")),
            Duration::from_secs(1),
        );
        let e = pool.take(Duration::from_secs(5)).err().expect("no clone");
        assert!(matches!(e, PoolError::Filler(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "the pool's filler failed: clone 0 panicked: no overrides for clone 0"
        );
        // The filler lives on (and keeps backing off).
        std::thread::sleep(Duration::from_millis(400));
        let failures = pool.stats().failures;
        assert!((2..=4).contains(&failures), "{failures}");
        pool.close();
    }
}
