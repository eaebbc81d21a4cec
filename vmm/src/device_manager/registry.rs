//! The VM's virtio devices by id, and the handle through which the API reaches each one: the
//! operations every device has (id, kind, reset state, metrics) and, through typed views, the
//! ones only some kinds have (swap a drive's backing file, attach a TAP...).
//!
//! Ids: a drive's `drive_id`, an interface's `iface_id`, `vsock`, and `fs<N>` for the N-th
//! entry of `fs` (in-process or vhost-user).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::MutEventSubscriber;
use kestrel_api::RateLimiterConfig;
use kestrel_devices::virtio::block::{Block, BlockMetrics};
use kestrel_devices::virtio::fs::vhost_user::{VhostUserFs, VhostUserFsMetrics};
use kestrel_devices::virtio::fs::{Fs, FsMetrics, FsSnapshotError, FsWorkers};
use kestrel_devices::virtio::mmio::MmioTransport;
use kestrel_devices::virtio::net::{Net, NetMetrics};
use kestrel_devices::virtio::vsock::{Vsock, VsockMetrics};
use kestrel_devices::virtio::{status, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

use super::DeviceError;
use crate::evloop::Subscriber;
use crate::snapshot::{DeviceSnapshot, DeviceState, SnapshotError};

/// What kind of virtio device a [`Device`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk (`drives[]`).
    Block,
    /// virtio-net (`network-interfaces[]`).
    Net,
    /// virtio-vsock (`vsock`).
    Vsock,
    /// virtio-fs (`fs[]`), in-process or served by a vhost-user backend.
    Fs,
}

/// A device's counters, one variant per device model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceMetrics {
    /// A block device.
    Block(BlockMetrics),
    /// A network interface.
    Net(NetMetrics),
    /// The vsock device.
    Vsock(VsockMetrics),
    /// An in-process virtio-fs share.
    Fs(FsMetrics),
    /// A virtio-fs share served by a vhost-user backend (the backend counts requests itself).
    VhostUserFs(VhostUserFsMetrics),
}

impl DeviceMetrics {
    /// The block counters, if these are a block device's.
    pub fn block(self) -> Option<BlockMetrics> {
        match self {
            DeviceMetrics::Block(m) => Some(m),
            _ => None,
        }
    }

    /// The network counters, if these are an interface's.
    pub fn net(self) -> Option<NetMetrics> {
        match self {
            DeviceMetrics::Net(m) => Some(m),
            _ => None,
        }
    }

    /// The vsock counters, if these are the vsock device's.
    pub fn vsock(self) -> Option<VsockMetrics> {
        match self {
            DeviceMetrics::Vsock(m) => Some(m),
            _ => None,
        }
    }

    /// The counters of an in-process virtio-fs share, if these are one's.
    pub fn fs(self) -> Option<FsMetrics> {
        match self {
            DeviceMetrics::Fs(m) => Some(m),
            _ => None,
        }
    }
}

/// The device model behind a [`Device`], typed.
pub(crate) enum Model {
    Block(Arc<Mutex<Block>>),
    Net(Arc<Mutex<Net>>),
    Vsock(Arc<Mutex<Vsock>>),
    Fs(FsShare),
    VhostUserFs {
        tag: String,
        dev: Arc<Mutex<VhostUserFs>>,
    },
}

/// An in-process virtio-fs share.
pub(crate) struct FsShare {
    /// Index in `VmConfig::fs`; the device id is `fs<index>`.
    pub(crate) index: u32,
    pub(crate) tag: String,
    pub(crate) dev: Arc<Mutex<Fs>>,
    /// Its running worker threads (read without the device's lock).
    pub(crate) workers: FsWorkers,
}

impl Model {
    /// The model as the transport sees it.
    pub(crate) fn virtio(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            Model::Block(d) => d.clone(),
            Model::Net(d) => d.clone(),
            Model::Vsock(d) => d.clone(),
            Model::Fs(s) => s.dev.clone(),
            Model::VhostUserFs { dev, .. } => dev.clone(),
        }
    }

    /// The model as the event loop sees it.
    pub(crate) fn subscriber(&self) -> Subscriber {
        fn sub<D: MutEventSubscriber + Send + 'static>(d: &Arc<Mutex<D>>) -> Subscriber {
            d.clone()
        }
        match self {
            Model::Block(d) => sub(d),
            Model::Net(d) => sub(d),
            Model::Vsock(d) => sub(d),
            Model::Fs(s) => sub(&s.dev),
            Model::VhostUserFs { dev, .. } => sub(dev),
        }
    }

    fn kind(&self) -> DeviceKind {
        match self {
            Model::Block(_) => DeviceKind::Block,
            Model::Net(_) => DeviceKind::Net,
            Model::Vsock(_) => DeviceKind::Vsock,
            Model::Fs(_) | Model::VhostUserFs { .. } => DeviceKind::Fs,
        }
    }
}

