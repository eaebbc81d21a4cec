//! Worker threads: one per request queue when `worker_threads` is on, so file-system calls
//! (a cold read, an fsync) block that thread instead of the VM's event loop.
//!
//! The event loop still receives the queue notifications (the queue `EventFd`s stay registered
//! with it, as for every device) and passes each one on through the worker's own blocking
//! `EventFd`. A worker owns its `Queue` while it runs; it shares the FUSE server (which is
//! built for concurrent use), the interrupt line, the counters and the device's failed flag.
//! Stopping (device reset or drop) joins the thread, so after it no worker touches guest memory.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use super::request::{drain_queue, report_panics};
use super::server::FuseServer;
use super::{lock_metrics, FsMetrics};
use crate::virtio::{GuestMem, VirtioInterrupt};

/// A virtio-fs worker thread whose body is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsWorkerThread {
    /// Full thread name, `<prefix>-q<N>`; Linux keeps [`crate::os_thread_name`] of it.
    pub name: String,
    /// The request queue it serves (1 and up: the high-priority queue 0 stays on the event
    /// loop).
    pub queue: u16,
    /// Linux thread id.
    pub tid: i32,
}

/// The running worker threads of one device, as a handle the VMM keeps
/// ([`super::Fs::worker_threads`]). Each worker adds itself as the first thing in its body and
/// removes itself as the last, so the list never names a thread that has ended (a worker that
/// panicked or whose start hook failed is gone from it). Reading it or stopping the workers
/// never takes the device's lock, so it never waits for a device that is busy.
#[derive(Clone, Default)]
pub struct FsWorkers(Arc<Mutex<Vec<Registered>>>);

struct Registered {
    info: FsWorkerThread,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
}

impl std::fmt::Debug for FsWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.list()).finish()
    }
}

impl FsWorkers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Registered>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The worker threads running now.
    pub fn list(&self) -> Vec<FsWorkerThread> {
        self.lock().iter().map(|r| r.info.clone()).collect()
    }

    /// Whether no worker thread runs.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Tell every running worker to end once the request it serves (if any) is done, without
    /// waiting for it: for a VM that has stopped (no queue is served again; the device's drop
    /// joins the finished threads). Poll [`FsWorkers::is_empty`] to see them gone; calling
    /// this again reaches workers started meanwhile and wakes no worker twice.
    pub fn stop_all(&self) {
        for r in self.lock().iter() {
            if r.stop.swap(true, Ordering::SeqCst) {
                continue;
            }
            if let Err(e) = r.wake.write(1) {
                tracing::warn!("virtio-fs: cannot wake worker {}: {e}", r.info.name);
            }
        }
    }
}

/// A worker's entry in [`FsWorkers`], removed when the thread body returns (or unwinds).
struct Registration<'a> {
    workers: &'a FsWorkers,
    tid: i32,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.workers.lock().retain(|r| r.info.tid != self.tid);
    }
}

/// Everything a worker serves its queue with.
pub(super) struct WorkerContext {
    pub tag: String,
    pub index: usize,
    pub queue: Queue,
    pub mem: GuestMem,
    pub interrupt: Arc<VirtioInterrupt>,
    pub server: Arc<FuseServer>,
    pub metrics: Arc<Mutex<FsMetrics>>,
    pub failed: Arc<AtomicBool>,
    /// Run first on the thread (the VMM's seccomp filter).
    pub start_hook: Option<crate::ThreadStartHook>,
    /// Told of every panic the worker contains.
    pub panic_hook: Option<crate::DevicePanicHook>,
    /// Test-only: the next worker pass of the device panics (once, whichever worker takes it).
    pub inject_panic: Arc<AtomicBool>,
}

/// A running worker thread.
pub(super) struct Worker {
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    tid: Arc<AtomicI32>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Start a thread named `name` (Linux gets [`crate::os_thread_name`] of it) serving
    /// `ctx.queue`; it lists itself in `workers` while it runs. On failure the queue comes
    /// back.
    pub fn spawn(
        name: String,
        ctx: WorkerContext,
        workers: FsWorkers,
    ) -> Result<Worker, (std::io::Error, Option<Queue>)> {
        // Blocking: the worker sleeps in read() until woken.
        let wake = match EventFd::new(0) {
            Ok(e) => Arc::new(e),
            Err(e) => return Err((e, Some(ctx.queue))),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let tid = Arc::new(AtomicI32::new(0));
        let ids = ThreadIds {
            name: name.clone(),
            queue: u16::try_from(ctx.index).unwrap_or(u16::MAX),
            tid: tid.clone(),
            workers,
        };
        let (thread_wake, thread_stop) = (wake.clone(), stop.clone());
        // The context moves into the thread only if the spawn succeeds; keep the queue
        // reachable for the error path through a slot.
        let slot = Arc::new(Mutex::new(Some(ctx)));
        let thread_slot = slot.clone();
        let spawned = std::thread::Builder::new()
            .name(crate::os_thread_name(&name))
            .spawn(move || thread_body(&ids, &thread_slot, &thread_wake, &thread_stop));
        match spawned {
            Ok(thread) => Ok(Worker {
                wake,
                stop,
                tid,
                thread: Some(thread),
            }),
            Err(e) => {
                // The thread did not start, so the context is still in the slot.
                let ctx = slot.lock().ok().and_then(|mut s| s.take());
                Err((e, ctx.map(|c| c.queue)))
            }
        }
    }

    /// Tell the worker its queue has work.
    pub fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            tracing::warn!("virtio-fs: cannot wake a worker: {e}");
        }
    }

    /// The worker's thread id (0 until the thread has started).
    pub fn tid(&self) -> i32 {
        self.tid.load(Ordering::SeqCst)
    }

    /// Stop the worker and wait for it (it finishes the request it is serving).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("virtio-fs: a worker thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.store(true, Ordering::SeqCst);
            self.wake();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Who a worker thread is, and where it lists itself.
