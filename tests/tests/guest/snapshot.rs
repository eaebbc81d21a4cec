//! Pause, snapshot, restore and template clones on the real guest (issue 13). Two cold boots;
//! every other guest here is a restore:
//! - `pause_snapshot_and_restore_in_another_process` boots a guest with a data disk and a TAP
//!   (in a network namespace of its own), pauses it, snapshots it and restores it with the
//!   `kestrel` binary in a child process, with overrides for the vsock socket, the TAP and the
//!   drive file; then has bad snapshots and overrides refused in this process.
//! - [`template`] boots the shared template once (`Template::create`, kept in a `OnceLock`):
//!   `eight_clones_of_one_template` and `hotplug_state_survives_restore` clone it (whichever
//!   runs second waits for the first one's boot instead of booting again).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kestrel_agent_proto::AGENT_PORT;
use kestrel_api::{
    DriveConfig, DriveOverride, FsConfig, FsOverride, NetConfig, NetOverride, RestoreOverrides,
};
use kestrel_sandbox::agent::AgentClient;
use kestrel_sandbox::{Pool, Sandbox, Template};
use kestrel_tests::guest::{agent_guest, hex, kestrel_binary, KillOnDrop, MIB, MIB_BYTES};
use kestrel_tests::netns::Netns;
use kestrel_tests::{
    nonzero_file_kib, resident_kib, smaps_kib_in, snapshot_memory_file, vm_thread_cpu_ns, XorShift,
};
use kestrel_vmm::snapshot::FORMAT_VERSION;
use kestrel_vmm::{SnapshotFiles, ThreadKind, VcpuRunState, Vm, VmExit};
use sha2::{Digest, Sha256};

use super::{create_captured, read_trimmed, sandbox, sh_ok, wait_until};

/// How long a boot or a restore may take to reach the agent (the guest kernel is emulated on
/// the CI machines: a cold boot takes minutes there).
const AGENT_TIMEOUT: Duration = Duration::from_secs(600);

/// The guest's address on the TAP network (`ip=` on its command line).
const GUEST_IP: &str = "10.0.2.2";

/// The template every clone here comes from, booted once per test process.
pub(crate) struct Shared {
    template: Arc<Template>,
    /// Scratch directory for the clones' sockets and snapshots.
    dir: PathBuf,
}

static TEMPLATE: OnceLock<Shared> = OnceLock::new();

/// The shared template: the real guest with 1 vCPU and 256 MiB (hotplug up to 2 vCPUs and
/// 1 GiB), booted to its agent, paused and snapshotted by `Template::create` — the one cold
/// boot behind every clone of this file and of the hotplug test.
pub(crate) fn template() -> &'static Shared {
    TEMPLATE.get_or_init(|| {
        let mut g = agent_guest("snap-tpl", 1, 256);
        g.config.machine_config.max_vcpus = Some(2);
        g.config.machine_config.max_mem_size_mib = Some(1024);
        let tdir = g.dir.join("template");
        let _ = fs::remove_dir_all(&tdir);
        let t0 = Instant::now();
        let template = Template::create(&g.config, &tdir, AGENT_TIMEOUT)
            .unwrap_or_else(|e| panic!("Template::create: {e}"));
        eprintln!(
            "template: cold boot to the agent, pause and snapshot in {:?}",
            t0.elapsed()
        );
        Shared {
            template: Arc::new(template),
            dir: g.dir,
        }
    })
}

/// Overrides that make a clone `name` of its own: its name and vsock socket (`<dir>/<name>.sock`,
/// a stale one removed).
fn clone_overrides(dir: &Path, name: &str) -> RestoreOverrides {
    let sock = dir.join(format!("{name}.sock"));
    let _ = fs::remove_file(&sock);
    RestoreOverrides {
        name: Some(name.into()),
        vsock_uds_path: Some(sock),
        ..RestoreOverrides::default()
    }
}

/// A clone `name` of the shared template, handed out (agent up, RNG reseeded, clock set).
pub(crate) fn clone_of(shared: &Shared, name: &str) -> Sandbox {
    let o = clone_overrides(&shared.dir, name);
    shared
        .template
        .clone_sandbox(&o, AGENT_TIMEOUT)
        .unwrap_or_else(|e| panic!("clone {name}: {e}"))
}

/// An error with its sources, `: `-joined (a wrapped error's text is not repeated).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Host CLOCK_REALTIME in seconds.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the host clock is after 1970")
        .as_secs_f64()
}

