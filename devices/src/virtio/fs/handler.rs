//! The in-process virtio-fs device's queue handler: serves the queues on the event loop, or
//! hands request queues to worker threads (`worker.rs`) when the share asks for them.

use event_manager::EventOps;
use vm_memory::GuestAddressSpace;

use super::request::{drain_queue, report_panics};
use super::{lock_metrics, worker, FsDevice, FsMetrics, HIPRIO_QUEUE};
use crate::virtio::device::{QueueHandler, QueueState, Trigger, VirtioCore};

/// Most chains handled per queue notification before yielding the event loop.
const BATCH_LIMIT: usize = 256;

impl FsDevice {
    /// Serve queue `index` on the event loop (at most [`BATCH_LIMIT`] chains; the rest on the
    /// next pass), or wake the worker thread that serves it.
    pub(super) fn process_queue(&mut self, core: &mut VirtioCore, index: usize) {
        if core.is_failed() {
            return;
        }
        if let Some(w) = self.workers.get(index).and_then(Option::as_ref) {
            w.wake();
            return;
        }
        let Some(server) = self.server.as_ref() else {
            return;
        };
        let Some(active) = core.active_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(index) else {
            return;
        };
        let mem = active.mem.memory();
        let mut m = FsMetrics::default();
        let hiprio = index == HIPRIO_QUEUE;
        let r = drain_queue(
            queue,
            &mem,
            server,
            &active.interrupt,
            &mut m,
            hiprio,
            BATCH_LIMIT,
        );
        drop(mem);
        self.server_used |= m.requests + m.hiprio_requests > 0;
        lock_metrics(&self.metrics).add(&m);
        report_panics(&m, self.panic_hook.as_ref());
        match r {
            Ok(false) => {}
            // Come back through the event loop, after other devices had their turn.
            Ok(true) => core.rearm_queue(index),
            Err(why) => {
                core.fail(&format!("queue {index} failed: {why}"));
            }
        }
    }

    /// Handle every queue (after activation: notifications may have arrived before it).
    pub(super) fn process_all(&mut self, core: &mut VirtioCore) {
        for i in 0..core.queue_max_sizes().len() {
            self.process_queue(core, i);
        }
    }

    /// Start the worker threads (on the event loop, after activation): each takes its request
    /// queue; one that cannot be started leaves it to the event loop.
    fn start_workers(&mut self, core: &mut VirtioCore) {
        if !self.worker_threads || core.is_failed() {
            return;
        }
        let failed = core.failed_flag();
        let (name, tag) = (core.name().to_string(), core.id().to_string());
        let (Some(active), Some(server)) = (core.active_mut(), self.server.as_ref()) else {
            return;
        };
        for (i, slot) in active.queues.iter_mut().enumerate().skip(1) {
            if self.workers[i].is_some() {
                continue;
            }
            let handed = QueueState::from(&*slot);
            let ctx = worker::WorkerContext {
                tag: tag.clone(),
                index: i,
                queue: std::mem::take(slot),
                mem: active.mem.clone(),
                interrupt: active.interrupt.clone(),
                server: server.clone(),
                metrics: self.metrics.clone(),
                failed: failed.clone(),
                start_hook: self.worker_start_hook.clone(),
                panic_hook: self.panic_hook.clone(),
                inject_panic: self.inject_worker_panic.clone(),
            };
            let thread_name = format!("{}-q{i}", self.worker_name_prefix);
            match worker::Worker::spawn(thread_name, ctx, self.running_workers.clone()) {
                Ok(w) => {
                    self.server_used = true;
                    // Chains that arrived before the thread existed.
                    w.wake();
                    self.workers[i] = Some(w);
                    self.handed_over[i] = Some(handed);
                }
                Err((e, queue)) => {
                    tracing::warn!(
                        "{name}: no worker thread for queue {i} ({e}); serving it on the \
                         event loop"
                    );
                    if let Some(q) = queue {
                        *slot = q;
                    }
                }
            }
        }
    }

    /// Stop and join the worker threads: after this, none of them touches guest memory.
    pub(super) fn stop_workers(&mut self) {
        for w in self.workers.iter_mut() {
            if let Some(w) = w.take() {
                w.stop();
            }
        }
        self.handed_over.fill(None);
    }
}

impl QueueHandler for FsDevice {
    fn handle(&mut self, core: &mut VirtioCore, trigger: Trigger, _ops: &mut EventOps) {
        // Notifications before activation (or after a failure) are ignored.
        match trigger {
            Trigger::Wake => {
                self.start_workers(core);
                self.process_all(core);
            }
            Trigger::Queue(i) => self.process_queue(core, i),
            Trigger::Own { token, .. } => {
                tracing::warn!("{}: unexpected event {token}", core.name());
            }
        }
    }
}
