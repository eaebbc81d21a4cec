//! The project's guest driven through Firecracker's API socket: `kestrel --api-sock` is
//! configured and booted with Firecracker's getting-started `curl --unix-socket` sequence, then
//! checked through the guest agent: a drive hot-swapped with `PATCH /drives/{id}` is seen by the
//! guest, `PATCH /vm` pauses and resumes it, bad requests get Firecracker's status codes, the
//! metrics reach a FIFO in Firecracker's shape, vCPU threads carry Firecracker's names, and
//! `SendCtrlAltDel` makes the guest reboot (the `kestrel` process then exits 0). One boot.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kestrel_sandbox::agent::AgentClient;
use kestrel_tests::*;
use serde_json::{json, Value};

use kestrel_tests::guest::{hex, kestrel_binary};

use super::{sh, wait_until};

const MIB: u64 = 1 << 20;

/// `curl -X <method> --unix-socket <sock> --data <body> http://localhost<path>`, as
/// Firecracker's getting-started guide runs it: (status, body).
fn curl(sock: &Path, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-X", method, "--unix-socket"])
        .arg(sock)
        .args(["-w", "\n%{http_code}"]);
    if let Some(b) = body {
        cmd.args(["--data", &b.to_string()]);
    }
    let out = cmd.arg(format!("http://localhost{path}")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl {method} {path}: {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (status, body.to_string())
}

fn put(sock: &Path, path: &str, body: Value) {
    let (status, text) = curl(sock, "PUT", path, Some(&body));
    assert_eq!(status, 204, "PUT {path}: {text}");
}

fn patch(sock: &Path, path: &str, body: Value) {
    let (status, text) = curl(sock, "PATCH", path, Some(&body));
    assert_eq!(status, 204, "PATCH {path}: {text}");
}

fn random_file(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; usize::try_from(size).unwrap()];
    XorShift::new(seed).fill(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

/// The `kestrel` process (killed if the test fails before it exits).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Read metrics lines from `fifo` on a thread as they come.
fn read_metrics(fifo: &Path) -> std::sync::Arc<std::sync::Mutex<Vec<Value>>> {
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (out, fifo) = (lines.clone(), fifo.to_path_buf());
    std::thread::spawn(move || {
        // Blocks until kestrel opens the FIFO (PUT /metrics).
        let reader = BufReader::new(std::fs::File::open(fifo).unwrap());
        for line in reader.lines().map_while(Result::ok) {
            let v: Value = serde_json::from_str(&line).expect("a metrics line is JSON");
            out.lock().unwrap().push(v);
        }
    });
    lines
}

fn sha(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(data))
}

#[test]
fn firecracker_getting_started_sequence_boots_the_guest() {
    if Command::new("curl").arg("--version").output().is_err() {
        skip_without("curl (scripts/common.sh installs it)");
        return;
    }
    let g = guest_artifacts();
    let dir = scratch_dir().join("fc-api");
    std::fs::create_dir_all(&dir).unwrap();
    let (sock, uds, log, fifo, console) = (
        dir.join("firecracker.socket"),
        dir.join("v.sock"),
        dir.join("firecracker.log"),
        dir.join("metrics.fifo"),
        dir.join("console.txt"),
    );
    for p in [&sock, &uds, &log, &fifo] {
        let _ = std::fs::remove_file(p);
    }
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let metrics = read_metrics(&fifo);
    std::fs::write(&log, "").unwrap();
    let small = random_file(&dir.join("small.img"), MIB, 31);
    let large = random_file(&dir.join("large.img"), 3 * MIB, 32);

    let t0 = Instant::now();
    let child = Command::new(kestrel_binary())
        .args(["--api-sock", sock.to_str().unwrap(), "--id", "fc-api-test"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()),
        "no API socket"
    );

    // Firecracker's getting-started sequence (its rootfs is our initramfs; a drive to swap).
    put(
        &sock,
        "/logger",
        json!({"log_path": log, "level": "Debug", "show_level": true, "show_log_origin": true}),
    );
    put(
        &sock,
        "/boot-source",
        json!({"kernel_image_path": g.vmlinux, "initrd_path": g.initramfs,
               "boot_args": "console=ttyS0 reboot=k panic=1"}),
    );
    put(
        &sock,
        "/drives/scratch",
        json!({"drive_id": "scratch", "path_on_host": dir.join("small.img"),
               "is_root_device": false, "is_read_only": true}),
    );
    put(
        &sock,
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 256}),
    );
    put(&sock, "/vsock", json!({"guest_cid": 3, "uds_path": uds}));
    put(&sock, "/metrics", json!({"metrics_path": fifo}));
    // Bad requests: Firecracker's 400 with a fault_message.
    let (status, text) = curl(&sock, "GET", "/no-such-path", None);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("fault_message"), "{text}");
    let (status, text) = curl(&sock, "PATCH", "/vm", Some(&json!({"state": "Paused"})));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("before starting the microVM"), "{text}");
    put(&sock, "/actions", json!({"action_type": "InstanceStart"}));

    let mut agent = AgentClient::connect(
        &uds,
        kestrel_agent_proto::AGENT_PORT,
        Duration::from_secs(600),
    )
    .unwrap_or_else(|e| {
        panic!(
            "agent never answered: {e}\nconsole:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        )
    });
    eprintln!("agent up {:?} after kestrel started", t0.elapsed());

    // vCPU threads by Firecracker's names, as kata finds them.
    let comms: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", proc.0.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    assert!(
        comms.contains(&"fc_vcpu 0".into()) && comms.contains(&"fc_vcpu 1".into()),
        "{comms:?}"
    );

    // The drive, then a hot-swap to a larger image: the guest sees the new size and bytes.
    let size = |agent: &mut AgentClient| {
        agent
            .read_file("/sys/block/vda/size")
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(size(&mut agent), "2048");
    let d = agent.sha256_file_range("/dev/vda", 0, Some(MIB)).unwrap();
    assert_eq!(d.sha256, sha(&small));
    patch(
        &sock,
        "/drives/scratch",
        json!({"drive_id": "scratch", "path_on_host": dir.join("large.img")}),
    );
    assert!(
        wait_until(Duration::from_secs(60), || size(&mut agent) == "6144"),
        "the guest never saw the swapped drive"
    );
    let d = agent
        .sha256_file_range("/dev/vda", 2 * MIB, Some(MIB))
        .unwrap();
    assert_eq!(d.sha256, sha(&large[2 * kestrel_tests::guest::MIB_BYTES..]));
    patch(
        &sock,
        "/drives/scratch",
        json!({"drive_id": "scratch",
               "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100}}}),
    );

    // Pause: the guest answers nothing; resume: it does again.
    patch(&sock, "/vm", json!({"state": "Paused"}));
    let (_, info) = curl(&sock, "GET", "/", None);
    assert!(info.contains("\"Paused\""), "{info}");
    let paused = AgentClient::connect(
        &uds,
        kestrel_agent_proto::AGENT_PORT,
        Duration::from_secs(2),
    );
    assert!(paused.is_err(), "a paused guest answered");
    patch(&sock, "/vm", json!({"state": "Resumed"}));
    assert!(agent.ping().is_ok(), "no answer after resume");

    // After boot, pre-boot requests are refused.
    let (status, text) = curl(
        &sock,
        "PUT",
        "/machine-config",
        Some(&json!({"vcpu_count": 1, "mem_size_mib": 128})),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("after starting the microVM"), "{text}");

    // The keyboard the guest needs for Ctrl-Alt-Del.
    let (code, out, _) = sh(&mut agent, "cat /proc/bus/input/devices");
    assert!(code == 0 && out.contains("keyboard"), "{out}");

    // Metrics: one line per flush (every 60 s and now), Firecracker's shape; the counters of
    // each line are what happened since the previous one, so they add up to the totals.
    put(&sock, "/actions", json!({"action_type": "FlushMetrics"}));
    let total = |comp: &str, field: &str| -> u64 {
        let lines = metrics.lock().unwrap();
        lines.iter().filter_map(|m| m[comp][field].as_u64()).sum()
    };
    assert!(
        wait_until(Duration::from_secs(10), || total(
            "patch_api_requests",
            "drive_count"
        ) >= 2),
        "no metrics line after FlushMetrics: {:?}",
        metrics.lock().unwrap()
    );
    let last = metrics.lock().unwrap().last().cloned().unwrap();
    assert!(last["utc_timestamp_ms"].as_u64().unwrap() > 0, "{last}");
    assert!(last["vcpu"]["exit_mmio"].is_u64(), "{last}");
    assert!(total("block_scratch", "read_bytes") >= 2 * MIB);
    assert_eq!(
        total("block", "read_bytes"),
        total("block_scratch", "read_bytes")
    );
    assert!(total("vsock", "tx_bytes_count") > 0);
    assert!(total("vsock", "rx_bytes_count") > 0);
    assert!(total("put_api_requests", "actions_count") >= 2);
    assert!(total("vcpu", "exit_mmio") > 0);

    // Firecracker-style log lines.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("[fc-api-test:fc_api:INFO:") && l.contains("PATCH request")),
        "{text}"
    );

    // Ctrl-Alt-Del: the guest reboots, kestrel exits 0 and removes its socket.
    put(&sock, "/actions", json!({"action_type": "SendCtrlAltDel"}));
    let end = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < end,
            "the guest did not reboot on Ctrl-Alt-Del\nconsole:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    let _ = proc.0.stderr.take().unwrap().read_to_string(&mut stderr);
    assert!(status.success(), "exit status {status:?}: {stderr}");
    assert!(!sock.exists(), "the API socket is left behind");
}
