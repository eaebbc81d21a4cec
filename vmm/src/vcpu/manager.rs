//! Every vCPU of one VM in one place: creation (boot vCPUs and hot-plugged ones), their
//! threads (spawn, bookkeeping, join), plug, park, kick, and pause/resume.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestMemoryMmap;

use super::control::{VcpuControl, VcpuRunState};
use super::kick::VcpuThreads;
use super::{create_vcpu, setup_boot_vcpu, Vcpu, VcpuError, VcpuShared};
use crate::exit::VmExit;
use crate::seccomp::FilterClass;
use crate::snapshot::{restore_vcpu, save_vcpu, KvmSupport, SnapshotError, VcpuState};
use crate::threads::{self, Ready, SpawnError, ThreadEnv, ThreadKind};

/// How long plug, park, pause and resume wait for a vCPU thread to change state.
const STATE_CHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// A vCPU that exists (its KVM vCPU was created), with its park handshake.
struct VcpuSlot {
    id: u32,
    ctl: Arc<VcpuControl>,
}

/// The vCPUs of one VM and their threads.
pub(crate) struct VcpuManager {
    max_vcpus: u32,
    shared: Arc<VcpuShared>,
    threads: Arc<VcpuThreads>,
    /// Created vCPUs whose thread has not started yet (the boot vCPUs until `start`).
    pending: Mutex<Vec<Vcpu>>,
    /// Every vCPU that exists, in index order.
    slots: Mutex<Vec<VcpuSlot>>,
    /// Threads spawned and not joined yet.
    handles: Mutex<Vec<JoinHandle<()>>>,
    /// Whether the VM is paused: vCPUs plugged meanwhile start parked.
    paused: Mutex<bool>,
}

impl VcpuManager {
    /// No vCPUs yet; at most `max_vcpus` (never above `MAX_SUPPORTED_VCPUS`).
    pub(crate) fn new(shared: Arc<VcpuShared>, max_vcpus: u32) -> Self {
        VcpuManager {
            max_vcpus,
            shared,
            threads: Arc::default(),
            pending: Mutex::default(),
            slots: Mutex::default(),
            handles: Mutex::default(),
            paused: Mutex::new(false),
        }
    }

    /// vCPUs the guest can have (MP table size).
    pub(crate) fn max_vcpus(&self) -> u32 {
        self.max_vcpus
    }

    /// What the vCPU threads share (guest memory, buses, exit state, counters).
    pub(crate) fn shared(&self) -> &Arc<VcpuShared> {
        &self.shared
    }

    /// The vCPU threads as kicks see them (the event loop waits on them when the VM stops).
    pub(crate) fn threads(&self) -> Arc<VcpuThreads> {
        self.threads.clone()
    }

    /// Create vCPU `id` with the setup every vCPU needs; it joins the slots at once.
    fn create(&self, kvm: &Kvm, vm: &VmFd, id: u32) -> Result<Vcpu, VcpuError> {
        let fd = create_vcpu(kvm, vm, id, self.max_vcpus)?;
        let ctl = Arc::new(VcpuControl::default());
        ctl.request_paused(*lock(&self.paused));
        lock(&self.slots).push(VcpuSlot {
            id,
            ctl: ctl.clone(),
        });
        Ok(Vcpu {
            id,
            fd,
            shared: self.shared.clone(),
            ctl,
        })
    }

    /// Builder step: create the boot vCPUs `0..count`; their threads start with
    /// [`VcpuManager::start`].
    pub(crate) fn create_boot_vcpus(
        &self,
        kvm: &Kvm,
        vm: &VmFd,
        count: u32,
    ) -> Result<(), VcpuError> {
        for id in 0..count {
            let v = self.create(kvm, vm, id)?;
            lock(&self.pending).push(v);
        }
        Ok(())
    }

    /// Restore-only builder step: the created vCPUs take over `states` (one per vCPU, by
    /// index); those in `unplugged` start parked as hot-removed.
    pub(crate) fn restore_pending(
        &self,
        states: &[VcpuState],
        unplugged: &[u32],
        support: &KvmSupport,
    ) -> Result<(), SnapshotError> {
        let pending = lock(&self.pending);
        for v in pending.iter() {
            let state = states.iter().find(|s| s.id == v.id).ok_or_else(|| {
                SnapshotError::DeviceMismatch {
                    device: format!("vcpu{}", v.id),
                    reason: "the snapshot has no state for this vCPU".into(),
                }
            })?;
            restore_vcpu(&v.fd, state, support)?;
            if unplugged.contains(&v.id) {
                v.ctl.request_unplugged(true);
            }
        }
        Ok(())
    }

