//! `kestrel --api-sock`: Firecracker's REST API on a Unix socket, driven like a Firecracker
//! client does (raw HTTP/1.1 over the socket). The parts that boot a VM use a tiny spinning
//! guest and need /dev/kvm (under `KESTREL_TEST_REQUIRE_ALL` its absence fails them).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-api-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A 64-bit ELF whose code is `jmp $` at 1 MiB (a guest that spins).
fn spin_kernel(dir: &Path) -> PathBuf {
    tiny_kernel(dir, "spin.elf", &[0xeb, 0xfe])
}

/// A 64-bit ELF whose code at 1 MiB is `code`.
fn tiny_kernel(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, kestrel_tests::tiny_elf(code)).unwrap();
    p
}

/// A `kestrel --api-sock` process, killed when dropped.
struct Kestrel {
    child: Child,
    sock: PathBuf,
}

impl Kestrel {
    fn start(dir: &Path, extra: &[&str]) -> Kestrel {
        let sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&sock);
        let child = Command::new(env!("CARGO_BIN_EXE_kestrel"))
            .arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < end, "the API socket never answered");
            std::thread::sleep(Duration::from_millis(5));
        }
        Kestrel { child, sock }
    }

    /// One request on a fresh connection: (status, JSON body or Null).
    fn req(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body.as_bytes()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        parse_response(&resp)
    }

    fn ok(&self, method: &str, path: &str, body: Value) {
        let (status, v) = self.req(method, path, Some(body));
        assert_eq!(status, 204, "{method} {path}: {v}");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Kestrel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_response(resp: &str) -> (u16, Value) {
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {resp:?}"));
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
    };
    (status, v)
}

fn fault(v: &Value) -> &str {
    v["fault_message"].as_str().unwrap_or_default()
}

/// Whether /dev/kvm exists; when it does not, [`kestrel_tests::skip_without`] (a failure under
/// scripts/test.sh).
fn have_kvm() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    kestrel_tests::skip_without("/dev/kvm");
    false
}

#[test]
fn bad_requests_get_firecrackers_status_codes() {
    let k = Kestrel::start(&scratch("bad"), &[]);
    let (s, v) = k.req("GET", "/", None);
    assert_eq!(s, 200);
    assert_eq!(
        (v["state"].as_str(), v["id"].as_str()),
        (Some("Not started"), Some("anonymous-instance"))
    );
    for (method, path, body, needle) in [
        (
            "GET",
            "/nope",
            None,
            "Invalid request method and/or path: GET /nope.",
        ),
        (
            "POST",
            "/actions",
            Some(json!({})),
            "Invalid request method and/or path",
        ),
        ("PUT", "/boot-source", None, "Empty PUT request."),
        (
            "PUT",
            "/actions",
            Some(json!({"action_type": "Reboot"})),
            "unknown variant `Reboot`",
        ),
        (
            "PUT",
            "/actions",
            Some(json!({"action_type": "InstanceStart"})),
            "without kernel configuration",
        ),
        (
            "PUT",
            "/actions",
            Some(json!({"action_type": "SendCtrlAltDel"})),
            "before starting the microVM",
        ),
        (
            "PATCH",
            "/vm",
            Some(json!({"state": "Paused"})),
            "before starting the microVM",
        ),
        (
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 0, "mem_size_mib": 64})),
            "machine-config.vcpu_count",
        ),
        (
            "PUT",
            "/balloon",
            Some(json!({"amount_mib": 8, "deflate_on_oom": true})),
            "not supported by Kestrel",
        ),
        (
            "PUT",
            "/drives/a",
            Some(json!({"drive_id": "b", "is_root_device": false})),
            "does not match",
        ),
    ] {
        let (s, v) = k.req(method, path, body);
        assert_eq!(s, 400, "{method} {path}: {v}");
        assert!(fault(&v).contains(needle), "{method} {path}: {v}");
    }
    // Malformed HTTP and an oversized body: 400, and the server goes on.
    for raw in [
        &b"NOT HTTP\x01\r\n\r\n"[..],
        b"PUT /vsock HTTP/1.1\r\nContent-Length: 999999\r\n\r\n",
    ] {
        let mut s = UnixStream::connect(&k.sock).unwrap();
        s.write_all(raw).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert_eq!(parse_response(&resp).0, 400, "{resp}");
    }
    let (s, v) = k.req("GET", "/version", None);
    assert_eq!(s, 200);
    assert!(v["firecracker_version"].is_string(), "{v}");
}

