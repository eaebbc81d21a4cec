//! The VM object: create → start → (pause/resume, hotplug, device operations) → wait/stop →
//! drop. Building is in [`crate::builder`], vCPUs in [`crate::vcpu::manager`], devices in
//! [`crate::device_manager`]; this module ties them together behind the public API.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kestrel_api::{SeccompMode, SerialOutput, VmConfig};
use kestrel_devices::legacy::{SerialDevice, I8042};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::builder::{self, BuiltVm, ConsoleSink};
use crate::device_manager::registry::DeviceRegistry;
use crate::device_manager::Device;
use crate::error::{io_err, VmmError};
use crate::evloop::{Console, EventLoop};
use crate::exit::{ExitState, ResetTrigger, ThreadClass, VmExit};
use crate::memory::{MemoryManager, PluggedRange};
use crate::metrics::VmMetrics;
use crate::snapshot;
use crate::threads::{ThreadEnv, ThreadInfo, ThreadKind, STOP_JOIN_TIMEOUT};

/// How long a pause waits for the event loop to end its pass.
const STATE_CHANGE_TIMEOUT: Duration = Duration::from_secs(5);
use crate::vcpu::control::VcpuRunState;
use crate::vcpu::manager::VcpuManager;
use crate::vcpu::{kick, VcpuError};

/// One microVM. `Send + Sync`: share it (e.g. in an `Arc`) to stop it from another thread.
pub struct Vm {
    name: String,
    /// The configuration the VM was built from (for a restored VM: the snapshot's, with the
    /// overrides applied).
    config: VmConfig,
    cmdline: String,
    // Field order matters for drop: vCPU fds and the devices go before the VM fd and guest
    // memory.
    vcpus: VcpuManager,
    evloop: EventLoop,
    devices: DeviceRegistry,
    /// Serialises hotplug and pause operations.
    resize: Mutex<()>,
    /// Serialises starting threads with joining them.
    lifecycle: Mutex<()>,
    vm_fd: VmFd,
    kvm: Kvm,
    memory: Mutex<MemoryManager>,
    exit: Arc<ExitState>,
    serial: Arc<Mutex<SerialDevice>>,
    forward_stdin: bool,
    started: AtomicBool,
    threads: Arc<ThreadEnv>,
    created_at: Instant,
    create_us: u64,
    /// What the filters do on a forbidden call (`kestrel.seccomp`, or the library's default).
    seccomp_mode: SeccompMode,
    // Keeps the serial irqfd alive as long as KVM may signal through it.
    _serial_irq: EventFd,
    /// The i8042, for [`Vm::send_ctrl_alt_del`].
    i8042: Arc<Mutex<I8042<ResetTrigger>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Microseconds, saturating (a VM does not live 584 000 years).
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A vCPU operation's error as the VM reports it ("not running" is the VM's own).
fn vcpu_err(e: VcpuError) -> VmmError {
    match e {
        VcpuError::NotRunning => VmmError::NotRunning,
        VcpuError::NotPaused => VmmError::NotPaused,
        e => e.into(),
    }
}

/// Where `config.serial` sends the console.
fn console_sink(config: &VmConfig) -> Result<ConsoleSink, VmmError> {
    Ok(match config.serial.output {
        // Never blocks the event loop on a full pipe, and leaves stdout's flags alone.
        SerialOutput::Stdout => Box::new(
            kestrel_devices::legacy::NonBlockingWriter::stdout().map_err(|source| {
                VmmError::SerialOutput {
                    path: "stdout".into(),
                    source,
                }
            })?,
        ),
        SerialOutput::None => Box::new(std::io::sink()),
        SerialOutput::File => {
            let path = config.serial.path.clone().unwrap_or_default();
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| VmmError::SerialOutput {
                    path: path.display().to_string(),
                    source,
                })?;
            Box::new(f)
        }
    })
}

impl Vm {
    /// Create a VM from `config`: validate, then create the KVM VM, guest memory, devices and
    /// boot vCPUs, and load the guest. No thread runs until [`Vm::start`]. On error everything
    /// created so far is released.
    pub fn create(config: &VmConfig) -> Result<Vm, VmmError> {
        config.validate_for_boot()?;
        Self::create_with_console(config, console_sink(config)?)
    }

