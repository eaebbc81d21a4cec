//! Seccomp filters per Kestrel thread class, installed only on threads Kestrel spawns.
//!
//! Each thread installs its class's filter itself, as the first thing in its body (after it
//! named itself and registered its tid), with `seccompiler::apply_filter`: no `TSYNC`, so the
//! filter binds that thread (and threads it spawns) only, never the embedding process's other
//! threads. `PR_SET_NO_NEW_PRIVS`, which an unprivileged filter needs, is per-thread too.
//!
//! A thread spawned by a filtered thread inherits its filter, and stacked filters all apply:
//! virtio-fs workers are spawned by the event loop, so their calls must pass the event loop's
//! filter as well as their own (the event loop's list holds the worker's, as it serves virtio-fs
//! itself when workers are off).
//!
//! The lists come from tracing the real-guest suite (`scripts/seccomp-trace.sh`) plus what
//! Rust's std, glibc's allocator, panics and thread exit need on paths the suite does not
//! take. See docs/design.md, "Seccomp".

use std::collections::BTreeMap;
use std::sync::Arc;

use kestrel_api::SeccompMode;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// A failure to build or install a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules did not compile to BPF.
    #[error("cannot build the seccomp filter of the {class} threads: {source}")]
    Build {
        /// Thread class.
        class: FilterClass,
        /// The error.
        #[source]
        source: seccompiler::Error,
    },
    /// `prctl(PR_SET_NO_NEW_PRIVS)` or `seccomp(SECCOMP_SET_MODE_FILTER)` failed.
    #[error("cannot install the seccomp filter of a {class} thread: {source}")]
    Install {
        /// Thread class.
        class: FilterClass,
        /// The error.
        #[source]
        source: seccompiler::Error,
    },
}

/// Kestrel's thread classes, one filter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterClass {
    /// `kestrel-<vm>-vcpu<N>`: `KVM_RUN`, PIO/MMIO dispatch, emulation assists.
    Vcpu,
    /// `kestrel-<vm>-evloop`: every device's queues and backends, console input, control.
    EventLoop,
    /// `<prefix>-q<N>`: a virtio-fs request queue served on its own thread.
    FsWorker,
}

impl std::fmt::Display for FilterClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FilterClass::Vcpu => "vCPU",
            FilterClass::EventLoop => "event-loop",
            FilterClass::FsWorker => "virtio-fs worker",
        })
    }
}

/// The compiled filters of one VM (`None` in [`Filters::build`]'s result: seccomp is off).
#[derive(Debug, Clone)]
pub struct Filters {
    vcpu: Arc<BpfProgram>,
    evloop: Arc<BpfProgram>,
    fs_worker: Arc<BpfProgram>,
}

impl Filters {
    /// Compile the three filters for `mode` (`Ok(None)` for [`SeccompMode::Off`]).
    pub fn build(mode: SeccompMode) -> Result<Option<Filters>, SeccompError> {
        let mismatch = match mode {
            SeccompMode::Off => return Ok(None),
            SeccompMode::Errno => SeccompAction::Errno(libc::EPERM as u32),
            SeccompMode::Kill => SeccompAction::KillProcess,
        };
        let build = |class| {
            compile(class, mismatch.clone())
                .map(Arc::new)
                .map_err(|source| SeccompError::Build { class, source })
        };
        Ok(Some(Filters {
            vcpu: build(FilterClass::Vcpu)?,
            evloop: build(FilterClass::EventLoop)?,
            fs_worker: build(FilterClass::FsWorker)?,
        }))
    }

    /// The compiled program of `class`.
    pub fn program(&self, class: FilterClass) -> &Arc<BpfProgram> {
        match class {
            FilterClass::Vcpu => &self.vcpu,
            FilterClass::EventLoop => &self.evloop,
            FilterClass::FsWorker => &self.fs_worker,
        }
    }

    /// Install the filter of `class` on the calling thread (for good).
    pub fn install(&self, class: FilterClass) -> Result<(), SeccompError> {
        install(class, self.program(class))
    }
}