#[test]
fn api_socket_answers_quickly_and_bounds_connections() {
    let dir = scratch("conn");
    let t0 = Instant::now();
    let k = Kestrel::start(&dir, &[]);
    let started = t0.elapsed();
    eprintln!("API socket answering after {started:?}");
    // Eleven clients that never finish a request: the last one is told the server is full,
    // and a well-behaved client is still served once the slow ones time out or go away.
    let mut slow = Vec::new();
    for _ in 0..11 {
        let mut s = UnixStream::connect(&k.sock).unwrap();
        s.write_all(b"PUT /vsock HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
            .unwrap();
        slow.push(s);
    }
    let last = slow.last_mut().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut resp = String::new();
    let _ = last.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 503 "), "{resp:?}");
    drop(slow);
    // Once the server has seen them go, there is room again.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = UnixStream::connect(&k.sock).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        if resp.starts_with("HTTP/1.1 200 ") {
            break;
        }
        assert!(Instant::now() < end, "never served again: {resp:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The tiny guest booted through the API: Firecracker's thread names, pause/resume, drive
/// and rate-limiter PATCHes, Ctrl-Alt-Del, metrics in a FIFO.
#[test]
fn boot_through_the_api() {
    if !have_kvm() {
        return;
    }
    let dir = scratch("boot");
    let kernel = spin_kernel(&dir);
    let fifo = dir.join("metrics.fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let log = dir.join("fc.log");
    let _ = std::fs::remove_file(&log);
    std::fs::write(&log, "").unwrap();
    let (img1, img2) = (dir.join("a.img"), dir.join("b.img"));
    std::fs::write(&img1, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&img2, vec![1u8; 2 << 20]).unwrap();

    let k = Kestrel::start(&dir, &["--id", "vm-42"]);
    k.ok(
        "PUT",
        "/logger",
        json!({"log_path": log, "level": "Info", "show_level": true}),
    );
    k.ok(
        "PUT",
        "/metrics",
        json!({"metrics_path": fifo, "emit_id": true}),
    );
    let (s, v) = k.req("PUT", "/metrics", Some(json!({"metrics_path": fifo})));
    assert_eq!(
        (s, fault(&v)),
        (
            400,
            "Metrics error: Reinitialization of metrics not allowed."
        )
    );
    k.ok(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 64, "max_vcpus": 3, "max_mem_size_mib": 320}),
    );
    k.ok(
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
    );
    k.ok(
        "PUT",
        "/drives/scratch",
        json!({"drive_id": "scratch", "path_on_host": img1, "is_root_device": false, "is_read_only": true}),
    );
    let mut reader = std::fs::File::open(&fifo).unwrap();
    k.ok("PUT", "/actions", json!({"action_type": "InstanceStart"}));
    let (_, v) = k.req("GET", "/", None);
    assert_eq!(
        (v["state"].as_str(), v["id"].as_str()),
        (Some("Running"), Some("vm-42"))
    );

    // kata's way of finding vCPU threads: /proc/<pid>/task/*/comm = "fc_vcpu <N>".
    let comms: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", k.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    for n in 0..2 {
        assert!(comms.contains(&format!("fc_vcpu {n}")), "{comms:?}");
    }
    assert!(comms.contains(&"fc_api".to_string()), "{comms:?}");
    let (s, v) = k.req("GET", "/kestrel/threads", None);
    assert_eq!(s, 200);
    assert_eq!(
        v.as_array()
            .unwrap()
            .iter()
            .filter(|t| t["kind"] == "vcpu")
            .count(),
        2,
        "{v}"
    );

    // After boot: pre-boot requests are refused, run-time ones work.
    let (s, v) = k.req(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 1, "mem_size_mib": 64})),
    );
    assert_eq!(
        (s, fault(&v)),
        (
            400,
            "The requested operation is not supported after starting the microVM."
        )
    );
    k.ok("PATCH", "/vm", json!({"state": "Paused"}));
    let (_, v) = k.req("GET", "/", None);
    assert_eq!(v["state"], "Paused");
    k.ok("PATCH", "/vm", json!({"state": "Resumed"}));
    k.ok(
        "PATCH",
        "/drives/scratch",
        json!({"drive_id": "scratch", "path_on_host": img2}),
    );
    k.ok(
        "PATCH",
        "/drives/scratch",
        json!({"drive_id": "scratch", "rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}),
    );
    let (s, v) = k.req(
        "PATCH",
        "/drives/scratch",
        Some(json!({"drive_id": "scratch", "path_on_host": "/nonexistent.img"})),
    );
    assert_eq!(s, 400, "{v}");
    let (_, v) = k.req("GET", "/vm/config", None);
    assert_eq!(v["drives"][0]["path_on_host"], json!(img2));
    k.ok("PUT", "/actions", json!({"action_type": "SendCtrlAltDel"}));

    // Kestrel's extensions: vCPUs and memory at run time (the guest would online them).
    let states = |k: &Kestrel| -> Vec<String> {
        let (_, v) = k.req("GET", "/kestrel/vcpus", None);
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| c["state"].as_str().unwrap().to_string())
            .collect()
    };
    k.ok("PATCH", "/kestrel/vcpus", json!({"vcpu_count": 3}));
    assert_eq!(states(&k), ["running", "running", "running"]);
    k.ok("PATCH", "/kestrel/vcpus", json!({"vcpu_count": 1}));
    assert_eq!(states(&k), ["running", "parked", "parked"]);
    let (s, v) = k.req("PATCH", "/kestrel/vcpus", Some(json!({"vcpu_count": 4})));
    assert_eq!(s, 400, "{v}");
    let (s, range) = k.req("PUT", "/kestrel/memory", Some(json!({"size_mib": 128})));
    assert_eq!((s, range["size_mib"].as_u64()), (200, Some(128)), "{range}");
    let (_, v) = k.req("GET", "/kestrel/memory", None);
    assert_eq!(v["plugged"][0], range, "{v}");
    let (s, v) = k.req("PUT", "/kestrel/memory", Some(json!({"size_mib": 1024})));
    assert_eq!(s, 400, "more than max_mem_size_mib: {v}");
    k.ok("PUT", "/kestrel/memory/unplug", range.clone());
    let (_, v) = k.req("GET", "/kestrel/memory", None);
    assert_eq!(v["plugged"], json!([]), "{v}");

    // Metrics: one JSON object per line in Firecracker's shape.
    k.ok("PUT", "/actions", json!({"action_type": "FlushMetrics"}));
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while reader.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let m: Value = serde_json::from_slice(&line).unwrap();
    assert!(m["utc_timestamp_ms"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(m["id"], "vm-42");
    assert!(
        m["put_api_requests"]["actions_count"].as_u64().unwrap() >= 1,
        "{m}"
    );
    assert_eq!(m["put_api_requests"]["metrics_fails"], 1, "{m}");
    assert_eq!(m["patch_api_requests"]["drive_fails"], 1, "{m}");
    assert!(m["block_scratch"].is_object(), "{m}");
    assert!(m["vcpu"]["exit_io"].is_u64(), "{m}");
    assert!(m["latencies_us"]["pause_vm"].is_u64(), "{m}");
    assert!(m["api_server"]["process_startup_time_us"].is_u64(), "{m}");

    // The logger got Firecracker-style lines.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|l| l
            .contains("[vm-42:fc_api:INFO] The API server received a PATCH request on \"/vm\".")),
        "{text}"
    );
}

