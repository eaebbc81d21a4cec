//! vhost-user-fs frontend: the guest's virtio-fs queues are served by an external daemon
//! (virtiofsd) over a vhost-user Unix socket.
//!
//! - [`VhostUserFs::new`] connects, takes ownership of the session (`SET_OWNER`) and
//!   negotiates the vhost-user protocol features (`MQ`, `REPLY_ACK`); the features offered to
//!   the guest are the daemon's, limited to what Kestrel's transport handles.
//! - The config space (tag, `num_request_queues`) is served locally.
//! - Activation only stores the queues and wakes the event loop; the loop then sends
//!   `SET_FEATURES`, `SET_MEM_TABLE` (every guest memory region with its memfd and offset: guest
//!   memory must be memfd-backed `MAP_SHARED`, which activation checks) and per queue
//!   `SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE`.
//! - Kicks: the queue `EventFd`s ([`VirtioDevice::queue_events`], registered by the VMM as KVM
//!   ioeventfds) are passed to the daemon as the kick descriptors, so a guest notification goes
//!   straight to it; this device never reads them.
//! - Interrupts: the daemon signals per-queue call `EventFd`s that this device watches on the
//!   event loop and turns into [`VirtioInterrupt::signal_used_queue`], so the ISR bit the
//!   guest reads stays right.
//! - Reset: `SET_VRING_ENABLE 0` and `GET_VRING_BASE` stop every ring before the driver
//!   reuses its memory (on the vCPU thread that wrote the status, bounded by the socket
//!   timeout).
//!
//! Memory hotplug: after activation the daemon only knows the regions of the last
//! `SET_MEM_TABLE`. The VMM must call [`VhostUserFs::update_memory`] after it publishes a new
//! layout (it resends the whole table); until then buffers in new memory fail in the daemon.
//! A daemon that exits or breaks the protocol puts the device into `needs_reset`; Kestrel does
//! not reconnect (a later activation fails while the daemon is gone).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{check_geometry, config_space, FsError, CONFIG_SPACE_LEN, VIRTIO_RING_F_INDIRECT_DESC};
use crate::virtio::{
    check_queue_count, drain_eventfd, ignore_config_write, new_eventfd, numbered_events,
    wake_event_loop, watch_events, ActivateError, DeviceName, EventFdError, GuestMem, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// How long one vhost-user message may take before the daemon counts as dead.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

/// Guest features Kestrel passes through from the daemon (its transport handles these).
const GUEST_FEATURE_MASK: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;

const ACTIVATE_EVENT: u32 = 0;
/// The call `EventFd` of queue `i` is watched with data `CALL_EVENT_BASE + i`.
const CALL_EVENT_BASE: u32 = 1;

/// Errors of the vhost-user-fs frontend.
#[derive(Debug, Error)]
pub enum VhostUserFsError {
    /// Tag or queue geometry rejected.
    #[error(transparent)]
    Config(#[from] FsError),
    /// The daemon's socket could not be reached.
    #[error("cannot connect to the vhost-user-fs daemon at {}: {source}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: vhost::Error,
    },
    /// A vhost-user request failed.
    #[error("vhost-user {request} failed: {source}")]
    Request {
        /// The request (e.g. `SET_MEM_TABLE`).
        request: &'static str,
        /// The error.
        #[source]
        source: vhost::Error,
    },
    /// The socket timeouts could not be set.
    #[error("cannot set the vhost-user socket timeout: {0}")]
    SocketTimeout(#[source] std::io::Error),
    /// The daemon does not offer a feature Kestrel needs.
    #[error("the vhost-user-fs daemon does not offer {0}")]
    MissingFeature(&'static str),
    /// The daemon has fewer queues than the device needs.
    #[error("the vhost-user-fs daemon has {has} queues, the device needs {needs}")]
    TooFewQueues {
        /// Queues the daemon supports.
        has: u64,
        /// Queues the device needs (1 + request queues).
        needs: usize,
    },
    /// A guest memory region is not backed by a file (memfd), so the daemon cannot map it.
    #[error(
        "guest memory region at {addr:#x} is not memfd-backed: vhost-user needs shared guest \
         memory (MemoryManager with shared = true)"
    )]
    MemoryNotShared {
        /// The region's guest-physical address.
        addr: u64,
    },
    /// A ring does not lie inside one guest memory region.
    #[error("queue {0}: a ring is not inside one guest memory region")]
    RingAddress(usize),
    /// The device is not running (for [`VhostUserFs::update_memory`]).
    #[error("the device is not activated")]
    NotActive,
}

impl From<EventFdError> for VhostUserFsError {
    /// Like the in-process device's: [`FsError::EventFd`].
    fn from(e: EventFdError) -> Self {
        VhostUserFsError::Config(e.into())
    }
}

fn req(request: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserFsError {
    move |source| VhostUserFsError::Request { request, source }
}

/// Counters of one vhost-user-fs device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VhostUserFsMetrics {
    /// Times the rings were handed to the daemon.
    pub activations: u64,
    /// Used-ring interrupts forwarded from the daemon's call `EventFd`s.
    pub interrupts: u64,
    /// vhost-user conversations that failed (activation, reset, memory update).
    pub backend_errors: u64,
}

struct Active {
    mem: GuestMem,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    /// The rings were handed to the daemon.
    started: bool,
}

/// A virtio-fs device whose requests an external vhost-user daemon serves.
pub struct VhostUserFs {
    tag: String,
    socket: PathBuf,
    frontend: Frontend,
    /// `VHOST_USER_F_PROTOCOL_FEATURES` was offered (and is acked with the guest's features).
    protocol_features: bool,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_SPACE_LEN],
    queue_sizes: Vec<u16>,
    queue_events: Vec<EventFd>,
    call_events: Vec<EventFd>,
    activate_evt: EventFd,
    active: Option<Active>,
    failed: bool,
    metrics: VhostUserFsMetrics,
}