/// Install `prog` on the calling thread only.
pub fn install(class: FilterClass, prog: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(prog)
        .map_err(|e| SeccompError::Install { class, source: e })
        .inspect(|()| tracing::debug!("seccomp filter of the {class} thread installed"))
}

/// Install the filter of `class` from `filters`, if any (the helper every thread body calls).
pub(crate) fn install_opt(
    filters: Option<&Filters>,
    class: FilterClass,
) -> Result<(), SeccompError> {
    match filters {
        Some(f) => f.install(class),
        None => Ok(()),
    }
}

/// Allowed without conditions on every Kestrel thread: Rust std and glibc (allocator, locks,
/// thread exit, time when the vDSO falls back to the kernel), the tracing subscriber's writes,
/// the panic path (message, backtrace symbolisation reads the executable), the kick
/// signal's handler returning, and keeping `SIGPIPE` off the process (blocking it, and taking
/// the one a failed pipe write raised off the thread: `kestrel_devices::sigpipe`).
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_fstat,
    libc::SYS_futex,
    libc::SYS_getcwd,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_gettimeofday,
    libc::SYS_lseek,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_read,
    libc::SYS_readlink,
    libc::SYS_restart_syscall,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_statx,
    libc::SYS_write,
    libc::SYS_writev,
];

/// vCPU threads, beyond [`COMMON`]. A guest's register writes land here, so device
/// activation and reset run on a vCPU: a vhost-user frontend talks to its daemon
/// (`sendmsg`/`recvmsg`), an in-process virtio-fs rebuilds its server (read-only `openat` of
/// the share and `/proc/self/...`, `umask` in fuse-backend-rs), a TAP gets its offloads.
/// `ioctl` is limited to the vCPU's KVM requests and the TAP requests, `openat` to read-only
/// opens (checked below).
const VCPU: &[i64] = &[
    libc::SYS_dup,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_openat,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_umask,
];

/// virtio-fs workers (the FUSE server, fuse-backend-rs passthrough), beyond [`COMMON`].
/// PassthroughFs holds `O_PATH` descriptors, on which the `f*xattr` calls fail, so a share
/// with `xattr` on uses the path calls on `/proc/self/fd/<fd>` (`getxattr`, `setxattr`,
/// `listxattr`, `removexattr`). FUSE_DESTROY re-imports the root, with `umask(0)`, on a
/// short-lived thread with its own file-system attributes (`unshare(CLONE_FS)`), which
/// inherits this filter.
const FS_WORKER: &[i64] = &[
    libc::SYS_copy_file_range,
    libc::SYS_dup,
    libc::SYS_fallocate,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_flock,
    libc::SYS_fremovexattr,
    libc::SYS_fsetxattr,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_getdents64,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getxattr,
    libc::SYS_ioctl,
    libc::SYS_linkat,
    libc::SYS_listxattr,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_openat,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_readlinkat,
    libc::SYS_removexattr,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_setxattr,
    libc::SYS_symlinkat,
    libc::SYS_umask,
    libc::SYS_unlinkat,
    libc::SYS_utimensat,
];

/// The event loop, beyond [`COMMON`] and [`FS_WORKER`] (it serves virtio-fs itself without
/// workers, and its filter also binds the workers it spawns): epoll, eventfds, timerfds,
/// block I/O, TAP, vsock's Unix sockets (`socket` only `AF_UNIX`), the kick (`tgkill`), and
/// spawning fs workers (the worker's wake-up `eventfd2`, `clone3`/`clone` and what a new
/// thread does before its own filter).
const EVLOOP: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_connect,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd2,
    libc::SYS_getsockopt,
    libc::SYS_prctl,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_rseq,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_set_robust_list,
    libc::SYS_shutdown,
    libc::SYS_socket,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
];

