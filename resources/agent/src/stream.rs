//! Raw vsock streams for throughput and integrity checks: `stream_sink` accepts one connection
//! on a guest port and hashes everything it receives; `stream_source` connects to a host port
//! (CID 2) and sends a deterministic pseudo-random stream ([`XorShift`], see
//! docs/agent-protocol.md) so the host can check it without the bytes crossing twice.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use kestrel_agent_proto::{kind, StreamSink, StreamSource, StreamStats, XorShift};
use sha2::{Digest, Sha256};

use crate::ops::{hash_to_eof, hex, len_u64, millis};
use crate::proto::{OpError, OpResult};
use crate::vsock;

/// The `stream_sink` op.
pub fn sink(a: StreamSink) -> OpResult<StreamStats> {
    let l: OwnedFd = if a.tcp {
        std::net::TcpListener::bind(("0.0.0.0", tcp_port(a.port)?))
            .map(OwnedFd::from)
            .map_err(|e| OpError::os("listen", e))?
    } else {
        vsock::listen(a.port).map_err(|e| OpError::os("listen", e))?
    };
    let timeout = Duration::from_millis(a.timeout_ms.unwrap_or(120_000));
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r <= 0 {
        return Err(OpError::new(kind::TIMEOUT, "no connection arrived"));
    }
    let f = vsock::accept(&l).map_err(|e| OpError::os("accept", e))?;
    let t0 = Instant::now();
    let (sha256, bytes) = hash_to_eof(f, 256 << 10).map_err(|e| OpError::os("read", e))?;
    Ok(StreamStats {
        bytes,
        sha256,
        duration_ms: millis(t0),
    })
}

/// The `stream_source` op.
pub fn source(a: StreamSource) -> OpResult<StreamStats> {
    if let Some(host) = &a.tcp_host {
        let s = std::net::TcpStream::connect((host.as_str(), tcp_port(a.port)?))
            .map_err(|e| OpError::os("connect", e))?;
        return send(File::from(OwnedFd::from(s)), &a);
    }
    let f = vsock::connect(vsock::HOST_CID, a.port).map_err(|e| OpError::os("connect", e))?;
    send(f, &a)
}

/// `port` as a TCP port.
fn tcp_port(port: u32) -> OpResult<u16> {
    u16::try_from(port).map_err(|_| OpError::bad_request(format!("{port} is not a TCP port")))
}

fn send(mut f: File, a: &StreamSource) -> OpResult<StreamStats> {
    let t0 = Instant::now();
    let mut rng = XorShift::new(a.seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut left = a.bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])
            .map_err(|e| OpError::os("write", e))?;
        h.update(&buf[..n]);
        left -= len_u64(n);
    }
    // SAFETY: shutdown of our own socket.
    unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) };
    // Wait for the host to close so every byte was taken (or the peer reset).
    let mut b = [0u8; 64];
    let _ = f.read(&mut b);
    Ok(StreamStats {
        bytes: a.bytes,
        sha256: hex(&h.finalize()),
        duration_ms: millis(t0),
    })
}
