//! HTTP/1.1 as the API socket speaks it: the request head parsed with `httparse` under fixed
//! limits, and responses written by hand.
//!
//! What a client sends is bounded: the request line and headers together
//! ([`MAX_HEAD_LEN`]), the number of headers ([`MAX_HEADERS`]) and the body (`max_body`,
//! Firecracker's `--http-api-max-payload-size`, default [`DEFAULT_MAX_BODY`]). Bodies must come
//! with `Content-Length`; `Transfer-Encoding` is refused. Every violation is a [`HttpError`]:
//! the server answers 400 (as Firecracker's HTTP server does) and closes the connection.

use thiserror::Error;

/// Most headers a request may have.
pub const MAX_HEADERS: usize = 32;
/// Longest request head (request line and headers, with the blank line), in bytes.
pub const MAX_HEAD_LEN: usize = 8 * 1024;
/// Largest request body by default (Firecracker's `HTTP_MAX_PAYLOAD_SIZE`, 50 KiB).
pub const DEFAULT_MAX_BODY: usize = 51_200;
/// What the server names itself in the `Server` header.
pub const SERVER_NAME: &str = "Kestrel (Firecracker API)";

/// Why a request could not be read. The server answers 400 with the message and closes the
/// connection (it cannot tell where the next request would start).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HttpError {
    /// The request line or a header is malformed (httparse's reason).
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    /// More than [`MAX_HEADERS`] headers.
    #[error("too many headers: at most {MAX_HEADERS} are accepted")]
    TooManyHeaders,
    /// The head did not end within [`MAX_HEAD_LEN`] bytes.
    #[error("the request line and headers are longer than {MAX_HEAD_LEN} bytes")]
    HeadTooLong,
    /// `Content-Length` is not a number, or given twice with different values.
    #[error("invalid Content-Length header")]
    BadContentLength,
    /// A `Transfer-Encoding` header (chunked bodies are not supported).
    #[error("Transfer-Encoding is not supported: send the body with a Content-Length")]
    TransferEncoding,
    /// The body is larger than the server's limit (Firecracker's message).
    #[error(
        "Request payload with size {size} is larger than the limit of {limit} allowed by server."
    )]
    BodyTooLarge {
        /// `Content-Length` of the request.
        size: u64,
        /// The limit.
        limit: usize,
    },
}

/// A request head: everything before the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The method as sent (`GET`, `PUT`, ...).
    pub method: String,
    /// The path: the request target, without `http://host` when the absolute form is used.
    pub path: String,
    /// Bytes of the head, blank line included: the body starts there.
    pub head_len: usize,
    /// `Content-Length` (0 without one).
    pub body_len: usize,
    /// Whether the connection stays open after the response (HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`).
    pub keep_alive: bool,
    /// The client sent `Expect: 100-continue` and waits for it before the body.
    pub expect_continue: bool,
}

/// A whole request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method as sent.
    pub method: String,
    /// The path (see [`Head::path`]).
    pub path: String,
    /// The body; `None` when `Content-Length` is absent or 0 (as Firecracker sees it).
    pub body: Option<Vec<u8>>,
}

/// Parse the head at the start of `buf`: `Ok(None)` while it is incomplete.
pub fn parse_head(buf: &[u8], max_body: usize) -> Result<Option<Head>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_LEN => {
            return Err(HttpError::HeadTooLong)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    if head_len > MAX_HEAD_LEN {
        return Err(HttpError::HeadTooLong);
    }
    let http10 = req.version == Some(0);
    let mut content_length: Option<u64> = None;
    let mut connection = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).map(str::trim).unwrap_or("");
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value.parse().map_err(|_| HttpError::BadContentLength)?;
            if content_length.is_some_and(|m| m != n) {
                return Err(HttpError::BadContentLength);
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::TransferEncoding);
        } else if h.name.eq_ignore_ascii_case("connection") {
            connection = Some(value.to_ascii_lowercase());
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    let size = content_length.unwrap_or(0);
    let body_len = usize::try_from(size)
        .ok()
        .filter(|n| *n <= max_body)
        .ok_or(HttpError::BodyTooLarge {
            size,
            limit: max_body,
        })?;
    let keep_alive = match connection.as_deref() {
        Some("close") => false,
        Some("keep-alive") => true,
        _ => !http10,
    };
    Ok(Some(Head {
        method: req.method.unwrap_or_default().to_string(),
        path: abs_path(req.path.unwrap_or_default()).to_string(),
        head_len,
        body_len,
        keep_alive,
        expect_continue: expect_continue && body_len > 0,
    }))
}

/// The path of a request target: origin form as is, absolute form (`http://host/path`)
/// without scheme and host (Firecracker's `Uri::get_abs_path`).
fn abs_path(target: &str) -> &str {
    match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("", |i| &rest[i..]),
        None if target.starts_with('/') => target,
        None => "",
    }
}

/// A response: a status and an optional JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The JSON body, if any.
    pub body: Option<String>,
}