/// SHA-256 (hex) of `len` bytes at `offset` of the host file `path`.
fn sha_file_range(path: &Path, offset: u64, len: u64) -> String {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f.take(len), &mut h).unwrap();
    assert_eq!(n, len, "{path:?} is shorter than {offset} + {len} bytes");
    hex(&h.finalize())
}

/// The first word of `s` (a `sha256sum` line's digest).
fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or_default().to_string()
}

/// SHA-256 of MiB number `mib` of the guest's `/dev/vda`, read with O_DIRECT (from the device,
/// past the guest's page cache).
fn guest_disk_sha(a: &mut AgentClient, mib: u64) -> String {
    first_word(&sh_ok(
        a,
        &format!("dd if=/dev/vda bs=1M count=1 skip={mib} iflag=direct 2>/dev/null | sha256sum"),
    ))
}

// ------------------------------------------------------------------------------------------
// Cold boot, pause, snapshot; restore in another process; bad input.
// ------------------------------------------------------------------------------------------

#[test]
fn pause_snapshot_and_restore_in_another_process() {
    let pid = std::process::id();
    let mut guest = agent_guest("snap-xp", 1, 256);
    let ns = Netns::new(&format!("ktsn{pid}"));
    // The booted VM's TAP and the one its restored copy gets: made beforehand (the config
    // does not create TAPs, so an override naming a missing one is an error).
    let (src_tap, dst_tap) = (format!("ks{pid}a"), format!("ks{pid}b"));
    for tap in [&src_tap, &dst_tap] {
        ns.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
    }
    ns.ip(&["link", "set", &src_tap, "up"]);
    ns.enter();
    guest.config.boot_source.boot_args = Some(format!(
        "console=ttyS0 reboot=k panic=1 ip={GUEST_IP}::10.0.2.1:255.255.255.0::eth0:off"
    ));
    guest.config.network_interfaces = vec![NetConfig {
        iface_id: "eth0".into(),
        host_dev_name: Some(src_tap.clone()),
        guest_mac: Some("06:00:0a:00:02:02".into()),
        ..NetConfig::default()
    }];
    let disk = guest.dir.join("data.img");
    File::create(&disk).unwrap().set_len(8 * MIB).unwrap();
    guest.config.drives = vec![DriveConfig {
        drive_id: "data".into(),
        path_on_host: Some(disk.clone()),
        ..DriveConfig::default()
    }];
    // A virtio-fs share the guest does not mount before the snapshot: the restored VM serves
    // the override's directory instead.
    for (sub, who) in [("share-a", "template"), ("share-b", "clone")] {
        let d = guest.dir.join(sub);
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("who"), who).unwrap();
    }
    guest.config.fs = vec![FsConfig::shared_dir("share", guest.dir.join("share-a"))];
    let (vm, cap) = create_captured(&guest.config);
    let sb = sandbox(&guest.config, vm, &cap);

    check_pause_stops_the_guest(&sb);
    let data_sha = write_disk_before_snapshot(&mut sb.agent());
    let snap = guest.dir.join("snapshot");
    check_snapshot_of_a_paused_guest(sb, &snap);
    // The restored VM must not need the booted one's TAP.
    ns.ip(&["link", "del", &src_tap]);
    let restored = RestoredElsewhere::start(&ns, &dst_tap, &snap, &guest.dir);
    let mut a = restored.agent;
    check_disk_data_written_before_the_snapshot_reads_back(&mut a, &restored.disk, &data_sha);
    check_block_io_after_restore(&mut a, &restored.disk);
    check_tap_override_pings(&ns);
    check_unmounted_share_serves_the_override(&mut a);
    drop(a);
    drop(restored.child);
    check_bad_snapshots_are_refused(&snap, &guest.dir, &disk);
    let _ = fs::remove_dir_all(&snap);
}

/// The counter the guest shell of [`check_pause_stops_the_guest`] writes (`/tmp/cnt`); a read
/// that catches the file being rewritten is retried.
fn read_counter(a: &mut AgentClient) -> u64 {
    for _ in 0..100 {
        if let Ok(n) = read_trimmed(a, "/tmp/cnt").parse() {
            return n;
        }
    }
    panic!("/tmp/cnt never held a number");
}

