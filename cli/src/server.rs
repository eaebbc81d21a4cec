//! The API socket's server: one thread polls the listening socket and its connections
//! (non-blocking, `poll(2)`) and hands each complete request to a [`Handler`].
//!
//! Bounded in everything a client controls: at most [`MAX_CONNECTIONS`] connections (then the
//! longest-idle one is closed for a newcomer, or the newcomer gets 503 when every connection is
//! mid-request), a request head and body as [`crate::http`] limits them, [`REQUEST_TIMEOUT`] to
//! send a whole request once it has begun, and [`WRITE_TIMEOUT`] to read a response. A client
//! that stops reading holds at most one pending response: no further request of its connection
//! is read until that response is gone.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use crate::http::{self, Head, HttpError, Request, Response};

/// Most open connections (Firecracker's HTTP server takes 10).
pub const MAX_CONNECTIONS: usize = 10;
/// Time a client has to send the rest of a request it has begun.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to read a response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection must have been quiet before it may be closed for a newcomer (so
/// one whose request is on its way but not read yet is not taken for idle).
const IDLE_GRACE: Duration = Duration::from_secs(1);
/// Bytes read from a connection at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Answers one request.
pub trait Handler {
    /// The response to `req`. Called on the server thread, one request at a time.
    fn handle(&mut self, req: &Request) -> Response;
}

/// One client connection.
struct Conn {
    stream: UnixStream,
    /// Bytes received and not yet consumed by a request.
    input: Vec<u8>,
    /// Bytes to send.
    output: Vec<u8>,
    /// When the first byte of the request being received arrived.
    request_started: Option<Instant>,
    /// When output became pending.
    write_started: Option<Instant>,
    /// Last time a request completed (for choosing whom to close when full).
    last_active: Instant,
    /// The parsed head of the request being received, once complete.
    head: Option<Head>,
    /// `100 Continue` was sent for the current request.
    continued: bool,
    /// Close once the output is written (error, `Connection: close`, peer shut its side).
    closing: bool,
    /// The connection is done: drop it.
    dead: bool,
}

impl Conn {
    fn new(stream: UnixStream) -> Self {
        Conn {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            request_started: None,
            write_started: None,
            last_active: Instant::now(),
            head: None,
            continued: false,
            closing: false,
            dead: false,
        }
    }

    /// Idle: nothing received, nothing to send, for [`IDLE_GRACE`] at least.
    fn idle(&self) -> bool {
        self.input.is_empty()
            && self.output.is_empty()
            && self.head.is_none()
            && self.last_active.elapsed() >= IDLE_GRACE
    }

    fn wants_read(&self) -> bool {
        !self.closing && self.output.is_empty()
    }

    fn deadline(&self, request: Duration, write: Duration) -> Option<Instant> {
        let r = self.request_started.map(|t| t + request);
        let w = self.write_started.map(|t| t + write);
        match (r, w) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Read what is there (up to the request limits). Returns false when the peer closed.
    fn read_some(&mut self, max_request: usize) -> bool {
        let mut chunk = [0u8; READ_CHUNK];
        while self.input.len() < max_request {
            let room = (max_request - self.input.len()).min(READ_CHUNK);
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) => return false,
                Ok(n) => {
                    self.request_started.get_or_insert_with(Instant::now);
                    self.input.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        true
    }

    /// Write pending output. Marks the connection dead on error or when a closing
    /// connection's output is done.
    fn write_some(&mut self) {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => break,
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.dead = true;
                    return;
                }
            }
        }
        if self.output.is_empty() {
            self.write_started = None;
            if self.closing {
                self.dead = true;
            }
        } else {
            self.write_started.get_or_insert_with(Instant::now);
        }
    }

    fn fail(&mut self, e: &HttpError) {
        Response::fault(400, &e.to_string()).write_to(&mut self.output, false);
        self.input.clear();
        self.head = None;
        self.closing = true;
    }

    /// Answer every complete request in the input, while no output is pending.
    fn process(&mut self, handler: &mut dyn Handler, max_body: usize) {
        while self.output.is_empty() && !self.closing {
            if self.head.is_none() {
                match http::parse_head(&self.input, max_body) {
                    Ok(Some(h)) => self.head = Some(h),
                    Ok(None) => return,
                    Err(e) => return self.fail(&e),
                }
            }
            let Some(head) = self.head.clone() else {
                return;
            };
            let end = head.head_len + head.body_len;
            if self.input.len() < end {
                if head.expect_continue && !self.continued {
                    self.continued = true;
                    self.output.extend_from_slice(http::CONTINUE);
                }
                return;
            }
            let body = (head.body_len > 0).then(|| self.input[head.head_len..end].to_vec());
            self.input.drain(..end);
            let req = Request {
                method: head.method,
                path: head.path,
                body,
            };
            handler
                .handle(&req)
                .write_to(&mut self.output, head.keep_alive);
            self.closing = !head.keep_alive;
            self.head = None;
            self.continued = false;
            self.last_active = Instant::now();
            self.request_started = (!self.input.is_empty()).then(Instant::now);
        }
    }
}

