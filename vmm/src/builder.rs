//! Building a VM, one step per part.
//!
//! Boot ([`crate::Vm::create`], [`build_for_boot`]):
//! 1. host checks: KVM API version and capabilities, the effective `max_vcpus` ([`open_kvm`]);
//! 2. the KVM VM and guest memory ([`create_vm`], [`create_memory`]);
//! 3. the in-kernel irqchip: TSS, PIC/IOAPIC/LAPIC, PIT ([`setup_irqchip`]);
//! 4. legacy devices: serial, CMOS, i8042 ([`LegacyDevices::new`]);
//! 5. *boot only*: kernel and initrd into guest memory ([`load_kernel`]);
//! 6. virtio devices, one step per kind ([`DeviceSteps`]: `attach_block` for each drive, root
//!    drive first so it is `/dev/vda`; `attach_net`, `attach_vsock`, `attach_fs`);
//! 7. vCPUs: KVM vCPUs with CPUID, MSRs, FPU, LAPIC ([`VcpuManager::create_boot_vcpus`]);
//! 8. *boot only*: command line, boot parameters, MP table, boot vCPU registers
//!    ([`load_boot_data`]).
//!
//! A second entry point (restore from a snapshot) reuses steps 1–4, 6 and 7, giving each
//! device step the device's saved state ([`SavedDevice`]; always `None` on boot) and replacing
//! 5 and 8 with restoring memory and vCPU/VM state.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kestrel_api::{
    DriveConfig, FsConfig, GuestCompat, NetConfig, SeccompMode, VmConfig, VsockConfig,
    MAX_SUPPORTED_VCPUS,
};
use kestrel_devices::virtio::block::{Block, BlockConfig};
use kestrel_devices::virtio::fs::vhost_user::{VhostUserFs, VhostUserFsConfig, VhostUserFsError};
use kestrel_devices::virtio::fs::{Fs, FsConfig as FsDeviceConfig};
use kestrel_devices::virtio::net::{Net, NetConfig as NetDeviceConfig};
use kestrel_devices::virtio::vsock::{Vsock, VsockConfig as VsockDeviceConfig};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::GuestAddressSpace;

use crate::boot::{self, LoadedKernel};
use crate::device_manager::legacy::LegacyDevices;
use crate::device_manager::registry::DeviceRegistry;
use crate::device_manager::registry::{FsShare, Model};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::error::{io_err, kvm_err, VmmError};
use crate::evloop::Subscriber;
use crate::exit::ExitState;
use crate::memory::{GuestMem, MemoryManager};
use crate::metrics::VmCounters;
use crate::pvfpu;
use crate::seccomp::{self, FilterClass, Filters};
use crate::snapshot::{DeviceSnapshot, DeviceState, SnapshotError};
use crate::vcpu::manager::VcpuManager;
use crate::vcpu::VcpuShared;

/// Where the serial console writes (from the event loop: it should return `WouldBlock` rather
/// than block, see `kestrel_devices::legacy::NonBlockingWriter`).
pub type ConsoleSink = Box<dyn Write + Send>;

/// What the builder hands to [`crate::Vm`]: every part of a VM, no thread started.
pub(crate) struct BuiltVm<'a> {
    pub(crate) config: std::borrow::Cow<'a, VmConfig>,
    pub(crate) created_at: Instant,
    pub(crate) cmdline: String,
    pub(crate) machine: Machine,
    pub(crate) vcpus: VcpuManager,
    pub(crate) subscribers: Vec<Subscriber>,
    pub(crate) registry: DeviceRegistry,
    pub(crate) seccomp: Option<Filters>,
    pub(crate) seccomp_mode: SeccompMode,
}

/// Address of the TSS KVM needs on Intel (three pages well below 4 GiB, under the IOAPIC).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// A device's saved run-time state, for the restore entry point (`None` on boot).
pub(crate) type SavedDevice = DeviceSnapshot;

/// The saved state of kind `pick` in `saved`, or why it does not fit the device `id`.
fn saved_as<'s, T>(
    saved: Option<&'s SavedDevice>,
    id: &str,
    pick: impl Fn(&'s DeviceState) -> Option<&'s T>,
) -> Result<Option<&'s T>, VmmError> {
    match saved {
        None => Ok(None),
        Some(s) => pick(&s.state).map(Some).ok_or_else(|| {
            SnapshotError::DeviceMismatch {
                device: id.to_string(),
                reason: "the saved state is of another device kind".into(),
            }
            .into()
        }),
    }
}

