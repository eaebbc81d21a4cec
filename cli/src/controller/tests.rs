//! The controller without KVM: a fake machine records what the API asks of it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kestrel_api::{RateLimiterConfig, ThreadNames};
use serde_json::Value;

use super::*;
use crate::api::MemoryRange;
use crate::metrics::MachineCounters;
use crate::vmctl::{MachineError, MemoryInfo, ThreadEntry, VcpuInfo};

#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
}

impl Fake {
    fn log(&self, s: String) {
        self.calls.lock().unwrap().push(s);
    }
}

impl Machine for Fake {
    fn swap_drive(&self, id: &str, path: Option<&Path>, ro: bool) -> Result<(), MachineError> {
        self.log(format!("swap {id} {path:?} {ro}"));
        Ok(())
    }
    fn update_drive_rate_limiter(
        &self,
        id: &str,
        _: &RateLimiterConfig,
    ) -> Result<(), MachineError> {
        self.log(format!("drive-rl {id}"));
        Ok(())
    }
    fn update_net_rate_limiters(
        &self,
        id: &str,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), MachineError> {
        self.log(format!("net-rl {id} {} {}", rx.is_some(), tx.is_some()));
        Ok(())
    }
    fn pause(&self) -> Result<(), MachineError> {
        self.log("pause".into());
        Ok(())
    }
    fn resume(&self) -> Result<(), MachineError> {
        self.log("resume".into());
        Ok(())
    }
    fn snapshot(&self, files: &kestrel_vmm::SnapshotFiles) -> Result<(), MachineError> {
        self.log(format!(
            "snapshot {} {}",
            files.state.display(),
            files.memory.display()
        ));
        Ok(())
    }
    fn send_ctrl_alt_del(&self) -> Result<(), MachineError> {
        self.log("cad".into());
        Ok(())
    }
    fn set_vcpu_count(&self, n: u32) -> Result<(), MachineError> {
        if n > 4 {
            return Err(MachineError::Invalid(format!("vcpu_count: {n} is above 4")));
        }
        self.log(format!("vcpus {n}"));
        Ok(())
    }
    fn vcpus(&self) -> Vec<VcpuInfo> {
        vec![VcpuInfo {
            id: 0,
            state: "running",
            tid: Some(7),
        }]
    }
    fn plug_memory(&self, size: u64, block: u64) -> Result<MemoryRange, MachineError> {
        self.log(format!("plug {size} {block}"));
        Ok(MemoryRange {
            addr: 1 << 32,
            size_mib: size >> 20,
        })
    }
    fn unplug_memory(&self, addr: u64, size: u64) -> Result<(), MachineError> {
        self.log(format!("unplug {addr} {size}"));
        Ok(())
    }
    fn memory(&self) -> MemoryInfo {
        MemoryInfo {
            plugged: vec![],
            hotplug_region: None,
        }
    }
    fn threads(&self) -> Vec<ThreadEntry> {
        vec![ThreadEntry {
            name: "fc_vcpu 0".into(),
            tid: 7,
            kind: "vcpu",
            vcpu: Some(0),
        }]
    }
    fn counters(&self, _: &VmConfig) -> MachineCounters {
        MachineCounters::default()
    }
}

/// What the fake launcher was asked to restore: the load and the console file.
type Restored = Arc<Mutex<Option<(SnapshotLoad, Option<PathBuf>)>>>;

/// Boots and restores the fake machine, recording what it was given.
struct FakeLauncher {
    fake: Arc<Fake>,
    booted: Arc<Mutex<Option<VmConfig>>>,
    restored: Restored,
}

impl Launcher for FakeLauncher {
    fn boot(&mut self, cfg: &mut VmConfig) -> Result<Arc<dyn Machine>, ApiError> {
        cfg.kestrel
            .thread_names
            .get_or_insert(ThreadNames::Firecracker);
        cfg.validate()?;
        *self.booted.lock().unwrap() = Some(cfg.clone());
        Ok(self.fake.clone() as Arc<dyn Machine>)
    }

    /// A state file that does not exist fails, as a real restore would.
    fn restore(
        &mut self,
        load: &SnapshotLoad,
        console: Option<&Path>,
    ) -> Result<(VmConfig, Arc<dyn Machine>), ApiError> {
        if !load.files.state.exists() {
            return Err(MachineError::Invalid("no state file".into()).into());
        }
        *self.restored.lock().unwrap() = Some((load.clone(), console.map(Path::to_path_buf)));
        let mut cfg = VmConfig::new("/snapshot/vmlinux", 2, 256);
        cfg.kestrel.name = Some("restored".into());
        Ok((cfg, self.fake.clone() as Arc<dyn Machine>))
    }
}

