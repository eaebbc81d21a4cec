//! Host-side client of the Kestrel guest agent (`resources/agent`).
//!
//! The agent listens on AF_VSOCK port [`AGENT_PORT`] in the guest. The host reaches it through
//! the VM's hybrid vsock device (Firecracker's scheme): connect to the device's Unix socket
//! (`uds_path`), write `CONNECT <port>\n`, read `OK <host port>\n`; from then on the Unix
//! socket is a byte stream to the guest's listener. On top of it, one JSON request per line,
//! one JSON response per line, in order (`docs/agent-protocol.md`), as typed by
//! [`kestrel_agent_proto`].
//!
//! ```no_run
//! use std::{path::Path, time::Duration};
//! use kestrel_sandbox::agent::{AgentClient, AGENT_PORT};
//!
//! let mut agent = AgentClient::connect(Path::new("/run/vm0/vsock.sock"), AGENT_PORT,
//!                                      Duration::from_secs(300))?;
//! let r = agent.exec(&["uname", "-r"])?;
//! println!("{} (exit {:?})", r.stdout_str(), r.exit_code);
//! agent.write_file("/tmp/hello", b"hello\n", Some(0o644))?;
//! assert_eq!(agent.read_file("/tmp/hello")?, b"hello\n");
//! # Ok::<(), kestrel_sandbox::agent::AgentError>(())
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kestrel_agent_proto::{
    self as proto, b64, encode_raw_request, encode_request, ErrorBody, OkPayload, Op, ResponseHead,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use thiserror::Error;

pub use kestrel_agent_proto::{CpuSets, FileDigest, MemInfo, AGENT_PORT};

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

impl AgentError {
    /// The agent's error for `op`.
    fn remote(op: &str, e: ErrorBody) -> Self {
        AgentError::Remote {
            op: op.to_string(),
            kind: e.kind,
            message: e.message,
            errno: e.errno.and_then(|n| i32::try_from(n).ok()),
        }
    }
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

    /// The `exec` op's arguments (stdin as base64).
    fn to_op(&self) -> proto::Exec {
        proto::Exec {
            argv: self.argv.clone(),
            stdin: None,
            stdin_b64: self.stdin.as_deref().map(b64::encode),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            timeout_ms: self
                .timeout
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        }
    }
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBlocks {
    /// Linux memory block numbers (`/sys/devices/system/memory/memoryN`).
    pub blocks: Vec<u64>,
    /// Memory block size in bytes.
    pub block_size: u64,
    /// `MemTotal` afterwards.
    pub mem_total_kb: u64,
}

impl From<proto::ProbedMemory> for MemoryBlocks {
    fn from(m: proto::ProbedMemory) -> Self {
        MemoryBlocks {
            blocks: m.blocks,
            block_size: m.block_size,
            mem_total_kb: m.mem_total_kb,
        }
    }
}

impl From<proto::OfflinedMemory> for MemoryBlocks {
    fn from(m: proto::OfflinedMemory) -> Self {
        MemoryBlocks {
            blocks: m.blocks,
            block_size: m.block_size,
            mem_total_kb: m.mem_total_kb,
        }
    }
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

    /// Send `args` (any op, e.g. [`proto::StreamSink`]) and wait for its typed result. The ops
    /// without a method of their own (the stream and benchmark ops) are called this way.
    pub fn request<A: Op>(&mut self, args: A) -> Result<A::Output, AgentError> {
        self.request_until(args, self.call_timeout)
    }

    fn request_until<A: Op>(
        &mut self,
        args: A,
        limit: Option<Duration>,
    ) -> Result<A::Output, AgentError> {
        let request = args.into();
        self.round_trip(A::NAME, |id| encode_request(id, &request), limit)
    }

    /// Send op `op` with untyped `args` and return the raw `ok` value. For tests that send
    /// what the agent must refuse (unknown ops, malformed arguments) and for callers that
    /// want the JSON itself; everything else uses the typed methods or [`Self::request`].
    pub fn call(&mut self, op: &str, args: Value) -> Result<Value, AgentError> {
        self.round_trip(
            op,
            |id| encode_raw_request(id, op, &args),
            self.call_timeout,
        )
    }

    /// One call: write the line `encode` makes for the next id, then read its response.
    fn round_trip<T: DeserializeOwned>(
        &mut self,
        op: &str,
        encode: impl FnOnce(u64) -> serde_json::Result<Vec<u8>>,
        limit: Option<Duration>,
    ) -> Result<T, AgentError> {
        let id = self.next_id;
        self.next_id += 1;
        // A limit too large for Instant means no limit.
        let deadline = limit.and_then(|t| Some((Instant::now().checked_add(t)?, t)));
        let mut line = encode(id)
            .map_err(|e| AgentError::Protocol(format!("cannot encode {op} request: {e}")))?;
        line.push(b'\n');
        let call = Call { op, id, deadline };
        self.send(&line, &call)?;
        self.receive(&call)
    }

    fn send(&mut self, line: &[u8], call: &Call) -> Result<(), AgentError> {
        let Some((at, t)) = call.deadline else {
            self.writer.set_write_timeout(None)?;
            return Ok(NoSigpipe(&self.writer).write_all(line)?);
        };
        let left = at.saturating_duration_since(Instant::now());
        self.writer
            .set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
        NoSigpipe(&self.writer)
            .write_all(line)
            .map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    call.timeout("sending the request", t)
                }
                _ => e.into(),
            })
    }

    /// Read lines until the response to `call` (skipping late responses to earlier calls
    /// that timed out) and return its result.
    fn receive<T: DeserializeOwned>(&mut self, call: &Call) -> Result<T, AgentError> {
        let (op, id) = (call.op, call.id);
        loop {
            let resp = match self.read_line(call.deadline) {
                Ok(l) => l,
                Err(None) => {
                    let t = call.deadline.map(|d| d.1).unwrap_or_default();
                    return Err(call.timeout("waiting for the response", t));
                }
                Err(Some(e)) => return Err(e),
            };
            let head: ResponseHead = serde_json::from_slice(&resp).map_err(|e| {
                AgentError::Protocol(format!(
                    "response to {op} (id {id}) is not a response ({e}): {:?}",
                    String::from_utf8_lossy(&resp[..resp.len().min(200)])
                ))
            })?;
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
                let r: OkPayload<T> = serde_json::from_slice(&resp)
                    .map_err(|e| AgentError::Protocol(format!("unexpected {op} result: {e}")))?;
                return Ok(r.ok);
            }
            return Err(match head.error {
                Some(e) => AgentError::remote(op, e),
                None => AgentError::Protocol(format!(
                    "response to {op} (id {id}) has neither \"ok\" nor \"error\""
                )),
            });
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

    /// Check the agent answers; returns its version.
    pub fn ping(&mut self) -> Result<String, AgentError> {
        Ok(self.request(proto::Ping {})?.version)
    }

    /// Run `argv` (stdin `/dev/null`, no time limit in the guest) and capture its output.
    pub fn exec<S: AsRef<str>>(&mut self, argv: &[S]) -> Result<ExecResult, AgentError> {
        self.exec_with(&ExecRequest::new(argv))
    }

    /// Run a command described by `req`.
    pub fn exec_with(&mut self, req: &ExecRequest) -> Result<ExecResult, AgentError> {
        let limit = match (self.call_timeout, req.timeout) {
            (Some(c), Some(t)) => Some(c.max(t.saturating_add(Duration::from_secs(30)))),
            (c, _) => c,
        };
        let r = self.request_until(req.to_op(), limit)?;
        let bytes = |text: String, b64: Option<String>| match b64 {
            Some(b) => {
                b64::decode(&b).map_err(|e| AgentError::Protocol(format!("exec output: {e}")))
            }
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
        let r = self.request(proto::ReadFile {
            path: path.to_string(),
            offset,
            len,
        })?;
        let too_long = |got: u64| {
            AgentError::Protocol(format!(
                "read_file {path}: asked for at most {} bytes, got {got}",
                len.unwrap_or_default()
            ))
        };
        let b64_len = len_u64(r.data_b64.len());
        if let Some(len) = len {
            // Base64 of `len` bytes; anything longer is more than was asked for. (`len` is the
            // caller's: any u64, so no arithmetic here may overflow.)
            if b64_len > len.div_ceil(3).saturating_mul(4) || r.len > len {
                return Err(too_long(r.len.max(b64_len / 4 * 3)));
            }
        }
        let data = b64::decode(&r.data_b64)
            .map_err(|e| AgentError::Protocol(format!("read_file {path}: {e}")))?;
        if len_u64(data.len()) != r.len {
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
            let left = limit - len_u64(out.len());
            // One byte more than allowed tells "exactly at the limit" from "beyond it".
            let ask = left.saturating_add(1).min(CHUNK_U64);
            let c = self.read_file_range(path, len_u64(out.len()), Some(ask))?;
            if c.size > limit || len_u64(c.data.len()) > left {
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
        let digest = self.request(proto::WriteFile {
            path: path.to_string(),
            data_b64: b64::encode(first),
            mode: mode.map(proto::FileMode::Bits),
            append: false,
        })?;
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
        self.request(proto::WriteFile {
            path: path.to_string(),
            data_b64: b64::encode(data),
            mode: None,
            append: true,
        })
    }

    /// SHA-256 of a whole guest file, computed in the guest.
    pub fn sha256_file(&mut self, path: &str) -> Result<FileDigest, AgentError> {
        self.sha256_file_range(path, 0, None)
    }

    /// SHA-256 of `len` bytes at `offset` (None: to end of file).
    pub fn sha256_file_range(
        &mut self,
        path: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<FileDigest, AgentError> {
        self.request(proto::Sha256File {
            path: path.to_string(),
            offset,
            len,
        })
    }

    /// sync(2) in the guest.
    pub fn sync(&mut self) -> Result<(), AgentError> {
        self.request(proto::SyncCaches {}).map(drop)
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
        self.request(proto::Mount {
            source: source.to_string(),
            target: target.to_string(),
            fstype: fstype.to_string(),
            options: options.map(str::to_string),
            flags: flags.iter().map(|f| f.to_string()).collect(),
        })
        .map(drop)
    }

    /// Online or offline guest CPU `cpu`; returns the new online set (e.g. `0-2`).
    pub fn online_cpu(&mut self, cpu: u32, online: bool) -> Result<String, AgentError> {
        Ok(self.request(proto::OnlineCpu { cpu, online })?.online)
    }

    /// Add hot-plugged memory at guest physical `addr` (`size` bytes, whole memory blocks)
    /// through the `probe` interface and online it as `online_movable`.
    pub fn probe_memory(&mut self, addr: u64, size: u64) -> Result<MemoryBlocks, AgentError> {
        let args = proto::ProbeMemory {
            addr,
            size,
            online_type: None,
        };
        Ok(self.request(args)?.into())
    }

    /// Offline the memory blocks of [addr, addr + size). Linux 6.12 cannot remove probed
    /// memory from user space: the blocks stay (offline) and a later
    /// [`probe_memory`](Self::probe_memory) of the same range onlines them again.
    pub fn offline_memory(&mut self, addr: u64, size: u64) -> Result<MemoryBlocks, AgentError> {
        Ok(self.request(proto::OfflineMemory { addr, size })?.into())
    }

    /// Set the guest's CLOCK_REALTIME.
    pub fn set_time(&mut self, unix_ns: u64) -> Result<(), AgentError> {
        self.request(proto::SetTime { unix_ns }).map(drop)
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
        let args = proto::AddEntropy {
            data_b64: b64::encode(data),
            credit_bits: None,
        };
        self.request(args).map(drop)
    }

    /// The guest's wall clock (CLOCK_REALTIME), nanoseconds since the Unix epoch.
    pub fn get_time(&mut self) -> Result<u64, AgentError> {
        self.request(proto::GetTime {}).map(|t| t.unix_ns)
    }

    /// Guest memory totals.
    pub fn meminfo(&mut self) -> Result<MemInfo, AgentError> {
        self.request(proto::Meminfo {})
    }

    /// Guest CPU sets.
    pub fn cpus(&mut self) -> Result<CpuSets, AgentError> {
        self.request(proto::Cpus {})
    }

    /// Ask the guest to stop: the agent answers, syncs and resets the machine (the VMM sees
    /// a clean stop). `reboot` is recorded for the log only: without ACPI, power-off would
    /// merely halt the CPUs, so both stop through a reset.
    pub fn shutdown(&mut self, reboot: bool) -> Result<(), AgentError> {
        self.request(proto::Shutdown { reboot }).map(drop)
    }
}

/// The call in flight: what a timeout or protocol error names.
struct Call<'a> {
    op: &'a str,
    id: u64,
    /// When it times out, and the limit it was given.
    deadline: Option<(Instant, Duration)>,
}

impl Call<'_> {
    fn timeout(&self, what: &str, after: Duration) -> AgentError {
        AgentError::Timeout {
            what: format!("{what} (op {}, id {})", self.op, self.id),
            after,
        }
    }
}

/// [`CHUNK`] as a byte count of the protocol.
const CHUNK_U64: u64 = CHUNK as u64;

/// A length in memory as a protocol byte count (usize is at most 64 bits on every target
/// Kestrel builds for).
fn len_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod hostile_tests;
