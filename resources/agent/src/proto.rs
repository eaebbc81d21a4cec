//! Wire format: one JSON request per line, one JSON response per line, in order.
//!
//! Request:  `{"id": <u64>, "op": "<name>", "args": {...}}` (`args` may be absent or null)
//! Response: `{"id": <id>, "ok": <result>}` or
//!           `{"id": <id>, "error": {"kind": "<short>", "message": "<text>", "errno": N?}}`
//! A request whose id cannot be read gets `"id": null`.

use std::io;

use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

/// An error reported to the host as `{"kind", "message", "errno"?}`.
#[derive(Debug)]
pub struct OpError {
    pub kind: &'static str,
    pub message: String,
    pub errno: Option<i32>,
}

impl OpError {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            errno: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new("bad_request", message)
    }

    /// An OS error, with `what` naming the operation and its input (e.g. `open /etc/x`).
    pub fn os(what: impl std::fmt::Display, err: io::Error) -> Self {
        match err.raw_os_error() {
            Some(errno) => Self {
                kind: "os",
                message: format!("{what}: {err}"),
                errno: Some(errno),
            },
            None => Self::new("io", format!("{what}: {err}")),
        }
    }

    /// The error of the last failed libc call.
    pub fn last_os(what: impl std::fmt::Display) -> Self {
        Self::os(what, io::Error::last_os_error())
    }

    fn to_json(&self) -> Value {
        let mut e = Map::new();
        e.insert("kind".into(), Value::from(self.kind));
        e.insert("message".into(), Value::from(self.message.as_str()));
        if let Some(errno) = self.errno {
            e.insert("errno".into(), Value::from(errno));
        }
        Value::Object(e)
    }
}

pub type OpResult<T> = Result<T, OpError>;

/// Something the connection must do after it has sent the response.
pub enum After {
    Shutdown { reboot: bool },
}

/// Deserialize an op's `args` (absent or null means `{}`); unknown fields are errors.
pub fn args<T: DeserializeOwned>(op: &str, args: Value) -> OpResult<T> {
    let args = if args.is_null() { json!({}) } else { args };
    serde_json::from_value(args)
        .map_err(|e| OpError::bad_request(format!("{op}: invalid args: {e}")))
}

/// Handle one request line; returns the response line (without its newline).
pub fn handle_line(line: &[u8]) -> (Vec<u8>, Option<After>) {
    let (id, result) = match parse(line) {
        Ok((id, op, a)) => (Some(id), crate::ops::dispatch(&op, a)),
        Err((id, e)) => (id, Err(e)),
    };
    let (resp, after) = match result {
        Ok((v, after)) => (json!({"id": id, "ok": v}), after),
        Err(e) => (json!({"id": id, "error": e.to_json()}), None),
    };
    let bytes = serde_json::to_vec(&resp).unwrap_or_else(|e| {
        format!(
            r#"{{"id":null,"error":{{"kind":"internal","message":"cannot encode response: {e}"}}}}"#
        )
        .into_bytes()
    });
    (bytes, after)
}

/// An error response for a line longer than the agent accepts.
pub fn too_long_response(max: usize) -> Vec<u8> {
    let e = OpError::new(
        "bad_request",
        format!("request line longer than {max} bytes"),
    );
    serde_json::to_vec(&json!({"id": null, "error": e.to_json()})).unwrap_or_default()
}

type Parsed = (u64, String, Value);

fn parse(line: &[u8]) -> Result<Parsed, (Option<u64>, OpError)> {
    let v: Value = serde_json::from_slice(line)
        .map_err(|e| (None, OpError::bad_request(format!("invalid JSON: {e}"))))?;
    let Value::Object(mut m) = v else {
        return Err((None, OpError::bad_request("request is not a JSON object")));
    };
    let id = m.get("id").and_then(Value::as_u64).ok_or_else(|| {
        (
            None,
            OpError::bad_request("missing or invalid \"id\" (want a u64)"),
        )
    })?;
    let op = match m.remove("op") {
        Some(Value::String(op)) => op,
        _ => {
            return Err((
                Some(id),
                OpError::bad_request("missing or invalid \"op\" (want a string)"),
            ))
        }
    };
    Ok((id, op, m.remove("args").unwrap_or(Value::Null)))
}
