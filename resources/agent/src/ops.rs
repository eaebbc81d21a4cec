//! The ops. Each takes its typed arguments and returns its typed result
//! (`kestrel-agent-proto`, docs/agent-protocol.md).

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Instant;

use kestrel_agent_proto::{
    b64, kind, AddEntropy, CpuOnline, CpuSets, Empty, Entropy, FileData, FileDigest, FileMode,
    GuestTime, MemInfo, Mount, OfflineMemory, OfflinedMemory, OnlineCpu, Pong, ProbeMemory,
    ProbedMemory, ReadFile, Request, SetTime, Sha256File, WriteFile,
};
use sha2::{Digest, Sha256};

use crate::exec;
use crate::proto::{reply, After, OpError, OpResult};

/// Largest payload of one read_file / write_file call (decoded bytes).
pub const MAX_DATA: u64 = 16 << 20;
/// Most memory blocks one probe_memory / offline_memory call handles (16 TiB of 128 MiB).
const MAX_BLOCKS: u64 = 1 << 17;
/// Largest add_entropy payload.
const MAX_ENTROPY: u32 = 1 << 20;

const SYS_CPU: &str = "/sys/devices/system/cpu";
const SYS_MEM: &str = "/sys/devices/system/memory";

/// Run request `id`; returns its response line and what the connection does after sending it.
pub fn run(id: u64, request: Request) -> (Vec<u8>, Option<After>) {
    let line = match request {
        Request::Ping(_) => reply(
            id,
            Ok(Pong {
                pong: true,
                version: env!("CARGO_PKG_VERSION").to_string(),
            }),
        ),
        Request::Exec(a) => reply(id, exec::exec(a)),
        Request::ReadFile(a) => reply(id, read_file(a)),
        Request::WriteFile(a) => reply(id, write_file(a)),
        Request::Sha256File(a) => reply(id, sha256_file(a)),
        Request::SyncCaches(_) => {
            // SAFETY: sync(2) has no arguments and cannot fail.
            unsafe { libc::sync() };
            reply(id, Ok(Empty))
        }
        Request::Mount(a) => reply(id, mount(a)),
        Request::StreamSink(a) => reply(id, crate::stream::sink(a)),
        Request::StreamSource(a) => reply(id, crate::stream::source(a)),
        Request::IoBench(a) => reply(id, crate::iobench::io_bench(a)),
        Request::MetaBench(a) => reply(id, crate::iobench::meta_bench(a)),
        Request::AllocTouch(a) => reply(id, crate::iobench::alloc_touch(a)),
        Request::OnlineCpu(a) => reply(id, online_cpu(a)),
        Request::ProbeMemory(a) => reply(id, probe_memory(a)),
        Request::OfflineMemory(a) => reply(id, offline_memory(a)),
        Request::SetTime(a) => reply(id, set_time(a)),
        Request::GetTime(_) => reply(id, get_time()),
        Request::AddEntropy(a) => reply(id, add_entropy(a)),
        Request::Meminfo(_) => reply(id, meminfo()),
        Request::Cpus(_) => reply(id, cpus()),
        Request::Shutdown(s) => {
            let after = After::Shutdown { reboot: s.reboot };
            return (reply(id, Ok(Empty)), Some(after));
        }
    };
    (line, None)
}

/// Lowercase hex SHA-256 and count of the bytes `r` yields until EOF, read `buf_len` at a time.
pub fn hash_to_eof(mut r: impl Read, buf_len: usize) -> io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; buf_len];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok((hex(&h.finalize()), total)),
            Ok(n) => {
                h.update(&buf[..n]);
                total += len_u64(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Lowercase hex of a digest.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_trim(path: &str) -> OpResult<String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| OpError::os(format!("read {path}"), e))
}

/// Write a sysfs attribute in one write(2); never creates the file.
fn write_attr(path: &str, value: &str) -> OpResult<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| OpError::os(format!("open {path}"), e))?;
    f.write_all(value.as_bytes())
        .map_err(|e| OpError::os(format!("write {value:?} to {path}"), e))
}