/// `--config-file` with `--api-sock`: the VM boots from the file, the API serves it running.
#[test]
fn config_file_and_api_socket_together() {
    if !have_kvm() {
        return;
    }
    let dir = scratch("cfgapi");
    let kernel = spin_kernel(&dir);
    let cfg = dir.join("vm.json");
    std::fs::write(
        &cfg,
        json!({
            "boot-source": {"kernel_image_path": kernel},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
            "serial": {"output": "none"}
        })
        .to_string(),
    )
    .unwrap();
    let k = Kestrel::start(&dir, &["--config-file", cfg.to_str().unwrap()]);
    let (_, v) = k.req("GET", "/", None);
    assert_eq!(v["state"], "Running");
    let (s, v) = k.req(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(s, 400, "{v}");
    let comm = std::fs::read_dir(format!("/proc/{}/task", k.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .any(|c| c.trim() == "fc_vcpu 0");
    assert!(comm, "no fc_vcpu 0 thread");
}

/// A configuration file's `logger` and `metrics` sections, without an API socket: the log
/// gets Firecracker's lines and the metrics file a line when the guest stops (it resets
/// through the i8042 at once; kestrel exits 0).
#[test]
fn config_file_logger_and_metrics_sections() {
    if !have_kvm() {
        return;
    }
    let dir = scratch("sections");
    // mov al, 0xfe; out 0x64, al; jmp $
    let kernel = tiny_kernel(&dir, "reset.elf", &[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
    let (log, metrics) = (dir.join("vm.log"), dir.join("metrics.json"));
    for p in [&log, &metrics] {
        let _ = std::fs::remove_file(p);
    }
    let cfg = dir.join("vm.json");
    std::fs::write(
        &cfg,
        json!({
            "boot-source": {"kernel_image_path": kernel},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
            "serial": {"output": "none"},
            "logger": {"log_path": log, "level": "Info", "show_level": true},
            "metrics": {"metrics_path": metrics, "emit_id": true}
        })
        .to_string(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(["--id", "cfg-vm", "--config-file"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("[cfg-vm:main:INFO] VM stopped")),
        "{text}"
    );
    let lines = std::fs::read_to_string(&metrics).unwrap();
    let m: Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert_eq!(m["id"], "cfg-vm");
    assert!(m["vcpu"]["exit_io"].as_u64().unwrap() >= 1, "{m}");
}

/// Firecracker's snapshot flow with the tiny guest: pause and `PUT /snapshot/create` in one
/// process; `PUT /snapshot/load` in a second (paused until resumed) and `kestrel restore` in a
/// third (running, the API serving it); overrides that name a device the snapshot lacks exit 2.
#[test]
fn snapshot_create_then_load_and_restore() {
    if !have_kvm() {
        return;
    }
    let dir = scratch("snap");
    let kernel = spin_kernel(&dir);
    let snap = dir.join("snapshot");
    let _ = std::fs::remove_dir_all(&snap);
    std::fs::create_dir_all(&snap).unwrap();
    let (state, memory) = (snap.join("state"), snap.join("memory"));
    {
        let k = Kestrel::start(&dir, &[]);
        k.ok(
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 32}),
        );
        k.ok("PUT", "/boot-source", json!({"kernel_image_path": kernel}));
        k.ok("PUT", "/actions", json!({"action_type": "InstanceStart"}));
        let body = json!({"snapshot_path": state, "mem_file_path": memory});
        let (s, v) = k.req("PUT", "/snapshot/create", Some(body.clone()));
        assert_eq!(s, 400, "{v}");
        assert!(fault(&v).contains("pause it first"), "{v}");
        k.ok("PATCH", "/vm", json!({"state": "Paused"}));
        k.ok("PUT", "/snapshot/create", body);
        assert!(state.is_file() && memory.is_file());
        let (_, v) = k.req("GET", "/", None);
        assert_eq!(v["state"], "Paused");
    }

    let k = Kestrel::start(&scratch("snapload"), &[]);
    k.ok(
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": state,
               "mem_backend": {"backend_type": "File", "backend_path": memory}}),
    );
    let (_, v) = k.req("GET", "/", None);
    assert_eq!(v["state"], "Paused");
    k.ok("PATCH", "/vm", json!({"state": "Resumed"}));
    let (_, v) = k.req("GET", "/", None);
    assert_eq!(v["state"], "Running");
    let (_, v) = k.req("GET", "/vm/config", None);
    assert_eq!(v["machine-config"]["vcpu_count"], 2, "{v}");
    let (s, v) = k.req("GET", "/kestrel/threads", None);
    assert_eq!(s, 200);
    let vcpus = v.as_array().unwrap().iter().filter(|t| t["kind"] == "vcpu");
    assert_eq!(vcpus.count(), 2, "{v}");
    drop(k);

    let snap_arg = snap.to_str().unwrap();
    let k = Kestrel::start(
        &scratch("snaprestore"),
        &["restore", "--snapshot", snap_arg],
    );
    let (_, v) = k.req("GET", "/", None);
    assert_eq!(v["state"], "Running");
    let (s, v) = k.req(
        "PUT",
        "/snapshot/load",
        Some(json!({"snapshot_path": state, "mem_file_path": memory})),
    );
    assert_eq!(s, 400, "{v}");
    assert!(fault(&v).contains("after starting the microVM"), "{v}");
    drop(k);

    // Overrides that do not fit the snapshot: exit 2 naming the override, nothing started.
    let bad = dir.join("bad-overrides.json");
    std::fs::write(
        &bad,
        json!({"drives": [{"drive_id": "nope", "path_on_host": "/x.img"}]}).to_string(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(["restore", "--snapshot", snap_arg, "--overrides"])
        .arg(&bad)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("overrides.drives[0].drive_id"), "{stderr}");
}
