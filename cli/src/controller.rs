//! The API's state machine: before `InstanceStart` the requests build a
//! `kestrel_api::VmConfig`; `InstanceStart` validates it and boots; afterwards only what
//! Firecracker allows after boot (and Kestrel's run-time extensions) is accepted.
//!
//! Firecracker's rules: `PUT /machine-config`, `/boot-source`, `/drives`,
//! `/network-interfaces`, `/vsock`, `/logger`, `/metrics`, `/serial` and `InstanceStart` only
//! before boot; `PATCH /drives`, `/network-interfaces`, `/vm`, `SendCtrlAltDel` and
//! `FlushMetrics` only after. Anything else out of turn is 400 with Firecracker's message.
//!
//! Snapshots as in Firecracker: `PUT /snapshot/create` needs a paused VM; `PUT /snapshot/load`
//! is accepted only before anything that shapes the VM was configured (boot source, machine
//! configuration, devices), and takes the place of `InstanceStart`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kestrel_api::{
    BootSource, ConfigError, CpuConfig, FsConfig, MachineConfig, SerialOutput, VmConfig,
};
use serde_json::json;

use crate::api::{
    self, ActionType, ApiError, DrivePatch, NetPatch, Route, SnapshotCreate, SnapshotLoad, VmState,
};
use crate::http::{Request, Response};
use crate::logger::Logger;
use crate::metrics::Metrics;
use crate::server::Handler;
use crate::vmctl::Machine;

/// The Firecracker API version Kestrel implements (the `info.version` of Firecracker's
/// swagger at the commit docs/firecracker-config.md names), answered by `GET /version`.
pub const FIRECRACKER_API_VERSION: &str = "1.17.0-dev";
/// Firecracker's instance id when none is given (`--id`).
pub const DEFAULT_INSTANCE_ID: &str = "anonymous-instance";
/// RAM block size for `PUT /kestrel/memory` when the body gives none (MiB).
const DEFAULT_BLOCK_MIB: u64 = 128;

/// Firecracker's answer to `PUT /snapshot/load` after configuring the VM.
const LOAD_AFTER_CONFIG: &str =
    "Loading a microVM snapshot not allowed after configuring boot-specific resources.";

/// Creates the VM the API asks for: the binary's over `kestrel_vmm::Vm`, a fake in tests.
pub trait Launcher: Send {
    /// `InstanceStart`: apply the binary's defaults to `config`, validate it, create and start
    /// the VM. Errors name the field where the configuration is at fault.
    fn boot(&mut self, config: &mut VmConfig) -> Result<Arc<dyn Machine>, ApiError>;

    /// `PUT /snapshot/load`: restore the snapshot with its overrides and start it, the serial
    /// console appended to `console` when given (else where the snapshot's configuration
    /// says). Returns the restored VM's configuration and the VM.
    fn restore(
        &mut self,
        load: &SnapshotLoad,
        console: Option<&Path>,
    ) -> Result<(VmConfig, Arc<dyn Machine>), ApiError>;
}

/// The launcher of a controller whose VM runs already: nothing more can be launched.
struct Launched;

impl Launcher for Launched {
    fn boot(&mut self, _: &mut VmConfig) -> Result<Arc<dyn Machine>, ApiError> {
        Err(ApiError::NotSupportedPostBoot)
    }

    fn restore(
        &mut self,
        _: &SnapshotLoad,
        _: Option<&Path>,
    ) -> Result<(VmConfig, Arc<dyn Machine>), ApiError> {
        Err(ApiError::NotSupportedPostBoot)
    }
}

/// The API controller (one per process; the server thread owns it).
pub struct Controller {
    /// Before boot: what the requests built so far (`boot-source` holds a placeholder until
    /// `boot_source_set`). After boot: the configuration the VM runs, with run-time changes.
    config: VmConfig,
    boot_source_set: bool,
    /// Something that shapes the VM was put (then a snapshot can no longer be loaded).
    configured: bool,
    machine: Option<Arc<dyn Machine>>,
    paused: bool,
    instance_id: String,
    logger: Logger,
    metrics: Arc<Metrics>,
    launcher: Box<dyn Launcher>,
}

impl Controller {
    /// A controller before boot.
    pub fn new(
        instance_id: &str,
        logger: Logger,
        metrics: Arc<Metrics>,
        launcher: Box<dyn Launcher>,
    ) -> Self {
        let mut config = VmConfig::new("", 1, 128);
        config.machine_config = MachineConfig::default();
        config.boot_source.boot_args = None;
        Controller {
            config,
            boot_source_set: false,
            configured: false,
            machine: None,
            paused: false,
            instance_id: instance_id.to_string(),
            logger,
            metrics,
            launcher,
        }
    }

