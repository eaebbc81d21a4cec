//! One request line in, one response line out: the agent's side of the wire protocol
//! (`kestrel-agent-proto`, docs/agent-protocol.md), and the error type of the ops.

use std::io;

use kestrel_agent_proto::{decode_request, encode_error, encode_ok, kind, ErrorBody};
use serde::Serialize;

/// An error reported to the host as `{"kind", "message", "errno"?}`.
#[derive(Debug)]
pub struct OpError {
    /// One of [`kind`].
    pub kind: &'static str,
    /// What failed, with its input.
    pub message: String,
    /// The errno, for [`kind::OS`].
    pub errno: Option<i32>,
}

impl OpError {
    /// An error of `kind` without an errno.
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            errno: None,
        }
    }

    /// A [`kind::BAD_REQUEST`] error.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(kind::BAD_REQUEST, message)
    }

    /// An OS error, with `what` naming the operation and its input (e.g. `open /etc/x`).
    pub fn os(what: impl std::fmt::Display, err: io::Error) -> Self {
        match err.raw_os_error() {
            Some(errno) => Self {
                kind: kind::OS,
                message: format!("{what}: {err}"),
                errno: Some(errno),
            },
            None => Self::new(kind::IO, format!("{what}: {err}")),
        }
    }

    /// The error of the last failed libc call.
    pub fn last_os(what: impl std::fmt::Display) -> Self {
        Self::os(what, io::Error::last_os_error())
    }
}

impl From<OpError> for ErrorBody {
    fn from(e: OpError) -> Self {
        ErrorBody {
            kind: e.kind.to_string(),
            message: e.message,
            errno: e.errno.map(i64::from),
        }
    }
}

/// What an op returns: its result, or the error the host gets.
pub type OpResult<T> = Result<T, OpError>;

/// Something the connection must do after it has sent the response.
pub enum After {
    /// Stop the machine (`shutdown`).
    Shutdown {
        /// Recorded for the log only.
        reboot: bool,
    },
}

/// The response line (without its newline) for request `id`'s outcome `r`.
pub fn reply<T: Serialize>(id: u64, r: OpResult<T>) -> Vec<u8> {
    let encoded = r.and_then(|v| {
        encode_ok(id, &v)
            .map_err(|e| OpError::new(kind::INTERNAL, format!("cannot encode response: {e}")))
    });
    encoded.unwrap_or_else(|e| encode_error(Some(id), e.into()))
}

/// Handle one request line; returns the response line (without its newline).
pub fn handle_line(line: &[u8]) -> (Vec<u8>, Option<After>) {
    match decode_request(line) {
        Ok((id, request)) => crate::ops::run(id, request),
        Err(bad) => {
            let body = ErrorBody {
                kind: bad.error.kind().to_string(),
                message: bad.error.to_string(),
                errno: None,
            };
            (encode_error(bad.id, body), None)
        }
    }
}

/// An error response for a line longer than the agent accepts.
pub fn too_long_response(max: usize) -> Vec<u8> {
    let e = OpError::bad_request(format!("request line longer than {max} bytes"));
    encode_error(None, e.into())
}
