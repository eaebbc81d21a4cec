//! virtio-fs in the real guest: an in-process share (fuse-backend-rs) served on a worker
//! thread under the library's default seccomp filters, a read-only share served on the event
//! loop and a vhost-user share served by a real virtiofsd. One boot.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kestrel_api::{FsCache, FsConfig, SeccompMode};
use kestrel_sandbox::agent::AgentClient;
use kestrel_sandbox::Sandbox;
use kestrel_tests::guest::{agent_guest, sha256_hex, spawn_virtiofsd};
use kestrel_tests::*;
use kestrel_vmm::{ThreadKind, Vm};

use super::{check_clean_shutdown, create_captured, sandbox, sh, sh_merged, sh_ok};

/// The share directories on the host and what the guest must find in them.
struct Shares {
    /// The in-process share `share` (on a worker thread, xattrs on), mounted at `/mnt/s`.
    rw: PathBuf,
    /// The read-only in-process share `roshare`, mounted at `/mnt/ro`.
    ro: PathBuf,
    /// The directory virtiofsd serves as `vhushare`, mounted at `/mnt/v`.
    vhu: PathBuf,
    /// `./tree/...` path -> SHA-256 of the 500 files in `rw`.
    tree: BTreeMap<String, String>,
}

impl Shares {
    /// Fresh share directories in `dir`: 500 files in a small tree with known checksums and
    /// two symlinks pointing outside in `rw`, a `readme` in `ro`, nothing yet in `vhu`.
    fn create(dir: &Path) -> Shares {
        let (rw, ro, vhu) = (dir.join("rw"), dir.join("ro"), dir.join("vhu"));
        for d in [&rw, &ro, &vhu] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).unwrap();
        }
        let mut tree = BTreeMap::new();
        let mut rng = XorShift::new(77);
        for i in 0..500 {
            let sub = format!("tree/d{}", i % 10);
            std::fs::create_dir_all(rw.join(&sub)).unwrap();
            let mut data = vec![0u8; 512 + (i * 37) % 4096];
            rng.fill(&mut data);
            let rel = format!("{sub}/f{i}");
            std::fs::write(rw.join(&rel), &data).unwrap();
            tree.insert(format!("./{rel}"), sha256_hex(&data));
        }
        // Symlinks pointing outside the share.
        std::os::unix::fs::symlink("/etc/hostname", rw.join("evil")).unwrap();
        std::fs::write(dir.join("secret"), b"host secret").unwrap();
        std::os::unix::fs::symlink(dir.join("secret"), rw.join("evil2")).unwrap();
        std::fs::write(ro.join("readme"), b"read only").unwrap();
        Shares { rw, ro, vhu, tree }
    }

    /// The shares: the one the guest uses most is served on a worker thread (the
    /// high-priority queue stays on the event loop) with xattrs on; the read-only one on
    /// the loop; the third by virtiofsd on `sock`.
    fn configs(&self, sock: &Path) -> Vec<FsConfig> {
        let plain = |tag: &str, dir: &Path| FsConfig {
            cache: FsCache::None,
            ..FsConfig::shared_dir(tag, dir)
        };
        let mut rw = plain("share", &self.rw);
        rw.worker_threads = true;
        rw.xattr = true;
        let mut ro = plain("roshare", &self.ro);
        ro.read_only = true;
        vec![rw, ro, FsConfig::vhost_user("vhushare", sock)]
    }
}

#[test]
fn virtio_fs_in_process_read_only_and_vhost_user() {
    let mut guest = agent_guest("fs", 1, 256);
    let shares = Shares::create(&guest.dir);
    let sock = guest.dir.join("vfsd.sock");
    let bin = kestrel_tests::soak::virtiofsd();
    let timeout = Duration::from_secs(20);
    let _daemon = spawn_virtiofsd(&bin, &sock, &shares.vhu, "never", timeout);
    guest.config.fs = shares.configs(&sock);
    // The library's default seccomp mode (`kestrel.seccomp` absent): errno.
    assert_eq!(guest.config.kestrel.seccomp, None);
    let (vm, cap) = create_captured(&guest.config);
    assert_eq!(vm.seccomp_mode(), SeccompMode::Errno);
    assert!(vm.guest_memory_is_shared(), "vhost-user needs memfd memory");
    let sb = sandbox(&guest.config, vm, &cap);
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

    check_tree_read_in_guest(&mut a, &shares.tree);
    check_mutations_seen_on_host(&mut a, "/mnt/s", &shares.rw);
    check_large_read_host_to_guest(&mut a, "/mnt/s", &shares.rw);
    check_guest_file_ops_seen_on_host(&mut a, "/mnt/s", &shares.rw);
    check_exec_and_xattrs_from_share(&mut a, "/mnt/s", &shares.rw);
    check_read_only_share(&mut a, &shares.ro);
    check_symlinks_stay_inside_the_share(&mut a);
    check_vhost_user_share(&mut a, &shares.vhu);
    check_worker_served_the_share(&sb, &mut a);
    drop(a);
    check_clean_shutdown(&sb);
    assert!(sb.vm().threads().is_empty(), "the worker ended with the VM");
}

