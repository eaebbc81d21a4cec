//! The Kestrel guest-agent protocol, shared by the guest agent (`resources/agent`) and the host
//! client (`kestrel_sandbox::agent::AgentClient`); `docs/agent-protocol.md` describes it.
//!
//! One JSON object per line in each direction, one response per request, in order:
//!
//! ```text
//! {"id":7,"op":"read_file","args":{"path":"/etc/hostname","offset":0}}
//! {"id":7,"ok":{"data_b64":"a2VzdHJlbAo=","sha256":"…","len":8,"size":8,"eof":true}}
//! {"id":8,"error":{"kind":"os","message":"open /x: No such file or directory (os error 2)","errno":2}}
//! ```
//!
//! - [`Request`]: every op with its typed arguments (one struct per op, e.g. [`ReadFile`]);
//!   [`Op`] ties an op's arguments to its name and to the type of its result;
//!   [`encode_request`] / [`decode_request`] are the two ends of a request line.
//! - [`Response`], [`ErrorBody`] and the result types (e.g. [`FileData`]);
//!   [`encode_ok`] / [`encode_error`] write a response line, [`ResponseHead`] is the client's
//!   first look at one.
//! - [`AGENT_PORT`], [`b64`] (binary data travels as base64) and [`XorShift`] (the
//!   pseudo-random test data of the stream and benchmark ops).
//!
//! The crate is compiled into the static guest agent: it depends on serde, serde_json and
//! thiserror only.

pub mod b64;
mod request;
mod response;
mod xorshift;

pub use request::*;
pub use response::*;
pub use xorshift::XorShift;

/// The AF_VSOCK port the guest agent listens on.
pub const AGENT_PORT: u32 = 1024;

#[cfg(test)]
mod golden;