/// Build a VM from `config` to boot its kernel: every step of the module documentation, in
/// order. On error everything created so far is released.
pub(crate) fn build_for_boot(
    config: &VmConfig,
    console: ConsoleSink,
) -> Result<BuiltVm<'_>, VmmError> {
    let created_at = Instant::now();
    config.validate_for_boot()?;
    let seccomp_mode = config.kestrel.seccomp_or(SeccompMode::Errno);
    let seccomp = Filters::build(seccomp_mode)?;
    let mut machine = Machine::new(config, console)?;
    let guest_mem = machine.memory.guest_memory();
    let image = load_kernel(config, &guest_mem)?;
    let counters = Arc::new(VmCounters::default());
    let mut steps = DeviceSteps::new(
        config.name(),
        &machine.vm_fd,
        &guest_mem,
        &counters,
        &seccomp,
    )?;
    steps.attach_all(config)?;
    let software_kvm = software_kvm(config);
    // Guest tasks' AVX state on a software KVM (docs/nested-kvm.md §10).
    let pvfpu = software_kvm && config.kestrel.xstate_assist && pvfpu::supported(&machine.vm_fd);
    let mut extra_args = steps.cmdline();
    if pvfpu {
        extra_args.push(pvfpu::CMDLINE_FLAG.to_string());
    }
    let devices = steps.dm.finish();
    let vcpus = machine.vcpu_manager(guest_mem.clone(), devices.mmio_bus, counters, pvfpu);
    let vcpu_count = config.machine_config.vcpu_count;
    vcpus.create_boot_vcpus(&machine.kvm, &machine.vm_fd, vcpu_count)?;
    let boot = BootData {
        config,
        max_vcpus: machine.max_vcpus,
        software_kvm,
        extra_args: &extra_args,
    };
    let cmdline = load_boot_data(&boot, &guest_mem, &image, &vcpus)?;
    Ok(BuiltVm {
        config: std::borrow::Cow::Borrowed(config),
        created_at,
        cmdline,
        machine,
        vcpus,
        subscribers: devices.subscribers,
        registry: devices.registry,
        seccomp,
        seccomp_mode,
    })
}

/// Whether the guest runs on a software KVM and needs its compatibility switches
/// (`kestrel.guest_compat`).
pub(crate) fn software_kvm(config: &VmConfig) -> bool {
    match config.kestrel.guest_compat {
        GuestCompat::Auto => boot::host_kvm_is_software(),
        GuestCompat::Always => true,
        GuestCompat::Never => false,
    }
}

/// Steps 1–4, shared by both entry points: a KVM VM with guest memory, the in-kernel irqchip
/// and the legacy devices.
pub(crate) struct Machine {
    pub(crate) kvm: Kvm,
    pub(crate) max_vcpus: u32,
    pub(crate) vm_fd: VmFd,
    pub(crate) memory: MemoryManager,
    /// How the VM stops (the i8042 reports resets into it).
    pub(crate) exit: Arc<ExitState>,
    pub(crate) legacy: LegacyDevices,
}

impl Machine {
    /// Run steps 1–4 for `config`, the serial console writing to `console`.
    pub(crate) fn new(config: &VmConfig, console: ConsoleSink) -> Result<Self, VmmError> {
        Self::with_memory(config, console, |vm_fd| create_memory(vm_fd, config))
    }

    /// Like [`Machine::new`], guest memory made by `memory` (a restore maps a snapshot's).
    pub(crate) fn with_memory(
        config: &VmConfig,
        console: ConsoleSink,
        memory: impl FnOnce(&VmFd) -> Result<MemoryManager, VmmError>,
    ) -> Result<Self, VmmError> {
        let (kvm, max_vcpus) = open_kvm(config)?;
        let vm_fd = create_vm(&kvm)?;
        let memory = memory(&vm_fd)?;
        setup_irqchip(&vm_fd)?;
        let exit = Arc::new(ExitState::new().map_err(io_err("creating the control eventfd"))?);
        let legacy = LegacyDevices::new(&vm_fd, &exit, console)?;
        Ok(Machine {
            kvm,
            max_vcpus,
            vm_fd,
            memory,
            exit,
            legacy,
        })
    }
}

