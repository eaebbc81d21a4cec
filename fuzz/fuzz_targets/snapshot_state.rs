//! The snapshot state file reader (`kestrel_vmm::snapshot::decode_state`): a state file comes
//! from disk, possibly from another host or a damaged copy. The input is used twice: as a whole
//! file (header checks: magic, version, length, checksum), and as the JSON body of a file whose
//! header is made valid for it (so the fuzzer reaches the body's decoding past the checksum).
//! Nothing is asserted beyond "no panic"; a body that decodes must encode again.

#![no_main]

use kestrel_vmm::snapshot::{decode_state, encode_state, FORMAT_VERSION};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let _ = decode_state(data);
    let mut file = Vec::with_capacity(56 + data.len());
    file.extend_from_slice(b"KSTRLSNP");
    file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&0u32.to_le_bytes());
    file.extend_from_slice(&(data.len() as u64).to_le_bytes());
    file.extend_from_slice(&Sha256::digest(data));
    file.extend_from_slice(data);
    if let Ok(state) = decode_state(&file) {
        let again = encode_state(&state).expect("a decoded state encodes");
        assert!(decode_state(&again).is_ok(), "an encoded state decodes");
    }
});
