//! A hostile agent on the other end of a `UnixStream` pair: the client's memory and time
//! stay bounded whatever it sends.
use super::*;
use serde_json::json;
use std::thread::JoinHandle;

/// Runs `serve(request, writer)` for each request line the client sends.
fn hostile(
    mut serve: impl FnMut(&Value, &mut UnixStream) -> io::Result<()> + Send + 'static,
) -> (AgentClient, JoinHandle<usize>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let mut r = BufReader::new(theirs.try_clone().unwrap());
        let mut w = theirs;
        let mut n = 0;
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            let v: Value = serde_json::from_str(&line).unwrap();
            line.clear();
            n += 1;
            if serve(&v, &mut w).is_err() {
                break;
            }
        }
        n
    });
    let mut c = AgentClient::from_stream(ours).unwrap();
    c.set_call_timeout(Some(Duration::from_secs(20)));
    (c, t)
}

#[test]
fn read_file_range_takes_any_length() {
    let (mut c, t) = hostile(|req, w| {
        writeln!(
            w,
            "{{\"id\": {}, \"ok\": {{\"data_b64\": \"aGVsbG8=\", \"sha256\": \"\", \"len\": 5, \"size\": 5, \"eof\": true}}}}",
            req["id"]
        )
    });
    for len in [u64::MAX, u64::MAX - 1, u64::MAX / 3 * 2, 5] {
        let chunk = c.read_file_range("/f", u64::MAX, Some(len)).unwrap();
        assert_eq!(chunk.data, b"hello");
    }
    assert!(matches!(
        c.read_file_range("/f", 0, Some(4)),
        Err(AgentError::Protocol(_))
    ));
    drop(c);
    assert_eq!(t.join().unwrap(), 5);
}

#[test]
fn endless_response_line_is_cut_at_the_limit() {
    let (mut c, t) = hostile(|req, w| {
        write!(w, "{{\"id\": {}, \"ok\": {{\"version\": \"", req["id"])?;
        let junk = vec![b'a'; 64 << 10];
        loop {
            w.write_all(&junk)?; // ends when the client hangs up
        }
    });
    c.set_max_response_line(1 << 20);
    match c.ping() {
        Err(AgentError::ResponseTooLong { limit }) => assert_eq!(limit, 1 << 20),
        other => panic!("expected ResponseTooLong, got {other:?}"),
    }
    assert!(c.partial.capacity() <= 1 << 20, "nothing kept");
    drop(c);
    assert_eq!(t.join().unwrap(), 1);
}

#[test]
fn default_line_limit_is_documented_value() {
    let (c, _t) = hostile(|_, _| Ok(()));
    assert_eq!(c.max_line, MAX_RESPONSE_LINE);
    assert_eq!(c.max_read_file, MAX_READ_FILE);
}

/// Answers every `read_file` with the bytes asked for and `eof: false`, forever.
fn endless_file(req: &Value, w: &mut UnixStream) -> io::Result<()> {
    let len = usize::try_from(req["args"]["len"].as_u64().unwrap_or(4096)).unwrap();
    let data = vec![7u8; len];
    let resp = json!({"id": req["id"], "ok": {
        "data_b64": b64::encode(&data), "sha256": "", "len": len, "size": 0, "eof": false}});
    writeln!(w, "{resp}")
}

#[test]
fn endless_eof_false_stops_at_the_read_limit() {
    let (mut c, t) = hostile(endless_file);
    c.set_max_read_file(9 << 20);
    match c.read_file("/dev/zero") {
        Err(AgentError::TooLarge { path, limit }) => {
            assert_eq!((path.as_str(), limit), ("/dev/zero", 9 << 20));
        }
        other => panic!("expected TooLarge, got {:?}", other.map(|v| v.len())),
    }
    drop(c);
    // 4 MiB + 4 MiB, then the last 1 MiB and the one byte beyond it: three requests.
    assert_eq!(t.join().unwrap(), 3);
}

#[test]
fn file_of_exactly_the_limit_is_read() {
    let limit = 10_000u64;
    let (mut c, t) = hostile(move |req, w| {
        let off = req["args"]["offset"].as_u64().unwrap();
        let len = req["args"]["len"].as_u64().unwrap();
        let n = usize::try_from(len.min(limit - off)).unwrap();
        let resp = json!({"id": req["id"], "ok": {
            "data_b64": b64::encode(&vec![1u8; n]), "sha256": "", "len": n,
            "size": limit, "eof": off + n as u64 == limit}});
        writeln!(w, "{resp}")
    });
    c.set_max_read_file(limit);
    assert_eq!(c.read_file("/f").unwrap().len() as u64, limit);
    drop(c);
    t.join().unwrap();
}

#[test]
fn chunk_larger_than_asked_or_lying_size_refused() {
    let (mut c, t) = hostile(|req, w| {
        let len = usize::try_from(req["args"]["len"].as_u64().unwrap()).unwrap() + 100;
        let resp = json!({"id": req["id"], "ok": {
            "data_b64": b64::encode(&vec![0u8; len]), "sha256": "", "len": len,
            "size": len, "eof": true}});
        writeln!(w, "{resp}")
    });
    let e = c.read_file_range("/f", 0, Some(10)).unwrap_err();
    assert!(matches!(e, AgentError::Protocol(_)), "{e}");
    drop(c);
    t.join().unwrap();
    let (mut c, t) = hostile(|req, w| {
        let resp = json!({"id": req["id"], "ok": {
            "data_b64": "", "sha256": "", "len": 0, "size": u64::MAX, "eof": false}});
        writeln!(w, "{resp}")
    });
    assert!(matches!(
        c.read_file("/f"),
        Err(AgentError::TooLarge { .. })
    ));
    drop(c);
    t.join().unwrap();
}

#[test]
fn wrongly_typed_payloads_are_protocol_errors_not_panics() {
    let (mut c, t) = hostile(|req, w| {
        let resp = match req["op"].as_str() {
            Some("ping") => json!({"id": req["id"], "ok": [1, 2, 3]}),
            _ => json!({"id": req["id"], "error": {"kind": 5}}),
        };
        writeln!(w, "{resp}")
    });
    assert!(matches!(c.ping(), Err(AgentError::Protocol(_))));
    assert!(matches!(c.sync(), Err(AgentError::Protocol(_))));
    drop(c);
    t.join().unwrap();
}
