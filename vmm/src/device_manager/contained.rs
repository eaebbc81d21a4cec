//! Panic containment for device event handlers: a device that panics fails alone.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kestrel_devices::virtio::mmio::MmioTransport;
use kestrel_devices::virtio::status;
use kestrel_devices::{catch_panic, Panicked};
use vmm_sys_util::timerfd::TimerFd;

use super::lock_dev;
use crate::evloop::Subscriber;
use crate::metrics::VmCounters;

/// How often a failed device checks whether the driver has reset it.
const RESET_POLL: Duration = Duration::from_millis(50);

/// A device's event handler as the event loop sees it: every call into the device (`init`,
/// `process`) runs under [`catch_panic`]. A panic fails the device, not the VM: the transport
/// reports `DEVICE_NEEDS_RESET` (with a config-change interrupt), `device_panics` is counted,
/// and the device's handler is not called again until the driver resets the device. Meanwhile
/// each of its fds that fires is taken off the loop ("parked"; the loop is level-triggered, so
/// an undrained fd would spin it), and a timer polls the transport every [`RESET_POLL`]; once
/// the driver has reset the device its parked fds are watched again (for input, which is what
/// every device's queue, wake-up, timer and backend fds are watched for).
pub(crate) struct Contained {
    id: String,
    dev: Subscriber,
    transport: Arc<Mutex<MmioTransport>>,
    counters: Arc<VmCounters>,
    inject_panic: Arc<AtomicBool>,
    failed: bool,
    parked: Vec<(RawFd, u32)>,
    timer: Option<TimerFd>,
}

impl Contained {
    pub(crate) fn new(
        id: &str,
        dev: Subscriber,
        transport: Arc<Mutex<MmioTransport>>,
        counters: Arc<VmCounters>,
        inject_panic: Arc<AtomicBool>,
    ) -> Self {
        let timer = TimerFd::new()
            .map_err(|e| {
                tracing::warn!("device {id}: no reset timer ({e}); a panic fails it for good")
            })
            .ok();
        Contained {
            id: id.to_string(),
            dev,
            transport,
            counters,
            inject_panic,
            failed: false,
            parked: Vec::new(),
            timer,
        }
    }

    /// Call into the device, containing a panic. Returns false if it panicked.
    fn call(&mut self, f: impl FnOnce(&mut (dyn MutEventSubscriber + Send))) -> bool {
        let (dev, inject, id) = (&self.dev, &self.inject_panic, &self.id);
        let r = catch_panic(|| {
            let mut d = lock_dev(dev);
            if inject.swap(false, Ordering::SeqCst) {
                panic!("injected panic in the event handler of device {id}");
            }
            f(&mut *d)
        });
        match r {
            Ok(()) => true,
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    fn fail(&mut self, e: Panicked) {
        tracing::error!(
            "device {}: event handler {e}; the device needs a reset",
            self.id
        );
        VmCounters::bump(&self.counters.device_panics);
        self.failed = true;
        lock_dev(&self.transport).set_needs_reset();
        if let Some(t) = self.timer.as_mut() {
            if let Err(e) = t.reset(RESET_POLL, Some(RESET_POLL)) {
                tracing::warn!("device {}: cannot arm the reset timer: {e}", self.id);
            }
        }
    }

    fn park(&mut self, events: Events, ops: &mut EventOps) {
        // It may be gone already (the device removed it before panicking).
        let _ = ops.remove(events);
        if !self.parked.contains(&(events.fd(), events.data())) {
            self.parked.push((events.fd(), events.data()));
        }
    }

    /// Timer tick while failed: resume once the driver has reset the device.
    fn check_reset(&mut self, ops: &mut EventOps) {
        if let Some(t) = self.timer.as_mut() {
            let _ = t.wait();
        }
        if !self.failed {
            return;
        }
        let needs_reset = lock_dev(&self.transport).status() & status::DEVICE_NEEDS_RESET != 0;
        if needs_reset {
            return;
        }
        for (fd, data) in self.parked.drain(..) {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                tracing::debug!("device {}: fd {fd} not watched again: {e:?}", self.id);
            }
        }
        self.failed = false;
        if let Some(t) = self.timer.as_mut() {
            let _ = t.clear();
        }
        tracing::info!("device {}: reset by the driver, serving it again", self.id);
    }
}

impl MutEventSubscriber for Contained {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(t) = &self.timer {
            if let Err(e) = ops.add(Events::new(t, EventSet::IN)) {
                tracing::warn!("device {}: cannot watch the reset timer: {e:?}", self.id);
            }
        }
        self.call(|d| d.init(ops));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self
            .timer
            .as_ref()
            .is_some_and(|t| t.as_raw_fd() == events.fd())
        {
            self.check_reset(ops);
            return;
        }
        if self.failed || !self.call(|d| d.process(events, ops)) {
            self.park(events, ops);
        }
    }
}
