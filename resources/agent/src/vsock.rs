//! AF_VSOCK sockets: the agent's listener, the stream ops' and `recwriter`'s connections to the
//! host.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The host's CID.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

/// AF_VSOCK (40) as a `sockaddr`'s family field.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // 40 fits a u16
const FAMILY: libc::sa_family_t = libc::AF_VSOCK as libc::sa_family_t;
/// Size of a `sockaddr_vm` (16 bytes).
#[allow(clippy::cast_possible_truncation)] // 16 fits a u32
const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// IOCTL_VM_SOCKETS_GET_LOCAL_CID = _IO(7, 0xb9) from <linux/vm_sockets.h>.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// A new stream socket.
fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created here that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The address `cid`:`port`.
fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: all-zero bytes are a valid `sockaddr_vm`.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = FAMILY;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

/// A socket listening on `port` (any CID), backlog 64.
pub fn listen(port: u32) -> io::Result<OwnedFd> {
    let fd = socket()?;
    let a = addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: `a` is a valid `sockaddr_vm` of ADDR_LEN bytes living across the call.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const a).cast(), ADDR_LEN) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on our own socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A stream connected to `cid`:`port`.
pub fn connect(cid: u32, port: u32) -> io::Result<File> {
    let fd = socket()?;
    let a = addr(cid, port);
    // SAFETY: `a` is a valid `sockaddr_vm` of ADDR_LEN bytes living across the call.
    if unsafe { libc::connect(fd.as_raw_fd(), (&raw const a).cast(), ADDR_LEN) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(File::from(fd))
}

/// The next connection on `listener` (a listening socket of any family).
pub fn accept(listener: &OwnedFd) -> io::Result<File> {
    // SAFETY: accept4 on a listening socket we own, without an address buffer.
    let c = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if c < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `c` is a fresh fd owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(c) }))
}

/// The guest's CID; Some(VMADDR_CID_ANY) means no vsock device (no transport).
pub fn local_cid() -> Option<u32> {
    let f = File::open("/dev/vsock").ok()?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 into `cid`.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID as _, &mut cid) };
    (r == 0).then_some(cid)
}