/// Pause stops the guest: a counter a guest shell bumps in a loop (started through the agent,
/// detached) advances over a 3 s pause less than half as much as over the 3 s of running that
/// follow (its rate depends on the load of the machine, so the two windows are compared, not a
/// rate), and the vCPU threads use no CPU time while paused; pause and resume are idempotent,
/// `is_paused` tells which.
fn check_pause_stops_the_guest(sb: &Sandbox) {
    let vm = sb.vm();
    let mut a = sb.agent();
    sh_ok(
        &mut a,
        "(i=0; while :; do i=$((i+1)); echo $i > /tmp/cnt; done) </dev/null >/dev/null 2>&1 & \
         echo $! > /tmp/cnt.pid",
    );
    let c0 = read_counter(&mut a);
    assert!(
        wait_until(Duration::from_secs(60), || read_counter(&mut a) > c0 + 2),
        "the guest counter does not run"
    );
    let (cpu_a, t0) = (vm_thread_cpu_ns(vm, true), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let cpu_running = vm_thread_cpu_ns(vm, true).saturating_sub(cpu_a);
    let running_for = t0.elapsed();

    let before = read_counter(&mut a);
    assert!(!vm.is_paused());
    let t_pause = Instant::now();
    vm.pause().expect("pause");
    let pause_latency = t_pause.elapsed();
    assert!(vm.is_paused(), "is_paused after pause");
    vm.pause().expect("a second pause is a no-op");
    assert!(vm.is_paused());
    let cpu0 = vm_thread_cpu_ns(vm, true);
    std::thread::sleep(Duration::from_secs(3));
    let cpu_paused = vm_thread_cpu_ns(vm, true).saturating_sub(cpu0);
    let t_resume = Instant::now();
    vm.resume().expect("resume");
    let resume_latency = t_resume.elapsed();
    assert!(!vm.is_paused(), "is_paused after resume");
    vm.resume().expect("a second resume is a no-op");
    assert!(!vm.is_paused());
    let after_pause = read_counter(&mut a);
    std::thread::sleep(Duration::from_secs(3));
    let after_run = read_counter(&mut a);
    let (paused_counts, running_counts) = (
        after_pause.saturating_sub(before),
        after_run.saturating_sub(after_pause),
    );
    eprintln!(
        "pause: counter +{paused_counts} over the 3 s pause, +{running_counts} over the 3 s \
         after; vCPU CPU time {} us while paused, {} us in {running_for:?} running; pause \
         {pause_latency:?}, resume {resume_latency:?}",
        cpu_paused / 1000,
        cpu_running / 1000,
    );
    assert!(
        cpu_paused < 20_000_000,
        "vCPU threads used {} us of CPU while paused",
        cpu_paused / 1000
    );
    assert!(running_counts > 0, "the counter stands still after resume");
    assert!(
        paused_counts * 2 < running_counts,
        "the counter advanced {paused_counts} over the pause, {running_counts} running: the \
         guest ran while paused"
    );
    sh_ok(&mut a, "kill $(cat /tmp/cnt.pid)");
}

/// Write 1 MiB of pseudo-random data to the start of the data disk (`/dev/vda`, O_DIRECT) and
/// sync, through the agent. Returns its SHA-256.
fn write_disk_before_snapshot(a: &mut AgentClient) -> String {
    let mut data = vec![0u8; MIB_BYTES];
    XorShift::new(41).fill(&mut data);
    let want = hex(&Sha256::digest(&data));
    let d = a.write_file("/tmp/d0", &data, None).expect("write /tmp/d0");
    assert_eq!(d.sha256, want);
    sh_ok(
        a,
        "dd if=/tmp/d0 of=/dev/vda bs=1M oflag=direct conv=notrunc 2>&1 && sync && rm /tmp/d0",
    );
    assert_eq!(guest_disk_sha(a, 0), want);
    want
}

/// A paused guest is snapshotted (state and memory file; the VM stays paused) and then
/// stopped. Prints the snapshot's time and sizes, and the guest memory the cold-booted VM had
/// resident next to the non-zero pages of its memory file (the cold-boot figure the clones
/// are compared with: a lower bound of it).
fn check_snapshot_of_a_paused_guest(sb: Sandbox, snap: &Path) {
    let vm = sb.vm();
    let cold_rss_kib: u64 = vm
        .guest_memory_host_ranges()
        .iter()
        .map(|&(s, e)| resident_kib(s, e))
        .sum();
    vm.pause().expect("pause");
    let t = Instant::now();
    vm.snapshot(snap).expect("snapshot");
    let took = t.elapsed();
    assert!(vm.is_paused(), "the VM stays paused after a snapshot");
    let files = SnapshotFiles::in_dir(snap);
    let state_len = fs::metadata(&files.state).expect("state file").len();
    let mem_len = fs::metadata(&files.memory).expect("memory file").len();
    assert_eq!(mem_len, 256 * MIB, "the memory file holds the guest RAM");
    let nonzero_kib = nonzero_file_kib(&files.memory);
    eprintln!(
        "snapshot of 1 vCPU / 256 MiB in {took:?}: state {state_len} bytes, memory {mem_len} \
         bytes; the cold-booted VM had {cold_rss_kib} KiB of guest memory resident, its memory \
         file has {nonzero_kib} KiB of non-zero pages"
    );
    assert!(
        nonzero_kib <= cold_rss_kib + 4096,
        "non-zero pages ({nonzero_kib} KiB) are resident pages ({cold_rss_kib} KiB)"
    );
    assert_eq!(vm.stop(), VmExit::Stopped);
}

/// The snapshot restored by the `kestrel` binary in a child process (in the test's network
/// namespace), and the agent connection to it.
struct RestoredElsewhere {
    child: KillOnDrop,
    agent: AgentClient,
    /// The drive file the overrides gave it (a copy of the booted VM's).
    disk: PathBuf,
}

impl RestoredElsewhere {
    /// `kestrel --no-api restore --snapshot <snap> --overrides <file>` with a new name, vsock
    /// socket, TAP (`tap`, given 10.0.2.1/24 on the host side) and drive file (a copy of
    /// `dir/data.img`). Returns once the restored guest's agent answers. Panics with the
    /// child's output if it exits first.
    fn start(ns: &Netns, tap: &str, snap: &Path, dir: &Path) -> RestoredElsewhere {
        let sock = dir.join("restored.sock");
        let _ = fs::remove_file(&sock);
        let disk = dir.join("data-restored.img");
        fs::copy(dir.join("data.img"), &disk).expect("copy the drive file");
        let overrides = RestoreOverrides {
            name: Some("snap-rx".into()),
            vsock_uds_path: Some(sock.clone()),
            network_interfaces: vec![NetOverride {
                iface_id: "eth0".into(),
                host_dev_name: Some(tap.into()),
                guest_mac: None,
            }],
            drives: vec![DriveOverride {
                drive_id: "data".into(),
                path_on_host: disk.clone(),
            }],
            fs: vec![FsOverride {
                tag: "share".into(),
                shared_dir: dir.join("share-b"),
            }],
        };
        let ofile = dir.join("overrides.json");
        fs::write(&ofile, serde_json::to_vec_pretty(&overrides).unwrap()).unwrap();
        ns.ip(&["addr", "add", "10.0.2.1/24", "dev", tap]);
        ns.ip(&["link", "set", tap, "up"]);
        let log = dir.join("restore.log");
        let out = File::create(&log).unwrap();
        let kestrel = kestrel_binary();
        let t = Instant::now();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(kestrel)
            .args(["--no-api", "restore", "--snapshot"])
            .arg(snap)
            .arg("--overrides")
            .arg(&ofile)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn kestrel restore");
        let mut child = KillOnDrop(child);
        let agent = loop {
            if let Ok(Some(status)) = child.0.try_wait() {
                let text = fs::read_to_string(&log).unwrap_or_default();
                panic!("kestrel restore exited ({status}) before the agent answered:\n{text}");
            }
            if t.elapsed() > AGENT_TIMEOUT {
                let text = fs::read_to_string(&log).unwrap_or_default();
                panic!("no agent in the restored guest after {AGENT_TIMEOUT:?}:\n{text}");
            }
            if let Ok(a) = AgentClient::connect(&sock, AGENT_PORT, Duration::from_secs(1)) {
                break a;
            }
        };
        eprintln!(
            "restore in another process: the agent answers {:?} after spawning kestrel",
            t.elapsed()
        );
        RestoredElsewhere { child, agent, disk }
    }
}

/// The share the guest had not mounted at the snapshot restores with the override's
/// directory: mounted now, it shows that directory's file.
fn check_unmounted_share_serves_the_override(a: &mut AgentClient) {
    a.mount("share", "/mnt/s", "virtiofs", None, &[])
        .expect("mount the restored share");
    assert_eq!(read_trimmed(a, "/mnt/s/who"), "clone");
}

/// In the guest restored in another process, the agent answers and the data written to the
/// disk (and synced) before the snapshot reads back from the device with the same SHA-256;
/// the override's drive file holds it too.
fn check_disk_data_written_before_the_snapshot_reads_back(
    a: &mut AgentClient,
    disk: &Path,
    want: &str,
) {
    a.ping().expect("the restored guest's agent answers");
    assert_eq!(guest_disk_sha(a, 0), want, "the disk's data after restore");
    assert_eq!(sha_file_range(disk, 0, MIB), want);
}

/// Block I/O works after restore: 1 MiB the guest writes (O_DIRECT) and syncs reads back from
/// the device and reaches the override's drive file.
fn check_block_io_after_restore(a: &mut AgentClient, disk: &Path) {
    let new = first_word(&sh_ok(
        a,
        "dd if=/dev/urandom of=/tmp/new bs=1M count=1 2>/dev/null && \
         dd if=/tmp/new of=/dev/vda bs=1M seek=1 oflag=direct conv=notrunc 2>/dev/null && \
         sync && sha256sum /tmp/new",
    ));
    assert_eq!(new.len(), 64, "{new}");
    assert_eq!(guest_disk_sha(a, 1), new);
    assert_eq!(sha_file_range(disk, MIB, MIB), new);
}

/// The TAP the overrides named carries traffic: the host pings the restored guest through it
/// (the booted VM's TAP no longer exists).
fn check_tap_override_pings(ns: &Netns) {
    let (ok, out) = ns.exec(&["ping", "-c", "3", "-W", "10", GUEST_IP]);
    assert!(
        ok && out.contains("3 received"),
        "ping the restored guest: {out}"
    );
}

/// A restore the test expects to be refused.
struct BadCase {
    /// VM name (and socket name) of the attempt.
    name: &'static str,
    files: SnapshotFiles,
    /// A TAP override for `eth0`.
    tap: Option<String>,
    /// What the error message must contain.
    needles: Vec<String>,
}

/// Bad snapshots and overrides are refused with an error naming the problem: a state file of
/// another format version, a truncated state file, a memory file of the wrong size, an
/// override naming a TAP that does not exist. Each attempt leaves nothing behind (no thread,
/// fd or mapping, no vsock socket).
fn check_bad_snapshots_are_refused(snap: &Path, dir: &Path, disk: &Path) {
    let good = SnapshotFiles::in_dir(snap);
    let state = fs::read(&good.state).unwrap();
    let mem_len = fs::metadata(&good.memory).unwrap().len();
    let bad = dir.join("bad");
    fs::create_dir_all(&bad).unwrap();
    let other_version = FORMAT_VERSION + 1;
    let mut v = state.clone();
    v[8..12].copy_from_slice(&other_version.to_le_bytes());
    let (versioned, truncated) = (bad.join("state-version"), bad.join("state-truncated"));
    fs::write(&versioned, v).unwrap();
    fs::write(&truncated, &state[..state.len() / 2]).unwrap();
    let short = bad.join("memory-short");
    File::create(&short)
        .unwrap()
        .set_len(mem_len - 4096)
        .unwrap();
    let missing_tap = format!("ks{}x", std::process::id());
    let with = |state: &Path, memory: &Path| SnapshotFiles {
        state: state.to_path_buf(),
        memory: memory.to_path_buf(),
    };
    let cases = [
        BadCase {
            name: "bad-ver",
            files: with(&versioned, &good.memory),
            tap: None,
            needles: vec!["format version".into(), other_version.to_string()],
        },
        BadCase {
            name: "bad-trunc",
            files: with(&truncated, &good.memory),
            tap: None,
            needles: vec!["truncated".into()],
        },
        BadCase {
            name: "bad-mem",
            files: with(&good.state, &short),
            tap: None,
            needles: vec!["memory file".into(), mem_len.to_string()],
        },
        BadCase {
            name: "bad-tap",
            files: good.clone(),
            tap: Some(missing_tap.clone()),
            needles: vec![missing_tap, "does not exist".into()],
        },
    ];
    for case in &cases {
        check_refused(case, &bad, &[snap, disk]);
    }
    let _ = fs::remove_dir_all(&bad);
}

/// This process's open fds: number → target.
fn open_fds() -> BTreeMap<String, String> {
    fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let target = fs::read_link(e.path()).ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                target.display().to_string(),
            ))
        })
        .collect()
}