/// The host-virtual address of `len` bytes at guest address `addr`, if they lie in one region.
fn host_range(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Option<u64> {
    let slice = mem.get_slice(GuestAddress(addr), len).ok()?;
    Some(slice.ptr_guard().as_ptr() as u64)
}

/// The vhost-user memory table of `mem`; every region must be file-backed.
fn memory_table(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserFsError> {
    mem.iter()
        .map(|r| {
            VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| {
                VhostUserFsError::MemoryNotShared {
                    addr: vm_memory::GuestMemoryRegion::start_addr(r).0,
                }
            })
        })
        .collect()
}

fn set_socket_timeout(fd: i32, timeout: Duration) -> Result<(), VhostUserFsError> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: `tv` is a valid timeval that outlives the call and the length matches it;
        // `fd` is the frontend's socket, which it keeps open.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(VhostUserFsError::SocketTimeout(
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

impl VhostUserFs {
    /// Connect to the daemon listening on `socket` and set up the session for a device with
    /// mount tag `tag` and `num_queues` request queues of `queue_size` entries.
    pub fn new(
        socket: &Path,
        tag: &str,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<VhostUserFs, VhostUserFsError> {
        check_geometry(tag, num_queues, queue_size)?;
        let nq = 1 + usize::from(num_queues);
        // The vhost crate sends through vmm-sys-util's `send_with_fds` (`sendmsg` with
        // `MSG_NOSIGNAL`): a daemon that went away is an error, never a SIGPIPE, on the
        // caller's threads (create, memory hotplug) as on a vCPU (activation).
        let mut frontend =
            Frontend::connect(socket, nq as u64).map_err(|source| VhostUserFsError::Connect {
                path: socket.to_path_buf(),
                source,
            })?;
        set_socket_timeout(frontend.as_raw_fd(), SOCKET_TIMEOUT)?;
        frontend.set_owner().map_err(req("SET_OWNER"))?;
        let features = frontend.get_features().map_err(req("GET_FEATURES"))?;
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserFsError::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        let protocol_features = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if protocol_features {
            let offered = frontend
                .get_protocol_features()
                .map_err(req("GET_PROTOCOL_FEATURES"))?;
            let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
            frontend
                .set_protocol_features(offered & wanted)
                .map_err(req("SET_PROTOCOL_FEATURES"))?;
            if offered.contains(VhostUserProtocolFeatures::MQ) {
                let has = frontend.get_queue_num().map_err(req("GET_QUEUE_NUM"))?;
                if has < nq as u64 {
                    return Err(VhostUserFsError::TooFewQueues { has, needs: nq });
                }
            }
        }
        let call_events = (0..nq).map(|_| new_eventfd()).collect::<Result<_, _>>()?;
        let queue_events = (0..nq).map(|_| new_eventfd()).collect::<Result<_, _>>()?;
        tracing::info!(
            "vhost-user-fs {tag}: connected to {} (features {features:#x})",
            socket.display()
        );
        Ok(VhostUserFs {
            tag: tag.to_string(),
            socket: socket.to_path_buf(),
            frontend,
            protocol_features,
            avail_features: features & GUEST_FEATURE_MASK,
            acked_features: 0,
            config: config_space(tag, num_queues),
            queue_sizes: vec![queue_size; nq],
            queue_events,
            call_events,
            activate_evt: new_eventfd()?,
            active: None,
            failed: false,
            metrics: VhostUserFsMetrics::default(),
        })
    }

    /// A device for `config` (which must have a `socket`).
    pub fn from_config(config: &kestrel_api::FsConfig) -> Result<VhostUserFs, VhostUserFsError> {
        let Some(socket) = config.socket.as_ref() else {
            return Err(FsError::NoSocket(config.tag.clone()).into());
        };
        Self::new(socket, &config.tag, config.num_queues, config.queue_size)
    }

    /// The mount tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// How log lines name the device.
    fn log_name(&self) -> DeviceName<'_> {
        DeviceName::new("vhost-user-fs", &self.tag)
    }

    /// The daemon's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A snapshot of the device's counters.
    pub fn metrics(&self) -> VhostUserFsMetrics {
        self.metrics
    }

    /// The `EventFd` the event loop watches for activation (registered in `init`).
    pub fn activate_event(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Whether the rings are with the daemon.
    pub fn is_started(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.started)
    }

    /// Hand the rings to the daemon (the event loop does this after activation; public for
    /// tests). A failure puts the device into `needs_reset`.
    pub fn start(&mut self) {
        if self.failed || self.is_started() || self.active.is_none() {
            return;
        }
        match self.do_start() {
            Ok(()) => {
                self.metrics.activations += 1;
                if let Some(a) = self.active.as_mut() {
                    a.started = true;
                }
                tracing::info!("vhost-user-fs {}: rings handed to the daemon", self.tag);
            }
            Err(e) => {
                tracing::warn!(
                    "vhost-user-fs {}: activation failed, device needs a reset: {e}",
                    self.tag
                );
                self.metrics.backend_errors += 1;
                self.failed = true;
                if let Some(a) = &self.active {
                    a.interrupt.signal_config_change();
                }
            }
        }
    }

    fn do_start(&mut self) -> Result<(), VhostUserFsError> {
        let Some(active) = self.active.as_ref() else {
            return Err(VhostUserFsError::NotActive);
        };
        let mem = active.mem.memory();
        let regions = memory_table(&mem)?;
        let mut features = self.acked_features;
        if self.protocol_features {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        let f = &mut self.frontend;
        f.set_features(features).map_err(req("SET_FEATURES"))?;
        f.set_mem_table(&regions).map_err(req("SET_MEM_TABLE"))?;
        for (i, q) in active.queues.iter().enumerate() {
            let size = q.size();
            let n = usize::from(size);
            // Ring lengths with the event-index fields.
            let desc = host_range(&mem, q.desc_table(), 16 * n);
            let avail = host_range(&mem, q.avail_ring(), 6 + 2 * n);
            let used = host_range(&mem, q.used_ring(), 6 + 8 * n);
            let (Some(desc), Some(avail), Some(used)) = (desc, avail, used) else {
                return Err(VhostUserFsError::RingAddress(i));
            };
            f.set_vring_num(i, size).map_err(req("SET_VRING_NUM"))?;
            let addrs = VringConfigData {
                queue_max_size: self.queue_sizes[i],
                queue_size: size,
                flags: 0,
                desc_table_addr: desc,
                used_ring_addr: used,
                avail_ring_addr: avail,
                log_addr: None,
            };
            f.set_vring_addr(i, &addrs).map_err(req("SET_VRING_ADDR"))?;
            f.set_vring_base(i, q.next_avail())
                .map_err(req("SET_VRING_BASE"))?;
            f.set_vring_call(i, &self.call_events[i])
                .map_err(req("SET_VRING_CALL"))?;
            f.set_vring_kick(i, &self.queue_events[i])
                .map_err(req("SET_VRING_KICK"))?;
            if self.protocol_features {
                f.set_vring_enable(i, true)
                    .map_err(req("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stop every ring in the daemon (reset).
    fn stop(&mut self) -> Result<(), VhostUserFsError> {
        for i in 0..self.queue_sizes.len() {
            if self.protocol_features {
                self.frontend
                    .set_vring_enable(i, false)
                    .map_err(req("SET_VRING_ENABLE"))?;
            }
            self.frontend
                .get_vring_base(i)
                .map_err(req("GET_VRING_BASE"))?;
        }
        Ok(())
    }

    /// Send the current guest memory layout to the daemon (after memory hotplug). A no-op
    /// before the rings are started (activation sends the layout of that moment).
    pub fn update_memory(&mut self) -> Result<(), VhostUserFsError> {
        let Some(active) = self.active.as_ref().filter(|a| a.started) else {
            return Ok(());
        };
        let regions = memory_table(&active.mem.memory())?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(req("SET_MEM_TABLE"))
            .inspect_err(|_| self.metrics.backend_errors += 1)
    }

    fn forward_interrupt(&mut self, queue: usize) {
        let Some(evt) = self.call_events.get(queue) else {
            return;
        };
        if !drain_eventfd(evt, self.log_name(), "call") {
            return;
        }
        if let Some(a) = &self.active {
            a.interrupt.signal_used_queue();
            self.metrics.interrupts += 1;
        }
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The config space is read-only.
        ignore_config_write(self.log_name(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        check_queue_count(&queues, self.queue_sizes.len())?;
        // Checked here (no I/O) so the error reaches the transport: the daemon cannot map
        // anonymous memory.
        memory_table(&mem.memory()).map_err(|e| ActivateError::Backend(e.to_string()))?;
        wake_event_loop(&self.activate_evt)?;
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
            started: false,
        });
        self.failed = false;
        Ok(())
    }

    fn reset(&mut self) {
        if self.is_started() {
            if let Err(e) = self.stop() {
                tracing::warn!("vhost-user-fs {}: cannot stop the rings: {e}", self.tag);
                self.metrics.backend_errors += 1;
            }
        }
        self.active = None;
        self.failed = false;
        self.acked_features = 0;
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn needs_reset(&self) -> bool {
        self.failed
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

impl MutEventSubscriber for VhostUserFs {
    fn init(&mut self, ops: &mut EventOps) {
        // Not the queue events: those are the daemon's kick descriptors, and reading them here
        // would steal its notifications.
        let activate = Events::with_data(&self.activate_evt, ACTIVATE_EVENT, EventSet::IN);
        let calls = numbered_events(&self.call_events, CALL_EVENT_BASE);
        let events = std::iter::once(activate).chain(calls);
        watch_events(ops, events, self.log_name());
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            ACTIVATE_EVENT => {
                drain_eventfd(&self.activate_evt, self.log_name(), "activation");
                self.start();
            }
            d => self.forward_interrupt((d - CALL_EVENT_BASE) as usize),
        }
    }
}
