//! The state file: a fixed header, then the [`SnapshotState`] as JSON.
//!
//! | offset | size | content |
//! |---|---|---|
//! | 0  | 8  | magic `KSTRLSNP` |
//! | 8  | 4  | format version, little endian ([`FORMAT_VERSION`]) |
//! | 12 | 4  | reserved, 0 |
//! | 16 | 8  | body length in bytes, little endian |
//! | 24 | 32 | SHA-256 of the body |
//! | 56 | …  | body: [`SnapshotState`] as JSON |
//!
//! Reading refuses, in this order: a file too short for its header, another magic, another
//! format version, a body shorter or longer than the header says, a checksum mismatch, a body
//! that does not decode, and a body whose own version differs from the header's.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;

use super::{SnapshotState, FORMAT_VERSION};

/// The first bytes of every state file.
pub const MAGIC: [u8; 8] = *b"KSTRLSNP";
/// Bytes before the body.
pub const HEADER_LEN: usize = 56;

/// Why a state file could not be written or read.
#[derive(Debug, Error)]
pub enum StateFileError {
    /// The file could not be created, written, synced, renamed or read.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file does not start with [`MAGIC`].
    #[error("not a Kestrel state file (it starts with {found:02x?}, not {MAGIC:02x?})")]
    NotAStateFile {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// The file is of another format version.
    #[error(
        "state file format version {found} is not supported: this Kestrel reads version \
         {supported} only"
    )]
    Version {
        /// The file's version.
        found: u32,
        /// The one this build reads ([`FORMAT_VERSION`]).
        supported: u32,
    },
    /// The file ends before its header or its body does.
    #[error("state file truncated: {found} bytes where {expected} are needed")]
    Truncated {
        /// Bytes needed (the header, or the header plus the body length it states).
        expected: u64,
        /// Bytes in the file.
        found: u64,
    },
    /// The file is longer than its header says.
    #[error("state file has {found} bytes, {expected} expected from its header (trailing data)")]
    TrailingData {
        /// Header plus body length.
        expected: u64,
        /// Bytes in the file.
        found: u64,
    },
    /// The body's SHA-256 is not the one in the header: the file is damaged.
    #[error("state file checksum mismatch: the body is damaged")]
    Checksum,
    /// The body is not a state of this format.
    #[error("state file body cannot be decoded: {0}")]
    Decode(#[source] serde_json::Error),
    /// The state could not be encoded.
    #[error("the state cannot be encoded: {0}")]
    Encode(#[source] serde_json::Error),
    /// The body's own version differs from the header's.
    #[error("state file body says format version {body}, its header {header}")]
    BodyVersion {
        /// The body's `version`.
        body: u32,
        /// The header's version.
        header: u32,
    },
}

fn len_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Encode `state` as a complete state file (header and body).
///
/// # Errors
/// [`StateFileError::Encode`] if serialisation fails.
pub fn encode_state(state: &SnapshotState) -> Result<Vec<u8>, StateFileError> {
    let body = serde_json::to_vec(state).map_err(StateFileError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&state.version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&len_u64(body.len()).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    Ok(out)
}

/// Little-endian integer of `N` bytes at `at` (the caller checked the length).
fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&bytes[at..at + N]);
    a
}