fn open_at(path: &str, offset: u64) -> OpResult<(File, u64)> {
    let mut f = File::open(path).map_err(|e| OpError::os(format!("open {path}"), e))?;
    let size = f
        .metadata()
        .map_err(|e| OpError::os(format!("stat {path}"), e))?
        .len();
    if offset > 0 {
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| OpError::os(format!("seek {path} to {offset}"), e))?;
    }
    Ok((f, size))
}

fn read_file(a: ReadFile) -> OpResult<FileData> {
    if a.len.is_some_and(|l| l > MAX_DATA) {
        return Err(OpError::new(
            kind::TOO_LARGE,
            format!("read_file: len is over the {MAX_DATA}-byte limit of one call"),
        ));
    }
    let (f, size) = open_at(&a.path, a.offset)?;
    // Read to EOF (not to st_size: /proc and /sys files report 0).
    let limit = a.len.unwrap_or(MAX_DATA + 1);
    let mut data = Vec::new();
    f.take(limit)
        .read_to_end(&mut data)
        .map_err(|e| OpError::os(format!("read {}", a.path), e))?;
    let len = len_u64(data.len());
    if a.len.is_none() && len > MAX_DATA {
        return Err(OpError::new(
            kind::TOO_LARGE,
            format!(
                "read_file: {} has more than {MAX_DATA} bytes from offset {}; read it in ranges (offset, len)",
                a.path, a.offset
            ),
        ));
    }
    let eof = a.len.is_none_or(|l| len < l);
    Ok(FileData {
        data_b64: b64::encode(&data),
        sha256: hex(&Sha256::digest(&data)),
        len,
        size,
        eof,
    })
}

