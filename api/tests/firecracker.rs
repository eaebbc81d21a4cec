//! Firecracker's own configuration documents (`tests/firecracker/`, see its README) read by
//! Kestrel with Firecracker's meaning: each validates, or is refused as "not supported by
//! Kestrel" naming the field, or (as in Firecracker) fails to parse.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use kestrel_api::{CacheType, ConfigError, VmConfig, DEFAULT_BOOT_ARGS};
use serde_json::{json, Value};

/// What Kestrel must make of a fixture.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Parses and validates.
    Valid,
    /// Parses, and validation refuses this field as not supported by Kestrel.
    NotSupported(&'static str),
    /// Does not parse; the message contains this.
    ParseError(&'static str),
}
use Expect::*;

/// Every file of `tests/firecracker/config/`.
const CONFIGS: &[(&str, Expect)] = &[
    ("vm_config.json", Valid),
    ("vm_config_network.json", Valid),
    (
        "vm_config_cpu_template_C3.json",
        NotSupported("machine-config.cpu_template"),
    ),
    (
        "vm_config_smt_true.json",
        NotSupported("machine-config.smt"),
    ),
    ("vm_config_with_mmdsv1.json", NotSupported("mmds-config")),
    ("vm_config_with_mmdsv2.json", NotSupported("mmds-config")),
    (
        "vm_config_missing_mem_size_mib.json",
        ParseError("missing field `mem_size_mib`"),
    ),
    (
        "vm_config_missing_vcpu_count.json",
        ParseError("missing field `vcpu_count`"),
    ),
];

/// Every file of `tests/firecracker/bodies/<section>/`.
const BODIES: &[(&str, Expect)] = &[
    ("boot-source/getting-started.json", Valid),
    ("boot-source/initrd.json", Valid),
    ("drives/getting-started.json", Valid),
    ("drives/block-caching.json", Valid),
    ("drives/block-io-engine.json", Valid),
    (
        "drives/block-vhost-user.json",
        NotSupported("drives[0].socket"),
    ),
    ("drives/patch-block.json", Valid),
    ("drives/device-hotplug.json", Valid),
    ("network-interfaces/getting-started.json", Valid),
    ("network-interfaces/network-setup-api.json", Valid),
    ("network-interfaces/network-setup-config-file.json", Valid),
    ("network-interfaces/mmds-user-guide.json", Valid),
    ("vsock/vsock.json", Valid),
    (
        "machine-config/cpu-templates.json",
        NotSupported("machine-config.cpu_template"),
    ),
    ("logger/getting-started.json", Valid),
    ("logger/logger.json", Valid),
    ("logger/tracing-module.json", Valid),
    ("logger/tracing.json", Valid),
    ("metrics/metrics.json", Valid),
    ("metrics/metrics-optional-fields.json", Valid),
    ("metrics/metrics-config-file.json", Valid),
    ("balloon/ballooning.json", NotSupported("balloon")),
    (
        "balloon/ballooning-config-file.json",
        NotSupported("balloon"),
    ),
    (
        "balloon/ballooning-free-page-reporting.json",
        NotSupported("balloon"),
    ),
    (
        "balloon/ballooning-free-page-hinting.json",
        NotSupported("balloon"),
    ),
    (
        "cpu-config/cpu-templates-x86_64.json",
        NotSupported("cpu-config"),
    ),
    ("entropy/entropy.json", NotSupported("entropy")),
    ("entropy/entropy-config-file.json", NotSupported("entropy")),
    (
        "memory-hotplug/memory-hotplug.json",
        NotSupported("memory-hotplug"),
    ),
    (
        "memory-hotplug/memory-hotplug-config-file.json",
        NotSupported("memory-hotplug"),
    ),
    (
        "mmds-config/mmds-user-guide.json",
        NotSupported("mmds-config"),
    ),
    (
        "mmds-config/mmds-user-guide-ipv4.json",
        NotSupported("mmds-config"),
    ),
    (
        "mmds-config/mmds-user-guide-v2.json",
        NotSupported("mmds-config"),
    ),
    ("pmem/pmem-config-file.json", NotSupported("pmem[0]")),
    ("pmem/pmem-api.json", NotSupported("pmem[0]")),
    ("pmem/pmem-rate-limiter.json", NotSupported("pmem[0]")),
];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/firecracker")
}