/// Decode a complete state file, refusing anything but an intact file of [`FORMAT_VERSION`].
///
/// # Errors
/// The [`StateFileError`] variant naming the first problem (see the module documentation for
/// the order).
pub fn decode_state(bytes: &[u8]) -> Result<SnapshotState, StateFileError> {
    let found = len_u64(bytes.len());
    let truncated = |expected| StateFileError::Truncated { expected, found };
    if bytes.len() < MAGIC.len() {
        return Err(truncated(len_u64(HEADER_LEN)));
    }
    let magic: [u8; 8] = field(bytes, 0);
    if magic != MAGIC {
        return Err(StateFileError::NotAStateFile { found: magic });
    }
    if bytes.len() < HEADER_LEN {
        return Err(truncated(len_u64(HEADER_LEN)));
    }
    let version = u32::from_le_bytes(field(bytes, 8));
    if version != FORMAT_VERSION {
        return Err(StateFileError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let body_len = u64::from_le_bytes(field(bytes, 16));
    let expected = len_u64(HEADER_LEN).saturating_add(body_len);
    if found < expected {
        return Err(truncated(expected));
    }
    if found > expected {
        return Err(StateFileError::TrailingData { expected, found });
    }
    let body = &bytes[HEADER_LEN..];
    let sum: [u8; 32] = field(bytes, 24);
    if Sha256::digest(body).as_slice() != sum.as_slice() {
        return Err(StateFileError::Checksum);
    }
    let state: SnapshotState = serde_json::from_slice(body).map_err(StateFileError::Decode)?;
    if state.version != version {
        return Err(StateFileError::BodyVersion {
            body: state.version,
            header: version,
        });
    }
    Ok(state)
}

/// Write `state` to `path` atomically: a `.partial` file beside it is written and synced, then
/// renamed over `path` (on error it is removed; `path` is untouched).
///
/// # Errors
/// [`StateFileError::Io`] naming the file; [`StateFileError::Encode`].
pub fn write_state_file(path: &Path, state: &SnapshotState) -> Result<(), StateFileError> {
    let bytes = encode_state(state)?;
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let io_err = |p: &Path| {
        let path = p.to_path_buf();
        move |source: io::Error| StateFileError::Io { path, source }
    };
    let written = File::create(&partial)
        .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
        .map_err(io_err(&partial))
        .and_then(|()| fs::rename(&partial, path).map_err(io_err(path)));
    if written.is_err() {
        let _ = fs::remove_file(&partial);
    }
    written
}

/// Read and check the state file at `path` ([`decode_state`]).
///
/// # Errors
/// [`StateFileError::Io`] naming the file, or what [`decode_state`] refuses.
pub fn read_state_file(path: &Path) -> Result<SnapshotState, StateFileError> {
    let bytes = fs::read(path).map_err(|source| StateFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_state(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{VcpuState, VmState};
    use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry};

    fn sample_state() -> SnapshotState {
        let vm = VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        };
        let mut vcpu = VcpuState {
            id: 0,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f1,
                ..Default::default()
            }],
            msrs: vec![kvm_msr_entry {
                index: 0xc000_0080,
                data: 0xd01,
                ..Default::default()
            }],
            regs: Default::default(),
            sregs: Default::default(),
            fpu: Default::default(),
            xsave: Some(vec![3; 1024]),
            xcrs: None,
            lapic: Default::default(),
            events: Default::default(),
            mp_state: Default::default(),
            debugregs: Default::default(),
        };
        vcpu.regs.rip = 0x100_0000;
        vcpu.lapic.regs[0x20] = 7;
        SnapshotState::new(vm, vec![vcpu])
    }

    /// A file with this header version around `body`, with a correct length and checksum.
    fn file_with(version: u32, body: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&len_u64(body.len()).to_le_bytes());
        out.extend_from_slice(&Sha256::digest(body));
        out.extend_from_slice(body);
        out
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("kestrel-state-{}-{name}", std::process::id()))
    }

    #[test]
    fn a_state_round_trips() {
        let state = sample_state();
        let bytes = encode_state(&state).expect("encode");
        assert_eq!(&bytes[..8], b"KSTRLSNP");
        let back = decode_state(&bytes).expect("decode");
        assert_eq!(back.version, FORMAT_VERSION);
        assert_eq!(back.vcpus, state.vcpus);
        assert_eq!(
            serde_json::to_value(&back.vm).expect("json"),
            serde_json::to_value(&state.vm).expect("json")
        );
    }

    #[test]
    fn another_format_version_is_refused() {
        let mut bytes = encode_state(&sample_state()).expect("encode");
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        let e = decode_state(&bytes).expect_err("version 2");
        assert!(matches!(
            e,
            StateFileError::Version {
                found: 2,
                supported: FORMAT_VERSION
            }
        ));
        assert!(e.to_string().contains("version 2 is not supported"), "{e}");
    }

    #[test]
    fn another_file_is_refused() {
        let mut bytes = encode_state(&sample_state()).expect("encode");
        bytes[..4].copy_from_slice(b"\x7fELF");
        assert!(matches!(
            decode_state(&bytes),
            Err(StateFileError::NotAStateFile { .. })
        ));
    }

    #[test]
    fn a_truncated_file_is_refused() {
        let bytes = encode_state(&sample_state()).expect("encode");
        let total = len_u64(bytes.len());
        for (cut, expected) in [
            (bytes.len() - 1, total),
            (HEADER_LEN, total),
            (HEADER_LEN - 1, len_u64(HEADER_LEN)),
            (3, len_u64(HEADER_LEN)),
            (0, len_u64(HEADER_LEN)),
        ] {
            match decode_state(&bytes[..cut]) {
                Err(StateFileError::Truncated { expected: e, found }) => {
                    assert_eq!((e, found), (expected, len_u64(cut)))
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn trailing_data_is_refused() {
        let mut bytes = encode_state(&sample_state()).expect("encode");
        bytes.push(b'\n');
        assert!(matches!(
            decode_state(&bytes),
            Err(StateFileError::TrailingData { .. })
        ));
    }

    #[test]
    fn a_damaged_body_is_refused() {
        let mut bytes = encode_state(&sample_state()).expect("encode");
        let at = bytes.len() - 20;
        bytes[at] ^= 0x01;
        assert!(matches!(
            decode_state(&bytes),
            Err(StateFileError::Checksum)
        ));
    }

    #[test]
    fn a_body_that_is_no_state_is_refused() {
        let bytes = file_with(FORMAT_VERSION, br#"{"version":1}"#);
        assert!(matches!(
            decode_state(&bytes),
            Err(StateFileError::Decode(_))
        ));
        let mut state = sample_state();
        state.version = 9;
        let body = serde_json::to_vec(&state).expect("json");
        assert!(matches!(
            decode_state(&file_with(FORMAT_VERSION, &body)),
            Err(StateFileError::BodyVersion { body: 9, header: 1 })
        ));
    }

    #[test]
    fn a_state_file_is_written_atomically_and_read_back() {
        let path = temp_path("roundtrip");
        write_state_file(&path, &sample_state()).expect("write");
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        assert!(!Path::new(&partial).exists());
        let back = read_state_file(&path).expect("read");
        assert_eq!(back.vcpus, sample_state().vcpus);
        fs::remove_file(&path).expect("clean up");
    }

    #[test]
    fn io_errors_name_the_file() {
        let missing = temp_path("missing");
        match read_state_file(&missing) {
            Err(StateFileError::Io { path, source }) => {
                assert_eq!(path, missing);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
        let nowhere = temp_path("no-such-dir").join("state");
        let e = write_state_file(&nowhere, &sample_state()).expect_err("no directory");
        assert!(e.to_string().contains("no-such-dir"), "{e}");
        assert!(!nowhere.exists());
    }
}
