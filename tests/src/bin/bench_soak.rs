//! Soak tables: `--tiny N` create/start/stop cycles of a tiny guest (default 1000) and
//! `--devices N` cycles of a VM with every device kind (default 20): time per phase, and fds,
//! threads, RSS, socket files, network interfaces, mounts and child processes before, during a
//! cycle and after. The cycles are the ones `tests/tests/soak.rs` and `soak_devices.rs` assert
//! on (`kestrel_tests::soak`). Exits 1 if anything was left behind. Needs root, iproute2 and
//! virtiofsd (`$VIRTIOFSD`, see scripts/install-virtiofsd.sh).
//!
//! `cargo run --release -p kestrel-tests --bin bench_soak [-- --tiny N --devices N]`

use kestrel_tests::cli_arg;
use kestrel_tests::soak::{device_soak, tiny_soak, CountingAlloc, DEVICE_CYCLES, TINY_CYCLES};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn main() {
    let cycles = |name: &str, default: usize| {
        usize::try_from(cli_arg(name, default as u64)).expect("a cycle count")
    };
    let (tiny, devices) = (
        cycles("--tiny", TINY_CYCLES),
        cycles("--devices", DEVICE_CYCLES),
    );
    let mut clean = true;
    for (n, run) in [
        (
            tiny,
            tiny_soak as fn(usize) -> kestrel_tests::soak::SoakReport,
        ),
        (devices, device_soak),
    ] {
        if n == 0 {
            continue;
        }
        let r = run(n);
        println!("{}", r.table());
        clean &= r.problems().is_empty();
    }
    std::process::exit(if clean { 0 } else { 1 });
}