/// Linux names (`comm`) of this process's threads.
fn thread_names() -> Vec<String> {
    fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect()
}

/// Whether a VM runs in this process (another test's): some thread is an event loop.
fn other_vm_runs() -> bool {
    thread_names().iter().any(|n| n.ends_with("evloop"))
}

/// Restore `case` in this process: refused with an error containing every needle, and nothing
/// left behind: no vsock socket, no thread named after the VM, no mapping of the memory file,
/// no fd on the files under `ours` or the case's, no new KVM VM fd; when no other VM runs in
/// the process, no new fd at all.
fn check_refused(case: &BadCase, dir: &Path, ours: &[&Path]) {
    let sock = dir.join(format!("{}.sock", case.name));
    let _ = fs::remove_file(&sock);
    let overrides = RestoreOverrides {
        name: Some(case.name.into()),
        vsock_uds_path: Some(sock.clone()),
        network_interfaces: case
            .tap
            .iter()
            .map(|t| NetOverride {
                iface_id: "eth0".into(),
                host_dev_name: Some(t.clone()),
                guest_mac: None,
            })
            .collect(),
        ..RestoreOverrides::default()
    };
    let kvm_vms =
        |fds: &BTreeMap<String, String>| fds.values().filter(|t| t.contains("kvm-vm")).count();
    let before = open_fds();
    let err = match Vm::restore_files(&case.files, &overrides, None) {
        Ok(vm) => {
            vm.stop();
            panic!("{}: the restore was not refused", case.name);
        }
        Err(e) => error_chain(&e),
    };
    let after = open_fds();
    eprintln!("{}: refused: {err}", case.name);
    for n in &case.needles {
        assert!(
            err.contains(n.as_str()),
            "{}: {err:?} does not name {n:?}",
            case.name
        );
    }
    assert!(
        !sock.exists(),
        "{}: vsock socket {sock:?} left behind",
        case.name
    );
    let names: Vec<String> = ["evloop", "vcpu0", "vcpu1"]
        .iter()
        .map(|r| kestrel_devices::os_thread_name(&format!("kestrel-{}-{r}", case.name)))
        .collect();
    let threads = thread_names();
    assert!(
        !threads.iter().any(|t| names.contains(t)),
        "{}: threads left: {threads:?}",
        case.name
    );
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    for f in [&case.files.memory, &case.files.state] {
        assert!(
            !maps.contains(&f.display().to_string()),
            "{}: {f:?} still mapped",
            case.name
        );
    }
    let paths: Vec<String> = ours
        .iter()
        .map(|p| p.display().to_string())
        .chain([dir.display().to_string()])
        .collect();
    let leaked: Vec<_> = after
        .iter()
        .filter(|(fd, t)| before.get(*fd) != Some(t) && paths.iter().any(|p| t.contains(p)))
        .collect();
    assert!(
        leaked.is_empty(),
        "{}: fds left open: {leaked:?}",
        case.name
    );
    assert!(
        kvm_vms(&after) <= kvm_vms(&before),
        "{}: a KVM VM fd is left",
        case.name
    );
    check_fd_count_settles(case.name, before.len());
}

