//! kestrel-agent: the Kestrel guest agent (protocol: docs/agent-protocol.md).
//!
//! Runs as PID 1 of the guest (exec'd by /init once /proc, /sys and /dev are mounted), reaps
//! every zombie, and serves line-delimited JSON requests on AF_VSOCK port 1024, one thread per
//! connection.
//!
//! Debug mode: with `KESTREL_AGENT_UNIX=<path>` it listens on that Unix socket instead (for
//! tests on the host). There, a connection may start with the hybrid-vsock handshake line
//! `CONNECT <port>`, answered with `OK <port>`, so the VMM's `AgentClient` can talk to it
//! directly; `shutdown` only ends the process.

mod b64;
mod exec;
mod ops;
mod proto;
mod stream;

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use proto::After;

const PORT: u32 = 1024;
/// Longest request line accepted (a 16 MiB write_file is ~22.4 MiB of base64).
const MAX_LINE: usize = 32 << 20;
/// IOCTL_VM_SOCKETS_GET_LOCAL_CID = _IO(7, 0xb9) from <linux/vm_sockets.h>.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// Console output. Never panics (println! would, on a console write error, and a panic
/// of PID 1 panics the kernel).
fn say(msg: &str) {
    let _ = writeln!(io::stdout(), "kestrel-agent: {msg}");
}

fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Stop the machine (PID 1) or end the process (anything else: never reboot a host).
/// Without ACPI, RB_POWER_OFF would only halt the CPUs; RB_AUTOBOOT resets through the
/// i8042, which the VMM treats as a clean stop.
fn stop(code: i32) -> ! {
    // SAFETY: sync(2) and reboot(2) have no memory arguments.
    unsafe { libc::sync() };
    if is_pid1() {
        unsafe { libc::reboot(libc::RB_AUTOBOOT) };
        say(&format!("reboot failed: {}", io::Error::last_os_error()));
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    std::process::exit(code)
}

fn fatal(msg: &str) -> ! {
    say(&format!("fatal: {msg}"));
    stop(1)
}

enum Listener {
    Vsock(OwnedFd),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> io::Result<File> {
        match self {
            Listener::Vsock(fd) => {
                // SAFETY: accept4 on our listening socket; the result is a new fd we own.
                let c = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if c < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: c is a fresh fd owned by nobody else.
                Ok(File::from(unsafe { OwnedFd::from_raw_fd(c) }))
            }
            Listener::Unix(l) => l.accept().map(|(s, _)| File::from(OwnedFd::from(s))),
        }
    }
}

/// The guest's vsock CID; Some(VMADDR_CID_ANY) means no vsock device (no transport).
fn vsock_local_cid() -> Option<u32> {
    let f = File::open("/dev/vsock").ok()?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 into `cid`.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID as _, &mut cid) };
    (r == 0).then_some(cid)
}

