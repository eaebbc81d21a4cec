//! The `kestrel` binary's exit statuses: 2 with the field named on stderr for every
//! configuration create would refuse (`kestrel validate` and a boot alike), 1 when a vCPU or
//! event-loop thread panics (debug builds inject it with `KESTREL_TEST_INJECT_PANIC`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-cli-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A 64-bit ELF whose code is `jmp $` at 1 MiB (a guest that spins). Tests run in parallel
/// and share the file: it is written under another name and renamed into place, so a
/// `kestrel` reading it never sees it half-written.
fn spin_kernel() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = scratch("k");
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!("spin.elf.{n}"));
    std::fs::write(&tmp, kestrel_tests::tiny_elf(&[0xeb, 0xfe])).unwrap();
    let p = dir.join("spin.elf");
    std::fs::rename(&tmp, &p).unwrap();
    p
}

fn config_json(kernel: &Path, extra: &str) -> String {
    format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}"}},
            "machine-config": {{"vcpu_count": 2, "mem_size_mib": 32}},
            "serial": {{"output": "none"}}{extra}}}"#,
        kernel.display(),
    )
}

fn write_config(tag: &str, json: &str) -> PathBuf {
    let p = scratch("cfg").join(format!("{tag}.json"));
    std::fs::write(&p, json).unwrap();
    p
}

