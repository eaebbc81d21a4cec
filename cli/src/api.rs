//! Firecracker's REST API: which method and path mean what ([`parse`]), the request bodies,
//! and the errors with Firecracker's messages ([`ApiError`]).
//!
//! Routing follows Firecracker's `parsed_request.rs`: a GET with a body, a PUT or PATCH
//! without one, an unknown path or method, a bad id or a body that does not parse are all
//! 400 with a `fault_message`; Firecracker has no 404 or 405, and neither has Kestrel.
//! The snapshot bodies are in [`snapshot`].

mod snapshot;

use std::path::PathBuf;

use kestrel_api::{
    BootSource, ConfigError, DriveConfig, FsConfig, LoggerConfig, MachineConfig, MetricsConfig,
    NetConfig, RateLimiterConfig, VsockConfig,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use snapshot::{SnapshotCreate, SnapshotLoad};

/// Why a request failed. Every variant is answered with 400 and `{"fault_message": ...}`
/// (Firecracker's messages where Firecracker has one).
#[derive(Debug, Error)]
pub enum ApiError {
    /// Generic bad request.
    #[error("{0}")]
    BadRequest(String),
    /// The body is not the JSON the endpoint takes.
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    Json(#[from] serde_json::Error),
    /// No such method and path.
    #[error("Invalid request method and/or path: {method} {path}.")]
    InvalidPathMethod {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// The path has no id where one is needed.
    #[error("The ID cannot be empty.")]
    EmptyId,
    /// Before `InstanceStart`.
    #[error("The requested operation is not supported before starting the microVM.")]
    NotSupportedPreBoot,
    /// After `InstanceStart`.
    #[error("The requested operation is not supported after starting the microVM.")]
    NotSupportedPostBoot,
    /// The configuration is refused (the message names the field).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The running VM refused or failed the operation.
    #[error(transparent)]
    Machine(#[from] crate::vmctl::MachineError),
    /// The logger or metrics could not be set up.
    #[error("{0}")]
    Observability(String),
}

/// Firecracker's `action_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Write the metrics now.
    FlushMetrics,
    /// Validate the configuration and boot.
    InstanceStart,
    /// Press Ctrl-Alt-Del on the guest's i8042 keyboard.
    SendCtrlAltDel,
}

/// `PUT /actions` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: ActionType,
}

/// `PATCH /vm` states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Stop the vCPUs.
    Paused,
    /// Run them again.
    Resumed,
}

/// `PATCH /vm` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmBody {
    state: VmState,
}

/// Firecracker's `PartialDrive` (`PATCH /drives/{id}` after boot).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrivePatch {
    /// Must match the path.
    pub drive_id: String,
    /// A new image (hot-swap). Kestrel: `""` empties the slot.
    #[serde(default)]
    pub path_on_host: Option<PathBuf>,
    /// New limits (replaces the old ones; an empty limiter removes them).
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Firecracker's `PartialNetworkInterface` (`PATCH /network-interfaces/{id}` after boot).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetPatch {
    /// Must match the path.
    pub iface_id: String,
    /// New RX limits.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// New TX limits.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PATCH /machine-config`: the fields to change (pre-boot).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachinePatch {
    /// vCPUs at boot.
    pub vcpu_count: Option<u32>,
    /// Boot RAM in MiB.
    pub mem_size_mib: Option<u64>,
    /// Firecracker's SMT flag.
    pub smt: Option<bool>,
    /// Firecracker's CPU template.
    pub cpu_template: Option<kestrel_api::CpuTemplate>,
    /// Firecracker's dirty-page tracking.
    pub track_dirty_pages: Option<bool>,
    /// Firecracker's huge pages.
    pub huge_pages: Option<kestrel_api::HugePages>,
    /// Kestrel: most vCPUs (hotplug).
    pub max_vcpus: Option<u32>,
    /// Kestrel: most RAM (hotplug), MiB.
    pub max_mem_size_mib: Option<u64>,
}

impl MachinePatch {
    /// Whether the patch changes nothing (Firecracker answers "Empty PATCH request.").
    pub fn is_empty(&self) -> bool {
        *self == MachinePatch::default()
    }

