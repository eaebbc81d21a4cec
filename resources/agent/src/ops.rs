//! The ops. Each takes its JSON args and returns a JSON result (see docs/agent-protocol.md).

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::b64;
use crate::exec;
use crate::proto::{args, After, OpError, OpResult};

/// Largest payload of one read_file / write_file call (decoded bytes).
pub const MAX_DATA: u64 = 16 << 20;
/// Most memory blocks one probe_memory / offline_memory call handles (16 TiB of 128 MiB).
const MAX_BLOCKS: u64 = 1 << 17;
/// Largest add_entropy payload.
const MAX_ENTROPY: usize = 1 << 20;

const SYS_CPU: &str = "/sys/devices/system/cpu";
const SYS_MEM: &str = "/sys/devices/system/memory";

pub fn dispatch(op: &str, a: Value) -> OpResult<(Value, Option<After>)> {
    let v = match op {
        "ping" => json!({"pong": true, "version": env!("CARGO_PKG_VERSION")}),
        "exec" => exec::exec(args(op, a)?)?,
        "read_file" => read_file(args(op, a)?)?,
        "write_file" => write_file(args(op, a)?)?,
        "sha256_file" => sha256_file(args(op, a)?)?,
        "sync" => {
            let NoArgs {} = args(op, a)?;
            // SAFETY: sync(2) has no arguments and cannot fail.
            unsafe { libc::sync() };
            json!({})
        }
        "mount" => mount(args(op, a)?)?,
        "stream_sink" => crate::stream::sink(args(op, a)?)?,
        "stream_source" => crate::stream::source(args(op, a)?)?,
        "io_bench" => crate::iobench::io_bench(args(op, a)?)?,
        "meta_bench" => crate::iobench::meta_bench(args(op, a)?)?,
        "alloc_touch" => crate::iobench::alloc_touch(args(op, a)?)?,
        "online_cpu" => online_cpu(args(op, a)?)?,
        "probe_memory" => probe_memory(args(op, a)?)?,
        "offline_memory" => offline_memory(args(op, a)?)?,
        "set_time" => set_time(args(op, a)?)?,
        "add_entropy" => add_entropy(args(op, a)?)?,
        "meminfo" => {
            let NoArgs {} = args(op, a)?;
            meminfo()?
        }
        "cpus" => {
            let NoArgs {} = args(op, a)?;
            json!({
                "online": read_trim(&format!("{SYS_CPU}/online"))?,
                "possible": read_trim(&format!("{SYS_CPU}/possible"))?,
                "present": read_trim(&format!("{SYS_CPU}/present"))?,
            })
        }
        "shutdown" => {
            let s: Shutdown = args(op, a)?;
            return Ok((json!({}), Some(After::Shutdown { reboot: s.reboot })));
        }
        _ => return Err(OpError::new("unsupported", format!("unknown op {op:?}"))),
    };
    Ok((v, None))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Shutdown {
    #[serde(default)]
    reboot: bool,
}

fn hex(digest: &[u8]) -> String {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadArgs {
    path: String,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    len: Option<u64>,
}

fn read_file(a: ReadArgs) -> OpResult<Value> {
    if a.len.is_some_and(|l| l > MAX_DATA) {
        return Err(OpError::new(
            "too_large",
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
    if a.len.is_none() && data.len() as u64 > MAX_DATA {
        return Err(OpError::new(
            "too_large",
            format!(
                "read_file: {} has more than {MAX_DATA} bytes from offset {}; read it in ranges (offset, len)",
                a.path, a.offset
            ),
        ));
    }
    let eof = a.len.is_none_or(|l| (data.len() as u64) < l);
    Ok(json!({
        "data_b64": b64::encode(&data),
        "sha256": hex(&Sha256::digest(&data)),
        "len": data.len(),
        "size": size,
        "eof": eof,
    }))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Mode {
    Num(u32),
    Text(String),
}

impl Mode {
    fn bits(&self) -> OpResult<u32> {
        let m = match self {
            Mode::Num(m) => *m,
            Mode::Text(s) => {
                let t = s.strip_prefix("0o").unwrap_or(s);
                u32::from_str_radix(t, 8).map_err(|_| {
                    OpError::bad_request(format!("mode {s:?} is not an octal number"))
                })?
            }
        };
        if m > 0o7777 {
            return Err(OpError::bad_request(format!(
                "mode {m:#o} has bits beyond 0o7777"
            )));
        }
        Ok(m)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteArgs {
    path: String,
    data_b64: String,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    append: bool,
}

fn write_file(a: WriteArgs) -> OpResult<Value> {
    let data = b64::decode(&a.data_b64)
        .map_err(|e| OpError::bad_request(format!("write_file: data_b64: {e}")))?;
    if data.len() as u64 > MAX_DATA {
        return Err(OpError::new(
            "too_large",
            format!("write_file: more than {MAX_DATA} bytes in one call; append in chunks"),
        ));
    }
    let mode = a.mode.as_ref().map(Mode::bits).transpose()?;
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
    Ok(json!({"sha256": hex(&Sha256::digest(&data)), "len": data.len(), "size": size}))
}

fn sha256_file(a: ReadArgs) -> OpResult<Value> {
    let (f, size) = open_at(&a.path, a.offset)?;
    let mut r = f.take(a.len.unwrap_or(u64::MAX));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(OpError::os(format!("read {}", a.path), e)),
        }
    }
    Ok(json!({"sha256": hex(&h.finalize()), "len": total, "size": size}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MountArgs {
    source: String,
    target: String,
    #[serde(default)]
    fstype: String,
    #[serde(default)]
    options: Option<String>,
    #[serde(default)]
    flags: Vec<String>,
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

fn mount(a: MountArgs) -> OpResult<Value> {
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
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OnlineCpu {
    cpu: u32,
    online: bool,
}

fn online_cpu(a: OnlineCpu) -> OpResult<Value> {
    write_attr(
        &format!("{SYS_CPU}/cpu{}/online", a.cpu),
        if a.online { "1" } else { "0" },
    )?;
    Ok(json!({"online": read_trim(&format!("{SYS_CPU}/online"))?}))
}

fn meminfo_kb() -> OpResult<(u64, u64, Option<u64>)> {
    let text = read_trim("/proc/meminfo")?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    let total =
        field("MemTotal").ok_or_else(|| OpError::new("failed", "no MemTotal in /proc/meminfo"))?;
    let free =
        field("MemFree").ok_or_else(|| OpError::new("failed", "no MemFree in /proc/meminfo"))?;
    Ok((total, free, field("MemAvailable")))
}

fn meminfo() -> OpResult<Value> {
    let (total, free, avail) = meminfo_kb()?;
    Ok(json!({"mem_total_kb": total, "mem_free_kb": free, "mem_available_kb": avail}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemRange {
    addr: u64,
    size: u64,
    /// probe_memory only: "online_movable" (default), "online_kernel" or "online".
    #[serde(default)]
    online_type: Option<String>,
}

/// Memory block ids covering [addr, addr + size), and the block size.
fn blocks_of(op: &str, addr: u64, size: u64) -> OpResult<(Vec<u64>, u64)> {
    let bs_text = read_trim(&format!("{SYS_MEM}/block_size_bytes"))?;
    let bs = u64::from_str_radix(&bs_text, 16)
        .ok()
        .filter(|b| *b > 0)
        .ok_or_else(|| OpError::new("failed", format!("bad block_size_bytes {bs_text:?}")))?;
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

fn probe_memory(a: MemRange) -> OpResult<Value> {
    let online_type = a.online_type.as_deref().unwrap_or("online_movable");
    if !matches!(online_type, "online_movable" | "online_kernel" | "online") {
        return Err(OpError::bad_request(format!(
            "probe_memory: online_type {online_type:?} is not online_movable, online_kernel or online"
        )));
    }
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
    let (total, _, _) = meminfo_kb()?;
    Ok(json!({"blocks": ids, "probed": probed, "block_size": bs, "mem_total_kb": total}))
}

fn offline_memory(a: MemRange) -> OpResult<Value> {
    if a.online_type.is_some() {
        return Err(OpError::bad_request(
            "offline_memory: online_type is not an argument",
        ));
    }
    let (ids, bs) = blocks_of("offline_memory", a.addr, a.size)?;
    for &id in ids.iter().rev() {
        if block_state(id)? != "offline" {
            write_attr(&format!("{SYS_MEM}/memory{id}/state"), "offline")?;
        }
    }
    let (total, _, _) = meminfo_kb()?;
    // Linux 6.12 has no user-space interface that removes probed memory (only ACPI eject,
    // virtio-mem and dax/kmem call remove_memory()); the blocks stay, offline.
    Ok(json!({"blocks": ids, "block_size": bs, "mem_total_kb": total, "removed": false}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetTime {
    unix_ns: u64,
}

fn set_time(a: SetTime) -> OpResult<Value> {
    let ts = libc::timespec {
        tv_sec: (a.unix_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (a.unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: ts is a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(OpError::last_os("clock_settime(CLOCK_REALTIME)"));
    }
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddEntropy {
    data_b64: String,
    /// Bits to credit; default and maximum: 8 per byte.
    #[serde(default)]
    credit_bits: Option<u32>,
}

/// _IOW('R', 0x03, int[2]) from <linux/random.h>.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

fn add_entropy(a: AddEntropy) -> OpResult<Value> {
    let data = b64::decode(&a.data_b64)
        .map_err(|e| OpError::bad_request(format!("add_entropy: data_b64: {e}")))?;
    if data.len() > MAX_ENTROPY {
        return Err(OpError::new(
            "too_large",
            format!("add_entropy: more than {MAX_ENTROPY} bytes"),
        ));
    }
    let max_bits = (data.len() * 8) as u32;
    let bits = a.credit_bits.unwrap_or(max_bits).min(max_bits);
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, 4-byte aligned.
    let mut words = vec![0u32; 2 + data.len().div_ceil(4)];
    words[0] = bits;
    words[1] = data.len() as u32;
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
    Ok(json!({"credited_bits": bits}))
}