/// With no other VM in the process, the fd count returns to `before` (retried for 5 s: another
/// test may be opening a file at that moment); otherwise it is only printed.
fn check_fd_count_settles(name: &str, before: usize) {
    if other_vm_runs() {
        eprintln!(
            "{name}: other VMs run in this process; fd count {before} -> {} (not asserted)",
            open_fds().len()
        );
        return;
    }
    let settled = wait_until(Duration::from_secs(5), || open_fds().len() <= before);
    assert!(settled, "{name}: fds {before} -> {:?}", open_fds());
}

// ------------------------------------------------------------------------------------------
// Template clones.
// ------------------------------------------------------------------------------------------

#[test]
fn eight_clones_of_one_template() {
    let shared = template();
    let cold_kib = nonzero_file_kib(&snapshot_memory_file(shared.template.dir()));
    let t0 = Instant::now();
    // Each clone's clock is read right after its hand-out (host time before and after).
    let (clones, clocks): (Vec<Sandbox>, Vec<(f64, f64, f64)>) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                s.spawn(move || {
                    let sb = clone_of(shared, &format!("tpl-c{i}"));
                    let before = unix_now();
                    let guest_ns = sb.agent().get_time().expect("get_time");
                    let clock = (before, guest_ns as f64 / 1e9, unix_now());
                    (sb, clock)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).unzip()
    });
    eprintln!(
        "8 clones handed out in {:?} (restored in parallel)",
        t0.elapsed()
    );

    check_clocks_within_a_second(&clocks);
    check_urandom_differs_after_hand_out(&clones);
    check_all_clones_answer(&clones);
    check_clones_share_memory(&clones, cold_kib);
    for c in &clones {
        assert_eq!(c.vm().stop(), VmExit::Stopped);
    }
    drop(clones);
    check_pool_hands_out_and_refills(shared);
}