/// `ioctl` requests on a TAP (devices/src/tap.rs): attach happens on the caller's thread,
/// offloads at activation (a vCPU), persistence when a created TAP goes (the event loop).
// `libc::Ioctl` is u64 on glibc and i32 on musl: the casts are for the latter.
#[allow(clippy::unnecessary_cast)]
const TAP_IOCTLS: &[u64] = &[
    libc::TUNSETIFF as u64,
    libc::TUNSETOFFLOAD as u64,
    libc::TUNSETPERSIST as u64,
    libc::TUNSETVNETHDRSZ as u64,
];

/// `ioctl` requests of the event loop and fs workers beyond [`TAP_IOCTLS`]: non-blocking and
/// close-on-exec flags of sockets, and the inode-flag requests fuse-backend-rs passes through.
#[allow(clippy::unnecessary_cast)]
const FILE_IOCTLS: &[u64] = &[
    libc::FIONBIO as u64,
    libc::FIOCLEX as u64,
    libc::FIONCLEX as u64,
    libc::FIONREAD as u64,
    0x8008_6601, // FS_IOC_GETFLAGS
    0x4008_6602, // FS_IOC_SETFLAGS
    0x801c_581f, // FS_IOC_FSGETXATTR
    0x401c_5820, // FS_IOC_FSSETXATTR
];

/// `ioctl` requests of the vCPU loop (`kvm-ioctls` `VcpuFd` methods it calls).
fn vcpu_ioctls() -> Vec<u64> {
    use kvm_bindings::*;
    const KVMIO: u64 = 0xAE;
    // _IOC(dir, type, nr, size) as in <asm-generic/ioctl.h>.
    let ioc =
        |dir: u64, nr: u64, size: usize| (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr;
    let (r, w) = (2u64, 1u64);
    vec![
        ioc(0, 0x80, 0),                                          // KVM_RUN
        ioc(r, 0x81, std::mem::size_of::<kvm_regs>()),            // KVM_GET_REGS
        ioc(w, 0x82, std::mem::size_of::<kvm_regs>()),            // KVM_SET_REGS
        ioc(r, 0x83, std::mem::size_of::<kvm_sregs>()),           // KVM_GET_SREGS
        ioc(w, 0x84, std::mem::size_of::<kvm_sregs>()),           // KVM_SET_SREGS
        ioc(r | w, 0x85, std::mem::size_of::<kvm_translation>()), // KVM_TRANSLATE
        ioc(r, 0x98, std::mem::size_of::<kvm_mp_state>()),        // KVM_GET_MP_STATE
        ioc(w, 0x99, std::mem::size_of::<kvm_mp_state>()),        // KVM_SET_MP_STATE
        ioc(r, 0x9f, std::mem::size_of::<kvm_vcpu_events>()),     // KVM_GET_VCPU_EVENTS
        ioc(w, 0xa0, std::mem::size_of::<kvm_vcpu_events>()),     // KVM_SET_VCPU_EVENTS
        ioc(r, 0xa4, std::mem::size_of::<kvm_xsave>()),           // KVM_GET_XSAVE
        ioc(w, 0xa5, std::mem::size_of::<kvm_xsave>()),           // KVM_SET_XSAVE
        ioc(r, 0xcf, std::mem::size_of::<kvm_xsave>()),           // KVM_GET_XSAVE2
        // Saving a parked vCPU's state for a snapshot (`snapshot::save_vcpu`).
        ioc(r | w, 0x88, std::mem::size_of::<kvm_msrs>()), // KVM_GET_MSRS
        ioc(r, 0x8c, std::mem::size_of::<kvm_fpu>()),      // KVM_GET_FPU
        ioc(r, 0x8e, std::mem::size_of::<kvm_lapic_state>()), // KVM_GET_LAPIC
        ioc(r | w, 0x91, std::mem::size_of::<kvm_cpuid2>()), // KVM_GET_CPUID2
        ioc(r, 0xa1, std::mem::size_of::<kvm_debugregs>()), // KVM_GET_DEBUGREGS
        ioc(r, 0xa6, std::mem::size_of::<kvm_xcrs>()),     // KVM_GET_XCRS
        // Telling the guest's kvmclock it was paused (`VcpuManager::pause`).
        ioc(0, 0xad, 0), // KVM_KVMCLOCK_CTRL
    ]
}

/// `SECCOMP_SET_MODE_FILTER` (<linux/seccomp.h>).
const SECCOMP_SET_MODE_FILTER: u32 = 1;

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, seccompiler::Error> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(Into::into)
}