    /// Boot-only builder step: the boot vCPU (0) enters the kernel at `entry` in 64-bit mode.
    pub(crate) fn setup_boot_vcpu(
        &self,
        mem: &GuestMemoryMmap,
        entry: u64,
    ) -> Result<(), VcpuError> {
        let pending = lock(&self.pending);
        match pending.iter().find(|v| v.id == 0) {
            Some(v) => setup_boot_vcpu(&v.fd, mem, entry),
            None => Ok(()),
        }
    }

    /// Start the threads of the created vCPUs. Returns how many threads started (each reports
    /// its seccomp filter on `ready`) and the spawn failure that stopped the rest, if any.
    pub(crate) fn start(&self, env: &Arc<ThreadEnv>, ready: &Ready) -> (usize, Option<VcpuError>) {
        let vcpus = std::mem::take(&mut *lock(&self.pending));
        let mut handles = lock(&self.handles);
        let mut started = 0;
        for v in vcpus {
            match self.spawn(v, env, ready.clone()) {
                Ok(h) => {
                    handles.push(h);
                    started += 1;
                }
                Err(e) => return (started, Some(e.into())),
            }
        }
        (started, None)
    }

    /// Spawn the thread of vCPU `v`.
    fn spawn(
        &self,
        v: Vcpu,
        env: &Arc<ThreadEnv>,
        ready: Ready,
    ) -> Result<JoinHandle<()>, SpawnError> {
        let (id, ctl, shared, threads) = (
            v.id,
            v.ctl.clone(),
            self.shared.clone(),
            self.threads.clone(),
        );
        let role = format!("vcpu{id}");
        let name = env.thread_name(&role);
        self.threads.starting();
        let r = threads::spawn(
            env,
            &role,
            ThreadKind::Vcpu(id),
            FilterClass::Vcpu,
            ready,
            move |filtered| {
                threads.register_current(id);
                // Without its filter the thread never runs the guest (start/plug report it).
                if filtered {
                    if let Err(panic) = kestrel_devices::catch_panic(|| v.run_loop()) {
                        shared.exit.report(VmExit::ThreadPanicked {
                            thread: name,
                            message: panic.0,
                        });
                    }
                }
                ctl.set_state(VcpuRunState::Exited);
                threads.left_loop();
                // Wake the event loop so it sees the count drop.
                let _ = shared.exit.wake.write(1);
                // No kick may target this thread from now on (see `VcpuThreads`).
                threads.unregister(id);
            },
        );
        if r.is_err() {
            // It never entered its loop.
            self.threads.left_loop();
        }
        r
    }

    /// vCPUs that exist and their state, by index.
    pub(crate) fn states(&self) -> Vec<(u32, VcpuRunState)> {
        lock(&self.slots)
            .iter()
            .map(|s| (s.id, s.ctl.state()))
            .collect()
    }

