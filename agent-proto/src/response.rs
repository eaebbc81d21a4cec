//! Responses: `{"id": <id>, "ok": <result>}` or `{"id": <id>, "error": {"kind", "message",
//! "errno"?}}`, and one result type per op.
//!
//! Results ignore fields they do not know (an agent may add some); the fields a client has
//! always done without are optional here too.

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The error kinds the agent answers with (`"kind"` of [`ErrorBody`]).
pub mod kind {
    /// A system call failed; `errno` is the guest errno, the message names the call and input.
    pub const OS: &str = "os";
    /// An I/O error without an errno.
    pub const IO: &str = "io";
    /// The line is not a request, or its arguments are invalid.
    pub const BAD_REQUEST: &str = "bad_request";
    /// An op the agent does not serve.
    pub const UNSUPPORTED: &str = "unsupported";
    /// A payload over the per-call limit.
    pub const TOO_LARGE: &str = "too_large";
    /// The guest's state is not what the op expects.
    pub const FAILED: &str = "failed";
    /// Nothing arrived in time (`stream_sink`).
    pub const TIMEOUT: &str = "timeout";
    /// The agent could not encode its response.
    pub const INTERNAL: &str = "internal";
    /// What a client reports for an error without a kind.
    pub const UNKNOWN: &str = "unknown";
}

fn unknown_kind() -> String {
    kind::UNKNOWN.to_string()
}

/// The `error` of a failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Short error class ([`kind`]); [`kind::UNKNOWN`] when the agent sent none.
    #[serde(default = "unknown_kind")]
    pub kind: String,
    /// What failed, with its input.
    #[serde(default)]
    pub message: String,
    /// The guest errno, for [`kind::OS`] (i64 on the wire, so that a client reads any
    /// number; Linux errnos fit an i32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i64>,
}

/// A response's outcome: `"ok"` with the op's result or `"error"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome<T> {
    /// The op's result.
    #[serde(rename = "ok")]
    Ok(T),
    /// Why the op failed.
    #[serde(rename = "error")]
    Error(ErrorBody),
}

/// One response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response<T> {
    /// The request's id; None (`null`) when the agent could not read it.
    pub id: Option<u64>,
    /// The result or the error.
    #[serde(flatten)]
    pub outcome: Outcome<T>,
}

/// `{"id":<id>,"ok":<ok>}` (without a newline).
///
/// # Errors
/// What serde_json reports for `ok` (never for the result types of this crate).
pub fn encode_ok<T: Serialize>(id: u64, ok: &T) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&Response {
        id: Some(id),
        outcome: Outcome::<&T>::Ok(ok),
    })
}

/// `{"id":<id>,"error":{...}}` (without a newline); `id` None is written as `null`.
pub fn encode_error(id: Option<u64>, error: ErrorBody) -> Vec<u8> {
    let r = Response::<()> {
        id,
        outcome: Outcome::Error(error),
    };
    // An ErrorBody is strings and numbers: serde_json cannot fail on it.
    serde_json::to_vec(&r).unwrap_or_default()
}

/// A client's first look at a response line: which request it answers and whether it
/// succeeded, without building the result (read it with [`OkPayload`] once `ok` is set).
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseHead {
    /// The request's id (None: absent or `null`).
    #[serde(default)]
    pub id: Option<u64>,
    /// An `ok` field is present (whatever its value, `null` included).
    #[serde(default, deserialize_with = "present")]
    pub ok: bool,
    /// The error, if the line has one.
    #[serde(default)]
    pub error: Option<ErrorBody>,
}

/// A field that is present (whatever its value, `null` included).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    IgnoredAny::deserialize(d).map(|_| true)
}

/// The `ok` of a response line, as the op's result type.
#[derive(Debug, Clone, Deserialize)]
#[serde(bound = "T: DeserializeOwned")]
pub struct OkPayload<T> {
    /// The result.
    pub ok: T,
}

/// The result of ops that answer `{}` (`sync`, `mount`, `set_time`, `shutdown`). A client
/// takes any value for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Empty;

impl Serialize for Empty {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        s.serialize_map(Some(0))?.end()
    }
}

impl<'de> Deserialize<'de> for Empty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(d).map(|_| Empty)
    }
}

/// `get_time`'s result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestTime {
    /// CLOCK_REALTIME in nanoseconds since the Unix epoch.
    pub unix_ns: u64,
}

/// `ping`'s result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// Always true.
    #[serde(default)]
    pub pong: bool,
    /// The agent crate's version.
    pub version: String,
}

