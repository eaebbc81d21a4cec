//! virtio-fs in the real guest: an in-process share (fuse-backend-rs), a read-only share and a
//! vhost-user share served by a real virtiofsd. One boot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kestrel_api::{FsCache, FsConfig, SerialOutput, VmConfig};
use kestrel_tests::*;

use super::{agent_vsock, create_captured, hex, sandbox, sh_merged};
use kestrel_vmm::agent::AgentClient;
use kestrel_vmm::VmExit;
use sha2::{Digest, Sha256};

fn virtiofsd() -> PathBuf {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/install-virtiofsd.sh"))
        .output()
        .expect("run scripts/install-virtiofsd.sh");
    assert!(
        out.status.success(),
        "virtiofsd install failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn share(tag: &str, dir: &Path) -> FsConfig {
    FsConfig {
        tag: tag.into(),
        shared_dir: Some(dir.to_path_buf()),
        socket: None,
        read_only: false,
        cache: FsCache::None,
        xattr: false,
        num_queues: 1,
        queue_size: 256,
        worker_threads: false,
        max_open_handles: kestrel_api::DEFAULT_FS_MAX_OPEN_HANDLES,
        allow_setid: false,
        allow_devices: false,
    }
}

/// Create, rename, truncate and delete through the guest; the host sees each change.
fn mutations(a: &mut AgentClient, mnt: &str, host: &Path) {
    let (code, out) = sh_merged(a, &format!("echo created-in-guest > {mnt}/new.txt"));
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        std::fs::read_to_string(host.join("new.txt")).unwrap(),
        "created-in-guest\n"
    );
    let (code, out) = sh_merged(a, &format!("mv {mnt}/new.txt {mnt}/renamed.txt"));
    assert_eq!(code, 0, "{out}");
    assert!(!host.join("new.txt").exists());
    assert!(host.join("renamed.txt").exists());
    let (code, out) = sh_merged(a, &format!("truncate -s 7 {mnt}/renamed.txt"));
    assert_eq!(code, 0, "{out}");
    assert_eq!(std::fs::read(host.join("renamed.txt")).unwrap(), b"created");
    let (code, out) = sh_merged(a, &format!("rm {mnt}/renamed.txt"));
    assert_eq!(code, 0, "{out}");
    assert!(!host.join("renamed.txt").exists());
    // And a host-side change is visible in the guest (no caching).
    std::fs::write(host.join("from-host.txt"), b"written on the host").unwrap();
    let (code, out) = sh_merged(a, &format!("cat {mnt}/from-host.txt"));
    assert_eq!((code, out.as_str()), (0, "written on the host"));
    std::fs::write(host.join("from-host.txt"), b"changed on the host").unwrap();
    let (code, out) = sh_merged(a, &format!("cat {mnt}/from-host.txt"));
    assert_eq!((code, out.as_str()), (0, "changed on the host"));
}