/// One rule per value: argument `arg` equals one of `values`.
fn any_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::Error> {
    values
        .iter()
        .map(|v| {
            SeccompRule::new(vec![cond(arg, SeccompCmpOp::Eq, *v)?])
                .map_err(seccompiler::Error::from)
        })
        .collect()
}

/// The rules of `class`: syscall number -> rules (empty: allowed whatever the arguments).
fn rules(class: FilterClass) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::Error> {
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allow = |list: &[i64]| {
        for nr in list {
            m.insert(*nr, Vec::new());
        }
    };
    allow(COMMON);
    match class {
        FilterClass::Vcpu => allow(VCPU),
        FilterClass::FsWorker => allow(FS_WORKER),
        FilterClass::EventLoop => {
            allow(FS_WORKER);
            allow(EVLOOP);
        }
    }
    // SAFETY: getpid has no preconditions.
    let pid = u64::from(unsafe { libc::getpid() }.unsigned_abs());
    // Signals go to this process's own threads only (the vCPU kick; abort()).
    m.insert(libc::SYS_tgkill, any_of(0, &[pid])?);
    let ioctls: Vec<u64> = match class {
        FilterClass::Vcpu => [vcpu_ioctls().as_slice(), TAP_IOCTLS].concat(),
        FilterClass::EventLoop => [FILE_IOCTLS, TAP_IOCTLS].concat(),
        FilterClass::FsWorker => FILE_IOCTLS.to_vec(),
    };
    m.insert(libc::SYS_ioctl, any_of(1, &ioctls)?);
    // virtio-fs imports a share's root (device reset on a vCPU, FUSE_DESTROY on the loop or a
    // worker) on a short-lived thread with its own umask (`unshare(CLONE_FS)`,
    // devices/src/virtio/fs/server.rs): every class may start a thread, and unshare only that.
    for nr in [
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_prctl,
    ] {
        m.insert(nr, Vec::new());
    }
    m.insert(libc::SYS_unshare, any_of(0, &[libc::CLONE_FS as u64])?);
    argument_rules(class, &mut m)?;
    Ok(m)
}

/// The rules that look at arguments beyond `ioctl`, `tgkill` and `unshare`: read-only opens
/// for vCPUs; Unix sockets and stacking a worker's filter for the event loop.
fn argument_rules(
    class: FilterClass,
    m: &mut BTreeMap<i64, Vec<SeccompRule>>,
) -> Result<(), seccompiler::Error> {
    if class == FilterClass::Vcpu {
        // Read-only opens only: neither write access nor creation/truncation.
        let write_bits = (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC) as u64;
        m.insert(
            libc::SYS_openat,
            vec![SeccompRule::new(vec![cond(
                2,
                SeccompCmpOp::MaskedEq(write_bits),
                0,
            )?])?],
        );
    }
    if class == FilterClass::EventLoop {
        m.insert(libc::SYS_socket, any_of(0, &[libc::AF_UNIX as u64])?);
        // An fs worker the loop spawns installs its own filter on top of the loop's (which it
        // inherited): `seccomp(SECCOMP_SET_MODE_FILTER, 0, ...)`. A filter only ever adds
        // restrictions; flags 0 means no `TSYNC`, so it binds the calling thread alone.
        m.insert(
            libc::SYS_seccomp,
            vec![SeccompRule::new(vec![
                cond(0, SeccompCmpOp::Eq, u64::from(SECCOMP_SET_MODE_FILTER))?,
                cond(1, SeccompCmpOp::Eq, 0)?,
            ])?],
        );
    }
    Ok(())
}