impl Machine {
    /// Step 7's manager: the vCPUs will share guest memory, the legacy PIO bus (taken from
    /// the machine), the virtio `mmio` bus, the exit state and `counters`.
    pub(crate) fn vcpu_manager(
        &mut self,
        mem: GuestMem,
        mmio: kestrel_devices::bus::Bus,
        counters: Arc<VmCounters>,
        pvfpu: bool,
    ) -> VcpuManager {
        let shared = Arc::new(VcpuShared {
            mem,
            pio: std::mem::take(&mut self.legacy.pio),
            mmio,
            exit: self.exit.clone(),
            counters,
            first_run: std::sync::OnceLock::new(),
            pvfpu,
        });
        VcpuManager::new(shared, self.max_vcpus)
    }
}

/// Step 1: open `/dev/kvm`, check its API version and the capabilities Kestrel needs, and
/// resolve `max_vcpus` against the host (refusing a `vcpu_count` above it).
pub(crate) fn open_kvm(config: &VmConfig) -> Result<(Kvm, u32), VmmError> {
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
    let kvm_max = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
    let max_vcpus = effective_max_vcpus(config, host_cpus(), kvm_max);
    let count = config.machine_config.vcpu_count;
    if count > max_vcpus {
        let why = format!("{count} is above this host's KVM limit of {max_vcpus}");
        return Err(kestrel_api::ConfigError::invalid("machine-config.vcpu_count", why).into());
    }
    Ok((kvm, max_vcpus))
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
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// Step 2a: the KVM VM.
pub(crate) fn create_vm(kvm: &Kvm) -> Result<VmFd, VmmError> {
    kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))
}

/// Step 2b: boot RAM (and room for hotplug), memfd-backed when a vhost-user backend must map
/// it too.
pub(crate) fn create_memory(vm_fd: &VmFd, config: &VmConfig) -> Result<MemoryManager, VmmError> {
    let mc = &config.machine_config;
    let mem_size = mc.mem_size_mib << 20;
    let max_mem_size = mc.max_mem_size_mib.unwrap_or(mc.mem_size_mib) << 20;
    let shared = config.needs_shared_memory();
    Ok(MemoryManager::new(vm_fd, mem_size, max_mem_size, shared)?)
}

/// Step 3: the TSS KVM needs on Intel, the in-kernel PIC/IOAPIC/LAPIC, and the PIT.
pub(crate) fn setup_irqchip(vm_fd: &VmFd) -> Result<(), VmmError> {
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
    vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))
}

/// The guest image in memory (boot only).
pub(crate) struct GuestImage {
    kernel: LoadedKernel,
    initrd: Option<(vm_memory::GuestAddress, usize)>,
}

/// Step 5 (boot only): the kernel, then the initrd above it.
pub(crate) fn load_kernel(config: &VmConfig, mem: &GuestMem) -> Result<GuestImage, VmmError> {
    let mem = mem.memory();
    let kernel = boot::load_kernel(&mem, &config.boot_source.kernel_image_path)?;
    let mem_size = config.machine_config.mem_size_mib << 20;
    let initrd = match &config.boot_source.initrd_path {
        Some(p) => Some(boot::load_initrd(&mem, mem_size, p, kernel.end)?),
        None => None,
    };
    Ok(GuestImage { kernel, initrd })
}

/// What the boot data step needs to know besides memory and the image.
pub(crate) struct BootData<'a> {
    config: &'a VmConfig,
    max_vcpus: u32,
    software_kvm: bool,
    /// Machine arguments after the user's: root drive, devices, assists.
    extra_args: &'a [String],
}

/// Step 8 (boot only): kernel command line, boot parameters and MP table into memory; the
/// boot vCPU's registers at the kernel entry. Returns the command line.
pub(crate) fn load_boot_data(
    boot: &BootData<'_>,
    mem: &GuestMem,
    image: &GuestImage,
    vcpus: &VcpuManager,
) -> Result<String, VmmError> {
    let mem = mem.memory();
    let mem_size = boot.config.machine_config.mem_size_mib << 20;
    let cmdline = boot::build_cmdline(
        boot.config,
        boot.max_vcpus,
        boot.software_kvm,
        boot.extra_args,
    )?;
    boot::write_boot_data(
        &mem,
        mem_size,
        &cmdline,
        image.initrd,
        &image.kernel,
        boot.max_vcpus,
    )?;
    vcpus.setup_boot_vcpu(&mem, image.kernel.entry)?;
    let cmdline = cmdline
        .as_cstring()
        .map_err(boot::BootError::Cmdline)?
        .to_string_lossy()
        .into_owned();
    Ok(cmdline)
}

