//! The threads of a VM: their names, ids and roles (for runtimes that put them into cgroups),
//! and the start every thread Kestrel spawns for a VM shares: `SIGPIPE` blocked, registered
//! with its tid, its seccomp filter installed and the result reported to the starter.

use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use thiserror::Error;

use kestrel_api::ThreadNames;

use crate::seccomp::{self, FilterClass, Filters, SeccompError};

/// How long [`crate::Vm::stop`], [`crate::Vm::wait`] and drop wait for the VM's threads to
/// finish after the VM stopped. A thread still running then (stuck in a device backend, say)
/// is detached and logged; it holds its own references and releases them when it ends.
pub const STOP_JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a thread of the VM does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread (with its index).
    Vcpu(u32),
    /// The event-loop thread.
    EventLoop,
    /// A virtio-fs worker thread (`fs[].worker_threads`): share `config.fs[share]` (device id
    /// `fs<share>`), request queue `queue` (1 and up).
    FsWorker {
        /// Index of the share in the config (`fs<share>`).
        share: u32,
        /// The request queue the thread serves.
        queue: u16,
    },
}

/// A thread of the VM, for runtimes that place threads into cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadInfo {
    /// Thread name (`kestrel-<vm>-vcpu<N>` / `kestrel-<vm>-evloop` /
    /// `kestrel-<vm>-fs<N>-q<Q>`; vCPUs are `fc_vcpu <N>` with `kestrel.thread_names` =
    /// `firecracker`); Linux keeps a 15-byte form ([`kestrel_devices::os_thread_name`]:
    /// `k-<vm>-vcpu<N>`...).
    pub name: String,
    /// Linux thread id.
    pub tid: i32,
    /// Role.
    pub kind: ThreadKind,
}

/// A thread could not be spawned.
#[derive(Debug, Error)]
#[error("cannot spawn thread {name}: {source}")]
pub struct SpawnError {
    /// Thread name.
    pub name: String,
    /// The error.
    #[source]
    pub source: std::io::Error,
}

/// Where each thread reports whether its seccomp filter is in place.
pub(crate) type Ready = mpsc::Sender<Result<(), SeccompError>>;

/// What the VM's threads have in common: the VM's name, the list of running threads and the
/// seccomp filters they install.
pub(crate) struct ThreadEnv {
    vm_name: String,
    info: Mutex<Vec<ThreadInfo>>,
    filters: Option<Filters>,
    /// `kestrel.thread_names`: Firecracker's `fc_vcpu <N>` for vCPU threads, or Kestrel's.
    names: ThreadNames,
}

impl ThreadEnv {
    pub(crate) fn new(vm_name: &str, filters: Option<Filters>, names: ThreadNames) -> Self {
        ThreadEnv {
            vm_name: vm_name.to_string(),
            info: Mutex::new(Vec::new()),
            filters,
            names,
        }
    }

    /// The seccomp filters of the VM's threads (`None`: off).
    pub(crate) fn filters(&self) -> Option<&Filters> {
        self.filters.as_ref()
    }

    /// `kestrel-<vm>-<role>`; a vCPU (`vcpu<N>`) with Firecracker's names: `fc_vcpu <N>`.
    pub(crate) fn thread_name(&self, role: &str) -> String {
        match (self.names, role.strip_prefix("vcpu")) {
            (ThreadNames::Firecracker, Some(n)) => format!("fc_vcpu {n}"),
            _ => format!("kestrel-{}-{role}", self.vm_name),
        }
    }

    /// Threads that registered and have not been cleared.
    pub(crate) fn list(&self) -> Vec<ThreadInfo> {
        self.lock().clone()
    }

    /// Forget every thread (they have all been joined or detached).
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    fn register_current(&self, name: String, kind: ThreadKind) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.lock().push(ThreadInfo { name, tid, kind });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ThreadInfo>> {
        self.info.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Spawn thread `role` of the VM as `kind` under filter `class`. The thread blocks `SIGPIPE`
/// (no write of Kestrel's raises it: `kestrel_devices::sigpipe`), registers its tid, installs
/// its filter, sends the result to `ready`, and runs `body(filtered)`; `filtered` is false
/// when the filter could not be installed (the body must then not run guest work; the starter
/// fails and stops the VM).
pub(crate) fn spawn(
    env: &Arc<ThreadEnv>,
    role: &str,
    kind: ThreadKind,
    class: FilterClass,
    ready: Ready,
    body: impl FnOnce(bool) + Send + 'static,
) -> Result<JoinHandle<()>, SpawnError> {
    let name = env.thread_name(role);
    let (env, tname) = (env.clone(), name.clone());
    std::thread::Builder::new()
        .name(kestrel_devices::os_thread_name(&name))
        .spawn(move || {
            kestrel_devices::sigpipe::block_on_this_thread_or_log(&tname);
            env.register_current(tname, kind);
            let filtered = seccomp::install_opt(env.filters(), class);
            let ok = filtered.is_ok();
            let _ = ready.send(filtered);
            body(ok);
        })
        .map_err(|source| SpawnError { name, source })
}

/// Join `h` if it has finished; otherwise detach it and log (`what`: "vCPU", "event-loop").
pub(crate) fn join_or_detach(h: JoinHandle<()>, vm: &str, what: &str, waited: Duration) {
    if h.is_finished() {
        // Thread bodies contain their panics, so this is Ok in practice.
        if h.join().is_err() {
            tracing::error!("VM {vm}: the {what} thread panicked");
        }
    } else {
        tracing::error!("VM {vm}: the {what} thread did not finish within {waited:?}; detached");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawned_threads_register_their_tid_and_report_their_filter() {
        let env = Arc::new(ThreadEnv::new("t", None, ThreadNames::Kestrel));
        let (tx, rx) = mpsc::channel();
        let (body_tx, body_rx) = mpsc::channel();
        let h = spawn(
            &env,
            "vcpu3",
            ThreadKind::Vcpu(3),
            FilterClass::Vcpu,
            tx,
            move |ok| {
                // SAFETY: gettid has no preconditions.
                body_tx.send((ok, unsafe { libc::gettid() })).unwrap();
            },
        )
        .unwrap();
        assert!(rx.recv().unwrap().is_ok(), "no filters: nothing to install");
        let (ok, tid) = body_rx.recv().unwrap();
        assert!(ok);
        h.join().unwrap();
        assert_eq!(
            env.list(),
            vec![ThreadInfo {
                name: "kestrel-t-vcpu3".into(),
                tid,
                kind: ThreadKind::Vcpu(3)
            }]
        );
        env.clear();
        assert!(env.list().is_empty());
    }

    #[test]
    fn vcpu_threads_take_firecrackers_names_when_asked() {
        let kestrel = ThreadEnv::new("vm", None, ThreadNames::Kestrel);
        assert_eq!(kestrel.thread_name("vcpu3"), "kestrel-vm-vcpu3");
        let fc = ThreadEnv::new("vm", None, ThreadNames::Firecracker);
        assert_eq!(fc.thread_name("vcpu3"), "fc_vcpu 3");
        assert_eq!(fc.thread_name("evloop"), "kestrel-vm-evloop");
    }
}
