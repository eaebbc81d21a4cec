//! Firecracker's `network-interfaces`: virtio-net devices over TAP devices.

use serde::{Deserialize, Serialize};

use super::*;
use crate::error::ConfigError;

/// Most virtio-mmio devices a VM can have: each takes one of the IOAPIC pins 5 to 23.
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// Longest `iface_id`.
pub const MAX_IFACE_ID_LEN: usize = 64;
/// Longest `host_dev_name`: a Linux interface name holds `IFNAMSIZ - 1` = 15 bytes.
pub const MAX_HOST_DEV_NAME_LEN: usize = 15;

/// One entry of Firecracker's `network-interfaces`: a virtio-net device whose host side is a
/// TAP device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Unique name: 1 to 64 ASCII letters, digits, `-` and `_`.
    pub iface_id: String,
    /// The TAP device on the host. Absent or `""`: a hot-attach slot whose link stays down
    /// until a TAP is attached at run time.
    #[serde(default)]
    pub host_dev_name: Option<String>,
    /// The guest's MAC address, `aa:bb:cc:dd:ee:ff` (unicast, not all zeros). Default: a
    /// locally administered address derived from `iface_id` ([`derived_mac`]), stable across
    /// boots.
    #[serde(default)]
    pub guest_mac: Option<String>,
    /// Limits on traffic to the guest.
    #[serde(default)]
    pub rx_rate_limiter: Option<crate::RateLimiterConfig>,
    /// Limits on traffic from the guest.
    #[serde(default)]
    pub tx_rate_limiter: Option<crate::RateLimiterConfig>,
    /// Kestrel: create the TAP device when it does not exist (it goes away with the VM).
    /// Without it the TAP must already exist.
    #[serde(default)]
    pub create_tap: bool,
    /// Firecracker's `mtu` (advertised with `VIRTIO_NET_F_MTU`). Not supported: absent or
    /// `null` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

impl NetConfig {
    /// The TAP device's name, or `None` for a hot-attach slot.
    pub fn tap_name(&self) -> Option<&str> {
        self.host_dev_name.as_deref().filter(|n| !n.is_empty())
    }

    /// Whether the interface starts without a TAP (link down).
    pub fn is_hot_attach_slot(&self) -> bool {
        self.tap_name().is_none()
    }

    /// The MAC address the guest gets: `guest_mac` parsed, or the one derived from `iface_id`.
    /// `None` when `guest_mac` is not a valid `aa:bb:cc:dd:ee:ff` address.
    pub fn mac(&self) -> Option<[u8; 6]> {
        match &self.guest_mac {
            Some(s) => parse_mac(s),
            None => Some(derived_mac(&self.iface_id)),
        }
    }
}

/// Parse `aa:bb:cc:dd:ee:ff` (six pairs of hex digits, either case, separated by `:`).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Format a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// The default MAC of interface `iface_id`: a 64-bit FNV-1a hash of the id, with the first
/// octet marked locally administered (bit 1 set) and unicast (bit 0 clear).
pub fn derived_mac(iface_id: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in iface_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

/// Why `name` cannot be a Linux interface name, if it cannot (the kernel's rules: 1 to 15
/// bytes, not `.` or `..`, no `/`, `:` or whitespace; Kestrel also refuses `%`, which the
/// kernel would treat as a name template, and NUL).
pub fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_HOST_DEV_NAME_LEN {
        return Err(format!(
            "must be 1 to {MAX_HOST_DEV_NAME_LEN} bytes (a Linux interface name)"
        ));
    }
    if name == "." || name == ".." {
        return Err("must not be \".\" or \"..\"".into());
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '%' || c == '\0' || c.is_whitespace())
    {
        return Err("must not contain '/', ':', '%', NUL or whitespace".into());
    }
    Ok(())
}