/// Step 6: one step per virtio device kind, each wiring the device through the device
/// manager.
pub(crate) struct DeviceSteps<'a> {
    vm_name: &'a str,
    vm_fd: &'a VmFd,
    counters: &'a Arc<VmCounters>,
    seccomp: &'a Option<Filters>,
    /// `root=` and `ro`/`rw` for the root drive.
    root_args: Vec<String>,
    pub(crate) dm: DeviceManager,
}

impl<'a> DeviceSteps<'a> {
    pub(crate) fn new(
        vm_name: &'a str,
        vm_fd: &'a VmFd,
        mem: &GuestMem,
        counters: &'a Arc<VmCounters>,
        seccomp: &'a Option<Filters>,
    ) -> Result<Self, VmmError> {
        Ok(DeviceSteps {
            vm_name,
            vm_fd,
            counters,
            seccomp,
            root_args: Vec::new(),
            dm: DeviceManager::new(mem.clone(), counters.clone())?,
        })
    }

    /// Every device of `config` (none restored): drives (root first, so it is `/dev/vda`),
    /// interfaces, vsock, shares.
    pub(crate) fn attach_all(&mut self, config: &VmConfig) -> Result<(), VmmError> {
        for d in boot_drive_order(&config.drives) {
            self.attach_block(d, None)?;
        }
        for n in &config.network_interfaces {
            self.attach_net(n, None)?;
        }
        if let Some(v) = &config.vsock {
            self.attach_vsock(v, None)?;
        }
        for (i, f) in config.fs.iter().enumerate() {
            self.attach_fs(i, f, None)?;
        }
        Ok(())
    }

    /// Machine arguments for the command line: the root drive's, then every device's
    /// `virtio_mmio.device=`.
    pub(crate) fn cmdline(&self) -> Vec<String> {
        let mut v = self.root_args.clone();
        v.extend(self.dm.cmdline().iter().cloned());
        v
    }

    /// A block device (`drive_id`); the root drive adds `root=` to the command line.
    pub(crate) fn attach_block(
        &mut self,
        cfg: &DriveConfig,
        saved: Option<&SavedDevice>,
    ) -> Result<(), VmmError> {
        let id = &cfg.drive_id;
        let state = saved_as(saved, id, |s| match s {
            DeviceState::Block(b) => Some(b),
            _ => None,
        })?;
        let blk = BlockConfig::try_from(cfg).and_then(|c| match state {
            Some(s) => Block::restore(&c, s),
            None => Block::new(&c),
        });
        let blk = blk.map_err(|source| DeviceError::Block {
            drive_id: id.clone(),
            source,
        })?;
        let position = self.dm.count();
        self.wire(id, Model::Block(shared(blk)), saved)?;
        if cfg.is_root_device {
            self.root_args.extend(boot::root_args(cfg, position));
        }
        Ok(())
    }

    /// A network interface (`iface_id`).
    pub(crate) fn attach_net(
        &mut self,
        cfg: &NetConfig,
        saved: Option<&SavedDevice>,
    ) -> Result<(), VmmError> {
        let state = saved_as(saved, &cfg.iface_id, |s| match s {
            DeviceState::Net(n) => Some(n),
            _ => None,
        })?;
        let net = NetDeviceConfig::try_from(cfg).and_then(|c| match state {
            Some(s) => Net::restore(&c, s),
            None => Net::new(&c),
        });
        let net = net.map_err(|source| DeviceError::Net {
            iface_id: cfg.iface_id.clone(),
            source,
        })?;
        self.wire(&cfg.iface_id, Model::Net(shared(net)), saved)
    }

    /// The vsock device (`vsock`).
    pub(crate) fn attach_vsock(
        &mut self,
        cfg: &VsockConfig,
        saved: Option<&SavedDevice>,
    ) -> Result<(), VmmError> {
        let state = saved_as(saved, "vsock", |s| match s {
            DeviceState::Vsock(v) => Some(v),
            _ => None,
        })?;
        let v = VsockDeviceConfig::try_from(cfg).and_then(|c| match state {
            Some(s) => Vsock::restore(&c, s),
            None => Vsock::new(&c),
        });
        let v = v.map_err(DeviceError::Vsock)?;
        self.wire("vsock", Model::Vsock(shared(v)), saved)
    }

