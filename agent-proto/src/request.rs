//! Requests: `{"id": <u64>, "op": "<name>", "args": {...}}`, one struct of arguments per op.
//!
//! Arguments refuse unknown fields (a typo is a `bad_request`, not a silently ignored
//! option); `args` absent or `null` means `{}`. Optional arguments the client leaves out are
//! not written at all.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::response::{
    AllocTouchStats, CpuOnline, CpuSets, Empty, Entropy, ExecOutput, FileData, FileDigest,
    GuestTime, IoBenchStats, MemInfo, MetaBenchStats, OfflinedMemory, Pong, ProbedMemory,
    StreamStats,
};

/// An op's arguments: its name on the wire and the type the agent answers with in `ok`.
pub trait Op: Into<Request> + Serialize {
    /// The op's name (`"read_file"`, ...).
    const NAME: &'static str;
    /// The result the agent sends in `ok`.
    type Output: Serialize + DeserializeOwned;
}

/// Writes each op once: the [`Request`] variant, its wire name, its [`Op`] impl (arguments →
/// result type) and the agent's decoding of `(op, args)`.
macro_rules! ops {
    ($($(#[$doc:meta])* $name:literal => $op:ident -> $out:ty;)*) => {
        /// A request to the agent: the op and its arguments (`"op"` and `"args"` on the wire).
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(tag = "op", content = "args")]
        pub enum Request {
            $($(#[$doc])* #[serde(rename = $name)] $op($op),)*
        }

        impl Request {
            /// Every op the agent serves, by name.
            pub const OPS: &'static [&'static str] = &[$($name),*];

            /// This request's op name.
            pub fn op(&self) -> &'static str {
                match self {
                    $(Request::$op(_) => $name,)*
                }
            }

            /// The request for op `op` with arguments `args` (absent or `null`: `{}`).
            ///
            /// # Errors
            /// [`RequestError::UnknownOp`] for an op the agent does not serve,
            /// [`RequestError::Args`] for arguments that do not fit the op.
            pub fn from_parts(op: &str, args: Value) -> Result<Request, RequestError> {
                let args = if args.is_null() { Value::Object(Map::new()) } else { args };
                match op {
                    $($name => decode_args(op, args).map(Request::$op),)*
                    _ => Err(RequestError::UnknownOp(op.to_string())),
                }
            }
        }

        $(
            impl Op for $op {
                const NAME: &'static str = $name;
                type Output = $out;
            }

            impl From<$op> for Request {
                fn from(args: $op) -> Request {
                    Request::$op(args)
                }
            }
        )*
    };
}

ops! {
    /// Is the agent there? Answers its version.
    "ping" => Ping -> Pong;
    /// Run a command and capture its output.
    "exec" => Exec -> ExecOutput;
    /// Read (a range of) a file.
    "read_file" => ReadFile -> FileData;
    /// Create, replace or append to a file.
    "write_file" => WriteFile -> FileDigest;
    /// SHA-256 of (a range of) a file, computed in the guest.
    "sha256_file" => Sha256File -> FileDigest;
    /// `sync(2)`.
    "sync" => SyncCaches -> Empty;
    /// `mount(2)`, creating the target first.
    "mount" => Mount -> Empty;
    /// Accept one vsock (or TCP) connection and hash what it sends.
    "stream_sink" => StreamSink -> StreamStats;
    /// Connect to the host and send the [`XorShift`](crate::XorShift) stream.
    "stream_source" => StreamSource -> StreamStats;
    /// Timed O_DIRECT reads or writes on a file or block device.
    "io_bench" => IoBench -> IoBenchStats;
    /// Timed create + stat + unlink rounds in a directory.
    "meta_bench" => MetaBench -> MetaBenchStats;
    /// Map, write and check anonymous memory.
    "alloc_touch" => AllocTouch -> AllocTouchStats;
    /// Online or offline a guest CPU.
    "online_cpu" => OnlineCpu -> CpuOnline;
    /// Probe and online hot-plugged memory.
    "probe_memory" => ProbeMemory -> ProbedMemory;
    /// Offline memory blocks.
    "offline_memory" => OfflineMemory -> OfflinedMemory;
    /// Set CLOCK_REALTIME.
    "set_time" => SetTime -> Empty;
    /// Read CLOCK_REALTIME (no process is started).
    "get_time" => GetTime -> GuestTime;
    /// Add entropy to the kernel's pool.
    "add_entropy" => AddEntropy -> Entropy;
    /// `/proc/meminfo` totals.
    "meminfo" => Meminfo -> MemInfo;
    /// The guest's CPU sets.
    "cpus" => Cpus -> CpuSets;
    /// Stop the machine (after the response).
    "shutdown" => Shutdown -> Empty;
}

fn decode_args<T: DeserializeOwned>(op: &str, args: Value) -> Result<T, RequestError> {
    serde_json::from_value(args).map_err(|e| RequestError::Args {
        op: op.to_string(),
        message: e.to_string(),
    })
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `ping`: no arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ping {}

/// `exec`: a command, its input and environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// Program (looked up in the guest's `PATH`) and arguments; must not be empty.
    pub argv: Vec<String>,
    /// Text fed to stdin (at most one of `stdin` and `stdin_b64`; neither: `/dev/null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Bytes fed to stdin, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_b64: Option<String>,
    /// Variables added to (or replacing in) the agent's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the agent's, `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Kill the command's process group after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `read_file`: at most 16 MiB of a file from `offset`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadFile {
    /// The guest file.
    pub path: String,
    /// First byte to read.
    #[serde(default)]
    pub offset: u64,
    /// Bytes to read (none: to end of file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
}

/// A file mode as `write_file` takes it: a number (`420`) or an octal string (`"0644"`,
/// `"0o755"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FileMode {
    /// The mode bits.
    Bits(u32),
    /// Octal digits, optionally after `0o`.
    Octal(String),
}