impl VmConfig {
    /// Check `network-interfaces` (part of [`VmConfig::validate`]) and the total number of
    /// virtio devices; errors name `network-interfaces[<index>].<field>`.
    pub fn validate_network_interfaces(&self) -> Result<(), ConfigError> {
        let nets = &self.network_interfaces;
        let vsock = usize::from(self.vsock.is_some());
        let total = self.drives.len() + nets.len() + vsock + self.fs.len();
        if total > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::invalid(
                "network-interfaces",
                format!(
                    "{} drives, {} network interfaces, {} fs shares and {vsock} vsock make \
                     {total} virtio devices; at most {MAX_VIRTIO_DEVICES} fit (one IOAPIC pin each)",
                    self.drives.len(),
                    nets.len(),
                    self.fs.len()
                ),
            ));
        }
        let mut macs: Vec<[u8; 6]> = Vec::with_capacity(nets.len());
        for (i, n) in nets.iter().enumerate() {
            let field = |name: &str| format!("network-interfaces[{i}].{name}");
            if let Some(mtu) = n.mtu {
                return Err(ConfigError::not_supported(field("mtu"), &mtu));
            }
            let id = &n.iface_id;
            check_id(&field("iface_id"), id, MAX_IFACE_ID_LEN)?;
            let earlier = nets[..i].iter().map(|o| o.iface_id.as_str());
            check_unique(&field("iface_id"), id, "network-interfaces", earlier)?;
            check_tap(nets, i)?;
            let mac = n.checked_mac(i)?;
            if let Some(j) = macs.iter().position(|m| *m == mac) {
                return Err(ConfigError::invalid(
                    field("guest_mac"),
                    format!(
                        "{} is also the MAC of network-interfaces[{j}]",
                        format_mac(&mac)
                    ),
                ));
            }
            macs.push(mac);
            if let Some(rl) = &n.rx_rate_limiter {
                rl.validate(&field("rx_rate_limiter"))?;
            }
            if let Some(rl) = &n.tx_rate_limiter {
                rl.validate(&field("tx_rate_limiter"))?;
            }
        }
        Ok(())
    }
}

/// `network-interfaces[i]`'s TAP: a valid interface name not used by an earlier interface, or
/// none (then `create_tap` must be off).
fn check_tap(nets: &[NetConfig], i: usize) -> Result<(), ConfigError> {
    let field = |name: &str| format!("network-interfaces[{i}].{name}");
    let n = &nets[i];
    match n.tap_name() {
        Some(name) => {
            check_interface_name(name)
                .map_err(|why| ConfigError::invalid(field("host_dev_name"), why))?;
            if let Some(j) = nets[..i].iter().position(|o| o.tap_name() == Some(name)) {
                return Err(ConfigError::invalid(
                    field("host_dev_name"),
                    format!("{name} is already used by network-interfaces[{j}]"),
                ));
            }
            Ok(())
        }
        None if n.create_tap => Err(ConfigError::invalid(
            field("create_tap"),
            "is only used with host_dev_name",
        )),
        None => Ok(()),
    }
}

impl NetConfig {
    /// The guest MAC: `guest_mac` checked (unicast, not all zeros), or the one derived from
    /// `iface_id`. `index` names the interface in errors.
    fn checked_mac(&self, index: usize) -> Result<[u8; 6], ConfigError> {
        let field = format!("network-interfaces[{index}].guest_mac");
        let Some(s) = &self.guest_mac else {
            return Ok(derived_mac(&self.iface_id));
        };
        let mac = parse_mac(s).ok_or_else(|| {
            ConfigError::invalid(
                field.as_str(),
                format!("{s:?} is not a MAC address like aa:bb:cc:dd:ee:ff"),
            )
        })?;
        if mac[0] & 1 != 0 {
            return Err(ConfigError::invalid(
                field,
                format!("{s} is a multicast address (lowest bit of the first octet)"),
            ));
        }
        if mac == [0; 6] {
            return Err(ConfigError::invalid(field, "must not be all zeros"));
        }
        Ok(mac)
    }
}

#[cfg(test)]
mod net_tests {
    use super::*;
    use crate::{RateLimiterConfig, TokenBucketConfig};