struct Harness {
    c: Controller,
    fake: Arc<Fake>,
    booted: Arc<Mutex<Option<VmConfig>>>,
    restored: Restored,
    dir: PathBuf,
}

fn harness(tag: &str) -> Harness {
    let dir = std::env::temp_dir().join(format!("kestrel-ctl-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["vmlinux", "rootfs.ext4", "scratch.img", "new.img"] {
        std::fs::write(dir.join(f), [0u8; 4096]).unwrap();
    }
    let fake = Arc::new(Fake::default());
    let booted = Arc::new(Mutex::new(None));
    let restored = Arc::new(Mutex::new(None));
    let launcher = FakeLauncher {
        fake: fake.clone(),
        booted: booted.clone(),
        restored: restored.clone(),
    };
    let c = Controller::new(
        "vm-test",
        crate::logger::Logger::detached(),
        Metrics::new("vm-test"),
        Box::new(launcher),
    );
    Harness {
        c,
        fake,
        booted,
        restored,
        dir,
    }
}

impl Harness {
    fn req(&mut self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let r = self.c.handle(&Request {
            method: method.into(),
            path: path.into(),
            body: body.map(|b| b.to_string().into_bytes()),
        });
        let v = r
            .body
            .as_deref()
            .map(|b| serde_json::from_str(b).unwrap())
            .unwrap_or(Value::Null);
        (r.status, v)
    }

    fn ok(&mut self, method: &str, path: &str, body: Value) {
        let (status, v) = self.req(method, path, Some(body));
        assert_eq!(status, 204, "{method} {path}: {v}");
    }

    fn fails(&mut self, method: &str, path: &str, body: Option<Value>, needle: &str) {
        let (status, v) = self.req(method, path, body);
        assert_eq!(status, 400, "{method} {path}: {v}");
        let m = v["fault_message"].as_str().unwrap_or_default();
        assert!(
            m.contains(needle),
            "{method} {path}: {m:?} lacks {needle:?}"
        );
    }

    fn path(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }

    fn calls(&self) -> Vec<String> {
        self.fake.calls.lock().unwrap().clone()
    }

    /// Firecracker's getting-started sequence (with a scratch drive), then InstanceStart.
    fn boot(&mut self) {
        self.ok(
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": self.path("vmlinux"),
                   "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}),
        );
        self.ok(
            "PUT",
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "path_on_host": self.path("rootfs.ext4"),
                   "is_root_device": true, "is_read_only": false}),
        );
        self.ok(
            "PUT",
            "/drives/scratch",
            json!({"drive_id": "scratch", "path_on_host": self.path("scratch.img"),
                   "is_root_device": false, "is_read_only": true}),
        );
        self.ok(
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 256}),
        );
        self.ok("PUT", "/actions", json!({"action_type": "InstanceStart"}));
    }
}

#[test]
fn getting_started_sequence_builds_the_config_and_boots() {
    let mut h = harness("gs");
    let (s, v) = h.req("GET", "/", None);
    assert_eq!(s, 200);
    assert_eq!(v["state"], "Not started");
    assert_eq!(v["id"], "vm-test");
    let (s, v) = h.req("GET", "/machine-config", None);
    assert_eq!(
        (s, v["vcpu_count"].as_u64(), v["mem_size_mib"].as_u64()),
        (200, Some(1), Some(128))
    );
    let (_, v) = h.req("GET", "/vm/config", None);
    assert!(v.get("boot-source").is_none(), "{v}");
    h.boot();
    let cfg = h.booted.lock().unwrap().clone().unwrap();
    assert_eq!(cfg.machine_config.vcpu_count, 2);
    assert_eq!(cfg.drives.len(), 2);
    assert!(cfg.drives[0].is_root_device);
    assert_eq!(cfg.kestrel.thread_names, Some(ThreadNames::Firecracker));
    let (_, v) = h.req("GET", "/", None);
    assert_eq!(v["state"], "Running");
    let (_, v) = h.req("GET", "/vm/config", None);
    assert_eq!(
        v["boot-source"]["boot_args"],
        "console=ttyS0 reboot=k panic=1 pci=off"
    );
    assert_eq!(v["drives"][1]["drive_id"], "scratch");
    let (s, v) = h.req("GET", "/version", None);
    assert_eq!(
        (s, v["firecracker_version"].as_str()),
        (200, Some(FIRECRACKER_API_VERSION))
    );
}