impl Response {
    /// 204 No Content: what Firecracker answers to a successful PUT or PATCH.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
        }
    }

    /// 200 OK with `body` serialised as JSON.
    pub fn json(body: &impl serde::Serialize) -> Self {
        match serde_json::to_string(body) {
            Ok(s) => Response {
                status: 200,
                body: Some(s),
            },
            Err(e) => Response::fault(500, &format!("cannot serialise the response: {e}")),
        }
    }

    /// `status` with Firecracker's error body, `{"fault_message": "..."}`.
    pub fn fault(status: u16, message: &str) -> Self {
        Response {
            status,
            body: Some(serde_json::json!({ "fault_message": message }).to_string()),
        }
    }

    /// Append the response to `out`, with `Connection: close` unless `keep_alive`.
    pub fn write_to(&self, out: &mut Vec<u8>, keep_alive: bool) {
        use std::io::Write;
        let connection = if keep_alive { "keep-alive" } else { "close" };
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nServer: {SERVER_NAME}\r\nConnection: {connection}\r\n",
            self.status,
            reason(self.status)
        );
        match &self.body {
            Some(b) => {
                let _ = write!(
                    out,
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                    b.len()
                );
            }
            None if self.status == 204 => out.extend_from_slice(b"\r\n"),
            None => out.extend_from_slice(b"Content-Length: 0\r\n\r\n"),
        }
    }
}

/// The interim response a client waiting on `Expect: 100-continue` gets.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The answer to a connection the server has no room for (as Firecracker's HTTP server).
pub fn server_full() -> Vec<u8> {
    let mut out = Vec::new();
    Response::fault(503, "Too many open connections").write_to(&mut out, false);
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Result<Option<Head>, HttpError> {
        parse_head(s.as_bytes(), DEFAULT_MAX_BODY)
    }

    #[test]
    fn curl_put_parses() {
        let req = "PUT /boot-source HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/7.88.1\r\n\
                   Accept: application/json\r\nContent-Type: application/json\r\n\
                   Content-Length: 42\r\n\r\n";
        let h = head(req).unwrap().unwrap();
        assert_eq!(h.method, "PUT");
        assert_eq!(h.path, "/boot-source");
        assert_eq!(h.head_len, req.len());
        assert_eq!(h.body_len, 42);
        assert!(h.keep_alive);
        assert!(!h.expect_continue);
    }

    #[test]
    fn partial_heads_wait() {
        assert_eq!(head("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert_eq!(head("GE"), Ok(None));
        assert_eq!(head(""), Ok(None));
    }

    #[test]
    fn absolute_form_and_versions() {
        let h = head("GET http://localhost/machine-config HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.path, "/machine-config");
        assert!(!h.keep_alive, "HTTP/1.0 closes by default");
        let h = head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        assert_eq!(
            head("GET http://host HTTP/1.1\r\n\r\n")
                .unwrap()
                .unwrap()
                .path,
            ""
        );
        assert!(matches!(
            head("GET / HTTP/2.0\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn limits_and_bad_headers() {
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            head(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Err(HttpError::TooManyHeaders)
        );
        let long = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_LEN));
        assert_eq!(head(&long), Err(HttpError::HeadTooLong));
        assert_eq!(
            head("PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Err(HttpError::BadContentLength)
        );
        assert_eq!(
            head("PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(HttpError::BadContentLength)
        );
        assert_eq!(
            head("PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Err(HttpError::BadContentLength)
        );
        assert_eq!(
            head("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HttpError::TransferEncoding)
        );
        let e = head("PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n");
        assert_eq!(e, Err(HttpError::BadContentLength));
        let e = head("PUT / HTTP/1.1\r\nContent-Length: 51201\r\n\r\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Request payload with size 51201 is larger than the limit of 51200 allowed by server."
        );
        assert!(matches!(
            head("\x01\x02 / HTTP/1.1\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(head("PUT / HTTP/1.1\r\nContent-Length: 51200\r\n\r\n").is_ok());
    }

    #[test]
    fn expect_continue_only_with_a_body() {
        let h = head("PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.expect_continue);
        let h = head("PUT /x HTTP/1.1\r\nExpect: 100-continue\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.expect_continue);
    }

    #[test]
    fn responses_as_firecracker_writes_them() {
        let mut out = Vec::new();
        Response::no_content().write_to(&mut out, true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("HTTP/1.1 204 No Content\r\nServer: {SERVER_NAME}\r\nConnection: keep-alive\r\n\r\n")
        );
        let mut out = Vec::new();
        Response::fault(400, "bad \"x\"").write_to(&mut out, false);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{s}");
        assert!(s.contains("Connection: close\r\n"), "{s}");
        let body = s.split("\r\n\r\n").nth(1).unwrap();
        assert!(
            s.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{s}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["fault_message"], "bad \"x\"");
        let s = String::from_utf8(server_full()).unwrap();
        assert!(s.starts_with("HTTP/1.1 503 "), "{s}");
    }
}
