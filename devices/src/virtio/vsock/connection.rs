//! One vsock stream connection between a guest socket and a host Unix stream: its state
//! machine and its credit accounting (virtio 1.2 §5.10.6.3).
//!
//! The connection is pure logic over a [`ConnStream`] (a Unix stream in the device, a mock in
//! the tests): the muxer feeds it guest packets ([`Connection::recv_pkt`]) and stream readiness
//! ([`Connection::on_readable`], [`Connection::on_writable`], [`Connection::on_hup`]), asks it for
//! the next packet to the guest ([`Connection::next_pkt`]) and for the readiness it wants to
//! watch ([`Connection::interest`]).
//!
//! Credit, both ways:
//! - host → guest: we never send more payload than `peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`
//!   (the guest's free receive space as it last told us). Without credit the stream is not read,
//!   so a slow guest reader throttles the host writer; a `CREDIT_REQUEST` asks for news.
//! - guest → host: we advertise [`CONN_BUF_ALLOC`] and hold at most that much guest payload that
//!   the Unix peer has not taken yet; a guest that sends beyond its credit is reset. A
//!   `CREDIT_UPDATE` goes out when the guest's view of our free space falls below
//!   [`CREDIT_UPDATE_THRESHOLD`] and we really have at least that much free again.

use std::collections::VecDeque;
use std::io::{self, ErrorKind};
use std::num::Wrapping;
use std::time::{Duration, Instant};

use super::packet::{
    op, Header, HOST_CID, MAX_PKT_DATA, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use crate::virtio::len_u32;

/// Receive buffer we advertise per connection (`buf_alloc`): the most guest payload we hold
/// for a Unix peer that reads slowly. With [`super::muxer::MAX_CONNECTIONS`] connections this
/// bounds what one VM can make the host buffer to [`super::muxer::MAX_BUFFERED_BYTES`]; a guest
/// that sends beyond it is reset.
pub const CONN_BUF_ALLOC: u32 = 64 * 1024;
/// A credit update is sent once the guest believes less than this is free (and we really
/// have at least this much free again).
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// The host side of a connection.
pub trait ConnStream {
    /// Non-blocking read; `Ok(0)` is end of stream.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Non-blocking write.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Shut down the write side (the peer reads end of stream).
    fn shutdown_write(&mut self) -> io::Result<()>;
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: a `REQUEST` is (being) sent to the guest; waiting for `RESPONSE`.
    LocalInit,
    /// Guest-initiated: the Unix side is connected; the `RESPONSE` is not sent yet.
    PeerInit,
    /// Data flows (possibly half-closed one way).
    Established,
    /// Finished; the muxer removes it (and sends `RST` when [`Connection::needs_rst`]).
    Closed,
}

/// Why a guest packet killed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvError {
    /// The guest sent more payload than its credit allowed.
    CreditViolation,
    /// The packet is not valid in the connection's state.
    Protocol,
    /// The Unix stream failed.
    Stream,
}

/// Timeouts that apply to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnTimeouts {
    /// How long a host-initiated request waits for the guest's `RESPONSE`.
    pub connect: Duration,
    /// How long a shut-down connection waits for the final `RST` (or for its buffered
    /// payload to drain) before it is reset.
    pub close: Duration,
}

/// One connection. See the module documentation.
pub struct Connection<S> {
    stream: S,
    state: State,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    timeouts: ConnTimeouts,
    deadline: Option<Instant>,
    was_established: bool,
    rst: bool,

    // Host -> guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    readable: bool,
    credit_requested: bool,

    // Guest -> host.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    out: VecDeque<u8>,
    prefix: Vec<u8>,
    prefix_off: usize,

    // Control packets owed to the guest.
    send_request: bool,
    send_credit_update: bool,
    send_credit_request: bool,
    shut_wanted: u32,

    // Shutdown bookkeeping.
    local_shut: u32,
    peer_shut: u32,
    stream_eof: bool,
    stream_hup: bool,
    stream_write_shut: bool,
}

