//! Child processes: the zombie reaper (the agent is PID 1) and the `exec` op.
//!
//! One reaper thread owns every `wait`: it peeks at an exited child with
//! `waitid(P_ALL, WEXITED | WNOWAIT)`, then reaps it with `waitpid` *while holding the table
//! lock*. `exec` spawns with the same lock held and registers the pid before releasing it, so
//! the reaper can always tell our own children (status delivered to the waiting `exec`) from
//! orphans re-parented to PID 1 (status dropped). A pid is only ever signalled under the lock
//! while it is still unreaped, so a kill can never hit a recycled pid.
//!
//! With no children at all (`ECHILD`), the reaper sleeps until the next spawn: orphans are
//! re-parented to us only while one of our children exits, i.e. while we have a child, so no
//! other wake-up is needed (no SIGCHLD handling, no timer: an idle guest stays idle).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kestrel_agent_proto::{b64, Exec, ExecOutput};

use crate::proto::{OpError, OpResult};

/// Captured output per stream is cut at this size (the rest is read and dropped).
pub const OUTPUT_CAP: usize = 16 << 20;
/// After a timeout kill, how long to wait for the pipes to close and the child to be reaped.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// Our own `exec` children: pid -> exit status once reaped (None while running), and a
/// counter of spawns (wakes the reaper when it had no children).
struct Table {
    children: BTreeMap<libc::pid_t, Option<libc::c_int>>,
    spawns: u64,
}

static TABLE: Mutex<Table> = Mutex::new(Table {
    children: BTreeMap::new(),
    spawns: 0,
});
static REAPED: Condvar = Condvar::new();
static SPAWNED: Condvar = Condvar::new();

fn table() -> MutexGuard<'static, Table> {
    TABLE.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn start_reaper() -> io::Result<()> {
    std::thread::Builder::new()
        .name("reaper".into())
        .stack_size(64 << 10)
        .spawn(reap_forever)
        .map(|_| ())
}

