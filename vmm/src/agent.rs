//! Host-side client of the Kestrel guest agent (`resources/agent`).
//!
//! The agent listens on AF_VSOCK port [`AGENT_PORT`] in the guest. The host reaches it through
//! the VM's hybrid vsock device (Firecracker's scheme): connect to the device's Unix socket
//! (`uds_path`), write `CONNECT <port>\n`, read `OK <host port>\n`; from then on the Unix
//! socket is a byte stream to the guest's listener. On top of it, one JSON request per line,
//! one JSON response per line, in order (`docs/agent-protocol.md`).
//!
//! ```no_run
//! use std::{path::Path, time::Duration};
//! use kestrel_vmm::agent::{AgentClient, AGENT_PORT};
//!
//! let mut agent = AgentClient::connect(Path::new("/run/vm0/vsock.sock"), AGENT_PORT,
//!                                      Duration::from_secs(300))?;
//! let r = agent.exec(&["uname", "-r"])?;
//! println!("{} (exit {:?})", r.stdout_str(), r.exit_code);
//! agent.write_file("/tmp/hello", b"hello\n", Some(0o644))?;
//! assert_eq!(agent.read_file("/tmp/hello")?, b"hello\n");
//! # Ok::<(), kestrel_vmm::agent::AgentError>(())
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use thiserror::Error;

/// The vsock port the guest agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// Default time limit of one call (see [`AgentClient::set_call_timeout`]).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Payload per `read_file` / `write_file` request made by the chunking helpers.
pub const CHUNK: usize = 4 << 20;
/// Default longest response line accepted ([`AgentClient::set_max_response_line`]): 64 MiB.
/// It must hold the largest answer the agent sends, an `exec` result with 16 MiB of stdout
/// and 16 MiB of stderr, base64-encoded (~45 MiB), and a [`CHUNK`] of `read_file` (~5.6 MiB).
/// A longer line is [`AgentError::ResponseTooLong`]; the connection is then unusable.
pub const MAX_RESPONSE_LINE: u64 = 64 << 20;
/// Default most bytes [`AgentClient::read_file`] collects from one file
/// ([`AgentClient::set_max_read_file`]): 256 MiB. A guest that keeps answering `eof: false`
/// (or a file that large) gets [`AgentError::TooLarge`] instead of growing the host's memory.
pub const MAX_READ_FILE: u64 = 256 << 20;
/// Longest handshake reply accepted.
const MAX_HANDSHAKE: u64 = 256;

/// Why an agent operation failed.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The hybrid vsock socket could not be used (not retryable: a bad path, permissions,
    /// an unexpected handshake reply).
    #[error("cannot connect to the guest agent via {path} (port {port}): {reason}")]
    Connect {
        /// The hybrid vsock Unix socket.
        path: PathBuf,
        /// The guest port.
        port: u32,
        /// What went wrong.
        reason: String,
    },
    /// The connection failed while in use (closed by the guest, reset, ...).
    #[error("guest agent connection: {0}")]
    Io(#[from] io::Error),
    /// The agent sent something this client does not understand.
    #[error("guest agent protocol error: {0}")]
    Protocol(String),
    /// The agent ran the op and reported an error.
    #[error("guest agent op {op} failed ({kind}{}): {message}", errno.map(|e| format!(", errno {e}")).unwrap_or_default())]
    Remote {
        /// The op.
        op: String,
        /// Short error class: `os`, `bad_request`, `unsupported`, `too_large`, ...
        kind: String,
        /// The agent's message.
        message: String,
        /// The guest errno, for `kind == "os"`.
        errno: Option<i32>,
    },
    /// A response line exceeded the client's limit ([`MAX_RESPONSE_LINE`] by default).
    #[error("guest agent response line longer than {limit} bytes")]
    ResponseTooLong {
        /// The limit.
        limit: u64,
    },
    /// `read_file` would collect more than the client's limit ([`MAX_READ_FILE`] by
    /// default).
    #[error("guest agent: {path} is larger than the {limit}-byte read limit")]
    TooLarge {
        /// The guest file.
        path: String,
        /// The limit.
        limit: u64,
    },
    /// No connection or no response within the time limit.
    #[error("guest agent: timed out after {after:?} {what}")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// The limit.
        after: Duration,
    },
}

/// Result of [`AgentClient::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// Exit status, if the command exited normally.
    pub exit_code: Option<i32>,
    /// Terminating signal, if it was killed.
    pub signal: Option<i32>,
    /// The time limit passed and the command's process group was killed.
    pub timed_out: bool,
    /// Captured standard output (at most 16 MiB).
    pub stdout: Vec<u8>,
    /// Captured standard error (at most 16 MiB).
    pub stderr: Vec<u8>,
    /// Output beyond 16 MiB was dropped.
    pub stdout_truncated: bool,
    /// Error output beyond 16 MiB was dropped.
    pub stderr_truncated: bool,
    /// Wall time in the guest.
    pub duration_ms: u64,
}

impl ExecResult {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// stdout as text (invalid UTF-8 replaced).
    pub fn stdout_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.stdout)
    }

    /// stderr as text (invalid UTF-8 replaced).
    pub fn stderr_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.stderr)
    }
}

/// A command for [`AgentClient::exec_with`].
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in the guest's `PATH`.
    pub argv: Vec<String>,
    /// Bytes fed to stdin (stdin is `/dev/null` when None).
    pub stdin: Option<Vec<u8>>,
    /// Variables added to (or replacing in) the agent's environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<String>,
    /// Kill the command's process group after this long.
    pub timeout: Option<Duration>,
}

impl ExecRequest {
    /// A request for `argv`.
    pub fn new<S: AsRef<str>>(argv: &[S]) -> Self {
        Self {
            argv: argv.iter().map(|s| s.as_ref().to_string()).collect(),
            ..Self::default()
        }
    }