/// The guest lists exactly the 500 files of the tree and reads each intact (the agent hashes
/// each file it reads through the share; no process per file).
fn check_tree_read_in_guest(a: &mut AgentClient, want: &BTreeMap<String, String>) {
    let t = Instant::now();
    let out = sh_ok(a, "cd /mnt/s && find ./tree -type f");
    let listed: BTreeSet<&str> = out.lines().collect();
    let expected: BTreeSet<&str> = want.keys().map(String::as_str).collect();
    assert_eq!(listed, expected, "guest listing of the share");
    for (path, sum) in want {
        let d = a
            .sha256_file(&format!("/mnt/s/{}", path.trim_start_matches("./")))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(&d.sha256, sum, "{path}");
    }
    eprintln!("guest checksummed 500 files in {:?}", t.elapsed());
}

/// Create, rename, truncate and delete through the guest: the host sees each change; and a
/// host-side change is visible in the guest at once (no caching).
fn check_mutations_seen_on_host(a: &mut AgentClient, mnt: &str, host: &Path) {
    sh_ok(a, &format!("echo created-in-guest > {mnt}/new.txt"));
    assert_eq!(
        std::fs::read_to_string(host.join("new.txt")).unwrap(),
        "created-in-guest\n"
    );
    sh_ok(a, &format!("mv {mnt}/new.txt {mnt}/renamed.txt"));
    assert!(!host.join("new.txt").exists());
    assert!(host.join("renamed.txt").exists());
    sh_ok(a, &format!("truncate -s 7 {mnt}/renamed.txt"));
    assert_eq!(std::fs::read(host.join("renamed.txt")).unwrap(), b"created");
    sh_ok(a, &format!("rm {mnt}/renamed.txt"));
    assert!(!host.join("renamed.txt").exists());
    for text in ["written on the host", "changed on the host"] {
        std::fs::write(host.join("from-host.txt"), text).unwrap();
        let (code, out) = sh_merged(a, &format!("cat {mnt}/from-host.txt"));
        assert_eq!((code, out.as_str()), (0, text));
    }
}

/// The fs worker threads of `vm` listed for share `fs<share>`.
fn fs_workers(vm: &Vm, share: u32) -> Vec<kestrel_vmm::ThreadInfo> {
    vm.threads()
        .into_iter()
        .filter(|t| matches!(t.kind, ThreadKind::FsWorker { share: s, .. } if s == share))
        .collect()
}