fn reap_forever() {
    loop {
        let spawns = table().spawns;
        // SAFETY: all-zero bytes are a valid `siginfo_t`.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid fills `info`, which we own.
        let r = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r == 0 {
            // SAFETY: waitid succeeded with WEXITED, so the pid field is valid.
            let pid = unsafe { info.si_pid() };
            let mut t = table();
            let mut status = 0;
            // SAFETY: reaps exactly this (exited) child.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                if let Some(slot) = t.children.get_mut(&pid) {
                    *slot = Some(status);
                    REAPED.notify_all();
                }
            }
            continue;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::ECHILD) => {
                // No children: sleep until a spawn after the `spawns` we read above.
                let mut t = table();
                while t.spawns == spawns {
                    t = SPAWNED.wait(t).unwrap_or_else(|e| e.into_inner());
                }
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[derive(Default)]
struct Capture {
    data: Vec<u8>,
    truncated: bool,
}

impl Capture {
    /// The output as UTF-8-lossy text, and as base64 of the exact bytes only if they are not
    /// valid UTF-8.
    fn text(&mut self) -> (String, Option<String>) {
        match String::from_utf8(std::mem::take(&mut self.data)) {
            Ok(s) => (s, None),
            Err(e) => {
                let bytes = e.into_bytes();
                let text = String::from_utf8_lossy(&bytes).into_owned();
                (text, Some(b64::encode(&bytes)))
            }
        }
    }

    fn push(&mut self, b: &[u8]) {
        let room = OUTPUT_CAP.saturating_sub(self.data.len());
        if b.len() > room {
            self.truncated = true;
        }
        self.data.extend_from_slice(&b[..b.len().min(room)]);
    }
}

/// Deadline bookkeeping: kills the process group once the deadline passes, then gives up
/// waiting `KILL_GRACE` later.
struct Deadline {
    pid: libc::pid_t,
    at: Option<Instant>,
    killed_at: Option<Instant>,
}

impl Deadline {
    /// Time to sleep before the next check (None = forever); Err(()) = give up now.
    /// `t` must be the locked child table (the kill checks the pid is still unreaped).
    fn next(&mut self, t: &Table) -> Result<Option<Duration>, ()> {
        let now = Instant::now();
        if let Some(k) = self.killed_at {
            let end = k + KILL_GRACE;
            return if now >= end {
                Err(())
            } else {
                Ok(Some(end - now))
            };
        }
        match self.at {
            None => Ok(None),
            Some(at) if now < at => Ok(Some(at - now)),
            Some(_) => {
                // SAFETY: kill(2) on our child's process group (pgid == pid, see spawn) and,
                // if not yet reaped, on the child itself.
                unsafe {
                    libc::kill(-self.pid, libc::SIGKILL);
                    if matches!(t.children.get(&self.pid), Some(None)) {
                        libc::kill(self.pid, libc::SIGKILL);
                    }
                }
                self.killed_at = Some(now);
                Ok(Some(KILL_GRACE))
            }
        }
    }

    fn timed_out(&self) -> bool {
        self.killed_at.is_some()
    }
}

/// The `exec` op: run `a.argv`, feed it its input, capture its output until both pipes close.
pub fn exec(a: Exec) -> OpResult<ExecOutput> {
    let Some(prog) = a.argv.first() else {
        return Err(OpError::bad_request("exec: argv is empty"));
    };
    let input = match (a.stdin, a.stdin_b64) {
        (Some(_), Some(_)) => {
            return Err(OpError::bad_request(
                "exec: give stdin or stdin_b64, not both",
            ))
        }
        (Some(s), None) => Some(s.into_bytes()),
        (None, Some(b)) => Some(
            b64::decode(&b).map_err(|e| OpError::bad_request(format!("exec: stdin_b64: {e}")))?,
        ),
        (None, None) => None,
    };
    let mut cmd = Command::new(prog);
    cmd.args(&a.argv[1..])
        .envs(&a.env)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group: a timeout kills the command and what it started.
        .process_group(0);
    if let Some(cwd) = &a.cwd {
        cmd.current_dir(cwd);
    }

    let start = Instant::now();
    let (pid, stdin, stdout, stderr) = {
        let mut t = table();
        let mut child = cmd
            .spawn()
            .map_err(|e| OpError::os(format!("exec {prog}"), e))?;
        let pid = pid_of(&child);
        t.children.insert(pid, None);
        t.spawns += 1;
        SPAWNED.notify_all();
        // Dropping `child` neither waits nor kills; the reaper owns the wait.
        (
            pid,
            child.stdin.take(),
            child.stdout.take(),
            child.stderr.take(),
        )
    };
    let mut deadline = Deadline {
        pid,
        // A deadline beyond what Instant can represent is no deadline.
        at: a
            .timeout_ms
            .and_then(|ms| start.checked_add(Duration::from_millis(ms))),
        killed_at: None,
    };
    let mut out = Capture::default();
    let mut err = Capture::default();
    pump(
        stdin.zip(input),
        stdout,
        stderr,
        &mut out,
        &mut err,
        &mut deadline,
    );
    let status = wait_status(&mut deadline);

    let (exit_code, signal) = match status {
        Some(s) if libc::WIFEXITED(s) => (Some(libc::WEXITSTATUS(s)), None),
        Some(s) if libc::WIFSIGNALED(s) => (None, Some(libc::WTERMSIG(s))),
        _ => (None, None),
    };
    let (stdout, stdout_b64) = out.text();
    let (stderr, stderr_b64) = err.text();
    Ok(ExecOutput {
        exit_code,
        signal,
        timed_out: deadline.timed_out(),
        duration_ms: crate::ops::millis(start),
        stdout,
        stdout_b64,
        stdout_truncated: out.truncated,
        stderr,
        stderr_b64,
        stderr_truncated: err.truncated,
    })
}

/// The child's pid as `pid_t`.
#[allow(clippy::cast_possible_wrap)] // Linux pids are at most PID_MAX_LIMIT (2^22)
fn pid_of(child: &std::process::Child) -> libc::pid_t {
    child.id() as libc::pid_t
}

fn set_nonblocking(fd: libc::c_int) {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
}

/// Feed stdin and drain stdout/stderr until both output pipes reach EOF (or the deadline plus
/// the kill grace passes).
fn pump(
    mut stdin: Option<(ChildStdin, Vec<u8>)>,
    mut stdout: Option<ChildStdout>,
    mut stderr: Option<ChildStderr>,
    out: &mut Capture,
    err: &mut Capture,
    deadline: &mut Deadline,
) {
    let mut written = 0usize;
    if let Some((p, data)) = &stdin {
        if data.is_empty() {
            stdin = None;
        } else {
            set_nonblocking(p.as_raw_fd());
        }
    }
    let mut buf = vec![0u8; 64 << 10];
    while stdout.is_some() || stderr.is_some() {
        let wait = match deadline.next(&table()) {
            Ok(w) => w,
            Err(()) => return,
        };
        let timeout = wait.map_or(-1, |d| {
            libc::c_int::try_from(d.as_millis().max(1)).unwrap_or(libc::c_int::MAX)
        });
        let mut fds = [libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        }; 3];
        if let Some(p) = &stdout {
            fds[0] = libc::pollfd {
                fd: p.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
        }
        if let Some(p) = &stderr {
            fds[1] = libc::pollfd {
                fd: p.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
        }
        if let Some((p, _)) = &stdin {
            fds[2] = libc::pollfd {
                fd: p.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
        }
        // SAFETY: fds is a valid array of 3 pollfd (negative fds are ignored by poll).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout) };
        if n <= 0 {
            continue; // timeout or EINTR: re-check the deadline
        }
        let ready = |i: usize| fds[i].revents != 0;
        if ready(0) {
            if let Some(p) = &mut stdout {
                if !read_some(p, &mut buf, out) {
                    stdout = None;
                }
            }
        }
        if ready(1) {
            if let Some(p) = &mut stderr {
                if !read_some(p, &mut buf, err) {
                    stderr = None;
                }
            }
        }
        if ready(2) {
            if let Some((p, data)) = &mut stdin {
                match p.write(&data[written..]) {
                    Ok(k) => written += k,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    Err(_) => written = data.len(), // EPIPE: the command does not read stdin
                }
                if written >= data.len() {
                    stdin = None; // close: the command sees EOF
                }
            }
        }
    }
}

/// Read what is there; false on EOF or error (the pipe is done).
fn read_some(p: &mut impl Read, buf: &mut [u8], cap: &mut Capture) -> bool {
    match p.read(buf) {
        Ok(0) => false,
        Ok(k) => {
            cap.push(&buf[..k]);
            true
        }
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
        ),
    }
}

/// Wait for the reaper to deliver the child's status. None if it never came (after a kill).
fn wait_status(deadline: &mut Deadline) -> Option<libc::c_int> {
    let pid = deadline.pid;
    let mut t = table();
    loop {
        if let Some(Some(status)) = t.children.get(&pid) {
            let status = *status;
            t.children.remove(&pid);
            return Some(status);
        }
        match deadline.next(&t) {
            Err(()) => {
                t.children.remove(&pid); // the reaper will drop its status like an orphan's
                return None;
            }
            Ok(None) => t = REAPED.wait(t).unwrap_or_else(|e| e.into_inner()),
            Ok(Some(d)) => {
                t = REAPED
                    .wait_timeout(t, d)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0)
            }
        }
    }
}
