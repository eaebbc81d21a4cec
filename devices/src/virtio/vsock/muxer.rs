//! The host side of the device: the Unix listener, the handshakes of host clients
//! (`CONNECT <port>\n`), the connection table keyed by (host port, guest port), the packets
//! waiting for rx buffers, and the epoll interest of every stream.
//!
//! Everything here runs on the event-loop thread with the subscriber's `EventOps` at hand, so
//! streams are added to, changed in and removed from the epoll set as soon as their
//! connection's needs change (`Muxer::settle`); a stream leaves the set before it is closed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnStream, ConnTimeouts, Connection, RecvError, CONN_BUF_ALLOC};
use super::packet::{op, Header, HOST_CID, TYPE_STREAM};
use super::{VsockError, VsockMetrics};
use crate::virtio::device::{own_events, own_events_raw};

/// Host ports handed to host-initiated connections start here (below are the ports guests
/// usually connect to on the host).
pub const LOCAL_PORT_BASE: u32 = 1 << 30;
/// Most connections of one VM at once, both directions, host clients still in their
/// handshake included (each holds one host fd). Beyond it a guest `REQUEST` is answered with
/// `RST` and a host client is closed without `OK`.
pub const MAX_CONNECTIONS: usize = 256;
/// Most guest payload one VM can make the host hold for Unix peers that read slowly: each
/// connection advertises [`CONN_BUF_ALLOC`] of credit and a guest that sends beyond its credit
/// is reset, so the bound holds by construction (checked at compile time). Host → guest bytes
/// are never buffered: a host socket is read only into an rx buffer the guest posted and only
/// while the guest has credit, so a full guest leaves the host writer blocked (backpressure),
/// never bytes dropped.
pub const MAX_BUFFERED_BYTES: usize = 16 << 20;
const _: () = assert!(MAX_CONNECTIONS * CONN_BUF_ALLOC as usize <= MAX_BUFFERED_BYTES);
/// Most host clients that connected but have not finished their `CONNECT` line (each also
/// counts against [`MAX_CONNECTIONS`]). Each must finish within [`Timeouts::handshake`].
pub const MAX_HANDSHAKES: usize = 64;
/// Most control packets (resets of unknown or refused connections) waiting for rx buffers.
/// While the backlog is full the tx queue is not processed.
pub const MAX_PENDING_CTRL: usize = 256;
/// Most host clients accepted per event-loop pass (the listener is level-triggered: the rest
/// are accepted on the next pass).
pub const ACCEPT_BATCH: usize = 32;
/// Longest `CONNECT <port>\n` line accepted.
pub const MAX_CONNECT_LINE: usize = 32;

/// Timeouts of the host side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A host client must send its `CONNECT` line within this.
    pub handshake: Duration,
    /// Per-connection timeouts (guest response, close).
    pub conn: ConnTimeouts,
    /// After `accept` fails for want of resources, the listener rests this long.
    pub listener_retry: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(5),
            conn: ConnTimeouts {
                connect: Duration::from_secs(2),
                close: Duration::from_secs(2),
            },
            listener_retry: Duration::from_millis(100),
        }
    }
}

/// Table sizes of one muxer ([`MAX_CONNECTIONS`], [`MAX_HANDSHAKES`]; smaller in tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connections (host handshakes included).
    pub connections: usize,
    /// Most host clients in their handshake.
    pub handshakes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: MAX_CONNECTIONS,
            handshakes: MAX_HANDSHAKES,
        }
    }
}

/// A connection's identity: (host port, guest port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey {
    /// Host-side port.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
}

/// A Unix stream as a connection's host side. Writes use `MSG_NOSIGNAL`: a peer that went
/// away is an error, never a `SIGPIPE` for the embedding process.
pub struct UnixConn(UnixStream);

impl ConnStream for UnixConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        crate::sigpipe::send(self.0.as_raw_fd(), buf, 0)
    }

    fn shutdown_write(&mut self) -> io::Result<()> {
        self.0.shutdown(std::net::Shutdown::Write)
    }
}

