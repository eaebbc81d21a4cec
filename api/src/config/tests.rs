//! Tests across sections: whole documents, and validate agreeing with create.

mod whole_document {
    use super::super::*;

    fn kernel_file() -> PathBuf {
        // Any regular file passes the existence check.
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")
    }

    fn valid() -> VmConfig {
        VmConfig::new(kernel_file(), 1, 128)
    }

    fn field_of(cfg: &VmConfig) -> String {
        cfg.validate()
            .expect_err("config should be rejected")
            .field()
            .expect("error names a field")
            .to_string()
    }

    #[test]
    fn seccomp_switch_parses_defaults_to_absent_and_round_trips() {
        let base = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}},
               "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}}"#,
            kernel_file().display()
        );
        let with = |kestrel: &str| VmConfig::from_json(&format!("{base}, {kestrel}}}"));
        let absent = VmConfig::from_json(&format!("{base}}}")).unwrap();
        assert_eq!(absent.kestrel.seccomp, None);
        assert!(
            absent.kestrel.xstate_assist,
            "the assist is on unless turned off"
        );
        assert_eq!(
            absent.kestrel.seccomp_or(SeccompMode::Errno),
            SeccompMode::Errno
        );
        assert_eq!(
            absent.kestrel.seccomp_or(SeccompMode::Kill),
            SeccompMode::Kill
        );
        assert!(!serde_json::to_string(&absent).unwrap().contains("seccomp"));
        for (text, mode) in [
            ("errno", SeccompMode::Errno),
            ("kill", SeccompMode::Kill),
            ("off", SeccompMode::Off),
        ] {
            let c = with(&format!(r#""kestrel": {{"seccomp": "{text}"}}"#)).unwrap();
            assert_eq!(c.kestrel.seccomp, Some(mode));
            // The configured mode wins over the program's default.
            assert_eq!(c.kestrel.seccomp_or(SeccompMode::Kill), mode);
            c.validate().unwrap();
            let back = VmConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
            assert_eq!(back.kestrel.seccomp, Some(mode));
        }
        // The other kestrel fields are untouched by it.
        let c =
            with(r#""kestrel": {"name": "a", "seccomp": "off", "xstate_assist": false}"#).unwrap();
        assert_eq!(c.kestrel.name.as_deref(), Some("a"));
        assert!(!c.kestrel.xstate_assist);
        for bad in [
            r#""seccomp": "trap""#,
            r#""seccomp": true"#,
            r#""seccomp": 1"#,
        ] {
            assert!(with(&format!(r#""kestrel": {{{bad}}}"#)).is_err(), "{bad}");
        }
    }

    #[test]
    fn firecracker_shape_parses() {
        let json = format!(
            r#"{{
            "boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}},
            "machine-config": {{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}}
        }}"#,
            kernel_file().display()
        );
        let cfg = VmConfig::from_json(&json).unwrap();
        assert_eq!(cfg.machine_config.vcpu_count, 2);
        assert_eq!(cfg.machine_config.mem_size_mib, 256);
        assert_eq!(cfg.boot_source.boot_args.as_deref(), Some("console=ttyS0"));
        assert_eq!(cfg.serial.output, SerialOutput::Stdout);
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_field_is_named() {
        let json = r#"{
            "boot-source": {"kernel_image_path": "/k", "bogus_field": 1},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}
        }"#;
        let err = VmConfig::from_json(json).unwrap_err().to_string();
        assert!(err.contains("unknown field `bogus_field`"), "{err}");
        let json = r#"{
            "boot-source": {"kernel_image_path": "/k"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
            "drivez": []
        }"#;
        let err = VmConfig::from_json(json).unwrap_err().to_string();
        assert!(err.contains("unknown field `drivez`"), "{err}");
    }

    #[test]
    fn zero_vcpus_rejected() {
        let mut cfg = valid();
        cfg.machine_config.vcpu_count = 0;
        assert_eq!(field_of(&cfg), "machine-config.vcpu_count");
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("at least 1"), "{msg}");
    }

    #[test]
    fn memory_below_minimum_rejected() {
        let mut cfg = valid();
        cfg.machine_config.mem_size_mib = 8;
        assert_eq!(field_of(&cfg), "machine-config.mem_size_mib");
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(
            msg.contains("8 MiB is below the minimum of 32 MiB"),
            "{msg}"
        );
    }

    #[test]
    fn missing_kernel_rejected() {
        let mut cfg = valid();
        cfg.boot_source.kernel_image_path = PathBuf::from("/nonexistent/vmlinux");
        assert_eq!(field_of(&cfg), "boot-source.kernel_image_path");
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("/nonexistent/vmlinux"), "{msg}");
        // Missing in the JSON altogether: serde names it.
        let json =
            r#"{"boot-source": {}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}"#;
        let err = VmConfig::from_json(json).unwrap_err().to_string();
        assert!(err.contains("missing field `kernel_image_path`"), "{err}");
        cfg.boot_source.kernel_image_path = PathBuf::new();
        assert_eq!(field_of(&cfg), "boot-source.kernel_image_path");
    }

    #[test]
    fn missing_initrd_rejected() {
        let mut cfg = valid();
        cfg.boot_source.initrd_path = Some("/nonexistent/initrd".into());
        assert_eq!(field_of(&cfg), "boot-source.initrd_path");
    }

    #[test]
    fn vcpu_limits() {
        let mut cfg = valid();
        cfg.machine_config.vcpu_count = 4;
        cfg.machine_config.max_vcpus = Some(2);
        assert_eq!(field_of(&cfg), "machine-config.max_vcpus");
        cfg.machine_config.max_vcpus = Some(0);
        cfg.validate().unwrap();
        cfg.machine_config.max_vcpus = Some(255);
        assert_eq!(field_of(&cfg), "machine-config.max_vcpus");
        cfg.machine_config.max_vcpus = None;
        cfg.machine_config.vcpu_count = 300;
        assert_eq!(field_of(&cfg), "machine-config.vcpu_count");
        cfg.machine_config.vcpu_count = 1;
        cfg.machine_config.smt = true;
        assert_eq!(field_of(&cfg), "machine-config.smt");
    }

    #[test]
    fn memory_limits() {
        let mut cfg = valid();
        cfg.machine_config.max_mem_size_mib = Some(64);
        assert_eq!(field_of(&cfg), "machine-config.max_mem_size_mib");
        cfg.machine_config.max_mem_size_mib = Some(1024);
        cfg.validate().unwrap();
        cfg.machine_config.mem_size_mib = MAX_MEM_SIZE_MIB + 1;
        assert_eq!(field_of(&cfg), "machine-config.mem_size_mib");
    }

    #[test]
    fn boot_args_checked() {
        let mut cfg = valid();
        cfg.boot_source.boot_args = Some("x".repeat(MAX_CMDLINE_LEN + 1));
        assert_eq!(field_of(&cfg), "boot-source.boot_args");
        cfg.boot_source.boot_args = Some("console=ttyS0\0".into());
        assert_eq!(field_of(&cfg), "boot-source.boot_args");
    }

    #[test]
    fn serial_checked() {
        let mut cfg = valid();
        cfg.serial.output = SerialOutput::File;
        assert_eq!(field_of(&cfg), "serial.path");
        cfg.serial.path = Some("/nonexistent-dir/console.log".into());
        assert_eq!(field_of(&cfg), "serial.path");
        cfg.serial.path = Some("/tmp/console.log".into());
        cfg.validate().unwrap();
        cfg.serial.output = SerialOutput::None;
        assert_eq!(field_of(&cfg), "serial.path");
        let json = r#"{"boot-source": {"kernel_image_path": "/k"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
            "serial": {"output": "printer"}}"#;
        let err = VmConfig::from_json(json).unwrap_err().to_string();
        assert!(err.contains("unknown variant `printer`"), "{err}");
    }

    #[test]
    fn name_checked() {
        let mut cfg = valid();
        cfg.kestrel.name = Some("bad name".into());
        assert_eq!(field_of(&cfg), "kestrel.name");
        cfg.kestrel.name = Some("pod-1".into());
        cfg.validate().unwrap();
        assert_eq!(cfg.name(), "pod-1");
    }

    #[test]
    fn unsupported_machine_config_fields_are_named_with_their_value() {
        let mut cfg = valid();
        cfg.machine_config.huge_pages = HugePages::Hugetlbfs2M;
        let e = cfg.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "Firecracker's `machine-config.huge_pages` = `2M` is not supported by Kestrel"
        );
        assert_eq!(e.field(), Some("machine-config.huge_pages"));
        cfg.machine_config.huge_pages = HugePages::Transparent;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("= `Transparent`"));
        cfg.machine_config.huge_pages = HugePages::None;
        cfg.machine_config.track_dirty_pages = true;
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "Firecracker's `machine-config.track_dirty_pages` = `true` is not supported by Kestrel"
        );
        cfg.machine_config.track_dirty_pages = false;
        cfg.machine_config.smt = true;
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "Firecracker's `machine-config.smt` = `true` is not supported by Kestrel"
        );
        cfg.machine_config.smt = false;
        cfg.machine_config.cpu_template = Some(CpuTemplate::T2S);
        assert!(cfg.validate().unwrap_err().to_string().contains("= `T2S`"));
        cfg.machine_config.cpu_template = Some(CpuTemplate::None);
        cfg.validate().unwrap();
        cfg.machine_config.gdb_socket_path = Some("/tmp/gdb.socket".into());
        assert_eq!(field_of(&cfg), "machine-config.gdb_socket_path");
    }

    #[test]
    fn firecracker_machine_config_defaults_and_spellings() {
        let doc = |mc: &str| {
            VmConfig::from_json(&format!(
                r#"{{"boot-source": {{"kernel_image_path": "{}"}}{mc}}}"#,
                kernel_file().display()
            ))
        };
        for absent in ["", r#", "machine-config": null"#] {
            let c = doc(absent).unwrap();
            assert_eq!(c.machine_config, MachineConfig::default());
            assert_eq!(
                (c.machine_config.vcpu_count, c.machine_config.mem_size_mib),
                (1, 128)
            );
            c.validate().unwrap();
        }
        let c = doc(
            r#", "machine-config": {"vcpu_count": 2, "mem_size_mib": 512, "smt": false,
                "cpu_template": "None", "track_dirty_pages": false, "huge_pages": "None"}"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.machine_config.cpu_template, Some(CpuTemplate::None));
        let c = doc(
            r#", "machine-config": {"vcpu_count": 2, "mem_size_mib": 512, "huge_pages": "2M"}"#,
        )
        .unwrap();
        assert_eq!(c.machine_config.huge_pages, HugePages::Hugetlbfs2M);
        for bad in [
            r#", "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "1G"}"#,
            r#", "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "M5"}"#,
            r#", "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": null}"#,
        ] {
            assert!(doc(bad).is_err(), "{bad}");
        }
        // Round trip keeps the new fields.
        let back = VmConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unsupported_sections_refused_and_empty_ones_accepted() {
        let doc = |extra: &str| {
            VmConfig::from_json(&format!(
                r#"{{"boot-source": {{"kernel_image_path": "{}"}}, {extra}}}"#,
                kernel_file().display()
            ))
            .unwrap()
        };
        for (extra, field) in [
            (
                r#""balloon": {"amount_mib": 0, "deflate_on_oom": false}"#,
                "balloon",
            ),
            (r#""entropy": {}"#, "entropy"),
            (
                r#""memory-hotplug": {"total_size_mib": 1024}"#,
                "memory-hotplug",
            ),
            (
                r#""mmds-config": {"network_interfaces": []}"#,
                "mmds-config",
            ),
            (r#""cpu-config": "/etc/fc/c3.json""#, "cpu-config"),
            (
                r#""cpu-config": {"kvm_capabilities": ["!56"]}"#,
                "cpu-config",
            ),
            (
                r#""pmem": [{"id": "p", "path_on_host": "f", "read_only": true}]"#,
                "pmem[0]",
            ),
        ] {
            let e = doc(extra).validate().unwrap_err();
            assert!(
                matches!(e, ConfigError::NotSupported { .. }),
                "{extra}: {e}"
            );
            assert_eq!(e.field(), Some(field), "{extra}");
        }
        // A template that changes nothing is "not used".
        doc(r#""cpu-config": {}"#).validate().unwrap();
        doc(
            r#""cpu-config": {"kvm_capabilities": [], "cpuid_modifiers": [], "msr_modifiers": []}"#,
        )
        .validate()
        .unwrap();
        doc(r#""pmem": []"#).validate().unwrap();
        // Their shape is still Firecracker's: unknown fields and wrong types are errors.
        for bad in [
            r#""balloon": {"amount_mib": 1, "deflate_on_oom": false, "size": 2}"#,
            r#""mmds-config": {"network_interfaces": ["eth0"], "ipv4_address": "not-an-ip"}"#,
            r#""mmds-config": {"network_interfaces": ["eth0"], "version": "V3"}"#,
            r#""memory-hotplug": {"block_size_mib": 2}"#,
            r#""cpu-config": {"reg_modifiers": []}"#,
            r#""logger": {"log_level": "Info"}"#,
        ] {
            let json = format!(r#"{{"boot-source": {{"kernel_image_path": "/k"}}, {bad}}}"#);
            let e = VmConfig::from_json(&json).unwrap_err();
            assert!(matches!(e, ConfigError::Parse(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn not_supported_values_are_shown_short() {
        let long = "x".repeat(200);
        let e = ConfigError::not_supported("drives[0].socket", &long);
        let msg = e.to_string();
        assert!(msg.contains(&format!("`{}...`", "x".repeat(80))), "{msg}");
        let e = ConfigError::not_supported("balloon", &serde_json::json!({"amount_mib": 1}));
        assert_eq!(
            e.to_string(),
            "Firecracker's `balloon` = `{\"amount_mib\":1}` is not supported by Kestrel"
        );
        // Cut on a character boundary.
        let e = ConfigError::not_supported("x", &"é".repeat(100));
        assert!(e.to_string().contains(&format!("{}...", "é".repeat(80))));
    }

    #[test]
    fn logger_and_metrics_kept_and_checked() {
        let mut cfg = valid();
        cfg.logger = Some(LoggerConfig {
            log_path: Some("/nonexistent-dir/fc.log".into()),
            ..LoggerConfig::default()
        });
        assert_eq!(field_of(&cfg), "logger.log_path");
        cfg.logger = Some(LoggerConfig {
            level: Some(LogLevel::Debug),
            show_level: Some(true),
            ..LoggerConfig::default()
        });
        cfg.metrics = Some(MetricsConfig {
            metrics_path: "/nonexistent-dir/m".into(),
            emit_id: false,
            properties: None,
        });
        assert_eq!(field_of(&cfg), "metrics.metrics_path");
        cfg.metrics.as_mut().unwrap().metrics_path = "metrics.fifo".into();
        cfg.validate().unwrap();
        let back = VmConfig::from_json(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn new_keeps_the_serial_console() {
        let cfg = valid();
        assert_eq!(
            cfg.boot_source.boot_args.as_deref(),
            Some(CONSOLE_BOOT_ARGS)
        );
        assert_eq!(cfg.boot_source.boot_args_or_default(), CONSOLE_BOOT_ARGS);
        // Nothing Firecracker-only is set, so nothing is serialized for it.
        let json = serde_json::to_string(&cfg).unwrap();
        for absent in [
            "balloon",
            "logger",
            "metrics",
            "pmem",
            "cpu-config",
            "mmds-config",
        ] {
            assert!(!json.contains(absent), "{absent}: {json}");
        }
    }

    #[test]
    fn round_trip() {
        let mut cfg = valid();
        cfg.machine_config.max_vcpus = Some(4);
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains("\"machine-config\""));
        assert_eq!(VmConfig::from_json(&json).unwrap(), cfg);
    }
}

mod create_agreement_tests {
    //! Each case here used to pass `validate` and fail only at `Vm::create`.
    use super::super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kestrel-api-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A file holding `bytes` (a fresh one per call: tests run in parallel).
    fn file(tag: &str, bytes: &[u8]) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = dir("files").join(format!("{tag}-{n}"));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn elf_kernel() -> PathBuf {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[18..20].copy_from_slice(&0x3eu16.to_le_bytes());
        file("vmlinux", &h)
    }

    fn base() -> VmConfig {
        VmConfig::new(elf_kernel(), 1, 128)
    }

    fn field(cfg: &VmConfig) -> String {
        let e = cfg.validate_for_boot().expect_err("should be refused");
        e.field().expect("names a field").to_string()
    }

    #[test]
    fn base_config_is_valid() {
        base().validate_for_boot().unwrap();
        let mut c = base();
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        c.boot_source.kernel_image_path = file("bzImage", &bz);
        c.validate_for_boot().unwrap();
    }

    #[test]
    fn control_characters_in_boot_args_refused() {
        for bad in ["console=ttyS0\n", "a\tb", "x\x1b[0m", "nul\0"] {
            let mut c = base();
            c.boot_source.boot_args = Some(bad.into());
            assert_eq!(field(&c), "boot-source.boot_args", "{bad:?}");
        }
        let mut c = base();
        c.boot_source.boot_args = Some("console=ttyS0 reboot=k panic=1 ~!".into());
        c.validate_for_boot().unwrap();
    }

    #[test]
    fn boot_args_leave_room_for_what_kestrel_appends() {
        let mut c = base();
        let room = MAX_CMDLINE_LEN - CMDLINE_RESERVED_LEN;
        c.boot_source.boot_args = Some("x".repeat(room));
        c.validate_for_boot().unwrap();
        c.boot_source.boot_args = Some("x".repeat(room + 1));
        assert_eq!(field(&c), "boot-source.boot_args");
        // Each device takes room too.
        c.boot_source.boot_args = Some("x".repeat(room));
        c.drives.push(DriveConfig {
            drive_id: "d0".into(),
            ..DriveConfig::default()
        });
        let e = c.validate_for_boot().unwrap_err();
        assert_eq!(e.field(), Some("boot-source.boot_args"));
        assert!(e.to_string().contains("Kestrel appends"), "{e}");
    }

    #[test]
    fn directories_where_files_are_expected_refused() {
        let d = dir("a-directory");
        let mut c = base();
        c.boot_source.kernel_image_path = d.clone();
        assert_eq!(field(&c), "boot-source.kernel_image_path");
        let mut c = base();
        c.boot_source.initrd_path = Some(d.clone());
        assert_eq!(field(&c), "boot-source.initrd_path");
        let mut c = base();
        c.drives.push(DriveConfig {
            drive_id: "d0".into(),
            path_on_host: Some(d.clone()),
            ..DriveConfig::default()
        });
        let e = c.validate_for_boot().unwrap_err();
        assert_eq!(e.field(), Some("drives[0].path_on_host"));
        assert!(e.to_string().contains("a directory"), "{e}");
        let mut c = base();
        c.serial.output = SerialOutput::File;
        c.serial.path = Some(d);
        let e = c.validate_for_boot().unwrap_err();
        assert_eq!(e.field(), Some("serial.path"));
        assert!(e.to_string().contains("a directory"), "{e}");
    }

    #[test]
    fn serial_path_fifo_refused_char_device_and_new_file_accepted() {
        let mut c = base();
        c.serial.output = SerialOutput::File;
        c.serial.path = Some("/dev/null".into());
        c.validate_for_boot().unwrap();
        c.serial.path = Some(dir("serial").join("new-console.log"));
        c.validate_for_boot().unwrap();
        let fifo = dir("serial").join("fifo");
        let _ = std::fs::remove_file(&fifo);
        let st = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(st.success());
        c.serial.path = Some(fifo);
        let e = c.validate_for_boot().unwrap_err();
        assert_eq!(e.field(), Some("serial.path"));
        assert!(e.to_string().contains("a FIFO"), "{e}");
    }

    #[test]
    fn kernel_that_is_not_elf_or_bzimage_refused() {
        let mut c = base();
        c.boot_source.kernel_image_path = file("not-a-kernel", b"#!/bin/sh\necho hi\n");
        let e = c.validate_for_boot().unwrap_err();
        assert_eq!(e.field(), Some("boot-source.kernel_image_path"));
        assert!(e.to_string().contains("neither"), "{e}");
        // A 32-bit ELF is not loadable either.
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 1;
        c.boot_source.kernel_image_path = file("elf32", &h);
        assert_eq!(field(&c), "boot-source.kernel_image_path");
        // `validate` alone does not read the kernel.
        c.validate().unwrap();
    }

    #[test]
    fn initrd_larger_than_guest_ram_refused() {
        let mut c = base();
        c.machine_config.mem_size_mib = MIN_MEM_SIZE_MIB;
        let big = dir("initrd").join("big.cpio");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MIN_MEM_SIZE_MIB << 20).unwrap(); // sparse
        c.boot_source.initrd_path = Some(big);
        let e = c.validate_for_boot().unwrap_err();
        assert_eq!(e.field(), Some("boot-source.initrd_path"));
        c.machine_config.mem_size_mib = 2 * MIN_MEM_SIZE_MIB;
        c.validate_for_boot().unwrap();
    }

    #[test]
    fn read_only_image_needs_is_read_only() {
        if unsafe_is_root() {
            return; // root opens anything read-write
        }
        let img = file("ro.img", &[0u8; 512]);
        let mut perms = std::fs::metadata(&img).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
        std::fs::set_permissions(&img, perms).unwrap();
        let mut c = base();
        c.drives.push(DriveConfig {
            drive_id: "d0".into(),
            path_on_host: Some(img),
            ..DriveConfig::default()
        });
        assert_eq!(field(&c), "drives[0].path_on_host");
        c.drives[0].is_read_only = true;
        c.validate_for_boot().unwrap();
    }

    fn unsafe_is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
            })
            .unwrap_or(false)
    }

    #[test]
    fn rate_limiter_refill_overflow_names_the_field() {
        let mut c = base();
        c.drives.push(DriveConfig {
            drive_id: "d0".into(),
            rate_limiter: Some(crate::RateLimiterConfig {
                bandwidth: Some(crate::TokenBucketConfig {
                    size: 1,
                    one_time_burst: None,
                    refill_time: 1 << 58,
                }),
                ops: None,
            }),
            ..DriveConfig::default()
        });
        assert_eq!(field(&c), "drives[0].rate_limiter.bandwidth.refill_time");
    }

    #[test]
    fn config_file_reads_are_bounded_and_regular_files_only() {
        for special in ["/dev/zero", "/dev/null"] {
            assert!(matches!(
                VmConfig::from_file(Path::new(special)),
                Err(ConfigError::NotARegularFile { .. })
            ));
        }
        assert!(matches!(
            VmConfig::from_file(&dir("cfg-dir")),
            Err(ConfigError::NotARegularFile { .. })
        ));
        let fifo = dir("cfg").join("fifo.json");
        let _ = std::fs::remove_file(&fifo);
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        // Returns at once (no writer ever appears).
        assert!(matches!(
            VmConfig::from_file(&fifo),
            Err(ConfigError::NotARegularFile { .. })
        ));
        let big = dir("cfg").join("big.json");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_CONFIG_FILE_LEN + 1).unwrap();
        assert!(matches!(
            VmConfig::from_file(&big),
            Err(ConfigError::FileTooLarge { .. })
        ));
        let ok = file(
            "ok.json",
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{}"}},
                    "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}}}}"#,
                elf_kernel().display()
            )
            .as_bytes(),
        );
        VmConfig::from_file(&ok)
            .unwrap()
            .validate_for_boot()
            .unwrap();
    }
}

mod device_ids {
    use super::super::*;

    /// Ids are shared across kinds, as `Vm::create` requires: validate refuses a clash.
    #[test]
    fn device_ids_are_unique_across_kinds() {
        let image = std::env::temp_dir().join(format!("kestrel-api-ids-{}", std::process::id()));
        std::fs::write(&image, [0u8; 512]).unwrap();
        let kernel = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let mut c = VmConfig::new(kernel, 1, 128);
        c.drives.push(DriveConfig {
            drive_id: "eth0".into(),
            path_on_host: Some(image.clone()),
            ..DriveConfig::default()
        });
        c.network_interfaces.push(NetConfig {
            iface_id: "eth0".into(),
            ..NetConfig::default()
        });
        let e = c.validate().unwrap_err().to_string();
        assert_eq!(
            e,
            "network-interfaces[0].iface_id: \"eth0\" is already the id of the device of drives[0].drive_id"
        );
        c.network_interfaces[0].iface_id = "net0".into();
        c.validate().unwrap();
        // A drive may not take the id of the vsock device or of a share.
        c.drives[0].drive_id = "fs0".into();
        c.fs.push(FsConfig::shared_dir("tag", std::env::temp_dir()));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("fs[0]: \"fs0\" is already"), "{e}");
        assert_eq!(
            c.device_ids()
                .iter()
                .map(|(_, id)| id.as_str())
                .collect::<Vec<_>>(),
            ["fs0", "net0", "fs0"]
        );
        std::fs::remove_file(&image).unwrap();
    }
}
