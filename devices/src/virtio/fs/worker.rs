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

use super::server::FuseServer;
use super::{drain_queue, lock_metrics, report_panics, FsMetrics};
use crate::virtio::{GuestMem, VirtioInterrupt};

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
    wake: EventFd,
    stop: Arc<AtomicBool>,
    tid: Arc<AtomicI32>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Start a thread named `name` serving `ctx.queue`. On failure the queue comes back.
    pub fn spawn(
        name: String,
        ctx: WorkerContext,
    ) -> Result<Worker, (std::io::Error, Option<Queue>)> {
        // Blocking: the worker sleeps in read() until woken.
        let wake = match EventFd::new(0) {
            Ok(e) => e,
            Err(e) => return Err((e, Some(ctx.queue))),
        };
        let thread_wake = match wake.try_clone() {
            Ok(e) => e,
            Err(e) => return Err((e, Some(ctx.queue))),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let tid = Arc::new(AtomicI32::new(0));
        let (thread_stop, thread_tid) = (stop.clone(), tid.clone());
        // The context moves into the thread only if the spawn succeeds; keep the queue
        // reachable for the error path through a slot.
        let slot = Arc::new(Mutex::new(Some(ctx)));
        let thread_slot = slot.clone();
        let spawned = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                thread_body(&name, &thread_slot, &thread_wake, &thread_stop, &thread_tid)
            });
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

/// A worker thread: blocks SIGPIPE, records its tid, takes its context, runs the start hook
/// (the seccomp filter), then serves the queue until told to stop. A failing hook or a panic
/// ends the thread and the device needs a reset; a panic is counted and reported.
fn thread_body(
    name: &str,
    slot: &Mutex<Option<WorkerContext>>,
    wake: &EventFd,
    stop: &AtomicBool,
    tid: &AtomicI32,
) {
    crate::sigpipe::block_on_this_thread_or_log(name);
    // SAFETY: gettid has no preconditions.
    tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
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