/// A fresh scratch directory for one test.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-fc-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A new path in `dir` (files are made by the caller when needed).
fn fresh(dir: &Path, stem: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    dir.join(format!("{stem}-{n}")).display().to_string()
}

/// A new regular file in `dir`.
fn file(dir: &Path, stem: &str) -> String {
    let p = fresh(dir, stem);
    std::fs::write(&p, [0u8; 512]).unwrap();
    p
}

/// Replace every host path the document names by a real one in `dir`: files that must exist
/// (kernel, initrd, drive and pmem images) by new files, paths Kestrel creates (vsock socket,
/// log and metrics outputs) by new names. Sockets of external daemons stay as they are.
fn realise(doc: &mut Value, dir: &Path) {
    let set_file = |v: &mut Value, stem: &str| {
        if v.as_str().is_some_and(|s| !s.is_empty()) {
            *v = Value::String(file(dir, stem));
        }
    };
    if let Some(b) = doc.get_mut("boot-source") {
        set_file(&mut b["kernel_image_path"], "vmlinux");
        if let Some(i) = b.get_mut("initrd_path") {
            set_file(i, "initrd");
        }
    }
    for list in ["drives", "pmem"] {
        if let Some(Value::Array(items)) = doc.get_mut(list) {
            for d in items {
                if let Some(p) = d.get_mut("path_on_host") {
                    set_file(p, list);
                }
            }
        }
    }
    for (section, field) in [
        ("vsock", "uds_path"),
        ("logger", "log_path"),
        ("metrics", "metrics_path"),
    ] {
        if let Some(p) = doc.get_mut(section).and_then(|s| s.get_mut(field)) {
            if p.is_string() {
                *p = Value::String(fresh(dir, field));
            }
        }
    }
}

/// Parse and validate `doc` (paths realised in `dir`) and check the outcome against `expect`.
fn check(name: &str, mut doc: Value, dir: &Path, expect: Expect) -> Option<VmConfig> {
    realise(&mut doc, dir);
    let parsed = VmConfig::from_json(&doc.to_string());
    match (expect, parsed) {
        (ParseError(want), Err(e)) => {
            assert!(
                matches!(e, ConfigError::Parse(_)) && e.to_string().contains(want),
                "{name}: {e}"
            );
            None
        }
        (ParseError(_), Ok(_)) => panic!("{name}: parsed, but Firecracker refuses it"),
        (_, Err(e)) => panic!("{name}: does not parse: {e}"),
        (Valid, Ok(cfg)) => {
            if let Err(e) = cfg.validate() {
                panic!("{name}: {e}");
            }
            Some(cfg)
        }
        (NotSupported(field), Ok(cfg)) => {
            let e = cfg.validate().expect_err(name);
            assert!(matches!(e, ConfigError::NotSupported { .. }), "{name}: {e}");
            assert_eq!(e.field(), Some(field), "{name}: {e}");
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("Firecracker's `{field}` = `"))
                    && msg.ends_with("` is not supported by Kestrel"),
                "{name}: {msg}"
            );
            None
        }
    }
}