#[test]
fn virtio_fs_in_process_read_only_and_vhost_user() {
    let g = guest_artifacts();
    let dir = scratch_dir().join("fs");
    let _ = std::fs::remove_dir_all(&dir);
    let (rw, ro, vhu) = (dir.join("rw"), dir.join("ro"), dir.join("vhu"));
    for d in [&rw, &ro, &vhu] {
        std::fs::create_dir_all(d).unwrap();
    }
    // 500 files in a small tree, with known checksums.
    let mut want = BTreeMap::new();
    let mut rng = XorShift::new(77);
    for i in 0..500 {
        let sub = format!("tree/d{}", i % 10);
        std::fs::create_dir_all(rw.join(&sub)).unwrap();
        let mut data = vec![0u8; 512 + (i * 37) % 4096];
        rng.fill(&mut data);
        let rel = format!("{sub}/f{i}");
        std::fs::write(rw.join(&rel), &data).unwrap();
        want.insert(format!("./{rel}"), hex(&Sha256::digest(&data)));
    }
    // A symlink pointing outside the share.
    std::os::unix::fs::symlink("/etc/hostname", rw.join("evil")).unwrap();
    std::fs::write(dir.join("secret"), b"host secret").unwrap();
    std::os::unix::fs::symlink(dir.join("secret"), rw.join("evil2")).unwrap();
    std::fs::write(ro.join("readme"), b"read only").unwrap();

    let sock = dir.join("vfsd.sock");
    let bin = virtiofsd();
    let _daemon = Daemon(
        Command::new(&bin)
            .arg(format!("--socket-path={}", sock.display()))
            .arg(format!("--shared-dir={}", vhu.display()))
            .arg("--sandbox=chroot")
            .arg("--cache=never")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn virtiofsd"),
    );
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "virtiofsd socket");
        std::thread::sleep(Duration::from_millis(50));
    }

    let uds = dir.join("v.sock");
    let mut c = VmConfig::new(g.vmlinux, 1, 256);
    c.boot_source.initrd_path = Some(g.initramfs);
    c.serial.output = SerialOutput::None;
    c.kestrel.name = Some("fs".into());
    let mut ro_share = share("roshare", &ro);
    ro_share.read_only = true;
    let vhu_share = FsConfig {
        tag: "vhushare".into(),
        shared_dir: None,
        socket: Some(sock.clone()),
        cache: FsCache::Auto,
        ..share("x", &vhu)
    };
    c.fs = vec![share("share", &rw), ro_share, vhu_share];
    c.vsock = agent_vsock(&uds);
    let (vm, cap) = create_captured(&c);
    assert!(vm.guest_memory_is_shared(), "vhost-user needs memfd memory");
    let sb = sandbox(&c, vm, &cap);
    let mut a = sb.agent();
    a.set_call_timeout(Some(Duration::from_secs(900)));
    for (tag, mnt) in [
        ("share", "/mnt/s"),
        ("roshare", "/mnt/ro"),
        ("vhushare", "/mnt/v"),
    ] {
        a.mount(tag, mnt, "virtiofs", None, &[])
            .unwrap_or_else(|e| panic!("mount {tag}: {e}\nconsole:\n{}", cap.text()));
    }

    // 500 files read and checked in the guest (the agent hashes each file it reads through
    // the share; no process per file).
    let t = Instant::now();
    let (code, out) = sh_merged(&mut a, "cd /mnt/s && find ./tree -type f");
    assert_eq!(code, 0, "{out}");
    let listed: std::collections::BTreeSet<&str> = out.lines().collect();
    let expected: std::collections::BTreeSet<&str> = want.keys().map(String::as_str).collect();
    assert_eq!(listed, expected, "guest listing of the share");
    for (path, sum) in &want {
        let d = a
            .sha256_file(&format!("/mnt/s/{}", path.trim_start_matches("./")))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(&d.sha256, sum, "{path}");
    }
    eprintln!("guest checksummed 500 files in {:?}", t.elapsed());

    mutations(&mut a, "/mnt/s", &rw);

    // Read-only share: reads work, writes fail with EROFS.
    let (code, out) = sh_merged(&mut a, "cat /mnt/ro/readme");
    assert_eq!((code, out.as_str()), (0, "read only"));
    let (code, out) = sh_merged(&mut a, "echo x > /mnt/ro/new");
    assert_ne!(code, 0);
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(!ro.join("new").exists());

    // Symlinks pointing outside the share do not expose host files.
    let host_hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let (_, out) = sh_merged(&mut a, "cat /mnt/s/evil /mnt/s/evil2");
    assert!(!out.contains("host secret"), "{out}");
    assert!(
        host_hostname.is_empty() || !out.contains(host_hostname.trim()) || {
            // The guest resolves the link in its own namespace: equal content can only come
            // from the guest's own /etc/hostname.
            let (_, g) = sh_merged(&mut a, "cat /etc/hostname");
            out.contains(g.trim()) && !g.trim().is_empty()
        }
    );

    // The same read/write checks through vhost-user and virtiofsd.
    std::fs::write(vhu.join("hello"), b"served by virtiofsd").unwrap();
    let (code, out) = sh_merged(&mut a, "cat /mnt/v/hello");
    assert_eq!((code, out.as_str()), (0, "served by virtiofsd"));
    mutations(&mut a, "/mnt/v", &vhu);

    let m = sb.vm().fs_metrics("share").unwrap();
    eprintln!("in-process share metrics: {m:?}");
    assert!(m.requests > 500, "{m:?}");
    drop(a);
    assert_eq!(sb.shutdown(Duration::from_secs(120)), Some(VmExit::Reset));
}
