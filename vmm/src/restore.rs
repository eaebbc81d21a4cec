//! The builder's second entry point: a VM rebuilt from a snapshot ([`crate::Vm::restore`]).
//!
//! It runs the boot steps 1–4, 6 and 7 of [`crate::builder`] with the snapshot's
//! configuration (the overrides applied), and replaces loading the kernel and writing boot
//! data with the snapshot's state:
//! 1. the state file is read and checked (format version, checksum) and the overrides are
//!    applied to its configuration and validated: all before any resource is created;
//! 2. guest memory is the memory file mapped `MAP_PRIVATE` (copy-on-write: clones of one
//!    snapshot share every page none of them wrote), or copied into shared memory when a
//!    vhost-user backend must map it;
//! 3. after the irqchip exists, the VM's in-kernel state (PIT, clock, PICs, IOAPIC), then the
//!    serial port's registers;
//! 4. every virtio device in the order the guest saw it, from its saved state, its transport
//!    taking over the saved registers (a device the driver had running is activated again;
//!    vsock tells the guest its connections are gone with a transport-reset event);
//! 5. every vCPU that existed, its state restored; hot-removed ones start parked.
//!
//! The command line and the paravirtual extended-state switch are the snapshot's: the guest
//! decided with them at boot.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use kestrel_api::{RestoreOverrides, SeccompMode, VmConfig};
use kestrel_arch::layout;
use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

use crate::builder::{BuiltVm, ConsoleSink, DeviceSteps, Machine};
use crate::error::VmmError;
use crate::memory::MemoryManager;
use crate::metrics::VmCounters;
use crate::seccomp::Filters;
use crate::snapshot::{
    self, DeviceSnapshot, KvmSupport, SnapshotError, SnapshotFiles, SnapshotState,
};

/// Read the snapshot's state and the configuration the restored VM gets (the snapshot's,
/// `overrides` applied, validated). Nothing is created.
pub(crate) fn prepare(
    files: &SnapshotFiles,
    overrides: &RestoreOverrides,
) -> Result<(SnapshotState, VmConfig), VmmError> {
    let state = snapshot::read_state_file(&files.state)?;
    let saved = state
        .config
        .as_ref()
        .ok_or_else(|| SnapshotError::DeviceMismatch {
            device: "vm".into(),
            reason: "the snapshot holds no configuration".into(),
        })?;
    let config = overrides.apply(saved)?;
    Ok((state, config))
}

/// Build a VM from a snapshot: every step of the module documentation, in order (the restore
/// began at `created_at`, with [`prepare`]). On error everything created so far is released.
pub(crate) fn build_for_restore(
    files: &SnapshotFiles,
    state: &SnapshotState,
    config: VmConfig,
    console: ConsoleSink,
    created_at: Instant,
) -> Result<BuiltVm<'static>, VmmError> {
    let seccomp_mode = config.kestrel.seccomp_or(SeccompMode::Errno);
    let seccomp = Filters::build(seccomp_mode)?;
    let mut machine = Machine::with_memory(&config, console, |vm_fd| {
        restore_memory(vm_fd, &config, files, state)
    })?;
    if state.vcpus.len() > machine.max_vcpus as usize {
        return Err(SnapshotError::VcpuCount {
            saved: state.vcpus.len(),
            max: machine.max_vcpus,
        }
        .into());
    }
    snapshot::restore_vm(&machine.vm_fd, &state.vm)?;
    machine
        .legacy
        .serial
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .restore(&state.serial)
        .map_err(SnapshotError::Serial)?;
    let guest_mem = machine.memory.guest_memory();
    let counters = Arc::new(VmCounters::default());
    let mut steps = DeviceSteps::new(
        config.name(),
        &machine.vm_fd,
        &guest_mem,
        &counters,
        &seccomp,
    )?;
    restore_devices(&mut steps, &config, &state.devices)?;
    let devices = steps.dm.finish();
    let vcpus = machine.vcpu_manager(guest_mem, devices.mmio_bus, counters, state.pvfpu);
    // At most MAX_SUPPORTED_VCPUS (checked above against max_vcpus).
    let count = u32::try_from(state.vcpus.len()).unwrap_or(u32::MAX);
    vcpus.create_boot_vcpus(&machine.kvm, &machine.vm_fd, count)?;
    let support = KvmSupport::probe(&machine.kvm, &machine.vm_fd)?;
    vcpus.restore_pending(&state.vcpus, &state.hotplug.unplugged_vcpus, &support)?;
    Ok(BuiltVm {
        config: Cow::Owned(config),
        created_at,
        cmdline: state.cmdline.clone(),
        machine,
        vcpus,
        subscribers: devices.subscribers,
        registry: devices.registry,
        seccomp,
        seccomp_mode,
    })
}

