#!/usr/bin/env bash
# API socket benchmark: process start -> the API socket answering `GET /` (200), and the idle
# RSS of `kestrel --api-sock` before InstanceStart. Prints a markdown table next to
# Firecracker's figures from issue 11 (1.68 ms median, 3.8 MiB idle); with
# FIRECRACKER=/path/to/firecracker it also measures that binary the same way, its runs
# interleaved with Kestrel's.
#
# Each run: fork+exec the binary with a fresh socket path, then connect and send `GET /` in a
# loop until a 200 comes back (the time from just before the exec to the answer), then 200 ms
# idle and VmRSS from /proc. RUNS (default 30) runs; min, median and max are shown.
source "$(dirname "$0")/../scripts/common.sh"
cd "$ROOT"
cargo build --release --quiet -p kestrel --bin kestrel
RUNS="${RUNS:-30}"
FC_CMD=()
if [ -n "${FIRECRACKER:-}" ]; then
    FC_CMD=("$FIRECRACKER" --no-seccomp)
fi

python3 - "$RUNS" "$ROOT/target/release/kestrel" "${FC_CMD[@]}" <<'EOF'
import os, socket, statistics, subprocess, sys, tempfile, time

runs = int(sys.argv[1])
kestrel = [sys.argv[2]]
firecracker = sys.argv[3:]

def measure(cmd):
    """(ms from exec to a 200 answer to GET /, idle VmRSS in KiB)."""
    d = tempfile.mkdtemp(prefix="kestrel-bench-api-")
    sock = os.path.join(d, "api.sock")
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd + ["--api-sock", sock], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answered = None
    deadline = t0 + 10
    while answered is None and time.perf_counter() < deadline:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sock)
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            if s.recv(64).startswith(b"HTTP/1.1 200"):
                answered = time.perf_counter()
            s.close()
        except OSError:
            time.sleep(0.00005)
    time.sleep(0.2)
    rss = 0
    with open(f"/proc/{p.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    p.kill()
    p.wait()
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)
    if answered is None:
        sys.exit(f"{cmd[0]}: the API socket never answered")
    return (answered - t0) * 1000, rss

def series(cmds):
    """Runs of every command in turn (A B A B ...), so a drift of the machine hits all."""
    for c in cmds:
        measure(c)  # warm-up: page cache
    results = [([], []) for _ in cmds]
    for _ in range(runs):
        for c, (ms, rss) in zip(cmds, results):
            m, r = measure(c)
            ms.append(m)
            rss.append(r)
    return results

def row(name, ms, rss):
    return (f"| {name} | {statistics.median(ms):.2f} ms ({min(ms):.2f} to {max(ms):.2f}) "
            f"| {statistics.median(rss) / 1024:.1f} MiB ({min(rss) / 1024:.1f} to "
            f"{max(rss) / 1024:.1f}) |")

print(f"API socket: exec -> `GET /` answered, and idle RSS before InstanceStart ({runs} runs;"
      " median (min to max))\n")
print("| binary | start -> API answering | idle RSS |")
print("|---|---|---|")
cmds = [kestrel] + ([firecracker] if firecracker else [])
results = series(cmds)
print(row("kestrel --api-sock (release)", *results[0]))
if firecracker:
    print(row(f"{os.path.basename(firecracker[0])} --api-sock (measured here, same runs)",
              *results[1]))
print("| Firecracker (issue 11's figures) | 1.68 ms (median) | 3.8 MiB |")
EOF