/// One virtio device of a VM. Reached with [`crate::Vm::device`] or [`crate::Vm::devices`];
/// every call locks the device briefly (the event loop may be serving it).
pub struct Device {
    id: String,
    model: Model,
    transport: Arc<Mutex<MmioTransport>>,
    /// Test-only: the device's next event handler call panics.
    inject_panic: Arc<AtomicBool>,
    /// A duplicate of the device's first queue event: signalling it makes the event loop call
    /// the device's handler.
    notify: Option<EventFd>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("id", &self.id)
            .field("kind", &self.kind())
            .finish_non_exhaustive()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Device {
    pub(crate) fn new(
        id: &str,
        model: Model,
        transport: Arc<Mutex<MmioTransport>>,
        inject_panic: Arc<AtomicBool>,
        notify: Option<EventFd>,
    ) -> Self {
        Device {
            id: id.to_string(),
            model,
            transport,
            inject_panic,
            notify,
        }
    }

    /// The device's id (drive id, iface id, `vsock`, `fs<N>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What kind of device it is.
    pub fn kind(&self) -> DeviceKind {
        self.model.kind()
    }

    /// Whether the device reports `DEVICE_NEEDS_RESET` to its driver (it failed, e.g. its
    /// handler panicked, and waits for the driver to reset it).
    pub fn needs_reset(&self) -> bool {
        lock(&self.transport).status() & status::DEVICE_NEEDS_RESET != 0
    }

    /// The device's counters.
    pub fn metrics(&self) -> DeviceMetrics {
        match &self.model {
            Model::Block(d) => DeviceMetrics::Block(lock(d).metrics()),
            Model::Net(d) => DeviceMetrics::Net(lock(d).metrics()),
            Model::Vsock(d) => DeviceMetrics::Vsock(lock(d).metrics()),
            Model::Fs(s) => DeviceMetrics::Fs(lock(&s.dev).metrics()),
            Model::VhostUserFs { dev, .. } => DeviceMetrics::VhostUserFs(lock(dev).metrics()),
        }
    }

    /// The block-device operations, if this is a block device.
    pub fn block(&self) -> Option<BlockControl<'_>> {
        match &self.model {
            Model::Block(dev) => Some(BlockControl { id: &self.id, dev }),
            _ => None,
        }
    }

    /// The network-interface operations, if this is an interface.
    pub fn net(&self) -> Option<NetControl<'_>> {
        match &self.model {
            Model::Net(dev) => Some(NetControl { id: &self.id, dev }),
            _ => None,
        }
    }

    /// The virtio-fs share's properties, if this is a share.
    pub fn fs(&self) -> Option<FsControl<'_>> {
        match &self.model {
            Model::Fs(s) => Some(FsControl {
                tag: &s.tag,
                vhost_user: false,
            }),
            Model::VhostUserFs { tag, .. } => Some(FsControl {
                tag,
                vhost_user: true,
            }),
            _ => None,
        }
    }

    /// The device's state for a snapshot (transport registers and the device's own state), or
    /// why it cannot be snapshotted: a virtio-fs share the guest has mounted (it sent requests
    /// on its queues; its FUSE session, the guest's open files and node ids, lives in the
    /// server or the daemon and is not saved). A share the driver activated but never used
    /// is saved with its queues, its worker threads (idle) running or not.
    pub(crate) fn snapshot_state(&self) -> Result<DeviceSnapshot, SnapshotError> {
        let refuse = |e: FsSnapshotError| SnapshotError::Unsupported {
            device: self.id.clone(),
            reason: e.reason(),
        };
        let state = match &self.model {
            Model::Block(d) => DeviceState::Block(lock(d).state()),
            Model::Net(d) => DeviceState::Net(lock(d).state()),
            Model::Vsock(d) => DeviceState::Vsock(lock(d).state()),
            Model::Fs(s) => DeviceState::Fs(lock(&s.dev).snapshot_ready().map_err(refuse)?),
            Model::VhostUserFs { dev, .. } => {
                DeviceState::Fs(lock(dev).snapshot_ready().map_err(refuse)?)
            }
        };
        let transport = lock(&self.transport).state();
        Ok(DeviceSnapshot {
            id: self.id.clone(),
            transport,
            state,
        })
    }

    /// A restored device's transport takes over its saved registers (activating the device
    /// again when the driver had it running).
    pub(crate) fn restore_transport(
        &self,
        state: &kestrel_devices::virtio::mmio::MmioState,
    ) -> Result<(), kestrel_devices::virtio::RestoreError> {
        lock(&self.transport).restore(state)
    }

    /// Test-only fault injection: the device's next event handler call panics; an event is
    /// signalled so that call comes.
    pub(crate) fn inject_handler_panic(&self) -> std::io::Result<()> {
        self.inject_panic.store(true, Ordering::SeqCst);
        match &self.notify {
            Some(e) => e.write(1),
            None => Ok(()),
        }
    }

    /// The in-process virtio-fs share behind this device, if it is one.
    pub(crate) fn fs_share(&self) -> Option<&FsShare> {
        match &self.model {
            Model::Fs(s) => Some(s),
            _ => None,
        }
    }
}

