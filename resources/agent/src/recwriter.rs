//! `kestrel-agent recwriter DEV PORT COUNT`: durable numbered records, acknowledged to the host.
//!
//! Connects to the host over vsock (CID 2, port PORT; through Kestrel's hybrid vsock that is the
//! host's Unix socket `<uds_path>_PORT`), opens DEV (a block device) with
//! `O_DIRECT | O_DSYNC`, and for seq = 0..COUNT writes record `seq` at byte `seq * 4096`; only
//! after that write returned (the data reached the device and the device was told to flush)
//! it sends `ack <seq>\n` to the host. Ends with `done <COUNT>\n`; exit 0, or 1 with a message
//! on stderr when anything fails, 2 on a usage error.
//!
//! Record layout (4096 bytes): `KESTREC1` (8 bytes), seq (u64 LE), payload (4048 bytes: the
//! u64 LE words `seq * 0x9e37_79b9_7f4a_7c15 ^ i` for word index i), SHA-256 of the first 4064
//! bytes (32 bytes). The host test (tests/tests/guest/durability.rs) checks all of it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use sha2::{Digest, Sha256};

use crate::vsock;

/// Size of one record (and the O_DIRECT alignment used).
pub const RECORD: usize = 4096;
const MAGIC: &[u8; 8] = b"KESTREC1";

/// Record `seq`, as written to the device.
pub fn record(seq: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    for (i, w) in out[16..RECORD - 32].chunks_mut(8).enumerate() {
        let v = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64;
        w.copy_from_slice(&v.to_le_bytes());
    }
    let digest = Sha256::digest(&out[..RECORD - 32]);
    out[RECORD - 32..RECORD].copy_from_slice(&digest);
}

fn run(dev: &str, port: u32, count: u64) -> Result<(), String> {
    let mut host = vsock::connect(vsock::HOST_CID, port)
        .map_err(|e| format!("connect to host port {port}: {e}"))?;
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(dev)
        .map_err(|e| format!("open {dev}: {e}"))?;
    // O_DIRECT wants an aligned buffer: an aligned window of a larger allocation.
    let mut storage = vec![0u8; 2 * RECORD];
    let off = storage.as_ptr().align_offset(RECORD);
    if off > RECORD {
        return Err("cannot align the record buffer".into());
    }
    let buf = &mut storage[off..off + RECORD];
    for seq in 0..count {
        record(seq, buf);
        let at = seq
            .checked_mul(RECORD as u64)
            .ok_or_else(|| format!("record {seq}: offset overflows"))?;
        disk.write_all_at(buf, at)
            .map_err(|e| format!("write record {seq} at {at}: {e}"))?;
        host.write_all(format!("ack {seq}\n").as_bytes())
            .map_err(|e| format!("ack {seq}: {e}"))?;
    }
    host.write_all(format!("done {count}\n").as_bytes())
        .map_err(|e| format!("done: {e}"))?;
    Ok(())
}

/// Entry point: `args` are the words after `recwriter`.
pub fn main(args: &[String]) -> i32 {
    let usage = "usage: kestrel-agent recwriter DEV PORT COUNT";
    let (Some(dev), Some(port), Some(count)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("{usage}");
        return 2;
    };
    let (Ok(port), Ok(count)) = (port.parse::<u32>(), count.parse::<u64>()) else {
        eprintln!("{usage}");
        return 2;
    };
    match run(dev, port, count) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("recwriter: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_layout() {
        let mut r = vec![0u8; RECORD];
        record(7, &mut r);
        assert_eq!(&r[..8], b"KESTREC1");
        assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), 7);
        assert_eq!(
            u64::from_le_bytes(r[24..32].try_into().unwrap()),
            7u64.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 1
        );
        assert_eq!(
            &r[RECORD - 32..],
            Sha256::digest(&r[..RECORD - 32]).as_slice()
        );
    }
}