/// The API server: a listening socket and its connections.
pub struct Server<H: Handler> {
    listener: UnixListener,
    conns: Vec<Conn>,
    handler: H,
    max_body: usize,
    request_timeout: Duration,
    write_timeout: Duration,
}

impl<H: Handler> Server<H> {
    /// A server on `listener` (made non-blocking here) answering with `handler`, taking
    /// bodies of up to `max_body` bytes.
    pub fn new(listener: UnixListener, handler: H, max_body: usize) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Server {
            listener,
            conns: Vec::new(),
            handler,
            max_body,
            request_timeout: REQUEST_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
        })
    }

    /// Other time limits than [`REQUEST_TIMEOUT`] and [`WRITE_TIMEOUT`] (tests).
    #[cfg(test)]
    pub fn with_timeouts(mut self, request: Duration, write: Duration) -> Self {
        self.request_timeout = request;
        self.write_timeout = write;
        self
    }

    /// Serve forever.
    pub fn run(mut self) -> ! {
        loop {
            self.turn(None);
        }
    }

    /// One round: wait for readiness (at most `max_wait`, and never past a connection's
    /// deadline), then accept, read, answer and write.
    pub fn turn(&mut self, max_wait: Option<Duration>) {
        let now = Instant::now();
        let mut timeout = max_wait;
        let (rt, wt) = (self.request_timeout, self.write_timeout);
        for d in self.conns.iter().filter_map(|c| c.deadline(rt, wt)) {
            let left = d.saturating_duration_since(now);
            timeout = Some(timeout.map_or(left, |t| t.min(left)));
        }
        let mut fds = vec![libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        for c in &self.conns {
            let mut events = 0;
            if c.wants_read() {
                events |= libc::POLLIN;
            }
            if !c.output.is_empty() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        poll(&mut fds, timeout);
        for (i, fd) in fds.iter().enumerate().skip(1) {
            if fd.revents != 0 {
                self.service(i - 1);
            }
        }
        if fds[0].revents != 0 {
            self.accept_all();
        }
        self.expire();
        self.conns.retain(|c| !c.dead);
    }

    fn service(&mut self, i: usize) {
        let max_request = http::MAX_HEAD_LEN + self.max_body;
        let c = &mut self.conns[i];
        let open = !c.wants_read() || c.read_some(max_request);
        loop {
            let before = c.input.len();
            c.process(&mut self.handler, self.max_body);
            if !open {
                // The peer closed its side (or failed): what was complete is answered, then go.
                c.closing = true;
            }
            c.write_some();
            // Pipelined requests already read: answer them once the response is out.
            if c.dead || !c.output.is_empty() || c.input.len() == before || c.input.is_empty() {
                break;
            }
        }
        if c.closing && c.output.is_empty() {
            c.dead = true;
        }
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.conns.iter().filter(|c| !c.dead).count() >= MAX_CONNECTIONS
                && !self.evict_idle()
            {
                refuse(stream);
                continue;
            }
            if stream.set_nonblocking(true).is_ok() {
                self.conns.push(Conn::new(stream));
            }
        }
    }

    /// Close the longest-idle connection that is not in the middle of a request.
    fn evict_idle(&mut self) -> bool {
        let victim = self
            .conns
            .iter_mut()
            .filter(|c| !c.dead && c.idle())
            .min_by_key(|c| c.last_active);
        match victim {
            Some(c) => {
                c.dead = true;
                true
            }
            None => false,
        }
    }

    /// Close connections past their deadline.
    fn expire(&mut self) {
        let now = Instant::now();
        let (rt, wt) = (self.request_timeout, self.write_timeout);
        for c in &mut self.conns {
            if c.deadline(rt, wt).is_some_and(|d| d <= now) {
                c.dead = true;
            }
        }
    }

    /// The handler (tests).
    #[cfg(test)]
    pub fn handler(&self) -> &H {
        &self.handler
    }
}

