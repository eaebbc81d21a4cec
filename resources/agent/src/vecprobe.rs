//! `kestrel-agent vecprobe [PROCS] [ROUNDS]`: do guest tasks keep their own vector registers?
//!
//! Starts PROCS worker processes (default 3). Each worker, ROUNDS times (default 2000), loads a
//! pattern unique to (worker, round) into one register of every class the CPU and XCR0 report
//! usable -- xmm1 (SSE), ymm2 (AVX), zmm17 and opmask k1 (AVX-512) -- calls `sched_yield` in
//! the same asm block, so another worker may run in between, and reads the registers back. A
//! value that changed is a mismatch of its class. Then the probe itself runs ROUNDS rounds in
//! which the system call is `kill(getpid(), SIGUSR1)` and the handler overwrites those
//! registers: the interrupted code must get its own values back at `sigreturn` (`sig_bad`,
//! mismatches of every class together). Prints one summary line:
//!
//! `vecprobe: xcr0=0xe7 procs=3 rounds=2000 usable=xmm,ymm,zmm,k xmm_bad=0 ymm_bad=0 zmm_bad=0 k_bad=0 sig_bad=0`
//!
//! and exits 0 when every class had zero mismatches, 1 otherwise, 2 on a usage error.
//! On a software KVM whose guest kernel runs with `noxsave`, ymm/zmm/k mismatch unless the
//! VMM serves the paravirtual extended-state switch (docs/nested-kvm.md §10).

use std::arch::asm;
use std::arch::x86_64::{__cpuid, __cpuid_count};
use std::io::Write;
use std::process::{Command, Stdio};

use kestrel_agent_proto::XorShift;

const SYS_SCHED_YIELD: u64 = 24;
const SYS_KILL: u64 = 62;

/// The system call a round makes between loading and reading back the registers.
#[derive(Clone, Copy)]
struct Call {
    nr: u64,
    a0: u64,
    a1: u64,
}

/// `sched_yield()`: another worker may run in between.
const YIELD: Call = Call {
    nr: SYS_SCHED_YIELD,
    a0: 0,
    a1: 0,
};

#[derive(Clone, Copy, Default)]
struct Usable {
    avx: bool,
    avx512: bool,
}