/// `write_file`: at most 16 MiB of data for one file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFile {
    /// The guest file (its directory must exist).
    pub path: String,
    /// The bytes, base64.
    pub data_b64: String,
    /// Mode of a new file, and set exactly when given (default: 0644 minus the umask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<FileMode>,
    /// Append instead of truncating.
    #[serde(default, skip_serializing_if = "is_false")]
    pub append: bool,
}

/// `sha256_file`: the digest of a file or of a range of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sha256File {
    /// The guest file.
    pub path: String,
    /// First byte hashed.
    #[serde(default)]
    pub offset: u64,
    /// Bytes hashed (none: to end of file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
}

/// `sync`: no arguments. (Not `Sync`: that name is the marker trait's.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncCaches {}

/// `mount`: `mount(2)` arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// Device, share tag or directory.
    pub source: String,
    /// Mount point (created first).
    pub target: String,
    /// File system type; `""` for bind, remount and propagation changes.
    #[serde(default)]
    pub fstype: String,
    /// File-system specific data (e.g. `size=64m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<String>,
    /// Flag names: `ro`, `nosuid`, `bind`, `rprivate`, ... (docs/agent-protocol.md).
    #[serde(default)]
    pub flags: Vec<String>,
}

/// `stream_sink`: accept one connection on a guest port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSink {
    /// vsock (or TCP) port to listen on.
    pub port: u32,
    /// How long to wait for the connection (default 120 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Listen on TCP (all addresses) instead of vsock.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tcp: bool,
}

/// `stream_source`: send `bytes` bytes of the [`XorShift`](crate::XorShift) stream to the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSource {
    /// Host port (vsock CID 2, or TCP on `tcp_host`).
    pub port: u32,
    /// Bytes to send.
    pub bytes: u64,
    /// The stream's seed.
    #[serde(default)]
    pub seed: u64,
    /// Connect over TCP to this host address instead of vsock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_host: Option<String>,
}

/// `io_bench`: `count` O_DIRECT reads or writes of `block_size` bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoBench {
    /// File or block device.
    pub path: String,
    /// Bytes per I/O: a multiple of 512, at most 16 MiB.
    pub block_size: u64,
    /// Number of I/Os.
    pub count: u64,
    /// Random block offsets instead of sequential ones.
    #[serde(default)]
    pub random: bool,
    /// Write (pseudo-random data) instead of reading.
    #[serde(default)]
    pub write: bool,
    /// Seed of the offsets and the data.
    #[serde(default)]
    pub seed: u64,
    /// Bytes of the file or device to use (default: all of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span: Option<u64>,
}

/// `meta_bench`: `count` rounds of create + stat + unlink in `dir`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaBench {
    /// The directory.
    pub dir: String,
    /// Rounds.
    pub count: u64,
}

/// `alloc_touch`: map `mib` MiB of anonymous memory, write and read back every page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocTouch {
    /// MiB to map.
    pub mib: u64,
}

/// `online_cpu`: write `1` or `0` to `/sys/devices/system/cpu/cpu<N>/online`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlineCpu {
    /// The CPU.
    pub cpu: u32,
    /// Online (true) or offline.
    pub online: bool,
}

/// How `probe_memory` onlines a block (what it writes to the block's `state`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnlineType {
    /// `online_movable`: no unmovable kernel allocations, so it can be offlined again.
    #[default]
    OnlineMovable,
    /// `online_kernel`.
    OnlineKernel,
    /// `online`: the kernel's choice.
    Online,
}

impl OnlineType {
    /// The word written to the block's `state` file.
    pub fn as_str(self) -> &'static str {
        match self {
            OnlineType::OnlineMovable => "online_movable",
            OnlineType::OnlineKernel => "online_kernel",
            OnlineType::Online => "online",
        }
    }
}