/// The names of the `.json` files under `dir`, relative to it, sorted.
fn json_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "json") {
                let rel = p.strip_prefix(dir).unwrap();
                out.push(rel.display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn read(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_fixture_has_an_expected_outcome() {
    let listed = |t: &[(&str, Expect)]| {
        let mut v: Vec<String> = t.iter().map(|(n, _)| n.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(json_files(&fixtures().join("config")), listed(CONFIGS));
    assert_eq!(json_files(&fixtures().join("bodies")), listed(BODIES));
}

#[test]
fn firecracker_config_files() {
    let dir = scratch("configs");
    for (name, expect) in CONFIGS {
        let doc = read(&fixtures().join("config").join(name));
        let cfg = check(name, doc, &dir, *expect);
        if *name == "vm_config.json" {
            let cfg = cfg.as_ref().unwrap();
            // Firecracker's meaning, field by field.
            assert_eq!(cfg.machine_config.vcpu_count, 2);
            assert_eq!(cfg.machine_config.mem_size_mib, 1024);
            assert_eq!(
                cfg.boot_source.boot_args.as_deref(),
                Some("console=ttyS0 reboot=k panic=1")
            );
            let d = &cfg.drives[0];
            assert!(d.is_root_device && !d.is_read_only);
            assert_eq!(d.cache_type, CacheType::Unsafe);
            assert!(!d.offers_flush(), "Unsafe: no flush offered");
            assert_eq!(d.rate_limiter, None);
            assert!(cfg.network_interfaces.is_empty() && cfg.pmem.is_empty());
            assert!(cfg.logger.is_none() && cfg.metrics.is_none() && cfg.vsock.is_none());
        }
        if *name == "vm_config_network.json" {
            let n = &cfg.as_ref().unwrap().network_interfaces[0];
            assert_eq!(n.tap_name(), Some("tap0"));
            assert_eq!(n.mac(), Some([0x06, 0, 0xc0, 0xa8, 0, 2]));
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn firecracker_doc_bodies() {
    let dir = scratch("bodies");
    for (name, expect) in BODIES {
        let body = read(&fixtures().join("bodies").join(name));
        let section = name.split('/').next().unwrap();
        let doc = match section {
            "boot-source" => json!({ "boot-source": body }),
            "drives" | "network-interfaces" | "pmem" if !body.is_array() => {
                json!({ "boot-source": {"kernel_image_path": "k"}, section: [body] })
            }
            _ => json!({ "boot-source": {"kernel_image_path": "k"}, section: body }),
        };
        let cfg = check(name, doc, &dir, *expect);
        match *name {
            "drives/block-caching.json" => {
                assert!(cfg.unwrap().drives[0].offers_flush(), "Writeback");
            }
            "drives/patch-block.json" => {
                let d = &cfg.unwrap().drives[0];
                assert!(d.is_read_only);
                let rl = d.rate_limiter.unwrap();
                assert_eq!(rl.bandwidth.unwrap().one_time_burst, Some(4096));
                assert_eq!(rl.ops.unwrap().refill_time, 250);
            }
            "logger/logger.json" => {
                let l = cfg.unwrap().logger.unwrap();
                assert_eq!(l.level, Some(kestrel_api::LogLevel::Warn), "Warning");
            }
            "metrics/metrics-optional-fields.json" => {
                let m = cfg.unwrap().metrics.unwrap();
                assert!(m.emit_id);
                assert_eq!(m.properties.unwrap().len(), 2);
            }
            _ => {}
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn null_for_every_optional_section_and_field() {
    let dir = scratch("nulls");
    let doc = json!({
        "boot-source": {"kernel_image_path": "k", "boot_args": null, "initrd_path": null},
        "machine-config": null,
        "drives": [{
            "drive_id": "d0", "path_on_host": "img", "is_root_device": false,
            "partuuid": null, "is_read_only": null, "rate_limiter": null, "io_engine": null,
            "socket": null, "serial": null
        }],
        "network-interfaces": [{
            "iface_id": "n0", "host_dev_name": null, "guest_mac": null,
            "rx_rate_limiter": null, "tx_rate_limiter": null, "mtu": null
        }],
        "vsock": null, "logger": null, "metrics": null, "balloon": null, "cpu-config": null,
        "entropy": null, "memory-hotplug": null, "mmds-config": null, "pmem": null,
        "fs": null, "serial": null, "kestrel": null
    });
    let cfg = check("all nulls", doc, &dir, Valid).unwrap();
    // null means what absence means.
    let k = cfg.boot_source.kernel_image_path.display().to_string();
    let img = cfg.drives[0].path_on_host.clone().unwrap();
    let absent = json!({
        "boot-source": {"kernel_image_path": k},
        "drives": [{"drive_id": "d0", "path_on_host": img}],
        "network-interfaces": [{"iface_id": "n0"}]
    });
    assert_eq!(VmConfig::from_json(&absent.to_string()).unwrap(), cfg);
    // An absent or null machine-config is Firecracker's 1 vCPU and 128 MiB.
    assert_eq!(cfg.machine_config.vcpu_count, 1);
    assert_eq!(cfg.machine_config.mem_size_mib, 128);
    assert!(!cfg.drives[0].is_read_only);
    assert!(cfg.network_interfaces[0].is_hot_attach_slot());
    // Only the sections that are optional in Firecracker (and Kestrel's lists) take null.
    let e = VmConfig::from_json(r#"{"boot-source": null}"#).unwrap_err();
    assert!(matches!(e, ConfigError::Parse(_)), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn token_bucket_of_size_zero_means_no_limit() {
    let dir = scratch("buckets");
    let doc = json!({
        "boot-source": {"kernel_image_path": "k"},
        "drives": [{"drive_id": "d0", "path_on_host": "img", "is_root_device": false,
            "rate_limiter": {"bandwidth": {"size": 0, "refill_time": 100},
                             "ops": {"size": 100, "one_time_burst": 0, "refill_time": 0}}}],
        "network-interfaces": [{"iface_id": "n0", "host_dev_name": "tap0",
            "rx_rate_limiter": {"bandwidth": {"size": 0, "one_time_burst": 0, "refill_time": 0}},
            "tx_rate_limiter": {"ops": {"size": 0, "refill_time": 1000},
                                "bandwidth": {"size": 1000, "refill_time": 1000}}}]
    });
    let cfg = check("size 0", doc, &dir, Valid).unwrap();
    let rl = cfg.drives[0].rate_limiter.unwrap();
    assert_eq!((rl.bandwidth, rl.ops), (None, None), "no limit");
    let n = &cfg.network_interfaces[0];
    assert_eq!(n.rx_rate_limiter.unwrap().bandwidth, None);
    let tx = n.tx_rate_limiter.unwrap();
    assert_eq!(tx.ops, None);
    assert_eq!(tx.bandwidth.unwrap().size, 1000, "a real bucket stays");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn default_boot_args_are_firecrackers() {
    // Firecracker 81b38b9da, src/vmm/src/vmm_config/boot_source.rs, DEFAULT_KERNEL_CMDLINE.
    assert_eq!(
        DEFAULT_BOOT_ARGS,
        "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd \
         swiotlb=noforce"
    );
    let cfg = VmConfig::from_json(r#"{"boot-source": {"kernel_image_path": "k"}}"#).unwrap();
    assert_eq!(cfg.boot_source.boot_args, None);
    assert_eq!(cfg.boot_source.boot_args_or_default(), DEFAULT_BOOT_ARGS);
    let cfg = VmConfig::from_json(
        r#"{"boot-source": {"kernel_image_path": "k", "boot_args": "console=ttyS0"}}"#,
    )
    .unwrap();
    assert_eq!(cfg.boot_source.boot_args_or_default(), "console=ttyS0");
}

#[test]
fn kestrel_example_config_keeps_validating() {
    let dir = scratch("kestrel");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../resources/configs/default.json");
    let doc = read(&path);
    let cfg = check("resources/configs/default.json", doc, &dir, Valid).unwrap();
    assert_eq!(
        cfg.boot_source.boot_args.as_deref(),
        Some("console=ttyS0 reboot=k panic=1")
    );
    assert_eq!(
        (
            cfg.machine_config.vcpu_count,
            cfg.machine_config.mem_size_mib
        ),
        (1, 256)
    );
    let _ = std::fs::remove_dir_all(dir);
}
