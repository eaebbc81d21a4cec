//! Linux TAP devices: the host side of virtio-net.
//!
//! A [`Tap`] is a non-blocking file descriptor on `/dev/net/tun` attached to one TAP interface
//! with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: every read returns one Ethernet frame and every
//! write sends one, each preceded by a virtio-net header whose size is set with
//! [`Tap::set_vnet_hdr_size`] (12 bytes for `virtio_net_hdr_v1`, the header of virtio 1.x
//! devices). [`Tap::set_offload`] tells the kernel which offloads (partial checksums, TSO) the
//! reader of the descriptor accepts; without them the kernel hands over complete, checksummed
//! frames.
//!
//! [`Tap::open`] attaches to an existing interface; [`Tap::create`] also creates it when it is
//! missing. A TAP created here is not persistent: it disappears when the descriptor closes (and
//! if something made it persistent meanwhile, dropping the [`Tap`] clears that again). An
//! interface that existed before is left as it was.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;
use vm_memory::VolatileSlice;

/// The clone device TAPs are opened through.
pub const TUN_DEVICE: &str = "/dev/net/tun";
/// Size of `virtio_net_hdr_v1` (with `num_buffers`), the header of virtio 1.x devices.
pub const VNET_HDR_LEN_V1: usize = 12;
/// Most buffers one `readv`/`writev` takes (`IOV_MAX`).
pub const MAX_IOVECS: usize = 1024;