    /// Feed `data` to stdin.
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    /// Set an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Run in `dir`.
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Time limit in the guest.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    fn to_args(&self) -> Value {
        let mut a = json!({ "argv": self.argv });
        if let Some(data) = &self.stdin {
            a["stdin_b64"] = b64::encode(data).into();
        }
        if !self.env.is_empty() {
            a["env"] = json!(self.env);
        }
        if let Some(cwd) = &self.cwd {
            a["cwd"] = cwd.as_str().into();
        }
        if let Some(t) = self.timeout {
            a["timeout_ms"] = u64::try_from(t.as_millis()).unwrap_or(u64::MAX).into();
        }
        a
    }
}

/// Digest of a guest file (or of a range of it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FileDigest {
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Size of the whole file in bytes (`st_size`; 0 for most /proc and /sys files).
    pub size: u64,
}

/// One range read by [`AgentClient::read_file_range`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChunk {
    /// The bytes.
    pub data: Vec<u8>,
    /// Lowercase hex SHA-256 of `data`, computed by the agent.
    pub sha256: String,
    /// Size of the whole file (`st_size`).
    pub size: u64,
    /// The read reached end of file.
    pub eof: bool,
}

/// Memory blocks handled by [`AgentClient::probe_memory`] / [`AgentClient::offline_memory`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MemoryBlocks {
    /// Linux memory block numbers (`/sys/devices/system/memory/memoryN`).
    pub blocks: Vec<u64>,
    /// Memory block size in bytes.
    pub block_size: u64,
    /// `MemTotal` afterwards.
    pub mem_total_kb: u64,
}

/// `/proc/meminfo` summary.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MemInfo {
    /// MemTotal.
    pub mem_total_kb: u64,
    /// MemFree.
    pub mem_free_kb: u64,
    /// MemAvailable.
    #[serde(default)]
    pub mem_available_kb: Option<u64>,
}

/// CPU sets as the guest kernel prints them (e.g. `0-1,3`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CpuSets {
    /// `/sys/devices/system/cpu/online`.
    pub online: String,
    /// `/sys/devices/system/cpu/possible`.
    pub possible: String,
    /// `/sys/devices/system/cpu/present`.
    pub present: String,
}

/// A connection to the guest agent. Calls on one client are sequential; open several clients
/// for concurrent work (the agent serves each connection on its own thread).
pub struct AgentClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    /// A response line being read when a call timed out (completed by a later call).
    partial: Vec<u8>,
    call_timeout: Option<Duration>,
    max_line: u64,
    max_read_file: u64,
}

/// Writes to the agent's socket with `MSG_NOSIGNAL`: the client runs on the embedder's threads,
/// where a guest (or agent) that hung up must be an error, never a `SIGPIPE` for the process.
/// The socket's send timeout applies as for `write`.
struct NoSigpipe<'a>(&'a UnixStream);

impl Write for NoSigpipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        kestrel_devices::sigpipe::send(self.0.as_raw_fd(), buf, 0)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The first look at a response: which request it answers and whether it succeeded, without
/// building a JSON tree of the whole line (the payload is parsed once, into its own type).
#[derive(Deserialize)]
struct ResponseHead {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    ok: bool,
    #[serde(default)]
    error: Option<RemoteErrorBody>,
}

#[derive(Deserialize)]
struct RemoteErrorBody {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    errno: Option<i64>,
}

/// The `ok` payload of a response, as `T`.
#[derive(Deserialize)]
struct ResponseOk<T> {
    ok: T,
}

/// A field that is present (whatever its value, `null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
            | io::ErrorKind::Interrupted
    )
}

/// Outcome of one connection attempt.
enum Attempt {
    Ok(AgentClient),
    Retry(String),
}

