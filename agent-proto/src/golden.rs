//! Every request and result through JSON and back, and golden lines that pin the wire format
//! (docs/agent-protocol.md) byte for byte.

use std::collections::BTreeMap;
use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::*;

/// One request of every op, with every optional argument set.
fn full_requests() -> Vec<Request> {
    vec![
        Ping {}.into(),
        Exec {
            argv: vec!["sh".into(), "-c".into(), "cat".into()],
            stdin: Some("text".into()),
            stdin_b64: Some(b64::encode(b"\xff")),
            env: BTreeMap::from([("A".into(), "1".into())]),
            cwd: Some("/tmp".into()),
            timeout_ms: Some(1500),
        }
        .into(),
        ReadFile {
            path: "/f".into(),
            offset: 3,
            len: Some(u64::MAX),
        }
        .into(),
        WriteFile {
            path: "/f".into(),
            data_b64: "aGk=".into(),
            mode: Some(FileMode::Octal("0o755".into())),
            append: true,
        }
        .into(),
        Sha256File {
            path: "/f".into(),
            offset: 1,
            len: Some(2),
        }
        .into(),
        SyncCaches {}.into(),
        Mount {
            source: "tag".into(),
            target: "/mnt".into(),
            fstype: "virtiofs".into(),
            options: Some("size=1m".into()),
            flags: vec!["ro".into(), "nosuid".into()],
        }
        .into(),
        StreamSink {
            port: 5000,
            timeout_ms: Some(10),
            tcp: true,
        }
        .into(),
        StreamSource {
            port: 5001,
            bytes: 1 << 30,
            seed: 7,
            tcp_host: Some("10.0.0.1".into()),
        }
        .into(),
        IoBench {
            path: "/dev/vdb".into(),
            block_size: 4096,
            count: 10,
            random: true,
            write: true,
            seed: 3,
            span: Some(1 << 20),
        }
        .into(),
        MetaBench {
            dir: "/mnt".into(),
            count: 200,
        }
        .into(),
        AllocTouch { mib: 200 }.into(),
        OnlineCpu {
            cpu: 2,
            online: true,
        }
        .into(),
        ProbeMemory {
            addr: 1 << 32,
            size: 128 << 20,
            online_type: Some(OnlineType::OnlineKernel),
        }
        .into(),
        OfflineMemory {
            addr: 1 << 32,
            size: 128 << 20,
        }
        .into(),
        SetTime { unix_ns: u64::MAX }.into(),
        GetTime {}.into(),
        AddEntropy {
            data_b64: "AAEC".into(),
            credit_bits: Some(8),
        }
        .into(),
        Meminfo {}.into(),
        Cpus {}.into(),
        Shutdown { reboot: true }.into(),
    ]
}

#[test]
fn every_op_has_a_sample_and_its_name() {
    let reqs = full_requests();
    let names: Vec<&str> = reqs.iter().map(Request::op).collect();
    assert_eq!(names, Request::OPS);
    for r in &reqs {
        let v = serde_json::to_value(r).unwrap();
        assert_eq!(v["op"], r.op(), "{r:?}");
    }
}