#[test]
fn pre_boot_only_requests_fail_after_boot() {
    let mut h = harness("pre");
    h.boot();
    let post = "The requested operation is not supported after starting the microVM.";
    for (path, body) in [
        (
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 128}),
        ),
        (
            "/boot-source",
            json!({"kernel_image_path": h.path("vmlinux")}),
        ),
        (
            "/drives/x",
            json!({"drive_id": "x", "path_on_host": h.path("new.img"), "is_root_device": false}),
        ),
        (
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "tap0"}),
        ),
        (
            "/vsock",
            json!({"guest_cid": 3, "uds_path": h.path("v.sock")}),
        ),
        ("/logger", json!({"level": "Info"})),
        ("/metrics", json!({"metrics_path": h.path("m.log")})),
        ("/actions", json!({"action_type": "InstanceStart"})),
        (
            "/kestrel/fs/share",
            json!({"tag": "share", "shared_dir": h.path("")}),
        ),
    ] {
        h.fails("PUT", path, Some(body), post);
    }
    h.fails(
        "PATCH",
        "/machine-config",
        Some(json!({"vcpu_count": 2})),
        post,
    );
    assert!(
        h.calls().is_empty(),
        "nothing reached the VM: {:?}",
        h.calls()
    );
}

#[test]
fn post_boot_only_requests_fail_before_boot() {
    let mut h = harness("post");
    let pre = "The requested operation is not supported before starting the microVM.";
    h.fails(
        "PATCH",
        "/drives/rootfs",
        Some(json!({"drive_id": "rootfs", "path_on_host": "/x"})),
        pre,
    );
    h.fails(
        "PATCH",
        "/network-interfaces/eth0",
        Some(json!({"iface_id": "eth0"})),
        pre,
    );
    h.fails("PATCH", "/vm", Some(json!({"state": "Paused"})), pre);
    h.fails(
        "PUT",
        "/actions",
        Some(json!({"action_type": "SendCtrlAltDel"})),
        pre,
    );
    h.fails(
        "PUT",
        "/actions",
        Some(json!({"action_type": "FlushMetrics"})),
        pre,
    );
    h.fails(
        "PATCH",
        "/kestrel/vcpus",
        Some(json!({"vcpu_count": 2})),
        pre,
    );
    h.fails(
        "PUT",
        "/kestrel/memory",
        Some(json!({"size_mib": 128})),
        pre,
    );
    h.fails("GET", "/kestrel/threads", None, pre);
    h.fails(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
        "Cannot start microvm without kernel configuration.",
    );
}

