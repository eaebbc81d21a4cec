//! Raw vsock streams for throughput and integrity checks: `stream_sink` accepts one connection
//! on a guest port and hashes everything it receives; `stream_source` connects to a host port
//! (CID 2) and sends a deterministic pseudo-random stream (xorshift64*, see
//! docs/agent-protocol.md) so the host can check it without the bytes crossing twice.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::proto::{OpError, OpResult};

/// Host CID.
const VMADDR_CID_HOST: u32 = 2;

/// The pseudo-random stream: xorshift64* from `seed` (0 becomes 1), 8 little-endian bytes a step.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 { 1 } else { seed })
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sink {
    port: u32,
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// Listen on TCP (all addresses) instead of vsock.
    #[serde(default)]
    tcp: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    port: u32,
    bytes: u64,
    #[serde(default)]
    seed: u64,
    /// Connect over TCP to this host address instead of vsock CID 2.
    #[serde(default)]
    tcp_host: Option<String>,
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sink(a: Sink) -> OpResult<Value> {
    let tcp;
    let l: OwnedFd = if a.tcp {
        tcp = std::net::TcpListener::bind(("0.0.0.0", a.port as u16))
            .map_err(|e| OpError::os("listen", e))?;
        OwnedFd::from(tcp.try_clone().map_err(|e| OpError::os("listen", e))?)
    } else {
        crate::vsock_listen(a.port).map_err(|e| OpError::os("listen", e))?
    };
    let timeout = Duration::from_millis(a.timeout_ms.unwrap_or(120_000));
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe {
        libc::poll(
            &mut pfd,
            1,
            timeout.as_millis().min(i32::MAX as u128) as i32,
        )
    };
    if r <= 0 {
        return Err(OpError::new("timeout", "no connection arrived"));
    }
    // SAFETY: accept on our listening socket; the result is a new fd we own.
    let fd = unsafe {
        libc::accept4(
            l.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(OpError::os("accept", io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh, owned socket.
    let mut f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let t0 = Instant::now();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(OpError::os("read", e)),
        }
    }
    Ok(
        json!({"bytes": total, "sha256": hex(&h.finalize()), "duration_ms": t0.elapsed().as_millis() as u64}),
    )
}

pub fn source(a: Source) -> OpResult<Value> {
    if let Some(host) = &a.tcp_host {
        let s = std::net::TcpStream::connect((host.as_str(), a.port as u16))
            .map_err(|e| OpError::os("connect", e))?;
        return send(File::from(OwnedFd::from(s)), &a);
    }
    // SAFETY: plain socket calls; addr is a valid sockaddr_vm.
    let f = unsafe {
        let fd = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(OpError::os("socket", io::Error::last_os_error()));
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_vm = std::mem::zeroed();
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = a.port;
        addr.svm_cid = VMADDR_CID_HOST;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        if libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            len,
        ) != 0
        {
            return Err(OpError::os("connect", io::Error::last_os_error()));
        }
        fd
    };
    send(File::from(f), &a)
}

fn send(mut f: File, a: &Source) -> OpResult<Value> {
    let t0 = Instant::now();
    let mut rng = XorShift::new(a.seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut left = a.bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])
            .map_err(|e| OpError::os("write", e))?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    // SAFETY: shutdown of our own socket.
    unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) };
    // Wait for the host to close so every byte was taken (or the peer reset).
    let mut b = [0u8; 64];
    let _ = f.read(&mut b);
    Ok(
        json!({"bytes": a.bytes, "sha256": hex(&h.finalize()), "duration_ms": t0.elapsed().as_millis() as u64}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift_known_values() {
        let mut r = XorShift::new(1);
        let mut b = [0u8; 16];
        r.fill(&mut b);
        // First outputs of xorshift64* from state 1.
        assert_eq!(
            u64::from_le_bytes(b[..8].try_into().unwrap()),
            0x47e4_ce4b_896c_dd1d
        );
        let mut r2 = XorShift::new(0);
        let mut c = [0u8; 16];
        r2.fill(&mut c);
        assert_eq!(b, c, "seed 0 behaves as seed 1");
    }
}
