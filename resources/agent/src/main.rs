//! kestrel-agent: the Kestrel guest agent (protocol: docs/agent-protocol.md).
//!
//! Runs as PID 1 of the guest (exec'd by /init once /proc, /sys and /dev are mounted), reaps
//! every zombie, and serves line-delimited JSON requests on AF_VSOCK port 1024, one thread per
//! connection (at most 64 at once).
//!
//! Debug mode: with `KESTREL_AGENT_UNIX=<path>` it listens on that Unix socket instead (for
//! tests on the host). There, a connection may start with the hybrid-vsock handshake line
//! `CONNECT <port>`, answered with `OK <port>`, so the VMM's `AgentClient` can talk to it
//! directly; `shutdown` only ends the process.

mod exec;
mod iobench;
mod ops;
mod proto;
mod recwriter;
mod stream;
mod vecprobe;
mod vsock;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kestrel_agent_proto::AGENT_PORT;
use proto::After;

/// Longest request line accepted (a 16 MiB write_file is ~22.4 MiB of base64).
const MAX_LINE: usize = 32 << 20;

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
        // SAFETY: as above.
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
            Listener::Vsock(fd) => vsock::accept(fd),
            Listener::Unix(l) => l.accept().map(|(s, _)| File::from(OwnedFd::from(s))),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("vecprobe") {
        std::process::exit(vecprobe::main(&args[2..]));
    }
    if args.get(1).map(String::as_str) == Some("recwriter") {
        std::process::exit(recwriter::main(&args[2..]));
    }
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
            if vsock::local_cid() == Some(libc::VMADDR_CID_ANY) {
                // Nobody can reach us: behave like /init without an agent.
                say("no vsock device; nothing to serve, stopping the machine");
                stop(0);
            }
            match vsock::listen(AGENT_PORT) {
                Ok(fd) => {
                    say(&format!("listening on vsock port {AGENT_PORT}"));
                    (Listener::Vsock(fd), false)
                }
                Err(e) => fatal(&format!("listen on vsock port {AGENT_PORT}: {e}")),
            }
        }
    };

    serve_all(&listener, debug)
}

/// Most connections served at once; one more is closed right after accept. Each costs a
/// thread (small stack) and, while it runs an op, that op's buffers.
const MAX_CONNS: usize = 64;
/// Stack of a connection thread: ops keep their buffers on the heap.
const CONN_STACK: usize = 256 << 10;

/// One client connection, served by its own thread.
struct Conn {
    file: File,
    buf: Vec<u8>,
    /// Dropping bytes of an over-long line until its newline.
    discarding: bool,
    first: bool,
}

/// Accept connections and serve each on its own thread, at most [`MAX_CONNS`] at once.
///
/// A long request (exec, stream ops) on one connection never delays another. Threads are
/// safe in the guest also on a software (nested) KVM: there the VMM switches each task's
/// AVX state with the guest kernel (docs/nested-kvm.md §10).
fn serve_all(listener: &Listener, debug: bool) -> ! {
    static ACTIVE: AtomicUsize = AtomicUsize::new(0);
    loop {
        let file = match listener.accept() {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                say(&format!("accept: {e}"));
                // EMFILE and the like: give the system a moment instead of spinning.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if ACTIVE.fetch_add(1, Ordering::SeqCst) >= MAX_CONNS {
            ACTIVE.fetch_sub(1, Ordering::SeqCst);
            say(&format!(
                "more than {MAX_CONNS} connections; closing the new one"
            ));
            continue;
        }
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .stack_size(CONN_STACK)
            .spawn(move || {
                let mut c = Conn {
                    file,
                    buf: Vec::new(),
                    discarding: false,
                    first: true,
                };
                serve_conn(&mut c, debug);
                ACTIVE.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            ACTIVE.fetch_sub(1, Ordering::SeqCst);
            say(&format!("cannot start a connection thread: {e}"));
        }
    }
}

/// Read requests until the peer closes, answering every complete line in order.
fn serve_conn(c: &mut Conn, debug: bool) {
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        match c.file.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                let mut data = &chunk[..n];
                while let Some(nl) = data.iter().position(|&b| b == b'\n') {
                    let part = &data[..nl];
                    data = &data[nl + 1..];
                    if c.discarding {
                        c.discarding = false;
                        c.buf.clear();
                        if !respond(c, (proto::too_long_response(MAX_LINE), None), debug) {
                            return;
                        }
                        continue;
                    }
                    c.buf.extend_from_slice(part);
                    let line = std::mem::take(&mut c.buf);
                    if !handle(c, &line, debug) {
                        return;
                    }
                }
                if !c.discarding {
                    c.buf.extend_from_slice(data);
                    if c.buf.len() > MAX_LINE {
                        c.discarding = true;
                        c.buf = Vec::new();
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn handle(c: &mut Conn, line: &[u8], debug: bool) -> bool {
    if debug && c.first {
        if let Some(port) = line.strip_prefix(b"CONNECT ") {
            // Debug stand-in for the VMM's hybrid-vsock handshake.
            let mut ok = b"OK ".to_vec();
            ok.extend_from_slice(port.trim_ascii());
            ok.push(b'\n');
            c.first = false;
            return c.file.write_all(&ok).is_ok();
        }
    }
    c.first = false;
    if line.trim_ascii().is_empty() {
        return true;
    }
    respond(c, proto::handle_line(line), debug)
}

fn respond(c: &mut Conn, resp: (Vec<u8>, Option<After>), debug: bool) -> bool {
    let (mut bytes, after) = resp;
    bytes.push(b'\n');
    if c.file.write_all(&bytes).is_err() {
        return false;
    }
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
    true
}

#[cfg(test)]
mod tests {
    use super::*;

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