    /// `mc` with the patch applied.
    pub fn apply(&self, mc: &MachineConfig) -> MachineConfig {
        let mut m = mc.clone();
        m.vcpu_count = self.vcpu_count.unwrap_or(m.vcpu_count);
        m.mem_size_mib = self.mem_size_mib.unwrap_or(m.mem_size_mib);
        m.smt = self.smt.unwrap_or(m.smt);
        m.cpu_template = self.cpu_template.or(m.cpu_template);
        m.track_dirty_pages = self.track_dirty_pages.unwrap_or(m.track_dirty_pages);
        m.huge_pages = self.huge_pages.unwrap_or(m.huge_pages);
        m.max_vcpus = self.max_vcpus.or(m.max_vcpus);
        m.max_mem_size_mib = self.max_mem_size_mib.or(m.max_mem_size_mib);
        m
    }
}

/// Firecracker's `SerialDevice` (`PUT /serial`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialBody {
    /// File the console output is appended to.
    #[serde(default)]
    pub serial_out_path: Option<PathBuf>,
    /// Firecracker's output rate limit. Not supported.
    #[serde(default)]
    pub rate_limiter: Option<kestrel_api::TokenBucketConfig>,
}

/// Kestrel extension `PATCH /kestrel/vcpus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpusPatch {
    /// vCPUs that run from now on (0..vcpu_count): missing ones are created or unparked,
    /// those above are parked. The guest onlines/offlines the CPUs itself.
    pub vcpu_count: u32,
}

/// Kestrel extension `PUT /kestrel/memory`: plug RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryPlug {
    /// MiB to add (a multiple of the block size).
    pub size_mib: u64,
    /// The guest's memory block size in MiB (default 128, x86_64's below 64 GiB).
    #[serde(default)]
    pub block_size_mib: Option<u64>,
}

/// Kestrel extension `PUT /kestrel/memory/unplug`: remove a plugged range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRange {
    /// Guest-physical start (as `PUT /kestrel/memory` returned it).
    pub addr: u64,
    /// Size in MiB.
    pub size_mib: u64,
}

