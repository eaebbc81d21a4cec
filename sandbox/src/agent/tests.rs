use super::*;
use serde_json::json;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

fn sock_path(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let p = std::env::temp_dir().join(format!(
        "kestrel-agent-test-{}-{}-{name}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&p);
    p
}

/// A fake hybrid-vsock device + agent: `rejects` connections are closed right after
/// CONNECT (guest not listening yet); the next one gets `OK` and then `reply(request)`
/// for each request line (None: send nothing).
fn fake_agent(
    path: &Path,
    rejects: usize,
    mut reply: impl FnMut(&Value) -> Option<String> + Send + 'static,
) -> JoinHandle<Vec<Value>> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for _ in 0..rejects {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 1024\n");
        }
        let (s, _) = listener.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "CONNECT 1024\n");
        w.write_all(b"OK 1073741824\n").unwrap();
        let mut seen = Vec::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return seen;
            }
            let v: Value = serde_json::from_str(&line).unwrap();
            if let Some(out) = reply(&v) {
                w.write_all(out.as_bytes()).unwrap();
            }
            seen.push(v);
        }
    })
}

fn ok(req: &Value, result: Value) -> Option<String> {
    Some(format!("{}\n", json!({"id": req["id"], "ok": result})))
}

const T: Duration = Duration::from_secs(10);

#[test]
fn handshake_ping_and_ids() {
    let p = sock_path("ping");
    let fake = fake_agent(&p, 0, |r| ok(r, json!({"pong": true, "version": "9.9"})));
    let mut c = AgentClient::connect(&p, AGENT_PORT, T).unwrap();
    assert_eq!(c.ping().unwrap(), "9.9");
    assert_eq!(c.ping().unwrap(), "9.9");
    drop(c);
    let seen = fake.join().unwrap();
    assert_eq!(seen[0], json!({"id": 1, "op": "ping", "args": {}}));
    assert_eq!(seen[1]["id"], 2);
    let _ = std::fs::remove_file(&p);
}

#[test]
fn typed_requests_for_ops_without_a_method() {
    let p = sock_path("typed");
    let fake = fake_agent(&p, 0, |r| {
        ok(
            r,
            json!({"bytes": 10, "sha256": "ab", "duration_ms": 1, "later": "ignored"}),
        )
    });
    let mut c = AgentClient::connect(&p, AGENT_PORT, T).unwrap();
    let sink = proto::StreamSink {
        port: 5000,
        ..Default::default()
    };
    let stats = c.request(sink).unwrap();
    assert_eq!((stats.bytes, stats.sha256.as_str()), (10, "ab"));
    drop(c);
    let seen = fake.join().unwrap();
    assert_eq!(
        seen[0],
        json!({"id": 1, "op": "stream_sink", "args": {"port": 5000}})
    );
    let _ = std::fs::remove_file(&p);
}

#[test]
fn connect_retries_until_the_guest_listens() {
    let p = sock_path("retry");
    // The socket appears late, and the first two connections are refused by the guest.
    let p2 = p.clone();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        fake_agent(&p2, 2, |r| ok(r, json!({"pong": true, "version": "1"})))
    });
    let mut c = AgentClient::connect(&p, AGENT_PORT, T).unwrap();
    assert_eq!(c.ping().unwrap(), "1");
    drop(c);
    late.join().unwrap().join().unwrap();
    let _ = std::fs::remove_file(&p);
}