#[test]
fn pre_boot_puts_are_validated_and_name_the_field() {
    let mut h = harness("val");
    h.fails(
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": "/nonexistent/vmlinux"})),
        "boot-source.kernel_image_path",
    );
    h.fails(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 0, "mem_size_mib": 128})),
        "machine-config.vcpu_count",
    );
    h.fails(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M"})),
        "Firecracker's `machine-config.huge_pages` = `2M` is not supported by Kestrel",
    );
    h.fails(
        "PUT",
        "/drives/d",
        Some(json!({"drive_id": "d", "path_on_host": "/nonexistent.img", "is_root_device": false})),
        "drives[0].path_on_host",
    );
    h.fails(
        "PUT",
        "/drives/d",
        Some(
            json!({"drive_id": "d", "path_on_host": h.path("new.img"), "is_root_device": false,
                    "io_engine": "Async"}),
        ),
        "not supported by Kestrel",
    );
    h.fails(
        "PUT",
        "/vsock",
        Some(json!({"guest_cid": 2, "uds_path": h.path("v.sock")})),
        "vsock.guest_cid",
    );
    h.fails(
        "PUT",
        "/balloon",
        Some(json!({"amount_mib": 64, "deflate_on_oom": false})),
        "Firecracker's `balloon`",
    );
    h.fails(
        "PUT",
        "/snapshot/create",
        Some(json!({"snapshot_path": "s", "mem_file_path": "m"})),
        "not supported before starting the microVM",
    );
    h.fails(
        "PUT",
        "/serial",
        Some(json!({"rate_limiter": {"size": 1, "refill_time": 1}})),
        "serial.rate_limiter",
    );
    h.ok(
        "PUT",
        "/cpu-config",
        json!({"cpuid_modifiers": [], "msr_modifiers": []}),
    );
    // Nothing of the failed requests stuck.
    let (_, v) = h.req("GET", "/vm/config", None);
    assert_eq!(v["drives"], json!([]));
    assert_eq!(v["machine-config"]["vcpu_count"], 1);
    // Validation at InstanceStart: a second root device is refused then, naming the field.
    h.ok(
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": h.path("vmlinux")}),
    );
    h.ok(
        "PUT",
        "/drives/a",
        json!({"drive_id": "a", "path_on_host": h.path("rootfs.ext4"), "is_root_device": true}),
    );
    h.fails(
        "PUT",
        "/drives/b",
        Some(json!({"drive_id": "b", "path_on_host": h.path("new.img"), "is_root_device": true})),
        "drives[1].is_root_device",
    );
    // PUT of an existing id replaces it.
    h.ok(
        "PUT",
        "/drives/a",
        json!({"drive_id": "a", "path_on_host": h.path("new.img"), "is_root_device": true}),
    );
    let (_, v) = h.req("GET", "/vm/config", None);
    assert_eq!(v["drives"].as_array().unwrap().len(), 1);
    assert_eq!(v["drives"][0]["path_on_host"], h.path("new.img"));
    h.ok("PATCH", "/machine-config", json!({"mem_size_mib": 512}));
    let (_, v) = h.req("GET", "/machine-config", None);
    assert_eq!(
        (v["vcpu_count"].as_u64(), v["mem_size_mib"].as_u64()),
        (Some(1), Some(512))
    );
}