/// `probe_memory`: probe and online the memory blocks of `[addr, addr + size)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeMemory {
    /// Guest physical address: a multiple of the memory block size.
    pub addr: u64,
    /// Bytes: a non-zero multiple of the memory block size.
    pub size: u64,
    /// How to online the blocks (default `online_movable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_type: Option<OnlineType>,
}

/// `offline_memory`: offline the memory blocks of `[addr, addr + size)`, highest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineMemory {
    /// Guest physical address: a multiple of the memory block size.
    pub addr: u64,
    /// Bytes: a non-zero multiple of the memory block size.
    pub size: u64,
}

/// `set_time`: set CLOCK_REALTIME.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetTime {
    /// Nanoseconds since the Unix epoch.
    pub unix_ns: u64,
}

/// `get_time`: no arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetTime {}

/// `add_entropy`: mix bytes into the kernel's pool and credit them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddEntropy {
    /// The bytes (at most 1 MiB), base64.
    pub data_b64: String,
    /// Bits to credit; default and maximum 8 per byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credit_bits: Option<u32>,
}

/// `meminfo`: no arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meminfo {}

/// `cpus`: no arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cpus {}

/// `shutdown`: the agent answers, syncs and resets the machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shutdown {
    /// Recorded for the log only: both stop through a reset (no ACPI).
    #[serde(default)]
    pub reboot: bool,
}

/// Why the agent refused a request line (before running anything).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    /// The line is not JSON.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// The line is JSON but not an object.
    #[error("request is not a JSON object")]
    NotObject,
    /// `id` is missing or not a u64.
    #[error("missing or invalid \"id\" (want a u64)")]
    Id,
    /// `op` is missing or not a string.
    #[error("missing or invalid \"op\" (want a string)")]
    OpName,
    /// An op the agent does not serve.
    #[error("unknown op {0:?}")]
    UnknownOp(String),
    /// The arguments do not fit the op (unknown field, wrong type, missing field).
    #[error("{op}: invalid args: {message}")]
    Args {
        /// The op.
        op: String,
        /// What serde said.
        message: String,
    },
}

impl RequestError {
    /// The error kind the agent answers with: [`UNSUPPORTED`](crate::kind::UNSUPPORTED) for
    /// an unknown op, [`BAD_REQUEST`](crate::kind::BAD_REQUEST) otherwise.
    pub fn kind(&self) -> &'static str {
        match self {
            RequestError::UnknownOp(_) => crate::kind::UNSUPPORTED,
            _ => crate::kind::BAD_REQUEST,
        }
    }
}

/// A request line the agent refused: the error, and the request's id if it could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    /// The request's id (None: unreadable; the response then has `"id": null`).
    pub id: Option<u64>,
    /// Why.
    pub error: RequestError,
}

/// The agent's reading of one request line (without its newline). Unknown top-level keys
/// are ignored.
///
/// # Errors
/// [`BadRequest`] when the line is not a request: not a JSON object, no u64 `id`, no string
/// `op`, an unknown op or arguments that do not fit it.
pub fn decode_request(line: &[u8]) -> Result<(u64, Request), BadRequest> {
    let bad = |id, error| BadRequest { id, error };
    let v: Value =
        serde_json::from_slice(line).map_err(|e| bad(None, RequestError::Json(e.to_string())))?;
    let Value::Object(mut m) = v else {
        return Err(bad(None, RequestError::NotObject));
    };
    let id = m
        .get("id")
        .and_then(Value::as_u64)
        .ok_or(bad(None, RequestError::Id))?;
    let Some(Value::String(op)) = m.remove("op") else {
        return Err(bad(Some(id), RequestError::OpName));
    };
    let args = m.remove("args").unwrap_or(Value::Null);
    Request::from_parts(&op, args)
        .map(|r| (id, r))
        .map_err(|e| bad(Some(id), e))
}

#[derive(Serialize)]
struct Line<'a, R> {
    id: u64,
    #[serde(flatten)]
    request: &'a R,
}

/// `{"id":<id>,"op":...,"args":{...}}` for `request` (without a newline).
///
/// # Errors
/// What serde_json reports (not for the types of this crate: their fields are strings,
/// numbers, booleans and string maps).
pub fn encode_request(id: u64, request: &Request) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&Line { id, request })
}

/// An op by name with untyped arguments.
#[derive(Serialize)]
struct Raw<'a> {
    op: &'a str,
    args: &'a Value,
}

/// A request line for any op name and arguments (without a newline): for tests of the
/// agent's handling of unknown ops and malformed arguments, and for ops a client has no
/// typed method for. Prefer [`encode_request`].
///
/// # Errors
/// What serde_json reports (a `Value` always serializes).
pub fn encode_raw_request(id: u64, op: &str, args: &Value) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&Line {
        id,
        request: &Raw { op, args },
    })
}