    /// Like [`Vm::create`], with the serial console written to `console` instead of what
    /// `config.serial` says.
    pub fn create_with_console(config: &VmConfig, console: ConsoleSink) -> Result<Vm, VmmError> {
        Ok(Self::assemble(builder::build_for_boot(config, console)?))
    }

    /// Restore a VM from the snapshot directory `dir` (written by [`Vm::snapshot`]), with
    /// `overrides` applied to the snapshot's configuration. The VM is created, not started:
    /// [`Vm::start`] runs it on from where the snapshot was taken. The serial console goes
    /// where the snapshot's configuration says.
    pub fn restore(dir: &Path, overrides: &kestrel_api::RestoreOverrides) -> Result<Vm, VmmError> {
        Self::restore_files(&snapshot::SnapshotFiles::in_dir(dir), overrides, None)
    }

    /// Like [`Vm::restore`] from a state file and a memory file anywhere (Firecracker's
    /// `snapshot_path` and `mem_file_path`), the serial console written to `console` when
    /// given (else where the snapshot's configuration says).
    pub fn restore_files(
        files: &snapshot::SnapshotFiles,
        overrides: &kestrel_api::RestoreOverrides,
        console: Option<ConsoleSink>,
    ) -> Result<Vm, VmmError> {
        let began = std::time::Instant::now();
        let (state, config) = crate::restore::prepare(files, overrides)?;
        let console = match console {
            Some(c) => c,
            None => console_sink(&config)?,
        };
        let built = crate::restore::build_for_restore(files, &state, config, console, began)?;
        let vm = Self::assemble(built);
        tracing::info!(
            "VM {} restored from {} in {} us",
            vm.name,
            files.state.display(),
            vm.create_us
        );
        Ok(vm)
    }

    /// The configuration the VM runs with (a restored VM: the snapshot's with the overrides
    /// applied).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The VM made of what the builder built.
    fn assemble(p: BuiltVm<'_>) -> Vm {
        let create_us = micros(p.created_at.elapsed());
        let name = p.config.name().to_string();
        let mc = &p.config.machine_config;
        tracing::info!(
            "VM {name} created in {create_us} us: {} vCPUs (max {}), {} MiB, cmdline {:?}",
            mc.vcpu_count,
            p.vcpus.max_vcpus(),
            mc.mem_size_mib,
            p.cmdline
        );
        let m = p.machine;
        Vm {
            config: p.config.clone().into_owned(),
            threads: Arc::new(ThreadEnv::new(
                &name,
                p.seccomp,
                p.config.kestrel.thread_names(),
            )),
            name,
            cmdline: p.cmdline,
            vcpus: p.vcpus,
            evloop: EventLoop::new(p.subscribers),
            devices: p.registry,
            resize: Mutex::new(()),
            lifecycle: Mutex::new(()),
            vm_fd: m.vm_fd,
            kvm: m.kvm,
            memory: Mutex::new(m.memory),
            exit: m.exit,
            serial: m.legacy.serial,
            forward_stdin: p.config.serial.stdin,
            started: AtomicBool::new(false),
            created_at: p.created_at,
            create_us,
            seccomp_mode: p.seccomp_mode,
            _serial_irq: m.legacy.serial_irq,
            i8042: m.legacy.i8042,
        }
    }