/// The first 32 bytes each clone reads from `/dev/urandom` after hand-out all differ (the
/// template's RNG state was reseeded with fresh host entropy in each).
fn check_urandom_differs_after_hand_out(clones: &[Sandbox]) {
    let reads: Vec<Vec<u8>> = clones
        .iter()
        .map(|c| {
            let r = c.agent().read_file_range("/dev/urandom", 0, Some(32));
            r.expect("read /dev/urandom").data
        })
        .collect();
    for (i, r) in reads.iter().enumerate() {
        assert_eq!(r.len(), 32, "clone {i}");
        for (j, other) in reads.iter().enumerate().skip(i + 1) {
            assert_ne!(r, other, "clones {i} and {j} read the same random bytes");
        }
    }
}

/// Every clone's agent answers.
fn check_all_clones_answer(clones: &[Sandbox]) {
    for (i, c) in clones.iter().enumerate() {
        let v = c.agent().ping();
        assert!(v.is_ok(), "clone {i}: {v:?}");
    }
}

/// Each clone's clock is within 1 s of the host's right after its hand-out (the template was
/// snapshotted long before: the hand-out set the clock). The guest's time (agent `get_time`,
/// no process started) was read between two host readings. (The guest keeps time with
/// jiffies on this nested KVM — its TSC is marked unstable — so under heavy load its clock
/// falls behind later; that is the guest kernel's clocksource, not the hand-out.)
fn check_clocks_within_a_second(clocks: &[(f64, f64, f64)]) {
    for (i, &(before, guest, after)) in clocks.iter().enumerate() {
        eprintln!(
            "clone {i}: guest clock {:+.3} s from the host's (read within {:.3} s)",
            guest - before,
            after - before
        );
        assert!(
            guest >= before - 1.0 && guest <= after + 1.0,
            "clone {i}: guest clock {guest:.3}, host {before:.3}..{after:.3}"
        );
    }
}

