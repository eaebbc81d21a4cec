//! `VmConfig::from_json` + `validate()` on arbitrary bytes, and the round trip of every
//! configuration that validates.
//!
//! | input bytes | use                                                                      |
//! |-------------|--------------------------------------------------------------------------|
//! | all         | the JSON document: valid UTF-8 as is, otherwise `String::from_utf8_lossy` |
//!
//! `from_json` must never panic. A document that parses is validated (`validate`, then
//! `validate_for_boot`), which looks at the files it names; the harness keeps it away from
//! `/dev`, `/proc`, `/sys` and `/run` (opening some device nodes has side effects) and offers
//! fixtures in `/tmp/kestrel-fuzz-config/` (`vmlinux`, a tiny ELF; `initrd`; `disk.img`; the
//! `share/` directory) that the seeds name, so that valid configurations are reached.
//! Asserted: a configuration that validates serializes, parses back equal, and validates again.

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kestrel_api::VmConfig;
use libfuzzer_sys::fuzz_target;

const FIXTURES: &str = "/tmp/kestrel-fuzz-config";

/// A tiny x86_64 ELF (`hlt`) like `tests::tiny_elf`.
fn tiny_elf() -> Vec<u8> {
    const LOAD: u64 = 0x100_0000;
    let code = [0xf4u8];
    let mut e = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    e.extend_from_slice(&2u16.to_le_bytes());
    e.extend_from_slice(&0x3eu16.to_le_bytes());
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&LOAD.to_le_bytes());
    e.extend_from_slice(&64u64.to_le_bytes());
    e.extend_from_slice(&0u64.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&7u32.to_le_bytes());
    for v in [120u64, LOAD, LOAD, 1, 1, 0x1000] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&code);
    e
}

fn fixtures() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let d = Path::new(FIXTURES);
        std::fs::create_dir_all(d.join("share")).unwrap();
        std::fs::write(d.join("vmlinux"), tiny_elf()).unwrap();
        std::fs::write(d.join("initrd"), [0u8; 512]).unwrap();
        std::fs::write(d.join("disk.img"), vec![0u8; 4096]).unwrap();
    });
}

/// Whether validating may look at `p`: not under the kernel's pseudo file systems or device
/// nodes (where it resolves to, if it exists).
fn harmless(p: &Path) -> bool {
    let resolved: PathBuf = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let bad = |q: &Path| {
        ["/dev", "/proc", "/sys", "/run"]
            .iter()
            .any(|root| q.starts_with(root))
            || q.components().any(|c| c.as_os_str() == "..")
    };
    // Relative paths resolve against the working directory, which is not under those roots;
    // a non-existent path may still have a parent that is.
    !bad(p)
        && !bad(&resolved)
        && p.parent().is_none_or(|parent| {
            let r = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
            !bad(&r)
        })
}

fn paths(c: &VmConfig) -> Vec<&Path> {
    let mut v: Vec<&Path> = vec![&c.boot_source.kernel_image_path];
    v.extend(c.boot_source.initrd_path.as_deref());
    v.extend(c.serial.path.as_deref());
    v.extend(c.drives.iter().filter_map(|d| d.path_on_host.as_deref()));
    v.extend(c.vsock.iter().map(|s| s.uds_path.as_path()));
    for f in &c.fs {
        v.extend(f.shared_dir.as_deref());
        v.extend(f.socket.as_deref());
    }
    v
}

fuzz_target!(|data: &[u8]| {
    fixtures();
    let text = String::from_utf8_lossy(data);
    let Ok(config) = VmConfig::from_json(&text) else {
        return;
    };
    let _ = config.name();
    if !paths(&config).into_iter().all(harmless) {
        return;
    }
    if config.validate().is_err() {
        return;
    }
    let _ = config.validate_for_boot();
    let json = serde_json::to_string(&config).expect("a valid configuration serializes");
    let back = VmConfig::from_json(&json).expect("a serialized configuration parses");
    assert_eq!(back, config, "round trip changed the configuration: {json}");
    assert!(
        back.validate().is_ok(),
        "the round-tripped configuration no longer validates: {json}"
    );
});