impl AsRawFd for UnixConn {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// `<uds_path>_<port>`: where guest connections to host port `port` go.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(uds_path.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// `AF_UNIX` as `sockaddr_un` holds it.
#[allow(clippy::cast_possible_truncation)] // AF_UNIX is 1.
const AF_UNIX: libc::sa_family_t = libc::AF_UNIX as libc::sa_family_t;

/// Connect to a Unix stream listener without blocking: a listener whose backlog is full
/// fails (`EAGAIN`) instead of stalling the event loop.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: `sockaddr_un` is plain old data, for which all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "path does not fit a Unix socket address",
        ));
    }
    addr.sun_family = AF_UNIX;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    // At most the size of `sockaddr_un` (the path length was checked above).
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    let len =
        libc::socklen_t::try_from(len).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created here that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid `sockaddr_un` living across the call, and `len` (family plus
    // path plus NUL) does not exceed its size.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// Parse `CONNECT <port>` (the line without its `\n`; a trailing `\r` is tolerated).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

struct Entry {
    conn: Connection<UnixConn>,
    /// What the epoll set holds for the stream: `None` = not in the set; else (IN, OUT).
    watched: Option<(bool, bool)>,
    /// In the rx round-robin queue.
    queued: bool,
    host_initiated: bool,
    counted_open: bool,
}

#[derive(Debug, Clone, Copy)]
enum FdOwner {
    Handshake,
    Conn(ConnKey),
}

fn event_set((rd, wr): (bool, bool)) -> EventSet {
    let mut s = EventSet::empty();
    if rd {
        s |= EventSet::IN;
    }
    if wr {
        s |= EventSet::OUT;
    }
    s
}

fn rst_reply(to: &Header) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: to.src_cid,
        src_port: to.dst_port,
        dst_port: to.src_port,
        len: 0,
        type_: TYPE_STREAM,
        op: op::RST,
        flags: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    }
}

/// Token (see [`crate::virtio::device::own_events`]) of the host-side listener.
pub const LISTENER: u32 = 0;
/// Token of the timer for handshake, connection and listener-retry deadlines.
pub const TIMER: u32 = 1;
/// Token of a host stream (a client in its `CONNECT` handshake, or a connection).
pub const STREAM: u32 = 2;

/// The connection multiplexer. See the module documentation.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    _registration: super::registry::Registration,
    listener_watched: bool,
    listener_retry_at: Option<Instant>,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    conns: BTreeMap<ConnKey, Entry>,
    fds: HashMap<RawFd, FdOwner>,
    handshakes: HashMap<RawFd, Handshake>,
    ctrl: VecDeque<Header>,
    rxq: VecDeque<ConnKey>,
    next_port: u32,
    pub(crate) timeouts: Timeouts,
    pub(crate) limits: Limits,
    pub(crate) metrics: VsockMetrics,
}