struct ThreadIds {
    name: String,
    queue: u16,
    tid: Arc<AtomicI32>,
    workers: FsWorkers,
}

/// A worker thread: blocks SIGPIPE, records its tid and lists itself (until it ends), takes its
/// context, runs the start hook (the seccomp filter), then serves the queue until told to
/// stop. A failing hook or a panic ends the thread and the device needs a reset; a panic is
/// counted and reported.
fn thread_body(
    ids: &ThreadIds,
    slot: &Mutex<Option<WorkerContext>>,
    wake: &Arc<EventFd>,
    stop: &Arc<AtomicBool>,
) {
    crate::sigpipe::block_on_this_thread_or_log(&ids.name);
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    ids.tid.store(tid, Ordering::SeqCst);
    ids.workers.lock().push(Registered {
        info: FsWorkerThread {
            name: ids.name.clone(),
            queue: ids.queue,
            tid,
        },
        stop: stop.clone(),
        wake: wake.clone(),
    });
    let _listed = Registration {
        workers: &ids.workers,
        tid,
    };
    let Some(ctx) = slot.lock().ok().and_then(|mut s| s.take()) else {
        return;
    };
    if let Some(hook) = &ctx.start_hook {
        if let Err(e) = hook() {
            tracing::error!(
                "virtio-fs {}: worker {} not started ({e}); device needs a reset",
                ctx.tag,
                ctx.index
            );
            needs_reset(&ctx.failed, &ctx.interrupt);
            return;
        }
    }
    // A panic ends this worker only: the device needs a reset (DEVICE_NEEDS_RESET), and it is
    // counted.
    let (tag, failed, irq, metrics, hook) = (
        ctx.tag.clone(),
        ctx.failed.clone(),
        ctx.interrupt.clone(),
        ctx.metrics.clone(),
        ctx.panic_hook.clone(),
    );
    if let Err(e) = crate::catch_panic(|| run(ctx, wake, stop)) {
        tracing::error!("virtio-fs {tag}: worker {e}; device needs a reset");
        lock_metrics(&metrics).panics += 1;
        if let Some(hook) = &hook {
            hook();
        }
        needs_reset(&failed, &irq);
    }
}

/// The device failed: it reports DEVICE_NEEDS_RESET and tells the driver (config change).
fn needs_reset(failed: &AtomicBool, interrupt: &VirtioInterrupt) {
    failed.store(true, Ordering::SeqCst);
    interrupt.signal_config_change();
}

fn run(mut ctx: WorkerContext, wake: &EventFd, stop: &AtomicBool) {
    loop {
        if let Err(e) = wake.read() {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!(
                    "virtio-fs {}: worker {} cannot wait: {e}",
                    ctx.tag,
                    ctx.index
                );
                return;
            }
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if ctx.inject_panic.load(Ordering::Relaxed)
            && ctx.inject_panic.swap(false, Ordering::SeqCst)
        {
            panic!(
                "injected panic on virtio-fs {} worker of queue {}",
                ctx.tag, ctx.index
            );
        }
        if ctx.failed.load(Ordering::SeqCst) {
            continue;
        }
        let mem = ctx.mem.memory();
        let mut m = FsMetrics::default();
        let r = drain_queue(
            &mut ctx.queue,
            &mem,
            &ctx.server,
            &ctx.interrupt,
            &mut m,
            false,
            usize::MAX,
        );
        m.worker_requests = m.requests;
        lock_metrics(&ctx.metrics).add(&m);
        report_panics(&m, ctx.panic_hook.as_ref());
        if let Err(why) = r {
            tracing::warn!(
                "virtio-fs {}: queue {} failed, device needs a reset: {why}",
                ctx.tag,
                ctx.index
            );
            needs_reset(&ctx.failed, &ctx.interrupt);
        }
    }
}