/// Machine code of a static x86_64 Linux program without libc (the guest's busybox has no
/// xattr applets): `xattr-probe FILE` sets `user.kestrel` = `worker-xattr` on FILE, reads it
/// back, lists FILE's names and removes it (setxattr, getxattr, listxattr, removexattr),
/// writing `S`, `G<value>`, `L<names, NUL-separated>`, `R` to stdout; a failing call ends it
/// with the errno as exit status. Assembled (GNU as, Intel syntax) from:
///
/// ```text
/// _start: mov r12, [rsp+16]          # argv[1]
///         lea r13, [rip+buf]         # 4 KiB of zeroes after the code (p_memsz)
///         mov r14b, 'S'; call mark
///         mov rdi, r12; lea rsi, [rip+name]; lea rdx, [rip+value]; mov r10d, 12
///         xor r8d, r8d; mov eax, 188; syscall       # setxattr
///         test rax, rax; js fail
///         mov r14b, 'G'; call mark
///         mov rdi, r12; lea rsi, [rip+name]; mov rdx, r13; mov r10d, 256
///         mov eax, 191; syscall                     # getxattr
///         test rax, rax; js fail; mov rdx, rax; call out
///         mov r14b, 'L'; call mark
///         mov rdi, r12; mov rsi, r13; mov edx, 256; mov eax, 194; syscall   # listxattr
///         test rax, rax; js fail; mov rdx, rax; call out
///         mov r14b, 'R'; call mark
///         mov rdi, r12; lea rsi, [rip+name]; mov eax, 197; syscall          # removexattr
///         test rax, rax; js fail
///         xor edi, edi; jmp exit
/// fail:   neg rax; mov edi, eax
/// exit:   mov eax, 231; syscall                     # exit_group
/// mark:   mov [r13+4095], r14b; lea rsi, [r13+4095]; mov edx, 1; jmp write1
/// out:    mov rsi, r13
/// write1: mov edi, 1; mov eax, 1; syscall; ret      # write(1, rsi, rdx)
/// name:   .asciz "user.kestrel"
/// value:  .ascii "worker-xattr"
/// buf:
/// ```
const XATTR_PROBE_CODE: [u8; 252] = [
    0x4c, 0x8b, 0x64, 0x24, 0x10, 0x4c, 0x8d, 0x2d, 0xf0, 0x00, 0x00, 0x00, 0x41, 0xb6, 0x53, 0xe8,
    0xaa, 0x00, 0x00, 0x00, 0x4c, 0x89, 0xe7, 0x48, 0x8d, 0x35, 0xc5, 0x00, 0x00, 0x00, 0x48, 0x8d,
    0x15, 0xcb, 0x00, 0x00, 0x00, 0x41, 0xba, 0x0c, 0x00, 0x00, 0x00, 0x45, 0x31, 0xc0, 0xb8, 0xbc,
    0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x85, 0xc0, 0x78, 0x78, 0x41, 0xb6, 0x47, 0xe8, 0x7c, 0x00,
    0x00, 0x00, 0x4c, 0x89, 0xe7, 0x48, 0x8d, 0x35, 0x97, 0x00, 0x00, 0x00, 0x4c, 0x89, 0xea, 0x41,
    0xba, 0x00, 0x01, 0x00, 0x00, 0xb8, 0xbf, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x85, 0xc0, 0x78,
    0x51, 0x48, 0x89, 0xc2, 0xe8, 0x6a, 0x00, 0x00, 0x00, 0x41, 0xb6, 0x4c, 0xe8, 0x4d, 0x00, 0x00,
    0x00, 0x4c, 0x89, 0xe7, 0x4c, 0x89, 0xee, 0xba, 0x00, 0x01, 0x00, 0x00, 0xb8, 0xc2, 0x00, 0x00,
    0x00, 0x0f, 0x05, 0x48, 0x85, 0xc0, 0x78, 0x2a, 0x48, 0x89, 0xc2, 0xe8, 0x43, 0x00, 0x00, 0x00,
    0x41, 0xb6, 0x52, 0xe8, 0x26, 0x00, 0x00, 0x00, 0x4c, 0x89, 0xe7, 0x48, 0x8d, 0x35, 0x41, 0x00,
    0x00, 0x00, 0xb8, 0xc5, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x85, 0xc0, 0x78, 0x04, 0x31, 0xff,
    0xeb, 0x05, 0x48, 0xf7, 0xd8, 0x89, 0xc7, 0xb8, 0xe7, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x45, 0x88,
    0xb5, 0xff, 0x0f, 0x00, 0x00, 0x49, 0x8d, 0xb5, 0xff, 0x0f, 0x00, 0x00, 0xba, 0x01, 0x00, 0x00,
    0x00, 0xeb, 0x03, 0x4c, 0x89, 0xee, 0xbf, 0x01, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x00, 0x00,
    0x0f, 0x05, 0xc3, 0x75, 0x73, 0x65, 0x72, 0x2e, 0x6b, 0x65, 0x73, 0x74, 0x72, 0x65, 0x6c, 0x00,
    0x77, 0x6f, 0x72, 0x6b, 0x65, 0x72, 0x2d, 0x78, 0x61, 0x74, 0x74, 0x72,
];

