//! Snapshot bench (issue 13): pause and resume latency, snapshot time and size, restore to the
//! first `KVM_RUN` for 128/256/512 MiB tiny guests (the VMM side; a tiny guest writes little
//! of its RAM, so its sparse memory file is mostly holes: the snapshot time is the scan for
//! zero pages plus the sync, a lower bound for a guest that wrote its memory); with
//! `KESTREL_BENCH_GUEST=1` also the real guest:
//! restore to the agent answering (VMM and guest shares), pool hand-out and refresh, PSS per
//! clone. Prints markdown tables next to the anchors and targets.
//!
//! `cargo run --release -p kestrel-tests --bin bench_snapshot [-- --runs N --clones K]`

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kestrel_api::{RestoreOverrides, SerialOutput, VmConfig};
use kestrel_sandbox::{Pool, Sandbox, Template};
use kestrel_tests::guest::agent_guest;
use kestrel_tests::{
    cli_arg, nonzero_file_kib, scratch_dir, smaps_kib_in, snapshot_memory_file, spin,
    write_tiny_guest,
};
use kestrel_vmm::{SnapshotFiles, Vm};

/// Firecracker's full-snapshot create baseline (2 vCPUs / 256 MiB), ms.
const FC_SNAPSHOT_MS: f64 = 180.0;
/// Dragonball's template restore to agent ready, ms.
const DRAGONBALL_RESTORE_MS: f64 = 11.1;
/// Target: restore to the first `KVM_RUN`, ms.
const TARGET_FIRST_RUN_MS: f64 = 10.0;
/// Target: pool hand-out, ms.
const TARGET_HAND_OUT_MS: f64 = 1.0;
/// How long a real guest may take to reach its agent (emulated guest kernel here).
const AGENT_TIMEOUT: Duration = Duration::from_secs(900);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The median of `v` (NaN when empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `value` against a target: `value ms (target < T ms: met|missed)`.
fn against_target(value: f64, target: f64) -> String {
    let verdict = if value < target { "met" } else { "missed" };
    format!("target < {target} ms: {verdict}")
}

/// One pause → snapshot → resume → restore round of a tiny guest.
struct VmmRun {
    pause: Duration,
    resume: Duration,
    snapshot: Duration,
    state_bytes: u64,
    memory_bytes: u64,
    /// `Vm::restore` (files read, memory mapped, devices and vCPUs built).
    restore: Duration,
    /// `Vm::start` after it.
    start: Duration,
    /// From the restore call to the moment the VM's metrics show the first `KVM_RUN` (polled).
    to_first_run: Option<Duration>,
    /// The VM's own figure (`VmMetrics::setup_to_first_run_us`), if it reports one.
    first_run_metric_us: Option<u64>,
}

/// A started 2-vCPU tiny guest (spinning) of `mem` MiB named `name`.
fn spinning_vm(name: &str, mem: u64) -> Vm {
    let k = write_tiny_guest("bench-snapshot-spin.elf", &spin());
    let mut c = VmConfig::new(k, 2, mem);
    c.serial.output = SerialOutput::None;
    c.kestrel.name = Some(name.into());
    let vm = Vm::create(&c).expect("create");
    vm.start().expect("start");
    vm
}

/// Restore `dir` as `name` and start it; time each step and poll for the first `KVM_RUN`
/// (up to 2 s: a build without that metric for restored VMs reports none).
fn timed_restore(dir: &Path, name: &str) -> (Duration, Duration, Option<Duration>, Option<u64>) {
    let o = RestoreOverrides {
        name: Some(name.into()),
        ..RestoreOverrides::default()
    };
    let t0 = Instant::now();
    let vm = Vm::restore(dir, &o).unwrap_or_else(|e| panic!("restore {dir:?}: {e}"));
    let restore = t0.elapsed();
    vm.start().expect("start the restored VM");
    let start = t0.elapsed() - restore;
    let mut to_first_run = None;
    while t0.elapsed() < Duration::from_secs(2) {
        if vm.metrics().setup_to_first_run_us.is_some() {
            to_first_run = Some(t0.elapsed());
            break;
        }
        std::thread::yield_now();
    }
    let metric = vm.metrics().setup_to_first_run_us;
    vm.stop();
    (restore, start, to_first_run, metric)
}

fn vmm_run(mem: u64, run: u64) -> VmmRun {
    let name = format!("bsnap{mem}-{run}");
    let vm = spinning_vm(&name, mem);
    std::thread::sleep(Duration::from_millis(20));
    let t = Instant::now();
    vm.pause().expect("pause");
    let pause = t.elapsed();
    let dir = scratch_dir().join(&name);
    let _ = std::fs::remove_dir_all(&dir);
    let t = Instant::now();
    vm.snapshot(&dir).expect("snapshot");
    let snapshot = t.elapsed();
    let t = Instant::now();
    vm.resume().expect("resume");
    let resume = t.elapsed();
    vm.stop();
    drop(vm);
    let files = SnapshotFiles::in_dir(&dir);
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (state_bytes, memory_bytes) = (len(&files.state), len(&files.memory));
    let (restore, start, to_first_run, first_run_metric_us) =
        timed_restore(&dir, &format!("{name}r"));
    let _ = std::fs::remove_dir_all(&dir);
    VmmRun {
        pause,
        resume,
        snapshot,
        state_bytes,
        memory_bytes,
        restore,
        start,
        to_first_run,
        first_run_metric_us,
    }
}

fn vmm_table(runs: u64) {
    println!("Kestrel snapshot bench, VMM side: tiny guest, 2 vCPUs; median of {runs} runs");
    println!();
    println!(
        "| guest RAM | pause | resume | snapshot | state file | memory file | Vm::restore | \
         start | restore → first KVM_RUN (polled) | (VM metric) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut first_run_256 = f64::NAN;
    let mut snapshot_256 = f64::NAN;
    for mem in [128, 256, 512] {
        let rs: Vec<VmmRun> = (0..runs).map(|r| vmm_run(mem, r)).collect();
        let col = |f: &dyn Fn(&VmmRun) -> f64| median(rs.iter().map(f).collect());
        let first = col(&|r| r.to_first_run.map_or(f64::NAN, ms));
        let metric = col(&|r| {
            r.first_run_metric_us
                .map_or(f64::NAN, |u| u as f64 / 1000.0)
        });
        let snap = col(&|r| ms(r.snapshot));
        if mem == 256 {
            (first_run_256, snapshot_256) = (first, snap);
        }
        println!(
            "| {mem} MiB | {:.3} ms | {:.3} ms | {snap:.1} ms | {:.0} KiB | {:.0} MiB | {:.3} ms \
             | {:.3} ms | {first:.3} ms | {metric:.3} ms |",
            col(&|r| ms(r.pause)),
            col(&|r| ms(r.resume)),
            col(&|r| r.state_bytes as f64 / 1024.0),
            col(&|r| r.memory_bytes as f64 / 1048576.0),
            col(&|r| ms(r.restore)),
            col(&|r| ms(r.start)),
        );
    }
    println!();
    println!(
        "- snapshot 256 MiB: {snapshot_256:.1} ms; anchor: Firecracker full-snapshot create \
         {FC_SNAPSHOT_MS} ms (2 vCPUs / 256 MiB)"
    );
    println!(
        "- restore → first KVM_RUN 256 MiB: {first_run_256:.3} ms; {}",
        against_target(first_run_256, TARGET_FIRST_RUN_MS)
    );
    println!();
}

/// Overrides for clone `name`: its name and vsock socket in `dir`.
fn clone_overrides(dir: &Path, name: &str) -> RestoreOverrides {
    let sock = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    RestoreOverrides {
        name: Some(name.into()),
        vsock_uds_path: Some(sock),
        ..RestoreOverrides::default()
    }
}

/// Restore to the agent answering, `runs` times: (total ms, VMM ms to the first `KVM_RUN`).
fn restore_to_agent(template: &Template, dir: &Path, runs: u64) -> Vec<(f64, f64)> {
    (0..runs)
        .map(|r| {
            let o = clone_overrides(dir, &format!("bsc{r}"));
            let t = Instant::now();
            let sb = template.clone_sandbox(&o, AGENT_TIMEOUT).expect("clone");
            let total = ms(t.elapsed());
            let vmm = sb
                .vm()
                .metrics()
                .setup_to_first_run_us
                .map_or(f64::NAN, |u| u as f64 / 1000.0);
            sb.agent().ping().expect("the clone answers");
            sb.vm().stop();
            (total, vmm)
        })
        .collect()
}

/// What the pool section measured.
struct PoolRun {
    /// Wall-clock `take` from a full pool, ms.
    take_ms: Vec<f64>,
    /// The pool's own figures, µs.
    last_take_us: Vec<f64>,
    last_refresh_us: Vec<f64>,
    /// Guest memory PSS of the handed-out clones, KiB.
    pss_kib: u64,
}

/// Take `clones` sandboxes from a pool of 2, each once the pool is full again; measure each
/// take and refresh, then the PSS of all handed-out clones together.
fn pool_run(template: &Arc<Template>, dir: &Path, clones: u64) -> PoolRun {
    let dir = dir.to_path_buf();
    let make: Arc<dyn Fn(u64) -> RestoreOverrides + Send + Sync> =
        Arc::new(move |n| clone_overrides(&dir, &format!("bsp{n}")));
    let pool = Pool::new(template.clone(), 2, make, AGENT_TIMEOUT);
    let full = |pool: &Pool| {
        let end = Instant::now() + AGENT_TIMEOUT;
        while pool.ready() < 2 {
            assert!(Instant::now() < end, "the pool never filled");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let mut run = PoolRun {
        take_ms: Vec::new(),
        last_take_us: Vec::new(),
        last_refresh_us: Vec::new(),
        pss_kib: 0,
    };
    let mut taken: Vec<Sandbox> = Vec::new();
    for _ in 0..clones {
        full(&pool);
        let t = Instant::now();
        let sb = pool.take(Duration::from_secs(60)).expect("take");
        run.take_ms.push(ms(t.elapsed()));
        let st = pool.stats();
        run.last_take_us.push(st.last_take_us as f64);
        run.last_refresh_us.push(st.last_refresh_us as f64);
        taken.push(sb);
    }
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    run.pss_kib = taken
        .iter()
        .map(|s| smaps_kib_in(&smaps, "Pss:", &s.vm().guest_memory_host_ranges()))
        .sum();
    pool.close();
    for s in &taken {
        s.vm().stop();
    }
    run
}

fn guest_table(runs: u64, clones: u64) {
    let g = agent_guest("bench-snapshot", 1, 256);
    let tdir = g.dir.join("template");
    let _ = std::fs::remove_dir_all(&tdir);
    let t = Instant::now();
    let template = Arc::new(Template::create(&g.config, &tdir, AGENT_TIMEOUT).expect("template"));
    let cold = t.elapsed();
    let cold_kib = nonzero_file_kib(&snapshot_memory_file(template.dir()));
    let r = restore_to_agent(&template, &g.dir, runs);
    let total = median(r.iter().map(|x| x.0).collect());
    let vmm = median(r.iter().map(|x| x.1).collect());
    let p = pool_run(&template, &g.dir, clones);
    let take = median(p.take_ms.clone());
    let take_max = p.take_ms.iter().copied().fold(f64::NAN, f64::max);
    let per_clone = p.pss_kib / clones.max(1);
    println!(
        "Kestrel snapshot bench, real guest: 1 vCPU / 256 MiB (guest kernel emulated here); \
         template made in {:.1} s (cold boot + snapshot)",
        cold.as_secs_f64()
    );
    println!();
    println!("| measurement | Kestrel | anchor / target |");
    println!("|---|---|---|");
    println!(
        "| restore → agent answering (clone_sandbox, median of {runs}) | {total:.1} ms (VMM to \
         first KVM_RUN {vmm:.1} ms, guest + agent + reseed + clock {:.1} ms) | Dragonball \
         template restore-to-agent-ready {DRAGONBALL_RESTORE_MS} ms |",
        total - vmm
    );
    let hand_out_ms = median(p.last_take_us.clone()) / 1000.0;
    println!(
        "| pool hand-out, VMM side (a ready clone in hand, median of {clones}) | {hand_out_ms:.3} \
         ms | {} |",
        against_target(hand_out_ms, TARGET_HAND_OUT_MS)
    );
    println!(
        "| pool take() with the hand-out refresh (reseed + clock: two agent round trips to the \
         emulated guest) | {take:.1} ms (max {take_max:.1} ms; refresh {:.1} ms) | – |",
        median(p.last_refresh_us.clone()) / 1000.0
    );
    println!(
        "| PSS per clone ({clones} handed out) | {per_clone} KiB | a cold-booted guest: >= \
         {cold_kib} KiB resident (non-zero pages of its memory); ratio {:.3} |",
        per_clone as f64 / cold_kib.max(1) as f64
    );
}

fn main() {
    let runs = cli_arg("--runs", 3);
    let clones = cli_arg("--clones", 8);
    vmm_table(runs.max(1));
    if std::env::var_os("KESTREL_BENCH_GUEST").is_some_and(|v| v == "1") {
        guest_table(runs.max(1), clones.max(1));
    } else {
        println!("(real guest rows: set KESTREL_BENCH_GUEST=1)");
    }
}