#[test]
fn post_boot_patches_reach_the_vm() {
    let mut h = harness("patch");
    h.boot();
    let new = h.path("new.img");
    h.ok(
        "PATCH",
        "/drives/scratch",
        json!({"drive_id": "scratch", "path_on_host": new}),
    );
    h.ok(
        "PATCH",
        "/drives/scratch",
        json!({"drive_id": "scratch", "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}),
    );
    h.ok(
        "PATCH",
        "/drives/scratch",
        json!({"drive_id": "scratch", "path_on_host": ""}),
    );
    h.fails(
        "PATCH",
        "/drives/nope",
        Some(json!({"drive_id": "nope", "path_on_host": new})),
        "No drive with drive_id `nope`",
    );
    h.fails(
        "PATCH",
        "/drives/scratch",
        Some(json!({"drive_id": "scratch", "rate_limiter": {"ops": {"size": 1, "refill_time": 18446744073709551615u64}}})),
        "drives[1].rate_limiter.ops.refill_time",
    );
    h.ok("PATCH", "/vm", json!({"state": "Paused"}));
    let (_, v) = h.req("GET", "/", None);
    assert_eq!(v["state"], "Paused");
    h.ok("PATCH", "/vm", json!({"state": "Resumed"}));
    h.ok("PUT", "/actions", json!({"action_type": "SendCtrlAltDel"}));
    h.ok("PUT", "/actions", json!({"action_type": "FlushMetrics"}));
    h.ok("PATCH", "/kestrel/vcpus", json!({"vcpu_count": 3}));
    h.fails(
        "PATCH",
        "/kestrel/vcpus",
        Some(json!({"vcpu_count": 9})),
        "vcpu_count: 9",
    );
    let (s, v) = h.req("PUT", "/kestrel/memory", Some(json!({"size_mib": 256})));
    assert_eq!(
        (s, v["addr"].as_u64(), v["size_mib"].as_u64()),
        (200, Some(1 << 32), Some(256))
    );
    h.ok(
        "PUT",
        "/kestrel/memory/unplug",
        json!({"addr": 4294967296u64, "size_mib": 256}),
    );
    let (s, v) = h.req("GET", "/kestrel/threads", None);
    assert_eq!((s, v[0]["name"].as_str()), (200, Some("fc_vcpu 0")));
    assert_eq!(
        h.calls(),
        [
            format!("swap scratch Some({new:?}) true"),
            "drive-rl scratch".into(),
            "swap scratch None true".into(),
            "pause".into(),
            "resume".into(),
            "cad".into(),
            "vcpus 3".into(),
            format!("plug {} {}", 256u64 << 20, 128u64 << 20),
            format!("unplug {} {}", 1u64 << 32, 256u64 << 20),
        ]
    );
    let (_, v) = h.req("GET", "/vm/config", None);
    assert_eq!(v["drives"][1]["path_on_host"], Value::Null);
    assert_eq!(v["drives"][1]["rate_limiter"]["bandwidth"]["size"], 1000);
}

#[test]
fn routing_errors_are_400_with_firecrackers_messages() {
    let mut h = harness("route");
    h.fails(
        "GET",
        "/nope",
        None,
        "Invalid request method and/or path: GET /nope.",
    );
    h.fails(
        "POST",
        "/actions",
        Some(json!({})),
        "Invalid request method and/or path: POST /actions.",
    );
    h.fails("PUT", "/boot-source", None, "Empty PUT request.");
    h.fails(
        "GET",
        "/",
        Some(json!({})),
        "GET request cannot have a body.",
    );
    h.fails(
        "PUT",
        "/actions",
        Some(json!({"action_type": "Stop"})),
        "deserializing the json body",
    );
    h.fails(
        "PUT",
        "/drives/a",
        Some(json!({"drive_id": "b", "is_root_device": false})),
        "does not match",
    );
}

#[test]
fn snapshot_create_needs_a_started_paused_vm() {
    let mut h = harness("snapcreate");
    let body = json!({"snapshot_path": h.path("vm.state"), "mem_file_path": h.path("vm.mem")});
    h.fails(
        "PUT",
        "/snapshot/create",
        Some(body.clone()),
        "not supported before starting the microVM",
    );
    h.boot();
    h.fails(
        "PUT",
        "/snapshot/create",
        Some(body.clone()),
        "Cannot create a snapshot of a running microVM: pause it first",
    );
    h.ok("PATCH", "/vm", json!({"state": "Paused"}));
    let mut diff = body.clone();
    diff["snapshot_type"] = json!("Diff");
    h.fails(
        "PUT",
        "/snapshot/create",
        Some(diff),
        "`snapshot_type` = `Diff` is not supported by Kestrel",
    );
    h.fails(
        "PUT",
        "/snapshot/create",
        Some(json!({"snapshot_path": "s"})),
        "missing field `mem_file_path`",
    );
    h.ok("PUT", "/snapshot/create", body.clone());
    let mut full = body;
    full["snapshot_type"] = json!("Full");
    full["version"] = json!("1.0.0");
    h.ok("PUT", "/snapshot/create", full);
    let (_, v) = h.req("GET", "/", None);
    assert_eq!(v["state"], "Paused", "the VM stays paused");
    let snap = format!("snapshot {} {}", h.path("vm.state"), h.path("vm.mem"));
    assert_eq!(h.calls(), ["pause".to_string(), snap.clone(), snap]);
    h.fails(
        "PUT",
        "/snapshot/other",
        Some(json!({})),
        "Invalid request method and/or path: PUT /snapshot/other.",
    );
}

#[test]
fn snapshot_load_restores_paused_unless_resume_vm() {
    let mut h = harness("snapload");
    std::fs::write(h.dir.join("vm.state"), b"state").unwrap();
    // The logger and the serial console may be set up before a load.
    h.ok("PUT", "/logger", json!({"level": "Info"}));
    h.ok(
        "PUT",
        "/serial",
        json!({"serial_out_path": h.path("console.log")}),
    );
    h.ok(
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": h.path("vm.state"),
               "mem_backend": {"backend_type": "File", "backend_path": h.path("vm.mem")},
               "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap7"}],
               "vsock_override": {"uds_path": h.path("clone.vsock")}}),
    );
    let (load, console) = h.restored.lock().unwrap().clone().unwrap();
    assert_eq!(load.files.memory, h.dir.join("vm.mem"));
    assert_eq!(
        load.overrides.vsock_uds_path,
        Some(h.dir.join("clone.vsock"))
    );
    assert_eq!(
        load.overrides.network_interfaces[0]
            .host_dev_name
            .as_deref(),
        Some("tap7")
    );
    assert_eq!(console, Some(h.dir.join("console.log")));
    assert_eq!(h.calls(), ["pause"], "resume_vm defaults to false");
    let (_, v) = h.req("GET", "/", None);
    assert_eq!(v["state"], "Paused");
    let (_, v) = h.req("GET", "/vm/config", None);
    assert_eq!(v["kestrel"]["name"], "restored", "{v}");
    assert_eq!(v["machine-config"]["vcpu_count"], 2, "{v}");
    // The restored VM is started: post-boot rules from now on.
    h.ok("PATCH", "/vm", json!({"state": "Resumed"}));
    let (_, v) = h.req("GET", "/", None);
    assert_eq!(v["state"], "Running");
    let post = "The requested operation is not supported after starting the microVM.";
    h.fails(
        "PUT",
        "/snapshot/load",
        Some(json!({"snapshot_path": h.path("vm.state"), "mem_file_path": h.path("vm.mem")})),
        post,
    );
    h.fails(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
        post,
    );
    h.fails(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 1, "mem_size_mib": 128})),
        post,
    );
    assert!(h.booted.lock().unwrap().is_none());

    // resume_vm: true leaves it running.
    let mut h = harness("snapresume");
    std::fs::write(h.dir.join("vm.state"), b"state").unwrap();
    h.ok(
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": h.path("vm.state"), "mem_file_path": h.path("vm.mem"),
               "enable_diff_snapshots": false, "resume_vm": true}),
    );
    let (_, v) = h.req("GET", "/", None);
    assert_eq!(v["state"], "Running");
    assert!(h.calls().is_empty(), "{:?}", h.calls());
    let (_, console) = h.restored.lock().unwrap().clone().unwrap();
    assert_eq!(console, None, "no PUT /serial: the snapshot's console");
}