    fn some_file() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")
    }

    fn net(id: &str) -> NetConfig {
        NetConfig {
            iface_id: id.into(),
            host_dev_name: Some(format!("tap-{id}")),
            ..NetConfig::default()
        }
    }

    fn with(nets: Vec<NetConfig>) -> VmConfig {
        let mut cfg = VmConfig::new(some_file(), 1, 128);
        cfg.network_interfaces = nets;
        cfg
    }

    /// The error's field and message.
    fn err(cfg: &VmConfig) -> (String, String) {
        let e = cfg
            .validate()
            .expect_err("network interfaces should be rejected");
        (e.field().expect("names a field").to_string(), e.to_string())
    }

    #[test]
    fn firecracker_network_interfaces_parse() {
        let json = format!(
            r#"{{
            "boot-source": {{"kernel_image_path": "{k}"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
            "network-interfaces": [
                {{"iface_id": "eth0", "guest_mac": "AA:FC:00:00:00:01", "host_dev_name": "tap0",
                  "rx_rate_limiter": {{"bandwidth": {{"size": 1048576, "refill_time": 1000}}}},
                  "tx_rate_limiter": {{"ops": {{"size": 100, "refill_time": 1000}}}}}},
                {{"iface_id": "eth1", "host_dev_name": "kt-new", "create_tap": true}},
                {{"iface_id": "slot0"}},
                {{"iface_id": "slot1", "host_dev_name": ""}}
            ]
        }}"#,
            k = some_file().display()
        );
        let cfg = VmConfig::from_json(&json).unwrap();
        cfg.validate().unwrap();
        let n = &cfg.network_interfaces;
        assert_eq!(n.len(), 4);
        assert_eq!(n[0].tap_name(), Some("tap0"));
        assert_eq!(n[0].mac(), Some([0xaa, 0xfc, 0, 0, 0, 1]));
        assert_eq!(
            n[0].rx_rate_limiter.unwrap().bandwidth.unwrap().size,
            1 << 20
        );
        assert_eq!(n[0].tx_rate_limiter.unwrap().ops.unwrap().size, 100);
        assert!(!n[0].create_tap && n[1].create_tap);
        assert!(!n[1].is_hot_attach_slot());
        assert!(n[2].is_hot_attach_slot() && n[3].is_hot_attach_slot());
        assert_eq!(n[2].mac(), Some(derived_mac("slot0")));
        // Round trip; none at all is the default.
        let back = VmConfig::from_json(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        assert!(VmConfig::new(some_file(), 1, 128)
            .network_interfaces
            .is_empty());
        let json = serde_json::to_string(&with(vec![net("a")])).unwrap();
        assert!(json.contains("\"network-interfaces\""), "{json}");
    }

    #[test]
    fn unknown_and_missing_fields_rejected() {
        let e = serde_json::from_str::<NetConfig>(r#"{"iface_id": "a", "allow_mmds": true}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `allow_mmds`"), "{e}");
        let e = serde_json::from_str::<NetConfig>(r#"{"host_dev_name": "tap0"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `iface_id`"), "{e}");
    }

    #[test]
    fn firecracker_nulls_and_mtu() {
        let n: NetConfig = serde_json::from_str(
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:c0:a8:00:02",
                "rx_rate_limiter": null, "tx_rate_limiter": null, "mtu": null}"#,
        )
        .unwrap();
        with(vec![n.clone()]).validate().unwrap();
        assert_eq!(n.mtu, None);
        let mut n = net("a");
        n.mtu = Some(9000);
        let (f, m) = err(&with(vec![n]));
        assert_eq!(f, "network-interfaces[0].mtu");
        assert_eq!(
            m,
            "Firecracker's `network-interfaces[0].mtu` = `9000` is not supported by Kestrel"
        );
    }

    #[test]
    fn iface_ids_checked() {
        let (f, m) = err(&with(vec![net("a"), net("b"), {
            let mut n = net("a");
            n.host_dev_name = Some("other".into());
            n
        }]));
        assert_eq!(f, "network-interfaces[2].iface_id");
        assert_eq!(
            m,
            "network-interfaces[2].iface_id: \"a\" is already used by network-interfaces[0]"
        );
        assert_eq!(
            err(&with(vec![net("")])).0,
            "network-interfaces[0].iface_id"
        );
        assert_eq!(
            err(&with(vec![net("ok"), net("eth 0")])).0,
            "network-interfaces[1].iface_id"
        );
        assert_eq!(
            err(&with(vec![net("éth0")])).0,
            "network-interfaces[0].iface_id"
        );
        let mut long = net("x");
        long.iface_id = "x".repeat(MAX_IFACE_ID_LEN + 1);
        assert_eq!(
            err(&with(vec![long.clone()])).0,
            "network-interfaces[0].iface_id"
        );
        long.iface_id.pop();
        with(vec![long, net("A-b_9")]).validate().unwrap();
    }

    #[test]
    fn host_dev_names_checked() {
        for bad in [
            "x".repeat(16),
            "tap/0".into(),
            "tap 0".into(),
            "tap\t0".into(),
            "tap:0".into(),
            "tap%d".into(),
            ".".into(),
            "..".into(),
            "a\0b".into(),
        ] {
            let mut n = net("a");
            n.host_dev_name = Some(bad.clone());
            let (f, _) = err(&with(vec![n]));
            assert_eq!(f, "network-interfaces[0].host_dev_name", "{bad:?}");
        }
        let mut n = net("a");
        n.host_dev_name = Some("x".repeat(15));
        with(vec![n]).validate().unwrap();
        // Unique, but any number of slots.
        let mut b = net("b");
        b.host_dev_name = Some("tap-a".into());
        let (f, m) = err(&with(vec![net("a"), b]));
        assert_eq!(f, "network-interfaces[1].host_dev_name");
        assert!(
            m.contains("tap-a is already used by network-interfaces[0]"),
            "{m}"
        );
        let slot = |id: &str, name: Option<&str>| NetConfig {
            iface_id: id.into(),
            host_dev_name: name.map(str::to_string),
            ..NetConfig::default()
        };
        with(vec![
            slot("s0", None),
            slot("s1", Some("")),
            slot("s2", None),
        ])
        .validate()
        .unwrap();
        // create_tap needs a name.
        let mut s = slot("s0", Some(""));
        s.create_tap = true;
        assert_eq!(err(&with(vec![s])).0, "network-interfaces[0].create_tap");
    }

    #[test]
    fn macs_checked() {
        assert_eq!(
            parse_mac("aa:BB:0c:dd:ee:ff"),
            Some([0xaa, 0xbb, 0x0c, 0xdd, 0xee, 0xff])
        );
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aa-bb-cc-dd-ee-ff",
            "a:bb:cc:dd:ee:fff",
            "aa:bb:cc:dd:ee:gg",
            "+a:bb:cc:dd:ee:ff",
            " aa:bb:cc:dd:ee:ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
            let mut n = net("a");
            n.guest_mac = Some(bad.into());
            let (f, m) = err(&with(vec![n.clone()]));
            assert_eq!(f, "network-interfaces[0].guest_mac", "{bad:?}");
            assert!(m.contains("is not a MAC address"), "{m}");
            assert_eq!(n.mac(), None);
        }
        let mut n = net("a");
        n.guest_mac = Some("01:00:5e:00:00:01".into());
        let (f, m) = err(&with(vec![n.clone()]));
        assert_eq!(f, "network-interfaces[0].guest_mac");
        assert!(m.contains("multicast"), "{m}");
        n.guest_mac = Some("ff:ff:ff:ff:ff:ff".into());
        assert_eq!(
            err(&with(vec![n.clone()])).0,
            "network-interfaces[0].guest_mac"
        );
        n.guest_mac = Some("00:00:00:00:00:00".into());
        assert_eq!(
            err(&with(vec![n.clone()])).0,
            "network-interfaces[0].guest_mac"
        );
        n.guest_mac = Some("02:00:00:00:00:01".into());
        with(vec![n.clone()]).validate().unwrap();
        // Two interfaces with one MAC (given or derived).
        let mut b = net("b");
        b.guest_mac = Some("02:00:00:00:00:01".into());
        let (f, m) = err(&with(vec![n, b]));
        assert_eq!(f, "network-interfaces[1].guest_mac");
        assert!(
            m.contains("02:00:00:00:00:01 is also the MAC of network-interfaces[0]"),
            "{m}"
        );
        let mut c = net("c");
        c.guest_mac = Some(format_mac(&derived_mac("a")));
        assert_eq!(
            err(&with(vec![net("a"), c])).0,
            "network-interfaces[1].guest_mac"
        );
    }

    #[test]
    fn derived_macs_are_stable_unicast_and_local() {
        let a = derived_mac("eth0");
        assert_eq!(a, derived_mac("eth0"));
        assert_ne!(a, derived_mac("eth1"));
        for id in [
            "eth0",
            "eth1",
            "x",
            "",
            "a-very-long-interface-id_0123456789",
        ] {
            let m = derived_mac(id);
            assert_eq!(m[0] & 1, 0, "{id}: unicast");
            assert_eq!(m[0] & 2, 2, "{id}: locally administered");
            assert_eq!(parse_mac(&format_mac(&m)), Some(m));
        }
        assert_eq!(net("eth0").mac(), Some(a));
    }

    #[test]
    fn rate_limiters_checked() {
        let bad = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 0,
                one_time_burst: None,
                refill_time: 100,
            }),
            ops: None,
        };
        let mut n = net("a");
        n.rx_rate_limiter = Some(bad);
        assert_eq!(
            err(&with(vec![net("z"), n.clone()])).0,
            "network-interfaces[1].rx_rate_limiter.bandwidth.size"
        );
        n.rx_rate_limiter = None;
        n.tx_rate_limiter = Some(RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 10,
                one_time_burst: Some(5),
                refill_time: 0,
            }),
        });
        assert_eq!(
            err(&with(vec![n.clone()])).0,
            "network-interfaces[0].tx_rate_limiter.ops.refill_time"
        );
        n.tx_rate_limiter = Some(RateLimiterConfig::default());
        n.rx_rate_limiter = Some(RateLimiterConfig::default());
        with(vec![n]).validate().unwrap();
    }

    #[test]
    fn at_most_19_virtio_devices_in_total() {
        let drive = |i: usize| DriveConfig {
            drive_id: format!("d{i}"),
            path_on_host: Some(some_file()),
            ..DriveConfig::default()
        };
        let nets = |n: usize| (0..n).map(|i| net(&format!("n{i}"))).collect::<Vec<_>>();
        let mut cfg = with(nets(MAX_VIRTIO_DEVICES));
        cfg.validate().unwrap();
        cfg.network_interfaces = nets(10);
        cfg.drives = (0..9).map(drive).collect();
        cfg.validate().unwrap();
        cfg.drives.push(drive(9));
        let (f, m) = err(&cfg);
        assert_eq!(f, "network-interfaces");
        assert!(m.contains("make 20 virtio devices"), "{m}");
        cfg.drives.pop();
        cfg.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: PathBuf::from("kestrel-never-created-net.sock"),
            vsock_id: None,
        });
        let (f, m) = err(&cfg);
        assert_eq!(f, "network-interfaces");
        assert!(
            m.contains("9 drives, 10 network interfaces, 0 fs shares and 1 vsock"),
            "{m}"
        );
        cfg.network_interfaces.pop();
        cfg.validate().unwrap();
    }

    #[test]
    fn network_interfaces_checked_by_validate() {
        // validate() reaches them only when everything before is valid, and does reach them.
        let mut cfg = with(vec![net("")]);
        cfg.machine_config.vcpu_count = 0;
        assert_eq!(err(&cfg).0, "machine-config.vcpu_count");
        cfg.machine_config.vcpu_count = 1;
        assert_eq!(err(&cfg).0, "network-interfaces[0].iface_id");
    }
}
