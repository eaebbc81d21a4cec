//! A network namespace a test or bench makes for its TAP devices, deleted on drop.

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

/// A network namespace made with `ip netns add`, deleted on drop. The name is public for
/// the checks that count what lives in it.
pub struct Netns(pub String);

impl Netns {
    /// Create namespace `name` (replacing a stale one). Panics without root or iproute2.
    pub fn new(name: &str) -> Netns {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("run ip")
            .success();
        assert!(ok, "ip netns add {name} (needs root and iproute2)");
        Netns(name.to_string())
    }

    /// Move the calling thread into the namespace (sockets and TAPs it creates from then on
    /// live there).
    pub fn enter(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.0)).expect("open netns");
        // SAFETY: setns on a valid namespace fd; it affects only the calling thread.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// `ip -n <ns> <args>`; panics with its output on failure.
    pub fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Run `args` (a command and its arguments) in the namespace (`ip netns exec`):
    /// (success, stdout + stderr).
    pub fn exec(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .expect("run ip netns exec");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