/// [`XATTR_PROBE_CODE`] as an ELF executable: one RWX `PT_LOAD` of the whole file at
/// 0x40_0000 (offset and address agree modulo the page size, as Linux wants) with 4 KiB of
/// zeroes beyond it, entry right after the headers.
fn xattr_probe_elf() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    let file_len = HEADERS + XATTR_PROBE_CODE.len() as u64;
    let mut e = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(BASE + HEADERS).to_le_bytes()); // e_entry
    e.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&7u32.to_le_bytes()); // RWX
    for v in [0, BASE, BASE, file_len, file_len + 0x1000, 0x1000] {
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        e.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(e.len() as u64, HEADERS);
    e.extend_from_slice(&XATTR_PROBE_CODE);
    e
}

/// 1.5 MiB written on the host reads intact in the guest (READs of up to 1 MiB each).
fn check_large_read_host_to_guest(a: &mut AgentClient, mnt: &str, host: &Path) {
    let mut big = vec![0u8; 3 << 19];
    XorShift::new(5).fill(&mut big);
    std::fs::write(host.join("host.bin"), &big).unwrap();
    let d = a.sha256_file(&format!("{mnt}/host.bin")).unwrap();
    assert_eq!(d.sha256, sha256_hex(&big), "host.bin read in the guest");
}

/// What the share serves beyond lookups and reads, done by the guest in one exec and seen on
/// the host: a 1.5 MiB write (checksummed), fsync/fdatasync, fallocate, links, chmod, utimes,
/// a FIFO, a directory tree renamed in and removed again, statfs.
fn check_guest_file_ops_seen_on_host(a: &mut AgentClient, mnt: &str, host: &Path) {
    let script = format!(
        "set -e; mkdir {mnt}/w; cd {mnt}/w
         dd if=/dev/urandom of=/tmp/g.bin bs=512k count=3 2>/dev/null
         cp /tmp/g.bin guest.bin; sync guest.bin; sync -d guest.bin
         fallocate -l 65536 falloc.bin
         ln -s guest.bin sym; ln guest.bin hard; chmod 600 hard
         touch -d '2001-02-03 04:05:06' guest.bin
         mkfifo fifo
         mkdir -p d/e; echo deep > d/e/f; mv d/e/f d/e/g; cat d/e/g
         readlink sym; stat -c '%s %h %a %Y' guest.bin; ls | tr '\\n' ' '; echo
         df -k {mnt} | tail -n 1 | wc -w
         sha256sum /tmp/g.bin | cut -d ' ' -f 1"
    );
    let out = sh_ok(a, &script);
    let w = host.join("w");
    let guest_bin = std::fs::read(w.join("guest.bin")).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        vec![
            "deep",
            "guest.bin",
            "1572864 2 600 981173106",
            "d falloc.bin fifo guest.bin hard sym ",
            "6",
            sha256_hex(&guest_bin).as_str(),
        ],
        "guest view; the last line is the guest's checksum of what it wrote"
    );
    let m = std::fs::metadata(w.join("guest.bin")).unwrap();
    assert_eq!(
        (m.len(), m.nlink(), m.mode() & 0o777, m.mtime()),
        (3 << 19, 2, 0o600, 981173106)
    );
    let falloc = std::fs::metadata(w.join("falloc.bin")).unwrap();
    assert_eq!(falloc.len(), 65536);
    let sym = std::fs::read_link(w.join("sym")).unwrap();
    assert_eq!(sym, Path::new("guest.bin"));
    let fifo = std::fs::symlink_metadata(w.join("fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(std::fs::read(w.join("d/e/g")).unwrap(), b"deep\n");
    sh_ok(a, &format!("rm -r {mnt}/w"));
    assert!(!w.exists(), "the guest removed the tree");
}

/// The host file system allowing user xattrs: exec from the share works (the kernel reads
/// `security.capability`) and the guest sets, gets, lists and removes an xattr, seen on the
/// host.
fn check_exec_and_xattrs_from_share(a: &mut AgentClient, mnt: &str, host: &Path) {
    let target = host.join("xattr-target");
    std::fs::write(&target, b"x").unwrap();
    match host_setxattr(&target, "user.from-host", b"h") {
        Err(libc::ENOTSUP) => {
            kestrel_tests::skip_without("user xattrs on the host file system");
            return;
        }
        r => r.unwrap(),
    }
    let probe = format!("{mnt}/xattr-probe");
    a.write_file(&probe, &xattr_probe_elf(), Some(0o755))
        .unwrap();
    let (code, out, err) = sh(a, &format!("{probe} {mnt}/xattr-target"));
    // Exit status 0, or the errno of the failing call (after its letter).
    assert_eq!(code, 0, "xattr probe: {out:?} {err}");
    assert!(
        out.starts_with("SGworker-xattrL") && out.ends_with('R'),
        "{out:?} {err}"
    );
    let mut names: Vec<&str> = out["SGworker-xattrL".len()..out.len() - 1]
        .split_terminator('\0')
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["user.from-host", "user.kestrel"], "{out:?}");
    assert_eq!(
        host_getxattr(&target, "user.kestrel"),
        Err(libc::ENODATA),
        "removed"
    );
    assert_eq!(
        host_getxattr(&target, "user.from-host").as_deref(),
        Ok(&b"h"[..])
    );
}