/// What a request asks for, with its parsed body.
#[derive(Debug)]
pub enum Route {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachinePatch),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`.
    PutDrive(DriveConfig),
    /// `PATCH /drives/{id}`.
    PatchDrive(DrivePatch),
    /// `PUT /network-interfaces/{id}`.
    PutNet(NetConfig),
    /// `PATCH /network-interfaces/{id}`.
    PatchNet(NetPatch),
    /// `PUT /vsock`.
    PutVsock(VsockConfig),
    /// `PUT /logger`.
    PutLogger(LoggerConfig),
    /// `PUT /metrics`.
    PutMetrics(MetricsConfig),
    /// `PUT /serial`.
    PutSerial(SerialBody),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    PatchVm(VmState),
    /// `PUT` of a Firecracker section Kestrel does not implement (`balloon`, `cpu-config`,
    /// ...), with its JSON body: accepted only when it means "not used".
    PutUnsupported(&'static str, serde_json::Value),
    /// Kestrel: `GET /kestrel/vcpus`.
    GetVcpus,
    /// Kestrel: `PATCH /kestrel/vcpus`.
    PatchVcpus(VcpusPatch),
    /// Kestrel: `GET /kestrel/memory`.
    GetMemory,
    /// Kestrel: `PUT /kestrel/memory`.
    PlugMemory(MemoryPlug),
    /// Kestrel: `PUT /kestrel/memory/unplug`.
    UnplugMemory(MemoryRange),
    /// Kestrel: `PUT /kestrel/fs/{tag}`.
    PutFs(FsConfig),
    /// Kestrel: `GET /kestrel/threads`.
    GetThreads,
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreate),
    /// `PUT /snapshot/load` (checked: Kestrel's refusals are answered before routing).
    LoadSnapshot(SnapshotLoad),
}

/// Firecracker's per-endpoint request counters: (`get_api_requests` / `put_api_requests` /
/// `patch_api_requests`, counter prefix such as `drive`).
pub type MetricKey = (&'static str, &'static str);

/// Route a request. Returns the endpoint's counter (when the path names one Firecracker
/// counts) along with the route or the error.
pub fn parse(
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> (Option<MetricKey>, Result<Route, ApiError>) {
    let segments: Vec<&str> = path.trim_start_matches('/').split_terminator('/').collect();
    let first = segments.first().copied().unwrap_or("");
    let key = metric_key(method, first);
    let r = match (method, body) {
        ("GET", None) => parse_get(&segments),
        ("GET", Some(_)) => Err(ApiError::BadRequest(
            "GET request cannot have a body.".into(),
        )),
        ("PUT", Some(b)) => parse_put(&segments, b),
        ("PUT", None) => Err(ApiError::BadRequest("Empty PUT request.".into())),
        ("PATCH", Some(b)) => parse_patch(&segments, b),
        ("PATCH", None) => Err(ApiError::BadRequest("Empty PATCH request.".into())),
        _ => Err(ApiError::BadRequest(String::new())),
    };
    let r = r.map_err(|e| match e {
        ApiError::BadRequest(m) if m.is_empty() => ApiError::InvalidPathMethod {
            method: method.to_string(),
            path: path.to_string(),
        },
        e => e,
    });
    (key, r)
}

/// The marker [`parse`] turns into [`ApiError::InvalidPathMethod`].
fn invalid() -> ApiError {
    ApiError::BadRequest(String::new())
}

fn metric_key(method: &str, first: &str) -> Option<MetricKey> {
    let group = match method {
        "GET" => "get_api_requests",
        "PUT" => "put_api_requests",
        "PATCH" => "patch_api_requests",
        _ => return None,
    };
    let name = match (method, first) {
        ("GET", "") => "instance_info",
        ("GET", "version") => "vmm_version",
        (_, "machine-config") => "machine_cfg",
        ("PUT", "actions") => "actions",
        ("PUT", "boot-source") => "boot_source",
        ("PUT" | "PATCH", "drives") => "drive",
        ("PUT" | "PATCH", "network-interfaces") => "network",
        ("PUT", "vsock") => "vsock",
        ("PUT", "logger") => "logger",
        ("PUT", "metrics") => "metrics",
        ("PUT", "serial") => "serial",
        _ => return None,
    };
    Some((group, name))
}

fn parse_get(seg: &[&str]) -> Result<Route, ApiError> {
    match seg {
        [] => Ok(Route::GetInstanceInfo),
        ["version"] => Ok(Route::GetVersion),
        ["machine-config"] => Ok(Route::GetMachineConfig),
        ["vm", "config"] => Ok(Route::GetVmConfig),
        ["kestrel", "vcpus"] => Ok(Route::GetVcpus),
        ["kestrel", "memory"] => Ok(Route::GetMemory),
        ["kestrel", "threads"] => Ok(Route::GetThreads),
        _ => Err(invalid()),
    }
}

/// The sections Firecracker has and Kestrel does not implement, by path.
const UNSUPPORTED: &[&str] = &[
    "balloon",
    "cpu-config",
    "entropy",
    "mmds",
    "pmem",
    "hotplug",
];

fn parse_put(seg: &[&str], body: &[u8]) -> Result<Route, ApiError> {
    match seg {
        ["actions"] => Ok(Route::Action(
            serde_json::from_slice::<ActionBody>(body)?.action_type,
        )),
        ["machine-config"] => Ok(Route::PutMachineConfig(serde_json::from_slice(body)?)),
        ["boot-source"] => Ok(Route::PutBootSource(serde_json::from_slice(body)?)),
        ["drives", rest @ ..] => {
            let id = id_from(rest)?;
            let d: DriveConfig = serde_json::from_slice(body)?;
            if d.drive_id != id {
                return Err(ApiError::BadRequest(
                    "The id from the path does not match the id from the body!".into(),
                ));
            }
            Ok(Route::PutDrive(d))
        }
        ["network-interfaces", rest @ ..] => {
            let id = id_from(rest)?;
            let n: NetConfig = serde_json::from_slice(body)?;
            check_same_id(id, &n.iface_id)?;
            Ok(Route::PutNet(n))
        }
        ["vsock"] => Ok(Route::PutVsock(serde_json::from_slice(body)?)),
        ["logger"] => Ok(Route::PutLogger(serde_json::from_slice(body)?)),
        ["metrics"] => Ok(Route::PutMetrics(serde_json::from_slice(body)?)),
        ["serial"] => Ok(Route::PutSerial(serde_json::from_slice(body)?)),
        ["snapshot", "create"] => Ok(Route::CreateSnapshot(serde_json::from_slice(body)?)),
        ["snapshot", "load"] => Ok(Route::LoadSnapshot(
            serde_json::from_slice::<snapshot::SnapshotLoadBody>(body)?.try_into()?,
        )),
        ["kestrel", "memory"] => Ok(Route::PlugMemory(serde_json::from_slice(body)?)),
        ["kestrel", "memory", "unplug"] => Ok(Route::UnplugMemory(serde_json::from_slice(body)?)),
        ["kestrel", "fs", rest @ ..] => {
            let tag = id_from(rest)?;
            let f: FsConfig = serde_json::from_slice(body)?;
            if f.tag != tag {
                return Err(ApiError::BadRequest(format!(
                    "The tag from the path [{tag}] does not match the tag from the body [{}]!",
                    f.tag
                )));
            }
            Ok(Route::PutFs(f))
        }
        [first, ..] => match UNSUPPORTED.iter().find(|s| *s == first) {
            Some(section) => Ok(Route::PutUnsupported(
                section,
                serde_json::from_slice(body)?,
            )),
            None => Err(invalid()),
        },
        [] => Err(invalid()),
    }
}

fn parse_patch(seg: &[&str], body: &[u8]) -> Result<Route, ApiError> {
    match seg {
        ["machine-config"] => {
            let p: MachinePatch = serde_json::from_slice(body)?;
            if p.is_empty() {
                return Err(ApiError::BadRequest("Empty PATCH request.".into()));
            }
            Ok(Route::PatchMachineConfig(p))
        }
        ["drives", rest @ ..] => {
            let id = id_from(rest)?;
            let d: DrivePatch = serde_json::from_slice(body)?;
            if d.drive_id != id {
                return Err(ApiError::BadRequest(
                    "The id from the path does not match the id from the body!".into(),
                ));
            }
            Ok(Route::PatchDrive(d))
        }
        ["network-interfaces", rest @ ..] => {
            let id = id_from(rest)?;
            let n: NetPatch = serde_json::from_slice(body)?;
            check_same_id(id, &n.iface_id)?;
            Ok(Route::PatchNet(n))
        }
        ["vm"] => Ok(Route::PatchVm(
            serde_json::from_slice::<VmBody>(body)?.state,
        )),
        ["kestrel", "vcpus"] => Ok(Route::PatchVcpus(serde_json::from_slice(body)?)),
        _ => Err(invalid()),
    }
}

/// The one id segment after the resource name.
fn id_from<'a>(rest: &[&'a str]) -> Result<&'a str, ApiError> {
    match rest {
        [] | [""] => Err(ApiError::EmptyId),
        [id] => Ok(id),
        _ => Err(invalid()),
    }
}

fn check_same_id(path: &str, body: &str) -> Result<(), ApiError> {
    if path != body {
        return Err(ApiError::BadRequest(format!(
            "The id from the path [{path}] does not match the id from the body [{body}]!"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: &str, path: &str, body: Option<&str>) -> Result<Route, ApiError> {
        parse(method, path, body.map(str::as_bytes)).1
    }

    fn message(r: Result<Route, ApiError>) -> String {
        r.expect_err("an error").to_string()
    }

    #[test]
    fn firecracker_paths_route() {
        assert!(matches!(
            route("GET", "/", None),
            Ok(Route::GetInstanceInfo)
        ));
        assert!(matches!(
            route("GET", "/version", None),
            Ok(Route::GetVersion)
        ));
        assert!(matches!(
            route("GET", "/vm/config", None),
            Ok(Route::GetVmConfig)
        ));
        assert!(matches!(
            route(
                "PUT",
                "/actions",
                Some(r#"{"action_type": "InstanceStart"}"#)
            ),
            Ok(Route::Action(ActionType::InstanceStart))
        ));
        assert!(matches!(
            route("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)),
            Ok(Route::PatchVm(VmState::Paused))
        ));
        let r = route(
            "PUT",
            "/drives/rootfs",
            Some(
                r#"{"drive_id": "rootfs", "path_on_host": "/x", "is_root_device": true, "is_read_only": false}"#,
            ),
        );
        assert!(matches!(r, Ok(Route::PutDrive(d)) if d.is_root_device));
        let r = route(
            "PATCH",
            "/drives/scratch",
            Some(r#"{"drive_id": "scratch", "path_on_host": "/new.img"}"#),
        );
        assert!(matches!(r, Ok(Route::PatchDrive(p)) if p.path_on_host.is_some()));
        let r = route(
            "PUT",
            "/network-interfaces/eth0",
            Some(
                r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}"#,
            ),
        );
        assert!(matches!(r, Ok(Route::PutNet(_))));
        assert!(matches!(
            route(
                "PUT",
                "/balloon",
                Some(r#"{"amount_mib": 1, "deflate_on_oom": true}"#)
            ),
            Ok(Route::PutUnsupported("balloon", _))
        ));
        assert!(matches!(
            route(
                "PUT",
                "/snapshot/create",
                Some(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#)
            ),
            Ok(Route::CreateSnapshot(_))
        ));
        assert!(matches!(
            route(
                "PUT",
                "/snapshot/load",
                Some(r#"{"snapshot_path": "s", "mem_file_path": "m", "resume_vm": true}"#)
            ),
            Ok(Route::LoadSnapshot(SnapshotLoad {
                resume_vm: true,
                ..
            }))
        ));
        let (key, _) = parse("PATCH", "/drives/x", None);
        assert_eq!(key, Some(("patch_api_requests", "drive")));
    }

    #[test]
    fn firecracker_errors_for_bad_requests() {
        assert_eq!(
            message(route("GET", "/", Some("{}"))),
            "GET request cannot have a body."
        );
        assert_eq!(
            message(route("PUT", "/boot-source", None)),
            "Empty PUT request."
        );
        assert_eq!(message(route("PATCH", "/vm", None)), "Empty PATCH request.");
        assert_eq!(
            message(route("PATCH", "/machine-config", Some("{}"))),
            "Empty PATCH request."
        );
        assert_eq!(
            message(route("GET", "/nope", None)),
            "Invalid request method and/or path: GET /nope."
        );
        assert_eq!(
            message(route("POST", "/actions", Some("{}"))),
            "Invalid request method and/or path: POST /actions."
        );
        assert_eq!(
            message(route("DELETE", "/drives/x", None)),
            "Invalid request method and/or path: DELETE /drives/x."
        );
        assert_eq!(
            message(route("PATCH", "/boot-source", Some("{}"))),
            "Invalid request method and/or path: PATCH /boot-source."
        );
        assert_eq!(
            message(route("PUT", "/drives", Some("{}"))),
            "The ID cannot be empty."
        );
        assert_eq!(
            message(route("PUT", "/drives/", Some("{}"))),
            "The ID cannot be empty."
        );
        assert_eq!(
            message(route(
                "PUT",
                "/drives/a",
                Some(r#"{"drive_id": "b", "path_on_host": "/x", "is_root_device": false}"#)
            )),
            "The id from the path does not match the id from the body!"
        );
        assert_eq!(
            message(route(
                "PATCH",
                "/network-interfaces/a",
                Some(r#"{"iface_id": "b"}"#)
            )),
            "The id from the path [a] does not match the id from the body [b]!"
        );
        let m = message(route(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "Reboot"}"#),
        ));
        assert!(
            m.starts_with("An error occurred when deserializing the json body of a request: unknown variant `Reboot`"),
            "{m}"
        );
        let m = message(route(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2}"#),
        ));
        assert!(m.contains("missing field `mem_size_mib`"), "{m}");
        let m = message(route("PUT", "/logger", Some(r#"{"log_path": 3}"#)));
        assert!(m.contains("deserializing"), "{m}");
        let m = message(route("PUT", "/vsock", Some("not json")));
        assert!(m.contains("deserializing"), "{m}");
        let m = message(route("PATCH", "/vm", Some(r#"{"state": "Stopped"}"#)));
        assert!(m.contains("unknown variant `Stopped`"), "{m}");
    }

    #[test]
    fn machine_patch_applies_only_what_it_names() {
        let p: MachinePatch = serde_json::from_str(r#"{"vcpu_count": 4}"#).unwrap();
        let m = p.apply(&MachineConfig::new(1, 256));
        assert_eq!((m.vcpu_count, m.mem_size_mib), (4, 256));
        assert!(serde_json::from_str::<MachinePatch>(r#"{"vcpus": 4}"#).is_err());
    }

    #[test]
    fn kestrel_extensions_route() {
        assert!(matches!(
            route("PATCH", "/kestrel/vcpus", Some(r#"{"vcpu_count": 3}"#)),
            Ok(Route::PatchVcpus(VcpusPatch { vcpu_count: 3 }))
        ));
        assert!(matches!(
            route("PUT", "/kestrel/memory", Some(r#"{"size_mib": 256}"#)),
            Ok(Route::PlugMemory(MemoryPlug {
                size_mib: 256,
                block_size_mib: None
            }))
        ));
        assert!(matches!(
            route(
                "PUT",
                "/kestrel/memory/unplug",
                Some(r#"{"addr": 4294967296, "size_mib": 128}"#)
            ),
            Ok(Route::UnplugMemory(_))
        ));
        assert!(matches!(
            route(
                "PUT",
                "/kestrel/fs/share",
                Some(r#"{"tag": "share", "shared_dir": "/tmp"}"#)
            ),
            Ok(Route::PutFs(_))
        ));
        assert!(route(
            "PUT",
            "/kestrel/fs/a",
            Some(r#"{"tag": "b", "shared_dir": "/tmp"}"#)
        )
        .is_err());
        assert!(matches!(
            route("GET", "/kestrel/threads", None),
            Ok(Route::GetThreads)
        ));
    }
}