    fn slot(&self, id: u32) -> Option<Arc<VcpuControl>> {
        lock(&self.slots)
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.ctl.clone())
    }

    fn index_error(&self, id: u32) -> VcpuError {
        VcpuError::Index {
            id,
            next: u32::try_from(lock(&self.slots).len()).unwrap_or(u32::MAX),
            max: self.max_vcpus,
        }
    }

    /// Make vCPU `id` runnable: unpark it if it exists, else create it (the next index, below
    /// `max_vcpus`) and start its thread; `stopping` is asked right before the spawn (a
    /// stopping VM gets no new thread). Waits for the thread's filter report.
    pub(crate) fn plug(
        &self,
        kvm: &Kvm,
        vm: &VmFd,
        id: u32,
        env: &Arc<ThreadEnv>,
        stopping: impl Fn() -> bool,
    ) -> Result<(), VcpuError> {
        if let Some(ctl) = self.slot(id) {
            ctl.request_unplugged(false);
            if !*lock(&self.paused) {
                ctl.wait_state(VcpuRunState::Running, STATE_CHANGE_TIMEOUT);
            }
            return Ok(());
        }
        let next = u32::try_from(lock(&self.slots).len()).unwrap_or(u32::MAX);
        if id != next || id >= self.max_vcpus {
            return Err(self.index_error(id));
        }
        let v = self.create(kvm, vm, id)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut handles = lock(&self.handles);
        if stopping() {
            return Err(VcpuError::NotRunning);
        }
        handles.push(self.spawn(v, env, tx)?);
        drop(handles);
        if let Ok(Err(e)) = rx.recv_timeout(STATE_CHANGE_TIMEOUT) {
            return Err(e.into());
        }
        Ok(())
    }

    /// Take vCPU `id` out of `KVM_RUN` and keep its thread waiting (after the guest offlined
    /// the CPU). vCPU 0 cannot be parked. Returns when the thread is parked.
    pub(crate) fn park(&self, id: u32) -> Result<(), VcpuError> {
        let ctl = match self.slot(id) {
            Some(ctl) if id != 0 => ctl,
            _ => return Err(self.index_error(id)),
        };
        ctl.request_unplugged(true);
        self.wait_parked(id, &ctl)
    }

    /// Kick vCPU `id` until its thread reports it is parked (or exited: `NotRunning`).
    fn wait_parked(&self, id: u32, ctl: &VcpuControl) -> Result<(), VcpuError> {
        let deadline = Instant::now() + STATE_CHANGE_TIMEOUT;
        while ctl.state() == VcpuRunState::Running && Instant::now() < deadline {
            self.threads.kick(Some(id));
            ctl.wait_state(VcpuRunState::Parked, Duration::from_millis(10));
        }
        match ctl.state() {
            VcpuRunState::Parked => Ok(()),
            _ => Err(VcpuError::NotRunning),
        }
    }

    /// Pause: every vCPU leaves `KVM_RUN` and parks (vCPUs plugged meanwhile start parked).
    /// Returns once all are parked.
    pub(crate) fn pause(&self) -> Result<(), VcpuError> {
        *lock(&self.paused) = true;
        let ctls: Vec<(u32, Arc<VcpuControl>)> = lock(&self.slots)
            .iter()
            .map(|s| (s.id, s.ctl.clone()))
            .collect();
        for (_, ctl) in &ctls {
            ctl.request_paused(true);
        }
        for (id, ctl) in &ctls {
            self.wait_parked(*id, ctl)?;
        }
        for (id, ctl) in &ctls {
            let id = *id;
            // The guest's soft-lockup watchdog then takes the pause for what it is instead
            // of a stall (PVCLOCK_GUEST_STOPPED); a guest without kvmclock says EINVAL.
            ctl.post_task(Box::new(move |fd| {
                if let Err(e) = fd.kvmclock_ctrl() {
                    tracing::debug!("vCPU {id}: KVM_KVMCLOCK_CTRL: {e}");
                }
            }));
        }
        Ok(())
    }

    /// Resume after [`VcpuManager::pause`]: every vCPU that is not hot-removed runs again.
    /// Returns once they run.
    pub(crate) fn resume(&self) {
        *lock(&self.paused) = false;
        let ctls: Vec<Arc<VcpuControl>> = lock(&self.slots).iter().map(|s| s.ctl.clone()).collect();
        for ctl in &ctls {
            ctl.request_paused(false);
        }
        for ctl in ctls.iter().filter(|c| !c.wants_parked()) {
            ctl.wait_state(VcpuRunState::Running, STATE_CHANGE_TIMEOUT);
        }
    }

    /// Whether the VM is paused ([`VcpuManager::pause`] without a resume since).
    pub(crate) fn is_paused(&self) -> bool {
        *lock(&self.paused)
    }

    /// The vCPUs that exist but are hot-removed, in index order.
    pub(crate) fn unplugged(&self) -> Vec<u32> {
        lock(&self.slots)
            .iter()
            .filter(|s| s.ctl.is_unplugged())
            .map(|s| s.id)
            .collect()
    }

    /// Save the KVM state of every vCPU that exists (plugged or hot-removed), in index order.
    /// Each is read on its own thread, which owns the fd and is parked: the VM must be paused.
    pub(crate) fn save_states(&self, support: &KvmSupport) -> Result<Vec<VcpuState>, VcpuError> {
        if !*lock(&self.paused) {
            return Err(VcpuError::NotPaused);
        }
        let ctls: Vec<(u32, Arc<VcpuControl>)> = lock(&self.slots)
            .iter()
            .map(|s| (s.id, s.ctl.clone()))
            .collect();
        let mut states = Vec::with_capacity(ctls.len());
        for (id, ctl) in ctls {
            let (tx, rx) = std::sync::mpsc::channel();
            let support = support.clone();
            ctl.post_task(Box::new(move |fd| {
                let _ = tx.send(save_vcpu(fd, id, &support));
            }));
            // The sender is dropped unanswered if the thread exits first.
            match rx.recv_timeout(STATE_CHANGE_TIMEOUT) {
                Ok(state) => states.push(state?),
                Err(_) => return Err(VcpuError::NotRunning),
            }
        }
        Ok(states)
    }

    /// Kick vCPU `only` (or all) out of `KVM_RUN`.
    pub(crate) fn kick(&self, only: Option<u32>) {
        self.threads.kick(only);
    }

    /// Whether every spawned vCPU thread has finished.
    pub(crate) fn finished(&self) -> bool {
        lock(&self.handles).iter().all(|h| h.is_finished())
    }

    /// Join the finished vCPU threads; detach (and log) the others.
    pub(crate) fn join_or_detach(&self, vm: &str, waited: Duration) {
        for h in lock(&self.handles).drain(..) {
            threads::join_or_detach(h, vm, "vCPU", waited);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