/// The operations of a block device ([`Device::block`]).
pub struct BlockControl<'a> {
    id: &'a str,
    dev: &'a Arc<Mutex<Block>>,
}

impl BlockControl<'_> {
    /// Attach file `path` to the drive, swap it for another (the guest sees the new capacity
    /// through a config-change interrupt), or empty the slot (`path` = `None`). A writable
    /// image is flushed before it is replaced or detached.
    ///
    /// # Errors
    /// [`DeviceError::Block`] when the file cannot be opened or the old one not flushed.
    pub fn swap_backing(&self, path: Option<&Path>, read_only: bool) -> Result<(), DeviceError> {
        lock(self.dev)
            .swap_backing(path, read_only)
            .map_err(|source| DeviceError::Block {
                drive_id: self.id.to_string(),
                source,
            })
    }

    /// Replace the drive's rate limiter (a config without buckets removes its limits). The
    /// config is checked first; a request waiting on the old limits is retried at once.
    ///
    /// # Errors
    /// [`DeviceError::Config`] naming the bad field (`rate_limiter.…`); nothing changed.
    pub fn update_rate_limiter(&self, cfg: &RateLimiterConfig) -> Result<(), DeviceError> {
        cfg.validate("rate_limiter")?;
        lock(self.dev).update_rate_limiter(cfg);
        Ok(())
    }
}

/// The operations of a network interface ([`Device::net`]).
pub struct NetControl<'a> {
    id: &'a str,
    dev: &'a Arc<Mutex<Net>>,
}

impl NetControl<'_> {
    /// Attach TAP `tap` (created if `create` and missing) to the interface; the guest sees
    /// the link come up (config-change interrupt).
    ///
    /// # Errors
    /// [`DeviceError::Net`] when the TAP cannot be opened or created.
    pub fn attach_tap(&self, tap: &str, create: bool) -> Result<(), DeviceError> {
        lock(self.dev)
            .attach_tap(tap, create)
            .map_err(|source| DeviceError::Net {
                iface_id: self.id.to_string(),
                source,
            })
    }

    /// Detach the interface's TAP; the guest sees the link go down.
    pub fn detach_tap(&self) {
        lock(self.dev).detach_tap();
    }

    /// Drive the link state the guest sees (`VIRTIO_NET_S_LINK_UP`).
    pub fn set_link(&self, up: bool) {
        lock(self.dev).set_link(up);
    }

    /// Replace the RX and/or TX rate limiter (`None`: unchanged). Both are checked first.
    ///
    /// # Errors
    /// [`DeviceError::Config`] naming the bad field (`rx_rate_limiter.…`,
    /// `tx_rate_limiter.…`); nothing changed.
    pub fn update_rate_limiters(
        &self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), DeviceError> {
        if let Some(r) = rx {
            r.validate("rx_rate_limiter")?;
        }
        if let Some(t) = tx {
            t.validate("tx_rate_limiter")?;
        }
        lock(self.dev).update_rate_limiters(rx, tx);
        Ok(())
    }
}

/// The properties of a virtio-fs share ([`Device::fs`]).
#[derive(Debug, Clone, Copy)]
pub struct FsControl<'a> {
    tag: &'a str,
    vhost_user: bool,
}

impl FsControl<'_> {
    /// The tag the guest mounts the share by.
    pub fn tag(&self) -> &str {
        self.tag
    }

    /// Whether an external vhost-user backend serves the share (else Kestrel does, in-process).
    pub fn is_vhost_user(&self) -> bool {
        self.vhost_user
    }
}

/// The VM's devices, by id, in the order they were added.
#[derive(Default)]
pub(crate) struct DeviceRegistry {
    devices: Vec<Device>,
}

impl DeviceRegistry {
    /// Refuse `id` if a device has it already.
    pub(crate) fn check_free(&self, id: &str) -> Result<(), DeviceError> {
        match self.get(id) {
            Some(d) => Err(DeviceError::DuplicateId {
                id: id.to_string(),
                kind: d.kind(),
            }),
            None => Ok(()),
        }
    }