impl<S: ConnStream> Connection<S> {
    fn new(
        stream: S,
        state: State,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        timeouts: ConnTimeouts,
    ) -> Self {
        Connection {
            stream,
            state,
            guest_cid,
            local_port,
            peer_port,
            timeouts,
            deadline: None,
            was_established: false,
            rst: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            readable: false,
            credit_requested: false,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            out: VecDeque::new(),
            prefix: Vec::new(),
            prefix_off: 0,
            send_request: false,
            send_credit_update: false,
            send_credit_request: false,
            shut_wanted: 0,
            local_shut: 0,
            peer_shut: 0,
            stream_eof: false,
            stream_hup: false,
            stream_write_shut: false,
        }
    }

    /// A host-initiated connection: `stream` asked for guest port `peer_port`; the host side is
    /// `local_port`. The `REQUEST` is the first packet it sends; the guest has until
    /// `timeouts.connect` to answer.
    pub fn new_local(
        stream: S,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        timeouts: ConnTimeouts,
        now: Instant,
    ) -> Self {
        let mut c = Self::new(
            stream,
            State::LocalInit,
            guest_cid,
            local_port,
            peer_port,
            timeouts,
        );
        c.send_request = true;
        c.deadline = Some(now + timeouts.connect);
        c
    }

    /// A guest-initiated connection whose Unix side is already connected; `req` is the guest's
    /// `REQUEST`. The `RESPONSE` is the first packet it sends.
    pub fn new_peer(stream: S, req: &Header, timeouts: ConnTimeouts) -> Self {
        let mut c = Self::new(
            stream,
            State::PeerInit,
            req.src_cid,
            req.dst_port,
            req.src_port,
            timeouts,
        );
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        c
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Host-side port.
    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    /// Guest-side port.
    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    /// The host stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Whether the connection is finished.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether the guest must be sent an `RST` for this (closed) connection.
    pub fn needs_rst(&self) -> bool {
        self.rst
    }

    /// Whether the connection ever reached [`State::Established`].
    pub fn was_established(&self) -> bool {
        self.was_established
    }

    /// When [`Connection::on_deadline`] must run, if at all.
    pub fn deadline(&self) -> Option<Instant> {
        if self.is_closed() {
            None
        } else {
            self.deadline
        }
    }

    /// Payload credit the guest has given us: what we may still send it.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest payload held for the Unix peer.
    pub fn buffered(&self) -> usize {
        self.out.len()
    }

    /// The guest's view of our free receive space.
    fn guest_view_free(&self) -> u32 {
        let guest_tx_cnt = self.fwd_cnt + Wrapping(len_u32(self.out.len()));
        CONN_BUF_ALLOC.saturating_sub((guest_tx_cnt - self.last_fwd_cnt_sent).0)
    }

    fn kill(&mut self) {
        self.state = State::Closed;
        self.rst = true;
    }

    fn can_read(&self) -> bool {
        self.state == State::Established && !self.stream_eof && self.peer_shut & SHUTDOWN_RCV == 0
    }

    fn want_shutdown(&mut self, flags: u32) {
        self.shut_wanted |= flags & !self.local_shut;
    }

    /// The connection has something for the guest: [`Connection::next_pkt`] would return a
    /// packet given an rx buffer.
    pub fn has_rx(&self) -> bool {
        match self.state {
            State::Closed => false,
            State::LocalInit => self.send_request,
            State::PeerInit => true,
            State::Established => {
                self.shut_wanted != 0
                    || self.send_credit_update
                    || self.send_credit_request
                    || (self.readable
                        && self.can_read()
                        && (self.peer_credit() > 0 || !self.credit_requested))
            }
        }
    }

    /// Readiness of the stream the connection wants to hear about: `None` to stop watching
    /// the stream altogether (closed, or hung up with nothing left to wait for — hang-ups are
    /// reported whatever the interest, so a hung-up stream must leave the epoll set).
    pub fn interest(&self) -> Option<(bool, bool)> {
        if self.is_closed() {
            return None;
        }
        let want_in = self.can_read() && !self.readable && self.peer_credit() > 0;
        let want_out = !self.stream_write_shut
            && (self.prefix_off < self.prefix.len() || !self.out.is_empty());
        if self.stream_hup && !want_in && !want_out {
            return None;
        }
        Some((want_in, want_out))
    }

    fn header(&mut self, op: u16, flags: u32, len: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        // Every packet tells the guest our fwd_cnt, so no separate update is owed any more.
        self.send_credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, if any. Payload (for `RW`) is read from the stream into
    /// `buf`, at most `buf.len()` bytes and never more than the guest's credit; its length is
    /// the header's `len`.
    pub fn next_pkt(&mut self, buf: &mut [u8]) -> Option<Header> {
        match self.state {
            State::Closed => return None,
            State::LocalInit => {
                if self.send_request {
                    self.send_request = false;
                    return Some(self.header(op::REQUEST, 0, 0));
                }
                return None;
            }
            State::PeerInit => {
                self.state = State::Established;
                self.was_established = true;
                return Some(self.header(op::RESPONSE, 0, 0));
            }
            State::Established => {}
        }
        if self.readable && self.can_read() {
            let credit = self.peer_credit() as usize;
            if credit == 0 {
                if !self.credit_requested {
                    self.credit_requested = true;
                    self.send_credit_request = true;
                }
            } else if !buf.is_empty() {
                let max = buf.len().min(credit).min(MAX_PKT_DATA);
                match self.stream.read(&mut buf[..max]) {
                    Ok(0) => {
                        self.readable = false;
                        self.stream_eof = true;
                        let flags = if self.stream_hup {
                            SHUTDOWN_BOTH
                        } else {
                            SHUTDOWN_SEND
                        };
                        self.want_shutdown(flags);
                    }
                    Ok(n) => {
                        let n = n.min(max);
                        self.rx_cnt += Wrapping(len_u32(n));
                        return Some(self.header(op::RW, 0, len_u32(n)));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::debug!("vsock {}: stream read: {e}", self.local_port);
                        self.kill();
                        return None;
                    }
                }
            }
        }
        if self.shut_wanted != 0 {
            let flags = self.shut_wanted;
            self.shut_wanted = 0;
            self.local_shut |= flags;
            if self.local_shut == SHUTDOWN_BOTH && self.deadline.is_none() {
                // Wait for the guest's RST, but not forever.
                self.deadline = Some(Instant::now() + self.timeouts.close);
            }
            return Some(self.header(op::SHUTDOWN, flags, 0));
        }
        if self.send_credit_update {
            return Some(self.header(op::CREDIT_UPDATE, 0, 0));
        }
        if self.send_credit_request {
            self.send_credit_request = false;
            return Some(self.header(op::CREDIT_REQUEST, 0, 0));
        }
        None
    }

    /// A packet from the guest for this connection (already validated: our ports, stream
    /// type, a known op, payload only on `RW`). `data` is the payload.
    pub fn recv_pkt(&mut self, hdr: &Header, data: &[u8], now: Instant) -> Result<(), RecvError> {
        if self.is_closed() {
            return Ok(());
        }
        // Every packet carries the guest's current credit.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        let r = match (self.state, hdr.op) {
            (_, op::RST) => {
                self.state = State::Closed;
                self.rst = false;
                Ok(())
            }
            (State::LocalInit, op::RESPONSE) => {
                self.state = State::Established;
                self.was_established = true;
                self.deadline = None;
                self.prefix = format!("OK {}\n", self.local_port).into_bytes();
                self.flush();
                Ok(())
            }
            (_, op::CREDIT_UPDATE) => Ok(()),
            (State::Established, op::CREDIT_REQUEST) => {
                self.send_credit_update = true;
                Ok(())
            }
            (State::Established, op::RW) => self.recv_data(data),
            (State::Established, op::SHUTDOWN) => {
                self.peer_shut |= hdr.flags & SHUTDOWN_BOTH;
                if self.peer_shut & SHUTDOWN_RCV != 0 {
                    // Whatever the Unix peer still sends has nowhere to go.
                    self.readable = false;
                }
                self.flush();
                Ok(())
            }
            // REQUEST on a live connection, RESPONSE out of turn, anything before the
            // handshake completes.
            _ => Err(RecvError::Protocol),
        };
        if r.is_err() {
            self.kill();
        }
        self.check_close(now);
        r
    }

    fn recv_data(&mut self, data: &[u8]) -> Result<(), RecvError> {
        if self.peer_shut & SHUTDOWN_SEND != 0 {
            return Err(RecvError::Protocol);
        }
        if self.out.len() + data.len() > CONN_BUF_ALLOC as usize {
            return Err(RecvError::CreditViolation);
        }
        let mut data = data;
        if self.out.is_empty() && self.prefix_off == self.prefix.len() && !self.stream_write_shut {
            // Fast path: straight to the stream.
            while !data.is_empty() {
                match self.stream.write(data) {
                    Ok(0) => return Err(RecvError::Stream),
                    Ok(n) => {
                        let n = n.min(data.len());
                        self.fwd_cnt += Wrapping(len_u32(n));
                        data = &data[n..];
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::debug!("vsock {}: stream write: {e}", self.local_port);
                        return Err(RecvError::Stream);
                    }
                }
            }
        }
        self.out.extend(data);
        self.update_credit_need();
        Ok(())
    }

    /// Write what is buffered for the Unix peer. Kills the connection on a stream error.
    fn flush(&mut self) {
        if self.is_closed() {
            return;
        }
        if self.stream_write_shut {
            self.out.clear();
            return;
        }
        loop {
            let r = if self.prefix_off < self.prefix.len() {
                self.stream.write(&self.prefix[self.prefix_off..])
            } else if !self.out.is_empty() {
                let (front, _) = self.out.as_slices();
                self.stream.write(front)
            } else {
                break;
            };
            match r {
                Ok(0) => {
                    self.kill();
                    return;
                }
                Ok(n) => {
                    if self.prefix_off < self.prefix.len() {
                        self.prefix_off = (self.prefix_off + n).min(self.prefix.len());
                    } else {
                        let n = n.min(self.out.len());
                        self.out.drain(..n);
                        self.fwd_cnt += Wrapping(len_u32(n));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("vsock {}: stream write: {e}", self.local_port);
                    self.kill();
                    return;
                }
            }
        }
        if self.out.is_empty() && self.out.capacity() > 64 * 1024 {
            self.out.shrink_to(64 * 1024);
        }
        let drained = self.prefix_off == self.prefix.len() && self.out.is_empty();
        if drained && self.peer_shut & SHUTDOWN_SEND != 0 && !self.stream_write_shut {
            // The guest sends no more: the Unix peer reads end of stream.
            self.stream_write_shut = true;
            if let Err(e) = self.stream.shutdown_write() {
                tracing::debug!("vsock {}: stream shutdown: {e}", self.local_port);
            }
        }
        self.update_credit_need();
    }

    fn update_credit_need(&mut self) {
        if self.state != State::Established || self.peer_shut & SHUTDOWN_SEND != 0 {
            return;
        }
        let really_free = CONN_BUF_ALLOC.saturating_sub(len_u32(self.out.len()));
        if self.guest_view_free() < CREDIT_UPDATE_THRESHOLD
            && really_free >= CREDIT_UPDATE_THRESHOLD
        {
            self.send_credit_update = true;
        }
    }

    /// Closing rules once shutdowns have been exchanged.
    fn check_close(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        if self.peer_shut == SHUTDOWN_BOTH {
            let drained = self.prefix_off == self.prefix.len() && self.out.is_empty();
            if drained || self.stream_write_shut {
                // The guest closed and everything it sent was delivered: answer with the
                // RST that completes a clean disconnect.
                self.kill();
                return;
            }
            if self.deadline.is_none() {
                self.deadline = Some(now + self.timeouts.close);
            }
        }
    }

    /// The stream has data (or end of stream) to read.
    pub fn on_readable(&mut self) {
        if self.can_read() {
            self.readable = true;
        }
    }

    /// The stream can take more bytes.
    pub fn on_writable(&mut self, now: Instant) {
        self.flush();
        self.check_close(now);
    }

    /// The Unix peer is gone (both directions shut).
    pub fn on_hup(&mut self) {
        if self.is_closed() {
            return;
        }
        self.stream_hup = true;
        match self.state {
            State::LocalInit => self.kill(),
            State::PeerInit | State::Established => {
                if self.can_read() {
                    // Deliver what is left, then tell the guest (SHUTDOWN both at EOF).
                    self.readable = true;
                } else {
                    self.want_shutdown(SHUTDOWN_BOTH);
                }
            }
            State::Closed => {}
        }
    }

    /// The stream reported an error.
    pub fn on_error(&mut self) {
        if !self.is_closed() {
            self.kill();
        }
    }

    /// The deadline passed: a request the guest never answered, or a close that never
    /// completed. Resets the connection.
    pub fn on_deadline(&mut self, now: Instant) {
        if let Some(d) = self.deadline {
            if now >= d && !self.is_closed() {
                self.kill();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory stream: `input` is what the Unix peer sent us, `output` what we wrote;
    /// `write_room` limits how much a write takes (the peer's socket buffer).
    #[derive(Default)]
    struct Mock {
        input: VecDeque<u8>,
        input_eof: bool,
        output: Vec<u8>,
        write_room: usize,
        write_err: bool,
        shut: bool,
    }

    impl ConnStream for Mock {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.input.is_empty() {
                return if self.input_eof {
                    Ok(0)
                } else {
                    Err(ErrorKind::WouldBlock.into())
                };
            }
            let n = buf.len().min(self.input.len());
            for (i, b) in self.input.drain(..n).enumerate() {
                buf[i] = b;
            }
            Ok(n)
        }
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.write_err {
                return Err(ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(self.write_room);
            if n == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            self.write_room -= n;
            self.output.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn shutdown_write(&mut self) -> io::Result<()> {
            self.shut = true;
            Ok(())
        }
    }

    const CID: u64 = 3;
    const T: ConnTimeouts = ConnTimeouts {
        connect: Duration::from_secs(2),
        close: Duration::from_secs(2),
    };

    fn guest(op: u16, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn mock(room: usize) -> Mock {
        Mock {
            write_room: room,
            ..Default::default()
        }
    }

    /// A guest-initiated connection past its RESPONSE.
    fn established(room: usize, guest_buf: u32) -> Connection<Mock> {
        let mut c = Connection::new_peer(mock(room), &guest(op::REQUEST, 0, guest_buf, 0), T);
        assert_eq!(c.state(), State::PeerInit);
        let h = c.next_pkt(&mut [0u8; 16]).unwrap();
        assert_eq!(h.op, op::RESPONSE);
        assert_eq!((h.src_port, h.dst_port), (52, 1000));
        assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, CID));
        assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
        assert_eq!(c.state(), State::Established);
        c
    }

    #[test]
    fn host_initiated_handshake_writes_ok_line() {
        let now = Instant::now();
        let mut c = Connection::new_local(mock(1 << 20), CID, 1 << 30, 52, T, now);
        assert!(c.has_rx());
        let h = c.next_pkt(&mut [0u8; 16]).unwrap();
        assert_eq!(h.op, op::REQUEST);
        assert_eq!((h.src_port, h.dst_port, h.dst_cid), (1 << 30, 52, CID));
        assert!(!c.has_rx());
        assert_eq!(c.interest(), Some((false, false)));
        let mut resp = guest(op::RESPONSE, 0, 4096, 0);
        resp.src_port = 52;
        resp.dst_port = 1 << 30;
        c.recv_pkt(&resp, &[], now).unwrap();
        assert_eq!(c.state(), State::Established);
        assert_eq!(c.stream().output, format!("OK {}\n", 1u32 << 30).as_bytes());
        assert_eq!(c.deadline(), None);
        // Now the stream is read.
        assert_eq!(c.interest(), Some((true, false)));
    }

    #[test]
    fn host_initiated_refused_by_rst_or_timeout() {
        let now = Instant::now();
        let mut c = Connection::new_local(mock(100), CID, 1 << 30, 52, T, now);
        c.next_pkt(&mut []).unwrap();
        c.recv_pkt(&guest(op::RST, 0, 0, 0), &[], now).unwrap();
        assert!(c.is_closed() && !c.needs_rst() && !c.was_established());
        assert!(c.stream().output.is_empty());

        let mut c = Connection::new_local(mock(100), CID, 1 << 30, 52, T, now);
        c.on_deadline(now + Duration::from_secs(1));
        assert!(!c.is_closed());
        c.on_deadline(now + Duration::from_secs(2));
        assert!(c.is_closed() && c.needs_rst());
        // Data before the handshake completes is a protocol error.
        let mut c = Connection::new_local(mock(100), CID, 1 << 30, 52, T, now);
        assert_eq!(
            c.recv_pkt(&guest(op::RW, 1, 0, 0), b"x", now),
            Err(RecvError::Protocol)
        );
        assert!(c.needs_rst());
        // The host client going away cancels the request.
        let mut c = Connection::new_local(mock(100), CID, 1 << 30, 52, T, now);
        c.on_hup();
        assert!(c.is_closed() && c.needs_rst());
    }

    #[test]
    fn host_to_guest_respects_credit() {
        let mut c = established(0, 1000);
        c.stream.input.extend(vec![7u8; 5000]);
        c.on_readable();
        let mut buf = vec![0u8; 4096];
        let h = c.next_pkt(&mut buf).unwrap();
        assert_eq!((h.op, h.len), (op::RW, 1000));
        assert_eq!(c.peer_credit(), 0);
        // Out of credit: one CREDIT_REQUEST, then nothing, and the stream is not watched.
        let h = c.next_pkt(&mut buf).unwrap();
        assert_eq!(h.op, op::CREDIT_REQUEST);
        assert!(!c.has_rx());
        assert!(c.next_pkt(&mut buf).is_none());
        assert_eq!(c.interest(), Some((false, false)));
        // The guest consumed 600 bytes.
        let now = Instant::now();
        c.recv_pkt(&guest(op::CREDIT_UPDATE, 0, 1000, 600), &[], now)
            .unwrap();
        assert!(c.has_rx());
        let h = c.next_pkt(&mut buf).unwrap();
        assert_eq!((h.op, h.len), (op::RW, 600));
        // A larger buffer, and fwd_cnt wrapping around u32.
        c.recv_pkt(
            &guest(op::CREDIT_UPDATE, 0, 1 << 20, 1600),
            &[],
            Instant::now(),
        )
        .unwrap();
        let h = c.next_pkt(&mut buf).unwrap();
        assert_eq!(h.len, 3400);
        // A guest claiming to have consumed more than it got gives no credit.
        c.recv_pkt(&guest(op::CREDIT_UPDATE, 0, 1 << 20, 99_999), &[], now)
            .unwrap();
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn credit_wraps_around_u32() {
        let mut c = established(0, 100);
        c.rx_cnt = Wrapping(u32::MAX - 10);
        c.peer_fwd_cnt = Wrapping(u32::MAX - 10);
        c.stream.input.extend(vec![1u8; 50]);
        c.on_readable();
        let h = c.next_pkt(&mut [0u8; 64]).unwrap();
        assert_eq!(h.len, 50);
        assert_eq!(c.rx_cnt, Wrapping(39));
        assert_eq!(c.peer_credit(), 50);
        c.recv_pkt(&guest(op::CREDIT_UPDATE, 0, 100, 39), &[], Instant::now())
            .unwrap();
        assert_eq!(c.peer_credit(), 100);
    }

    #[test]
    fn guest_to_host_buffers_up_to_buf_alloc_then_resets() {
        let now = Instant::now();
        let mut c = established(10, 4096);
        let chunk = vec![9u8; 60 * 1024];
        c.recv_pkt(
            &guest(op::RW, u32::try_from(chunk.len()).unwrap(), 4096, 0),
            &chunk,
            now,
        )
        .unwrap();
        assert_eq!(c.stream().output.len(), 10);
        assert_eq!(c.buffered(), chunk.len() - 10);
        assert_eq!(c.interest(), Some((true, true)));
        // Fill up to exactly buf_alloc (counting what the peer took: 10 bytes were forwarded).
        let rest = CONN_BUF_ALLOC as usize - c.buffered();
        let big = vec![1u8; rest];
        c.recv_pkt(
            &guest(op::RW, u32::try_from(rest).unwrap(), 4096, 0),
            &big,
            now,
        )
        .unwrap();
        assert_eq!(c.buffered(), CONN_BUF_ALLOC as usize);
        // One byte more than the credit: reset.
        assert_eq!(
            c.recv_pkt(&guest(op::RW, 1, 4096, 0), b"x", now),
            Err(RecvError::CreditViolation)
        );
        assert!(c.is_closed() && c.needs_rst());
    }

    #[test]
    fn credit_update_when_guest_view_low_and_space_returns() {
        let now = Instant::now();
        let mut c = established(0, 4096);
        // The peer reads nothing: the guest fills 56 KiB of our 64.
        let data = vec![5u8; 14 * 1024];
        for _ in 0..4 {
            c.recv_pkt(
                &guest(op::RW, u32::try_from(data.len()).unwrap(), 4096, 0),
                &data,
                now,
            )
            .unwrap();
        }
        assert!(!c.has_rx(), "no update while space is really short");
        // The peer drains 20 KiB: the guest view (8 KiB free) is low, real free is 28 KiB.
        c.stream.write_room = 20 * 1024;
        c.on_writable(now);
        assert_eq!(c.buffered(), 36 * 1024);
        assert!(c.has_rx());
        let h = c.next_pkt(&mut [0u8; 16]).unwrap();
        assert_eq!(h.op, op::CREDIT_UPDATE);
        assert_eq!(h.fwd_cnt, 20 * 1024);
        assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
        assert!(!c.has_rx());
    }

    #[test]
    fn credit_request_is_answered() {
        let mut c = established(0, 4096);
        c.recv_pkt(&guest(op::CREDIT_REQUEST, 0, 4096, 0), &[], Instant::now())
            .unwrap();
        let h = c.next_pkt(&mut [0u8; 16]).unwrap();
        assert_eq!(
            (h.op, h.fwd_cnt, h.buf_alloc),
            (op::CREDIT_UPDATE, 0, CONN_BUF_ALLOC)
        );
    }

    #[test]
    fn unix_half_close_sends_shutdown_send() {
        let mut c = established(1 << 20, 4096);
        c.stream.input.extend(b"bye");
        c.stream.input_eof = true;
        c.on_readable();
        let mut buf = [0u8; 64];
        let h = c.next_pkt(&mut buf).unwrap();
        assert_eq!((h.op, h.len), (op::RW, 3));
        assert_eq!(&buf[..3], b"bye");
        let h = c.next_pkt(&mut buf).unwrap();
        assert_eq!((h.op, h.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
        assert!(!c.has_rx());
        // The guest can still send; the peer still gets it.
        c.recv_pkt(&guest(op::RW, 2, 4096, 3), b"hi", Instant::now())
            .unwrap();
        assert_eq!(c.stream().output, b"hi");
        // Guest closes: SHUTDOWN both → RST back (clean disconnect).
        let mut s = guest(op::SHUTDOWN, 0, 4096, 3);
        s.flags = SHUTDOWN_BOTH;
        c.recv_pkt(&s, &[], Instant::now()).unwrap();
        assert!(c.is_closed() && c.needs_rst());
    }

    #[test]
    fn unix_full_close_sends_shutdown_both_then_waits_for_rst() {
        let mut c = established(1 << 20, 4096);
        c.stream.input.extend(b"end");
        c.stream.input_eof = true;
        c.on_hup();
        assert!(c.has_rx());
        let mut buf = [0u8; 64];
        assert_eq!(c.next_pkt(&mut buf).unwrap().len, 3);
        let h = c.next_pkt(&mut buf).unwrap();
        assert_eq!((h.op, h.flags), (op::SHUTDOWN, SHUTDOWN_BOTH));
        // Nothing left to watch on a hung-up stream.
        assert_eq!(c.interest(), None);
        assert!(!c.is_closed());
        // The guest answers RST.
        c.recv_pkt(&guest(op::RST, 0, 4096, 3), &[], Instant::now())
            .unwrap();
        assert!(c.is_closed() && !c.needs_rst());
    }

    #[test]
    fn close_times_out_without_guest_rst() {
        let mut c = established(1 << 20, 4096);
        c.stream.input_eof = true;
        c.on_hup();
        let mut buf = [0u8; 8];
        let h = c.next_pkt(&mut buf).unwrap();
        assert_eq!(h.flags, SHUTDOWN_BOTH);
        let d = c.deadline().unwrap();
        c.on_deadline(d);
        assert!(c.is_closed() && c.needs_rst());
    }

    #[test]
    fn guest_shutdown_send_flushes_then_shuts_stream() {
        let now = Instant::now();
        let mut c = established(2, 4096);
        c.recv_pkt(&guest(op::RW, 5, 4096, 0), b"hello", now)
            .unwrap();
        let mut s = guest(op::SHUTDOWN, 0, 4096, 0);
        s.flags = SHUTDOWN_SEND;
        c.recv_pkt(&s, &[], now).unwrap();
        assert!(!c.stream().shut, "not before the buffer is delivered");
        c.stream.write_room = 100;
        c.on_writable(now);
        assert_eq!(c.stream().output, b"hello");
        assert!(c.stream().shut);
        // More data after SHUTDOWN(SEND) is a protocol error.
        assert_eq!(
            c.recv_pkt(&guest(op::RW, 1, 4096, 0), b"x", now),
            Err(RecvError::Protocol)
        );
    }

    #[test]
    fn guest_close_with_undelivered_data_waits_then_resets() {
        let now = Instant::now();
        let mut c = established(0, 4096);
        c.recv_pkt(&guest(op::RW, 3, 4096, 0), b"abc", now).unwrap();
        let mut s = guest(op::SHUTDOWN, 0, 4096, 0);
        s.flags = SHUTDOWN_BOTH;
        c.recv_pkt(&s, &[], now).unwrap();
        assert!(!c.is_closed());
        assert_eq!(c.interest(), Some((false, true)));
        // The peer reads: delivered, then RST.
        c.stream.write_room = 3;
        c.on_writable(now);
        assert_eq!(c.stream().output, b"abc");
        assert!(c.is_closed() && c.needs_rst());
        // Same, but the peer never reads: reset at the deadline.
        let mut c = established(0, 4096);
        c.recv_pkt(&guest(op::RW, 3, 4096, 0), b"abc", now).unwrap();
        c.recv_pkt(&s, &[], now).unwrap();
        c.on_deadline(now + T.close);
        assert!(c.is_closed() && c.needs_rst());
    }

    #[test]
    fn guest_shutdown_rcv_stops_reading() {
        let mut c = established(0, 4096);
        c.stream.input.extend(b"unwanted");
        let mut s = guest(op::SHUTDOWN, 0, 4096, 0);
        s.flags = SHUTDOWN_RCV;
        c.recv_pkt(&s, &[], Instant::now()).unwrap();
        c.on_readable();
        assert!(!c.has_rx());
        assert_eq!(c.interest(), Some((false, false)));
        // The peer leaving now: tell the guest we are done both ways.
        c.on_hup();
        let h = c.next_pkt(&mut [0u8; 16]).unwrap();
        assert_eq!((h.op, h.flags), (op::SHUTDOWN, SHUTDOWN_BOTH));
    }

    #[test]
    fn stream_errors_reset() {
        let now = Instant::now();
        let mut c = established(0, 4096);
        c.stream.write_err = true;
        assert_eq!(
            c.recv_pkt(&guest(op::RW, 1, 4096, 0), b"x", now),
            Err(RecvError::Stream)
        );
        assert!(c.needs_rst());
        let mut c = established(0, 4096);
        c.on_error();
        assert!(c.is_closed() && c.needs_rst());
    }

    #[test]
    fn protocol_errors_reset() {
        let now = Instant::now();
        for op in [op::REQUEST, op::RESPONSE] {
            let mut c = established(0, 4096);
            assert_eq!(
                c.recv_pkt(&guest(op, 0, 4096, 0), &[], now),
                Err(RecvError::Protocol)
            );
            assert!(c.is_closed() && c.needs_rst());
        }
        // Guest-initiated: nothing but RST / credit before our RESPONSE.
        let mut c = Connection::new_peer(mock(0), &guest(op::REQUEST, 0, 4096, 0), T);
        c.recv_pkt(&guest(op::CREDIT_UPDATE, 0, 8192, 0), &[], now)
            .unwrap();
        assert_eq!(c.peer_credit(), 8192);
        assert_eq!(
            c.recv_pkt(&guest(op::RW, 1, 4096, 0), b"x", now),
            Err(RecvError::Protocol)
        );
        // Packets after close are ignored.
        assert_eq!(c.recv_pkt(&guest(op::RW, 1, 4096, 0), b"x", now), Ok(()));
        assert!(c.next_pkt(&mut [0u8; 4]).is_none());
    }

    #[test]
    fn readable_without_rx_room_keeps_pending() {
        let mut c = established(0, 4096);
        c.stream.input.extend(b"data");
        c.on_readable();
        assert!(c.has_rx());
        // Not watched while pending (level-triggered epoll would spin).
        assert_eq!(c.interest(), Some((false, false)));
        // Spurious readiness: the read would block; watching resumes.
        c.stream.input.clear();
        assert!(c.next_pkt(&mut [0u8; 16]).is_none());
        assert!(!c.has_rx());
        assert_eq!(c.interest(), Some((true, false)));
    }
}