/// The read-only share: reads work, writes fail with EROFS and create nothing on the host.
fn check_read_only_share(a: &mut AgentClient, ro: &Path) {
    let (code, out) = sh_merged(a, "cat /mnt/ro/readme");
    assert_eq!((code, out.as_str()), (0, "read only"));
    let (code, out) = sh_merged(a, "echo x > /mnt/ro/new");
    assert_ne!(code, 0);
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(!ro.join("new").exists());
}

/// Symlinks pointing outside the share do not expose host files: the guest resolves them in
/// its own namespace.
fn check_symlinks_stay_inside_the_share(a: &mut AgentClient) {
    let host_hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let (_, out) = sh_merged(a, "cat /mnt/s/evil /mnt/s/evil2");
    assert!(!out.contains("host secret"), "{out}");
    assert!(
        host_hostname.is_empty() || !out.contains(host_hostname.trim()) || {
            // Equal content can only come from the guest's own /etc/hostname.
            let (_, g) = sh_merged(a, "cat /etc/hostname");
            out.contains(g.trim()) && !g.trim().is_empty()
        }
    );
}

/// The same read and write checks through vhost-user and virtiofsd.
fn check_vhost_user_share(a: &mut AgentClient, vhu: &Path) {
    std::fs::write(vhu.join("hello"), b"served by virtiofsd").unwrap();
    let (code, out) = sh_merged(a, "cat /mnt/v/hello");
    assert_eq!((code, out.as_str()), (0, "served by virtiofsd"));
    check_mutations_seen_on_host(a, "/mnt/v", vhu);
}

/// The worker really served the in-process share: it is listed among the VM's threads, runs
/// under two filters (the event loop's, inherited, and its own), and every request-queue
/// chain went through it (none fell back to the loop), up to the FUSE_DESTROY of the unmount;
/// the read-only share served on the loop; nothing failed or panicked.
fn check_worker_served_the_share(sb: &Sandbox, a: &mut AgentClient) {
    let vm = sb.vm();
    let workers = fs_workers(vm, 0);
    assert_eq!(workers.len(), 1, "{:?}", vm.threads());
    let w = &workers[0];
    assert_eq!(
        (w.kind, w.name.as_str()),
        (
            ThreadKind::FsWorker { share: 0, queue: 1 },
            "kestrel-fs-fs0-q1"
        )
    );
    assert_eq!(task_status(w.tid, "Seccomp"), "2");
    assert_eq!(task_status(w.tid, "Seccomp_filters"), "2");
    let loop_served = fs_workers(vm, 1).is_empty();
    assert!(loop_served, "roshare serves on the event loop");
    // Unmounting sends FUSE_DESTROY, served on the worker (it re-imports the root).
    sh_ok(a, "umount /mnt/s");
    let m = vm.device("fs0").and_then(|d| d.metrics().fs()).unwrap();
    eprintln!("in-process share metrics: {m:?}");
    assert!(m.requests > 500, "{m:?}");
    assert_eq!(m.worker_requests, m.requests, "{m:?}");
    let failures = (m.failed_requests, m.malformed_chains, m.queue_errors);
    assert_eq!((failures, m.panics), ((0, 0, 0), 0), "{m:?}");
    let ro_m = vm.device("fs1").and_then(|d| d.metrics().fs()).unwrap();
    assert!(ro_m.requests > 0 && ro_m.worker_requests == 0, "{ro_m:?}");
    assert_eq!(vm.metrics().device_panics, 0);
    assert_eq!(vm.device("fs0").map(|d| d.needs_reset()), Some(false));
}