    /// A controller for a VM booted (from `--config-file`) or restored (`kestrel restore`)
    /// already.
    pub fn running(
        instance_id: &str,
        logger: Logger,
        metrics: Arc<Metrics>,
        config: VmConfig,
        machine: Arc<dyn Machine>,
    ) -> Self {
        let mut c = Controller::new(instance_id, logger, metrics, Box::new(Launched));
        c.config = config;
        c.boot_source_set = true;
        c.started(machine);
        c
    }

    fn started(&mut self, machine: Arc<dyn Machine>) {
        let (m, cfg) = (machine.clone(), self.config.clone());
        self.metrics.set_source(Box::new(move || m.counters(&cfg)));
        self.machine = Some(machine);
    }

    fn pre_boot(&self) -> Result<(), ApiError> {
        match self.machine {
            None => Ok(()),
            Some(_) => Err(ApiError::NotSupportedPostBoot),
        }
    }

    fn post_boot(&self) -> Result<&Arc<dyn Machine>, ApiError> {
        self.machine.as_ref().ok_or(ApiError::NotSupportedPreBoot)
    }

    fn state(&self) -> &'static str {
        match (&self.machine, self.paused) {
            (None, _) => "Not started",
            (Some(_), false) => "Running",
            (Some(_), true) => "Paused",
        }
    }

    fn dispatch(&mut self, route: Route) -> Result<Response, ApiError> {
        match route {
            Route::GetInstanceInfo => Ok(Response::json(&json!({
                "id": self.instance_id,
                "state": self.state(),
                "vmm_version": env!("CARGO_PKG_VERSION"),
                "app_name": "Kestrel",
            }))),
            Route::GetVersion => Ok(Response::json(&json!({
                "firecracker_version": FIRECRACKER_API_VERSION,
                "kestrel_version": env!("CARGO_PKG_VERSION"),
            }))),
            Route::GetMachineConfig => Ok(Response::json(&self.config.machine_config)),
            Route::GetVmConfig => Ok(Response::json(&self.vm_config_json())),
            Route::PutMachineConfig(mc) => self.set_machine_config(mc),
            Route::PatchMachineConfig(p) => {
                self.set_machine_config(p.apply(&self.config.machine_config))
            }
            Route::PutBootSource(b) => self.put_boot_source(b),
            Route::PutDrive(d) => self.put_device(|c| upsert(&mut c.drives, d, |x| &x.drive_id)),
            Route::PatchDrive(p) => self.patch_drive(p),
            Route::PutNet(n) => {
                self.put_device(|c| upsert(&mut c.network_interfaces, n, |x| &x.iface_id))
            }
            Route::PatchNet(p) => self.patch_net(p),
            Route::PutVsock(v) => self.put_device(|c| c.vsock = Some(v)),
            Route::PutFs(f) => self.put_device(|c| upsert(&mut c.fs, f, |x: &FsConfig| &x.tag)),
            Route::PutLogger(l) => {
                self.pre_boot()?;
                l.validate()?;
                self.logger.apply(&l).map_err(|e| {
                    ApiError::Observability(format!(
                        "Logger error: Failed to open target file: {e}"
                    ))
                })?;
                self.config.logger = Some(l);
                Ok(Response::no_content())
            }
            Route::PutMetrics(m) => {
                self.pre_boot()?;
                m.validate()?;
                self.metrics
                    .init(&m)
                    .map_err(|e| ApiError::Observability(format!("Metrics error: {e}")))?;
                self.config.metrics = Some(m);
                Ok(Response::no_content())
            }
            Route::PutSerial(s) => self.put_serial(s),
            Route::Action(a) => self.action(a),
            Route::PatchVm(s) => self.patch_vm(s),
            Route::PutUnsupported(section, body) => self.put_unsupported(section, body),
            Route::CreateSnapshot(s) => self.create_snapshot(&s),
            Route::LoadSnapshot(l) => self.load_snapshot(&l),
            route => self.kestrel_extension(route),
        }
    }

    fn kestrel_extension(&mut self, route: Route) -> Result<Response, ApiError> {
        let m = self.post_boot()?;
        match route {
            Route::GetVcpus => Ok(Response::json(&m.vcpus())),
            Route::PatchVcpus(v) => {
                m.set_vcpu_count(v.vcpu_count)?;
                Ok(Response::no_content())
            }
            Route::GetMemory => Ok(Response::json(&m.memory())),
            Route::PlugMemory(p) => {
                let block = p.block_size_mib.unwrap_or(DEFAULT_BLOCK_MIB);
                let (size, block) =
                    mib_bytes(p.size_mib).zip(mib_bytes(block)).ok_or_else(|| {
                        ApiError::BadRequest("size_mib or block_size_mib is too large".into())
                    })?;
                Ok(Response::json(&m.plug_memory(size, block)?))
            }
            Route::UnplugMemory(r) => {
                let size = mib_bytes(r.size_mib)
                    .ok_or_else(|| ApiError::BadRequest("size_mib is too large".into()))?;
                m.unplug_memory(r.addr, size)?;
                Ok(Response::no_content())
            }
            Route::GetThreads => Ok(Response::json(&m.threads())),
            _ => Err(ApiError::BadRequest("unexpected route".into())),
        }
    }

    /// `GET /vm/config`: the configuration, without `boot-source` until one was given.
    fn vm_config_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.config).unwrap_or_default();
        if !self.boot_source_set {
            if let Some(o) = v.as_object_mut() {
                o.remove("boot-source");
            }
        }
        v
    }

    fn set_machine_config(&mut self, mc: MachineConfig) -> Result<Response, ApiError> {
        self.pre_boot()?;
        mc.validate()?;
        self.config.machine_config = mc;
        self.configured = true;
        Ok(Response::no_content())
    }

    fn put_boot_source(&mut self, b: BootSource) -> Result<Response, ApiError> {
        self.pre_boot()?;
        b.validate()?;
        self.config.boot_source = b;
        self.boot_source_set = true;
        self.configured = true;
        Ok(Response::no_content())
    }

    /// Apply `change` to a copy of the configuration, check the device sections, keep it.
    fn put_device(&mut self, change: impl FnOnce(&mut VmConfig)) -> Result<Response, ApiError> {
        self.pre_boot()?;
        let mut c = self.config.clone();
        change(&mut c);
        c.validate_drives()?;
        c.validate_network_interfaces()?;
        if let Some(v) = &c.vsock {
            v.validate()?;
        }
        c.validate_fs()?;
        self.config = c;
        self.configured = true;
        Ok(Response::no_content())
    }

    fn patch_drive(&mut self, p: DrivePatch) -> Result<Response, ApiError> {
        let m = self.post_boot()?.clone();
        let i = self
            .config
            .drives
            .iter()
            .position(|d| d.drive_id == p.drive_id)
            .ok_or_else(|| {
                ApiError::BadRequest(format!("No drive with drive_id `{}`.", p.drive_id))
            })?;
        if let Some(rl) = &p.rate_limiter {
            rl.validate(&format!("drives[{i}].rate_limiter"))?;
        }
        if let Some(path) = &p.path_on_host {
            let ro = self.config.drives[i].is_read_only;
            let path = (!path.as_os_str().is_empty()).then_some(path.as_path());
            m.swap_drive(&p.drive_id, path, ro)?;
            self.config.drives[i].path_on_host = path.map(Into::into);
        }
        if let Some(rl) = p.rate_limiter {
            m.update_drive_rate_limiter(&p.drive_id, &rl)?;
            self.config.drives[i].rate_limiter = Some(rl);
        }
        Ok(Response::no_content())
    }

    fn patch_net(&mut self, p: NetPatch) -> Result<Response, ApiError> {
        let m = self.post_boot()?.clone();
        let i = self
            .config
            .network_interfaces
            .iter()
            .position(|n| n.iface_id == p.iface_id)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "No network interface with iface_id `{}`.",
                    p.iface_id
                ))
            })?;
        for (rl, name) in [(&p.rx_rate_limiter, "rx"), (&p.tx_rate_limiter, "tx")] {
            if let Some(rl) = rl {
                rl.validate(&format!("network-interfaces[{i}].{name}_rate_limiter"))?;
            }
        }
        m.update_net_rate_limiters(
            &p.iface_id,
            p.rx_rate_limiter.as_ref(),
            p.tx_rate_limiter.as_ref(),
        )?;
        let n = &mut self.config.network_interfaces[i];
        n.rx_rate_limiter = p.rx_rate_limiter.or(n.rx_rate_limiter);
        n.tx_rate_limiter = p.tx_rate_limiter.or(n.tx_rate_limiter);
        Ok(Response::no_content())
    }

    fn put_serial(&mut self, s: api::SerialBody) -> Result<Response, ApiError> {
        self.pre_boot()?;
        if let Some(rl) = &s.rate_limiter {
            return Err(ConfigError::not_supported("serial.rate_limiter", rl).into());
        }
        let mut serial = self.config.serial.clone();
        if let Some(p) = s.serial_out_path {
            serial.output = SerialOutput::File;
            serial.path = Some(p);
        }
        serial.validate()?;
        self.config.serial = serial;
        Ok(Response::no_content())
    }

    fn action(&mut self, a: ActionType) -> Result<Response, ApiError> {
        match a {
            ActionType::InstanceStart => {
                self.pre_boot()?;
                if !self.boot_source_set {
                    return Err(ApiError::BadRequest(
                        "Cannot start microvm without kernel configuration.".into(),
                    ));
                }
                let mut config = self.config.clone();
                let machine = self.launcher.boot(&mut config)?;
                self.config = config;
                self.started(machine);
                tracing::info!("the microVM started");
            }
            ActionType::SendCtrlAltDel => self.post_boot()?.send_ctrl_alt_del()?,
            ActionType::FlushMetrics => {
                self.post_boot()?;
                self.metrics.flush();
            }
        }
        Ok(Response::no_content())
    }

    fn patch_vm(&mut self, s: VmState) -> Result<Response, ApiError> {
        let m = self.post_boot()?.clone();
        let t0 = Instant::now();
        let name = match s {
            VmState::Paused => {
                m.pause()?;
                self.paused = true;
                "pause_vm"
            }
            VmState::Resumed => {
                m.resume()?;
                self.paused = false;
                "resume_vm"
            }
        };
        self.metrics.store("latencies_us", name, micros_since(t0));
        Ok(Response::no_content())
    }

    /// `PUT /snapshot/create`: the paused VM's state and memory into the two files.
    fn create_snapshot(&mut self, s: &SnapshotCreate) -> Result<Response, ApiError> {
        let m = self.post_boot()?.clone();
        let files = s.files()?;
        if !self.paused {
            return Err(ApiError::BadRequest(
                "Cannot create a snapshot of a running microVM: pause it first \
                 (PATCH /vm {\"state\": \"Paused\"})."
                    .into(),
            ));
        }
        let t0 = Instant::now();
        m.snapshot(&files)?;
        self.metrics
            .store("latencies_us", "full_create_snapshot", micros_since(t0));
        tracing::info!("snapshot written to {}", files.state.display());
        Ok(Response::no_content())
    }

    /// `PUT /snapshot/load`: restore and start in place of `InstanceStart`; paused unless
    /// `resume_vm`.
    fn load_snapshot(&mut self, l: &SnapshotLoad) -> Result<Response, ApiError> {
        self.pre_boot()?;
        if self.configured {
            return Err(ApiError::BadRequest(LOAD_AFTER_CONFIG.into()));
        }
        let t0 = Instant::now();
        let console = self.serial_file();
        let (config, machine) = self.launcher.restore(l, console.as_deref())?;
        self.config = config;
        self.boot_source_set = true;
        self.started(machine.clone());
        if !l.resume_vm {
            machine.pause()?;
            self.paused = true;
        }
        self.metrics
            .store("latencies_us", "load_snapshot", micros_since(t0));
        tracing::info!("the microVM was restored from {}", l.files.state.display());
        Ok(Response::no_content())
    }

    /// The console file `PUT /serial` named, if any.
    fn serial_file(&self) -> Option<PathBuf> {
        let s = &self.config.serial;
        match s.output {
            SerialOutput::File => s.path.clone(),
            _ => None,
        }
    }

    /// A Firecracker section Kestrel does not implement: a `cpu-config` template that changes
    /// nothing is accepted before boot (it means "not used"); anything else is refused.
    fn put_unsupported(
        &mut self,
        section: &str,
        body: serde_json::Value,
    ) -> Result<Response, ApiError> {
        if section == "cpu-config" {
            let c: CpuConfig = serde_json::from_value(body)?;
            if matches!(&c, CpuConfig::Template(t) if t.is_empty()) {
                self.pre_boot()?;
                self.config.cpu_config = Some(c);
                self.configured = true;
                return Ok(Response::no_content());
            }
            return Err(ConfigError::not_supported("cpu-config", &c).into());
        }
        Err(ConfigError::not_supported(section, &body).into())
    }
}