impl AgentClient {
    /// Connect to guest port `port` through the hybrid vsock socket `uds_path`, retrying
    /// until `timeout`: the socket may not exist yet, and until the guest listens the device
    /// closes the connection before `OK`.
    pub fn connect(uds_path: &Path, port: u32, timeout: Duration) -> Result<Self, AgentError> {
        // A timeout too large for Instant: about a century.
        let deadline = Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86_400));
        let mut pause = Duration::from_millis(20);
        loop {
            let last = match Self::try_connect(uds_path, port, deadline)? {
                Attempt::Ok(c) => return Ok(c),
                Attempt::Retry(why) => why,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(AgentError::Timeout {
                    what: format!(
                        "connecting to guest port {port} via {} (last attempt: {last})",
                        uds_path.display()
                    ),
                    after: timeout,
                });
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    fn try_connect(path: &Path, port: u32, deadline: Instant) -> Result<Attempt, AgentError> {
        let fail = |reason: String| AgentError::Connect {
            path: path.to_path_buf(),
            port,
            reason,
        };
        let stream = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e) if retryable(&e) => return Ok(Attempt::Retry(format!("connect: {e}"))),
            Err(e) => return Err(fail(format!("connect: {e}"))),
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let setup = stream
            .set_read_timeout(Some(left))
            .and_then(|()| stream.set_write_timeout(Some(left)))
            .and_then(|()| stream.try_clone());
        let writer = match setup {
            Ok(w) => w,
            Err(e) => return Err(fail(format!("socket setup: {e}"))),
        };
        if let Err(e) = NoSigpipe(&writer).write_all(format!("CONNECT {port}\n").as_bytes()) {
            return if retryable(&e) {
                Ok(Attempt::Retry(format!("send CONNECT: {e}")))
            } else {
                Err(fail(format!("send CONNECT: {e}")))
            };
        }
        let mut reader = BufReader::new(stream);
        let mut reply = Vec::new();
        match (&mut reader)
            .take(MAX_HANDSHAKE)
            .read_until(b'\n', &mut reply)
        {
            Ok(_) if reply.last() == Some(&b'\n') => {}
            // EOF before a full line: the guest is not listening (yet).
            Ok(_) if (reply.len() as u64) < MAX_HANDSHAKE => {
                return Ok(Attempt::Retry("connection closed before OK".into()))
            }
            Ok(_) => return Err(fail("handshake reply too long".into())),
            Err(e) if retryable(&e) => return Ok(Attempt::Retry(format!("read OK: {e}"))),
            Err(e) => return Err(fail(format!("read OK: {e}"))),
        }
        let text = String::from_utf8_lossy(&reply);
        let ok = text
            .trim_end()
            .strip_prefix("OK ")
            .is_some_and(|p| p.parse::<u32>().is_ok());
        if !ok {
            return Err(fail(format!(
                "unexpected handshake reply {:?}",
                text.trim_end()
            )));
        }
        Ok(Attempt::Ok(AgentClient::new(reader, writer)))
    }

    fn new(reader: BufReader<UnixStream>, writer: UnixStream) -> Self {
        AgentClient {
            reader,
            writer,
            next_id: 1,
            partial: Vec::new(),
            call_timeout: Some(DEFAULT_CALL_TIMEOUT),
            max_line: MAX_RESPONSE_LINE,
            max_read_file: MAX_READ_FILE,
        }
    }

    /// A client on a stream that already reached the agent (after the hybrid vsock
    /// handshake, or any other transport to it).
    pub fn from_stream(stream: UnixStream) -> Result<Self, AgentError> {
        let writer = stream.try_clone()?;
        Ok(AgentClient::new(BufReader::new(stream), writer))
    }

    /// Longest response line accepted (default [`MAX_RESPONSE_LINE`]).
    pub fn set_max_response_line(&mut self, bytes: u64) {
        self.max_line = bytes;
    }

    /// Most bytes [`AgentClient::read_file`] collects (default [`MAX_READ_FILE`]).
    pub fn set_max_read_file(&mut self, bytes: u64) {
        self.max_read_file = bytes;
    }

    /// Time limit of each call (None: wait forever). `exec` with its own timeout waits at
    /// least that long plus 30 s.
    pub fn set_call_timeout(&mut self, t: Option<Duration>) {
        self.call_timeout = t;
    }

    /// Send one request and wait for its response; returns the `ok` value.
    pub fn call(&mut self, op: &str, args: Value) -> Result<Value, AgentError> {
        self.call_until(op, args, self.call_timeout)
    }

    fn call_until<T: DeserializeOwned>(
        &mut self,
        op: &str,
        args: Value,
        limit: Option<Duration>,
    ) -> Result<T, AgentError> {
        let id = self.next_id;
        self.next_id += 1;
        // A limit too large for Instant means no limit.
        let deadline = limit.and_then(|t| Some((Instant::now().checked_add(t)?, t)));
        let mut line = serde_json::to_vec(&json!({"id": id, "op": op, "args": args}))
            .map_err(|e| AgentError::Protocol(format!("cannot encode {op} request: {e}")))?;
        line.push(b'\n');
        let timeout = |what: &str, after: Duration| AgentError::Timeout {
            what: format!("{what} (op {op}, id {id})"),
            after,
        };
        if let Some((at, t)) = deadline {
            let left = at.saturating_duration_since(Instant::now());
            self.writer
                .set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
            if let Err(e) = NoSigpipe(&self.writer).write_all(&line) {
                return Err(match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        timeout("sending the request", t)
                    }
                    _ => e.into(),
                });
            }
        } else {
            self.writer.set_write_timeout(None)?;
            NoSigpipe(&self.writer).write_all(&line)?;
        }
        loop {
            let resp = match self.read_line(deadline) {
                Ok(l) => l,
                Err(None) => {
                    let t = deadline.map(|d| d.1).unwrap_or_default();
                    return Err(timeout("waiting for the response", t));
                }
                Err(Some(e)) => return Err(e),
            };
            let not_json = |e: serde_json::Error| {
                AgentError::Protocol(format!(
                    "response to {op} (id {id}) is not a response ({e}): {:?}",
                    String::from_utf8_lossy(&resp[..resp.len().min(200)])
                ))
            };
            let head: ResponseHead = serde_json::from_slice(&resp).map_err(not_json)?;
            match head.id {
                Some(n) if n == id => {}
                // A late response to an earlier call that timed out: skip it.
                Some(n) if n < id => continue,
                // The agent could not read our request's id (never for requests we build).
                None if head.error.is_some() => {}
                other => {
                    return Err(AgentError::Protocol(format!(
                        "response id {other:?} does not match request id {id} (op {op})"
                    )))
                }
            }
            if head.ok {
                let r: ResponseOk<T> = serde_json::from_slice(&resp)
                    .map_err(|e| AgentError::Protocol(format!("unexpected {op} result: {e}")))?;
                return Ok(r.ok);
            }
            if let Some(e) = head.error {
                return Err(AgentError::Remote {
                    op: op.to_string(),
                    kind: e.kind.unwrap_or_else(|| "unknown".into()),
                    message: e.message.unwrap_or_default(),
                    errno: e.errno.and_then(|n| i32::try_from(n).ok()),
                });
            }
            return Err(AgentError::Protocol(format!(
                "response to {op} (id {id}) has neither \"ok\" nor \"error\""
            )));
        }
    }

    /// Read one response line. Err(None) = timed out (a partial line is kept for later).
    fn read_line(
        &mut self,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<Vec<u8>, Option<AgentError>> {
        loop {
            let left = match deadline {
                Some((at, _)) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(None);
                    }
                    Some(left)
                }
                None => None,
            };
            self.reader
                .get_ref()
                .set_read_timeout(left)
                .map_err(|e| Some(e.into()))?;
            let room = self.max_line.saturating_sub(self.partial.len() as u64);
            match (&mut self.reader)
                .take(room)
                .read_until(b'\n', &mut self.partial)
            {
                Ok(_) if self.partial.last() == Some(&b'\n') => {
                    let mut line = std::mem::take(&mut self.partial);
                    line.pop();
                    return Ok(line);
                }
                Ok(_) if self.partial.len() as u64 >= self.max_line => {
                    // Drop what was read; the rest of the line is still in the stream, so
                    // this connection cannot be used any more.
                    self.partial = Vec::new();
                    return Err(Some(AgentError::ResponseTooLong {
                        limit: self.max_line,
                    }));
                }
                Ok(_) => {
                    return Err(Some(AgentError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the guest agent closed the connection",
                    ))))
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Some(e.into())),
            }
        }
    }

    fn call_as<T: DeserializeOwned>(&mut self, op: &str, args: Value) -> Result<T, AgentError> {
        self.call_until(op, args, self.call_timeout)
    }

    /// Check the agent answers; returns its version.
    pub fn ping(&mut self) -> Result<String, AgentError> {
        #[derive(Deserialize)]
        struct Pong {
            version: String,
        }
        Ok(self.call_as::<Pong>("ping", json!({}))?.version)
    }

    /// Run `argv` (stdin `/dev/null`, no time limit in the guest) and capture its output.
    pub fn exec<S: AsRef<str>>(&mut self, argv: &[S]) -> Result<ExecResult, AgentError> {
        self.exec_with(&ExecRequest::new(argv))
    }

    /// Run a command described by `req`.
    pub fn exec_with(&mut self, req: &ExecRequest) -> Result<ExecResult, AgentError> {
        #[derive(Deserialize)]
        struct Raw {
            exit_code: Option<i32>,
            signal: Option<i32>,
            timed_out: bool,
            stdout: String,
            stderr: String,
            stdout_b64: Option<String>,
            stderr_b64: Option<String>,
            #[serde(default)]
            stdout_truncated: bool,
            #[serde(default)]
            stderr_truncated: bool,
            #[serde(default)]
            duration_ms: u64,
        }
        let limit = match (self.call_timeout, req.timeout) {
            (Some(c), Some(t)) => Some(c.max(t.saturating_add(Duration::from_secs(30)))),
            (c, _) => c,
        };
        let r: Raw = self.call_until("exec", req.to_args(), limit)?;
        let bytes = |text: String, b64: Option<String>| match b64 {
            Some(b) => b64::decode(&b)
                .map_err(|e| AgentError::Protocol(format!("exec output: bad base64: {e}"))),
            None => Ok(text.into_bytes()),
        };
        Ok(ExecResult {
            exit_code: r.exit_code,
            signal: r.signal,
            timed_out: r.timed_out,
            stdout: bytes(r.stdout, r.stdout_b64)?,
            stderr: bytes(r.stderr, r.stderr_b64)?,
            stdout_truncated: r.stdout_truncated,
            stderr_truncated: r.stderr_truncated,
            duration_ms: r.duration_ms,
        })
    }

    /// Read `len` bytes at `offset` (None: to end of file; at most 16 MiB per call).
    pub fn read_file_range(
        &mut self,
        path: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<FileChunk, AgentError> {
        #[derive(Deserialize)]
        struct Raw {
            data_b64: String,
            sha256: String,
            len: usize,
            size: u64,
            eof: bool,
        }
        let mut args = json!({"path": path, "offset": offset});
        if let Some(len) = len {
            args["len"] = len.into();
        }
        let r: Raw = self.call_as("read_file", args)?;
        if let Some(len) = len {
            // Base64 of `len` bytes; anything longer is more than was asked for. (`len` is the
            // caller's: any u64, so no arithmetic here may overflow.)
            let max_b64 = len.div_ceil(3).saturating_mul(4);
            if r.data_b64.len() as u64 > max_b64 || r.len as u64 > len {
                return Err(AgentError::Protocol(format!(
                    "read_file {path}: asked for at most {len} bytes, got {}",
                    r.len.max(r.data_b64.len() / 4 * 3)
                )));
            }
        }
        let data = b64::decode(&r.data_b64)
            .map_err(|e| AgentError::Protocol(format!("read_file {path}: bad base64: {e}")))?;
        if data.len() != r.len {
            return Err(AgentError::Protocol(format!(
                "read_file {path}: {} bytes decoded, agent said {}",
                data.len(),
                r.len
            )));
        }
        Ok(FileChunk {
            data,
            sha256: r.sha256,
            size: r.size,
            eof: r.eof,
        })
    }

    /// Read a whole file (in [`CHUNK`]-sized requests), at most the client's read limit
    /// ([`MAX_READ_FILE`] by default; [`AgentError::TooLarge`] beyond it, whatever the guest
    /// says about `eof` or the file's size).
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>, AgentError> {
        let limit = self.max_read_file;
        let too_large = || AgentError::TooLarge {
            path: path.to_string(),
            limit,
        };
        let mut out = Vec::new();
        loop {
            let left = limit - out.len() as u64;
            // One byte more than allowed tells "exactly at the limit" from "beyond it".
            let ask = left.saturating_add(1).min(CHUNK as u64);
            let c = self.read_file_range(path, out.len() as u64, Some(ask))?;
            if c.size > limit {
                return Err(too_large());
            }
            if c.data.len() as u64 > left {
                return Err(too_large());
            }
            out.extend_from_slice(&c.data);
            if c.eof || c.data.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Create or replace `path` with `data` (in [`CHUNK`]-sized requests); `mode` (e.g.
    /// `0o755`) is applied exactly when given, else new files get 0644 minus the umask.
    /// Returns the digest of the whole file as written.
    pub fn write_file(
        &mut self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<FileDigest, AgentError> {
        let mut chunks = data.chunks(CHUNK);
        let first = chunks.next().unwrap_or_default();
        let mut args = json!({"path": path, "data_b64": b64::encode(first)});
        if let Some(m) = mode {
            args["mode"] = m.into();
        }
        let digest: FileDigest = self.call_as("write_file", args)?;
        if data.len() <= CHUNK {
            return Ok(digest);
        }
        for c in chunks {
            self.append_file(path, c)?;
        }
        self.sha256_file(path)
    }

    /// Append `data` (at most 16 MiB) to `path`, creating it if needed. Returns the digest of
    /// the appended bytes and the new file size.
    pub fn append_file(&mut self, path: &str, data: &[u8]) -> Result<FileDigest, AgentError> {
        self.call_as(
            "write_file",
            json!({"path": path, "data_b64": b64::encode(data), "append": true}),
        )
    }

    /// SHA-256 of a whole guest file, computed in the guest.
    pub fn sha256_file(&mut self, path: &str) -> Result<FileDigest, AgentError> {
        self.call_as("sha256_file", json!({ "path": path }))
    }

    /// SHA-256 of `len` bytes at `offset` (None: to end of file).
    pub fn sha256_file_range(
        &mut self,
        path: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<FileDigest, AgentError> {
        let mut args = json!({"path": path, "offset": offset});
        if let Some(len) = len {
            args["len"] = len.into();
        }
        self.call_as("sha256_file", args)
    }

    /// sync(2) in the guest.
    pub fn sync(&mut self) -> Result<(), AgentError> {
        self.call("sync", json!({})).map(drop)
    }

    /// mount(2), creating `target` first. `flags` are names like `ro`, `nosuid`, `bind`;
    /// `options` is the file-system specific data string.
    pub fn mount(
        &mut self,
        source: &str,
        target: &str,
        fstype: &str,
        options: Option<&str>,
        flags: &[&str],
    ) -> Result<(), AgentError> {
        let mut args =
            json!({"source": source, "target": target, "fstype": fstype, "flags": flags});
        if let Some(o) = options {
            args["options"] = o.into();
        }
        self.call("mount", args).map(drop)
    }

    /// Online or offline guest CPU `cpu`; returns the new online set (e.g. `0-2`).
    pub fn online_cpu(&mut self, cpu: u32, online: bool) -> Result<String, AgentError> {
        #[derive(Deserialize)]
        struct R {
            online: String,
        }
        Ok(self
            .call_as::<R>("online_cpu", json!({"cpu": cpu, "online": online}))?
            .online)
    }

    /// Add hot-plugged memory at guest physical `addr` (`size` bytes, whole memory blocks)
    /// through the `probe` interface and online it as `online_movable`.
    pub fn probe_memory(&mut self, addr: u64, size: u64) -> Result<MemoryBlocks, AgentError> {
        self.call_as("probe_memory", json!({"addr": addr, "size": size}))
    }

    /// Offline the memory blocks of [addr, addr + size). Linux 6.12 cannot remove probed
    /// memory from user space: the blocks stay (offline) and a later
    /// [`probe_memory`](Self::probe_memory) of the same range onlines them again.
    pub fn offline_memory(&mut self, addr: u64, size: u64) -> Result<MemoryBlocks, AgentError> {
        self.call_as("offline_memory", json!({"addr": addr, "size": size}))
    }

    /// Set the guest's CLOCK_REALTIME.
    pub fn set_time(&mut self, unix_ns: u64) -> Result<(), AgentError> {
        self.call("set_time", json!({ "unix_ns": unix_ns }))
            .map(drop)
    }

    /// Set the guest's clock to the host's.
    pub fn set_time_now(&mut self) -> Result<(), AgentError> {
        let ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        self.set_time(ns)
    }

    /// Mix `data` into the guest's entropy pool and credit 8 bits per byte.
    pub fn add_entropy(&mut self, data: &[u8]) -> Result<(), AgentError> {
        self.call("add_entropy", json!({"data_b64": b64::encode(data)}))
            .map(drop)
    }

    /// Guest memory totals.
    pub fn meminfo(&mut self) -> Result<MemInfo, AgentError> {
        self.call_as("meminfo", json!({}))
    }

    /// Guest CPU sets.
    pub fn cpus(&mut self) -> Result<CpuSets, AgentError> {
        self.call_as("cpus", json!({}))
    }

    /// Ask the guest to stop: the agent answers, syncs and resets the machine (the VMM sees
    /// a clean stop). `reboot` is recorded for the log only: without ACPI, power-off would
    /// merely halt the CPUs, so both stop through a reset.
    pub fn shutdown(&mut self, reboot: bool) -> Result<(), AgentError> {
        self.call("shutdown", json!({ "reboot": reboot })).map(drop)
    }
}

/// Standard base64 with padding (the agent's encoding of binary data).
mod b64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
            let n = (b(0) << 16) | (b(1) << 8) | b(2);
            for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
                out.push(if i <= chunk.len() {
                    char::from(ALPHABET[((n >> shift) & 63) as usize])
                } else {
                    '='
                });
            }
        }
        out
    }

    fn value(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    }

    pub fn decode(text: &str) -> Result<Vec<u8>, String> {
        let bytes = text.as_bytes();
        let body = bytes
            .strip_suffix(b"==")
            .or_else(|| bytes.strip_suffix(b"="))
            .unwrap_or(bytes);
        if body.len() % 4 == 1 || (body.len() != bytes.len() && !bytes.len().is_multiple_of(4)) {
            return Err("invalid length".into());
        }
        let mut out = Vec::with_capacity(body.len() / 4 * 3 + 2);
        for chunk in body.chunks(4) {
            let mut n = 0u32;
            for (i, &c) in chunk.iter().enumerate() {
                let v = value(c).ok_or_else(|| format!("invalid character {:?}", char::from(c)))?;
                n |= v << (18 - 6 * i);
            }
            out.push((n >> 16) as u8);
            if chunk.len() > 2 {
                out.push((n >> 8) as u8);
            }
            if chunk.len() > 3 {
                out.push(n as u8);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::thread::JoinHandle;

    fn sock_path(name: &str) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "kestrel-agent-test-{}-{}-{name}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// A fake hybrid-vsock device + agent: `rejects` connections are closed right after
    /// CONNECT (guest not listening yet); the next one gets `OK` and then `reply(request)`
    /// for each request line (None: send nothing).
    fn fake_agent(
        path: &Path,
        rejects: usize,
        mut reply: impl FnMut(&Value) -> Option<String> + Send + 'static,
    ) -> JoinHandle<Vec<Value>> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for _ in 0..rejects {
                let (s, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                assert_eq!(line, "CONNECT 1024\n");
            }
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            w.write_all(b"OK 1073741824\n").unwrap();
            let mut seen = Vec::new();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return seen;
                }
                let v: Value = serde_json::from_str(&line).unwrap();
                if let Some(out) = reply(&v) {
                    w.write_all(out.as_bytes()).unwrap();
                }
                seen.push(v);
            }
        })
    }

    fn ok(req: &Value, result: Value) -> Option<String> {
        Some(format!("{}\n", json!({"id": req["id"], "ok": result})))
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn handshake_ping_and_ids() {
        let p = sock_path("ping");
        let fake = fake_agent(&p, 0, |r| ok(r, json!({"pong": true, "version": "9.9"})));
        let mut c = AgentClient::connect(&p, AGENT_PORT, T).unwrap();
        assert_eq!(c.ping().unwrap(), "9.9");
        assert_eq!(c.ping().unwrap(), "9.9");
        drop(c);
        let seen = fake.join().unwrap();
        assert_eq!(seen[0], json!({"id": 1, "op": "ping", "args": {}}));
        assert_eq!(seen[1]["id"], 2);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn connect_retries_until_the_guest_listens() {
        let p = sock_path("retry");
        // The socket appears late, and the first two connections are refused by the guest.
        let p2 = p.clone();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            fake_agent(&p2, 2, |r| ok(r, json!({"pong": true, "version": "1"})))
        });
        let mut c = AgentClient::connect(&p, AGENT_PORT, T).unwrap();
        assert_eq!(c.ping().unwrap(), "1");
        drop(c);
        late.join().unwrap().join().unwrap();
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn connect_times_out_without_a_socket() {
        let p = sock_path("none");
        let t0 = Instant::now();
        let e = AgentClient::connect(&p, AGENT_PORT, Duration::from_millis(200))
            .err()
            .unwrap();
        assert!(matches!(e, AgentError::Timeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn unexpected_handshake_reply_is_a_connect_error() {
        let p = sock_path("badhs");
        let listener = UnixListener::bind(&p).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            s.write_all(b"NOPE\n").unwrap();
        });
        let e = AgentClient::connect(&p, AGENT_PORT, T).err().unwrap();
        assert!(matches!(e, AgentError::Connect { .. }), "{e}");
        t.join().unwrap();
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn remote_errors_are_typed() {
        let p = sock_path("err");
        let fake = fake_agent(&p, 0, |r| {
            Some(format!(
                "{}\n",
                json!({"id": r["id"], "error": {"kind": "os", "message": "open /x: No such file", "errno": 2}})
            ))
        });
        let mut c = AgentClient::connect(&p, AGENT_PORT, T).unwrap();
        match c.read_file("/x").unwrap_err() {
            AgentError::Remote {
                op,
                kind,
                message,
                errno,
            } => {
                assert_eq!((op.as_str(), kind.as_str()), ("read_file", "os"));
                assert_eq!(errno, Some(2));
                assert!(message.contains("/x"));
            }
            e => panic!("{e}"),
        }
        drop(c);
        fake.join().unwrap();
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn malformed_and_mismatched_responses_are_protocol_errors() {
        let p = sock_path("bad");
        let mut n = 0;
        let fake = fake_agent(&p, 0, move |r| {
            n += 1;
            match n {
                1 => Some("{this is not json\n".into()),
                2 => Some(format!("{}\n", json!({"id": 999, "ok": {}}))),
                3 => Some(format!("{}\n", json!({"id": r["id"], "neither": 1}))),
                _ => ok(r, json!({"pong": "wrong type"})),
            }
        });
        let mut c = AgentClient::connect(&p, AGENT_PORT, T).unwrap();
        for _ in 0..4 {
            let e = c.ping().unwrap_err();
            assert!(matches!(e, AgentError::Protocol(_)), "{e}");
        }
        drop(c);
        fake.join().unwrap();
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn timeout_then_late_response_is_skipped() {
        let p = sock_path("late");
        let mut late_tail = None;
        let fake = fake_agent(&p, 0, move |r| {
            let resp = ok(r, json!({"pong": true, "version": r["id"].to_string()})).unwrap();
            match late_tail.take() {
                // First request: only part of its response line, then nothing.
                None => {
                    let (head, tail) = resp.split_at(5);
                    late_tail = Some(tail.to_string());
                    Some(head.to_string())
                }
                // Second: the rest of the first response, then the second response.
                Some(tail) => Some(format!("{tail}{resp}")),
            }
        });
        let mut c = AgentClient::connect(&p, AGENT_PORT, T).unwrap();
        c.set_call_timeout(Some(Duration::from_millis(100)));
        let e = c.ping().unwrap_err();
        assert!(matches!(e, AgentError::Timeout { .. }), "{e}");
        c.set_call_timeout(Some(T));
        assert_eq!(c.ping().unwrap(), "2");
        drop(c);
        fake.join().unwrap();
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn exec_decodes_binary_output() {
        let p = sock_path("exec");
        let fake = fake_agent(&p, 0, |r| {
            assert_eq!(r["args"]["argv"], json!(["sh", "-c", "x"]));
            assert_eq!(r["args"]["stdin_b64"], "aGk=");
            assert_eq!(r["args"]["timeout_ms"], 1500);
            ok(
                r,
                json!({"exit_code": 3, "signal": null, "timed_out": false, "duration_ms": 7,
                       "stdout": "\u{fffd}", "stdout_b64": "/w==", "stdout_truncated": false,
                       "stderr": "oops\n", "stderr_truncated": false}),
            )
        });
        let mut c = AgentClient::connect(&p, AGENT_PORT, T).unwrap();
        let req = ExecRequest::new(&["sh", "-c", "x"])
            .stdin("hi")
            .timeout(Duration::from_millis(1500));
        let r = c.exec_with(&req).unwrap();
        assert_eq!(r.exit_code, Some(3));
        assert!(!r.success());
        assert_eq!(r.stdout, vec![0xff]);
        assert_eq!(r.stderr_str(), "oops\n");
        drop(c);
        fake.join().unwrap();
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn base64_round_trip() {
        for n in 0..70usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + n) as u8).collect();
            let e = b64::encode(&data);
            assert_eq!(e.len() % 4, 0);
            assert_eq!(b64::decode(&e).unwrap(), data);
            assert_eq!(b64::decode(e.trim_end_matches('=')).unwrap(), data);
        }
        assert_eq!(b64::encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64::encode(b"fo"), "Zm8=");
        assert!(b64::decode("Zm9v!").is_err());
        assert!(b64::decode("Z").is_err());
        assert!(b64::decode("Zm8").is_ok());
        assert!(b64::decode("Zm8=Zm8=").is_err());
    }

    /// Against the real agent binary in its Unix-socket debug mode. Runs when
    /// `KESTREL_AGENT_TEST_BIN` names a built `kestrel-agent`, skips otherwise.
    #[test]
    fn real_agent_over_unix_socket() {
        let Some(bin) = std::env::var_os("KESTREL_AGENT_TEST_BIN") else {
            eprintln!("skipped: set KESTREL_AGENT_TEST_BIN to a built kestrel-agent");
            return;
        };
        let p = sock_path("real");
        let mut child = std::process::Command::new(bin)
            .env("KESTREL_AGENT_UNIX", &p)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let run = || -> Result<(), AgentError> {
            let mut c = AgentClient::connect(&p, AGENT_PORT, T)?;
            assert!(!c.ping()?.is_empty());
            let r = c.exec(&["sh", "-c", "echo out; echo err >&2; exit 7"])?;
            assert_eq!(
                (r.exit_code, r.stdout_str(), r.stderr_str()),
                (Some(7), "out\n".into(), "err\n".into())
            );
            let r = c.exec_with(
                &ExecRequest::new(&["sh", "-c", "cat; printf '\\377'"]).stdin(vec![0u8, 1, 2]),
            )?;
            assert_eq!(r.stdout, vec![0, 1, 2, 0xff]);
            let r = c.exec_with(
                &ExecRequest::new(&["sleep", "30"]).timeout(Duration::from_millis(200)),
            )?;
            assert!(r.timed_out && r.signal == Some(9), "{r:?}");

            let dir =
                std::env::temp_dir().join(format!("kestrel-agent-real-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let f = dir.join("data").to_string_lossy().into_owned();
            // Larger than one chunk, not a multiple of 3 or of the chunk size.
            let data: Vec<u8> = (0..CHUNK + 12_345).map(|i| (i * 7 % 251) as u8).collect();
            let d = c.write_file(&f, &data, Some(0o600))?;
            assert_eq!(d.size, data.len() as u64);
            assert_eq!(std::fs::read(&f).unwrap(), data);
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
                0o600
            );
            assert_eq!(c.read_file(&f)?, data);
            assert_eq!(c.sha256_file(&f)?, d);
            let whole = c.sha256_file_range(&f, 0, None)?;
            assert_eq!(whole.sha256, d.sha256);
            let part = c.read_file_range(&f, 10, Some(5))?;
            assert_eq!((part.data.as_slice(), part.eof), (&data[10..15], false));
            assert_eq!(c.sha256_file_range(&f, 10, Some(5))?.sha256, part.sha256);
            let e = c.read_file(&format!("{f}.missing")).unwrap_err();
            assert!(
                matches!(e, AgentError::Remote { ref kind, errno: Some(2), .. } if kind == "os"),
                "{e}"
            );
            let e = c.call("no_such_op", json!({})).unwrap_err();
            assert!(
                matches!(e, AgentError::Remote { ref kind, .. } if kind == "unsupported"),
                "{e}"
            );
            assert!(c.meminfo()?.mem_total_kb > 0);
            assert!(!c.cpus()?.online.is_empty());
            c.sync()?;
            std::fs::remove_dir_all(&dir).unwrap();
            c.shutdown(false)?; // debug mode: the agent process exits
            Ok(())
        };
        let result = run();
        if result.is_err() {
            let _ = child.kill();
        }
        let status = child.wait().unwrap();
        let _ = std::fs::remove_file(&p);
        result.unwrap();
        assert!(status.success());
    }
}

#[cfg(test)]
mod hostile_agent_tests {
    //! A hostile agent on the other end of a `UnixStream` pair: the client's memory and time
    //! stay bounded whatever it sends.
    use super::*;
    use std::thread::JoinHandle;

    /// Runs `serve(request, writer)` for each request line the client sends.
    fn hostile(
        mut serve: impl FnMut(&Value, &mut UnixStream) -> io::Result<()> + Send + 'static,
    ) -> (AgentClient, JoinHandle<usize>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut r = BufReader::new(theirs.try_clone().unwrap());
            let mut w = theirs;
            let mut n = 0;
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let v: Value = serde_json::from_str(&line).unwrap();
                line.clear();
                n += 1;
                if serve(&v, &mut w).is_err() {
                    break;
                }
            }
            n
        });
        let mut c = AgentClient::from_stream(ours).unwrap();
        c.set_call_timeout(Some(Duration::from_secs(20)));
        (c, t)
    }

    #[test]
    fn read_file_range_takes_any_length() {
        let (mut c, t) = hostile(|req, w| {
            writeln!(
                w,
                "{{\"id\": {}, \"ok\": {{\"data_b64\": \"aGVsbG8=\", \"sha256\": \"\", \"len\": 5, \"size\": 5, \"eof\": true}}}}",
                req["id"]
            )
        });
        for len in [u64::MAX, u64::MAX - 1, u64::MAX / 3 * 2, 5] {
            let chunk = c.read_file_range("/f", u64::MAX, Some(len)).unwrap();
            assert_eq!(chunk.data, b"hello");
        }
        assert!(matches!(
            c.read_file_range("/f", 0, Some(4)),
            Err(AgentError::Protocol(_))
        ));
        drop(c);
        assert_eq!(t.join().unwrap(), 5);
    }

    #[test]
    fn endless_response_line_is_cut_at_the_limit() {
        let (mut c, t) = hostile(|req, w| {
            write!(w, "{{\"id\": {}, \"ok\": {{\"version\": \"", req["id"])?;
            let junk = vec![b'a'; 64 << 10];
            loop {
                w.write_all(&junk)?; // ends when the client hangs up
            }
        });
        c.set_max_response_line(1 << 20);
        match c.ping() {
            Err(AgentError::ResponseTooLong { limit }) => assert_eq!(limit, 1 << 20),
            other => panic!("expected ResponseTooLong, got {other:?}"),
        }
        assert!(c.partial.capacity() <= 1 << 20, "nothing kept");
        drop(c);
        assert_eq!(t.join().unwrap(), 1);
    }

    #[test]
    fn default_line_limit_is_documented_value() {
        let (c, _t) = hostile(|_, _| Ok(()));
        assert_eq!(c.max_line, MAX_RESPONSE_LINE);
        assert_eq!(c.max_read_file, MAX_READ_FILE);
    }

    /// Answers every `read_file` with the bytes asked for and `eof: false`, forever.
    fn endless_file(req: &Value, w: &mut UnixStream) -> io::Result<()> {
        let len = req["args"]["len"].as_u64().unwrap_or(4096) as usize;
        let data = vec![7u8; len];
        let resp = json!({"id": req["id"], "ok": {
            "data_b64": b64::encode(&data), "sha256": "", "len": len, "size": 0, "eof": false}});
        writeln!(w, "{resp}")
    }

    #[test]
    fn endless_eof_false_stops_at_the_read_limit() {
        let (mut c, t) = hostile(endless_file);
        c.set_max_read_file(9 << 20);
        match c.read_file("/dev/zero") {
            Err(AgentError::TooLarge { path, limit }) => {
                assert_eq!((path.as_str(), limit), ("/dev/zero", 9 << 20));
            }
            other => panic!("expected TooLarge, got {:?}", other.map(|v| v.len())),
        }
        drop(c);
        // 4 MiB + 4 MiB, then the last 1 MiB and the one byte beyond it: three requests.
        assert_eq!(t.join().unwrap(), 3);
    }

    #[test]
    fn file_of_exactly_the_limit_is_read() {
        let limit = 10_000u64;
        let (mut c, t) = hostile(move |req, w| {
            let off = req["args"]["offset"].as_u64().unwrap();
            let len = req["args"]["len"].as_u64().unwrap();
            let n = len.min(limit - off) as usize;
            let resp = json!({"id": req["id"], "ok": {
                "data_b64": b64::encode(&vec![1u8; n]), "sha256": "", "len": n,
                "size": limit, "eof": off + n as u64 == limit}});
            writeln!(w, "{resp}")
        });
        c.set_max_read_file(limit);
        assert_eq!(c.read_file("/f").unwrap().len() as u64, limit);
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn chunk_larger_than_asked_or_lying_size_refused() {
        let (mut c, t) = hostile(|req, w| {
            let len = req["args"]["len"].as_u64().unwrap() as usize + 100;
            let resp = json!({"id": req["id"], "ok": {
                "data_b64": b64::encode(&vec![0u8; len]), "sha256": "", "len": len,
                "size": len, "eof": true}});
            writeln!(w, "{resp}")
        });
        let e = c.read_file_range("/f", 0, Some(10)).unwrap_err();
        assert!(matches!(e, AgentError::Protocol(_)), "{e}");
        drop(c);
        t.join().unwrap();
        let (mut c, t) = hostile(|req, w| {
            let resp = json!({"id": req["id"], "ok": {
                "data_b64": "", "sha256": "", "len": 0, "size": u64::MAX, "eof": false}});
            writeln!(w, "{resp}")
        });
        assert!(matches!(
            c.read_file("/f"),
            Err(AgentError::TooLarge { .. })
        ));
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn wrongly_typed_payloads_are_protocol_errors_not_panics() {
        let (mut c, t) = hostile(|req, w| {
            let resp = match req["op"].as_str() {
                Some("ping") => json!({"id": req["id"], "ok": [1, 2, 3]}),
                _ => json!({"id": req["id"], "error": {"kind": 5}}),
            };
            writeln!(w, "{resp}")
        });
        assert!(matches!(c.ping(), Err(AgentError::Protocol(_))));
        assert!(matches!(c.sync(), Err(AgentError::Protocol(_))));
        drop(c);
        t.join().unwrap();
    }
}
