//! `SIGPIPE` inside someone else's process.
//!
//! A write to a pipe or FIFO whose reader has gone, or to a stream socket whose peer has gone
//! (without `MSG_NOSIGNAL`), fails with `EPIPE` *and* raises `SIGPIPE` on the writing thread.
//! At its default disposition `SIGPIPE` terminates the whole process, and the process Kestrel
//! lives in may well have left it there (a C runtime, or a Rust program that restored it).
//! A closed console reader or a vsock peer that hangs up must
//! be an error of that device, never the end of the runtime and every VM in it. So:
//!
//! - sockets are written with `MSG_NOSIGNAL` ([`send`]): vsock's host streams, the console
//!   writer on a socket, the guest-agent client; vhost-user goes through vmm-sys-util's
//!   `sendmsg`, which passes `MSG_NOSIGNAL` too;
//! - every thread Kestrel spawns blocks `SIGPIPE` first thing ([`block_on_this_thread`]): what
//!   cannot be flagged per call — writes to pipes and FIFOs, and code that is not Kestrel's but
//!   runs on its threads (the embedder's console sink or tracing writer, fuse-backend-rs) —
//!   then fails with `EPIPE` and the signal stays pending on that thread;
//! - Kestrel's own writes to pipes and FIFOs go through [`without_sigpipe`], which is safe on
//!   any thread (the caller's too, for the rare write that happens there) and consumes the
//!   signal its write raised.
//!
//! Why a pending `SIGPIPE` is never delivered: the `SIGPIPE` of a failed write is
//! thread-directed — the kernel queues it on the writing thread only (`send_sig(SIGPIPE,
//! current)`), so no other thread of the process can receive it, whatever their masks. While
//! that thread blocks `SIGPIPE` it stays pending there. Kestrel's threads never unblock it
//! (nothing in Kestrel changes their mask again, and `KVM_SET_SIGNAL_MASK` is not used), and a
//! thread's own pending signals are discarded when it exits. [`without_sigpipe`] takes it off
//! the thread with `sigtimedwait` (zero timeout) before it restores the caller's mask; the
//! kernel dequeues a thread's own pending signals before process-wide ones, so it consumes the
//! signal of its own write, never one sent to the process. Process-directed `SIGPIPE`s (`kill`)
//! are unaffected: the kernel hands them to a thread that does not block them — one of the
//! embedder's, as before.

use std::io;
use std::os::fd::RawFd;

/// `{SIGPIPE}`.
fn sigpipe_set() -> libc::sigset_t {
    // SAFETY: an all-zero `sigset_t` is a valid value of the plain C type; sigemptyset and
    // sigaddset only write the set they are given, and SIGPIPE is a valid signal number.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        set
    }
}

/// Block `SIGPIPE` on the calling thread, for good. Every thread Kestrel spawns calls this
/// first (see the module documentation); never call it on the embedder's threads.
pub fn block_on_this_thread() -> io::Result<()> {
    let set = sigpipe_set();
    // SAFETY: `set` is a valid signal set; a null old-set pointer is allowed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// [`block_on_this_thread`], logging a failure (which `pthread_sigmask` only reports for an
/// invalid `how`, so never in practice). For thread bodies.
pub fn block_on_this_thread_or_log(thread: &str) {
    if let Err(e) = block_on_this_thread() {
        tracing::warn!("thread {thread}: cannot block SIGPIPE: {e}");
    }
}

/// Whether `SIGPIPE` is pending for the calling thread (its own or the process's, while the
/// thread blocks it).
fn pending() -> bool {
    // SAFETY: an all-zero `sigset_t` is valid; sigpending writes only `set`; sigismember reads
    // it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut set) == 0 && libc::sigismember(&set, libc::SIGPIPE) == 1
    }
}

/// Take a pending `SIGPIPE` off the calling thread, without waiting (the thread blocks it).
fn consume() {
    let set = sigpipe_set();
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `set` and `zero` are valid for the call; a null siginfo pointer is allowed. It
    // returns at once (zero timeout) with the signal or EAGAIN.
    unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) };
}