    /// Start the event loop and the vCPU threads. Returns once every thread runs and has
    /// registered its thread id. On error the VM is stopped.
    pub fn start(&self) -> Result<(), VmmError> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Err(VmmError::AlreadyStarted);
        }
        if self.exit.stopping() {
            return Err(VmmError::NotRunning);
        }
        kick::install_kick_handler()?;
        let held = lock(&self.lifecycle);
        // Each thread reports whether its seccomp filter is in place.
        let (ready_tx, ready_rx) = mpsc::channel();
        let console = Console {
            serial: self.serial.clone(),
            forward_stdin: self.forward_stdin,
        };
        // The event loop first: it serves the devices the vCPUs drive.
        let others = self.vcpus.threads();
        let evloop = self.evloop.start(
            &self.exit,
            &console,
            others,
            &self.threads,
            ready_tx.clone(),
        );
        let (expected, mut error) = match evloop {
            Ok(()) => {
                let (started, e) = self.vcpus.start(&self.threads, &ready_tx);
                (started + 1, e.map(VmmError::from))
            }
            Err(e) => (0, Some(VmmError::from(e))),
        };
        drop(ready_tx);
        for _ in 0..expected {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    error.get_or_insert(e.into());
                }
                Err(_) => break,
            }
        }
        drop(held);
        if let Some(e) = error {
            self.exit.report(VmExit::Stopped);
            self.join_all();
            return Err(e);
        }
        Ok(())
    }

    /// The virtio device with this id (a drive id, an iface id, `vsock`, `fs<N>` for the N-th
    /// share), or `None`. Kind-specific operations are on the handle ([`Device::block`],
    /// [`Device::net`], [`Device::fs`]).
    pub fn device(&self, id: &str) -> Option<&Device> {
        self.devices.get(id)
    }

    /// Every virtio device of the VM, in the order the guest sees them.
    pub fn devices(&self) -> impl Iterator<Item = &Device> {
        self.devices.iter()
    }

    fn device_or_err(&self, id: &str) -> Result<&Device, VmmError> {
        self.device(id)
            .ok_or_else(|| VmmError::NoSuchDevice(id.to_string()))
    }

    /// vCPUs that exist and their state (running, parked, exited), by index.
    pub fn vcpu_states(&self) -> Vec<(u32, VcpuRunState)> {
        self.vcpus.states()
    }

    /// Make vCPU `id` runnable: unpark it if it exists, else create it (CPUID, MSRs, FPU, LAPIC
    /// as for boot vCPUs) and start its thread. The thread id appears in [`Vm::threads`] as soon
    /// as the thread runs. vCPUs are added in order: `id` must be an existing vCPU or the next
    /// index, and below `max_vcpus`. The guest still has to online the CPU. On a paused VM the
    /// vCPU stays parked until [`Vm::resume`].
    pub fn plug_vcpu(&self, id: u32) -> Result<(), VmmError> {
        let _serial = lock(&self.resize);
        self.ensure_running()?;
        let stopping = || self.exit.stopping();
        self.vcpus
            .plug(&self.kvm, &self.vm_fd, id, &self.threads, stopping)
            .map_err(vcpu_err)?;
        tracing::info!("VM {}: vCPU {id} plugged", self.name);
        Ok(())
    }

    /// Take vCPU `id` out of `KVM_RUN` and keep its thread waiting (after the guest offlined
    /// the CPU). vCPU 0 cannot be parked. Returns when the thread is parked.
    pub fn park_vcpu(&self, id: u32) -> Result<(), VmmError> {
        let _serial = lock(&self.resize);
        self.ensure_running()?;
        self.vcpus.park(id).map_err(vcpu_err)
    }

    /// Pause the guest: every vCPU leaves `KVM_RUN` and parks, then the event loop finishes
    /// its pass (what the devices had in flight completes) and waits, so no device touches
    /// guest memory or changes state until [`Vm::resume`]. Returns once both hold. Pausing a
    /// paused VM does nothing. [`Vm::stop`] works on a paused VM. In-process virtio-fs
    /// workers finish the requests they took; they get no new ones (the vCPUs are parked).
    pub fn pause(&self) -> Result<(), VmmError> {
        let _serial = lock(&self.resize);
        self.ensure_running()?;
        self.vcpus.pause().map_err(vcpu_err)?;
        // Devices next: the loop ends its pass and waits (the vCPUs no longer notify).
        if !self
            .evloop
            .gate
            .close(&self.exit.wake, STATE_CHANGE_TIMEOUT)
        {
            self.evloop.gate.open();
            self.vcpus.resume();
            return Err(VmmError::NotRunning);
        }
        Ok(())
    }

    /// Resume a paused guest: the devices are served again, then every vCPU that is not
    /// hot-removed runs again. Returns once they run. Resuming a VM that is not paused does
    /// nothing.
    pub fn resume(&self) -> Result<(), VmmError> {
        let _serial = lock(&self.resize);
        self.ensure_running()?;
        self.evloop.gate.open();
        self.vcpus.resume();
        Ok(())
    }

    /// Whether the VM is paused ([`Vm::pause`] without a [`Vm::resume`] since).
    pub fn is_paused(&self) -> bool {
        self.vcpus.is_paused()
    }

    /// Snapshot the paused VM into the directory `dir` (created if missing): the guest memory
    /// in `dir/memory` ([`snapshot::MEMORY_FILE`]) and everything else in the state file
    /// `dir/state` ([`snapshot::STATE_FILE`]: every vCPU, the irqchips, PIT and clock, every
    /// device's transport and own state, the memory layout). The state file is written last
    /// and atomically: a directory without it holds no snapshot. The VM stays paused.
    ///
    /// Not yet covered (issue 13): devices are not quiesced by [`Vm::pause`] (a request the
    /// event loop completes while the memory file is written may be half in it), rate-limiter
    /// buckets are not saved, and there is no restore yet.
    ///
    /// # Errors
    /// [`VmmError::NotRunning`], [`VmmError::NotPaused`]; [`VmmError::Snapshot`] naming a
    /// device that cannot be saved (checked before anything is written), a KVM ioctl or the
    /// memory file; [`VmmError::StateFile`]; [`VmmError::Io`] if `dir` cannot be created.
    pub fn snapshot(&self, dir: &Path) -> Result<(), VmmError> {
        self.ensure_running()?;
        if !self.vcpus.is_paused() {
            return Err(VmmError::NotPaused);
        }
        std::fs::create_dir_all(dir).map_err(io_err("creating the snapshot directory"))?;
        self.snapshot_files(&snapshot::SnapshotFiles::in_dir(dir))
    }

    /// Like [`Vm::snapshot`], the state and the guest memory written to the two files
    /// `files` names (Firecracker's `snapshot_path` and `mem_file_path`).
    pub fn snapshot_files(&self, files: &snapshot::SnapshotFiles) -> Result<(), VmmError> {
        let _serial = lock(&self.resize);
        self.ensure_running()?;
        if !self.vcpus.is_paused() {
            return Err(VmmError::NotPaused);
        }
        let devices = self
            .devices
            .iter()
            .map(Device::snapshot_state)
            .collect::<Result<Vec<_>, _>>()?;
        let support = snapshot::KvmSupport::probe(&self.kvm, &self.vm_fd)?;
        let vcpus = self.vcpus.save_states(&support).map_err(vcpu_err)?;
        let vm = snapshot::save_vm(&self.vm_fd)?;
        let mem = self.guest_memory();
        let memory = snapshot::write_memory_file(&files.memory, &mem)?;
        let plugged_memory = lock(&self.memory)
            .plugged()
            .iter()
            .map(|p| snapshot::PluggedMemory {
                addr: p.addr,
                size: p.size,
            })
            .collect();
        let mut state = snapshot::SnapshotState::new(vm, vcpus);
        state.devices = devices;
        state.memory = memory;
        state.hotplug = snapshot::HotplugState {
            unplugged_vcpus: self.vcpus.unplugged(),
            plugged_memory,
        };
        state.cmdline = self.cmdline.clone();
        state.config = Some(self.config.clone());
        state.serial = lock(&self.serial).state();
        state.pvfpu = self.vcpus.shared().pvfpu;
        snapshot::write_state_file(&files.state, &state)?;
        tracing::info!(
            "VM {}: snapshot written to {} and {}",
            self.name,
            files.state.display(),
            files.memory.display()
        );
        Ok(())
    }

    /// Press Ctrl-Alt-Del on the guest's i8042 keyboard (Firecracker's `SendCtrlAltDel`): a
    /// Linux guest with the i8042 and AT keyboard drivers reboots (the VM then stops with
    /// [`VmExit::Reset`]) or, if its init asked for it, gets `SIGINT` in init.
    pub fn send_ctrl_alt_del(&self) -> Result<(), VmmError> {
        self.ensure_running()?;
        lock(&self.i8042)
            .trigger_ctrl_alt_del()
            .map_err(VmmError::CtrlAltDel)
    }

    /// Hot-plug `size` bytes of RAM (a multiple of `block`) at the lowest free address of the
    /// hotplug region. The guest still has to probe and online it.
    pub fn add_memory(&self, size: u64, block: u64) -> Result<PluggedRange, VmmError> {
        let _serial = lock(&self.resize);
        self.ensure_running()?;
        let r = lock(&self.memory).add(&self.vm_fd, size, block)?;
        self.devices.refresh_vhost_user_memory();
        Ok(r)
    }

    /// Unplug a range returned by [`Vm::add_memory`] (after the guest offlined it); its host
    /// pages are released.
    pub fn remove_memory(&self, addr: u64, size: u64) -> Result<(), VmmError> {
        let _serial = lock(&self.resize);
        lock(&self.memory).remove(&self.vm_fd, addr, size)?;
        self.devices.refresh_vhost_user_memory();
        Ok(())
    }

    /// Hot-plugged memory ranges.
    pub fn plugged_memory(&self) -> Vec<PluggedRange> {
        lock(&self.memory).plugged()
    }

    /// The hotplug region (guest-physical address, size), if memory hotplug is enabled.
    pub fn hotplug_region(&self) -> Option<(u64, u64)> {
        lock(&self.memory).hotplug_region()
    }

    /// Host virtual address ranges of guest RAM (for RSS accounting).
    pub fn guest_memory_host_ranges(&self) -> Vec<(u64, u64)> {
        lock(&self.memory).host_ranges()
    }

    /// Whether guest RAM is memfd-backed (shareable with vhost-user backends).
    pub fn guest_memory_is_shared(&self) -> bool {
        lock(&self.memory).is_shared()
    }

    fn ensure_running(&self) -> Result<(), VmmError> {
        if !self.started.load(Ordering::SeqCst) || self.exit.stopping() {
            return Err(VmmError::NotRunning);
        }
        Ok(())
    }

    /// Block until the VM stops, then release its threads. Returns why it stopped.
    pub fn wait(&self) -> VmExit {
        let r = self.exit.wait(None).unwrap_or(VmExit::Stopped);
        self.join_all();
        r
    }

    /// Like [`Vm::wait`] with a timeout: `None` if the VM still runs after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        let r = self.exit.wait(Some(timeout))?;
        self.join_all();
        Some(r)
    }

    /// Stop the VM (from any thread, at any time; idempotent). Returns once every thread of the
    /// VM has been joined, with the reason the VM stopped (`Stopped` unless it had stopped
    /// already for another reason).
    pub fn stop(&self) -> VmExit {
        self.exit.report(VmExit::Stopped);
        self.join_all();
        self.exit.reason().unwrap_or(VmExit::Stopped)
    }

    /// The exit reason, if the VM has stopped.
    pub fn exit_reason(&self) -> Option<VmExit> {
        self.exit.reason()
    }

    /// Whether every thread of the stopped VM has ended. virtio-fs workers are told to end
    /// (after the request they serve) on every call: the loop may start one until it ends.
    fn all_threads_done(&self) -> bool {
        for s in self.devices.fs_shares() {
            s.workers.stop_all();
        }
        self.evloop.finished()
            && self.vcpus.finished()
            && self.devices.fs_shares().all(|s| s.workers.is_empty())
    }

    /// Join every thread of the stopped VM, for at most [`STOP_JOIN_TIMEOUT`]: meanwhile the
    /// vCPU threads are kicked out of `KVM_RUN` from here too (in case the event loop cannot
    /// wait for them). Threads still running at the deadline are detached and logged; fs
    /// workers are joined by their devices when they drop.
    fn join_all(&self) {
        let _held = lock(&self.lifecycle);
        let deadline = Instant::now() + STOP_JOIN_TIMEOUT;
        let mut pause = Duration::from_micros(200);
        while !self.all_threads_done() && Instant::now() < deadline {
            if self.exit.stopping() {
                self.vcpus.kick(None);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        self.evloop.join_or_detach(&self.name, STOP_JOIN_TIMEOUT);
        self.vcpus.join_or_detach(&self.name, STOP_JOIN_TIMEOUT);
        for w in self.devices.fs_shares().flat_map(|s| s.workers.list()) {
            tracing::error!(
                "VM {}: virtio-fs worker {} did not finish within {STOP_JOIN_TIMEOUT:?}; \
                 its device joins it when dropped",
                self.name,
                w.name
            );
        }
        self.threads.clear();
    }

    /// Test-only fault injection: make `class` panic, to prove panics are contained (a vCPU
    /// or the event loop: the VM stops with [`VmExit::ThreadPanicked`]; a device's handler or
    /// a virtio-fs worker thread: the device needs a reset, `device_panics` counts it and the
    /// VM runs on). The panic fires once, at the next pass of that thread's loop (vCPU `N` is
    /// kicked out of `KVM_RUN` for it, fs workers are woken; a worker the device starts later
    /// takes it if none runs yet) or at the device's next event (one is signalled here).
    #[doc(hidden)]
    pub fn inject_panic(&self, class: ThreadClass) -> Result<(), VmmError> {
        match class {
            ThreadClass::Vcpu(id) => {
                self.exit.faults.arm_vcpu(id);
                self.vcpus.kick(Some(id));
            }
            ThreadClass::EventLoop => {
                self.exit.faults.arm_evloop();
                self.exit
                    .wake
                    .write(1)
                    .map_err(io_err("waking the event loop"))?;
            }
            ThreadClass::FsWorker(id) => {
                let d = self.device_or_err(&id)?;
                let injected = d
                    .fs_share()
                    .is_some_and(|s| lock(&s.dev).inject_worker_panic());
                if !injected {
                    return Err(VmmError::NoFsWorkers(id));
                }
            }
            ThreadClass::Device(id) => self
                .device_or_err(&id)?
                .inject_handler_panic()
                .map_err(io_err("signalling a device event"))?,
        }
        Ok(())
    }

    /// Test-only: run `task` once on the event-loop thread (under its seccomp filter), at the
    /// loop's next pass (it is woken here). Proves what the filter stops.
    #[doc(hidden)]
    pub fn run_on_event_loop(&self, task: Box<dyn FnOnce() + Send>) -> Result<(), VmmError> {
        self.ensure_running()?;
        self.exit
            .faults
            .set_evloop_task(crate::exit::EvloopTask(task));
        self.exit
            .wake
            .write(1)
            .map_err(io_err("waking the event loop"))
    }

    /// Threads of the running VM with their Linux thread ids: the event loop, the vCPUs and the
    /// virtio-fs worker threads that run now (a share's workers start when the guest's driver
    /// brings the device up and are replaced at a device reset, so ask again after either).
    /// Empty once the VM has stopped: its threads are joined, its fs workers ended.
    pub fn threads(&self) -> Vec<ThreadInfo> {
        let mut threads = self.threads.list();
        for s in self.devices.fs_shares() {
            threads.extend(s.workers.list().into_iter().map(|w| ThreadInfo {
                name: w.name,
                tid: w.tid,
                kind: ThreadKind::FsWorker {
                    share: s.index,
                    queue: w.queue,
                },
            }));
        }
        threads
    }

    /// What the VM's seccomp filters do on a forbidden call: `kestrel.seccomp`, or when absent
    /// the library's default, [`SeccompMode::Errno`] (`Off`: no filters).
    pub fn seccomp_mode(&self) -> SeccompMode {
        self.seccomp_mode
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// vCPUs the guest can have (MP table size).
    pub fn max_vcpus(&self) -> u32 {
        self.vcpus.max_vcpus()
    }

    /// The kernel command line the guest was given.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Counters and timings of the VM (per-device counters: [`Device::metrics`]).
    pub fn metrics(&self) -> VmMetrics {
        let shared = self.vcpus.shared();
        let mut m = shared.counters.snapshot();
        m.create_us = self.create_us;
        m.setup_to_first_run_us = shared
            .first_run
            .get()
            .map(|t| micros(t.duration_since(self.created_at)));
        let serial = lock(&self.serial);
        m.serial_tx_bytes = serial.tx_bytes();
        m.serial_dropped_bytes = serial.output_dropped();
        drop(serial);
        m
    }

    /// A snapshot of guest memory (for tests, diagnostics and device models).
    pub fn guest_memory(&self) -> Arc<GuestMemoryMmap> {
        self.vcpus.shared().mem.memory().into_inner()
    }

    /// The KVM VM fd (for callers that add their own devices).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.exit.report(VmExit::Stopped);
        self.join_all();
    }
}