pub(crate) fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket calls on a fd we own; addr is a valid sockaddr_vm.
    unsafe {
        let fd = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_vm = std::mem::zeroed();
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        if libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            len,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::listen(fd.as_raw_fd(), 64) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

fn main() {
    if std::env::var_os("PATH").is_none() {
        std::env::set_var("PATH", "/sbin:/bin:/usr/sbin:/usr/bin");
    }
    if let Err(e) = exec::start_reaper() {
        fatal(&format!("cannot start the reaper thread: {e}"));
    }

    let (listener, debug) = match std::env::var_os("KESTREL_AGENT_UNIX") {
        Some(path) => {
            let _ = std::fs::remove_file(&path);
            match UnixListener::bind(&path) {
                Ok(l) => {
                    say(&format!(
                        "listening on unix socket {}",
                        path.to_string_lossy()
                    ));
                    (Listener::Unix(l), true)
                }
                Err(e) => fatal(&format!("bind {}: {e}", path.to_string_lossy())),
            }
        }
        None => {
            if vsock_local_cid() == Some(libc::VMADDR_CID_ANY) {
                // Nobody can reach us: behave like /init without an agent.
                say("no vsock device; nothing to serve, stopping the machine");
                stop(0);
            }
            match vsock_listen(PORT) {
                Ok(fd) => {
                    say(&format!("listening on vsock port {PORT}"));
                    (Listener::Vsock(fd), false)
                }
                Err(e) => fatal(&format!("listen on vsock port {PORT}: {e}")),
            }
        }
    };

    loop {
        match listener.accept() {
            Ok(conn) => {
                let spawned = std::thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || serve(conn, debug));
                if let Err(e) = spawned {
                    say(&format!("cannot start a connection thread: {e}"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                say(&format!("accept: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

enum Line {
    Complete,
    TooLong,
    Eof,
}

/// Read one line (without its `\n`) into `buf`, keeping at most `max` bytes; a longer line
/// is consumed and reported as TooLong.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>, max: usize) -> io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let (used, done) = {
            let avail = match r.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if avail.is_empty() {
                // EOF; an unterminated last line still counts.
                return Ok(match (too_long, buf.is_empty()) {
                    (true, _) => Line::TooLong,
                    (false, true) => Line::Eof,
                    (false, false) => Line::Complete,
                });
            }
            let nl = avail.iter().position(|&b| b == b'\n');
            let chunk = &avail[..nl.unwrap_or(avail.len())];
            if !too_long {
                if buf.len() + chunk.len() > max {
                    too_long = true;
                    buf.clear();
                } else {
                    buf.extend_from_slice(chunk);
                }
            }
            (chunk.len() + usize::from(nl.is_some()), nl.is_some())
        };
        r.consume(used);
        if done {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete
            });
        }
    }
}

fn serve(conn: File, debug: bool) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut input = BufReader::with_capacity(256 << 10, conn);
    let mut line = Vec::new();
    let mut first = true;
    loop {
        let resp = match read_line(&mut input, &mut line, MAX_LINE) {
            Err(_) | Ok(Line::Eof) => return,
            Ok(Line::TooLong) => (proto::too_long_response(MAX_LINE), None),
            Ok(Line::Complete) => {
                if debug && first {
                    if let Some(port) = line.strip_prefix(b"CONNECT ") {
                        // Debug stand-in for the VMM's hybrid-vsock handshake.
                        let mut ok = b"OK ".to_vec();
                        ok.extend_from_slice(port.trim_ascii());
                        ok.push(b'\n');
                        if out.write_all(&ok).is_err() {
                            return;
                        }
                        first = false;
                        continue;
                    }
                }
                first = false;
                if line.trim_ascii().is_empty() {
                    continue;
                }
                proto::handle_line(&line)
            }
        };
        let (mut bytes, after) = resp;
        bytes.push(b'\n');
        if out.write_all(&bytes).is_err() {
            return;
        }
        drop(bytes);
        if let Some(After::Shutdown { reboot }) = after {
            say(if reboot {
                "reboot requested"
            } else {
                "shutdown requested"
            });
            // Reset either way (see stop()); in debug mode just exit.
            if debug {
                std::process::exit(0);
            }
            stop(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_capped() {
        let input = b"short\n0123456789abc\n\nlast".to_vec();
        let mut r = BufReader::with_capacity(4, &input[..]);
        let mut buf = Vec::new();
        let mut got = Vec::new();
        loop {
            match read_line(&mut r, &mut buf, 8).unwrap() {
                Line::Eof => break,
                Line::TooLong => got.push("<too long>".to_string()),
                Line::Complete => got.push(String::from_utf8_lossy(&buf).into_owned()),
            }
        }
        assert_eq!(got, ["short", "<too long>", "", "last"]);
    }

    #[test]
    fn requests_get_responses() {
        let resp = |line: &str| {
            let (bytes, _) = proto::handle_line(line.as_bytes());
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()
        };
        let r = resp(r#"{"id": 5, "op": "ping"}"#);
        assert_eq!(
            (r["id"].as_u64(), r["ok"]["pong"].as_bool()),
            (Some(5), Some(true))
        );
        let r = resp(r#"{"id": 6, "op": "nope", "args": null}"#);
        assert_eq!(r["error"]["kind"], "unsupported");
        let r = resp("{bad");
        assert!(r["id"].is_null());
        assert_eq!(r["error"]["kind"], "bad_request");
        let r = resp(r#"{"id": 7, "op": "read_file", "args": {"path": "/nonexistent/x"}}"#);
        assert_eq!(
            (r["error"]["kind"].as_str(), r["error"]["errno"].as_i64()),
            (Some("os"), Some(2))
        );
        let r = resp(r#"{"id": 8, "op": "probe_memory", "args": {"addr": 1, "size": 1, "x": 1}}"#);
        assert_eq!(r["error"]["kind"], "bad_request");
    }
}