fn compile(class: FilterClass, mismatch: SeccompAction) -> Result<BpfProgram, seccompiler::Error> {
    let filter = SeccompFilter::new(
        rules(class)?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLASSES: [FilterClass; 3] = [
        FilterClass::Vcpu,
        FilterClass::EventLoop,
        FilterClass::FsWorker,
    ];

    #[test]
    fn every_mode_builds_and_off_builds_nothing() {
        assert!(Filters::build(SeccompMode::Off).unwrap().is_none());
        for mode in [SeccompMode::Errno, SeccompMode::Kill] {
            let f = Filters::build(mode).unwrap().expect("filters");
            for class in CLASSES {
                assert!(!f.program(class).is_empty(), "{class}");
            }
        }
    }

    #[test]
    fn lists_hold_what_each_class_needs_and_nothing_it_must_not() {
        let has = |class, nr| rules(class).unwrap().contains_key(&nr);
        for class in CLASSES {
            for nr in [
                libc::SYS_futex,
                libc::SYS_write,
                libc::SYS_exit,
                libc::SYS_munmap,
                // kestrel_devices::sigpipe on every thread.
                libc::SYS_rt_sigprocmask,
                libc::SYS_rt_sigpending,
                libc::SYS_rt_sigtimedwait,
            ] {
                assert!(has(class, nr), "{class} needs {nr}");
            }
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_setns,
                libc::SYS_kill,
                libc::SYS_exit_group,
                libc::SYS_init_module,
                libc::SYS_bpf,
            ] {
                assert!(!has(class, nr), "{class} must not get {nr}");
            }
        }
        // Only the event loop makes sockets and spawns fs workers, which make a wake-up
        // eventfd there and install their own filter.
        assert!(has(FilterClass::EventLoop, libc::SYS_socket));
        assert!(has(FilterClass::EventLoop, libc::SYS_eventfd2));
        assert!(!rules(FilterClass::EventLoop).unwrap()[&libc::SYS_seccomp].is_empty());
        for class in [FilterClass::Vcpu, FilterClass::FsWorker] {
            assert!(
                !has(class, libc::SYS_seccomp),
                "{class} installs no filters"
            );
        }
        assert!(!has(FilterClass::Vcpu, libc::SYS_socket));
        assert!(!has(FilterClass::FsWorker, libc::SYS_socket));
        // A share with xattrs on: PassthroughFs's path calls on /proc/self/fd/<fd> (its O_PATH
        // descriptors refuse the f*xattr ones), on a worker and on the loop that serves fs
        // queues without workers; FUSE_DESTROY's root import sets the umask of its own thread.
        for class in [FilterClass::FsWorker, FilterClass::EventLoop] {
            for nr in [
                libc::SYS_getxattr,
                libc::SYS_setxattr,
                libc::SYS_listxattr,
                libc::SYS_removexattr,
                libc::SYS_umask,
            ] {
                assert!(has(class, nr), "{class} needs {nr}");
            }
        }
        // A worker runs under the event loop's filter too: everything it may do, the loop may.
        let evloop = rules(FilterClass::EventLoop).unwrap();
        for nr in rules(FilterClass::FsWorker).unwrap().keys() {
            assert!(
                evloop.contains_key(nr),
                "fs worker syscall {nr} not on the event loop"
            );
        }
        // The vCPU's ioctls are KVM's vCPU requests and the TAP's, argument-checked.
        assert!(!rules(FilterClass::Vcpu).unwrap()[&libc::SYS_ioctl].is_empty());
        // The values <linux/kvm.h> gives on x86_64.
        assert_eq!(
            vcpu_ioctls(),
            vec![
                0xae80,
                0x8090_ae81,
                0x4090_ae82,
                0x8138_ae83,
                0x4138_ae84,
                0xc018_ae85,
                0x8004_ae98,
                0x4004_ae99,
                0x8040_ae9f,
                0x4040_aea0,
                0x9000_aea4,
                0x5000_aea5,
                0x9000_aecf,
                0xc008_ae88,
                0x81a0_ae8c,
                0x8400_ae8e,
                0xc008_ae91,
                0x8080_aea1,
                0x8188_aea6,
                0xaead, // KVM_KVMCLOCK_CTRL
            ]
        );
    }
}