fn xcr0() -> Option<u64> {
    let l1 = __cpuid(1);
    if l1.ecx & (1 << 27) == 0 {
        return None; // OSXSAVE clear: XGETBV would #UD.
    }
    let (lo, hi): (u32, u32);
    // SAFETY: OSXSAVE is set, so XGETBV with ECX=0 is defined; it only writes EDX:EAX.
    unsafe {
        asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    Some(u64::from(lo) | (u64::from(hi) << 32))
}

fn usable(xcr0: Option<u64>) -> Usable {
    let Some(x) = xcr0 else {
        return Usable::default();
    };
    let (l1, l7) = (__cpuid(1), __cpuid_count(7, 0));
    let avx = l1.ecx & (1 << 28) != 0 && x & 0b110 == 0b110;
    let avx512 = avx && l7.ebx & (1 << 16) != 0 && x & 0xe0 == 0xe0;
    Usable { avx, avx512 }
}

/// The low 16 bits of `x`.
fn low16(x: u64) -> u16 {
    let b = x.to_le_bytes();
    u16::from_le_bytes([b[0], b[1]])
}

/// `N` bytes of the protocol's test stream from `seed`.
fn pattern<const N: usize>(seed: u64) -> [u8; N] {
    let mut out = [0u8; N];
    XorShift::new(seed).fill(&mut out);
    out
}

fn round_sse(src: &[u8; 16], call: Call) -> [u8; 16] {
    let mut dst = [0u8; 16];
    // SAFETY: reads 16 bytes at src and writes 16 at dst (both valid); the syscall clobbers
    // rax, rcx, r11, which are declared; xmm1 is declared clobbered.
    unsafe {
        asm!(
            "movdqu xmm1, [{s}]",
            "syscall",
            "movdqu [{d}], xmm1",
            s = in(reg) src.as_ptr(),
            d = in(reg) dst.as_mut_ptr(),
            inout("rax") call.nr => _,
            in("rdi") call.a0,
            in("rsi") call.a1,
            out("rcx") _, out("r11") _, out("xmm1") _,
            options(nostack),
        )
    };
    dst
}

#[target_feature(enable = "avx")]
unsafe fn round_avx(src: &[u8; 32], call: Call) -> [u8; 32] {
    let mut dst = [0u8; 32];
    // SAFETY: the caller checked AVX is usable; 32 bytes read at src and written at dst; the
    // syscall's clobbers and ymm2 are declared.
    unsafe {
        asm!(
            "vmovdqu ymm2, [{s}]",
            "syscall",
            "vmovdqu [{d}], ymm2",
            "vzeroupper",
            s = in(reg) src.as_ptr(),
            d = in(reg) dst.as_mut_ptr(),
            inout("rax") call.nr => _,
            in("rdi") call.a0,
            in("rsi") call.a1,
            out("rcx") _, out("r11") _, out("ymm2") _,
            options(nostack),
        )
    };
    dst
}

#[target_feature(enable = "avx512f")]
unsafe fn round_avx512(src: &[u8; 64], k: u16, call: Call) -> ([u8; 64], u16) {
    let mut dst = [0u8; 64];
    let kout: u32;
    // SAFETY: the caller checked AVX-512 is usable; 64 bytes read at src and written at dst;
    // the syscall's clobbers, zmm17 and k1 are declared.
    unsafe {
        asm!(
            "vmovdqu64 zmm17, [{s}]",
            "kmovw k1, {ki:e}",
            "syscall",
            "vmovdqu64 [{d}], zmm17",
            "kmovw {ko:e}, k1",
            "vzeroupper",
            s = in(reg) src.as_ptr(),
            d = in(reg) dst.as_mut_ptr(),
            ki = in(reg) u32::from(k),
            ko = out(reg) kout,
            inout("rax") call.nr => _,
            in("rdi") call.a0,
            in("rsi") call.a1,
            out("rcx") _, out("r11") _, out("zmm17") _, out("k1") _,
            options(nostack),
        )
    };
    (dst, low16(u64::from(kout)))
}

/// What the SIGUSR1 handler may clobber (set once before the handler is installed).
static CLOBBER: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

#[target_feature(enable = "avx")]
unsafe fn clobber_avx() {
    // SAFETY: AVX usable (checked before CLOBBER was set); only ymm2 changes, declared.
    unsafe { asm!("vpcmpeqd ymm2, ymm2, ymm2", out("ymm2") _, options(nomem, nostack)) };
}

#[target_feature(enable = "avx512f")]
unsafe fn clobber_avx512() {
    // SAFETY: AVX-512F usable (checked before CLOBBER was set); zmm17 and k1 declared.
    unsafe {
        asm!(
            "vpternlogd zmm17, zmm17, zmm17, 0xff",
            "kxnorw k1, k1, k1",
            out("zmm17") _, out("k1") _,
            options(nomem, nostack),
        )
    };
}

/// SIGUSR1 handler: overwrite the registers the probe round holds (all ones).
extern "C" fn on_sigusr1(_: libc::c_int) {
    let c = CLOBBER.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: the bits are set only for classes `usable` reported.
    unsafe {
        if c & 1 != 0 {
            clobber_avx();
        }
        if c & 2 != 0 {
            clobber_avx512();
        }
    }
}

/// Rounds in this process in which a signal handler that overwrites the registers runs between
/// load and read-back (`kill(getpid(), SIGUSR1)`): the interrupted code's vector state must
/// come back from the signal frame. Mismatches: xmm, ymm, zmm, k.
fn signal_rounds(rounds: u64, u: Usable) -> Counts {
    CLOBBER.store(
        u8::from(u.avx) | (u8::from(u.avx512) << 1),
        std::sync::atomic::Ordering::Relaxed,
    );
    // SAFETY: a zeroed sigaction with our handler; SIGUSR1 is ours in this process.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigusr1 as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()) != 0 {
            return [rounds; 4];
        }
    }
    let call = Call {
        nr: SYS_KILL,
        a0: u64::from(std::process::id()),
        a1: libc::SIGUSR1 as u64,
    };
    worker(0, rounds, u, call)
}

/// Mismatch counts: xmm, ymm, zmm, k.
type Counts = [u64; 4];

