//! The VM object: create → start → wait → stop → drop.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use kestrel_api::{GuestCompat, SeccompMode, SerialOutput, VmConfig, MAX_SUPPORTED_VCPUS};
use kestrel_devices::legacy::{
    Cmos, SerialDevice, CMOS_PORT_BASE, CMOS_PORT_LEN, COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN,
    I8042, I8042_PORT_BASE, I8042_PORT_LEN,
};
use kestrel_devices::virtio::block::{Block, BlockConfig};
use kestrel_devices::virtio::fs::vhost_user::{VhostUserFs, VhostUserFsConfig, VhostUserFsError};
use kestrel_devices::virtio::fs::{Fs, FsConfig, FsWorkers};
use kestrel_devices::virtio::net::{Net, NetConfig};
use kestrel_devices::virtio::vsock::{Vsock, VsockConfig};
use kestrel_devices::Bus;
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::boot;
use crate::device_manager::{DeviceHandle, DeviceManager};
use crate::error::{io_err, kvm_err, VmmError};
use crate::evloop::{self, kick_vcpus, ConsoleInput, Control, Subscriber, VcpuThreads};
use crate::exit::{ExitState, ResetTrigger, ThreadClass, VmExit};
use crate::memory::{MemoryManager, PluggedRange};
use crate::metrics::{VmCounters, VmMetrics};
use crate::pvfpu;
use crate::seccomp::{self, FilterClass, Filters, SeccompError};
use crate::vcpu::{self, Vcpu, VcpuControl, VcpuRunState, VcpuShared};

/// Address of the TSS KVM needs on Intel (three pages just below the IOAPIC... well below 4 GiB).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// How long [`Vm::stop`], [`Vm::wait`] and drop wait for the VM's threads to finish after the
/// VM stopped. A thread still running then (stuck in a device backend, say) is detached and
/// logged; it holds its own references and releases them when it ends.
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
    /// `kestrel-<vm>-fs<N>-q<Q>`); Linux keeps a 15-byte form
    /// ([`kestrel_devices::os_thread_name`]: `k-<vm>-vcpu<N>`...).
    pub name: String,
    /// Linux thread id.
    pub tid: i32,
    /// Role.
    pub kind: ThreadKind,
}

/// Where the serial console writes (from the event loop: it should return `WouldBlock` rather
/// than block, see `kestrel_devices::legacy::NonBlockingWriter`).
pub type ConsoleSink = Box<dyn Write + Send>;

/// A virtio-fs share: in-process or vhost-user (tag, device).
enum FsShare {
    InProcess(InProcessShare),
    VhostUser(String, Arc<Mutex<VhostUserFs>>),
}

/// An in-process virtio-fs share.
struct InProcessShare {
    /// Index in `VmConfig::fs`; the device id is `fs<index>`.
    index: u32,
    id: String,
    tag: String,
    dev: Arc<Mutex<Fs>>,
    /// Its running worker threads (read without the device's lock).
    workers: FsWorkers,
}

struct VcpuSlot {
    id: u32,
    ctl: Arc<VcpuControl>,
}

struct Threads {
    evloop: Option<JoinHandle<()>>,
    vcpus: Vec<JoinHandle<()>>,
}

/// One microVM. `Send + Sync`: share it (e.g. in an `Arc`) to stop it from another thread.
pub struct Vm {
    name: String,
    max_vcpus: u32,
    cmdline: String,
    // Field order matters for drop: vCPU fds and the VM fd go before guest memory is unmapped.
    pending_vcpus: Mutex<Vec<Vcpu>>,
    /// Device subscribers handed to the event loop at start.
    subscribers: Mutex<Vec<Subscriber>>,
    drives: Vec<(String, Arc<Mutex<Block>>)>,
    nets: Vec<(String, Arc<Mutex<Net>>)>,
    vsock: Option<Arc<Mutex<Vsock>>>,
    shares: Vec<FsShare>,
    devices: Vec<DeviceHandle>,
    vcpu_slots: Mutex<Vec<VcpuSlot>>,
    /// Serialises hotplug operations.
    resize: Mutex<()>,
    vm_fd: VmFd,
    kvm: Kvm,
    memory: Mutex<MemoryManager>,
    shared: Arc<VcpuShared>,
    exit: Arc<ExitState>,
    serial: Arc<Mutex<SerialDevice>>,
    forward_stdin: bool,
    started: AtomicBool,
    threads: Mutex<Threads>,
    thread_info: Arc<Mutex<Vec<ThreadInfo>>>,
    vcpu_pthreads: VcpuThreads,
    created_at: Instant,
    create_us: u64,
    /// Seccomp filters of the VM's threads (`None`: off).
    seccomp: Option<Filters>,
    /// What the filters do on a forbidden call (`kestrel.seccomp`, or the library's default).
    seccomp_mode: SeccompMode,
    // Keeps the serial irqfd alive as long as KVM may signal through it.
    _serial_irq: EventFd,
}

/// Resolve `max_vcpus`: the configured value, or when absent/0 the host's CPU count, never below
/// `vcpu_count`, never above KVM's or the MP table's limit.
pub fn effective_max_vcpus(config: &VmConfig, host_cpus: u32, kvm_max: u32) -> u32 {
    let limit = kvm_max.min(MAX_SUPPORTED_VCPUS);
    let wanted = match config.machine_config.max_vcpus {
        Some(n) if n > 0 => n,
        _ => host_cpus.max(config.machine_config.vcpu_count),
    };
    wanted.min(limit)
}

fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

impl Vm {
    /// Create a VM from `config`: validate, then create the KVM VM, guest memory, devices and
    /// boot vCPUs, and load the guest. No thread runs until [`Vm::start`]. On error everything
    /// created so far is released.
    pub fn create(config: &VmConfig) -> Result<Vm, VmmError> {
        config.validate_for_boot()?;
        let sink: ConsoleSink = match config.serial.output {
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
        };
        Self::create_with_console(config, sink)
    }

    /// Like [`Vm::create`], with the serial console written to `console` instead of what
    /// `config.serial` says.
    pub fn create_with_console(config: &VmConfig, console: ConsoleSink) -> Result<Vm, VmmError> {
        let t0 = Instant::now();
        config.validate_for_boot()?;
        let mc = &config.machine_config;
        let seccomp_mode = config.kestrel.seccomp_or(SeccompMode::Errno);
        let seccomp = Filters::build(seccomp_mode)?;

        let kvm = Kvm::new().map_err(VmmError::KvmOpen)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmmError::KvmApiVersion(api));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmmError::KvmCapability(name));
            }
        }
        let max_vcpus = effective_max_vcpus(config, host_cpus(), kvm.get_max_vcpus() as u32);
        if mc.vcpu_count > max_vcpus {
            return Err(kestrel_api::ConfigError::invalid(
                "machine-config.vcpu_count",
                format!(
                    "{} is above this host's KVM limit of {max_vcpus}",
                    mc.vcpu_count
                ),
            )
            .into());
        }

        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let mem_size = mc.mem_size_mib << 20;
        let max_mem_size = mc.max_mem_size_mib.unwrap_or(mc.mem_size_mib) << 20;
        // vhost-user backends map guest memory themselves: memfd-backed MAP_SHARED then.
        let shared = config.needs_shared_memory();
        let memory =
            MemoryManager::new(&vm_fd, mem_size, max_mem_size, shared).map_err(VmmError::Memory)?;
        let guest_mem = memory.guest_memory();
        let mem = guest_mem.memory();
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        // Guest image.
        let kernel = boot::load_kernel(&mem, &config.boot_source.kernel_image_path)?;
        let initrd = match &config.boot_source.initrd_path {
            Some(p) => Some(boot::load_initrd(&mem, mem_size, p, kernel.end)?),
            None => None,
        };
        let software_kvm = match config.kestrel.guest_compat {
            GuestCompat::Auto => boot::host_kvm_is_software(),
            GuestCompat::Always => true,
            GuestCompat::Never => false,
        };
        // Virtio devices: root drive first so it is /dev/vda.
        let counters = Arc::new(VmCounters::default());
        let mut dm =
            DeviceManager::new(guest_mem.clone(), counters.clone()).map_err(VmmError::Device)?;
        let mut extra_args = Vec::new();
        let mut drives = Vec::new();
        let mut order: Vec<&kestrel_api::DriveConfig> = config.drives.iter().collect();
        order.sort_by_key(|d| !d.is_root_device);
        for (i, d) in order.iter().enumerate() {
            let blk = BlockConfig::try_from(*d).and_then(|c| Block::new(&c));
            let blk = blk.map_err(|source| VmmError::Block {
                drive_id: d.drive_id.clone(),
                source,
            })?;
            let blk = Arc::new(Mutex::new(blk));
            dm.add_virtio(&vm_fd, &d.drive_id, blk.clone())
                .map_err(VmmError::Device)?;
            if d.is_root_device {
                let root = match &d.partuuid {
                    Some(u) => format!("root=PARTUUID={u}"),
                    None => format!("root=/dev/vd{}", (b'a' + i as u8) as char),
                };
                extra_args.push(root);
                extra_args.push(if d.is_read_only { "ro" } else { "rw" }.to_string());
            }
            drives.push((d.drive_id.clone(), blk));
        }
        let mut nets = Vec::new();
        for n in &config.network_interfaces {
            let dev = NetConfig::try_from(n).and_then(|c| Net::new(&c));
            let dev = dev.map_err(|source| VmmError::Net {
                iface_id: n.iface_id.clone(),
                source,
            })?;
            let dev = Arc::new(Mutex::new(dev));
            dm.add_virtio(&vm_fd, &n.iface_id, dev.clone())
                .map_err(VmmError::Device)?;
            nets.push((n.iface_id.clone(), dev));
        }
        let mut vsock = None;
        if let Some(vc) = &config.vsock {
            let v = VsockConfig::try_from(vc).and_then(|c| Vsock::new(&c));
            let v = v.map_err(VmmError::Vsock)?;
            let v = Arc::new(Mutex::new(v));
            dm.add_virtio(&vm_fd, "vsock", v.clone())
                .map_err(VmmError::Device)?;
            vsock = Some(v);
        }
        let mut shares = Vec::new();
        for (i, fc) in config.fs.iter().enumerate() {
            let id = format!("fs{i}");
            if fc.socket.is_some() {
                let d = VhostUserFsConfig::try_from(fc).map_err(VhostUserFsError::from);
                let d = d.and_then(|c| VhostUserFs::new(&c));
                let d = d.map_err(|source| VmmError::VhostUserFs {
                    tag: fc.tag.clone(),
                    source,
                })?;
                let d = Arc::new(Mutex::new(d));
                dm.add_virtio(&vm_fd, &id, d.clone())
                    .map_err(VmmError::Device)?;
                shares.push(FsShare::VhostUser(fc.tag.clone(), d));
            } else {
                let d = FsConfig::try_from(fc).and_then(|c| Fs::new(&c));
                let mut d = d.map_err(|source| VmmError::Fs {
                    tag: fc.tag.clone(),
                    source,
                })?;
                d.set_worker_name_prefix(&format!("kestrel-{}-{id}", config.name()));
                let panics = counters.clone();
                d.set_panic_hook(Some(Arc::new(move || {
                    VmCounters::bump(&panics.device_panics)
                })));
                d.set_worker_start_hook(seccomp.as_ref().map(|f| {
                    let prog = f.program(FilterClass::FsWorker).clone();
                    let hook: kestrel_devices::ThreadStartHook = Arc::new(move || {
                        seccomp::install(FilterClass::FsWorker, &prog).map_err(|e| e.to_string())
                    });
                    hook
                }));
                let workers = d.worker_threads();
                let d = Arc::new(Mutex::new(d));
                dm.add_virtio(&vm_fd, &id, d.clone())
                    .map_err(VmmError::Device)?;
                shares.push(FsShare::InProcess(InProcessShare {
                    index: i as u32,
                    id,
                    tag: fc.tag.clone(),
                    dev: d,
                    workers,
                }));
            }
        }
        extra_args.extend(dm.cmdline.iter().cloned());
        // Guest tasks' AVX state on a software KVM (docs/nested-kvm.md §10).
        let pvfpu = software_kvm && config.kestrel.xstate_assist && pvfpu::supported(&vm_fd);
        if pvfpu {
            extra_args.push(pvfpu::CMDLINE_FLAG.to_string());
        }
        let cmdline = boot::build_cmdline(config, max_vcpus, software_kvm, &extra_args)?;
        boot::write_boot_data(&mem, mem_size, &cmdline, initrd, &kernel, max_vcpus)?;
        let cmdline_str = cmdline
            .as_cstring()
            .map_err(VmmError::Cmdline)?
            .to_string_lossy()
            .into_owned();

        // Legacy devices.
        let exit = Arc::new(ExitState::new().map_err(io_err("creating the control eventfd"))?);
        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("creating the serial irq eventfd"))?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq
                .try_clone()
                .map_err(io_err("cloning the serial irq eventfd"))?,
            console,
        )));
        let mut pio = Bus::new();
        pio.insert(serial.clone(), COM1_PORT_BASE, COM1_PORT_LEN)
            .map_err(|source| VmmError::Bus {
                device: "serial",
                source,
            })?;
        pio.insert(
            Arc::new(Mutex::new(Cmos::default())),
            CMOS_PORT_BASE,
            CMOS_PORT_LEN,
        )
        .map_err(|source| VmmError::Bus {
            device: "cmos",
            source,
        })?;
        let i8042 = Arc::new(Mutex::new(I8042::new(ResetTrigger(exit.clone()))));
        pio.insert(i8042, I8042_PORT_BASE, I8042_PORT_LEN)
            .map_err(|source| VmmError::Bus {
                device: "i8042",
                source,
            })?;

        drop(mem);
        let shared = Arc::new(VcpuShared {
            mem: guest_mem.clone(),
            pio,
            mmio: std::mem::take(&mut dm.mmio_bus),
            exit: exit.clone(),
            counters,
            running: AtomicUsize::new(0),
            first_run: std::sync::OnceLock::new(),
            pvfpu,
        });

        // Boot vCPUs.
        let mut vcpus = Vec::with_capacity(mc.vcpu_count as usize);
        let mut slots = Vec::with_capacity(mc.vcpu_count as usize);
        for id in 0..mc.vcpu_count {
            let fd = vcpu::create_vcpu(&kvm, &vm_fd, id, max_vcpus)?;
            if id == 0 {
                vcpu::setup_boot_vcpu(&fd, &guest_mem.memory(), kernel.entry)?;
            }
            let ctl = Arc::new(VcpuControl::new(false));
            slots.push(VcpuSlot {
                id,
                ctl: ctl.clone(),
            });
            vcpus.push(Vcpu {
                id,
                fd,
                shared: shared.clone(),
                ctl,
            });
        }

        let create_us = t0.elapsed().as_micros() as u64;
        tracing::info!(
            "VM {} created in {create_us} us: {} vCPUs (max {max_vcpus}), {} MiB, cmdline {cmdline_str:?}",
            config.name(),
            mc.vcpu_count,
            mc.mem_size_mib
        );
        Ok(Vm {
            name: config.name().to_string(),
            max_vcpus,
            cmdline: cmdline_str,
            pending_vcpus: Mutex::new(vcpus),
            subscribers: Mutex::new(std::mem::take(&mut dm.subscribers)),
            drives,
            nets,
            vsock,
            shares,
            devices: std::mem::take(&mut dm.handles),
            vcpu_slots: Mutex::new(slots),
            resize: Mutex::new(()),
            vm_fd,
            kvm,
            memory: Mutex::new(memory),
            shared,
            exit,
            serial,
            forward_stdin: config.serial.stdin,
            started: AtomicBool::new(false),
            threads: Mutex::new(Threads {
                evloop: None,
                vcpus: Vec::new(),
            }),
            thread_info: Arc::new(Mutex::new(Vec::new())),
            vcpu_pthreads: Arc::new(Mutex::new(Vec::new())),
            created_at: t0,
            create_us,
            seccomp,
            seccomp_mode,
            _serial_irq: serial_irq,
        })
    }

    /// Start the event loop and the vCPU threads. Returns once every thread runs and has
    /// registered its thread id.
    pub fn start(&self) -> Result<(), VmmError> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Err(VmmError::AlreadyStarted);
        }
        if self.exit.stopping() {
            return Err(VmmError::NotRunning);
        }
        vcpu::install_kick_handler()?;

        let mut em = EventManager::<Subscriber>::new().map_err(VmmError::EventManager)?;
        em.add_subscriber(Arc::new(Mutex::new(Control {
            exit: self.exit.clone(),
        })));
        for sub in std::mem::take(&mut *self.subscribers.lock().unwrap_or_else(|p| p.into_inner()))
        {
            em.add_subscriber(sub);
        }
        // Serial output is queued by the vCPUs and written to the console by the loop.
        if let Some(out) = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_output()
            .map_err(io_err("creating the serial output drainer"))?
        {
            em.add_subscriber(Arc::new(Mutex::new(out)));
        }
        if self.forward_stdin {
            let input = ConsoleInput::new(self.serial.clone(), libc::STDIN_FILENO)
                .map_err(io_err("creating the console input timer"))?;
            em.add_subscriber(Arc::new(Mutex::new(input)));
        }

        // Each thread reports whether its seccomp filter is in place.
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), SeccompError>>();
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());

        // Event loop first: it is the one that kicks vCPUs when the VM stops.
        let name = format!("kestrel-{}-evloop", self.name);
        let (exit, shared, pthreads, info, tx) = (
            self.exit.clone(),
            self.shared.clone(),
            self.vcpu_pthreads.clone(),
            self.thread_info.clone(),
            ready_tx.clone(),
        );
        let tname = name.clone();
        let filters = self.seccomp.clone();
        let h = std::thread::Builder::new()
            .name(kestrel_devices::os_thread_name(&name))
            .spawn(move || {
                // Writes on this thread (console sinks, vsock, the embedder's tracing writer)
                // must never SIGPIPE the process (kestrel_devices::sigpipe).
                kestrel_devices::sigpipe::block_on_this_thread_or_log(&tname);
                register_thread(&info, tname.clone(), ThreadKind::EventLoop);
                let filtered = seccomp::install_opt(filters.as_ref(), FilterClass::EventLoop);
                let unfiltered = filtered.is_err();
                let _ = tx.send(filtered);
                if unfiltered {
                    // start() fails and stops the VM.
                    return;
                }
                let (e, s, p) = (exit.clone(), shared.clone(), pthreads.clone());
                if let Err(panic) = kestrel_devices::catch_panic(|| evloop::run(em, e, s, p)) {
                    // The loop kicks vCPUs out of KVM_RUN when the VM stops: go on doing that.
                    exit.report(VmExit::ThreadPanicked {
                        thread: tname,
                        message: panic.0,
                    });
                    evloop::kick_until_stopped(&shared, &pthreads, STOP_JOIN_TIMEOUT);
                }
            })
            .map_err(|source| VmmError::Spawn { name, source })?;
        threads.evloop = Some(h);
        let mut expected = 1;

        let vcpus: Vec<Vcpu> =
            std::mem::take(&mut *self.pending_vcpus.lock().unwrap_or_else(|p| p.into_inner()));
        let mut spawn_error = None;
        for v in vcpus {
            match self.spawn_vcpu(v, &mut threads, ready_tx.clone()) {
                Ok(()) => expected += 1,
                Err(e) => {
                    spawn_error = Some(e);
                    break;
                }
            }
        }
        drop(ready_tx);
        for _ in 0..expected {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    spawn_error.get_or_insert(e.into());
                }
                Err(_) => break,
            }
        }
        drop(threads);
        if let Some(e) = spawn_error {
            self.exit.report(VmExit::Stopped);
            self.join_all();
            return Err(e);
        }
        Ok(())
    }

    /// Spawn the thread of vCPU `v` (the caller holds the threads lock).
    fn spawn_vcpu(
        &self,
        v: Vcpu,
        threads: &mut Threads,
        ready: mpsc::Sender<Result<(), SeccompError>>,
    ) -> Result<(), VmmError> {
        let name = format!("kestrel-{}-vcpu{}", self.name, v.id);
        let (info, id) = (self.thread_info.clone(), v.id);
        let (shared, ctl, pthreads) = (
            self.shared.clone(),
            v.ctl.clone(),
            self.vcpu_pthreads.clone(),
        );
        let tname = name.clone();
        let filters = self.seccomp.clone();
        self.shared.running.fetch_add(1, Ordering::SeqCst);
        let r = std::thread::Builder::new()
            .name(kestrel_devices::os_thread_name(&name))
            .spawn(move || {
                kestrel_devices::sigpipe::block_on_this_thread_or_log(&tname);
                // SAFETY: pthread_self has no preconditions.
                let me = unsafe { libc::pthread_self() };
                pthreads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((id, me));
                register_thread(&info, tname.clone(), ThreadKind::Vcpu(id));
                let filtered = seccomp::install_opt(filters.as_ref(), FilterClass::Vcpu);
                let unfiltered = filtered.is_err();
                let _ = ready.send(filtered);
                if unfiltered {
                    // Never runs the guest; start()/plug_vcpu() report the error.
                    ctl.set_state(VcpuRunState::Exited);
                    shared.running.fetch_sub(1, Ordering::SeqCst);
                    let _ = shared.exit.wake.write(1);
                } else if let Err(panic) = kestrel_devices::catch_panic(|| v.run_loop()) {
                    // What the loop does on its way out, then the VM stops with the reason.
                    shared.exit.report(VmExit::ThreadPanicked {
                        thread: tname,
                        message: panic.0,
                    });
                    ctl.set_state(VcpuRunState::Exited);
                    shared.running.fetch_sub(1, Ordering::SeqCst);
                    let _ = shared.exit.wake.write(1);
                }
                // No kick may target this thread from now on (see `VcpuThreads`).
                pthreads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|(i, _)| *i != id);
            });
        match r {
            Ok(h) => {
                threads.vcpus.push(h);
                Ok(())
            }
            Err(source) => {
                // It never entered its loop.
                self.shared.running.fetch_sub(1, Ordering::SeqCst);
                Err(VmmError::Spawn { name, source })
            }
        }
    }

    /// Attach a file to block slot `drive_id`, swap it for another (the guest sees the new
    /// capacity through a config-change interrupt), or empty the slot (`path` = `None`).
    pub fn swap_drive(
        &self,
        drive_id: &str,
        path: Option<&std::path::Path>,
        read_only: bool,
    ) -> Result<(), VmmError> {
        self.drive(drive_id)?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .swap_backing(path, read_only)
            .map_err(|source| VmmError::Block {
                drive_id: drive_id.to_string(),
                source,
            })
    }

    /// Replace the rate limiter of block device `drive_id` (a config without buckets removes
    /// its limits). Checked first; a request waiting on the old limits is retried at once.
    pub fn update_drive_rate_limiter(
        &self,
        drive_id: &str,
        cfg: &kestrel_api::RateLimiterConfig,
    ) -> Result<(), VmmError> {
        cfg.validate("rate_limiter")?;
        self.drive(drive_id)?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .update_rate_limiter(cfg);
        Ok(())
    }

    /// Counters of block device `drive_id`.
    pub fn drive_metrics(
        &self,
        drive_id: &str,
    ) -> Option<kestrel_devices::virtio::block::BlockMetrics> {
        self.drive(drive_id)
            .ok()
            .map(|b| b.lock().unwrap_or_else(|p| p.into_inner()).metrics())
    }

    fn drive(&self, drive_id: &str) -> Result<&Arc<Mutex<Block>>, VmmError> {
        self.drives
            .iter()
            .find(|(id, _)| id == drive_id)
            .map(|(_, b)| b)
            .ok_or_else(|| VmmError::NoSuchDevice(drive_id.to_string()))
    }

    fn net(&self, iface_id: &str) -> Result<&Arc<Mutex<Net>>, VmmError> {
        self.nets
            .iter()
            .find(|(id, _)| id == iface_id)
            .map(|(_, n)| n)
            .ok_or_else(|| VmmError::NoSuchDevice(iface_id.to_string()))
    }

    /// Attach TAP `tap` (created if `create` and missing) to network slot `iface_id`; the
    /// guest sees the link come up (config-change interrupt).
    pub fn attach_tap(&self, iface_id: &str, tap: &str, create: bool) -> Result<(), VmmError> {
        self.net(iface_id)?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .attach_tap(tap, create)
            .map_err(|source| VmmError::Net {
                iface_id: iface_id.to_string(),
                source,
            })
    }

    /// Detach the TAP of `iface_id`; the guest sees the link go down.
    pub fn detach_tap(&self, iface_id: &str) -> Result<(), VmmError> {
        self.net(iface_id)?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .detach_tap();
        Ok(())
    }

    /// Drive the link state the guest sees (`VIRTIO_NET_S_LINK_UP`).
    pub fn set_link(&self, iface_id: &str, up: bool) -> Result<(), VmmError> {
        self.net(iface_id)?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_link(up);
        Ok(())
    }

    /// Replace the RX and/or TX rate limiter of `iface_id` at runtime (`None`: unchanged).
    pub fn update_net_rate_limiters(
        &self,
        iface_id: &str,
        rx: Option<&kestrel_api::RateLimiterConfig>,
        tx: Option<&kestrel_api::RateLimiterConfig>,
    ) -> Result<(), VmmError> {
        if let Some(r) = rx {
            r.validate("rx_rate_limiter")?;
        }
        if let Some(t) = tx {
            t.validate("tx_rate_limiter")?;
        }
        self.net(iface_id)?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .update_rate_limiters(rx, tx);
        Ok(())
    }

    /// Counters of network interface `iface_id`.
    pub fn net_metrics(&self, iface_id: &str) -> Option<kestrel_devices::virtio::net::NetMetrics> {
        self.net(iface_id)
            .ok()
            .map(|n| n.lock().unwrap_or_else(|p| p.into_inner()).metrics())
    }

    /// Counters of the vsock device, if configured.
    pub fn vsock_metrics(&self) -> Option<kestrel_devices::virtio::vsock::VsockMetrics> {
        self.vsock
            .as_ref()
            .map(|v| v.lock().unwrap_or_else(|p| p.into_inner()).metrics())
    }

    /// Counters of the in-process virtio-fs share `tag`.
    pub fn fs_metrics(&self, tag: &str) -> Option<kestrel_devices::virtio::fs::FsMetrics> {
        self.shares.iter().find_map(|s| match s {
            FsShare::InProcess(s) if s.tag == tag => {
                Some(s.dev.lock().unwrap_or_else(|p| p.into_inner()).metrics())
            }
            _ => None,
        })
    }

    /// Whether share `tag` is served by an external vhost-user backend.
    pub fn fs_is_vhost_user(&self, tag: &str) -> Option<bool> {
        self.shares.iter().find_map(|s| match s {
            FsShare::InProcess(s) if s.tag == tag => Some(false),
            FsShare::VhostUser(t, _) if t == tag => Some(true),
            _ => None,
        })
    }

    /// vCPUs that exist and their state (running, parked, exited), by index.
    pub fn vcpu_states(&self) -> Vec<(u32, VcpuRunState)> {
        self.vcpu_slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|s| (s.id, s.ctl.state()))
            .collect()
    }

    /// Make vCPU `id` runnable: unpark it if it exists, else create it (CPUID, MSRs, FPU, LAPIC
    /// as for boot vCPUs) and start its thread. The thread id appears in [`Vm::threads`] as soon
    /// as the thread runs. vCPUs are added in order: `id` must be an existing vCPU or the next
    /// index, and below `max_vcpus`. The guest still has to online the CPU.
    pub fn plug_vcpu(&self, id: u32) -> Result<(), VmmError> {
        let _serial = self.resize.lock().unwrap_or_else(|p| p.into_inner());
        self.ensure_running()?;
        let existing = self
            .vcpu_slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.ctl.clone());
        if let Some(ctl) = existing {
            ctl.request(false);
            ctl.wait_state(VcpuRunState::Running, Duration::from_secs(5));
            return Ok(());
        }
        let count = self
            .vcpu_slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len() as u32;
        if id != count || id >= self.max_vcpus {
            return Err(VmmError::VcpuIndex {
                id,
                next: count,
                max: self.max_vcpus,
            });
        }
        let fd = vcpu::create_vcpu(&self.kvm, &self.vm_fd, id, self.max_vcpus)?;
        let ctl = Arc::new(VcpuControl::new(false));
        self.vcpu_slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(VcpuSlot {
                id,
                ctl: ctl.clone(),
            });
        let v = Vcpu {
            id,
            fd,
            shared: self.shared.clone(),
            ctl,
        };
        let (tx, rx) = mpsc::channel();
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if self.exit.stopping() {
            return Err(VmmError::NotRunning);
        }
        self.spawn_vcpu(v, &mut threads, tx)?;
        drop(threads);
        if let Ok(Err(e)) = rx.recv_timeout(Duration::from_secs(5)) {
            return Err(e.into());
        }
        tracing::info!("VM {}: vCPU {id} created", self.name);
        Ok(())
    }

    /// Take vCPU `id` out of `KVM_RUN` and keep its thread waiting (after the guest offlined
    /// the CPU). vCPU 0 cannot be parked. Returns when the thread is parked.
    pub fn park_vcpu(&self, id: u32) -> Result<(), VmmError> {
        let _serial = self.resize.lock().unwrap_or_else(|p| p.into_inner());
        self.ensure_running()?;
        let count = self
            .vcpu_slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len() as u32;
        let ctl = match self
            .vcpu_slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|s| s.id == id)
        {
            Some(s) if id != 0 => s.ctl.clone(),
            _ => {
                return Err(VmmError::VcpuIndex {
                    id,
                    next: count,
                    max: self.max_vcpus,
                })
            }
        };
        ctl.request(true);
        let deadline = Instant::now() + Duration::from_secs(5);
        while ctl.state() == VcpuRunState::Running && Instant::now() < deadline {
            kick_vcpus(&self.vcpu_pthreads, Some(id));
            ctl.wait_state(VcpuRunState::Parked, Duration::from_millis(10));
        }
        match ctl.state() {
            VcpuRunState::Parked => Ok(()),
            _ => Err(VmmError::NotRunning),
        }
    }

    /// Hot-plug `size` bytes of RAM (a multiple of `block`) at the lowest free address of the
    /// hotplug region. The guest still has to probe and online it.
    pub fn add_memory(&self, size: u64, block: u64) -> Result<PluggedRange, VmmError> {
        let _serial = self.resize.lock().unwrap_or_else(|p| p.into_inner());
        self.ensure_running()?;
        let r = self
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(&self.vm_fd, size, block)
            .map_err(VmmError::Memory)?;
        self.refresh_vhost_user_memory();
        Ok(r)
    }

    /// Resend the memory table to vhost-user backends after a layout change.
    fn refresh_vhost_user_memory(&self) {
        for s in &self.shares {
            if let FsShare::VhostUser(tag, d) = s {
                if let Err(e) = d.lock().unwrap_or_else(|p| p.into_inner()).update_memory() {
                    tracing::warn!(
                        "virtio-fs {tag}: cannot update the backend's memory table: {e}"
                    );
                }
            }
        }
    }

    /// Unplug a range returned by [`Vm::add_memory`] (after the guest offlined it); its host
    /// pages are released.
    pub fn remove_memory(&self, addr: u64, size: u64) -> Result<(), VmmError> {
        let _serial = self.resize.lock().unwrap_or_else(|p| p.into_inner());
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.vm_fd, addr, size)
            .map_err(VmmError::Memory)?;
        self.refresh_vhost_user_memory();
        Ok(())
    }

    /// Hot-plugged memory ranges.
    pub fn plugged_memory(&self) -> Vec<PluggedRange> {
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .plugged()
    }

    /// The hotplug region (guest-physical address, size), if memory hotplug is enabled.
    pub fn hotplug_region(&self) -> Option<(u64, u64)> {
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .hotplug_region()
    }

    /// Host virtual address ranges of guest RAM (for RSS accounting).
    pub fn guest_memory_host_ranges(&self) -> Vec<(u64, u64)> {
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .host_ranges()
    }

    /// Whether guest RAM is memfd-backed (shareable with vhost-user backends).
    pub fn guest_memory_is_shared(&self) -> bool {
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_shared()
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

    /// Join every thread of the stopped VM, for at most [`STOP_JOIN_TIMEOUT`]: meanwhile the
    /// vCPU threads are kicked out of `KVM_RUN` from here too (in case the event loop cannot).
    /// Threads still running at the deadline are detached and logged. virtio-fs workers are
    /// told to end (after the request they serve) and waited for within the same deadline;
    /// their devices join them when they drop.
    fn join_all(&self) {
        let mut t = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + STOP_JOIN_TIMEOUT;
        // Asked again on every round: the loop may still start a worker until it has ended.
        let all_done = |t: &Threads| {
            for s in self.in_process_shares() {
                s.workers.stop_all();
            }
            t.evloop.as_ref().is_none_or(|h| h.is_finished())
                && t.vcpus.iter().all(|h| h.is_finished())
                && self.in_process_shares().all(|s| s.workers.is_empty())
        };
        let mut pause = Duration::from_micros(200);
        while !all_done(&t) && Instant::now() < deadline {
            if self.exit.stopping() {
                kick_vcpus(&self.vcpu_pthreads, None);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        let finished_or_detach = |h: JoinHandle<()>, what: &str| {
            if h.is_finished() {
                // Thread bodies contain their panics, so this is Ok in practice.
                if h.join().is_err() {
                    tracing::error!("VM {}: the {what} thread panicked", self.name);
                }
            } else {
                tracing::error!(
                    "VM {}: the {what} thread did not finish within {STOP_JOIN_TIMEOUT:?}; \
                     detached",
                    self.name
                );
            }
        };
        if let Some(h) = t.evloop.take() {
            finished_or_detach(h, "event-loop");
        }
        for h in t.vcpus.drain(..) {
            finished_or_detach(h, "vCPU");
        }
        for w in self.in_process_shares().flat_map(|s| s.workers.list()) {
            tracing::error!(
                "VM {}: virtio-fs worker {} did not finish within {STOP_JOIN_TIMEOUT:?}; \
                 its device joins it when dropped",
                self.name,
                w.name
            );
        }
        self.thread_info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
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
                kick_vcpus(&self.vcpu_pthreads, Some(id));
            }
            ThreadClass::EventLoop => {
                self.exit.faults.arm_evloop();
                self.exit
                    .wake
                    .write(1)
                    .map_err(io_err("waking the event loop"))?;
            }
            ThreadClass::FsWorker(id) => {
                let fs = self.shares.iter().find_map(|s| match s {
                    FsShare::InProcess(s) if s.id == id => Some(&s.dev),
                    _ => None,
                });
                let Some(fs) = fs else {
                    self.device_handle(&id)?;
                    return Err(VmmError::NoFsWorkers(id));
                };
                if !fs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .inject_worker_panic()
                {
                    return Err(VmmError::NoFsWorkers(id));
                }
            }
            ThreadClass::Device(id) => {
                let d = self.device_handle(&id)?;
                d.inject_panic.store(true, Ordering::SeqCst);
                if let Some(e) = &d.notify {
                    e.write(1).map_err(io_err("signalling a device event"))?;
                }
            }
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

    fn device_handle(&self, id: &str) -> Result<&DeviceHandle, VmmError> {
        self.devices
            .iter()
            .find(|d| d.id == id)
            .ok_or_else(|| VmmError::NoSuchDevice(id.to_string()))
    }

    /// Whether virtio device `id` (drive id, iface id, `vsock`, `fs<N>`) reports
    /// `DEVICE_NEEDS_RESET` to its driver (`None`: no such device).
    pub fn device_needs_reset(&self, id: &str) -> Option<bool> {
        let d = self.device_handle(id).ok()?;
        let status = d
            .transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .status();
        Some(status & kestrel_devices::virtio::status::DEVICE_NEEDS_RESET != 0)
    }

    /// Threads of the running VM with their Linux thread ids: the event loop, the vCPUs and the
    /// virtio-fs worker threads that run now (a share's workers start when the guest's driver
    /// brings the device up and are replaced at a device reset, so ask again after either).
    /// Empty once the VM has stopped: its threads are joined, its fs workers ended.
    pub fn threads(&self) -> Vec<ThreadInfo> {
        let mut threads = self
            .thread_info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for s in self.in_process_shares() {
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

    fn in_process_shares(&self) -> impl Iterator<Item = &InProcessShare> {
        self.shares.iter().filter_map(|s| match s {
            FsShare::InProcess(s) => Some(s),
            FsShare::VhostUser(..) => None,
        })
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
        self.max_vcpus
    }

    /// The kernel command line the guest was given.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Counters and timings.
    pub fn metrics(&self) -> VmMetrics {
        let mut m = self.shared.counters.snapshot();
        m.create_us = self.create_us;
        m.setup_to_first_run_us = self
            .shared
            .first_run
            .get()
            .map(|t| t.duration_since(self.created_at).as_micros() as u64);
        let serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        m.serial_tx_bytes = serial.tx_bytes();
        m.serial_dropped_bytes = serial.output_dropped();
        drop(serial);
        m
    }

    /// A snapshot of guest memory (for tests, diagnostics and device models).
    pub fn guest_memory(&self) -> Arc<GuestMemoryMmap> {
        self.shared.mem.memory().into_inner()
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

fn register_thread(info: &Mutex<Vec<ThreadInfo>>, name: String, kind: ThreadKind) {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    info.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(ThreadInfo { name, tid, kind });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_vcpus_policy() {
        let mut c = VmConfig::new("/k", 1, 128);
        assert_eq!(effective_max_vcpus(&c, 2, 1024), 2);
        c.machine_config.max_vcpus = Some(0);
        assert_eq!(effective_max_vcpus(&c, 8, 1024), 8);
        c.machine_config.vcpu_count = 4;
        assert_eq!(effective_max_vcpus(&c, 2, 1024), 4);
        c.machine_config.max_vcpus = Some(16);
        assert_eq!(effective_max_vcpus(&c, 2, 1024), 16);
        assert_eq!(effective_max_vcpus(&c, 2, 8), 8);
        c.machine_config.max_vcpus = None;
        assert_eq!(effective_max_vcpus(&c, 512, 1024), MAX_SUPPORTED_VCPUS);
    }

    fn kick_disposition() -> libc::sighandler_t {
        // SAFETY: an all-zero `sigaction` is a valid value of the plain C struct.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a query (null new action) into a valid out-pointer.
        assert_eq!(
            unsafe { libc::sigaction(vcpu::kick_signal(), std::ptr::null(), &mut old) },
            0
        );
        old.sa_sigaction
    }

    fn set_kick_disposition(h: libc::sighandler_t) {
        // SAFETY: sets the disposition of a real-time signal nothing else in this test binary
        // uses (no test here starts a VM); `h` is SIG_DFL, SIG_IGN or a valid handler.
        unsafe { libc::signal(vcpu::kick_signal(), h) };
    }

    /// Process-global: the only test of this binary that touches the kick signal.
    #[test]
    fn kick_handler_never_replaces_the_embedders_and_a_failure_is_reported_every_time() {
        extern "C" fn embedders_handler(_: libc::c_int) {}
        let embedders = embedders_handler as extern "C" fn(libc::c_int) as libc::sighandler_t;
        set_kick_disposition(embedders);
        for _ in 0..3 {
            match vcpu::install_kick_handler() {
                Err(e @ VmmError::KickSignalInUse { .. }) => {
                    let VmmError::KickSignalInUse {
                        signal, current, ..
                    } = &e
                    else {
                        unreachable!()
                    };
                    assert_eq!((*signal, *current), (vcpu::kick_signal(), "a handler"));
                    assert!(e.to_string().contains("SIGRTMIN+2"), "{e}");
                }
                other => panic!("expected KickSignalInUse, got {other:?}"),
            }
            assert_eq!(
                kick_disposition(),
                embedders,
                "the embedder's handler stays"
            );
        }
        set_kick_disposition(libc::SIG_IGN);
        assert!(matches!(
            vcpu::install_kick_handler(),
            Err(VmmError::KickSignalInUse {
                current: "SIG_IGN",
                ..
            })
        ));
        assert_eq!(kick_disposition(), libc::SIG_IGN);
        // Free again: installed, and installing again is a no-op success.
        set_kick_disposition(libc::SIG_DFL);
        vcpu::install_kick_handler().unwrap();
        let ours = kick_disposition();
        assert_ne!(ours, libc::SIG_DFL);
        vcpu::install_kick_handler().unwrap();
        assert_eq!(kick_disposition(), ours);
        set_kick_disposition(libc::SIG_DFL);
    }
}