#[test]
fn snapshot_load_is_refused_once_the_vm_is_configured() {
    let paths = [
        "/machine-config",
        "/boot-source",
        "/drives/d",
        "/vsock",
        "/cpu-config",
    ];
    for (i, path) in paths.into_iter().enumerate() {
        let mut h = harness(&format!("snapcfg{i}"));
        std::fs::write(h.dir.join("vm.state"), b"state").unwrap();
        let b = match path {
            "/machine-config" => json!({"vcpu_count": 1, "mem_size_mib": 128}),
            "/boot-source" => json!({"kernel_image_path": h.path("vmlinux")}),
            "/drives/d" => {
                json!({"drive_id": "d", "path_on_host": h.path("new.img"), "is_root_device": false})
            }
            "/vsock" => json!({"guest_cid": 3, "uds_path": h.path("v.sock")}),
            _ => json!({"cpuid_modifiers": [], "msr_modifiers": []}),
        };
        h.ok("PUT", path, b);
        h.fails(
            "PUT",
            "/snapshot/load",
            Some(json!({"snapshot_path": h.path("vm.state"), "mem_file_path": h.path("vm.mem")})),
            "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
        );
        assert!(h.restored.lock().unwrap().is_none(), "{path}");
    }
}

#[test]
fn snapshot_load_bad_bodies_and_failures_leave_the_api_pre_boot() {
    let mut h = harness("snapbad");
    let state = h.path("vm.state");
    for (body, needle) in [
        (
            json!({"snapshot_path": state, "mem_backend": {"backend_type": "Uffd", "backend_path": "/u.sock"}}),
            "`mem_backend.backend_type` = `Uffd` is not supported by Kestrel",
        ),
        (
            json!({"snapshot_path": state, "mem_file_path": "m",
                   "mem_backend": {"backend_type": "File", "backend_path": "m"}}),
            "not both",
        ),
        (
            json!({"snapshot_path": state}),
            "either `mem_backend` or `mem_file_path` is required",
        ),
        (
            json!({"snapshot_path": state, "mem_file_path": "m", "enable_diff_snapshots": true}),
            "`enable_diff_snapshots` = `true`",
        ),
        (
            json!({"snapshot_path": state, "mem_file_path": "m", "vsock_override": {}}),
            "missing field `uds_path`",
        ),
        (
            json!({"snapshot_path": state, "mem_file_path": "m", "resume_vm": "yes"}),
            "deserializing the json body",
        ),
        // The state file does not exist: the restore fails.
        (
            json!({"snapshot_path": state, "mem_file_path": "m"}),
            "no state file",
        ),
    ] {
        h.fails("PUT", "/snapshot/load", Some(body), needle);
    }
    let (_, v) = h.req("GET", "/", None);
    assert_eq!(v["state"], "Not started");
    // Nothing stuck: the API still boots normally.
    h.boot();
    assert!(h.booted.lock().unwrap().is_some());
}