/// A byte count in memory as the protocol's u64 (usize is at most 64 bits on x86_64).
pub fn len_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Milliseconds since `t0`.
pub fn millis(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Nanoseconds since `t0`, at least 1 (a rate's divisor).
pub fn nanos(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_nanos().max(1)).unwrap_or(u64::MAX)
}

/// The mode bits of a `write_file` mode; refuses what is not an octal mode.
fn mode_bits(mode: &FileMode) -> OpResult<u32> {
    let m = match mode {
        FileMode::Bits(m) => *m,
        FileMode::Octal(s) => {
            let t = s.strip_prefix("0o").unwrap_or(s);
            u32::from_str_radix(t, 8)
                .map_err(|_| OpError::bad_request(format!("mode {s:?} is not an octal number")))?
        }
    };
    if m > 0o7777 {
        return Err(OpError::bad_request(format!(
            "mode {m:#o} has bits beyond 0o7777"
        )));
    }
    Ok(m)
}

fn write_file(a: WriteFile) -> OpResult<FileDigest> {
    let data = b64::decode(&a.data_b64)
        .map_err(|e| OpError::bad_request(format!("write_file: data_b64: {e}")))?;
    let len = len_u64(data.len());
    if len > MAX_DATA {
        return Err(OpError::new(
            kind::TOO_LARGE,
            format!("write_file: more than {MAX_DATA} bytes in one call; append in chunks"),
        ));
    }
    let mode = a.mode.as_ref().map(mode_bits).transpose()?;
    let mut o = OpenOptions::new();
    o.create(true).mode(mode.unwrap_or(0o644));
    if a.append {
        o.append(true);
    } else {
        o.write(true).truncate(true);
    }
    let path = &a.path;
    let mut f = o
        .open(path)
        .map_err(|e| OpError::os(format!("open {path}"), e))?;
    if let Some(m) = mode {
        // Exact mode, whatever the umask and whether the file existed.
        f.set_permissions(fs::Permissions::from_mode(m))
            .map_err(|e| OpError::os(format!("chmod {path}"), e))?;
    }
    f.write_all(&data)
        .map_err(|e| OpError::os(format!("write {path}"), e))?;
    let size = f
        .metadata()
        .map_err(|e| OpError::os(format!("stat {path}"), e))?
        .len();
    Ok(FileDigest {
        sha256: hex(&Sha256::digest(&data)),
        len,
        size,
    })
}

fn sha256_file(a: Sha256File) -> OpResult<FileDigest> {
    let (f, size) = open_at(&a.path, a.offset)?;
    let r = f.take(a.len.unwrap_or(u64::MAX));
    let (sha256, len) =
        hash_to_eof(r, 1 << 20).map_err(|e| OpError::os(format!("read {}", a.path), e))?;
    Ok(FileDigest { sha256, len, size })
}

fn mount_flag(name: &str) -> OpResult<libc::c_ulong> {
    Ok(match name {
        "ro" | "rdonly" => libc::MS_RDONLY,
        "rw" => 0,
        "nosuid" => libc::MS_NOSUID,
        "nodev" => libc::MS_NODEV,
        "noexec" => libc::MS_NOEXEC,
        "sync" => libc::MS_SYNCHRONOUS,
        "dirsync" => libc::MS_DIRSYNC,
        "remount" => libc::MS_REMOUNT,
        "noatime" => libc::MS_NOATIME,
        "nodiratime" => libc::MS_NODIRATIME,
        "relatime" => libc::MS_RELATIME,
        "strictatime" => libc::MS_STRICTATIME,
        "lazytime" => libc::MS_LAZYTIME,
        "silent" => libc::MS_SILENT,
        "bind" => libc::MS_BIND,
        "rbind" => libc::MS_BIND | libc::MS_REC,
        "rec" => libc::MS_REC,
        "move" => libc::MS_MOVE,
        "private" => libc::MS_PRIVATE,
        "rprivate" => libc::MS_PRIVATE | libc::MS_REC,
        "shared" => libc::MS_SHARED,
        "rshared" => libc::MS_SHARED | libc::MS_REC,
        "slave" => libc::MS_SLAVE,
        "rslave" => libc::MS_SLAVE | libc::MS_REC,
        "unbindable" => libc::MS_UNBINDABLE,
        _ => {
            return Err(OpError::bad_request(format!(
                "mount: unknown flag {name:?}"
            )))
        }
    })
}

fn cstring(what: &str, s: &str) -> OpResult<CString> {
    CString::new(s).map_err(|_| OpError::bad_request(format!("{what} contains a NUL byte")))
}

fn mount(a: Mount) -> OpResult<Empty> {
    let mut flags = 0;
    for f in &a.flags {
        flags |= mount_flag(f)?;
    }
    let source = cstring("source", &a.source)?;
    let target = cstring("target", &a.target)?;
    let fstype = cstring("fstype", &a.fstype)?;
    let options = a
        .options
        .as_deref()
        .map(|o| cstring("options", o))
        .transpose()?;
    fs::create_dir_all(&a.target).map_err(|e| OpError::os(format!("mkdir -p {}", a.target), e))?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call, or null.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            if a.fstype.is_empty() {
                std::ptr::null()
            } else {
                fstype.as_ptr()
            },
            flags,
            options
                .as_ref()
                .map_or(std::ptr::null(), |o| o.as_ptr().cast()),
        )
    };
    if r != 0 {
        return Err(OpError::last_os(format!(
            "mount {} on {} (type {:?})",
            a.source, a.target, a.fstype
        )));
    }
    Ok(Empty)
}

fn online_cpu(a: OnlineCpu) -> OpResult<CpuOnline> {
    write_attr(
        &format!("{SYS_CPU}/cpu{}/online", a.cpu),
        if a.online { "1" } else { "0" },
    )?;
    Ok(CpuOnline {
        online: read_trim(&format!("{SYS_CPU}/online"))?,
    })
}

fn cpus() -> OpResult<CpuSets> {
    Ok(CpuSets {
        online: read_trim(&format!("{SYS_CPU}/online"))?,
        possible: read_trim(&format!("{SYS_CPU}/possible"))?,
        present: read_trim(&format!("{SYS_CPU}/present"))?,
    })
}