    pub(crate) fn insert(&mut self, device: Device) -> Result<&Device, DeviceError> {
        self.check_free(&device.id)?;
        self.devices.push(device);
        Ok(&self.devices[self.devices.len() - 1])
    }

    /// The device with this id.
    pub(crate) fn get(&self, id: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.id == id)
    }

    /// Every device, in the order they were added.
    pub(crate) fn iter(&self) -> std::slice::Iter<'_, Device> {
        self.devices.iter()
    }

    /// The in-process virtio-fs shares.
    pub(crate) fn fs_shares(&self) -> impl Iterator<Item = &FsShare> {
        self.devices.iter().filter_map(Device::fs_share)
    }

    /// Resend the memory table to vhost-user backends after a layout change.
    pub(crate) fn refresh_vhost_user_memory(&self) {
        for d in &self.devices {
            if let Model::VhostUserFs { tag, dev } = &d.model {
                if let Err(e) = lock(dev).update_memory() {
                    tracing::warn!(
                        "virtio-fs {tag}: cannot update the backend's memory table: {e}"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kestrel_devices::bus::BusDevice;
    use kestrel_devices::virtio::mmio::reg;
    use kestrel_devices::virtio::VirtioInterrupt;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;

    /// Queue `i`'s rings: descriptors, then the available and used rings 4 KiB apart.
    fn rings(i: u64) -> [u64; 3] {
        let base = 0x1_0000 + i * 0x4000;
        [base, base + 0x1000, base + 0x2000]
    }

    /// Drive the transport as Linux's virtio-fs probe does: features, both queues, DRIVER_OK.
    fn probe(t: &mut MmioTransport) {
        let mut w = |off: u64, v: u32| t.write(off, &v.to_le_bytes());
        let (ack, driver) = (status::ACKNOWLEDGE, status::DRIVER);
        w(reg::STATUS, ack | driver);
        w(reg::DRIVER_FEATURES_SEL, 1);
        w(reg::DRIVER_FEATURES, 1); // VERSION_1
        w(reg::STATUS, ack | driver | status::FEATURES_OK);
        for i in 0..2u32 {
            w(reg::QUEUE_SEL, i);
            w(reg::QUEUE_NUM, 16);
            let [desc, avail, used] = rings(u64::from(i));
            for (low, addr) in [
                (reg::QUEUE_DESC_LOW, desc),
                (reg::QUEUE_DRIVER_LOW, avail),
                (reg::QUEUE_DEVICE_LOW, used),
            ] {
                w(low, u32::try_from(addr).unwrap());
            }
            w(reg::QUEUE_READY, 1);
        }
        w(
            reg::STATUS,
            ack | driver | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    /// A share the driver brought up but the guest never mounted is saved with its queues;
    /// once the guest puts a request on a queue it is refused, naming the device.
    #[test]
    fn an_unmounted_share_is_saved_and_a_mounted_one_refused() {
        let dir = std::env::temp_dir().join(format!("kestrel-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut api = kestrel_api::FsConfig::shared_dir("tag", &dir);
        api.queue_size = 16;
        let cfg = kestrel_devices::virtio::fs::FsConfig::try_from(&api).unwrap();
        let fs = Arc::new(Mutex::new(Fs::new(&cfg).unwrap()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let mut transport =
            MmioTransport::new(fs.clone(), irq, GuestMemoryAtomic::new(mem.clone()));
        probe(&mut transport);
        assert!(fs.lock().unwrap().is_activated());
        let workers = lock(&fs).worker_threads();
        let share = FsShare {
            index: 0,
            tag: "tag".into(),
            dev: fs,
            workers,
        };
        let device = Device::new(
            "fs0",
            Model::Fs(share),
            Arc::new(Mutex::new(transport)),
            Arc::default(),
            None,
        );

        let saved = device.snapshot_state().unwrap();
        let DeviceState::Fs(state) = &saved.state else {
            panic!("not a share: {saved:?}");
        };
        assert!(state.virtio.activated);
        let queues: Vec<[u64; 3]> = state
            .virtio
            .queues
            .iter()
            .map(|q| [q.desc_table, q.avail_ring, q.used_ring])
            .collect();
        assert_eq!(queues, [rings(0), rings(1)]);

        // FUSE_INIT published on the request queue: the guest mounts the share.
        mem.write_obj(1u16, GuestAddress(rings(1)[1] + 2)).unwrap();
        let e = device.snapshot_state().unwrap_err();
        assert!(
            matches!(&e, SnapshotError::Unsupported { device, .. } if device == "fs0"),
            "{e}"
        );
        assert!(
            e.to_string().starts_with(
                "device \"fs0\" cannot be snapshotted: the guest has mounted the share"
            ),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