impl Muxer {
    /// Bind the listener at `uds_path` (which must not exist).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let (listener, registration) = super::registry::bind(uds_path)?;
        let bind_err = |source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
        };
        let muxer_err = |e: io::Error| {
            let _ = std::fs::remove_file(uds_path);
            e
        };
        listener
            .set_nonblocking(true)
            .map_err(muxer_err)
            .map_err(bind_err)?;
        let timer = TimerFd::new()
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
            .and_then(|t| crate::set_nonblocking(t.as_raw_fd()).map(|()| t))
            .map_err(muxer_err)
            .map_err(VsockError::Timer)?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            _registration: registration,
            listener_watched: false,
            listener_retry_at: None,
            timer,
            timer_deadline: None,
            conns: BTreeMap::new(),
            fds: HashMap::new(),
            handshakes: HashMap::new(),
            ctrl: VecDeque::new(),
            rxq: VecDeque::new(),
            next_port: LOCAL_PORT_BASE,
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            metrics: VsockMetrics::default(),
        })
    }

    /// Where the listener is.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Live connections (including ones waiting for the guest's answer or a final RST).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Guest payload held for Unix peers that have not read it yet (at most
    /// [`MAX_BUFFERED_BYTES`]).
    pub fn buffered_bytes(&self) -> usize {
        self.conns.values().map(|e| e.conn.buffered()).sum()
    }

    /// Start watching the listener and the timer.
    pub fn init(&mut self, ops: &mut EventOps) {
        self.watch_listener(ops);
        if let Err(e) = ops.add(own_events(&self.timer, TIMER, EventSet::IN)) {
            tracing::error!("vsock: cannot watch the timer: {e:?}");
        }
    }

    fn watch_listener(&mut self, ops: &mut EventOps) {
        if self.listener_watched {
            return;
        }
        match ops.add(own_events(&self.listener, LISTENER, EventSet::IN)) {
            Ok(()) => self.listener_watched = true,
            Err(e) => tracing::error!("vsock: cannot watch the listener: {e:?}"),
        }
    }

    /// Readiness of one of the muxer's descriptors: `token` is what it was watched as
    /// ([`LISTENER`], [`TIMER`] or [`STREAM`]). `active`: the driver is up (host connections
    /// can be forwarded).
    pub fn handle_event(
        &mut self,
        token: u32,
        fd: RawFd,
        set: EventSet,
        ops: &mut EventOps,
        active: bool,
    ) {
        let now = Instant::now();
        match token {
            LISTENER => self.accept_all(ops, now),
            TIMER => {
                // Non-blocking: a timer re-armed since the event was queued reads EAGAIN.
                let _ = self.timer.wait();
                self.timer_deadline = None;
                self.expire(ops, now);
            }
            _ => match self.fds.get(&fd).copied().filter(|_| token == STREAM) {
                Some(FdOwner::Handshake) => self.handshake_event(fd, set, ops, active, now),
                Some(FdOwner::Conn(key)) => self.conn_event(key, set, ops, now),
                None => {
                    // Not ours (any more): make sure it stops firing.
                    tracing::debug!("vsock: event {token} for unknown fd {fd}");
                    let _ = ops.remove(Events::empty_raw(fd));
                }
            },
        }
    }

    fn conn_event(&mut self, key: ConnKey, set: EventSet, ops: &mut EventOps, now: Instant) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        if set.contains(EventSet::ERROR) {
            e.conn.on_error();
        } else {
            if set.contains(EventSet::OUT) {
                e.conn.on_writable(now);
            }
            if set.contains(EventSet::IN) {
                e.conn.on_readable();
            }
            if set.contains(EventSet::HANG_UP) {
                e.conn.on_hup();
            }
        }
        self.settle(key, ops);
    }

    fn accept_all(&mut self, ops: &mut EventOps, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= self.limits.handshakes
                        || self.handshakes.len() + self.conns.len() >= self.limits.connections
                    {
                        tracing::debug!("vsock: too many host connections; closing a new one");
                        self.metrics.conns_refused += 1;
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("vsock: host connection: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if let Err(e) = ops.add(own_events_raw(fd, STREAM, EventSet::IN)) {
                        tracing::warn!("vsock: cannot watch a host connection: {e:?}");
                        continue;
                    }
                    self.fds.insert(fd, FdOwner::Handshake);
                    self.handshakes.insert(
                        fd,
                        Handshake {
                            stream,
                            line: Vec::with_capacity(MAX_CONNECT_LINE),
                            deadline: now + self.timeouts.handshake,
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(e) => {
                    // Out of fds or memory: the listener stays readable, so rest it instead
                    // of spinning on it.
                    tracing::warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    if self.listener_watched {
                        let _ = ops.remove(Events::empty(&self.listener));
                        self.listener_watched = false;
                    }
                    self.listener_retry_at = Some(now + self.timeouts.listener_retry);
                    break;
                }
            }
        }
    }

    fn close_handshake(&mut self, fd: RawFd, ops: &mut EventOps) -> Option<UnixStream> {
        let hs = self.handshakes.remove(&fd)?;
        self.fds.remove(&fd);
        let _ = ops.remove(Events::empty_raw(fd));
        Some(hs.stream)
    }

    fn handshake_event(
        &mut self,
        fd: RawFd,
        set: EventSet,
        ops: &mut EventOps,
        active: bool,
        now: Instant,
    ) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        // Byte by byte, so nothing the client sends after the line is consumed here.
        let mut complete = false;
        let mut failed = set.contains(EventSet::ERROR);
        while !failed && !complete {
            let mut b = [0u8; 1];
            match hs.stream.read(&mut b) {
                Ok(0) => failed = true,
                Ok(_) if b[0] == b'\n' => complete = true,
                Ok(_) => {
                    hs.line.push(b[0]);
                    failed = hs.line.len() >= MAX_CONNECT_LINE;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => failed = true,
            }
        }
        if !complete && !failed {
            return;
        }
        let port = if complete {
            parse_connect(&hs.line)
        } else {
            None
        };
        let Some(stream) = self.close_handshake(fd, ops) else {
            return;
        };
        let Some(port) = port else {
            tracing::debug!("vsock: host client sent no valid CONNECT line");
            self.metrics.conns_refused += 1;
            return;
        };
        if !active || self.conns.len() >= self.limits.connections {
            tracing::debug!("vsock: CONNECT {port} refused (driver not ready or table full)");
            self.metrics.conns_refused += 1;
            return;
        }
        let local_port = self.alloc_port();
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let conn = Connection::new_local(
            UnixConn(stream),
            self.guest_cid,
            local_port,
            port,
            self.timeouts.conn,
            now,
        );
        self.insert(key, conn, true, ops);
    }

    fn alloc_port(&mut self) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = if p >= u32::MAX - 1 {
                LOCAL_PORT_BASE
            } else {
                p + 1
            };
            let lo = ConnKey {
                local_port: p,
                peer_port: 0,
            };
            let hi = ConnKey {
                local_port: p,
                peer_port: u32::MAX,
            };
            // At most MAX_CONNECTIONS ports are taken, so this ends quickly.
            if self.conns.range(lo..=hi).next().is_none() {
                return p;
            }
        }
    }

    fn insert(
        &mut self,
        key: ConnKey,
        conn: Connection<UnixConn>,
        host_initiated: bool,
        ops: &mut EventOps,
    ) {
        let fd = conn.stream().as_raw_fd();
        self.fds.insert(fd, FdOwner::Conn(key));
        self.conns.insert(
            key,
            Entry {
                conn,
                watched: None,
                queued: false,
                host_initiated,
                counted_open: false,
            },
        );
        self.settle(key, ops);
    }

    fn push_ctrl(&mut self, h: Header) {
        if self.ctrl.len() >= MAX_PENDING_CTRL {
            self.metrics.rx_ctrl_dropped += 1;
            return;
        }
        self.ctrl.push_back(h);
    }

    /// Bring the rest of the world in line with a connection's state: reap it when closed
    /// (leave the epoll set, close the stream, queue the RST), queue it for rx when it has
    /// something to send, and update the stream's epoll interest.
    fn settle(&mut self, key: ConnKey, ops: &mut EventOps) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        if e.conn.was_established() && !e.counted_open {
            e.counted_open = true;
            self.metrics.conns_opened += 1;
        }
        if !e.conn.is_closed() {
            if e.conn.has_rx() && !e.queued {
                e.queued = true;
                self.rxq.push_back(key);
            }
            let want = e.conn.interest();
            if want == e.watched {
                return;
            }
            let fd = e.conn.stream().as_raw_fd();
            let r = match (e.watched, want) {
                (None, Some(w)) => ops.add(own_events_raw(fd, STREAM, event_set(w))),
                (Some(_), Some(w)) => ops.modify(own_events_raw(fd, STREAM, event_set(w))),
                (Some(_), None) => ops.remove(Events::empty_raw(fd)),
                (None, None) => Ok(()),
            };
            match r {
                Ok(()) => {
                    e.watched = want;
                    return;
                }
                Err(err) => {
                    // Unwatched, it would never progress: reset it.
                    tracing::warn!("vsock {}: cannot watch stream: {err:?}", key.local_port);
                    e.conn.on_error();
                }
            }
        }
        // Closed: reap.
        let Some(e) = self.conns.remove(&key) else {
            return;
        };
        let fd = e.conn.stream().as_raw_fd();
        if e.watched.is_some() {
            let _ = ops.remove(Events::empty_raw(fd));
        }
        self.fds.remove(&fd);
        if e.conn.needs_rst() {
            self.push_ctrl(Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: key.local_port,
                dst_port: key.peer_port,
                len: 0,
                type_: TYPE_STREAM,
                op: op::RST,
                flags: 0,
                buf_alloc: 0,
                fwd_cnt: 0,
            });
        }
        if e.counted_open {
            self.metrics.conns_closed += 1;
        } else if e.host_initiated {
            self.metrics.conns_refused += 1;
        }
        // Dropping `e` closes the stream.
    }

    /// A validated packet from the guest (`data` is its payload).
    pub fn recv_pkt(&mut self, hdr: &Header, data: &[u8], ops: &mut EventOps) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let now = Instant::now();
        let Some(e) = self.conns.get_mut(&key) else {
            match hdr.op {
                op::REQUEST => self.guest_connect(key, hdr, ops),
                // Never answer a reset with a reset.
                op::RST => {}
                // Anything else for an unknown connection: reset it.
                _ => self.push_ctrl(rst_reply(hdr)),
            }
            return;
        };
        match e.conn.recv_pkt(hdr, data, now) {
            Ok(()) if hdr.op == op::RW => self.metrics.bytes_from_guest += data.len() as u64,
            Ok(()) => {}
            Err(RecvError::CreditViolation) => {
                tracing::debug!("vsock {}: guest exceeded its credit", key.local_port);
                self.metrics.credit_violations += 1;
            }
            Err(err) => tracing::debug!("vsock {}: reset: {err:?}", key.local_port),
        }
        self.settle(key, ops);
    }

    fn guest_connect(&mut self, key: ConnKey, hdr: &Header, ops: &mut EventOps) {
        if self.conns.len() + self.handshakes.len() >= self.limits.connections {
            tracing::debug!(
                "vsock: guest connect to {}: too many connections",
                hdr.dst_port
            );
            self.metrics.conns_refused += 1;
            self.push_ctrl(rst_reply(hdr));
            return;
        }
        let path = port_path(&self.uds_path, hdr.dst_port);
        if super::registry::is_listener(&path) {
            // Another VM's (or this VM's) own host socket: never a forwarding target.
            tracing::debug!(
                "vsock: guest connect to {} refused: it is a vsock device's listener",
                path.display()
            );
            self.metrics.conns_refused += 1;
            self.push_ctrl(rst_reply(hdr));
            return;
        }
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let conn = Connection::new_peer(UnixConn(stream), hdr, self.timeouts.conn);
                self.insert(key, conn, false, ops);
            }
            Err(e) => {
                tracing::debug!("vsock: guest connect to {}: {e}", path.display());
                self.metrics.conns_refused += 1;
                self.push_ctrl(rst_reply(hdr));
            }
        }
    }

    /// Whether a packet is waiting for an rx buffer.
    pub fn has_rx(&self) -> bool {
        !self.ctrl.is_empty() || !self.rxq.is_empty()
    }

    /// Whether the control backlog is full (the tx queue should wait for rx buffers).
    pub fn ctrl_full(&self) -> bool {
        self.ctrl.len() >= MAX_PENDING_CTRL
    }

    /// The next packet for the guest; an `RW` payload is in `buf[..len]`.
    pub fn next_rx(&mut self, buf: &mut [u8], ops: &mut EventOps) -> Option<Header> {
        if let Some(h) = self.ctrl.pop_front() {
            return Some(h);
        }
        // Each queued connection gets at most one turn per call, so one that keeps claiming
        // work without producing a packet cannot stall the loop.
        for _ in 0..self.rxq.len() {
            let Some(key) = self.rxq.pop_front() else {
                break;
            };
            let Some(e) = self.conns.get_mut(&key) else {
                continue;
            };
            e.queued = false;
            let h = e.conn.next_pkt(buf);
            // Requeues it behind the others (round robin) if it has more.
            self.settle(key, ops);
            if let Some(h) = h {
                if h.op == op::RW {
                    self.metrics.bytes_to_guest += u64::from(h.len);
                }
                return Some(h);
            }
            if let Some(h) = self.ctrl.pop_front() {
                return Some(h);
            }
        }
        None
    }

    fn expire(&mut self, ops: &mut EventOps, now: Instant) {
        let late: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in late {
            tracing::debug!("vsock: host client sent no CONNECT line in time");
            self.close_handshake(fd, ops);
            self.metrics.conns_refused += 1;
        }
        let late: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            if let Some(e) = self.conns.get_mut(&key) {
                e.conn.on_deadline(now);
            }
            self.settle(key, ops);
        }
        if self.listener_retry_at.is_some_and(|t| t <= now) {
            self.listener_retry_at = None;
            self.watch_listener(ops);
        }
    }

    /// Arm the timer for the earliest deadline (or disarm it).
    pub fn rearm_timer(&mut self) {
        let next = self
            .conns
            .values()
            .filter_map(|e| e.conn.deadline())
            .chain(self.handshakes.values().map(|h| h.deadline))
            .chain(self.listener_retry_at)
            .min();
        if next == self.timer_deadline {
            return;
        }
        let r = match next {
            None => self.timer.clear(),
            Some(d) => {
                let wait = d
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                self.timer.reset(wait, None)
            }
        };
        match r {
            Ok(()) => self.timer_deadline = next,
            Err(e) => tracing::warn!("vsock: timer: {e}"),
        }
    }

    /// Drop every connection without telling the guest (the driver was reset) and forget
    /// pending packets. Host clients still in their handshake stay.
    pub fn teardown(&mut self, ops: &mut EventOps) {
        for (_, e) in std::mem::take(&mut self.conns) {
            let fd = e.conn.stream().as_raw_fd();
            if e.watched.is_some() {
                let _ = ops.remove(Events::empty_raw(fd));
            }
            self.fds.remove(&fd);
            if e.counted_open {
                self.metrics.conns_closed += 1;
            } else if e.host_initiated {
                self.metrics.conns_refused += 1;
            }
        }
        self.ctrl.clear();
        self.rxq.clear();
    }

    #[cfg(test)]
    pub(crate) fn conn_state(&self, key: ConnKey) -> Option<super::connection::State> {
        self.conns.get(&key).map(|e| e.conn.state())
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Leave nothing behind: the socket file goes with the device.
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!("vsock: cannot remove {}: {e}", self.uds_path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT",
            b"CONNECT ",
            b"CONNECT +5",
            b"CONNECT -5",
            b"CONNECT 5 6",
            b"connect 5",
            b"CONNECT  5",
            b"CONNECT 0x10",
            b"CONNECT 00000000000000000001",
            b"\xffCONNECT 5",
        ] {
            assert_eq!(
                parse_connect(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn port_paths() {
        assert_eq!(
            port_path(Path::new("/run/v.sock"), 52),
            PathBuf::from("/run/v.sock_52")
        );
        assert!(connect_nonblocking(Path::new("")).is_err());
        let long = PathBuf::from(format!("/{}", "x".repeat(200)));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
}
