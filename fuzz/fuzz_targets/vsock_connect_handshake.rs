//! The hybrid-vsock host handshake: host programs connect to the device's Unix socket and send
//! `CONNECT <port>\n`. Two layers are fed:
//!
//! 1. `muxer::parse_connect` on every line of the input (asserted: it accepts only
//!    `CONNECT ` + 1..=10 ASCII digits (+ an optional `\r`), and the port it returns is those
//!    digits' value);
//! 2. a real `Vsock` device (activated with valid, well-provisioned rings unless told otherwise)
//!    in a real `EventManager`, with up to eight host clients on its Unix socket sending
//!    fuzz-chosen bytes, in one or two writes with loop passes between, then optionally
//!    half-closing or closing.
//!
//! | input bytes          | use                                                               |
//! |----------------------|-------------------------------------------------------------------|
//! | `[0]`                | control: bit 0 leave the device inactive (driver not ready),      |
//! |                      | bit 1 half-close each client after writing, bit 2 split each      |
//! |                      | client's bytes in two writes, bit 3 reset the device at the end,  |
//! |                      | bit 4 close clients before the loop runs                          |
//! | then, per client     | one length byte `n`, then `n` bytes (the client's whole stream)   |
//!
//! Asserted on the device: a client whose first line is complete and not a valid `CONNECT` is
//! closed by the device; with an active device and clients that keep their write side open, the
//! live connections are exactly the clients that sent a valid line.

#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventManager, SubscriberOps};
use kestrel_devices::virtio::vsock::{muxer, Vsock, VsockConfig};
use kestrel_devices::virtio::VirtioDevice;
use kestrel_fuzz::{
    guest_memory, ignore_sigpipe, interrupt, post_writable_buffers, queue, run_until_idle,
    scratch_dir,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryAtomic;

const MEM_SIZE: usize = 0x2_0000;
const RX_DESC: u64 = 0x0;
const RX_AVAIL: u64 = 0x1000;
const RX_USED: u64 = 0x2000;
const TX_DESC: u64 = 0x3000;
const TX_AVAIL: u64 = 0x3100;
const TX_USED: u64 = 0x3200;
const EV_DESC: u64 = 0x3400;
const EV_AVAIL: u64 = 0x3500;
const EV_USED: u64 = 0x3600;
const RX_BUF: u64 = 0x8000;
const RX_SIZE: u16 = 32;
const RX_BUF_LEN: u32 = 0x800;
const MAX_CLIENTS: usize = 8;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| scratch_dir("vsock-hs"))
}

/// What the device must make of a client's stream: `Some(Some(port))` a valid line,
/// `Some(None)` a complete invalid line (or one too long, or EOF first), `None` still waiting.
fn expected(bytes: &[u8], eof: bool) -> Option<Option<u32>> {
    // The muxer reads byte by byte and gives up once the line reaches MAX_CONNECT_LINE bytes.
    let window = &bytes[..bytes.len().min(muxer::MAX_CONNECT_LINE + 1)];
    match window.iter().position(|&b| b == b'\n') {
        Some(i) if i < muxer::MAX_CONNECT_LINE => Some(muxer::parse_connect(&window[..i])),
        Some(_) => Some(None),
        None if bytes.len() >= muxer::MAX_CONNECT_LINE || eof => Some(None),
        None => None,
    }
}

fn check_parse(line: &[u8]) {
    let Some(port) = muxer::parse_connect(line) else {
        return;
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line
        .strip_prefix(b"CONNECT ")
        .expect("accepted without CONNECT");
    assert!(!digits.is_empty() && digits.len() <= 10);
    assert!(digits.iter().all(u8::is_ascii_digit));
    let value = digits
        .iter()
        .fold(0u64, |v, &d| v * 10 + u64::from(d - b'0'));
    assert_eq!(value, u64::from(port), "wrong port for {line:?}");
}

fuzz_target!(|data: &[u8]| {
    ignore_sigpipe();
    let Some((&control, mut rest)) = data.split_first() else {
        return;
    };
    for line in rest.split(|&b| b == b'\n') {
        check_parse(line);
    }
    let inactive = control & 1 != 0;
    let half_close = control & 2 != 0;
    let split = control & 4 != 0;
    let reset = control & 8 != 0;
    let close_early = control & 0x10 != 0;

    let mut streams: Vec<&[u8]> = Vec::new();
    while let Some((&n, tail)) = rest.split_first() {
        if streams.len() == MAX_CLIENTS {
            break;
        }
        let n = usize::from(n).min(tail.len());
        streams.push(&tail[..n]);
        rest = &tail[n..];
    }

    let mem = guest_memory(&[(0, MEM_SIZE)]);
    post_writable_buffers(&mem, RX_DESC, RX_AVAIL, RX_BUF, RX_SIZE, RX_BUF_LEN);

    let _ = std::fs::create_dir_all(dir());
    let uds = dir().join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let dev = Arc::new(Mutex::new(Vsock::new(&VsockConfig::new(3, &uds)).unwrap()));
    let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
    em.add_subscriber(dev.clone());
    if !inactive {
        let queues = vec![
            queue(RX_SIZE, RX_DESC, RX_AVAIL, RX_USED, false),
            queue(2, TX_DESC, TX_AVAIL, TX_USED, false),
            queue(2, EV_DESC, EV_AVAIL, EV_USED, false),
        ];
        dev.lock()
            .unwrap()
            .activate(GuestMemoryAtomic::new(mem), interrupt(), queues)
            .unwrap();
    }
    run_until_idle(&mut em, 16);

    let mut clients: Vec<Option<UnixStream>> = Vec::new();
    for s in &streams {
        let c = UnixStream::connect(&uds).unwrap();
        c.set_nonblocking(true).unwrap();
        let first = if split { s.len() / 2 } else { s.len() };
        let _ = (&c).write_all(&s[..first]);
        clients.push(Some(c));
        if split {
            run_until_idle(&mut em, 16);
        }
    }
    for (c, s) in clients.iter_mut().zip(&streams) {
        if split {
            if let Some(c) = c.as_ref() {
                let _ = (&*c).write_all(&s[s.len() / 2..]);
            }
        }
        if half_close {
            if let Some(c) = c.as_ref() {
                let _ = c.shutdown(Shutdown::Write);
            }
        }
        if close_early {
            *c = None;
        }
    }
    run_until_idle(&mut em, 16);
    run_until_idle(&mut em, 16);

    if !close_early {
        let mut valid = 0;
        for (c, s) in clients.iter().zip(&streams) {
            let Some(c) = c.as_ref() else { continue };
            match expected(s, half_close) {
                Some(Some(_)) => valid += 1,
                Some(None) => {
                    // The device closed it: reads end (EOF, or a reset), never WouldBlock.
                    let mut b = [0u8; 64];
                    let r = (&*c).read(&mut b);
                    assert!(
                        !matches!(&r, Err(e) if e.kind() == ErrorKind::WouldBlock),
                        "a client that sent an invalid CONNECT line {s:?} is still open"
                    );
                }
                None => {}
            }
        }
        // (A half-closed client's connection may already be on its way out.)
        if !inactive && !half_close {
            let n = dev.lock().unwrap().connection_count();
            assert_eq!(n, valid, "connections after CONNECT lines {streams:?}");
        }
    }
    {
        let d = dev.lock().unwrap();
        let _ = d.metrics();
    }
    if reset {
        dev.lock().unwrap().reset();
        run_until_idle(&mut em, 16);
    }
    drop(clients);
    drop(em);
    drop(dev);
    let _ = std::fs::remove_file(&uds);
    let _ = std::fs::remove_dir(dir());
});
