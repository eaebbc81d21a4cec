//! Standard base64 (RFC 4648: alphabet `A–Z a–z 0–9 + /`, `=` padding), the protocol's
//! encoding of binary data. Decoding also accepts unpadded input and rejects anything else
//! outside the alphabet.

use thiserror::Error;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Why [`decode`] refused its input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Base64Error {
    /// The length cannot be base64 (one character left over, or padding on a length that is
    /// not a multiple of 4).
    #[error("invalid base64 length")]
    Length,
    /// A character outside the alphabet (padding in the middle included).
    #[error("invalid base64 character {0:?}")]
    Character(char),
}

/// `data` as padded base64.
pub fn encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = |i: usize| chunk.get(i).copied().unwrap_or(0);
        let sextets = [
            b(0) >> 2,
            ((b(0) & 0x03) << 4) | (b(1) >> 4),
            ((b(1) & 0x0f) << 2) | (b(2) >> 6),
            b(2) & 0x3f,
        ];
        for (i, s) in sextets.into_iter().enumerate() {
            out.push(if i <= chunk.len() {
                char::from(ALPHABET[usize::from(s)])
            } else {
                '='
            });
        }
    }
    out
}

fn value(c: u8) -> Option<u32> {
    Some(u32::from(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    }))
}

/// The bytes of base64 `text`, padded or not.
///
/// # Errors
/// [`Base64Error`] for a length that cannot be base64 or a character outside the alphabet.
pub fn decode(text: &str) -> Result<Vec<u8>, Base64Error> {
    let bytes = text.as_bytes();
    let body = bytes
        .strip_suffix(b"==")
        .or_else(|| bytes.strip_suffix(b"="))
        .unwrap_or(bytes);
    if body.len() % 4 == 1 || (body.len() != bytes.len() && !bytes.len().is_multiple_of(4)) {
        return Err(Base64Error::Length);
    }
    let mut out = Vec::with_capacity(body.len() / 4 * 3 + 2);
    for chunk in body.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let v = value(c).ok_or(Base64Error::Character(char::from(c)))?;
            n |= v << (18 - 6 * i);
        }
        // n holds 24 bits: the chunk's bytes are the low three of its big-endian form.
        let [_, b0, b1, b2] = n.to_be_bytes();
        out.push(b0);
        if chunk.len() > 2 {
            out.push(b1);
        }
        if chunk.len() > 3 {
            out.push(b2);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_padded_and_unpadded() {
        for n in 0..70usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + n).to_le_bytes()[0]).collect();
            let e = encode(&data);
            assert_eq!(e.len() % 4, 0);
            assert_eq!(decode(&e).unwrap(), data);
            assert_eq!(decode(e.trim_end_matches('=')).unwrap(), data);
        }
    }

    #[test]
    fn known_values() {
        assert_eq!(encode(b""), "");
        assert_eq!(encode(b"fo"), "Zm8=");
        assert_eq!(encode(b"foob"), "Zm9vYg==");
        assert_eq!(encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode(&[0xff, 0xfe, 0xfd]), "//79");
        assert_eq!(decode("Zm8").unwrap(), b"fo");
    }

    #[test]
    fn refuses_what_is_not_base64() {
        assert_eq!(decode("Z"), Err(Base64Error::Length));
        assert_eq!(decode("Zm9vYg="), Err(Base64Error::Length));
        assert_eq!(decode("Zm9!"), Err(Base64Error::Character('!')));
        assert!(decode("Zm9v!").is_err());
        assert!(decode("Zm9v Yg==").is_err());
        assert!(decode("Zm8=Zm8=").is_err());
        assert_eq!(
            Base64Error::Character('!').to_string(),
            "invalid base64 character '!'"
        );
    }
}