fn meminfo() -> OpResult<MemInfo> {
    let text = read_trim("/proc/meminfo")?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    let missing = |name| OpError::new(kind::FAILED, format!("no {name} in /proc/meminfo"));
    Ok(MemInfo {
        mem_total_kb: field("MemTotal").ok_or_else(|| missing("MemTotal"))?,
        mem_free_kb: field("MemFree").ok_or_else(|| missing("MemFree"))?,
        mem_available_kb: field("MemAvailable"),
    })
}

/// Memory block ids covering [addr, addr + size), and the block size.
fn blocks_of(op: &str, addr: u64, size: u64) -> OpResult<(Vec<u64>, u64)> {
    let bs_text = read_trim(&format!("{SYS_MEM}/block_size_bytes"))?;
    let bs = u64::from_str_radix(&bs_text, 16)
        .ok()
        .filter(|b| *b > 0)
        .ok_or_else(|| OpError::new(kind::FAILED, format!("bad block_size_bytes {bs_text:?}")))?;
    let end = addr.checked_add(size);
    if size == 0 || !addr.is_multiple_of(bs) || !size.is_multiple_of(bs) || end.is_none() {
        return Err(OpError::bad_request(format!(
            "{op}: addr {addr:#x} and size {size:#x} must be non-zero multiples of the memory block size {bs:#x}"
        )));
    }
    let end = end.unwrap_or(addr);
    if size / bs > MAX_BLOCKS {
        return Err(OpError::bad_request(format!(
            "{op}: size {size:#x} is more than {MAX_BLOCKS} memory blocks"
        )));
    }
    Ok(((addr / bs..end / bs).collect(), bs))
}

fn block_state(id: u64) -> OpResult<String> {
    read_trim(&format!("{SYS_MEM}/memory{id}/state"))
}

fn probe_memory(a: ProbeMemory) -> OpResult<ProbedMemory> {
    let online_type = a.online_type.unwrap_or_default().as_str();
    let (ids, bs) = blocks_of("probe_memory", a.addr, a.size)?;
    let mut probed = Vec::new();
    for &id in &ids {
        // A block that is already known (e.g. offlined earlier: probed memory cannot be
        // removed) is only onlined again; probing it twice would fail with EEXIST.
        if !Path::new(&format!("{SYS_MEM}/memory{id}")).exists() {
            write_attr(&format!("{SYS_MEM}/probe"), &format!("{:#x}", id * bs))?;
            probed.push(id);
        }
    }
    for &id in &ids {
        // The kernel may have onlined it already (auto_online_blocks).
        if block_state(id)? == "offline" {
            write_attr(&format!("{SYS_MEM}/memory{id}/state"), online_type)?;
        }
    }
    Ok(ProbedMemory {
        blocks: ids,
        probed,
        block_size: bs,
        mem_total_kb: meminfo()?.mem_total_kb,
    })
}

fn offline_memory(a: OfflineMemory) -> OpResult<OfflinedMemory> {
    let (ids, bs) = blocks_of("offline_memory", a.addr, a.size)?;
    for &id in ids.iter().rev() {
        if block_state(id)? != "offline" {
            write_attr(&format!("{SYS_MEM}/memory{id}/state"), "offline")?;
        }
    }
    // Linux 6.12 has no user-space interface that removes probed memory (only ACPI eject,
    // virtio-mem and dax/kmem call remove_memory()); the blocks stay, offline.
    Ok(OfflinedMemory {
        blocks: ids,
        block_size: bs,
        mem_total_kb: meminfo()?.mem_total_kb,
        removed: false,
    })
}

fn get_time() -> OpResult<GuestTime> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| OpError::bad_request("get_time: the clock is before 1970"))?;
    Ok(GuestTime {
        unix_ns: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
    })
}