/// `exec`'s result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// Exit status; None when killed by a signal or when the status never came after a
    /// timeout kill.
    pub exit_code: Option<i32>,
    /// The terminating signal.
    pub signal: Option<i32>,
    /// The time limit passed and the process group was killed.
    pub timed_out: bool,
    /// Wall time in the guest.
    #[serde(default)]
    pub duration_ms: u64,
    /// stdout as UTF-8 text (invalid sequences replaced).
    pub stdout: String,
    /// The exact stdout bytes, base64, only when they are not valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_b64: Option<String>,
    /// Output beyond 16 MiB was dropped.
    #[serde(default)]
    pub stdout_truncated: bool,
    /// stderr as UTF-8 text (invalid sequences replaced).
    pub stderr: String,
    /// The exact stderr bytes, base64, only when they are not valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_b64: Option<String>,
    /// Error output beyond 16 MiB was dropped.
    #[serde(default)]
    pub stderr_truncated: bool,
}

/// `read_file`'s result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileData {
    /// The bytes read, base64.
    pub data_b64: String,
    /// Lowercase hex SHA-256 of the bytes read.
    pub sha256: String,
    /// Bytes read.
    pub len: u64,
    /// The file's `st_size` (0 for most /proc and /sys files).
    pub size: u64,
    /// End of file was reached.
    pub eof: bool,
}

/// `write_file`'s and `sha256_file`'s result: a digest of the bytes written or hashed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Bytes written or hashed by this call.
    #[serde(default)]
    pub len: u64,
    /// Size of the whole file in bytes afterwards (`st_size`; 0 for most /proc and /sys
    /// files).
    pub size: u64,
}

/// `stream_sink`'s and `stream_source`'s result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStats {
    /// Bytes received or sent.
    pub bytes: u64,
    /// Lowercase hex SHA-256 of them.
    pub sha256: String,
    /// Time from the connection to its end.
    pub duration_ms: u64,
}

/// `io_bench`'s result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IoBenchStats {
    /// I/Os done.
    pub ops: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Time taken.
    pub duration_ns: u64,
    /// Throughput, MB (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// I/Os per second.
    pub iops: f64,
}

/// `meta_bench`'s result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetaBenchStats {
    /// Rounds done.
    pub rounds: u64,
    /// Time taken.
    pub duration_ns: u64,
    /// Rounds per second.
    pub rounds_per_s: f64,
}

/// `alloc_touch`'s result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocTouchStats {
    /// MiB mapped.
    pub mib: u64,
    /// 4 KiB pages written and read back.
    pub pages: u64,
    /// Sum of the bytes read back.
    pub checksum: u64,
    /// Time taken.
    pub duration_ms: u64,
}

/// `online_cpu`'s result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuOnline {
    /// `/sys/devices/system/cpu/online` afterwards (e.g. `0-2`).
    pub online: String,
}

/// `probe_memory`'s result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbedMemory {
    /// Memory block numbers of the range (`/sys/devices/system/memory/memoryN`).
    pub blocks: Vec<u64>,
    /// The blocks this call probed (the others were known and only onlined).
    #[serde(default)]
    pub probed: Vec<u64>,
    /// Memory block size in bytes.
    pub block_size: u64,
    /// `MemTotal` afterwards.
    pub mem_total_kb: u64,
}

/// `offline_memory`'s result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflinedMemory {
    /// Memory block numbers of the range.
    pub blocks: Vec<u64>,
    /// Memory block size in bytes.
    pub block_size: u64,
    /// `MemTotal` afterwards.
    pub mem_total_kb: u64,
    /// Whether the blocks were removed: never on Linux 6.12 (docs/agent-protocol.md).
    #[serde(default)]
    pub removed: bool,
}

/// `add_entropy`'s result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entropy {
    /// Bits credited.
    pub credited_bits: u32,
}

/// `meminfo`'s result: the `/proc/meminfo` totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemInfo {
    /// MemTotal.
    pub mem_total_kb: u64,
    /// MemFree.
    pub mem_free_kb: u64,
    /// MemAvailable.
    #[serde(default)]
    pub mem_available_kb: Option<u64>,
}

/// `cpus`' result: CPU sets as the guest kernel prints them (e.g. `0-1,3`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuSets {
    /// `/sys/devices/system/cpu/online`.
    pub online: String,
    /// `/sys/devices/system/cpu/possible`.
    pub possible: String,
    /// `/sys/devices/system/cpu/present`.
    pub present: String,
}