/// Best effort: tell a connection there is no room, then drop it. What it sent already is
/// read first, so closing does not reset the connection under the client's feet.
fn refuse(stream: UnixStream) {
    if stream.set_nonblocking(true).is_ok() {
        let mut sink = [0u8; 4096];
        // At most 16 reads: a client that keeps sending does not keep the server here.
        for _ in 0..16 {
            if !matches!((&stream).read(&mut sink), Ok(n) if n > 0) {
                break;
            }
        }
        let _ = (&stream).write(&http::server_full());
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
}

/// `poll(2)` on `fds` for at most `timeout` (`None`: without end). Errors (EINTR) return
/// early; the caller just goes round again.
fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) {
    let ms = timeout.map_or(-1, |t| {
        // Round up so a deadline is not polled for with 0 ms again and again.
        i32::try_from(t.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
    });
    let n = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
    // SAFETY: `fds` is a valid, writable array of `n` pollfd structures for the whole call.
    unsafe { libc::poll(fds.as_mut_ptr(), n, ms) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Echoes method, path and body length; counts requests.
    #[derive(Default)]
    struct Echo {
        seen: usize,
    }

    impl Handler for Echo {
        fn handle(&mut self, req: &Request) -> Response {
            self.seen += 1;
            Response::json(&serde_json::json!({
                "method": req.method,
                "path": req.path,
                "body": req.body.as_ref().map(Vec::len),
            }))
        }
    }

    fn socket_path(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("kestrel-srv-{}-{tag}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// A server on its own thread; returns the socket path.
    fn serve(tag: &str, max_body: usize) -> PathBuf {
        let p = socket_path(tag);
        let l = UnixListener::bind(&p).unwrap();
        let s = Server::new(l, Echo::default(), max_body).unwrap();
        std::thread::spawn(move || s.run());
        p
    }

    fn read_response(s: &mut UnixStream) -> String {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let mut b = [0u8; 4096];
        loop {
            let n = s.read(&mut b).unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&b[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some(i) = text.find("\r\n\r\n") {
                let len = text[..i]
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= i + 4 + len {
                    break;
                }
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    #[test]
    fn keep_alive_pipelining_and_expect_continue() {
        let p = serve("ka", http::DEFAULT_MAX_BODY);
        let mut s = UnixStream::connect(&p).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\nPUT /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap();
        // Both answers, in order (they may arrive in one read).
        let mut r = read_response(&mut s);
        if !r.contains("\"body\":3") {
            r += &read_response(&mut s);
        }
        let (get, put) = (r.find("\"method\":\"GET\""), r.find("\"body\":3"));
        assert!(get.is_some() && get < put, "{r}");
        s.write_all(b"PUT /y HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            .unwrap();
        let mut b = [0u8; 64];
        let n = s.read(&mut b).unwrap();
        assert_eq!(&b[..n], http::CONTINUE);
        s.write_all(b"hi").unwrap();
        let r = read_response(&mut s);
        assert!(r.contains("\"path\":\"/y\""), "{r}");
    }

    #[test]
    fn bad_requests_get_400_and_the_connection_closes() {
        let p = serve("bad", 16);
        for req in [
            &b"GARBAGE\x01\r\n\r\n"[..],
            b"PUT / HTTP/1.1\r\nContent-Length: 17\r\n\r\n",
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let mut s = UnixStream::connect(&p).unwrap();
            s.write_all(req).unwrap();
            let r = read_response(&mut s);
            assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
            assert!(r.contains("fault_message"), "{r}");
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "closed after the error");
        }
    }

    #[test]
    fn connections_are_bounded_and_slow_clients_do_not_block_others() {
        let p = serve("limit", http::DEFAULT_MAX_BODY);
        // Ten clients that began a request and stopped.
        let mut stuck = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = UnixStream::connect(&p).unwrap();
            s.write_all(b"PUT /x HTTP/1.1\r\nContent-Len").unwrap();
            stuck.push(s);
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut s = UnixStream::connect(&p).unwrap();
        let r = read_response(&mut s);
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        // Idle connections are closed for newcomers instead.
        drop(stuck);
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(UnixStream::connect(&p).unwrap());
        }
        std::thread::sleep(IDLE_GRACE + Duration::from_millis(100));
        let mut s = UnixStream::connect(&p).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let r = read_response(&mut s);
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    }

    #[test]
    fn a_stalled_request_times_out() {
        let p = socket_path("timeout");
        let l = UnixListener::bind(&p).unwrap();
        let limit = Duration::from_millis(300);
        let mut srv = Server::new(l, Echo::default(), 100)
            .unwrap()
            .with_timeouts(limit, limit);
        let mut s = UnixStream::connect(&p).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let t0 = Instant::now();
        let mut seen = false;
        while t0.elapsed() < Duration::from_secs(5) {
            srv.turn(Some(Duration::from_millis(50)));
            if !srv.conns.is_empty() {
                seen = true;
            } else if seen {
                break;
            }
        }
        assert!(
            seen && srv.conns.is_empty(),
            "the stalled connection was dropped"
        );
        assert!(t0.elapsed() >= limit);
        assert_eq!(srv.handler().seen, 0);
        let mut rest = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    }
}