/// Run `write` (one write to a pipe, FIFO or anything else) so that it cannot raise `SIGPIPE`:
/// `SIGPIPE` is blocked on the calling thread around it; if the write fails with `EPIPE` and no
/// `SIGPIPE` was pending before, the one it raised is consumed; then the thread's mask is
/// restored. The approach of libpq and OpenSSL; safe on the embedder's threads.
pub fn without_sigpipe<T>(write: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let set = sigpipe_set();
    // SAFETY: an all-zero `sigset_t` is a valid value of the plain C type.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` and `old` are valid for the call.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
    if r != 0 {
        // Not writing at all is the only safe answer (it never happens: only an invalid `how`
        // fails).
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: `old` was filled in by pthread_sigmask.
    let was_blocked = unsafe { libc::sigismember(&old, libc::SIGPIPE) } == 1;
    let pending_before = pending();
    let result = write();
    if !pending_before && matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EPIPE)) {
        consume();
    }
    if !was_blocked {
        // SAFETY: `set` is valid; a null old-set pointer is allowed.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
    result
}

/// `send(2)` on a socket with `MSG_NOSIGNAL` added to `flags`: a peer that went away is
/// `EPIPE`, never a `SIGPIPE`.
pub fn send(fd: RawFd, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole call; the caller
    // owns `fd` across it (a stale fd at worst fails with EBADF).
    let r = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            flags | libc::MSG_NOSIGNAL,
        )
    };
    crate::syscall_len(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A pipe whose reader is closed: (write end).
    fn broken_pipe() -> OwnedFd {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are new and owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(r);
        w
    }

    fn write(fd: &OwnedFd) -> io::Result<usize> {
        // SAFETY: writes one byte from a valid buffer to an fd owned by the caller.
        let r = unsafe { libc::write(fd.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        crate::syscall_len(r)
    }

    fn blocked() -> bool {
        // SAFETY: a query (null new set) into a valid out-pointer.
        unsafe {
            let mut cur: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur);
            libc::sigismember(&cur, libc::SIGPIPE) == 1
        }
    }

    // Each test runs on its own thread (libtest), so masks and pending signals are its own;
    // the test binary ignores SIGPIPE anyway (Rust's runtime does), so a mistake here shows
    // as an assertion, not a dead test run.

    #[test]
    fn without_sigpipe_consumes_its_signal_and_restores_the_mask() {
        std::thread::spawn(|| {
            let w = broken_pipe();
            assert!(!blocked());
            let e = without_sigpipe(|| write(&w)).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
            assert!(!blocked(), "the mask is restored");
            assert!(!pending());
            // On a thread that blocks it already (a Kestrel thread) it stays blocked.
            block_on_this_thread().unwrap();
            without_sigpipe(|| write(&w)).unwrap_err();
            assert!(blocked());
            assert!(!pending(), "the signal of its own write is consumed");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_blocked_sigpipe_stays_pending_on_the_writing_thread_only() {
        std::thread::spawn(|| {
            block_on_this_thread().unwrap();
            let w = broken_pipe();
            assert_eq!(write(&w).unwrap_err().raw_os_error(), Some(libc::EPIPE));
            assert!(pending(), "raised on this thread and held there");
            // Another thread does not see it.
            assert!(!std::thread::spawn(pending).join().unwrap());
            // A signal that was pending already is left alone.
            without_sigpipe(|| write(&w)).unwrap_err();
            assert!(pending());
            consume();
            assert!(!pending());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn send_never_raises_sigpipe() {
        std::thread::spawn(|| {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            drop(b);
            block_on_this_thread().unwrap();
            let e = send(a.as_raw_fd(), b"x", 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
            assert!(!pending(), "MSG_NOSIGNAL: nothing raised");
        })
        .join()
        .unwrap();
    }
}