/// The eight clones' guest memory costs less than eight cold-booted guests': their total PSS
/// over their guest memory mappings against 8 × the guest memory a cold boot leaves resident
/// (the template's memory file's non-zero pages: every page the guest or the VMM wrote is
/// resident in a cold-booted VM, so this is a lower bound). Prints the ratio.
fn check_clones_share_memory(clones: &[Sandbox], cold_kib: u64) {
    let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
    let (mut pss, mut rss) = (0u64, 0u64);
    for c in clones {
        let ranges = c.vm().guest_memory_host_ranges();
        pss += smaps_kib_in(&smaps, "Pss:", &ranges);
        rss += smaps_kib_in(&smaps, "Rss:", &ranges);
    }
    let cold = 8 * cold_kib;
    eprintln!(
        "8 clones: guest memory PSS {pss} KiB in all ({} KiB each; RSS {rss} KiB in all) against \
         8 cold-booted guests' >= {cold} KiB: ratio {:.3}",
        pss / 8,
        pss as f64 / cold as f64
    );
    assert!(pss > 0, "no guest memory of the clones is resident");
    assert!(pss < cold, "clones' PSS {pss} KiB >= cold {cold} KiB");
}

/// A pool of one clone fills in the background, hands its clone out (agent answering,
/// counted in the stats) and refills.
fn check_pool_hands_out_and_refills(shared: &Shared) {
    let dir = shared.dir.clone();
    let overrides: Arc<dyn Fn(u64) -> RestoreOverrides + Send + Sync> =
        Arc::new(move |n| clone_overrides(&dir, &format!("tpl-p{n}")));
    let pool = Pool::new(shared.template.clone(), 1, overrides, AGENT_TIMEOUT);
    assert!(
        wait_until(AGENT_TIMEOUT, || pool.ready() == 1),
        "the pool never filled"
    );
    let t = Instant::now();
    let sb = pool
        .take(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("take from a full pool: {e}"));
    let took = t.elapsed();
    sb.agent().ping().expect("the handed-out clone answers");
    let st = pool.stats();
    eprintln!(
        "pool: take {took:?} (stats: last take {} us, last refresh {} us)",
        st.last_take_us, st.last_refresh_us
    );
    assert_eq!(st.handed_out, 1, "clones handed out");
    assert!(
        wait_until(AGENT_TIMEOUT, || pool.ready() == 1),
        "the pool never refilled"
    );
    let st = pool.stats();
    eprintln!(
        "pool refilled in {} us; handed out {}, discarded {}",
        st.last_refresh_us, st.handed_out, st.discarded
    );
    assert_eq!(st.discarded, 0, "the pool discarded a clone");
    pool.close();
    assert_eq!(sb.vm().stop(), VmExit::Stopped);
}