#[test]
fn every_request_round_trips() {
    let full = full_requests();
    // The same ops with only the required arguments (the defaults).
    let minimal: Vec<Request> = full
        .iter()
        .map(|r| {
            let v = serde_json::to_value(r).unwrap();
            let required: serde_json::Map<String, Value> = v["args"]
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| {
                    let mut bare = v.clone();
                    bare["args"].as_object_mut().unwrap().remove(*k);
                    serde_json::from_value::<Request>(bare).is_err()
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Request::from_parts(r.op(), Value::Object(required)).unwrap()
        })
        .collect();
    for (id, r) in full.iter().chain(&minimal).enumerate() {
        let id = u64::try_from(id).unwrap();
        let line = encode_request(id, r).unwrap();
        assert_eq!(decode_request(&line), Ok((id, r.clone())));
        let back: Request = serde_json::from_slice(&line).unwrap();
        assert_eq!(&back, r);
    }
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: T) {
    let line = encode_ok(42, &value).unwrap();
    let r: Response<T> = serde_json::from_slice(&line).unwrap();
    assert_eq!(r.id, Some(42));
    assert_eq!(r.outcome, Outcome::Ok(value));
    let head: ResponseHead = serde_json::from_slice(&line).unwrap();
    assert!(head.ok && head.error.is_none());
}

#[test]
fn every_result_round_trips() {
    round_trip(Pong {
        pong: true,
        version: "0.1.0".into(),
    });
    round_trip(ExecOutput {
        exit_code: None,
        signal: Some(9),
        timed_out: true,
        duration_ms: 2001,
        stdout: "\u{fffd}".into(),
        stdout_b64: Some("/w==".into()),
        stdout_truncated: true,
        stderr: "err\n".into(),
        stderr_b64: None,
        stderr_truncated: false,
    });
    round_trip(FileData {
        data_b64: "aGk=".into(),
        sha256: "ab".into(),
        len: 2,
        size: 2,
        eof: true,
    });
    round_trip(FileDigest {
        sha256: "cd".into(),
        len: 5,
        size: 9,
    });
    round_trip(Empty);
    round_trip(StreamStats {
        bytes: 10,
        sha256: "ef".into(),
        duration_ms: 3,
    });
    round_trip(IoBenchStats {
        ops: 10,
        bytes: 40960,
        duration_ns: 1000,
        mb_per_s: 40.96,
        iops: 1e7,
    });
    round_trip(MetaBenchStats {
        rounds: 200,
        duration_ns: 5,
        rounds_per_s: 4e10,
    });
    round_trip(AllocTouchStats {
        mib: 1,
        pages: 256,
        checksum: 32896,
        duration_ms: 1,
    });
    round_trip(CpuOnline {
        online: "0-2".into(),
    });
    round_trip(ProbedMemory {
        blocks: vec![32, 33],
        probed: vec![33],
        block_size: 128 << 20,
        mem_total_kb: 1 << 20,
    });
    round_trip(OfflinedMemory {
        blocks: vec![33],
        block_size: 128 << 20,
        mem_total_kb: 1 << 19,
        removed: false,
    });
    round_trip(Entropy { credited_bits: 24 });
    round_trip(GuestTime { unix_ns: u64::MAX });
    round_trip(MemInfo {
        mem_total_kb: 3,
        mem_free_kb: 2,
        mem_available_kb: None,
    });
    round_trip(CpuSets {
        online: "0".into(),
        possible: "0-3".into(),
        present: "0-3".into(),
    });
}

#[test]
fn errors_round_trip() {
    for (id, errno) in [(Some(7), Some(2)), (None, None)] {
        let body = ErrorBody {
            kind: kind::OS.into(),
            message: "open /x: No such file or directory (os error 2)".into(),
            errno,
        };
        let line = encode_error(id, body.clone());
        let r: Response<Empty> = serde_json::from_slice(&line).unwrap();
        assert_eq!((r.id, r.outcome), (id, Outcome::Error(body.clone())));
        let head: ResponseHead = serde_json::from_slice(&line).unwrap();
        assert_eq!((head.id, head.ok, head.error), (id, false, Some(body)));
    }
}

fn text(line: &[u8]) -> &str {
    std::str::from_utf8(line).unwrap()
}

#[test]
fn golden_request_lines() {
    let line = |id, r: Request| text(&encode_request(id, &r).unwrap()).to_string();
    assert_eq!(line(1, Ping {}.into()), r#"{"id":1,"op":"ping","args":{}}"#);
    assert_eq!(
        line(
            2,
            ReadFile {
                path: "/etc/hostname".into(),
                offset: 0,
                len: None,
            }
            .into()
        ),
        r#"{"id":2,"op":"read_file","args":{"path":"/etc/hostname","offset":0}}"#
    );
    assert_eq!(
        line(
            3,
            Exec {
                argv: vec!["sh".into(), "-c".into(), "x".into()],
                stdin_b64: Some("aGk=".into()),
                timeout_ms: Some(1500),
                ..Exec::default()
            }
            .into()
        ),
        r#"{"id":3,"op":"exec","args":{"argv":["sh","-c","x"],"stdin_b64":"aGk=","timeout_ms":1500}}"#
    );
    assert_eq!(
        line(
            4,
            WriteFile {
                path: "/f".into(),
                data_b64: "aGk=".into(),
                mode: Some(FileMode::Bits(0o644)),
                append: false,
            }
            .into()
        ),
        r#"{"id":4,"op":"write_file","args":{"path":"/f","data_b64":"aGk=","mode":420}}"#
    );
    assert_eq!(
        line(
            5,
            Mount {
                source: "none".into(),
                target: "/mnt".into(),
                fstype: "tmpfs".into(),
                options: None,
                flags: vec![],
            }
            .into()
        ),
        r#"{"id":5,"op":"mount","args":{"source":"none","target":"/mnt","fstype":"tmpfs","flags":[]}}"#
    );
    assert_eq!(
        line(6, Shutdown { reboot: false }.into()),
        r#"{"id":6,"op":"shutdown","args":{"reboot":false}}"#
    );
    let raw = encode_raw_request(7, "no_such_op", &json!({"x": 1})).unwrap();
    assert_eq!(text(&raw), r#"{"id":7,"op":"no_such_op","args":{"x":1}}"#);
}

#[test]
fn golden_response_lines() {
    let pong = Pong {
        pong: true,
        version: "0.1.0".into(),
    };
    assert_eq!(
        text(&encode_ok(5, &pong).unwrap()),
        r#"{"id":5,"ok":{"pong":true,"version":"0.1.0"}}"#
    );
    assert_eq!(text(&encode_ok(6, &Empty).unwrap()), r#"{"id":6,"ok":{}}"#);
    let digest = FileDigest {
        sha256: "ab".into(),
        len: 2,
        size: 4,
    };
    assert_eq!(
        text(&encode_ok(8, &digest).unwrap()),
        r#"{"id":8,"ok":{"sha256":"ab","len":2,"size":4}}"#
    );
    let exec = ExecOutput {
        exit_code: Some(0),
        stdout: "hi\n".into(),
        ..ExecOutput::default()
    };
    assert_eq!(
        text(&encode_ok(9, &exec).unwrap()),
        r#"{"id":9,"ok":{"exit_code":0,"signal":null,"timed_out":false,"duration_ms":0,"stdout":"hi\n","stdout_truncated":false,"stderr":"","stderr_truncated":false}}"#
    );
    let e = ErrorBody {
        kind: kind::OS.into(),
        message: "open /x: No such file".into(),
        errno: Some(2),
    };
    assert_eq!(
        text(&encode_error(Some(7), e)),
        r#"{"id":7,"error":{"kind":"os","message":"open /x: No such file","errno":2}}"#
    );
    let e = ErrorBody {
        kind: kind::BAD_REQUEST.into(),
        message: "request is not a JSON object".into(),
        errno: None,
    };
    assert_eq!(
        text(&encode_error(None, e)),
        r#"{"id":null,"error":{"kind":"bad_request","message":"request is not a JSON object"}}"#
    );
}

#[test]
fn request_lines_the_agent_refuses() {
    let refused = |line: &str| decode_request(line.as_bytes()).unwrap_err();
    let e = refused("{bad");
    assert_eq!(e.id, None);
    assert!(matches!(e.error, RequestError::Json(_)));
    assert_eq!(e.error.kind(), kind::BAD_REQUEST);
    assert_eq!(refused("[1]").error, RequestError::NotObject);
    assert_eq!(
        refused(r#"{"id": -1, "op": "ping"}"#).error,
        RequestError::Id
    );
    let e = refused(r#"{"id": 3, "op": 5}"#);
    assert_eq!((e.id, e.error), (Some(3), RequestError::OpName));
    let e = refused(r#"{"id": 6, "op": "nope", "args": null}"#);
    assert_eq!(e.error, RequestError::UnknownOp("nope".into()));
    assert_eq!(e.error.kind(), kind::UNSUPPORTED);
    assert_eq!(e.error.to_string(), "unknown op \"nope\"");
    let e = refused(r#"{"id": 8, "op": "probe_memory", "args": {"addr": 1, "size": 1, "x": 1}}"#);
    assert_eq!(e.id, Some(8));
    assert!(
        e.error
            .to_string()
            .starts_with("probe_memory: invalid args: unknown field `x`"),
        "{}",
        e.error
    );
    let e = refused(
        r#"{"id": 9, "op": "probe_memory", "args": {"addr": 1, "size": 1, "online_type": "up"}}"#,
    );
    assert_eq!(e.error.kind(), kind::BAD_REQUEST);
}

#[test]
fn absent_or_null_args_are_empty_and_extra_keys_ignored() {
    for line in [
        r#"{"id": 5, "op": "ping"}"#,
        r#"{"id": 5, "op": "ping", "args": null, "trace": "x"}"#,
        r#"{"op": "ping", "args": {}, "id": 5}"#,
    ] {
        assert_eq!(decode_request(line.as_bytes()), Ok((5, Ping {}.into())));
    }
    assert_eq!(
        decode_request(br#"{"id": 1, "op": "shutdown"}"#),
        Ok((1, Shutdown { reboot: false }.into()))
    );
    assert_eq!(
        decode_request(br#"{"id": 1, "op": "write_file", "args": {"path": "/f", "data_b64": "", "mode": "0644"}}"#),
        Ok((
            1,
            WriteFile {
                path: "/f".into(),
                data_b64: String::new(),
                mode: Some(FileMode::Octal("0644".into())),
                append: false,
            }
            .into()
        ))
    );
}

#[test]
fn clients_read_what_older_agents_leave_out() {
    let r: OkPayload<ExecOutput> = serde_json::from_value(json!({"ok": {
        "exit_code": 1, "signal": null, "timed_out": false, "stdout": "", "stderr": ""}}))
    .unwrap();
    assert_eq!((r.ok.exit_code, r.ok.duration_ms), (Some(1), 0));
    let d: FileDigest = serde_json::from_value(json!({"sha256": "ab", "size": 1})).unwrap();
    assert_eq!(d.len, 0);
    let e: ErrorBody = serde_json::from_value(json!({})).unwrap();
    assert_eq!((e.kind.as_str(), e.message.as_str()), (kind::UNKNOWN, ""));
    assert!(serde_json::from_value::<ErrorBody>(json!({"kind": 5})).is_err());
    // `{}` results take any value; the others do not.
    assert_eq!(
        serde_json::from_value::<Empty>(json!([1, 2])).unwrap(),
        Empty
    );
    assert!(serde_json::from_value::<Pong>(json!([1, 2])).is_err());
    let head: ResponseHead = serde_json::from_value(json!({"id": 1, "ok": null})).unwrap();
    assert!(head.ok);
}