    /// The `index`-th virtio-fs share (`fs<index>`): served by a vhost-user backend when it
    /// names a socket, else in-process (its worker threads named after the VM, filtered,
    /// their panics counted).
    pub(crate) fn attach_fs(
        &mut self,
        index: usize,
        cfg: &FsConfig,
        saved: Option<&SavedDevice>,
    ) -> Result<(), VmmError> {
        let id = kestrel_api::fs_device_id(index);
        let tag = cfg.tag.clone();
        let state = saved_as(saved, &id, |s| match s {
            DeviceState::Fs(f) => Some(f),
            _ => None,
        })?;
        let model = if cfg.socket.is_some() {
            let dev = VhostUserFsConfig::try_from(cfg)
                .map_err(VhostUserFsError::from)
                .and_then(|c| match state {
                    Some(s) => VhostUserFs::restore(&c, s),
                    None => VhostUserFs::new(&c),
                });
            let dev = dev.map_err(|source| DeviceError::VhostUserFs {
                tag: tag.clone(),
                source,
            })?;
            Model::VhostUserFs {
                tag,
                dev: shared(dev),
            }
        } else {
            Model::Fs(self.in_process_share(index, &id, cfg, state)?)
        };
        self.wire(&id, model, saved)
    }

    /// Wire `model` as `id`; a restored device's transport takes over its saved registers
    /// (activating the device again if the driver had it running).
    fn wire(
        &mut self,
        id: &str,
        model: Model,
        saved: Option<&SavedDevice>,
    ) -> Result<(), VmmError> {
        let device = self.dm.add_virtio(self.vm_fd, id, model)?;
        if let Some(s) = saved {
            device.restore_transport(&s.transport).map_err(|source| {
                SnapshotError::DeviceRestore {
                    device: id.to_string(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    fn in_process_share(
        &self,
        index: usize,
        id: &str,
        cfg: &FsConfig,
        state: Option<&kestrel_devices::virtio::fs::FsState>,
    ) -> Result<FsShare, VmmError> {
        let d = FsDeviceConfig::try_from(cfg).and_then(|c| match state {
            Some(s) => Fs::restore(&c, s),
            None => Fs::new(&c),
        });
        let mut d = d.map_err(|source| DeviceError::Fs {
            tag: cfg.tag.clone(),
            source,
        })?;
        d.set_worker_name_prefix(&format!("kestrel-{}-{id}", self.vm_name));
        let panics = self.counters.clone();
        d.set_panic_hook(Some(Arc::new(move || {
            VmCounters::bump(&panics.device_panics)
        })));
        d.set_worker_start_hook(self.seccomp.as_ref().map(|f| {
            let prog = f.program(FilterClass::FsWorker).clone();
            let hook: kestrel_devices::ThreadStartHook = Arc::new(move || {
                seccomp::install(FilterClass::FsWorker, &prog).map_err(|e| e.to_string())
            });
            hook
        }));
        let workers = d.worker_threads();
        Ok(FsShare {
            // At most 19 virtio devices: the index fits.
            index: u32::try_from(index).unwrap_or(u32::MAX),
            tag: cfg.tag.clone(),
            dev: shared(d),
            workers,
        })
    }
}

fn shared<T>(t: T) -> Arc<Mutex<T>> {
    Arc::new(Mutex::new(t))
}

/// Drives in the order they are wired (and probed by the guest): the root drive first, the
/// others in config order.
pub(crate) fn boot_drive_order(drives: &[DriveConfig]) -> Vec<&DriveConfig> {
    let mut order: Vec<&DriveConfig> = drives.iter().collect();
    order.sort_by_key(|d| !d.is_root_device);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(id: &str, root: bool) -> DriveConfig {
        DriveConfig {
            drive_id: id.into(),
            is_root_device: root,
            ..DriveConfig::default()
        }
    }

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

    #[test]
    fn the_root_drive_is_wired_first_and_the_rest_keep_their_order() {
        let drives = [
            drive("a", false),
            drive("b", false),
            drive("root", true),
            drive("c", false),
        ];
        let ids: Vec<&str> = boot_drive_order(&drives)
            .iter()
            .map(|d| d.drive_id.as_str())
            .collect();
        assert_eq!(ids, ["root", "a", "b", "c"]);
        let none = [drive("x", false), drive("y", false)];
        let ids: Vec<&str> = boot_drive_order(&none)
            .iter()
            .map(|d| d.drive_id.as_str())
            .collect();
        assert_eq!(ids, ["x", "y"]);
    }

    #[test]
    fn configuration_errors_come_before_anything_is_created() {
        // No /dev/kvm needed: validation runs first.
        let mut c = VmConfig::new("/nonexistent/vmlinux", 0, 128);
        c.kestrel.name = Some("bad".into());
        let sink: ConsoleSink = Box::new(std::io::sink());
        assert!(matches!(build_for_boot(&c, sink), Err(VmmError::Config(_))));
    }
}