/// Replace the element with `item`'s id, or append it.
fn upsert<T>(list: &mut Vec<T>, item: T, id: impl Fn(&T) -> &String) {
    match list.iter().position(|x| id(x) == id(&item)) {
        Some(i) => list[i] = item,
        None => list.push(item),
    }
}

/// Microseconds since `t0` (for `latencies_us`).
fn micros_since(t0: Instant) -> u64 {
    u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn mib_bytes(mib: u64) -> Option<u64> {
    mib.checked_mul(1 << 20)
}

impl Handler for Controller {
    fn handle(&mut self, req: &Request) -> Response {
        tracing::info!(
            "The API server received a {} request on {:?}.",
            req.method,
            req.path
        );
        let mut key = None;
        // A panic while handling one request answers 500 and leaves the server running.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (k, route) = api::parse(&req.method, &req.path, req.body.as_deref());
            key = k;
            if let Some(k) = k {
                self.metrics.count_request(k);
            }
            route.and_then(|r| self.dispatch(r))
        }));
        let response = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!("Received Error. Status code: 400 Bad Request. Message: {e}");
                Response::fault(400, &e.to_string())
            }
            Err(_) => Response::fault(500, "internal error: the request handler panicked"),
        };
        if let Some(k) = key.filter(|_| response.status >= 300) {
            self.metrics.count_failure(k);
        }
        response
    }
}

#[cfg(test)]
mod tests;