/// Guest memory from the memory file: mapped private, or copied into shared memory when the
/// configuration needs memory a vhost-user backend can map.
fn restore_memory(
    vm_fd: &kvm_ioctls::VmFd,
    config: &VmConfig,
    files: &SnapshotFiles,
    state: &SnapshotState,
) -> Result<MemoryManager, VmmError> {
    let mut regions = snapshot::map_memory_file(&files.memory, &state.memory)?;
    let shared = config.needs_shared_memory();
    if shared {
        regions = regions
            .iter()
            .map(copy_to_shared)
            .collect::<Result<Vec<_>, _>>()?;
    }
    let mc = &config.machine_config;
    let mem_size = mc.mem_size_mib << 20;
    let max_mem_size = mc.max_mem_size_mib.unwrap_or(mc.mem_size_mib) << 20;
    let hotplug = layout::hotplug_region(mem_size, max_mem_size).map(|(a, s)| (a.0, s));
    let plugged: Vec<(u64, u64)> = state
        .hotplug
        .plugged_memory
        .iter()
        .map(|p| (p.addr, p.size))
        .collect();
    Ok(MemoryManager::from_regions(
        vm_fd, regions, &plugged, hotplug, shared,
    )?)
}

/// A shared (memfd) copy of a private mapping of the memory file.
fn copy_to_shared(r: &GuestRegionMmap) -> Result<GuestRegionMmap, VmmError> {
    let copy = MemoryManager::new_region(r.start_addr().0, r.len(), true)?;
    let len = usize::try_from(r.len()).unwrap_or(usize::MAX);
    let (src, dst) = (r.as_volatile_slice(), copy.as_volatile_slice());
    match (src, dst) {
        (Ok(src), Ok(dst)) => {
            src.copy_to_volatile_slice(dst);
            debug_assert_eq!(src.len(), len);
            Ok(copy)
        }
        _ => Err(SnapshotError::DeviceMismatch {
            device: "memory".into(),
            reason: format!("cannot copy the region at {:#x}", r.start_addr().0),
        }
        .into()),
    }
}

/// Every saved device, in the order the guest saw them, from the configuration entry with
/// its id. The snapshot and the configuration must have the same devices.
fn restore_devices(
    steps: &mut DeviceSteps<'_>,
    config: &VmConfig,
    saved: &[DeviceSnapshot],
) -> Result<(), VmmError> {
    let ids = config.device_ids();
    let mismatch = |device: &str, reason: &str| SnapshotError::DeviceMismatch {
        device: device.to_string(),
        reason: reason.to_string(),
    };
    if let Some((_, id)) = ids
        .iter()
        .find(|(_, id)| !saved.iter().any(|s| &s.id == id))
    {
        return Err(mismatch(id, "the configuration has it, the snapshot does not").into());
    }
    for s in saved {
        let id = s.id.as_str();
        if let Some(d) = config.drives.iter().find(|d| d.drive_id == id) {
            steps.attach_block(d, Some(s))?;
        } else if let Some(n) = config.network_interfaces.iter().find(|n| n.iface_id == id) {
            steps.attach_net(n, Some(s))?;
        } else if let (Some(v), "vsock") = (&config.vsock, id) {
            steps.attach_vsock(v, Some(s))?;
        } else if let Some(i) = (0..config.fs.len()).find(|i| kestrel_api::fs_device_id(*i) == id) {
            steps.attach_fs(i, &config.fs[i], Some(s))?;
        } else {
            return Err(mismatch(id, "the snapshot has it, the configuration does not").into());
        }
    }
    Ok(())
}