fn worker(id: u64, rounds: u64, u: Usable, call: Call) -> Counts {
    let mut bad = [0u64; 4];
    for r in 0..rounds {
        let seed = (id << 40) ^ (r << 8) ^ 0x9e37_79b9;
        let p16 = pattern::<16>(seed);
        if round_sse(&p16, call) != p16 {
            bad[0] += 1;
        }
        if u.avx {
            let p32 = pattern::<32>(seed ^ 1);
            // SAFETY: AVX checked in `usable`.
            if unsafe { round_avx(&p32, call) } != p32 {
                bad[1] += 1;
            }
        }
        if u.avx512 {
            let p64 = pattern::<64>(seed ^ 2);
            let k = low16(seed) | 1;
            // SAFETY: AVX-512F checked in `usable`.
            let (z, kb) = unsafe { round_avx512(&p64, k, call) };
            if z != p64 {
                bad[2] += 1;
            }
            if kb != k {
                bad[3] += 1;
            }
        }
    }
    bad
}

fn parse(arg: Option<&String>, default: u64, what: &str) -> Result<u64, String> {
    match arg {
        None => Ok(default),
        Some(s) => match s.parse::<u64>() {
            Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
            _ => Err(format!(
                "{what} must be a number from 1 to 1000000, got {s:?}"
            )),
        },
    }
}

/// Runs `procs` worker processes of `rounds` each and sums their four mismatch counts; `None`
/// when one cannot be started, `failed` when one ended badly or printed no counts.
fn run_workers(procs: u64, rounds: u64) -> Option<([u64; 4], bool)> {
    let mut children = Vec::new();
    for id in 1..=procs {
        match Command::new("/proc/self/exe")
            .args(["vecprobe", "--worker", &id.to_string(), &rounds.to_string()])
            .stdout(Stdio::piped())
            .spawn()
        {
            Ok(c) => children.push(c),
            Err(e) => {
                eprintln!("vecprobe: cannot start worker {id}: {e}");
                return None;
            }
        }
    }
    let mut total = [0u64; 4];
    let mut failed = false;
    for c in children {
        match c.wait_with_output() {
            Ok(o) if o.status.success() => {
                let text = String::from_utf8_lossy(&o.stdout);
                let nums: Vec<u64> = text
                    .split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect();
                if nums.len() != 4 {
                    failed = true;
                    continue;
                }
                for (t, n) in total.iter_mut().zip(nums) {
                    *t += n;
                }
            }
            Ok(o) => {
                eprintln!("vecprobe: worker ended with {}", o.status);
                failed = true;
            }
            Err(e) => {
                eprintln!("vecprobe: worker: {e}");
                failed = true;
            }
        }
    }
    Some((total, failed))
}

/// `args` are the words after `vecprobe`. Returns the exit status.
pub fn main(args: &[String]) -> i32 {
    if args.first().map(String::as_str) == Some("--worker") {
        let (id, rounds) = match (parse(args.get(1), 0, "id"), parse(args.get(2), 1, "rounds")) {
            (Ok(i), Ok(r)) => (i, r),
            _ => return 2,
        };
        let bad = worker(id, rounds, usable(xcr0()), YIELD);
        let _ = writeln!(
            std::io::stdout(),
            "{} {} {} {}",
            bad[0],
            bad[1],
            bad[2],
            bad[3]
        );
        return 0;
    }
    let (procs, rounds) = match (
        parse(args.first(), 3, "PROCS"),
        parse(args.get(1), 2000, "ROUNDS"),
    ) {
        (Ok(p), Ok(r)) if p <= 64 => (p, r),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("vecprobe: {e}");
            return 2;
        }
        _ => {
            eprintln!("vecprobe: at most 64 processes");
            return 2;
        }
    };
    let x = xcr0();
    let u = usable(x);
    let Some((total, failed)) = run_workers(procs, rounds) else {
        return 1;
    };
    let sig = signal_rounds(rounds, u);
    let sig_bad: u64 = sig.iter().sum();
    let mut classes = vec!["xmm"];
    if u.avx {
        classes.push("ymm");
    }
    if u.avx512 {
        classes.extend(["zmm", "k"]);
    }
    let _ = writeln!(
        std::io::stdout(),
        "vecprobe: xcr0={} procs={procs} rounds={rounds} usable={} xmm_bad={} ymm_bad={} zmm_bad={} k_bad={} sig_bad={sig_bad}",
        x.map_or_else(|| "none".to_string(), |v| format!("{v:#x}")),
        classes.join(","),
        total[0],
        total[1],
        total[2],
        total[3],
    );
    if failed || sig_bad > 0 || total.iter().any(|&n| n > 0) {
        1
    } else {
        0
    }
}