#[test]
fn connect_times_out_without_a_socket() {
    let p = sock_path("none");
    let t0 = Instant::now();
    let e = AgentClient::connect(&p, AGENT_PORT, Duration::from_millis(200))
        .err()
        .unwrap();
    assert!(matches!(e, AgentError::Timeout { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[test]
fn unexpected_handshake_reply_is_a_connect_error() {
    let p = sock_path("badhs");
    let listener = UnixListener::bind(&p).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        s.write_all(b"NOPE\n").unwrap();
    });
    let e = AgentClient::connect(&p, AGENT_PORT, T).err().unwrap();
    assert!(matches!(e, AgentError::Connect { .. }), "{e}");
    t.join().unwrap();
    let _ = std::fs::remove_file(&p);
}

#[test]
fn remote_errors_are_typed() {
    let p = sock_path("err");
    let fake = fake_agent(&p, 0, |r| {
        Some(format!(
            "{}\n",
            json!({"id": r["id"], "error": {"kind": "os", "message": "open /x: No such file", "errno": 2}})
        ))
    });
    let mut c = AgentClient::connect(&p, AGENT_PORT, T).unwrap();
    match c.read_file("/x").unwrap_err() {
        AgentError::Remote {
            op,
            kind,
            message,
            errno,
        } => {
            assert_eq!((op.as_str(), kind.as_str()), ("read_file", "os"));
            assert_eq!(errno, Some(2));
            assert!(message.contains("/x"));
        }
        e => panic!("{e}"),
    }
    drop(c);
    fake.join().unwrap();
    let _ = std::fs::remove_file(&p);
}

#[test]
fn malformed_and_mismatched_responses_are_protocol_errors() {
    let p = sock_path("bad");
    let mut n = 0;
    let fake = fake_agent(&p, 0, move |r| {
        n += 1;
        match n {
            1 => Some("{this is not json\n".into()),
            2 => Some(format!("{}\n", json!({"id": 999, "ok": {}}))),
            3 => Some(format!("{}\n", json!({"id": r["id"], "neither": 1}))),
            _ => ok(r, json!({"pong": "wrong type"})),
        }
    });
    let mut c = AgentClient::connect(&p, AGENT_PORT, T).unwrap();
    for _ in 0..4 {
        let e = c.ping().unwrap_err();
        assert!(matches!(e, AgentError::Protocol(_)), "{e}");
    }
    drop(c);
    fake.join().unwrap();
    let _ = std::fs::remove_file(&p);
}

#[test]
fn timeout_then_late_response_is_skipped() {
    let p = sock_path("late");
    let mut late_tail = None;
    let fake = fake_agent(&p, 0, move |r| {
        let resp = ok(r, json!({"pong": true, "version": r["id"].to_string()})).unwrap();
        match late_tail.take() {
            // First request: only part of its response line, then nothing.
            None => {
                let (head, tail) = resp.split_at(5);
                late_tail = Some(tail.to_string());
                Some(head.to_string())
            }
            // Second: the rest of the first response, then the second response.
            Some(tail) => Some(format!("{tail}{resp}")),
        }
    });
    let mut c = AgentClient::connect(&p, AGENT_PORT, T).unwrap();
    c.set_call_timeout(Some(Duration::from_millis(100)));
    let e = c.ping().unwrap_err();
    assert!(matches!(e, AgentError::Timeout { .. }), "{e}");
    c.set_call_timeout(Some(T));
    assert_eq!(c.ping().unwrap(), "2");
    drop(c);
    fake.join().unwrap();
    let _ = std::fs::remove_file(&p);
}

#[test]
fn exec_decodes_binary_output() {
    let p = sock_path("exec");
    let fake = fake_agent(&p, 0, |r| {
        assert_eq!(r["args"]["argv"], json!(["sh", "-c", "x"]));
        assert_eq!(r["args"]["stdin_b64"], "aGk=");
        assert_eq!(r["args"]["timeout_ms"], 1500);
        ok(
            r,
            json!({"exit_code": 3, "signal": null, "timed_out": false, "duration_ms": 7,
                   "stdout": "\u{fffd}", "stdout_b64": "/w==", "stdout_truncated": false,
                   "stderr": "oops\n", "stderr_truncated": false}),
        )
    });
    let mut c = AgentClient::connect(&p, AGENT_PORT, T).unwrap();
    let req = ExecRequest::new(&["sh", "-c", "x"])
        .stdin("hi")
        .timeout(Duration::from_millis(1500));
    let r = c.exec_with(&req).unwrap();
    assert_eq!(r.exit_code, Some(3));
    assert!(!r.success());
    assert_eq!(r.stdout, vec![0xff]);
    assert_eq!(r.stderr_str(), "oops\n");
    drop(c);
    fake.join().unwrap();
    let _ = std::fs::remove_file(&p);
}

/// Against the real agent binary in its Unix-socket debug mode. Runs when
/// `KESTREL_AGENT_TEST_BIN` names a built `kestrel-agent`, skips otherwise.
#[test]
fn real_agent_over_unix_socket() {
    let Some(bin) = std::env::var_os("KESTREL_AGENT_TEST_BIN") else {
        // scripts/test.sh sets KESTREL_TEST_REQUIRE_ALL: there a missing prerequisite fails.
        assert!(
            std::env::var_os("KESTREL_TEST_REQUIRE_ALL").is_none(),
            "KESTREL_AGENT_TEST_BIN is not set"
        );
        eprintln!("skipped: set KESTREL_AGENT_TEST_BIN to a built kestrel-agent");
        return;
    };
    let p = sock_path("real");
    let mut child = std::process::Command::new(bin)
        .env("KESTREL_AGENT_UNIX", &p)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let run = || -> Result<(), AgentError> {
        let mut c = AgentClient::connect(&p, AGENT_PORT, T)?;
        assert!(!c.ping()?.is_empty());
        let r = c.exec(&["sh", "-c", "echo out; echo err >&2; exit 7"])?;
        assert_eq!(
            (r.exit_code, r.stdout_str(), r.stderr_str()),
            (Some(7), "out\n".into(), "err\n".into())
        );
        let r = c.exec_with(
            &ExecRequest::new(&["sh", "-c", "cat; printf '\\377'"]).stdin(vec![0u8, 1, 2]),
        )?;
        assert_eq!(r.stdout, vec![0, 1, 2, 0xff]);
        let r =
            c.exec_with(&ExecRequest::new(&["sleep", "30"]).timeout(Duration::from_millis(200)))?;
        assert!(r.timed_out && r.signal == Some(9), "{r:?}");

        let dir = std::env::temp_dir().join(format!("kestrel-agent-real-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("data").to_string_lossy().into_owned();
        // Larger than one chunk, not a multiple of 3 or of the chunk size.
        let data: Vec<u8> = (0..CHUNK + 12_345)
            .map(|i| u8::try_from(i * 7 % 251).unwrap())
            .collect();
        let d = c.write_file(&f, &data, Some(0o600))?;
        assert_eq!(d.size, data.len() as u64);
        assert_eq!(std::fs::read(&f).unwrap(), data);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(c.read_file(&f)?, data);
        assert_eq!(c.sha256_file(&f)?, d);
        let whole = c.sha256_file_range(&f, 0, None)?;
        assert_eq!(whole.sha256, d.sha256);
        let part = c.read_file_range(&f, 10, Some(5))?;
        assert_eq!((part.data.as_slice(), part.eof), (&data[10..15], false));
        assert_eq!(c.sha256_file_range(&f, 10, Some(5))?.sha256, part.sha256);
        let e = c.read_file(&format!("{f}.missing")).unwrap_err();
        assert!(
            matches!(e, AgentError::Remote { ref kind, errno: Some(2), .. } if kind == "os"),
            "{e}"
        );
        let e = c.call("no_such_op", json!({})).unwrap_err();
        assert!(
            matches!(e, AgentError::Remote { ref kind, .. } if kind == "unsupported"),
            "{e}"
        );
        assert!(c.meminfo()?.mem_total_kb > 0);
        assert!(!c.cpus()?.online.is_empty());
        c.sync()?;
        std::fs::remove_dir_all(&dir).unwrap();
        c.shutdown(false)?; // debug mode: the agent process exits
        Ok(())
    };
    let result = run();
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let _ = std::fs::remove_file(&p);
    result.unwrap();
    assert!(status.success());
}