/// `ifr_flags` of TUNSETIFF: a TAP without packet information, with the virtio-net header.
#[allow(clippy::cast_possible_truncation)] // 0x5002: the kernel's `ifr_flags` is a short.
const TAP_FLAGS: libc::c_short =
    (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;

/// `n` iovecs as the count `readv`/`writev` take; `EINVAL` above [`MAX_IOVECS`].
fn iov_count(n: usize) -> io::Result<libc::c_int> {
    libc::c_int::try_from(n)
        .ok()
        .filter(|_| n <= MAX_IOVECS)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `TUNSETOFFLOAD` flags.
pub mod offload {
    /// The reader accepts frames with a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    /// The reader accepts TCPv4 segmentation offload frames (needs [`CSUM`]).
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    /// The reader accepts TCPv6 segmentation offload frames (needs [`CSUM`]).
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    /// The reader accepts TSO frames with ECN (needs [`TSO4`] or [`TSO6`]).
    pub const TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
    /// The reader accepts UDP fragmentation offload frames (needs [`CSUM`]).
    pub const UFO: u32 = libc::TUN_F_UFO;
}

/// Errors opening or configuring a TAP device.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name cannot be a Linux interface name.
    #[error("invalid TAP name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open {TUN_DEVICE}: {0}")]
    OpenTun(#[source] io::Error),
    /// [`Tap::open`] on an interface that does not exist.
    #[error("TAP device {0} does not exist (create it, or let Kestrel create it)")]
    NotFound(String),
    /// `TUNSETIFF` failed: the interface is not a TAP (a TUN or another kind), is in use by
    /// another process (`EBUSY`), or is not ours to use (`EPERM`).
    #[error("cannot attach to TAP device {name}: {source}")]
    Attach {
        /// The interface.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Another `ioctl` on the TAP failed.
    #[error("{op} on TAP device {name} failed: {source}")]
    Ioctl {
        /// The interface.
        name: String,
        /// The request (`TUNSETVNETHDRSZ`, `TUNSETOFFLOAD`, ...).
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as `TUNSETIFF` uses it: the name and the flags (the rest of the union is
/// padding; 40 bytes in all on 64-bit Linux).
#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP device. See the module documentation.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    created: bool,
}

/// Whether interface `name` exists (in this thread's network namespace).
fn interface_exists(name: &CString) -> bool {
    // SAFETY: `name` is a valid NUL-terminated string; if_nametoindex only reads it.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

impl Tap {
    /// Attach to the existing TAP interface `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        Self::attach(name, false)
    }

    /// Attach to TAP interface `name`, creating it when it does not exist. [`Tap::created`]
    /// tells which happened.
    pub fn create(name: &str) -> Result<Tap, TapError> {
        Self::attach(name, true)
    }

    fn attach(name: &str, create: bool) -> Result<Tap, TapError> {
        let invalid = |reason: String| TapError::InvalidName {
            name: name.to_string(),
            reason,
        };
        kestrel_api::check_interface_name(name).map_err(invalid)?;
        let cname = CString::new(name).map_err(|_| invalid("contains NUL".into()))?;
        let existed = interface_exists(&cname);
        if !existed && !create {
            return Err(TapError::NotFound(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(TapError::OpenTun)?;
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: TAP_FLAGS,
            _pad: [0; 22],
        };
        // At most 15 bytes (checked above), so the name stays NUL-terminated.
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = libc::c_char::from_ne_bytes([s]);
        }
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` has its layout and size
        // and lives across the call; the descriptor is ours.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
            created: !existed,
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this `Tap` created the interface (it goes away with the descriptor).
    pub fn created(&self) -> bool {
        self.created
    }

    fn ioctl_int(&self, req: libc::Ioctl, val: libc::c_int) -> io::Result<()> {
        // SAFETY: these TUN requests read one `int` through the pointer; `val` lives across the
        // call and the descriptor is ours.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), req, &val) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn ioctl_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> TapError + '_ {
        move |source| TapError::Ioctl {
            name: self.name.clone(),
            op,
            source,
        }
    }

    /// Size of the virtio-net header in front of every frame (`TUNSETVNETHDRSZ`; the kernel's
    /// default is 10, the legacy header without `num_buffers`).
    pub fn set_vnet_hdr_size(&self, size: usize) -> Result<(), TapError> {
        let op = "TUNSETVNETHDRSZ";
        let val = libc::c_int::try_from(size).map_err(|_| TapError::Ioctl {
            name: self.name.clone(),
            op,
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        self.ioctl_int(libc::TUNSETVNETHDRSZ, val)
            .map_err(self.ioctl_err(op))
    }

    /// Offloads the reader accepts (`TUNSETOFFLOAD`, [`offload`] flags; 0 for none).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        let op = "TUNSETOFFLOAD";
        // SAFETY: TUNSETOFFLOAD takes its argument by value, not through a pointer; the
        // descriptor is ours.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(self.ioctl_err(op)(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Make the interface outlive the descriptor (`TUNSETPERSIST`), or not.
    pub fn set_persistent(&self, persistent: bool) -> Result<(), TapError> {
        let op = "TUNSETPERSIST";
        // SAFETY: TUNSETPERSIST takes its argument by value; the descriptor is ours.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETPERSIST,
                libc::c_ulong::from(persistent),
            )
        };
        if r < 0 {
            return Err(self.ioctl_err(op)(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Read one frame (header included) into `buf`; `WouldBlock` when none is waiting. A
    /// frame longer than `buf` is truncated.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.readv(&mut [IoSliceMut::new(buf)])
    }

    /// Read one frame (header included), scattered over `bufs`.
    pub fn readv(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let n = iov_count(bufs.len().min(MAX_IOVECS))?;
        // SAFETY: `IoSliceMut` is ABI-compatible with `struct iovec` and each describes memory
        // we may write; readv writes at most their lengths, `n` of them, while they are
        // borrowed here.
        let r = unsafe {
            libc::readv(
                self.file.as_raw_fd(),
                bufs.as_mut_ptr().cast::<libc::iovec>(),
                n,
            )
        };
        crate::syscall_len(r)
    }

    /// Write one frame (header included), gathered from `bufs`.
    pub fn writev(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = iov_count(bufs.len())?;
        // SAFETY: `IoSlice` is ABI-compatible with `struct iovec` and each describes memory we
        // may read; writev only reads it, while it is borrowed here.
        let r = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                bufs.as_ptr().cast::<libc::iovec>(),
                n,
            )
        };
        crate::syscall_len(r)
    }

    /// Write one frame (header included) gathered straight from guest memory.
    pub fn write_volatile(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let n = iov_count(bufs.len())?;
        // The guards keep the memory mapped (they matter only for on-demand mappings) until
        // the call returns.
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard()).collect();
        let iovecs: Vec<libc::iovec> = guards
            .iter()
            .map(|g| libc::iovec {
                iov_base: g.as_ptr() as *mut libc::c_void,
                iov_len: g.len(),
            })
            .collect();
        // SAFETY: every iovec describes a live guest-memory slice (a `VolatileSlice` is valid
        // for its length while borrowed, and its guard is held); writev only reads them.
        // Concurrent guest writes may change the bytes sent, which is the guest's business.
        let r = unsafe { libc::writev(self.file.as_raw_fd(), iovecs.as_ptr(), n) };
        drop(guards);
        crate::syscall_len(r)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if self.created {
            // A TAP we created goes when its last descriptor closes, unless it was made
            // persistent meanwhile: undo that.
            if let Err(e) = self.set_persistent(false) {
                tracing::debug!("TAP {}: {e}", self.name);
            }
        }
    }
}

/// Helpers for tests that need a real TAP: unique names, a private network namespace, an
/// `AF_PACKET` socket on the interface (the "wire" side of the TAP).
#[cfg(test)]
pub(crate) mod test_util {
    use std::ffi::CString;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    static SEQ: AtomicUsize = AtomicUsize::new(0);

    /// Whether TAP tests can run; prints why not when they cannot.
    pub fn tun_available(test: &str) -> bool {
        if std::path::Path::new(super::TUN_DEVICE).exists() {
            true
        } else {
            eprintln!("{test}: skipped, {} is missing", super::TUN_DEVICE);
            false
        }
    }

    /// A fresh interface name: `kt<pid>x<n>` (at most 15 bytes).
    pub fn tap_name() -> String {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let name = format!("kt{}x{n}", std::process::id());
        assert!(name.len() <= 15, "{name}");
        name
    }

    /// Move the calling thread into a new network namespace with IPv6 off (no router
    /// solicitations or DAD frames on test interfaces). Everything in it disappears with the
    /// thread's last descriptor. Returns false when that is not possible (tests then run in
    /// the current namespace with their own names).
    pub fn private_netns() -> bool {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET affects only the calling thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "cannot create a network namespace ({}); using the current one",
                io::Error::last_os_error()
            );
            return false;
        }
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
        true
    }

    /// Run `ip <args>` in the calling thread's network namespace.
    pub fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Bring interface `name` up with IPv6 off.
    pub fn up(name: &str) {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        ip(&["link", "set", "dev", name, "up"]);
    }

    /// Whether interface `name` exists.
    pub fn exists(name: &str) -> bool {
        super::interface_exists(&CString::new(name).unwrap())
    }

    /// Whether `name` is gone within 5 s: the kernel unregisters a closed TAP promptly, but a
    /// packet socket that was bound to it can hold the device for an RCU grace period.
    pub fn gone(name: &str) -> bool {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while exists(name) {
            if std::time::Instant::now() > end {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        true
    }

    /// A raw `AF_PACKET` socket bound to an interface: `send` puts a frame on the interface
    /// (the TAP's reader gets it), `recv` gets frames the TAP's writer sent.
    pub struct PacketSocket(OwnedFd);

    /// ETH_P_ALL in network byte order.
    fn all_protocols() -> u16 {
        u16::try_from(libc::ETH_P_ALL).unwrap().to_be()
    }

    fn sockaddr_ll_len() -> libc::socklen_t {
        libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap()
    }

    impl PacketSocket {
        pub fn bind(ifname: &str) -> PacketSocket {
            let cname = CString::new(ifname).unwrap();
            // SAFETY: reads the NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            assert_ne!(index, 0, "no interface {ifname}");
            // SAFETY: socket takes no pointers.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    i32::from(all_protocols()),
                )
            };
            assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
            // SAFETY: `fd` is a new descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sa.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
            sa.sll_protocol = all_protocols();
            sa.sll_ifindex = i32::try_from(index).unwrap();
            // SAFETY: `sa` is a valid sockaddr_ll of the given size.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_ll).cast(),
                    sockaddr_ll_len(),
                )
            };
            assert_eq!(r, 0, "bind: {}", io::Error::last_os_error());
            PacketSocket(fd)
        }

        pub fn send(&self, frame: &[u8]) {
            // SAFETY: reads `frame.len()` bytes of `frame`.
            let r =
                unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(
                r,
                isize::try_from(frame.len()).unwrap(),
                "send: {}",
                io::Error::last_os_error()
            );
        }

        /// The next frame the interface received (not one it sent) for which `keep` holds,
        /// waiting up to 5 s while `pump` runs.
        pub fn recv_matching(
            &self,
            mut keep: impl FnMut(&[u8]) -> bool,
            mut pump: impl FnMut(),
        ) -> Vec<u8> {
            let end = Instant::now() + Duration::from_secs(5);
            let mut buf = vec![0u8; 70_000];
            loop {
                pump();
                // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
                let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = sockaddr_ll_len();
                // SAFETY: writes at most `buf.len()` bytes into `buf` and at most `len` bytes
                // into `sa`.
                let r = unsafe {
                    libc::recvfrom(
                        self.0.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut sa as *mut libc::sockaddr_ll).cast(),
                        &mut len,
                    )
                };
                if r >= 0 {
                    let frame = &buf[..usize::try_from(r).unwrap()];
                    if sa.sll_pkttype != libc::PACKET_OUTGOING && keep(frame) {
                        return frame.to_vec();
                    }
                    continue;
                }
                let e = io::Error::last_os_error();
                assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "recv: {e}");
                assert!(Instant::now() < end, "no frame arrived on the interface");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use std::time::{Duration, Instant};

    /// An Ethernet frame with our test EtherType (0x88b5, local experimental).
    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x42]);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(payload);
        f
    }

    fn read_frame(tap: &Tap, keep: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let end = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 70_000];
        loop {
            match tap.read(&mut buf) {
                Ok(n) if keep(&buf[..n]) => return buf[..n].to_vec(),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < end, "no frame on the TAP");
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    #[test]
    fn invalid_names_are_refused_before_any_syscall() {
        for bad in [
            "",
            "x234567890123456",
            "a/b",
            "a b",
            "a:b",
            "tap%d",
            ".",
            "..",
        ] {
            assert!(
                matches!(Tap::create(bad), Err(TapError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn create_configure_and_remove() {
        if !tun_available("create_configure_and_remove") {
            return;
        }
        private_netns();
        let name = tap_name();
        assert!(matches!(Tap::open(&name), Err(TapError::NotFound(n)) if n == name));
        let tap = Tap::create(&name).unwrap();
        assert!(tap.created());
        assert_eq!(tap.name(), name);
        assert!(exists(&name));
        tap.set_vnet_hdr_size(VNET_HDR_LEN_V1).unwrap();
        tap.set_offload(0).unwrap();
        tap.set_offload(offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN)
            .unwrap();
        tap.set_offload(offload::CSUM | offload::UFO).unwrap();
        // Non-blocking: nothing to read.
        let mut buf = [0u8; 64];
        assert_eq!(
            tap.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // A second attach to the same (single-queue) TAP is refused.
        assert!(matches!(Tap::create(&name), Err(TapError::Attach { .. })));
        // Even made persistent, a TAP we created goes away with us.
        tap.set_persistent(true).unwrap();
        drop(tap);
        assert!(gone(&name), "{name} still exists");
    }

    #[test]
    fn open_existing_leaves_it_in_place() {
        if !tun_available("open_existing_leaves_it_in_place") {
            return;
        }
        private_netns();
        let name = tap_name();
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        let tap = Tap::open(&name).unwrap();
        assert!(!tap.created());
        drop(tap);
        assert!(exists(&name));
        let tap = Tap::create(&name).unwrap();
        assert!(!tap.created());
        drop(tap);
        assert!(exists(&name));
        ip(&["link", "del", "dev", &name]);
        // Not a TAP: loopback.
        assert!(matches!(Tap::open("lo"), Err(TapError::Attach { .. })));
    }

    #[test]
    fn frames_both_ways_with_vnet_header() {
        if !tun_available("frames_both_ways_with_vnet_header") {
            return;
        }
        private_netns();
        let name = tap_name();
        let tap = Tap::create(&name).unwrap();
        tap.set_vnet_hdr_size(VNET_HDR_LEN_V1).unwrap();
        tap.set_offload(0).unwrap();
        up(&name);
        let sock = PacketSocket::bind(&name);

        // Host -> TAP reader: 12-byte header, then the frame as sent.
        let out = frame(b"to the guest");
        sock.send(&out);
        let got = read_frame(&tap, |f| f.len() > VNET_HDR_LEN_V1 && f[12..] == out[..]);
        assert_eq!(got[0], 0, "flags");
        assert_eq!(got[1], 0, "gso_type");

        // TAP writer -> host, gathered from several buffers.
        let inb = frame(b"from the guest, in pieces");
        let hdr = [0u8; VNET_HDR_LEN_V1];
        let n = tap
            .writev(&[
                IoSlice::new(&hdr[..5]),
                IoSlice::new(&hdr[5..]),
                IoSlice::new(&inb[..10]),
                IoSlice::new(&inb[10..]),
            ])
            .unwrap();
        assert_eq!(n, VNET_HDR_LEN_V1 + inb.len());
        let seen = sock.recv_matching(|f| f == &inb[..], || {});
        assert_eq!(seen, inb);

        // And from guest memory.
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 0x1000)])
                .unwrap();
        use vm_memory::{Bytes, GuestMemory};
        let inb2 = frame(b"from guest memory");
        mem.write_slice(&hdr, vm_memory::GuestAddress(0)).unwrap();
        mem.write_slice(&inb2, vm_memory::GuestAddress(0x100))
            .unwrap();
        let s1 = mem
            .get_slice(vm_memory::GuestAddress(0), VNET_HDR_LEN_V1)
            .unwrap();
        let s2 = mem
            .get_slice(vm_memory::GuestAddress(0x100), inb2.len())
            .unwrap();
        assert_eq!(
            tap.write_volatile(&[s1, s2]).unwrap(),
            VNET_HDR_LEN_V1 + inb2.len()
        );
        assert_eq!(sock.recv_matching(|f| f == &inb2[..], || {}), inb2);
    }

    #[test]
    fn writes_to_a_down_tap_fail() {
        if !tun_available("writes_to_a_down_tap_fail") {
            return;
        }
        private_netns();
        let tap = Tap::create(&tap_name()).unwrap();
        tap.set_vnet_hdr_size(VNET_HDR_LEN_V1).unwrap();
        let mut f = vec![0u8; VNET_HDR_LEN_V1];
        f.extend(frame(b"x"));
        assert!(tap.writev(&[IoSlice::new(&f)]).is_err());
    }
}