fn set_time(a: SetTime) -> OpResult<Empty> {
    // u64::MAX ns is ~1.8e10 s and the remainder is below 1e9: both fit.
    let (Ok(tv_sec), Ok(tv_nsec)) = (
        libc::time_t::try_from(a.unix_ns / 1_000_000_000),
        libc::c_long::try_from(a.unix_ns % 1_000_000_000),
    ) else {
        return Err(OpError::bad_request("set_time: unix_ns out of range"));
    };
    let ts = libc::timespec { tv_sec, tv_nsec };
    // SAFETY: ts is a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(OpError::last_os("clock_settime(CLOCK_REALTIME)"));
    }
    Ok(Empty)
}

/// _IOW('R', 0x03, int[2]) from <linux/random.h>.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// _IO('R', 0x07) from <linux/random.h>.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

fn add_entropy(a: AddEntropy) -> OpResult<Entropy> {
    let data = b64::decode(&a.data_b64)
        .map_err(|e| OpError::bad_request(format!("add_entropy: data_b64: {e}")))?;
    let len = u32::try_from(data.len())
        .ok()
        .filter(|&n| n <= MAX_ENTROPY)
        .ok_or_else(|| {
            OpError::new(
                kind::TOO_LARGE,
                format!("add_entropy: more than {MAX_ENTROPY} bytes"),
            )
        })?;
    let max_bits = len * 8;
    let bits = a.credit_bits.unwrap_or(max_bits).min(max_bits);
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, 4-byte aligned.
    let mut words = vec![0u32; 2 + data.len().div_ceil(4)];
    words[0] = bits;
    words[1] = len;
    for (w, chunk) in words[2..].iter_mut().zip(data.chunks(4)) {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u32::from_ne_bytes(b); // keeps the bytes in memory order
    }
    let f = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| OpError::os("open /dev/urandom", e))?;
    // SAFETY: words is a valid rand_pool_info of the size it declares.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, words.as_ptr()) } != 0 {
        return Err(OpError::last_os("ioctl(RNDADDENTROPY) on /dev/urandom"));
    }
    // Since Linux 5.18, crediting reseeds the CRNG only until it is initialised; after that it
    // reseeds on a timer, and a VM cloned from a snapshot would read its template's stream
    // until then. Reseed now (ENODATA: not initialised yet, crediting reseeds when it is).
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENODATA) {
            return Err(OpError::os("ioctl(RNDRESEEDCRNG) on /dev/urandom", e));
        }
    }
    Ok(Entropy {
        credited_bits: bits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_the_protocol_lines() {
        let (line, after) = run(3, kestrel_agent_proto::Ping {}.into());
        let want = format!(
            r#"{{"id":3,"ok":{{"pong":true,"version":"{}"}}}}"#,
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(
            (String::from_utf8(line).unwrap(), after.is_none()),
            (want, true)
        );
        let (line, after) = run(4, kestrel_agent_proto::Shutdown { reboot: true }.into());
        assert_eq!(line, br#"{"id":4,"ok":{}}"#);
        assert!(matches!(after, Some(After::Shutdown { reboot: true })));
        let missing = ReadFile {
            path: "/nonexistent/x".into(),
            ..ReadFile::default()
        };
        let (line, _) = run(5, missing.into());
        let text = String::from_utf8(line).unwrap();
        assert!(
            text.starts_with(r#"{"id":5,"error":{"kind":"os","message":"open /nonexistent/x: "#)
                && text.ends_with(r#","errno":2}}"#),
            "{text}"
        );
    }

    #[test]
    fn hashes_to_eof_and_reads_modes() {
        let (sha, len) = hash_to_eof(&b"abc"[..], 2).unwrap();
        assert_eq!(
            (sha.as_str(), len),
            (
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                3
            )
        );
        assert_eq!(mode_bits(&FileMode::Bits(0o644)).unwrap(), 0o644);
        assert_eq!(mode_bits(&FileMode::Octal("0o755".into())).unwrap(), 0o755);
        assert_eq!(mode_bits(&FileMode::Octal("600".into())).unwrap(), 0o600);
        assert!(mode_bits(&FileMode::Octal("9".into())).is_err());
        assert!(mode_bits(&FileMode::Bits(0o10000)).is_err());
    }
}