// ------------------------------------------------------------------------------------------
// Hotplug state through a snapshot.
// ------------------------------------------------------------------------------------------

#[test]
fn hotplug_state_survives_restore() {
    let shared = template();
    let sb = clone_of(shared, "tpl-hp");
    check_hot_plugged_vcpu_and_memory_survive_restore(sb, &shared.dir);
}

/// A clone grown to 2 vCPUs and +128 MiB (hot-plugged) is paused and snapshotted; the VM
/// restored from that snapshot in this process reports the same online CPUs and MemTotal,
/// has the plugged block and vCPU 1 running, and runs a process on CPU 1.
fn check_hot_plugged_vcpu_and_memory_survive_restore(sb: Sandbox, dir: &Path) {
    let v = sb.resize_vcpus(2).expect("plug vCPU 1");
    assert_eq!(v.online, "0-1");
    let m = sb.resize_memory(384).expect("plug 128 MiB");
    assert_eq!(m.total_mib, 384);
    let (cpus, mem) = {
        let mut a = sb.agent();
        (a.cpus().unwrap(), a.meminfo().unwrap())
    };
    let blocks = |vm: &Vm| -> Vec<(u64, u64)> {
        vm.plugged_memory()
            .iter()
            .map(|p| (p.addr, p.size))
            .collect()
    };
    let plugged = blocks(sb.vm());
    assert_eq!(plugged.len(), 1, "{plugged:?}");
    let snap = dir.join("hotplug-snapshot");
    sb.vm().pause().expect("pause");
    sb.vm().snapshot(&snap).expect("snapshot");
    assert_eq!(sb.vm().stop(), VmExit::Stopped);
    drop(sb);

    let t = Instant::now();
    let vm = Vm::restore(&snap, &clone_overrides(dir, "tpl-hp2"))
        .unwrap_or_else(|e| panic!("restore: {}", error_chain(&e)));
    let config = vm.config().clone();
    let r = Sandbox::from_vm(&config, vm, AGENT_TIMEOUT).expect("the restored agent answers");
    eprintln!(
        "restore with hot-plugged vCPU and memory: agent after {:?}",
        t.elapsed()
    );
    let (cpus2, mem2) = {
        let mut a = r.agent();
        (a.cpus().unwrap(), a.meminfo().unwrap())
    };
    assert_eq!(cpus2.online, cpus.online, "online CPUs after restore");
    assert_eq!(cpus2.online, "0-1");
    assert_eq!(
        mem2.mem_total_kb, mem.mem_total_kb,
        "MemTotal after restore"
    );
    assert_eq!(blocks(r.vm()), plugged, "plugged memory after restore");
    assert!(
        r.vm().vcpu_states().contains(&(1, VcpuRunState::Running)),
        "{:?}",
        r.vm().vcpu_states()
    );
    assert!(r
        .vm()
        .threads()
        .iter()
        .any(|t| t.kind == ThreadKind::Vcpu(1)));
    let out = sh_ok(
        &mut r.agent(),
        "taskset -c 1 sh -c 'set -- $(cat /proc/self/stat); shift 38; echo cpu=$1'",
    );
    assert_eq!(
        out.trim(),
        "cpu=1",
        "a process pinned to CPU 1 ran elsewhere"
    );
    assert_eq!(r.vm().stop(), VmExit::Stopped);
    let _ = fs::remove_dir_all(&snap);
}
