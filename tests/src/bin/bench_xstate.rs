//! The paravirtual extended-state switch (docs/nested-kvm.md §10): what one guest task switch
//! costs the VMM, next to a task switch on the host, and what the guest sees with the assist
//! on and off (vector-register probe, busybox pipelines, crashes). Prints two tables.
//!
//! `cargo run --release -p kestrel-tests --bin bench_xstate [-- --ops N --pipelines N --guests 0|1]`

use std::time::{Duration, Instant};

use kestrel_sandbox::agent::ExecRequest;
use kestrel_sandbox::Sandbox;
use kestrel_tests::guest::agent_guest;
use kestrel_tests::*;
use kestrel_vmm::pvfpu::{self, Request};
use kestrel_vmm::Vm;
use kvm_ioctls::Kvm;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Mean microseconds per call of `f` over `n` calls.
fn per_call_us(n: u32, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

/// Host peer: two processes handing a token back and forth over pipes, each switch a full
/// host task switch (XSAVE/XRSTOR of the host's state). Mean microseconds per switch.
fn host_switch_us(n: u32) -> f64 {
    let mut a = [0i32; 2];
    let mut b = [0i32; 2];
    // SAFETY: pipe(2) fills two fds into each array.
    unsafe {
        assert_eq!(libc::pipe(a.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(b.as_mut_ptr()), 0);
    }
    let mut byte = [0u8; 1];
    // SAFETY: fork(2) in a single-purpose bench; the child only reads/writes pipes and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        for _ in 0..n {
            // SAFETY: valid fds and a 1-byte buffer.
            unsafe {
                libc::read(a[0], byte.as_mut_ptr().cast(), 1);
                libc::write(b[1], byte.as_ptr().cast(), 1);
            }
        }
        // SAFETY: leave the child without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    let us = per_call_us(n, || {
        // SAFETY: valid fds and a 1-byte buffer.
        unsafe {
            libc::write(a[1], byte.as_ptr().cast(), 1);
            libc::read(b[0], byte.as_mut_ptr().cast(), 1);
        }
    });
    // SAFETY: reap the child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    us / 2.0
}

fn vmm_side(ops: u32) {
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    assert!(
        pvfpu::supported(&vm),
        "KVM_GET/SET_XSAVE unusable on this host"
    );
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");
    vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let area = GuestAddress(0x1000);
    let save = per_call_us(ops, || {
        pvfpu::serve(&vcpu, &mem, Request::Save(area)).expect("save");
    });
    let load = per_call_us(ops, || {
        pvfpu::serve(&vcpu, &mem, Request::Load(area)).expect("load");
    });
    let host = host_switch_us(ops);
    println!(
        "VMM side of the assist ({ops} calls each; a guest task switch is one save + one load)"
    );
    println!();
    println!("| what | µs per call |");
    println!("|---|---|");
    println!("| save (KVM_GET_XSAVE + 3.5 KiB copy to the guest) | {save:.2} |");
    println!("| load (4 KiB copy from the guest + KVM_SET_XSAVE) | {load:.2} |");
    println!(
        "| save + load (one guest task switch) | {:.2} |",
        save + load
    );
    println!("| host task switch (pipe ping-pong, peer) | {host:.2} |");
    println!(
        "| ratio assist / host switch | {:.2} |",
        (save + load) / host
    );
    println!();
}

struct GuestRun {
    probe: String,
    probe_s: f64,
    pipelines_s: f64,
    bad_pipelines: usize,
    segfaults: usize,
    saves: u64,
    loads: u64,
}

fn guest_side(assist: bool, pipelines: u64) -> GuestRun {
    let mut guest = agent_guest(
        if assist {
            "bench-xs-on"
        } else {
            "bench-xs-off"
        },
        1,
        256,
    );
    guest.config.kestrel.xstate_assist = assist;
    let c = &guest.config;
    let cap = Capture::default();
    let vm = Vm::create_with_console(c, Box::new(cap.clone())).expect("create");
    let sb = Sandbox::from_vm(c, vm, Duration::from_secs(900)).expect("boot");
    let mut a = sb.agent();
    a.set_call_timeout(Some(Duration::from_secs(3600)));
    let run = |a: &mut kestrel_sandbox::agent::AgentClient, script: &str| {
        let t = Instant::now();
        let r = a
            .exec_with(
                &ExecRequest::new(&["/bin/sh", "-c", script]).timeout(Duration::from_secs(3000)),
            )
            .expect("exec");
        (
            t.elapsed().as_secs_f64(),
            format!("{}{}", r.stdout_str(), r.stderr_str()),
        )
    };
    let (probe_s, out) = run(&mut a, "/sbin/kestrel-agent vecprobe 4 2000");
    let probe = out
        .lines()
        .find(|l| l.starts_with("vecprobe:"))
        .unwrap_or("no probe output")
        .split_whitespace()
        .filter(|w| w.contains("_bad="))
        .collect::<Vec<_>>()
        .join(" ");
    let (pipelines_s, out) = run(
        &mut a,
        &format!(
            "i=0; while [ $i -lt {pipelines} ]; do c=$(cat /proc/cpuinfo | grep -c processor); \
             [ \"$c\" = 1 ] || echo BAD; i=$((i+1)); done"
        ),
    );
    let m = sb.vm().metrics();
    let _ = sb.shutdown(Duration::from_secs(60));
    GuestRun {
        probe,
        probe_s,
        pipelines_s,
        bad_pipelines: out.matches("BAD").count(),
        segfaults: cap.text().matches("segfault at").count(),
        saves: m.assist_xstate_save,
        loads: m.assist_xstate_load,
    }
}

fn main() {
    let ops = u32::try_from(cli_arg("--ops", 20_000)).unwrap_or(u32::MAX);
    let pipelines = cli_arg("--pipelines", 30);
    vmm_side(ops);
    if cli_arg("--guests", 1) == 0 {
        return;
    }
    if !kestrel_vmm::host_kvm_is_software() {
        println!(
            "hardware KVM: the guest uses XSAVE; the assist is not offered, nothing to compare"
        );
        return;
    }
    // Both guests at once: one vCPU each on the two cores.
    let on = std::thread::spawn(move || guest_side(true, pipelines));
    let off = guest_side(false, pipelines);
    let on = on.join().expect("assist-on guest");
    println!(
        "Guest with and without the assist (1 vCPU / 256 MiB; `vecprobe 4 2000` = 8 000 register \
         round trips across task switches; {pipelines} two-stage busybox pipelines)"
    );
    println!();
    println!("| assist | probe mismatches | probe time | pipelines time | bad pipelines | console segfaults | saves | loads |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, r) in [("on", &on), ("off", &off)] {
        println!(
            "| {name} | {} | {:.1} s | {:.1} s | {} | {} | {} | {} |",
            r.probe, r.probe_s, r.pipelines_s, r.bad_pipelines, r.segfaults, r.saves, r.loads
        );
    }
}
