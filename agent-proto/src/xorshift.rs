//! The protocol's pseudo-random test data: what `stream_source` sends, what `io_bench` writes
//! and where it seeks, so the host can check a stream without the bytes crossing twice.

/// xorshift64* (`x ^= x >> 12; x ^= x << 25; x ^= x >> 27; out = x * 0x2545f4914f6cdd1d`),
/// 8 little-endian bytes a step, from `seed` (0 behaves as 1). Not for cryptography.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A stream from `seed` (0 behaves as 1).
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 { 1 } else { seed })
    }

    /// The next 8 bytes of the stream, as a little-endian `u64`.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fill `buf` with the next bytes. A `buf` whose length is not a multiple of 8 drops the
    /// rest of its last step (the next call starts a new one).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let mut r = XorShift::new(1);
        let mut b = [0u8; 16];
        r.fill(&mut b);
        // The first output of xorshift64* from state 1.
        assert_eq!(
            u64::from_le_bytes(b[..8].try_into().unwrap()),
            0x47e4_ce4b_896c_dd1d
        );
        let mut zero = XorShift::new(0);
        assert_eq!(
            zero.next_u64(),
            0x47e4_ce4b_896c_dd1d,
            "seed 0 behaves as 1"
        );
        assert_eq!(zero.next_u64().to_le_bytes(), b[8..]);
    }

    #[test]
    fn partial_steps_drop_their_rest() {
        let mut a = XorShift::new(9);
        let mut b = XorShift::new(9);
        let mut x = [0u8; 11];
        a.fill(&mut x);
        let (first, second) = (b.next_u64(), b.next_u64());
        assert_eq!(x[..8], first.to_le_bytes());
        assert_eq!(x[8..], second.to_le_bytes()[..3]);
        assert_eq!(a.next_u64(), b.next_u64());
    }
}