/// Run `kestrel` with `args`, killing it after 20 s (a hang fails the test).
fn kestrel(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kestrel"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            panic!("kestrel {args:?} did not finish in 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `kestrel --config <cfg> validate` and `kestrel --config <cfg>` both exit 2 naming `field`.
fn refused_with(cfg: &Path, field: &str) {
    for validate in [true, false] {
        let mut args = vec![std::ffi::OsStr::new("--config"), cfg.as_os_str()];
        if validate {
            args.push("validate".as_ref());
        }
        let out = kestrel(&args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{cfg:?} (validate: {validate}): {stderr}"
        );
        assert!(
            stderr.contains(field),
            "{cfg:?} (validate: {validate}): stderr does not name {field}: {stderr}"
        );
    }
}

#[test]
fn valid_config_validates() {
    let cfg = write_config("ok", &config_json(&spin_kernel(), ""));
    let out = kestrel(
        &["--config".as_ref(), cfg.as_os_str(), "validate".as_ref()],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// Firecracker's command line: `--config-file` (and `--no-api`) take the same file.
#[test]
fn firecracker_config_file_flag_validates() {
    let cfg = write_config("fc", &config_json(&spin_kernel(), ""));
    let out = kestrel(
        &[
            "--no-api".as_ref(),
            "--config-file".as_ref(),
            cfg.as_os_str(),
            "validate".as_ref(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let bad = write_config(
        "fc-bad",
        &config_json(
            &spin_kernel(),
            r#", "balloon": {"amount_mib": 64, "deflate_on_oom": false}"#,
        ),
    );
    let out = kestrel(
        &[
            "--config-file".as_ref(),
            bad.as_os_str(),
            "validate".as_ref(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("balloon") && stderr.contains("not supported by Kestrel"),
        "{stderr}"
    );
}

#[test]
fn special_files_as_config_exit_2_without_hanging() {
    let fifo = scratch("fifo").join("config.fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for p in [Path::new("/dev/zero"), &fifo, &scratch("dir")] {
        for validate in [true, false] {
            let mut args = vec![std::ffi::OsStr::new("--config"), p.as_os_str()];
            if validate {
                args.push("validate".as_ref());
            }
            let out = kestrel(&args, &[]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{p:?}: {stderr}");
            assert!(stderr.contains("not a regular file"), "{p:?}: {stderr}");
        }
    }
}

#[test]
fn control_characters_in_boot_args_exit_2() {
    let k = spin_kernel();
    let json = config_json(&k, "").replace(
        r#""kernel_image_path""#,
        r#""boot_args": "console=ttyS0\tpanic=1", "kernel_image_path""#,
    );
    refused_with(&write_config("tab", &json), "boot-source.boot_args");
}

#[test]
fn directory_as_serial_path_exits_2() {
    let json = config_json(&spin_kernel(), "").replace(
        r#""serial": {"output": "none"}"#,
        &format!(
            r#""serial": {{"output": "file", "path": "{}"}}"#,
            scratch("serialdir").display()
        ),
    );
    refused_with(&write_config("serialdir", &json), "serial.path");
}

#[test]
fn directories_as_kernel_and_drive_exit_2() {
    let d = scratch("somedir");
    refused_with(
        &write_config("kdir", &config_json(&d, "")),
        "boot-source.kernel_image_path",
    );
    let drive = format!(
        r#", "drives": [{{"drive_id": "d0", "path_on_host": "{}", "is_root_device": false,
            "is_read_only": true}}]"#,
        d.display()
    );
    refused_with(
        &write_config("ddir", &config_json(&spin_kernel(), &drive)),
        "drives[0].path_on_host",
    );
    let initrd = config_json(&spin_kernel(), "").replace(
        r#""kernel_image_path""#,
        &format!(r#""initrd_path": "{}", "kernel_image_path""#, d.display()),
    );
    refused_with(&write_config("idir", &initrd), "boot-source.initrd_path");
}

#[test]
fn non_kernel_file_exits_2() {
    let p = scratch("nk").join("not-a-kernel");
    std::fs::write(&p, "plain text").unwrap();
    refused_with(
        &write_config("nk", &config_json(&p, "")),
        "boot-source.kernel_image_path",
    );
}

#[test]
fn overflowing_rate_limiter_exits_2() {
    let img = scratch("rl").join("disk.img");
    std::fs::write(&img, [0u8; 512]).unwrap();
    let drive = format!(
        r#", "drives": [{{"drive_id": "d0", "path_on_host": "{}", "is_root_device": false,
            "is_read_only": true,
            "rate_limiter": {{"bandwidth": {{"size": 1, "refill_time": {}}}}}}}]"#,
        img.display(),
        1u64 << 58
    );
    refused_with(
        &write_config("rl", &config_json(&spin_kernel(), &drive)),
        "drives[0].rate_limiter.bandwidth.refill_time",
    );
}

#[test]
fn thread_panics_exit_1_naming_the_thread() {
    if !Path::new("/dev/kvm").exists() {
        kestrel_tests::skip_without("/dev/kvm");
        return;
    }
    let cfg = write_config("panic", &config_json(&spin_kernel(), ""));
    for (what, thread) in [
        ("vcpu1", "kestrel-vm-vcpu1"),
        ("evloop", "kestrel-vm-evloop"),
    ] {
        let out = kestrel(
            &["--config".as_ref(), cfg.as_os_str()],
            &[("KESTREL_TEST_INJECT_PANIC", what)],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(
            stderr.contains(&format!("thread {thread} panicked: injected panic")),
            "{what}: {stderr}"
        );
    }
}

/// `--snapshot-on-ready` needs a vsock to reach the guest agent: refused before anything is
/// created (the snapshot directory included).
#[test]
fn snapshot_on_ready_without_vsock_exits_2() {
    let cfg = write_config("novsock", &config_json(&spin_kernel(), ""));
    let dir = scratch("novsock").join("snap");
    let _ = std::fs::remove_dir_all(&dir);
    let out = kestrel(
        &[
            "--config-file".as_ref(),
            cfg.as_os_str(),
            "--snapshot-on-ready".as_ref(),
            dir.as_os_str(),
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("needs a `vsock` section"), "{stderr}");
    assert!(!dir.exists());
    // --agent-timeout only goes with --snapshot-on-ready; --api-sock not at all.
    let out = kestrel(
        &[
            "--config-file".as_ref(),
            cfg.as_os_str(),
            "--agent-timeout".as_ref(),
            "5".as_ref(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let out = kestrel(
        &[
            "--snapshot-on-ready".as_ref(),
            dir.as_os_str(),
            "--api-sock".as_ref(),
            "/tmp/x.sock".as_ref(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
}

/// A guest without an agent: `--snapshot-on-ready` gives up after `--agent-timeout`, and a
/// guest that stops first is reported as soon as it stops (well before its 10 s); exit 1 and
/// no snapshot either way.
#[test]
fn snapshot_on_ready_without_an_agent_exits_1() {
    if !Path::new("/dev/kvm").exists() {
        kestrel_tests::skip_without("/dev/kvm");
        return;
    }
    let dir = scratch("noagent");
    // mov al, 0xfe; out 0x64, al; jmp $ (resets through the i8042 at once)
    let reset = dir.join("reset.elf");
    std::fs::write(
        &reset,
        kestrel_tests::tiny_elf(&[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]),
    )
    .unwrap();
    for (kernel, timeout, needle) in [
        (
            spin_kernel(),
            "1",
            "the guest agent did not answer within 1 s",
        ),
        (reset, "10", "the guest stopped before its agent answered"),
    ] {
        let uds = dir.join("v.sock");
        let _ = std::fs::remove_file(&uds);
        let vsock = format!(
            r#", "vsock": {{"guest_cid": 3, "uds_path": "{}"}}"#,
            uds.display()
        );
        let cfg = write_config("noagent", &config_json(&kernel, &vsock));
        let snap = dir.join("snap");
        let _ = std::fs::remove_dir_all(&snap);
        let t0 = Instant::now();
        let out = kestrel(
            &[
                "--config-file".as_ref(),
                cfg.as_os_str(),
                "--snapshot-on-ready".as_ref(),
                snap.as_os_str(),
                "--agent-timeout".as_ref(),
                timeout.as_ref(),
            ],
            &[],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
        assert!(!snap.join("state").exists());
        assert!(t0.elapsed() < Duration::from_secs(15));
    }
}

/// `kestrel restore`: a missing snapshot, an overrides file that does not parse and a
/// configuration flag exit 2 naming the problem; a state file that is not one exits 1.
#[test]
fn restore_refuses_bad_input() {
    let dir = scratch("restore");
    let snap = dir.join("snap");
    let _ = std::fs::remove_dir_all(&snap);
    let run = |extra: &[&std::ffi::OsStr]| {
        let mut args = vec!["restore".as_ref(), "--snapshot".as_ref(), snap.as_os_str()];
        args.extend_from_slice(extra);
        let out = kestrel(&args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stderr)
    };
    let (code, stderr) = run(&[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no snapshot there"), "{stderr}");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(snap.join("state"), b"not a state file").unwrap();
    std::fs::write(snap.join("memory"), vec![0u8; 4096]).unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"{"drives": [{"drive_id": "a", "path": "/x"}]}"#).unwrap();
    let (code, stderr) = run(&["--overrides".as_ref(), bad.as_os_str()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--overrides"), "{stderr}");
    assert!(stderr.contains("unknown field `path`"), "{stderr}");
    let (code, stderr) = run(&["--overrides".as_ref(), dir.join("none.json").as_os_str()]);
    assert_eq!(code, Some(2), "{stderr}");
    let cfg = write_config("restore", &config_json(&spin_kernel(), ""));
    let (code, stderr) = run(&["--config".as_ref(), cfg.as_os_str()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("takes the configuration from the snapshot"),
        "{stderr}"
    );
    let good = dir.join("good.json");
    std::fs::write(&good, r#"{"name": "clone-1"}"#).unwrap();
    let (code, stderr) = run(&["--overrides".as_ref(), good.as_os_str()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("restoring"), "{stderr}");
}
