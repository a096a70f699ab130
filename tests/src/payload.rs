//! The payload pod-app sends: a deterministic byte stream, so the sender, the echo checker and a
//! packet sniffer all know what the bytes are without storing them.

/// A deterministic byte stream (xorshift64*), so sender and checker agree without storing it.
/// Bytes come out in the same order however the caller slices them.
pub struct Stream {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Stream {
    /// Returns the stream of `seed` (every seed gives a different stream).
    pub fn new(seed: u64) -> Self {
        Stream { state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, word: [0; 8], used: 8 }
    }

    fn next_word(&mut self) -> [u8; 8] {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    }

    /// Fills `buf` with the stream's next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut at = 0;
        while at < buf.len() {
            if self.used == 8 {
                if buf.len() - at >= 8 {
                    let word = self.next_word();
                    buf[at..at + 8].copy_from_slice(&word);
                    at += 8;
                    continue;
                }
                self.word = self.next_word();
                self.used = 0;
            }
            let n = (8 - self.used).min(buf.len() - at);
            buf[at..at + n].copy_from_slice(&self.word[self.used..self.used + n]);
            self.used += n;
            at += n;
        }
    }
}

/// Returns the first `len` bytes of the stream of `seed`.
pub fn prefix(seed: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    Stream::new(seed).fill(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::Stream;

    #[test]
    fn stream_is_the_same_however_it_is_sliced() {
        let mut whole = vec![0u8; 1000];
        Stream::new(7).fill(&mut whole);
        let mut sliced = Vec::new();
        let mut s = Stream::new(7);
        for n in [3usize, 1, 8, 13, 64, 5, 906] {
            let mut part = vec![0u8; n];
            s.fill(&mut part);
            sliced.extend(part);
        }
        assert_eq!(whole, sliced);
    }
}
